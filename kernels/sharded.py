"""The fit sharded over devices: tokens split over the mesh axis ``data`` (docs/architecture.md, "The algorithm").

Each device holds its rows of ``X`` and ``G``; ``F`` and the d×k / k×k statistics are replicated.
The whole block of iterations (the ``lax.while_loop`` of :func:`jsnmf.kernels.fit.run_block`) runs
inside ``shard_map``: every device runs the same loop on its rows and the statistics of the codes
pass are summed with ``psum``, so a block is still one dispatch and the only communication per
iteration is one all-reduce of ``d·k + k² + 1`` numbers.

Rows are padded to a multiple of the number of devices. Padded rows have ``X = 0`` and ``G = 0``,
and stay so: the multiplicative update multiplies a zero code, and a HALS sweep on a zero row moves
``G[:, j]`` by ``(P − G Q)[:, j] / Q[j, j] = 0``. They therefore add nothing to any statistic, and
the sharded fit computes the same iterates as the single-device fit (up to the order of float sums).

``batched=True`` variants carry a leading layer axis: several independent factorizations of
same-shaped ``X`` run under ``jax.vmap`` (each stops on its own rule; see :mod:`jsnmf.batch`).
"""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jsnmf.kernels.fit import FitState, Momentum, SolverConfig, initial_state, run_block, solve_codes
from jsnmf.kernels.steps import Statistics, matmul_f32

DATA = "data"  # the mesh axis tokens are split over


def check_mesh(mesh) -> Mesh:
    """Return ``mesh`` if it is a ``jax.sharding.Mesh`` with an axis named ``data``; else ValueError."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh with an axis named {DATA!r}; got {type(mesh).__name__}")
    if DATA not in mesh.axis_names:
        raise ValueError(
            f"mesh has axes {tuple(mesh.axis_names)} but no {DATA!r} axis: the sharded fit splits tokens over "
            f"the mesh axis named {DATA!r}, e.g. Mesh(np.array(jax.devices()), ({DATA!r},))"
        )
    return mesh


def row_spec(batched: bool = False) -> PartitionSpec:
    """Partition of a (layers ×) rows × columns array: rows split over ``data``."""
    return PartitionSpec(None, DATA, None) if batched else PartitionSpec(DATA, None)


def state_specs(batched: bool = False, momentum: bool = False) -> FitState:
    """Where each leaf of :class:`FitState` lives: codes by rows, everything else replicated.

    ``momentum``: the state of an extrapolated solver (its previous codes by rows too)."""
    rows, rep = row_spec(batched), PartitionSpec()
    carried = Momentum(rows, *[rep] * (len(Momentum._fields) - 1)) if momentum else None
    return FitState(F=rep, G=rows, stats=Statistics(rep, rep, rep), best_F=rep, best_G=rows, best_loss=rep,
                    reference_loss=rep, since_improvement=rep, iteration=rep, done=rep, momentum=carried)


@lru_cache(maxsize=64)
def state_initializer(mesh: Mesh, batched: bool = False, extrapolation=None):
    """Compiled ``(X, F0, G0) -> FitState`` with the statistics of ``G0`` summed over the mesh."""
    rows, rep = row_spec(batched), PartitionSpec()
    body = partial(initial_state, axis_name=DATA, extrapolation=extrapolation)
    if batched:
        body = jax.vmap(body)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rows, rep, rows),
                                 out_specs=state_specs(batched, extrapolation is not None)))


@lru_cache(maxsize=64)
def block_runner(mesh: Mesh, config: SolverConfig, block_size: int, batched: bool = False):
    """Compiled ``(X, sq_norm_X, state, tol, patience, max_iter, stop_at) -> (state, losses)``.

    :func:`run_block` inside ``shard_map``: up to ``block_size`` iterations in one dispatch, pausing
    early when ``state.iteration`` reaches ``stop_at`` (a checkpoint boundary). With ``batched``,
    ``X``, ``sq_norm_X`` and ``state`` have a leading layer axis and ``losses`` is
    (layers × block_size); the ``while_loop`` runs until every layer is done, finished ones masked.
    """
    rows, rep = row_spec(batched), PartitionSpec()

    def block(X, sq_norm_X, state, tol, patience, max_iter, stop_at):
        return run_block(X, sq_norm_X, state, tol, patience, max_iter, stop_at,
                         config=config, block_size=block_size, axis_name=DATA)

    if batched:
        block = jax.vmap(block, in_axes=(0, 0, 0, None, None, None, None))
    specs = state_specs(batched, config.extrapolation() is not None)
    sharded = jax.shard_map(block, mesh=mesh, in_specs=(rows, rep, specs, rep, rep, rep, rep),
                            out_specs=(specs, rep))
    return jax.jit(sharded, donate_argnums=(2,))


@lru_cache(maxsize=64)
def batched_block_runner(config: SolverConfig, block_size: int):
    """Single-device ``(X, sq_norm_X, state, tol, patience, max_iter, stop_at) -> (state, losses)`` over a layer axis."""

    def block(X, sq_norm_X, state, tol, patience, max_iter, stop_at):
        return run_block(X, sq_norm_X, state, tol, patience, max_iter, stop_at, config=config,
                         block_size=block_size)

    return jax.jit(jax.vmap(block, in_axes=(0, 0, 0, None, None, None, None)), donate_argnums=(2,))


@lru_cache(maxsize=64)
def codes_solver(mesh: Mesh, max_sweeps: int = 500):
    """Compiled ``(X, F, tol) -> G``: :func:`solve_codes` on each device's rows, one stopping rule for all."""
    rows, rep = row_spec(), PartitionSpec()
    body = partial(solve_codes, max_sweeps=max_sweeps, axis_name=DATA)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rows, rep, rep), out_specs=rows))


@jax.jit
def squared_norm(X: jax.Array) -> jax.Array:
    """``‖X‖²`` accumulated in float32 (of the last two axes, so per layer when batched)."""
    return jnp.sum(jnp.square(X.astype(jnp.float32)), axis=(-2, -1))


@jax.jit
def zero_rows(G: jax.Array, valid: jax.Array) -> jax.Array:
    """``G`` with the rows where ``valid`` is False set to zero (the padding invariant)."""
    return jnp.where(valid[..., None], G, 0.0).astype(G.dtype)


@jax.jit
def explained_variance(X: jax.Array, G: jax.Array, F: jax.Array, n_rows: jax.Array) -> jax.Array:
    """``1 − ‖X − G Fᵀ‖² / Σ_j ‖X_j − mean(X_j)‖²`` from sums over rows (padding rows add nothing).

    ``n_rows`` is the number of real rows, which the column means divide by.
    """
    X32 = X.astype(jnp.float32)
    sq_norm_X = jnp.sum(jnp.square(X32))
    P_ = matmul_f32(X, F)
    residual = sq_norm_X - 2.0 * jnp.sum(P_ * G) + jnp.sum((F.T @ F) * (G.T @ G))
    mean = jnp.sum(X32, axis=0) / n_rows
    total = sq_norm_X - n_rows * jnp.sum(mean * mean)
    return 1.0 - jnp.maximum(residual, 0.0) / total
