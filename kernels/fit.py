"""The in-memory fit loop, compiled as a whole.

Iterations run inside ``lax.while_loop`` in blocks of ``block_size``: one dispatch per block, not
per step. Between blocks the host only reads the block's losses (for the progress bar) and whether
the stopping rule fired. The loop keeps the best iterate and stops after ``patience`` iterations
without an improvement larger than ``tol·‖X‖²`` (the paper's rule, with ``tol`` made independent of
the scale of ``X``), or at ``max_iter``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsnmf.kernels.steps import (
    CodesUpdate,
    Extrapolation,
    Statistics,
    chunk_statistics,
    codes_step,
    extrapolated_codes,
    extrapolated_statistics,
    features_step,
    hals_codes,
    loss_from_statistics,
    matmul_f32,
    next_weights,
)
from jsnmf.kernels.solvers import get_solver


class SolverConfig(NamedTuple):
    """Static settings of the iteration (a change recompiles)."""

    solver: str = "mu"  # a name in the codes-solver registry (jsnmf.kernels.solvers)
    n_keep: int | None = None  # entries kept per column of F; None = no sparsification
    ridge: float = 1e-6
    mu_eps: float = 1e-6
    hals_sweeps: int = 4

    def codes_update(self) -> CodesUpdate:
        return get_solver(self.solver).build(self)

    def extrapolation(self) -> Extrapolation | None:
        """The solver's extrapolation rule between iterations, or None (the loop carries no momentum)."""
        return get_solver(self.solver).extrapolation


class Momentum(NamedTuple):
    """What an extrapolated solver carries between iterations (:class:`~jsnmf.kernels.steps.Extrapolation`).

    With ``G`` the latest codes, the next iteration starts from ``Ĝ = G + step·(G − G_prev/scale)``
    and computes ``F`` from ``XᵀĜ``, ``ĜᵀĜ`` (:func:`~jsnmf.kernels.steps.extrapolated_statistics`).
    """

    G: jax.Array  # (n, k) G_prev: the codes of the iterate before the latest, in their own scaling
    XtG: jax.Array  # (d, k) Xᵀ G_prev
    GtG: jax.Array  # (k, k) G_prevᵀ G_prev
    cross: jax.Array  # (k, k) Gᵀ G_prev
    scale: jax.Array  # (k,) the latest rescale (step 3): G_prev/scale is in the scaling of G
    step: jax.Array  # () β of the next extrapolation (0 at the start and after a restart)
    beta: jax.Array  # () β
    beta_max: jax.Array  # () β̄, the cap of β
    loss: jax.Array  # () the latest loss (a rise restarts)


def initial_momentum(G0: jax.Array | None, stats: Statistics, rule: Extrapolation) -> Momentum:
    """The momentum before the first iteration: ``G_prev = G0`` and ``step = 0``, so it starts from ``G0``.

    Every leaf is its own buffer (the loop donates its state). ``G0 = None``: the codes live elsewhere
    (a streamed fit keeps ``G_prev`` in a codes buffer), so ``G`` is None."""
    k = stats.GtG.shape[-1]
    scalar = lambda value: jnp.array(value, jnp.float32)  # noqa: E731
    return Momentum(None if G0 is None else jnp.copy(G0), jnp.copy(stats.XtG), jnp.copy(stats.GtG),
                    jnp.copy(stats.GtG), jnp.ones((k,), jnp.float32), scalar(0.0), scalar(rule.beta0),
                    scalar(rule.ceiling), scalar(jnp.inf))


def extrapolated_features(stats: Statistics, momentum: Momentum, config: SolverConfig):
    """Steps 1–3 from the statistics of the extrapolated codes: ``(F, scale, inv_prev_scale)``.

    ``inv_prev_scale`` (``1/momentum.scale``) brings ``G_prev`` into the scaling of the latest codes
    (:func:`~jsnmf.kernels.steps.extrapolated_codes`)."""
    inv_prev_scale = 1.0 / momentum.scale
    XtG, GtG = extrapolated_statistics(stats.XtG, stats.GtG, momentum.XtG, momentum.GtG, momentum.cross,
                                       inv_prev_scale, momentum.step)
    F, scale = features_step(XtG, GtG, ridge=config.ridge, n_keep=config.n_keep)
    return F, scale, inv_prev_scale


def advanced_momentum(momentum: Momentum, G_prev, stats: Statistics, cross, scale, loss, rule: Extrapolation):
    """The momentum after an iteration that started from codes ``G_prev`` (statistics ``stats``),
    rescaled them by ``scale``, and reached ``loss`` with new codes ``G`` (``cross = Gᵀ G_prev``)."""
    weights = next_weights(rule, loss, momentum.loss, momentum.beta, momentum.beta_max)
    return Momentum(G_prev, stats.XtG, stats.GtG, cross, scale, *weights, loss)


