"""Out-of-core SNMF: one pass over the chunks of ``X`` per iteration (docs/architecture.md, "The algorithm").

An iteration needs only ``XᵀG`` (d×k), ``GᵀG`` (k×k) and ``Σ P⊙G`` from the data, all sums over
tokens. So each iteration computes ``F`` from the statistics of the last pass
(:func:`~jsnmf.kernels.steps.features_step`), then streams the chunks: each chunk's rows of ``G``
are updated with that ``F`` (:func:`~jsnmf.kernels.steps.codes_step`) and the chunk's statistics are
added up for the next ``F`` and the loss. The iterates are those of the in-memory fit up to float
rounding (the sums are taken chunk by chunk).

Where things live:

- ``X`` is read chunk by chunk from a *chunk source*: an :class:`~jsnmf.store.ActivationStore`
  layer, a ``np.memmap``, or anything with ``n_tokens``, ``d_mlp``, ``chunk_bounds`` and
  ``read(layer, start, stop, raw=True)``. A background thread fetches the next chunk, in the on-disk
  precision (float32, float16 or bfloat16), and puts it on the device while the current chunk
  computes: a whole chunk file of a store (or rows of a memmap's file) is memory-mapped with its
  pages read in, anything else is read into one of two reused page-aligned buffers (zero-padded).
  On the CPU ``jax.device_put`` shares such aligned host memory instead of copying it, so no
  chunk is copied on the host; the reader maps or fills a chunk only once fewer than two are
  still held, JAX's references included (:class:`HostChunks`), so two chunks are in use at a time.
- Every chunk is padded to the same number of rows with zero rows and zero codes (a zero row with
  zero codes keeps zero codes under both solvers and adds nothing to the statistics), so each
  per-chunk step compiles once.
- ``G`` is kept as two buffers (the codes being read, the codes being written) plus the best codes,
  in memory or in ``.npy`` files read and written with ``pread``/``pwrite`` (``codes_on_disk``), so
  that on-disk codes do not occupy resident memory.
- The best iterate is kept as in memory: the best ``F`` on the host, and the best ``G`` copied chunk
  by chunk during the pass after the one that produced it (no extra pass over ``G``).

Several devices and hosts: with a mesh each step's chunk is split over the devices
(:class:`Placement`) and the statistics are summed across them; under several processes each
streams its own chunks (its share of a store, or its own rows of an array), writes its own codes,
and the passes take as many steps as the longest share (a process with fewer chunks adds zero
chunks). The iterates are those of the single-device fit up to float rounding.

Initializations are the passes of :mod:`jsnmf.fit.starts` over this backend's chunks (the backend
is their :class:`~jsnmf.fit.starts.Rows`), so a streamed start is the in-memory start up to the
order of float sums; ``(F0, G0)`` reads ``G0`` (array or memmap) by chunks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jsnmf.fit import chunk_steps as steps
from jsnmf.fit.loop import FitResult
from jsnmf.io.codes import DiskCodes, MemoryCodes, fill, process_suffix
from jsnmf.io.hostbuffers import BufferPool
from jsnmf.io.prefetch import Chunk, Placement, stream_chunks
from jsnmf.io.sources import StreamPlan
from jsnmf.kernels.fit import Momentum, SolverConfig, initial_momentum, stopping_update
from jsnmf.fit.starts import INITIALIZERS
from jsnmf.kernels.steps import Statistics

__all__ = ["StreamedFit", "StreamState"]

# -- where the chunks go --------------------------------------------------------------------------


def _where(plan: StreamPlan) -> str:
    where = plan.describe().get("path")
    layer = f" layer {plan.layer}" if plan.layer is not None else ""
    return f" of {where}{layer}" if where is not None else layer


def find_non_finite(plan: StreamPlan) -> str | None:
    """The error naming the first NaN or Inf of this process's rows of ``plan`` (one pass), or None."""
    for index, (start, stop) in enumerate(plan.bounds):
        rows = plan.load(index)[: stop - start].astype(np.float32)
        bad = np.argwhere(~np.isfinite(rows))
        if len(bad):
            row, col = bad[0]
            return (f"X contains NaN or Inf (first at row {start + row}, column {col}{_where(plan)}, "
                    f"chunk [{start}, {stop}))")
    return None


