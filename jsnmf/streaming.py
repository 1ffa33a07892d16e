"""Out-of-core SNMF: one pass over the chunks of ``X`` per iteration (DESIGN.md, "Streaming is exact").

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

Initializations: ``"random"`` draws exactly the in-memory ``G0`` chunk by chunk (each value from its
own Threefry counter, :func:`~jsnmf.kernels.init.random_codes`); ``"kmeans"`` is the in-memory algorithm with
each Lloyd iteration a pass over the chunks; ``"svd"`` is a streamed randomized subspace iteration
on ``XᵀX`` with a Rayleigh–Ritz step (the same rank-k subspace as the in-memory range finder up to
its approximation, not the same numbers); ``(F0, G0)`` reads ``G0`` (array or memmap) by chunks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jsnmf.io.codes import DiskCodes, MemoryCodes, codes_directory, fill, process_suffix
from jsnmf.io.hostbuffers import BufferPool
from jsnmf.io.prefetch import Chunk, Placement, stream_chunks
from jsnmf.io.sources import StreamPlan, make_plan
from jsnmf.kernels.fit import SolverConfig
from jsnmf.kernels.init import CODES_FLOOR, random_codes, random_keys
from jsnmf.kernels.steps import (
    Statistics,
    chunk_statistics,
    codes_step,
    features_step,
    loss_from_statistics,
    matmul_f32,
)

__all__ = ["StreamedFit", "StreamPlan", "make_plan", "codes_directory"]

SVD_OVERSAMPLE, SVD_POWER_ITERS = 10, 2
KMEANS_ITERS, KMEANS_OFFSET = 20, 0.2


# -- compiled per-chunk steps ---------------------------------------------------------------------

def _valid_rows(chunk_rows: int, valid: jax.Array) -> jax.Array:
    return (jnp.arange(chunk_rows) < valid)[:, None]


@partial(jax.jit, static_argnames=("chunk_rows", "k"))
def _random_chunk(key_G, start, valid, *, chunk_rows, k):
    return random_codes(key_G, start, chunk_rows, k) * _valid_rows(chunk_rows, valid)


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def _initial_statistics(X_raw, G, acc, *, dtype):
    """Statistics of the initial codes, ``‖X‖²`` and whether the chunk is finite."""
    stats, sq_norm = acc
    finite = jnp.all(jnp.isfinite(X_raw))
    X = X_raw.astype(dtype)
    chunk = chunk_statistics(X, G)
    return (stats + chunk, sq_norm + jnp.sum(jnp.square(X.astype(jnp.float32)))), finite


@partial(jax.jit, static_argnames=("config",))
def _features(XtG, GtG, *, config: SolverConfig):
    F, scale = features_step(XtG, GtG, ridge=config.ridge, n_keep=config.n_keep)
    return F, scale, F.T @ F


@partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("acc",))
def _codes_chunk(X_raw, G, F, Q, scale, acc, *, config: SolverConfig, dtype):
    """One chunk of the codes pass: new codes for its rows, and its statistics added to ``acc``."""
    G, stats = codes_step(X_raw.astype(dtype), G, F, Q, scale, config.codes_update())
    return G, acc + stats


@jax.jit
def _loss(sq_norm_X, stats, Q):
    return loss_from_statistics(sq_norm_X, stats, Q)


# k-means (Ding et al.'s start), streamed: each Lloyd iteration is a pass.
@partial(jax.jit, static_argnames=("dtype",))
def _kmeans_assign(X_raw, centroids, valid, *, dtype):
    X = X_raw.astype(dtype)
    sq_rows = jnp.sum(jnp.square(X.astype(jnp.float32)), axis=1)
    distance = sq_rows[:, None] - 2.0 * matmul_f32(X, centroids.T) + jnp.sum(centroids * centroids, axis=1)[None, :]
    onehot = jax.nn.one_hot(jnp.argmin(distance, axis=1), centroids.shape[0], dtype=jnp.float32)
    return X, onehot * valid[:, None]


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def _kmeans_accumulate(X_raw, centroids, valid, acc, *, dtype):
    X, onehot = _kmeans_assign(X_raw, centroids, valid, dtype=dtype)
    sums, counts = acc
    return sums + matmul_f32(X.T, onehot).T, counts + jnp.sum(onehot, axis=0)


@partial(jax.jit, static_argnames=("dtype",))
def _kmeans_codes(X_raw, centroids, valid, *, dtype):
    _, onehot = _kmeans_assign(X_raw, centroids, valid, dtype=dtype)
    return (onehot + KMEANS_OFFSET) * valid[:, None]


# SVD start, streamed: subspace iteration on XᵀX, Rayleigh–Ritz, then Ding et al.'s sign rule.
@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def _gram_times(X_raw, V, acc, *, dtype):
    X = X_raw.astype(dtype)
    XV = matmul_f32(X, V)
    return acc + matmul_f32(X.T, XV)


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def _projected_gram(X_raw, V, acc, *, dtype):
    XV = matmul_f32(X_raw.astype(dtype), V)
    return acc + XV.T @ XV


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def _sign_masses(X_raw, V, acc, *, dtype):
    US = matmul_f32(X_raw.astype(dtype), V)
    pos, neg = jnp.maximum(US, 0.0), jnp.maximum(-US, 0.0)
    return acc + jnp.stack([jnp.sum(pos * pos, 0), jnp.sum(neg * neg, 0), jnp.sum(pos, 0), jnp.sum(neg, 0)])


@partial(jax.jit, static_argnames=("dtype",))
def _svd_codes(X_raw, V, floor, valid, *, dtype):
    US = matmul_f32(X_raw.astype(dtype), V)
    return (jnp.maximum(US, 0.0) + floor) * valid[:, None]


# -- where the chunks go --------------------------------------------------------------------------


@dataclass
class Book:
    """The stopping rule and best-iterate book-keeping of ``kernels.fit.advance``, on the host (float32)."""

    best_loss: np.float32 = np.float32(np.inf)
    reference_loss: np.float32 = np.float32(np.inf)
    since_improvement: int = 0
    iteration: int = 0

    def advance(self, loss: np.float32, *, tol: np.float32, sq_norm_X: np.float32) -> bool:
        """Record an iteration's loss; True when it is the best so far."""
        better = bool(loss < self.best_loss)
        improved = bool(loss < np.float32(self.reference_loss - np.float32(tol * sq_norm_X)))
        self.since_improvement = 0 if improved else self.since_improvement + 1
        self.iteration += 1
        if better:
            self.best_loss = loss
        if improved:
            self.reference_loss = loss
        return better

    def done(self, loss: np.float32, *, patience: int, max_iter: int) -> bool:
        return self.since_improvement >= patience or self.iteration >= max_iter or not np.isfinite(loss)