class FitState(NamedTuple):
    """Everything the loop carries; a pytree, so it can be checkpointed as is."""

    F: jax.Array  # (d, k) features of the latest iterate
    G: jax.Array  # (n, k) codes of the latest iterate
    stats: Statistics  # of the latest codes
    best_F: jax.Array
    best_G: jax.Array
    best_loss: jax.Array  # () lowest loss so far
    reference_loss: jax.Array  # () loss at the last improvement larger than tol (patience clock)
    since_improvement: jax.Array  # () iterations since that improvement
    iteration: jax.Array  # () iterations done
    done: jax.Array  # () bool: the stopping rule fired
    momentum: Momentum | None = None  # extrapolated solvers only (None: no leaves)


def initial_state(X: jax.Array, F0: jax.Array, G0: jax.Array, axis_name: str | None = None,
                  extrapolation: Extrapolation | None = None) -> FitState:
    """The state before the first iteration: statistics of ``G0`` (one pass over ``X``).

    ``axis_name``: when ``X`` and ``G0`` are one device's rows inside ``shard_map``, the mesh axis
    the statistics are summed over (``psum``). ``extrapolation``: the solver's rule
    (``SolverConfig.extrapolation()``), which adds the :class:`Momentum`.
    """
    stats = chunk_statistics(X, G0)
    if axis_name is not None:
        stats = lax.psum(stats, axis_name)
    inf = lambda: jnp.array(jnp.inf, jnp.float32)  # noqa: E731
    zero = lambda: jnp.array(0, jnp.int32)  # noqa: E731
    momentum = None if extrapolation is None else initial_momentum(G0, stats, extrapolation)
    # Every leaf is its own buffer: the loop donates its state, and one buffer cannot be donated twice.
    return FitState(F0, G0, stats, jnp.copy(F0), jnp.copy(G0), inf(), inf(), zero(), zero(), jnp.array(False),
                    momentum)


def iterate(X: jax.Array, G: jax.Array, stats: Statistics, sq_norm_X: jax.Array, config: SolverConfig,
            axis_name: str | None = None, momentum: Momentum | None = None):
    """One full iteration (docs/architecture.md, steps 1–5) in memory; returns ``(F, G, stats, loss, momentum)``.

    ``axis_name``: inside ``shard_map``, the mesh axis whose devices hold the other rows; the
    statistics of the codes pass are summed over it, everything else is replicated. ``momentum``: an
    extrapolated solver's (:class:`Momentum`): the iteration starts from the extrapolated codes.
    """
    if momentum is None:
        F, scale = features_step(stats.XtG, stats.GtG, ridge=config.ridge, n_keep=config.n_keep)
        start = G
    else:
        F, scale, inv_prev_scale = extrapolated_features(stats, momentum, config)
        start = extrapolated_codes(G, momentum.G, inv_prev_scale, momentum.step)
    Q = F.T @ F
    G_new, stats_new = codes_step(X, start, F, Q, scale, config.codes_update())
    cross = None if momentum is None else G_new.T @ G
    if axis_name is not None:
        stats_new, cross = lax.psum((stats_new, cross), axis_name)
    loss = loss_from_statistics(sq_norm_X, stats_new, Q)
    if momentum is not None:
        momentum = advanced_momentum(momentum, G, stats, cross, scale, loss, config.extrapolation())
    return F, G_new, stats_new, loss, momentum


def stopped(since_improvement, iteration, loss, patience, max_iter):
    """The stopping rule: ``patience`` iterations without an improvement, ``max_iter``, or a non-finite loss."""
    return (since_improvement >= patience) | (iteration >= max_iter) | ~jnp.isfinite(loss)


def stopping_update(best_loss, reference_loss, since_improvement, iteration, loss, *, tol, sq_norm_X, patience,
                    max_iter):
    """The one stopping rule and best-iterate test, after an iteration with loss ``loss``.

    An improvement counts when the loss falls more than ``tol·‖X‖²`` below the loss at the last one.
    Returns ``(better, best_loss, reference_loss, since_improvement, iteration, done)``; ``better``:
    this iterate is the best so far. Used inside the compiled loops (:func:`advance`) and, on
    scalars, by the streamed fit between passes (:mod:`jsnmf.fit.stream`).
    """
    better = loss < best_loss
    improved = loss < reference_loss - tol * sq_norm_X
    since = jnp.where(improved, 0, since_improvement + 1)
    iteration = iteration + 1
    return (better, jnp.where(better, loss, best_loss), jnp.where(improved, loss, reference_loss), since, iteration,
            stopped(since, iteration, loss, patience, max_iter))


