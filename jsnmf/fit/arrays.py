"""The array backend: ``X`` held on the device(s), iterations compiled in blocks.

One backend for the in-memory cases of docs/architecture.md "The driver and its backends": one device (``mesh=None``), rows
split over a mesh's ``data`` axis (also across processes; :mod:`jsnmf.kernels.sharded`), and
several layers at once as a leading batch axis (each layer stops on its own rule). A block runs up
to ``BLOCK_SIZE`` iterations in one dispatch (:func:`jsnmf.kernels.fit.run_block`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jsnmf.distributed import ShardedRows, default_mesh, global_rows, replicate, replicated_value
from jsnmf.kernels.fit import SolverConfig, initial_state, run_block
from jsnmf.fit.loop import FitResult
from jsnmf.fit.starts import ArrayRows, start_factors
from jsnmf.kernels.sharded import batched_block_runner, block_runner, check_mesh, squared_norm, state_initializer

__all__ = ["Limits", "ArrayBackend", "BLOCK_SIZE", "active_mesh", "sharded_rows"]

# Iterations per compiled block, whatever max_iter: the block size is static (the length of its loss
# buffer), so tying it to max_iter would recompile the loop for every max_iter below it. A block stops
# early at max_iter, a checkpoint boundary or the stopping rule; its unused losses stay nan.
BLOCK_SIZE = 50


def active_mesh(mesh, X=None):
    """The mesh to shard over, or None for one device.

    ``X`` assembled by :func:`jsnmf.distributed.global_rows` brings its own mesh (which must be
    ``mesh`` when that is set). Otherwise ``mesh``, or every device JAX sees when there are several
    (devices or processes).
    """
    if isinstance(X, ShardedRows):
        if mesh is not None and X.layout.mesh != mesh:
            raise ValueError("X was assembled (global_rows) on a different mesh than this SNMF's mesh")
        return X.layout.mesh
    if mesh is not None:
        return check_mesh(mesh)
    if jax.process_count() > 1 or jax.device_count() > 1:
        return default_mesh()
    return None


def sharded_rows(X, mesh, dtype, name: str = "X") -> ShardedRows:
    """``X`` (this process's rows) as a global row-sharded array in ``dtype``."""
    if isinstance(X, ShardedRows):
        return X if X.array.dtype == dtype else ShardedRows(X.array.astype(dtype), X.layout)
    return global_rows(X, mesh, dtype=dtype, name=name)


@dataclass(frozen=True)
class Limits:
    """The stopping rule's settings."""

    tol: float
    patience: int
    max_iter: int

    def arrays(self):
        return np.float32(self.tol), np.int32(self.patience), np.int32(self.max_iter)


_initial_state = jax.jit(initial_state, static_argnames=("axis_name", "extrapolation"))
# Compiled, so that the float32 squares of X are summed as they are made: run op by op they were a
# temporary array as large as X in float32 (twice X held in bfloat16) beside X on the device.
_squared_norm = jax.jit(squared_norm)


# Built once per rule: a jit made per fit is a new function to JAX's cache, so every batched fit compiled it again.
@lru_cache(maxsize=16)
def _batched_initial_state(extrapolation):
    return jax.jit(jax.vmap(partial(initial_state, extrapolation=extrapolation)))


@partial(jax.jit, static_argnames=("init", "k", "extrapolation"))
def started_state(X: jax.Array, key: jax.Array, *, init: str, k: int, extrapolation=None):
    """A traceable named start (:data:`jsnmf.fit.starts.TRACEABLE`) on one device and the statistics of
    its ``G0``, as one executable: run op by op they were some twenty small ones to compile or to read
    back from the cache (a fresh-process fit of one iteration at n=8192, d=3072, k=100: 22 executables
    and 2.39 s cold, 0.71 s warm before; 5 and 1.79 s, 0.57 s after).

    The state's ``F`` starts at zero instead of ``F0``: no iteration reads it (step 1 recomputes ``F``
    from ``G0``, and the first iteration replaces it and the best ``F``), so XLA drops the draw of
    ``F0``, a third of this executable's compile time."""
    F0, G0 = start_factors(init, key, ArrayRows(X), k)
    return initial_state(X, jnp.zeros_like(F0), G0, extrapolation=extrapolation)


class ArrayBackend:
    """``X`` (n × d), or (layers × n × d) when ``batched``, on one device or row-sharded on ``mesh``.

    ``layout``: the :class:`~jsnmf.distributed.RowLayout` of sharded rows (``X`` is then the padded
    global array). ``starts()`` returns the initial ``(F0, G0)`` (stacked over layers when batched).
    """

    def __init__(self, X: jax.Array, *, config: SolverConfig, limits: Limits, starts: Callable, mesh=None,
                 layout=None, batched: bool = False, start_state: Callable | None = None):
        self.X, self.config, self.limits, self.starts = X, config, limits, starts
        self.start_state = start_state  # () -> FitState in one executable, when the start allows
        self.mesh, self.layout, self.batched = mesh, layout, batched
        self.n_tokens = layout.n_rows if layout is not None else X.shape[-2]
        self.d = X.shape[-1]
        self.sq_norm_X = _squared_norm(X)
        self.sq_norms = np.asarray(replicated_value(self.sq_norm_X), np.float64)
        block_size = BLOCK_SIZE  # not min(BLOCK_SIZE, max_iter): max_iter is traced, never compiled in
        if mesh is not None:
            self._block = block_runner(mesh, config, block_size, batched)
        elif batched:
            self._block = batched_block_runner(config, block_size)
        else:
            self._block = lambda X, sq, s, tol, patience, max_iter, stop_at: run_block(
                X, sq, s, tol, patience, max_iter, stop_at, config=config, block_size=block_size)

    # -- the backend interface of jsnmf.fit.loop

    def start(self, status) -> object:
        if self.start_state is not None:
            return self.start_state()
        F0, G0 = self.starts()
        extrapolation = self.config.extrapolation()
        if self.mesh is not None:
            return state_initializer(self.mesh, self.batched, extrapolation)(self.X, F0, G0)
        if self.batched:
            return _batched_initial_state(extrapolation)(self.X, F0, G0)
        return _initial_state(self.X, F0, G0, extrapolation=extrapolation)

    def restore(self, progress) -> object:
        limits = dict(patience=int(self.limits.patience), max_iter=int(self.limits.max_iter))
        if self.layout is None:
            return progress.to_fit_state(**limits)
        layout = self.layout
        own = slice(layout.local_offset, layout.local_offset + layout.local_rows)
        best_G = progress.G if progress.best_G is None else progress.best_G
        momentum_G = None if progress.momentum is None else layout.assemble(progress.momentum["G"][own])
        return progress.to_fit_state(**limits, G=layout.assemble(progress.G[own]), best_G=layout.assemble(best_G[own]),
                                     momentum_G=momentum_G, place=lambda value: replicate(value, self.mesh))

    def run(self, state, stop_at: int):
        state, losses = self._block(self.X, self.sq_norm_X, state, *self.limits.arrays(), np.int32(stop_at))
        return state, replicated_value(losses)

    def iteration(self, state) -> int:
        return int(np.max(replicated_value(state.iteration)))

    def done(self, state) -> bool:
        return bool(np.all(replicated_value(state.done)))

    def checkpoint(self, state, losses):
        from jsnmf.checkpoint import FitProgress

        return FitProgress.from_fit_state(state, losses, float(self.sq_norms), self.layout)

    def close(self) -> None:
        pass

    # -- results

    def results(self, state, history: np.ndarray, seconds: float) -> list[FitResult]:
        """One :class:`~jsnmf.fit.loop.FitResult` per fit (per layer when batched), codes of this process's rows."""
        best_F = replicated_value(state.best_F)
        if self.layout is not None:
            best_G = self.layout.local_part(state.best_G, row_axis=1 if self.batched else 0)
        else:
            best_G = np.asarray(state.best_G)
        iterations, best_loss = replicated_value(state.iteration), replicated_value(state.best_loss)
        if not self.batched:
            best_F, best_G, history = best_F[None], best_G[None], np.asarray(history)[None]
            iterations, best_loss = np.reshape(iterations, 1), np.reshape(best_loss, 1)
        sq_norms = np.reshape(self.sq_norms, -1)
        return [FitResult(features=best_F[i], codes=best_G[i], loss_history=np.asarray(history[i]),
                          n_iter=int(iterations[i]), best_loss=float(best_loss[i]), sq_norm_X=float(sq_norms[i]),
                          n_features_in=self.d, seconds=seconds)
                for i in range(len(sq_norms))]