def _first_non_finite(plan: StreamPlan) -> str:
    found = find_non_finite(plan)
    if found is not None:
        return found
    return (f"X contains NaN or Inf in the rows of another process "
            f"(process {jax.process_index()}'s rows{_where(plan)} are finite)")


def sample_plan_rows(plan: StreamPlan, offset: int, indices) -> np.ndarray:
    """Rows ``indices`` of the global ``X`` as float32, on every process (a collective): this process
    holds the plan's rows, global rows ``[offset, offset + plan.rows)``, read from its source."""
    from jsnmf.distributed import sum_over_processes

    out = np.zeros((len(indices), plan.d), np.float32)
    for i, row in enumerate(np.asarray(indices).tolist()):
        local = row - offset
        if 0 <= local < plan.rows:
            out[i] = plan.read_rows(plan.offset + local, plan.offset + local + 1)[0]
    return sum_over_processes(out)  # each row is held by one process, zeros elsewhere


class StreamedFit:
    """The streamed fit of one estimator on one plan (see the module docstring).

    ``mesh``: split each step's chunk over the mesh's devices (:class:`Placement`); under several
    processes each streams its own plan and keeps its own codes, and the sizes below are global.
    """

    def __init__(self, plan: StreamPlan, *, rank: int, init, seed: int, config: SolverConfig, limits,
                 compute_dtype, mesh=None, work_dir: Path | None = None):
        from jsnmf.distributed import per_process

        self.plan, self.init, self.seed, self.limits = plan, init, seed, limits
        self.d, self.k = plan.d, int(rank)
        self.placement = Placement(mesh, plan)
        self.row_counts = per_process(plan.rows)  # every process's tokens
        self.n_local, self.offset = plan.rows, int(self.row_counts[: jax.process_index()].sum())
        self.n = self.n_tokens = int(self.row_counts.sum())
        self.steps = int(per_process(len(plan.bounds)).max())  # passes take as many steps as the longest share
        self.dtype = compute_dtype
        self.config = config
        self.work_dir = work_dir
        self.tokens_per_second = float("nan")
        self.sq_norms = np.float64(np.nan)
        self._codes_buffers = BufferPool((plan.chunk_rows, self.k), np.float32)
        # An extrapolated solver reads each chunk's latest and previous codes side by side.
        self.extrapolation = config.extrapolation()
        self._pair_buffers = BufferPool((plan.chunk_rows, 2 * self.k), np.float32)
        self._previous = None  # the previous codes' buffer (extrapolated solvers)
        self._compiled: set[str] = set()
        self._status: Callable[[str], None] = lambda text: None
        self._buffers: list = []

    def chunks(self, step: str, codes=None) -> Iterator[Chunk]:
        """A pass over the chunks for ``step``; the first pass of a step compiles it (see ``collect``)."""
        first = step not in self._compiled
        self._compiled.add(step)
        return stream_chunks(self.plan, self.placement, self.steps, codes, collect=first)

    def sample_rows(self, indices) -> np.ndarray:
        """Rows ``indices`` of the global ``X`` as float32, on every process (a collective)."""
        return sample_plan_rows(self.plan, self.offset, indices)

    # -- codes buffers

    def _buffer(self, name: str):
        if self.work_dir is None:
            return MemoryCodes(self.n_local, self.k)
        return DiskCodes(self.work_dir / f"{name}{process_suffix()}.npy", self.n_local, self.k)

    def _read_codes(self, buffer, copy_to=None):
        """Reader of a chunk's codes from ``buffer`` (padded with zero rows), copying them to ``copy_to``."""

        def read(start: int, stop: int) -> np.ndarray:
            out = self._codes_buffers.take()
            buffer.read_into(start, stop, out)
            out[stop - start:] = 0
            if copy_to is not None:
                copy_to.write(start, out[: stop - start])
            return out

        return read

    def _read_pair(self, buffer, previous, copy_to=None):
        """Reader of a chunk's latest and previous codes side by side (chunk_rows × 2k, zero-padded)."""
        latest = self._read_codes(buffer, copy_to)

        def read(start: int, stop: int) -> np.ndarray:
            out = self._pair_buffers.take()
            scratch = latest(start, stop)  # a pooled buffer JAX never sees: reused for the previous codes
            out[:, : self.k] = scratch
            previous.read_into(start, stop, scratch)
            scratch[stop - start:] = 0
            out[:, self.k:] = scratch
            return out

        return read

    # -- initialization

    def _initial_codes_function(self) -> Callable[[Chunk], jax.Array] | None:
        """A function of a chunk giving its initial codes on the device (None: read from ``init`` arrays)."""
        if not isinstance(self.init, str):
            return None
        return INITIALIZERS[self.init](jax.random.key(self.seed), self, self.k).codes

    # -- the Rows an initializer passes over (jsnmf.fit.starts.Rows)

    def replicate(self, value) -> jax.Array:
        return self.placement.replicate(value)

    def random_codes(self, key_G, c: Chunk, k: int) -> jax.Array:
        # Drawn by global token index: the same codes whatever the chunks and processes.
        G = steps.random_chunk(key_G, jnp.int32(self.offset + c.start), jnp.int32(c.stop - c.start),
                               chunk_rows=self.plan.chunk_rows, k=k)
        return G if self.placement.layout is None else self.placement.put(np.asarray(G))

    def status(self, text: str) -> None:
        self._status(text)

    def _initial_arrays(self):
        from jsnmf.fit.starts import check_initial_pair

        F0, G0 = check_initial_pair(self.init, self.d, self.k, self.n_local, own_rows=jax.process_count() > 1)

        def read(start: int, stop: int) -> np.ndarray:
            out = self._codes_buffers.take()
            out[: stop - start] = np.asarray(G0[start:stop], np.float32)
            out[stop - start:] = 0
            if not np.isfinite(out).all() or (out < 0).any():
                raise ValueError(f"init G0 must be finite and non-negative (the codes of SNMF are >= 0); "
                                 f"rows [{start}, {stop}) are not")
            return out

        return read

    def initialize(self, current) -> tuple[Statistics, float]:
        """Draw ``G0`` chunk by chunk into ``current``; return its statistics and ``‖X‖²`` (one pass)."""
        from jsnmf.distributed import replicated_value

        make_codes = self._initial_codes_function()
        self._status("init codes")
        acc = (self._zero_statistics(), self.placement.replicate(np.float32(0.0)))
        finite = []
        reader = self._initial_arrays() if make_codes is None else None
        for c in self.chunks("initialize", reader):
            G = c.G if make_codes is None else make_codes(c)
            acc, ok = steps.initial_statistics(c.X, G, acc, dtype=self.dtype)
            finite.append(ok)
            jax.block_until_ready((acc, ok))  # done with this chunk of X: bounds the chunks in flight
            _write_back(current, c.start, c.stop, self.placement.local(G))
        if not all(bool(replicated_value(ok)) for ok in finite):
            raise ValueError(_first_non_finite(self.plan))
        stats, sq_norm_X = acc
        sq_norm_X = float(replicated_value(sq_norm_X))
        if sq_norm_X == 0.0:
            raise ValueError("X is all zeros: there is nothing to factorize")
        return stats, sq_norm_X

    def _zero_statistics(self) -> Statistics:
        d, k = self.d, self.k
        return Statistics(*(self.placement.replicate(np.zeros(shape, np.float32)) for shape in ((d, k), (k, k), ())))

    # -- the fit

    # -- the backend interface of jsnmf.fit.loop

    def _open_buffers(self):
        self._buffers = [self._buffer("codes_current"), self._buffer("codes_next"), self._buffer("codes_best")]
        if self.extrapolation is not None:
            self._previous = self._buffer("codes_previous")
        return self._buffers

    def _all_buffers(self) -> list:
        return self._buffers + ([self._previous] if self._previous is not None else [])

    def start(self, status) -> StreamState:
        """The initializer's pass: ``G0`` chunk by chunk, its statistics and ``‖X‖²``."""
        self._status = status
        current, _, _ = self._open_buffers()
        stats, sq_norm_X = self.initialize(current)
        self.sq_norms = np.float64(sq_norm_X)
        momentum = None
        if self.extrapolation is not None:  # G_prev = G0, step 0: the first pass starts from G0
            fill(self._previous, current.full())
            momentum = initial_momentum(None, stats, self.extrapolation)
        return StreamState(stats=stats, sq_norm_X=sq_norm_X, best_F=np.zeros((self.d, self.k), np.float32),
                           momentum=momentum)

    def restore(self, restored) -> StreamState:
        current, _, best = self._open_buffers()
        own = slice(self.offset, self.offset + self.n_local)  # restored codes are global
        fill(current, restored.G[own])
        if restored.best_G is not None:
            fill(best, restored.best_G[own])
        momentum = None
        if restored.momentum is not None:
            fill(self._previous, restored.momentum["G"][own])
            place = lambda value: self.placement.replicate(np.asarray(value, np.float32))  # noqa: E731
            momentum = Momentum(**{name: None if name == "G" else place(value)
                                   for name, value in restored.momentum.items()})
        self.sq_norms = np.float64(restored.sq_norm_X)
        history = np.asarray(restored.loss_history, np.float32)
        return StreamState(momentum=momentum,
            stats=Statistics(*(self.placement.replicate(a) for a in (restored.XtG, restored.GtG, restored.PG))),
            sq_norm_X=restored.sq_norm_X, best_F=restored.best_F, best_is_current=restored.best_G is None,
            best_loss=np.float32(restored.best_loss), reference_loss=np.float32(restored.reference_loss),
            since_improvement=restored.since_improvement, iteration=restored.iteration,
            done=len(history) > 0 and restored.is_done(patience=int(self.limits.patience),
                                                       max_iter=int(self.limits.max_iter)))

    def iteration(self, state: StreamState) -> int:
        return state.iteration

    def done(self, state: StreamState) -> bool:
        return state.done

    def run(self, state: StreamState, stop_at: int):
        """One iteration: ``F`` from the last statistics, then a pass over the chunks updating ``G``."""
        from jsnmf.distributed import replicated_value

        current, following, best = self._buffers
        started = time.perf_counter()
        sq_device = self.placement.replicate(np.float32(state.sq_norm_X))
        momentum = state.momentum
        copy_to = best if state.best_is_current else None
        if momentum is None:
            F, scale, Q = steps.features(state.stats.XtG, state.stats.GtG, config=self.config)
            acc, reader = self._zero_statistics(), self._read_codes(current, copy_to)
        else:
            F, scale, Q, inv_prev_scale = steps.momentum_features(state.stats, momentum, config=self.config)
            acc = (self._zero_statistics(), self.placement.replicate(np.zeros((self.k, self.k), np.float32)))
            reader = self._read_pair(current, self._previous, copy_to)
        written = None  # the previous chunk's new codes, written while this chunk computes
        for c in self.chunks("iterate" if momentum is None else "iterate extrapolated", reader):
            if momentum is None:
                G, acc = steps.codes_chunk(c.X, c.G, F, Q, scale, acc, config=self.config, dtype=self.dtype)
            else:
                G, acc = steps.momentum_codes_chunk(c.X, c.G, F, Q, scale, inv_prev_scale, momentum.step, acc,
                                                    config=self.config, dtype=self.dtype)
            if written is not None:
                _write_back(following, *written)
            jax.block_until_ready(acc)  # done with this chunk of X (see stream_chunks)
            written = (c.start, c.stop, self.placement.local(G))
        _write_back(following, *written)
        if momentum is not None:
            acc, cross = acc
        loss_device = steps.loss(sq_device, acc, Q)
        loss = np.float32(replicated_value(loss_device))
        self.tokens_per_second = self.n / (time.perf_counter() - started)
        better, best_loss, reference_loss, since, iteration, done = _stopping(
            state.best_loss, state.reference_loss, np.int32(state.since_improvement), np.int32(state.iteration),
            loss, tol=np.float32(self.limits.tol), sq_norm_X=np.float32(state.sq_norm_X),
            patience=np.int32(self.limits.patience), max_iter=np.int32(self.limits.max_iter))
        better = bool(better)
        if better:
            state.best_F = replicated_value(F)
        # The best codes were copied during this pass if they were the previous iterate.
        state.best_is_current = better
        state.best_loss, state.reference_loss = np.float32(best_loss), np.float32(reference_loss)
        state.since_improvement, state.iteration, state.done = int(since), int(iteration), bool(done)
        if momentum is None:
            self._buffers = [following, current, best]
        else:  # the latest codes become the previous ones; the old previous buffer is written next
            state.momentum = steps.momentum_after(momentum, state.stats, cross, scale, loss_device, config=self.config)
            self._buffers, self._previous = [following, self._previous, best], current
        state.stats = acc
        return state, np.array([loss], np.float32)

    def checkpoint(self, state: StreamState, losses):
        """The checkpoint content. Under several processes the codes become a global array on the mesh
        (each process saves its own rows; the codes are n×k, small beside ``X``)."""
        from jsnmf.checkpoint import FitProgress, row_blocks
        from jsnmf.distributed import RowLayout, replicated_value

        current, _, best = self._buffers
        G, best_G, blocks = current.full(), None if state.best_is_current else best.full(), None
        previous = None if state.momentum is None else self._previous.full()
        if jax.process_count() > 1:
            layout = RowLayout.build(self.placement.mesh, self.row_counts)
            G = layout.assemble(np.asarray(G))
            best_G = None if best_G is None else layout.assemble(np.asarray(best_G))
            previous = None if previous is None else layout.assemble(np.asarray(previous))
            blocks = row_blocks(layout)
        stats = state.stats
        momentum = None
        if state.momentum is not None:
            momentum = {name: previous if name == "G" else replicated_value(value)
                        for name, value in state.momentum._asdict().items()}
        return FitProgress(
            G=G, best_G=best_G, XtG=replicated_value(stats.XtG), GtG=replicated_value(stats.GtG),
            PG=replicated_value(stats.PG), best_F=np.asarray(state.best_F), best_loss=float(state.best_loss),
            reference_loss=float(state.reference_loss), since_improvement=state.since_improvement,
            iteration=state.iteration, sq_norm_X=state.sq_norm_X, loss_history=np.asarray(losses, np.float32),
            row_blocks=blocks, momentum=momentum)

    def results(self, state: StreamState, history: np.ndarray, seconds: float) -> list[FitResult]:
        return [FitResult(features=np.asarray(state.best_F), codes=self.best_codes(state),
                          loss_history=np.asarray(history, np.float32), n_iter=state.iteration,
                          best_loss=float(state.best_loss), sq_norm_X=float(state.sq_norm_X), n_features_in=self.d,
                          seconds=seconds, tokens_per_second=self.tokens_per_second)]

    def best_codes(self, state: StreamState) -> np.ndarray:
        """The best codes: in memory an array, on disk ``codes.npy`` in the work directory (memory-mapped)."""
        current, following, best = self._buffers
        winner = current if state.best_is_current else best
        if self.work_dir is None:
            return winner.result()
        self.close()
        final = self.work_dir / f"codes{process_suffix()}.npy"
        os.replace(winner.path, final)
        for buffer in self._all_buffers():
            if buffer is not winner and buffer.path.exists():
                buffer.path.unlink()
        return np.load(final, mmap_mode="r")

    def close(self) -> None:
        for buffer in self._all_buffers():
            buffer.close()


_stopping = jax.jit(stopping_update)


@dataclass
class StreamState:
    """The streamed fit's state between passes (the codes themselves are in the backend's buffers)."""

    stats: Statistics  # of the latest codes
    sq_norm_X: float
    best_F: np.ndarray
    best_is_current: bool = False  # the best codes are the latest ones (copied during the next pass)
    best_loss: np.float32 = np.float32(np.inf)
    reference_loss: np.float32 = np.float32(np.inf)
    since_improvement: int = 0
    iteration: int = 0
    done: bool = False
    momentum: Momentum | None = None  # an extrapolated solver's, its G in the previous codes' buffer


def _write_back(buffer, start: int, stop: int, G: np.ndarray) -> None:
    buffer.write(start, G[: stop - start])

