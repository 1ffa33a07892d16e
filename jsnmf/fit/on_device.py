"""``X`` held on the device: a streamed source read into device memory once, then fitted in memory.

A store layer, a ``np.memmap`` or a chunk source is streamed from the host every iteration
(:mod:`jsnmf.fit.stream`): on an accelerator that copy bounds the iteration (0.9–1.5 s at
n = 262k–524k tokens, d = 3072), while the iteration itself takes tens of milliseconds once ``X`` is
in device memory. :func:`jsnmf.fit.backends.make_backend` asks :func:`choose` whether ``X`` in the
compute dtype and the fit's working set fit the devices' free memory (:func:`held_bytes`, with a
margin of :data:`MARGIN`); if so, :class:`HeldFit` reads ``X`` chunk by chunk straight into
preallocated device buffers (no second full copy on the host nor on the device) and runs the
in-memory :class:`~jsnmf.fit.arrays.ArrayBackend` on them, whose iterates are the streamed fit's up
to the order of float sums.

- One device: the rows go into one ``(n, d)`` buffer on the default device.
- A mesh of several devices, in one or several processes: the rows are laid out as
  :func:`jsnmf.distributed.global_rows` lays them (each process's rows in process order, each
  process's block zero-padded to whole device shares) and every device's share is filled from this
  process's chunks (under several processes, its share of a store, :func:`process_token_range`), then
  put together with ``jax.make_array_from_single_device_arrays``: the row-sharded array path of an
  in-memory fit, with no host copy of the share. The processes agree on holding or streaming (one
  collective), so none waits on another that chose differently.

CPU devices report no memory statistics (``memory_stats()`` is None), so an automatic choice on the
CPU streams, as before; ``on_device=True`` holds ``X`` there too (in host memory, as a fit of an
array does).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsnmf.io.sources import ArraySource, StreamPlan

__all__ = ["MARGIN", "free_device_memory", "held_bytes", "Choice", "choose", "load_rows", "HeldFit"]

# Fraction of a device's free memory left unused when deciding to hold X there: room for XLA's scratch
# (matrix-multiply workspaces, fusion temporaries), allocator fragmentation and what the estimate misses.
MARGIN = 0.15
# Arrays of the codes' shape (rows × k, float32) the compiled iteration keeps on a device: the state's G and
# best G, the new G, P = X F and two temporaries of the codes update; an extrapolated solver ("ehals") also
# keeps the previous G and the extrapolated start.
CODES_COPIES = 6
EXTRAPOLATED_CODES_COPIES = 2


def free_device_memory(devices) -> int | None:
    """The smallest free memory (``bytes_limit − bytes_in_use``) over ``devices``, or None when any of them
    does not report it (CPU devices: ``memory_stats()`` is None). Tests replace this function."""
    free = []
    for device in devices:
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(free) if free else None


def held_bytes(rows: int, d: int, k: int, *, dtype, raw_dtype, chunk_rows: int, extrapolated: bool) -> int:
    """Device bytes a fit needs with ``rows`` rows of ``X`` (``d`` wide) held on one device, rank ``k``:

    ``X`` in the compute ``dtype`` + the codes' working set (:data:`CODES_COPIES` float32 arrays of
    ``rows × k``, :data:`EXTRAPOLATED_CODES_COPIES` more when ``extrapolated``) + one chunk being loaded
    (``chunk_rows × d`` as read, in ``raw_dtype``, and cast to ``dtype``) + the ``d × k``/``k × k``
    factors and statistics and the SVD start's ``d × d`` Gram matrix (float32).
    """
    x_bytes = rows * d * np.dtype(dtype).itemsize
    codes_bytes = rows * k * 4 * (CODES_COPIES + (EXTRAPOLATED_CODES_COPIES if extrapolated else 0))
    staging_bytes = chunk_rows * d * (np.dtype(raw_dtype).itemsize + np.dtype(dtype).itemsize)
    small_bytes = (8 * d * k + 4 * k * k + d * d) * 4
    return x_bytes + codes_bytes + staging_bytes + small_bytes


def size(n_bytes: float) -> str:
    """``n_bytes`` for a message: ``"1.50 GiB"``, ``"12.0 MiB"``, ``"640 KiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n_bytes / 2**10:.0f} KiB"