@dataclass
class FitResult:
    """What a fit produces (the estimator copies it into its attributes)."""

    features: np.ndarray
    codes: np.ndarray  # this process's rows
    loss_history: np.ndarray
    n_iter: int
    best_loss: float
    sq_norm_X: float


def _first_non_finite(plan: StreamPlan) -> str:
    where = plan.describe().get("path")
    layer = f" layer {plan.layer}" if plan.layer is not None else ""
    of = f" of {where}{layer}" if where is not None else layer
    for index, (start, stop) in enumerate(plan.bounds):
        rows = plan.load(index)[: stop - start].astype(np.float32)
        bad = np.argwhere(~np.isfinite(rows))
        if len(bad):
            row, col = bad[0]
            return f"X contains NaN or Inf (first at row {start + row}, column {col}{of}, chunk [{start}, {stop}))"
    return f"X contains NaN or Inf in the rows of another process (process {jax.process_index()}'s rows{of} are finite)"


class StreamedFit:
    """The streamed fit of one estimator on one plan (see the module docstring).

    ``mesh``: split each step's chunk over the mesh's devices (:class:`Placement`); under several
    processes each streams its own plan and keeps its own codes, and the sizes below are global.
    """

    def __init__(self, model, plan: StreamPlan, compute_dtype, *, mesh=None, work_dir: Path | None = None):
        from jsnmf.distributed import per_process

        self.model, self.plan = model, plan
        self.d, self.k = plan.d, int(model.rank)
        self.placement = Placement(mesh, plan)
        self.row_counts = per_process(plan.rows)  # every process's tokens
        self.n_local, self.offset = plan.rows, int(self.row_counts[: jax.process_index()].sum())
        self.n = int(self.row_counts.sum())
        self.steps = int(per_process(len(plan.bounds)).max())  # passes take as many steps as the longest share
        self.dtype = compute_dtype
        self.config: SolverConfig = model._solver_config(self.d)
        self.checkpointer = None
        self.work_dir = work_dir
        self.tokens_per_second = float("nan")
        self._codes_buffers = BufferPool((plan.chunk_rows, self.k), np.float32)
        self._compiled: set[str] = set()

    def chunks(self, step: str, codes=None) -> Iterator[Chunk]:
        """A pass over the chunks for ``step``; the first pass of a step compiles it (see ``collect``)."""
        first = step not in self._compiled
        self._compiled.add(step)
        return stream_chunks(self.plan, self.placement, self.steps, codes, collect=first)

    def sample_rows(self, indices) -> np.ndarray:
        """Rows ``indices`` of the global ``X`` as float32, on every process (a collective)."""
        from jsnmf.distributed import sum_over_processes

        out = np.zeros((len(indices), self.d), np.float32)
        for i, row in enumerate(np.asarray(indices).tolist()):
            local = row - self.offset
            if 0 <= local < self.n_local:
                out[i] = self.plan.read_rows(self.plan.offset + local, self.plan.offset + local + 1)[0]
        return sum_over_processes(out)  # each row is held by one process, zeros elsewhere

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

    # -- initialization

    def _initial_codes_function(self, bar) -> Callable[[Chunk], jax.Array] | None:
        """A function of a chunk giving its initial codes on the device (None: read from ``init`` arrays)."""
        init, k, dtype = self.model.init, self.k, self.dtype
        key = jax.random.key(self.model.seed)
        if not isinstance(init, str):
            return None
        if init == "random":
            _, key_G = random_keys(key)
            rows, placement = self.plan.chunk_rows, self.placement

            def random_chunk(c: Chunk) -> jax.Array:
                # Drawn by global token index: the same codes whatever the chunks and processes.
                G = _random_chunk(key_G, jnp.int32(self.offset + c.start), jnp.int32(c.stop - c.start),
                                  chunk_rows=rows, k=k)
                return G if placement.layout is None else placement.put(np.asarray(G))

            return random_chunk
        if init == "kmeans":
            centroids = self._kmeans_centroids(key, bar)
            return lambda c: _kmeans_codes(c.X, centroids, c.valid, dtype=dtype)
        if init == "svd":
            V, floor = self._svd_directions(key, bar)
            return lambda c: _svd_codes(c.X, V, floor, c.valid, dtype=dtype)
        raise ValueError(f"unknown init {init!r} for a streamed fit; expected random, svd, kmeans or (F0, G0)")

    def _kmeans_centroids(self, key, bar) -> jax.Array:
        rows = np.asarray(jax.random.choice(key, self.n, (self.k,), replace=False))
        seeds = self.sample_rows(rows)
        centroids = self.placement.replicate(np.asarray(jnp.asarray(seeds, self.dtype).astype(jnp.float32)))
        for it in range(KMEANS_ITERS):
            _stage(bar, f"init k-means {it + 1}/{KMEANS_ITERS}")
            acc = self.placement.replicate(np.zeros((self.k, self.d), np.float32)), \
                self.placement.replicate(np.zeros((self.k,), np.float32))
            for c in self.chunks("kmeans"):
                acc = jax.block_until_ready(_kmeans_accumulate(c.X, centroids, c.valid, acc, dtype=self.dtype))
            sums, counts = acc
            centroids = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)
        return centroids

    def _svd_directions(self, key, bar) -> tuple[jax.Array, jax.Array]:
        width = min(self.k + SVD_OVERSAMPLE, self.n, self.d)
        V = self.placement.replicate(np.asarray(jax.random.normal(key, (self.d, width), jnp.float32)))
        for it in range(SVD_POWER_ITERS + 1):
            _stage(bar, f"init svd {it + 1}/{SVD_POWER_ITERS + 3}")
            Z = self.placement.replicate(np.zeros((self.d, width), np.float32))
            for c in self.chunks("svd power"):
                Z = jax.block_until_ready(_gram_times(c.X, V, Z, dtype=self.dtype))
            V, _ = jnp.linalg.qr(Z)
        _stage(bar, f"init svd {SVD_POWER_ITERS + 2}/{SVD_POWER_ITERS + 3}")
        H = self.placement.replicate(np.zeros((width, width), np.float32))
        for c in self.chunks("svd ritz"):
            H = jax.block_until_ready(_projected_gram(c.X, V, H, dtype=self.dtype))
        _, W = jnp.linalg.eigh(H)  # ascending; the top k Ritz vectors are the last columns
        V = V @ W[:, ::-1][:, : self.k]
        _stage(bar, f"init svd {SVD_POWER_ITERS + 3}/{SVD_POWER_ITERS + 3}")
        masses = self.placement.replicate(np.zeros((4, self.k), np.float32))
        for c in self.chunks("svd signs"):
            masses = jax.block_until_ready(_sign_masses(c.X, V, masses, dtype=self.dtype))
        pos_sq, neg_sq, pos_sum, neg_sum = masses
        sign = jnp.where(pos_sq >= neg_sq, 1.0, -1.0)
        mean_G = jnp.sum(jnp.where(sign > 0, pos_sum, neg_sum)) / (self.n * self.k)
        floor = jnp.maximum(1e-3 * mean_G, CODES_FLOOR)
        return V * sign[None, :], floor

    def _initial_arrays(self):
        F0, G0 = self.model.init
        if tuple(np.shape(F0)) != (self.d, self.k):
            raise ValueError(f"init F0 must have shape (d_mlp, rank) = {(self.d, self.k)}; got {np.shape(F0)}")
        if tuple(np.shape(G0)) != (self.n_local, self.k):
            mine = " (this process's rows)" if jax.process_count() > 1 else ""
            raise ValueError(f"init G0 must have shape (n_tokens, rank) = {(self.n_local, self.k)}{mine}; "
                             f"got {np.shape(G0)}")

        def read(start: int, stop: int) -> np.ndarray:
            out = self._codes_buffers.take()
            out[: stop - start] = np.asarray(G0[start:stop], np.float32)
            out[stop - start:] = 0
            if not np.isfinite(out).all() or (out < 0).any():
                raise ValueError(f"init G0 must be finite and non-negative (the codes of SNMF are >= 0); "
                                 f"rows [{start}, {stop}) are not")
            return out

        return read

    def initialize(self, current, bar) -> tuple[Statistics, float]:
        """Draw ``G0`` chunk by chunk into ``current``; return its statistics and ``‖X‖²`` (one pass)."""
        from jsnmf.distributed import replicated_value

        make_codes = self._initial_codes_function(bar)
        _stage(bar, "init codes")
        acc = (self._zero_statistics(), self.placement.replicate(np.float32(0.0)))
        finite = []
        reader = self._initial_arrays() if make_codes is None else None
        for c in self.chunks("initialize", reader):
            G = c.G if make_codes is None else make_codes(c)
            acc, ok = _initial_statistics(c.X, G, acc, dtype=self.dtype)
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

    def run(self, bar) -> FitResult:
        from jsnmf.distributed import replicated_value

        model, k = self.model, self.k
        tol, patience, max_iter = np.float32(model.tol), int(model.patience), int(model.max_iter)
        current, following, best = self._buffer("codes_current"), self._buffer("codes_next"), self._buffer("codes_best")
        try:
            restored = self.checkpointer.restore_latest() if self.checkpointer is not None else None
            book = Book()
            if restored is None:
                stats, sq_norm_X = self.initialize(current, bar)
                history: list[float] = []
                best_F = np.zeros((self.d, k), np.float32)
                best_is_current = False
            else:
                _stage(bar, "restoring")
                own = slice(self.offset, self.offset + self.n_local)  # restored codes are global
                fill(current, restored.G[own])
                if restored.best_G is not None:
                    fill(best, restored.best_G[own])
                best_is_current = restored.best_G is None
                stats = Statistics(*(self.placement.replicate(a) for a in (restored.XtG, restored.GtG, restored.PG)))
                sq_norm_X = restored.sq_norm_X
                history = [np.float32(x) for x in restored.loss_history]
                best_F = restored.best_F
                book = Book(np.float32(restored.best_loss), np.float32(restored.reference_loss),
                            restored.since_improvement, restored.iteration)
                if bar is not None:
                    bar.update(restored.iteration)
            sq32 = np.float32(sq_norm_X)
            sq_device = self.placement.replicate(np.float32(sq_norm_X))
            last_loss = history[-1] if history else np.float32(np.inf)
            done = bool(history) and book.done(last_loss, patience=patience, max_iter=max_iter)
            while not done:
                started = time.perf_counter()
                F, scale, Q = _features(stats.XtG, stats.GtG, config=self.config)
                acc = self._zero_statistics()
                reader = self._read_codes(current, copy_to=best if best_is_current else None)
                written = None  # the previous chunk's new codes, written while this chunk computes
                for c in self.chunks("iterate", reader):
                    G, acc = _codes_chunk(c.X, c.G, F, Q, scale, acc, config=self.config, dtype=self.dtype)
                    if written is not None:
                        _write_back(following, *written)
                    jax.block_until_ready(acc)  # done with this chunk of X (see stream_chunks)
                    written = (c.start, c.stop, self.placement.local(G))
                _write_back(following, *written)
                loss = np.float32(replicated_value(_loss(sq_device, acc, Q)))
                self.tokens_per_second = self.n / (time.perf_counter() - started)
                history.append(loss)
                better = book.advance(loss, tol=tol, sq_norm_X=sq32)
                if better:
                    best_F = replicated_value(F)
                # The best codes were copied during this pass if they were the previous iterate.
                best_is_current = better
                current, following, stats = following, current, acc
                done = book.done(loss, patience=patience, max_iter=max_iter)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(rel_err=f"{math.sqrt(max(float(loss), 0.0) / sq_norm_X):.4f}",
                                    tok_s=f"{self.tokens_per_second:.3g}")
                if self.checkpointer is not None and (done or self.checkpointer.due(book.iteration)):
                    self.checkpointer.save(self._progress(current, best, best_is_current, stats, best_F, book,
                                                          sq_norm_X, history))
            codes = self._finish(current, following, best, best_is_current)
        finally:
            for buffer in (current, following, best):
                buffer.close()
        return FitResult(features=np.asarray(best_F), codes=codes, loss_history=np.asarray(history, np.float32),
                         n_iter=book.iteration, best_loss=float(book.best_loss), sq_norm_X=sq_norm_X)

    def _progress(self, current, best, best_is_current, stats, best_F, book, sq_norm_X, history):
        """The checkpoint content. Under several processes the codes become a global array on the mesh
        (each process saves its own rows; the codes are n×k, small beside ``X``)."""
        from jsnmf.checkpoint import FitProgress, row_blocks
        from jsnmf.distributed import RowLayout, replicated_value

        G, best_G, blocks = current.full(), None if best_is_current else best.full(), None
        if jax.process_count() > 1:
            layout = RowLayout.build(self.placement.mesh, self.row_counts)
            G = layout.assemble(np.asarray(G))
            best_G = None if best_G is None else layout.assemble(np.asarray(best_G))
            blocks = row_blocks(layout)
        return FitProgress(
            G=G, best_G=best_G, XtG=replicated_value(stats.XtG), GtG=replicated_value(stats.GtG),
            PG=replicated_value(stats.PG), best_F=np.asarray(best_F), best_loss=float(book.best_loss),
            reference_loss=float(book.reference_loss), since_improvement=book.since_improvement,
            iteration=book.iteration, sq_norm_X=sq_norm_X, loss_history=np.asarray(history, np.float32),
            row_blocks=blocks)

    def _finish(self, current, following, best, best_is_current) -> np.ndarray:
        """The best codes: in memory an array, on disk ``codes.npy`` in the work directory (memory-mapped)."""
        winner = current if best_is_current else best
        if self.work_dir is None:
            return winner.result()
        for buffer in (current, following, best):
            buffer.close()
        final = self.work_dir / f"codes{process_suffix()}.npy"
        os.replace(winner.path, final)
        for buffer in (current, following, best):
            if buffer is not winner and buffer.path.exists():
                buffer.path.unlink()
        return np.load(final, mmap_mode="r")


def _write_back(buffer, start: int, stop: int, G: np.ndarray) -> None:
    buffer.write(start, G[: stop - start])


def _stage(bar, text: str | None) -> None:
    if bar is not None and text is not None:
        bar.set_postfix_str(text)
