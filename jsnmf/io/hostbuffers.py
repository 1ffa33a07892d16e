"""Host memory handed to JAX: page-aligned buffers, a pool of them, and the chunks held at once.

This is the one module that touches JAX internals (:func:`_drain_released_host_buffers` calls a
private hook to make JAX let go of host buffers promptly). On the CPU ``jax.device_put`` shares
page-aligned host memory instead of copying it, so a streamed fit hands its chunks over without a
copy; the price is that the host must know when JAX is done with them. :class:`BufferPool` reuses
buffers only once their reference counts are back to idle; :class:`HostChunks` keeps at most two
chunks of ``X`` (pooled buffers or file mappings) alive at once.
"""

from __future__ import annotations

import gc
import mmap
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

__all__ = ["aligned_empty", "wait_until", "BufferPool", "HostChunks"]


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero-filled array in its own anonymous memory map (page-aligned, so device_put shares it on CPU).

    Chunk buffers bypass ``malloc``: allocated in the reader thread and freed in the main one,
    glibc would keep them in per-thread arenas and the resident set would creep up pass after pass;
    a memory map is returned to the system as soon as the last array using it is gone.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    buffer = mmap.mmap(-1, nbytes)
    return np.frombuffer(buffer, dtype, count=int(np.prod(shape))).reshape(shape)


def _drain_released_host_buffers() -> None:
    """Let JAX drop the host buffers it has finished with.

    JAX lets go of a host buffer it shared (``device_put`` of aligned memory on the CPU) or copied
    from (a GPU) on one of its own threads, after the computations using it are done; without the
    GIL that thread only queues the Python release, which runs at JAX's next garbage collection
    hook. Measured here: a deleted chunk's file stayed mapped for more than 100 ms, so a third chunk
    was resident beside the two in use (benchmarks/RESULTS.md, bench_scale). Running the hook while
    waiting releases it within milliseconds.
    """
    try:
        from jax._src.lib import _jax  # the hook is private; Python's collector calls it too

        collect = _jax.collect_garbage
    except (ImportError, AttributeError):
        collect = gc.collect
    collect()


def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``condition`` while JAX releases the host buffers it is done with; False on timeout.

    After 50 ms a full garbage collection runs once: the first call of a compiled function keeps
    its arguments alive until then.
    """
    started = time.perf_counter()
    collected = False
    while not condition():
        waited = time.perf_counter() - started
        if waited > timeout:
            return False
        if waited > 0.05 and not collected:
            gc.collect()
            collected = True
        else:
            _drain_released_host_buffers()
        time.sleep(0.0005)
    return True


class _PooledBuffer:
    """One buffer of a :class:`BufferPool`, with the reference counts it has when nobody uses it."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.chain: list[Any] = []  # the array and its bases (JAX may hold any of them)
        owner: Any = array
        while owner is not None:
            self.chain.append(owner)
            owner = getattr(owner, "base", None)
        self.idle: list[int] = []

    def counts(self) -> list[int]:
        return [sys.getrefcount(owner) for owner in self.chain]

    def is_idle(self) -> bool:
        return self.counts() == self.idle


class BufferPool:
    """At most ``keep`` reusable page-aligned host buffers of one shape, for arrays handed to ``jax.device_put``.

    A fresh buffer costs a page fault per 4 KiB page (≈ 80 ms for 64 MiB on a small VM, as long as the
    product it feeds); reusing two buffers turn about avoids that. On the CPU ``device_put`` shares
    an aligned buffer instead of copying it, and on a GPU the copy may still be in flight when it
    returns; either way JAX holds a reference to the array (or a base of it) while it needs the
    memory. A buffer is handed out again only when the reference counts of it and its bases are
    back to their idle values; :meth:`take` waits for that (:func:`wait_until`), so reuse never
    overwrites data in use and no third buffer is allocated unless JAX holds on for seconds.
    """

    def __init__(self, shape: tuple[int, ...], dtype, keep: int = 2):
        self.shape, self.dtype, self.keep = tuple(shape), np.dtype(dtype), keep
        self._buffers: list[_PooledBuffer] = []
        self._lock = threading.Lock()

    def clear(self) -> list[np.ndarray]:
        """Let go of the buffers (they are freed once nothing else uses them); returns them."""
        with self._lock:
            buffers, self._buffers = [pooled.array for pooled in self._buffers], []
        return buffers

    def busy(self) -> int:
        """How many of the pool's buffers are in use."""
        with self._lock:
            return sum(not pooled.is_idle() for pooled in self._buffers)

    def _idle(self) -> np.ndarray | None:
        return next((pooled.array for pooled in self._buffers if pooled.is_idle()), None)

    def take(self) -> np.ndarray:
        """A buffer of the pool's shape (contents undefined) that nothing else uses."""
        with self._lock:
            if len(self._buffers) < self.keep and self._idle() is None:
                pooled = _PooledBuffer(aligned_empty(self.shape, self.dtype))
                pooled.idle = pooled.counts()  # measured with no reference but the pool's
                self._buffers.append(pooled)
                return pooled.array
            if wait_until(lambda: self._idle() is not None):
                return self._idle()
            return aligned_empty(self.shape, self.dtype)  # JAX still holds them all: never overwrite


class HostChunks:
    """The chunks of ``X`` handed to JAX from host memory, at most ``keep`` at once.

    A chunk lives in a :class:`BufferPool` buffer (busy while its reference counts are above idle)
    or in a mapping of its file, kept here and unmapped here as soon as no array uses it any more
    (``mmap.close`` refuses while one does), so that the unmapping is done before the next chunk is
    mapped; buffers the pool lets go of are followed the same way. :meth:`wait_for_room` comes
    before each new chunk.
    """

    def __init__(self, shape: tuple[int, ...], dtype, keep: int = 2):
        self.keep = keep
        self.pool = BufferPool(shape, dtype, keep)
        self._mappings: list[mmap.mmap] = []  # file mappings, and buffers out of the pool
        self._lock = threading.Lock()  # the reader adds chunks; the consumer clears between passes

    def _in_use(self) -> int:
        with self._lock:
            self._mappings = [mapping for mapping in self._mappings if not _unmap_if_unused(mapping)]
            return len(self._mappings) + self.pool.busy()

    def wait_for_room(self) -> None:
        wait_until(lambda: self._in_use() < self.keep)  # on timeout go on: memory, not correctness

    def mapped(self, array: np.ndarray) -> np.ndarray:
        with self._lock:
            self._mappings.append(_mapping_of(array))  # map_rows: always over a memory map
        return array

    def clear(self) -> None:
        """Free the pool's buffers (between passes): unmapped once JAX lets go of them too."""
        with self._lock:
            self._mappings += [mapping for mapping in map(_mapping_of, self.pool.clear()) if mapping is not None]
        self._in_use()


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The memory map under ``array`` (None for an empty array, which has none)."""
    owner: Any = array
    while isinstance(owner, np.ndarray):
        owner = owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner
    return owner if isinstance(owner, mmap.mmap) else None


def _unmap_if_unused(mapping: mmap.mmap) -> bool:
    try:
        mapping.close()  # a BufferError while an array (JAX's included) still uses the memory
    except BufferError:
        return False
    return True