@dataclass(frozen=True)
class Choice:
    """Whether to hold ``X`` on the device(s), and the layout it would have there."""

    hold: bool
    layout: object | None  # the RowLayout of a mesh (None: one device)
    rows: int  # rows each device holds (padding included)
    needed: int  # held_bytes per device
    free: int | None  # the least free memory of this process's devices (None: not reported)


def _default_device():
    return next(iter(jnp.zeros(()).devices()))


def choose(plan: StreamPlan, on_device: bool | None, *, k: int, dtype, extrapolated: bool, mesh=None,
           stream_asked: bool = False) -> Choice:
    """Hold or stream ``plan``'s rows: ``on_device`` True (hold; ValueError when the estimate says they
    cannot fit), False (stream) or None (hold when the devices report enough free memory, unless
    ``stream_asked`` or ``plan`` is an in-memory array the caller asked to stream with ``chunk_tokens``).
    A collective under several processes."""
    from jsnmf.distributed import RowLayout, per_process

    layout = None
    if mesh is not None:
        layout = RowLayout.build(mesh, per_process(plan.rows))
        rows = layout.shard_rows
        devices = list(layout.sharding().addressable_devices)
    else:
        rows, devices = plan.rows, [_default_device()]
    needed = held_bytes(rows, plan.d, k, dtype=dtype, raw_dtype=plan.raw_dtype, chunk_rows=plan.chunk_rows,
                        extrapolated=extrapolated)
    if on_device is False:
        return Choice(False, layout, rows, needed, None)
    free = free_device_memory(devices)
    fits = free is None or needed <= (1 - MARGIN) * free
    # 0: fits or unknown, 1: too little memory here; every process sees every verdict.
    short = per_process(0 if fits else 1) if jax.process_count() > 1 else np.array([0 if fits else 1])
    if on_device is True:
        if not fits:
            raise ValueError(
                f"on_device=True, but X needs about {size(needed)} per device ({rows:,} rows × {plan.d} in "
                f"{np.dtype(dtype).name} = {size(rows * plan.d * np.dtype(dtype).itemsize)}, plus the codes and a "
                f"chunk being loaded) and the device has {size(free)} free ({size((1 - MARGIN) * free)} usable "
                f"after a {MARGIN:.0%} margin): pass on_device=None or False to stream X")
        if short.any():
            others = [int(p) for p in np.nonzero(short)[0]]
            raise ValueError(f"on_device=True, but the devices of process(es) {others} cannot hold their share of X "
                             f"(see their error); process {jax.process_index()} stops too")
        return Choice(True, layout, rows, needed, free)
    chunked_array = isinstance(plan.source, ArraySource) and not isinstance(plan.source.X, np.memmap)
    asked_to_stream = stream_asked or chunked_array
    known = free is not None
    if jax.process_count() > 1:  # hold only when every process knows it fits
        known = not per_process(0 if known else 1).any()
    return Choice(known and not short.any() and not asked_to_stream, layout, rows, needed, free)


@partial(jax.jit, donate_argnums=0)
def _write(buffer, piece, start):
    """``buffer`` with rows ``[start, start + len(piece))`` replaced by ``piece`` cast to the buffer's dtype
    (in place: the buffer is donated). Compiled once per piece shape."""
    return lax.dynamic_update_slice(buffer, piece.astype(buffer.dtype), (start, jnp.int32(0)))


def _zeros(rows: int, d: int, dtype, device):
    return jnp.zeros((rows, d), dtype, device=device)