def advance(state: FitState, F, G, stats, loss, *, sq_norm_X, tol, patience, max_iter, momentum=None) -> FitState:
    """Book-keeping after an iteration: best iterate, patience clock, stopping rule."""
    better, best_loss, reference_loss, since, iteration, done = stopping_update(
        state.best_loss, state.reference_loss, state.since_improvement, state.iteration, loss,
        tol=tol, sq_norm_X=sq_norm_X, patience=patience, max_iter=max_iter)
    return FitState(
        F=F,
        G=G,
        stats=stats,
        best_F=jnp.where(better, F, state.best_F),
        best_G=jnp.where(better, G, state.best_G),
        best_loss=best_loss,
        reference_loss=reference_loss,
        since_improvement=since,
        iteration=iteration,
        done=done,
        momentum=momentum,
    )


@partial(jax.jit, static_argnames=("config", "block_size", "axis_name"), donate_argnames=("state",))
def run_block(
    X: jax.Array,
    sq_norm_X: jax.Array,
    state: FitState,
    tol: jax.Array,
    patience: jax.Array,
    max_iter: jax.Array,
    stop_at: jax.Array | None = None,
    *,
    config: SolverConfig,
    block_size: int,
    axis_name: str | None = None,
):
    """Up to ``block_size`` iterations in one compiled ``while_loop``.

    ``axis_name``: run inside ``shard_map`` on one device's rows, statistics summed over that axis.

    ``stop_at`` (optional): also pause when ``state.iteration`` reaches it (a checkpoint boundary);
    the state is not marked done, so the next block carries on.
    Returns the new state and the block's losses (``nan`` past the iterations actually run).
    """
    history = jnp.full((block_size,), jnp.nan, jnp.float32)

    def cond(carry):
        state, _, i = carry
        running = (i < block_size) & ~state.done
        return running if stop_at is None else running & (state.iteration < stop_at)

    def body(carry):
        state, history, i = carry
        F, G, stats, loss, momentum = iterate(X, state.G, state.stats, sq_norm_X, config, axis_name, state.momentum)
        state = advance(
            state, F, G, stats, loss, sq_norm_X=sq_norm_X, tol=tol, patience=patience, max_iter=max_iter,
            momentum=momentum)
        return state, history.at[i].set(loss), i + 1

    state, history, _ = lax.while_loop(cond, body, (state, history, jnp.array(0, jnp.int32)))
    return state, history


@partial(jax.jit, static_argnames=("max_sweeps", "axis_name"))
def solve_codes(
    X: jax.Array, F: jax.Array, tol: jax.Array, max_sweeps: int = 500, axis_name: str | None = None
) -> jax.Array:
    """Codes of new tokens with ``F`` fixed: ``argmin_{G≥0} ‖X − G Fᵀ‖²`` (non-negative least squares).

    Starts from the clipped unconstrained solution and runs HALS sweeps (exact coordinate descent,
    which converges to the NNLS optimum) until the largest change of a code, relative to the
    largest code, falls below ``tol``, or ``max_sweeps``.
    """
    Q = F.T @ F
    P = matmul_f32(X, F)
    k = Q.shape[0]
    # A zero feature leaves Q singular; the tiny ridge keeps the start finite (its codes become 0).
    ridge = 1e-6 * jnp.maximum(jnp.max(jnp.diagonal(Q)), 1e-30)
    G0 = jnp.maximum(jax.scipy.linalg.solve(Q + ridge * jnp.eye(k), P.T, assume_a="pos").T, 0.0)
    sweep = hals_codes(1)

    def cond(carry):
        _, change, i = carry
        return (change > tol) & (i < max_sweeps)

    def body(carry):
        G, _, i = carry
        G_new = sweep(G, P, Q)
        largest_change, largest_code = jnp.max(jnp.abs(G_new - G)), jnp.max(G_new)
        if axis_name is not None:  # rows sharded: every device must agree on when to stop
            largest_change = lax.pmax(largest_change, axis_name)
            largest_code = lax.pmax(largest_code, axis_name)
        change = largest_change / jnp.maximum(largest_code, 1e-30)
        return G_new, change, i + 1

    G, _, _ = lax.while_loop(cond, body, (G0, jnp.array(jnp.inf, jnp.float32), jnp.array(0)))
    return G
