"""The pass over the chunks: a background thread reads and places the next chunk while one computes.

:class:`Placement` says where a chunk goes (the default device, or split over a mesh's ``data``
axis with one share per process); :func:`stream_chunks` yields :class:`Chunk` s in order, reading
the next in a background thread and deleting the previous one's arrays as soon as the consumer
asks for the next, so that two chunks of ``X`` are in use at a time.
"""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jsnmf.io.hostbuffers import aligned_empty
from jsnmf.io.sources import StreamPlan

__all__ = ["Placement", "Chunk", "stream_chunks"]


class Placement:
    """Where a streamed fit puts its chunks: the default device, or split over a mesh's axis ``data``.

    Under a mesh, a step's global chunk is every process's current chunk, one after the other (a
    :class:`jsnmf.distributed.RowLayout` with one chunk per process), split over the devices. The
    per-chunk steps then run on all devices at once and XLA sums the statistics across them;
    ``F`` and the statistics are replicated. Each process reads, and keeps the codes of, its own
    chunks only. Chunks are padded to a whole number of rows per device (zero rows, zero codes).
    """

    def __init__(self, mesh, plan: StreamPlan):
        self.mesh, self.layout = mesh, None
        if mesh is not None:
            from jsnmf.distributed import RowLayout

            local_devices = len(RowLayout.build(mesh, [1] * jax.process_count()).positions[jax.process_index()])
            plan.round_chunk_rows(local_devices)
            self.layout = RowLayout.build(mesh, [plan.chunk_rows] * jax.process_count())

    def put(self, local: np.ndarray) -> jax.Array:
        """This process's chunk-shaped rows on the device(s): the step's global array under a mesh."""
        return jax.device_put(local) if self.layout is None else self.layout.assemble(local)

    def local(self, array: jax.Array) -> np.ndarray:
        """This process's rows of a chunk-shaped array, as NumPy."""
        return np.asarray(array) if self.layout is None else self.layout.local_part(array)

    def replicate(self, value) -> jax.Array:
        """A host value (the same on every process) where the steps read it: every device of the mesh."""
        if self.layout is None:
            return jnp.asarray(value)
        from jsnmf.distributed import replicate

        return replicate(np.asarray(value), self.mesh)


@dataclass
class Chunk:
    index: int
    start: int  # rows [start, stop) of this process's share (its codes); start == stop: no rows left
    stop: int
    X: jax.Array  # (chunk_rows, d) raw dtype, on the device(s)
    G: jax.Array | None  # (chunk_rows, k) codes read for this pass, on the device(s)
    valid: jax.Array  # (chunk_rows,) bool: real rows, not padding


def stream_chunks(plan: StreamPlan, placement: Placement, steps: int | None = None,
                  codes: Callable[[int, int], np.ndarray] | None = None, collect: bool = True) -> Iterator[Chunk]:
    """Yield ``steps`` chunks in order (default: the plan's); a background thread reads and places the next one.

    ``codes(start, stop)``, when given, is called in the same thread for the chunk's codes (padded).
    ``collect``: run the garbage collector after the first chunk (needed in the passes that compile
    the per-chunk steps, see below; it costs tens of milliseconds, so later passes skip it).
    Steps past this process's last chunk (other processes have more) are zero chunks. When the
    consumer asks for the next chunk it is done with the previous one, whose arrays are deleted
    here before the following read starts: with a consumer that waits for each chunk's result, two
    chunks are in use (the one computing, the one being read).
    """
    count = len(plan.bounds) if steps is None else steps
    zeros = None

    def load(index: int) -> Chunk:
        nonlocal zeros
        if index < len(plan.bounds):
            start, stop = (bound - plan.offset for bound in plan.bounds[index])
            X = plan.load(index)
        else:
            start = stop = plan.rows
            if zeros is None:
                zeros = aligned_empty((plan.chunk_rows, plan.d), plan.raw_dtype)
            X = zeros
        G = placement.put(codes(start, stop)) if codes is not None else None
        valid = placement.put(np.arange(plan.chunk_rows) < stop - start)
        return Chunk(index, start, stop, placement.put(X), G, valid)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jsnmf-prefetch") as pool:
        future = pool.submit(load, 0)
        previous = None
        try:
            for index in range(count):
                chunk = future.result()
                if previous is not None:
                    _release(previous)
                    if index == 1 and collect:
                        # The first call of a compiled function keeps its arguments alive until the
                        # next garbage collection: collect once, before the third chunk is read.
                        gc.collect()
                future = pool.submit(load, index + 1) if index + 1 < count else None
                previous = chunk
                yield chunk
        finally:
            if future is not None:
                future.cancel()
            if previous is not None:  # the consumer's loop variable would keep the last chunk alive
                _release(previous)
            plan.release_buffers()  # a store's full chunks are mapped; the pool only served the short one


def _release(chunk: Chunk) -> None:
    """Delete the arrays of a chunk the consumer is done with, rather than wait for garbage collection.

    On the CPU a chunk's array shares its host buffer (a chunk file's mapping); even after this,
    JAX lets go of that buffer asynchronously, which the reader waits for (:class:`HostChunks`).
    """
    for name in ("X", "G", "valid"):
        array = getattr(chunk, name)
        if isinstance(array, jax.Array) and not array.is_deleted():
            array.delete()
        setattr(chunk, name, None)