def load_rows(plan: StreamPlan, dtype, layout=None):
    """``plan``'s rows on the device(s) in ``dtype``: an ``(n, d)`` array on the default device, or (with a
    mesh's ``layout``) the :class:`~jsnmf.distributed.ShardedRows` of the global row-sharded array.

    Chunks are read in their stored precision (a background thread reads the next one, mapped or into
    pooled buffers, :meth:`StreamPlan.load`), put on the device(s) that hold their rows and cast there,
    into buffers allocated once: the device holds ``X`` and at most a chunk more.
    """
    from jsnmf.distributed import ShardedRows

    d = plan.d
    if layout is None:
        device = _default_device()
        targets = {device: (0, plan.rows)}
    else:
        block_start = layout.positions[jax.process_index()].start * layout.shard_rows
        shape = (layout.n_padded, d)
        targets = {device: (index[0].start - block_start, index[0].stop - block_start)
                   for device, index in layout.sharding().addressable_devices_indices_map(shape).items()}
    buffers = {device: _zeros(stop - start, d, dtype, device) for device, (start, stop) in targets.items()}
    count = len(plan.bounds)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jsnmf-load") as pool:
        future = pool.submit(plan.load, 0)
        try:
            for index in range(count):
                host = future.result()
                future = pool.submit(plan.load, index + 1) if index + 1 < count else None
                first, last = (bound - plan.offset for bound in plan.bounds[index])
                for device, (start, stop) in targets.items():
                    a, b = max(first, start), min(last, stop)  # the chunk's rows this device holds
                    if a < b:
                        piece = jax.device_put(host[a - first: b - first], device)
                        buffers[device] = _write(buffers[device], piece, jnp.int32(a - start))
                        del piece  # JAX keeps it until the write is done; the chunk's buffer is free after
                del host
        finally:
            if future is not None:
                future.cancel()
            plan.release_buffers()
    if layout is None:
        return buffers[device]
    array = jax.make_array_from_single_device_arrays((layout.n_padded, d), layout.sharding(),
                                                     [buffers[device] for device in targets])
    return ShardedRows(array, layout)


class HeldFit:
    """The backend of a fit whose ``X`` is held on the device: loads ``X`` (:func:`load_rows`) when the fit
    starts or resumes, then is the :class:`~jsnmf.fit.arrays.ArrayBackend` ``build(X)`` returns.

    Loading at the start rather than when the backend is made lets the progress bar say so, and lets a
    checkpoint of another problem be refused before ``X`` is read.
    """

    def __init__(self, plan: StreamPlan, choice: Choice, dtype, *, n_tokens: int, build: Callable):
        self.plan, self.choice, self.dtype, self.build = plan, choice, dtype, build
        self.n_tokens, self.d = n_tokens, plan.d
        self.backend = None

    def _load(self, status) -> None:
        from jsnmf.distributed import per_process

        if self.backend is not None:
            return
        held = size(self.choice.rows * self.d * np.dtype(self.dtype).itemsize)
        status(f"loading X onto the device ({held})")
        started = time.perf_counter()
        self.backend = self.build(load_rows(self.plan, self.dtype, self.choice.layout))
        if not np.isfinite(self.backend.sq_norms):
            from jsnmf.fit.stream import find_non_finite

            found = find_non_finite(self.plan)  # only now, on the error path: one more read of X
            bad = per_process(int(found is not None)) if jax.process_count() > 1 else [int(found is not None)]
            if found is not None:
                raise ValueError(found)
            if any(bad):
                raise ValueError(f"X contains NaN or Inf in the rows of process(es) "
                                 f"{[p for p, b in enumerate(bad) if b]}; process {jax.process_index()}'s are finite")
            # finite values whose squares overflow: the driver says so (check_finite_norms)
        elif float(self.backend.sq_norms) == 0.0:
            raise ValueError("X is all zeros: there is nothing to factorize")
        status(f"X on the device ({held}, loaded in {time.perf_counter() - started:.1f} s)")

    # -- the backend interface of jsnmf.fit.loop

    @property
    def sq_norms(self):
        return self.backend.sq_norms

    def start(self, status):
        self._load(status)
        return self.backend.start(status)

    def restore(self, progress):
        self._load(lambda text: None)
        return self.backend.restore(progress)

    def run(self, state, stop_at: int):
        return self.backend.run(state, stop_at)

    def iteration(self, state) -> int:
        return self.backend.iteration(state)

    def done(self, state) -> bool:
        return self.backend.done(state)

    def checkpoint(self, state, losses):
        return self.backend.checkpoint(state, losses)

    def results(self, state, history, seconds):
        return self.backend.results(state, history, seconds)

    def close(self) -> None:
        self.backend = None  # X leaves the device with the backend
