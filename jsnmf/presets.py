"""Named sets of SNMF hyperparameters: ``PRESETS["paper"]`` reproduces the paper's fits.

A preset holds algorithm hyperparameters only (rank, solver, sparsity, init, max_iter, tol, patience,
seed, dtype, ridge, hals_sweeps), never runtime settings (progress bars, meshes, chunking,
checkpointing), so ``SNMF(**preset.params(rank=...))`` and ``SNMF.from_preset(name, rank=...)`` fit the
same problem wherever they run.

The paper's fit (``notes/ecosystem.md`` §4.0, its ``factorization/seminmf.py`` and run scripts):

- ``init="random"``: G ~ U[0, 1), F ~ N(0, 1) (train.py's choice; the project's default too);
- ``sparsity=0.01``: winner-take-all keeps ⌈0.01·d_mlp⌉ entries of each column of F;
- ``solver="mu"``: the multiplicative update of G;
- ``ridge=1e-6``: the ``+1e-6·I`` of F's least squares;
- ``max_iter=2000``: its run scripts' iteration count (its code's own default cap is 200 000);
- ``patience=1500``: stop after 1500 iterations without an improvement, keep the best iterate;
- ``tol=0.0``: the paper counts an improvement when the loss falls by more than 1e-4 in absolute
  terms. jsnmf's ``tol`` is relative to ‖X‖² (so it means the same on any corpus); on real
  activations (‖X‖² ≥ 1e5) the paper's 1e-4 is below 1e-9·‖X‖², i.e. any decrease counts: ``tol=0``.
- ``rank=100``: the paper's default K (its run scripts use 50 on GPT-2 layer 0).

What differs from ``SNMF()``'s defaults: ``max_iter`` 2000 (default 1000), ``patience`` 1500 (default
100) and ``tol`` 0 (default 1e-6·‖X‖²). The defaults stop much earlier: after 100 iterations without an
improvement of 1e-6·‖X‖² the paper's fit still runs up to 1500 more for gains that small.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["Preset", "PRESETS", "PAPER", "HYPERPARAMETERS", "get_preset"]

# The SNMF constructor arguments a preset may set (algorithm hyperparameters, no runtime settings).
HYPERPARAMETERS = ("rank", "solver", "sparsity", "init", "max_iter", "tol", "patience", "seed", "dtype", "ridge",
                   "hals_sweeps")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named set of SNMF hyperparameters and the sentence saying where they come from."""

    name: str
    settings: Mapping[str, Any]
    source: str

    def __post_init__(self):
        unknown = sorted(set(self.settings) - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(f"preset {self.name!r}: {unknown} are not SNMF hyperparameters {HYPERPARAMETERS}")
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))

    def params(self, **overrides) -> dict[str, Any]:
        """The preset's settings with ``overrides`` (hyperparameters only) on top: SNMF keyword arguments."""
        unknown = sorted(set(overrides) - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(f"{unknown} are not hyperparameters a preset sets; pass runtime settings "
                             "(progress, mesh, chunking, checkpoints) to fit(...)")
        return {**self.settings, **{k: v for k, v in overrides.items() if v is not None}}

    def differences(self, params: Mapping[str, Any]) -> dict[str, dict]:
        """Where ``params`` (e.g. ``SNMF.get_params()``) differ from the preset (rank and seed aside):
        ``{name: {"preset": value, "actual": value}}``."""
        return {name: {"preset": value, "actual": params.get(name)} for name, value in self.settings.items()
                if name not in ("rank", "seed") and params.get(name) != value}


PAPER = Preset(
    "paper",
    {"rank": 100, "solver": "mu", "sparsity": 0.01, "init": "random", "max_iter": 2000, "tol": 0.0,
     "patience": 1500, "ridge": 1e-6},
    "Shafran, Geiger & Geva (2025): factorization/seminmf.py and its run scripts (notes/ecosystem.md §4.0)",
)

PRESETS: Mapping[str, Preset] = MappingProxyType({PAPER.name: PAPER})


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None
