"""The registry of codes solvers: step 4 of the iteration, looked up by name.

A codes solver updates ``G`` for fixed ``F`` from ``P = X F`` and ``Q = FᵀF`` (an optax-style
factory returning ``update(G, P, Q) -> G``, see :mod:`jsnmf.kernels.steps`). It must keep zero rows
zero when ``P`` is zero there (padding rows of a chunk or a shard add nothing), and keep ``G ≥ 0``.
Everything else — the estimator's ``solver=`` check, ``SNMF.solvers``, the CLI's ``--solver``
choices, every backend (in memory, sharded, streamed, batched) and the checkpoints — reads this
table, so adding a solver is one :func:`register_solver` call plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from jsnmf.kernels.steps import CodesUpdate, Extrapolation, apg_codes, hals_codes, mu_codes

if TYPE_CHECKING:
    from jsnmf.kernels.fit import SolverConfig

__all__ = ["CodesSolver", "register_solver", "get_solver", "solver_names"]


@dataclass(frozen=True)
class CodesSolver:
    """A codes solver: its name, how to build its update from the fit's static settings, one line of help,
    and optionally the rule by which the fit loop extrapolates the codes between iterations."""

    name: str
    build: Callable[["SolverConfig"], CodesUpdate]
    summary: str
    extrapolation: Extrapolation | None = None


_SOLVERS: dict[str, CodesSolver] = {}


def register_solver(name: str, build: Callable[["SolverConfig"], CodesUpdate], summary: str,
                    extrapolation: Extrapolation | None = None) -> CodesSolver:
    """Add a codes solver under ``name`` (``build(config)`` returns its ``update(G, P, Q)``).

    ``extrapolation``: every backend's loop then carries a momentum and starts each codes update from
    the extrapolated codes, clipped at zero (:class:`~jsnmf.kernels.steps.Extrapolation`); the update
    must be able to move a zero code (``hals`` and ``apg`` can, ``mu`` cannot)."""
    if name in _SOLVERS:
        raise ValueError(f"a codes solver named {name!r} is registered already")
    _SOLVERS[name] = solver = CodesSolver(name, build, summary, extrapolation)
    return solver


def solver_names() -> tuple[str, ...]:
    """The registered solvers' names, in registration order."""
    return tuple(_SOLVERS)


def get_solver(name: str) -> CodesSolver:
    """The solver registered as ``name``; ValueError listing the choices otherwise."""
    try:
        return _SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; expected one of {solver_names()}") from None


register_solver("mu", lambda config: mu_codes(config.mu_eps),
                "the paper's multiplicative update (Ding, Li & Jordan 2010)")
register_solver("hals", lambda config: hals_codes(config.hals_sweeps),
                "block coordinate descent sweeps (hals_sweeps per iteration): more progress per pass over X")

# Accelerated projected gradient (FISTA) on the codes' NNLS problem, restarted every iteration.
APG_STEPS = 8
register_solver("apg", lambda config: apg_codes(APG_STEPS),
                f"accelerated projected gradient (Nesterov/FISTA), {APG_STEPS} steps per iteration")

# HALS with the codes extrapolated between iterations (Ang & Gillis 2019's E-A-HALS scheme around the
# exact F step): fewer passes over X to a given error. mu has no such variant: a clipped start puts
# zeros in G that its multiplicative update can never move again (measured: it stalls far above mu).
register_solver("ehals", lambda config: hals_codes(config.hals_sweeps),
                "hals with the codes extrapolated between iterations (Ang & Gillis 2019): fewest passes over X",
                extrapolation=Extrapolation())
