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

import gc
import math
import mmap
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

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
from jsnmf.dtypes import DTYPES
from jsnmf.validation import check_matrix_layout

# Rows per chunk when an array (not a store, which has its own chunks) is streamed.
ARRAY_CHUNK_TOKENS = 65536
SVD_OVERSAMPLE, SVD_POWER_ITERS = 10, 2
KMEANS_ITERS, KMEANS_OFFSET = 20, 0.2


class ChunkSource(Protocol):
    """What the streamed fit reads ``X`` from (an ActivationStore satisfies it)."""

    n_tokens: int
    d_mlp: int
    chunk_bounds: list[tuple[int, int]]

    def read(self, layer: Any, start: int, stop: int, *, raw: bool = False) -> np.ndarray: ...


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


def regular_bounds(n: int, rows: int) -> list[tuple[int, int]]:
    """``[(0, rows), (rows, 2·rows), …]`` covering ``n`` tokens."""
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


class ArraySource:
    """A 2-D array (``np.ndarray``, ``np.memmap``, ``jax.Array``) seen as a chunk source.

    The rows of a C-ordered ``np.memmap`` are read from its file (see :meth:`StreamPlan.load`), so
    the pages a pass touches do not stay mapped (and counted) in the process.
    """

    layers = None

    def __init__(self, X, chunk_tokens: int | None = None):
        check_matrix_layout(X)  # values are checked chunk by chunk as they stream
        self.X = X
        self.n_tokens, self.d_mlp = (int(s) for s in X.shape)
        name = np.dtype(X.dtype).name
        self.dtype = name if name in DTYPES else "float32"  # float64 is streamed as float32
        self.chunk_bounds = regular_bounds(self.n_tokens, int(chunk_tokens or ARRAY_CHUNK_TOKENS))
        self._file = None
        if (isinstance(X, np.memmap) and X.filename and X.flags.c_contiguous and self.dtype == name
                and isinstance(getattr(X, "offset", None), int)):
            self._file = (X.filename, X.offset)

    def read(self, layer, start: int, stop: int, *, raw: bool = False) -> np.ndarray:
        rows = np.asarray(self.X[start:stop])
        return rows.astype(DTYPES[self.dtype] if raw else np.float32, copy=False)

    def locate(self, layer, start: int, stop: int) -> tuple[str, int] | None:
        """``(file, byte offset)`` of the rows ``[start, stop)`` when they lie contiguously in a file."""
        if self._file is None:
            return None
        filename, offset = self._file
        return filename, offset + start * self.d_mlp * DTYPES[self.dtype].itemsize

    def describe(self) -> dict:
        kind = "memmap" if isinstance(self.X, np.memmap) else "array"
        info = {"kind": kind, "dtype": self.dtype}
        if self._file is not None:
            info["path"] = str(self._file[0])
        return info


def _pread_exact(path: str | os.PathLike, view: memoryview, offset: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"{path}: file ends before byte {offset + len(view)} (truncated?)")
            done += got
    finally:
        os.close(fd)


def map_rows(path: str | os.PathLike, offset: int, shape: tuple[int, int], dtype) -> np.ndarray:
    """A read-only array over bytes ``[offset, offset + size)`` of ``path``, mapped with its pages read in.

    ``MAP_POPULATE`` reads the pages in one go in the calling (reader) thread, so the product that
    uses the array does not stop on page faults. When ``offset`` is 64-byte aligned (as the data of a
    ``.npy`` file is) ``jax.device_put`` on the CPU uses the mapping without copying it.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    nbytes = count * dtype.itemsize
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if offset + nbytes > size:
            raise ValueError(f"{path}: file ends at byte {size}, before the rows it should hold "
                             f"(bytes [{offset}, {offset + nbytes})); truncated?")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(f.fileno(), offset + nbytes - start, flags=flags, prot=mmap.PROT_READ, offset=start)
    return np.frombuffer(mapping, dtype, count=count, offset=offset - start).reshape(shape)


def _npy_data_offset(path: Path) -> tuple[int, tuple[int, ...], np.dtype, bool]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        return f.tell(), shape, dtype, fortran


def _store_chunk_locator(store, layer, itemsize: int) -> Callable[[int, int], tuple[Path, int] | None] | None:
    """For an ActivationStore: where a whole chunk's data lies, ``(its .npy file, data offset)``."""
    if not (hasattr(store, "chunk_path") and hasattr(store, "chunk_bounds")):
        return None
    index_of = {bounds: i for i, bounds in enumerate(store.chunk_bounds)}

    def locate(start: int, stop: int) -> tuple[Path, int] | None:
        index = index_of.get((start, stop))
        if index is None:
            return None
        path = store.chunk_path(layer, index)
        offset, shape, dtype, fortran = _npy_data_offset(path)
        if tuple(shape) != (stop - start, store.d_mlp) or fortran or dtype.itemsize != itemsize:
            raise ValueError(f"{path}: expected a C-ordered array of shape {(stop - start, store.d_mlp)} "
                             f"with {itemsize}-byte items, found {dtype} {shape}")
        return path, offset

    return locate


@dataclass
class StreamPlan:
    """How ``X`` is streamed: the source, the layer, the chunks and their padded size."""

    source: Any
    layer: Any
    bounds: list[tuple[int, int]]
    chunk_rows: int
    raw_dtype: np.dtype

    @property
    def n(self) -> int:
        return int(self.source.n_tokens)

    @property
    def d(self) -> int:
        return int(self.source.d_mlp)

    @property
    def offset(self) -> int:
        """First token of the plan's chunks (a process's share of a store starts past 0)."""
        return self.bounds[0][0]

    @property
    def rows(self) -> int:
        """Tokens the plan streams."""
        return self.bounds[-1][1] - self.bounds[0][0]

    def round_chunk_rows(self, multiple: int) -> None:
        """Pad every chunk to a multiple of ``multiple`` rows (one share per device)."""
        self.chunk_rows = -(-self.chunk_rows // multiple) * multiple
        self._host = HostChunks((self.chunk_rows, self.d), self.raw_dtype)

    def __post_init__(self):
        store_locator = _store_chunk_locator(self.source, self.layer, self.raw_dtype.itemsize)
        if store_locator is not None:
            self._locate = store_locator
        elif hasattr(self.source, "locate"):
            self._locate = lambda start, stop: self.source.locate(self.layer, start, stop)
        else:
            self._locate = lambda start, stop: None
        self._host = HostChunks((self.chunk_rows, self.d), self.raw_dtype)

    def load(self, index: int) -> np.ndarray:
        """Chunk ``index`` in the raw dtype, zero-padded to ``chunk_rows`` rows.

        A full chunk that lies in a file is mapped (no copy); otherwise the rows are read into a
        pooled aligned buffer and the padding rows zeroed. Waits until fewer than two chunks are
        still held (:class:`HostChunks`).
        """
        start, stop = self.bounds[index]
        located = self._locate(start, stop)
        self._host.wait_for_room()
        if located is not None and stop - start == self.chunk_rows:
            return self._host.mapped(map_rows(located[0], located[1], (stop - start, self.d), self.raw_dtype))
        out = self._host.pool.take()
        if located is not None:
            _pread_exact(located[0], memoryview(out[: stop - start].reshape(-1).view(np.uint8)), located[1])
        else:
            rows = self.source.read(self.layer, start, stop, raw=True)
            if rows.shape != (stop - start, self.d):
                raise ValueError(f"the chunk source returned shape {rows.shape} for tokens [{start}, {stop}), "
                                 f"expected {(stop - start, self.d)}")
            out[: stop - start] = rows
        out[stop - start:] = 0  # padding rows: zero rows with zero codes add nothing
        return out

    def release_buffers(self) -> None:
        """Free the pooled chunk buffers between passes (reallocated on the next pass if needed)."""
        self._host.clear()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """``X[start:stop]`` as float32 (for fingerprints and k-means seeds)."""
        return np.asarray(self.source.read(self.layer, start, stop, raw=True)).astype(np.float32)

    def describe(self) -> dict:
        if hasattr(self.source, "describe"):
            return self.source.describe()
        info: dict[str, Any] = {"kind": type(self.source).__name__, "layer": self.layer,
                                "dtype": self.raw_dtype.name}
        if getattr(self.source, "path", None) is not None:
            info["path"] = str(self.source.path)
        manifest = getattr(self.source, "manifest", None)
        if isinstance(manifest, dict) and isinstance(manifest.get("corpus"), dict):
            info["corpus_sha256"] = manifest["corpus"].get("sha256")
        return info


def is_chunk_source(X) -> bool:
    return all(hasattr(X, name) for name in ("chunk_bounds", "read", "n_tokens", "d_mlp"))


def make_plan(X, layer=None, chunk_tokens: int | None = None, force: bool = False) -> StreamPlan | None:
    """The streaming plan for ``X``, or None when ``X`` is an ordinary array to fit in memory.

    Streamed: chunk sources (an ActivationStore: pick ``layer``), ``np.memmap`` arrays, and any array
    when ``chunk_tokens`` is set or ``force``. ``chunk_tokens`` regroups the source's chunks.
    Under several processes an ActivationStore (on a file system they share) is split between
    them, whole chunks each (:func:`jsnmf.distributed.process_token_range`); any other ``X`` is
    this process's own rows.
    """
    if is_chunk_source(X):
        source = X
        layers = getattr(source, "layers", None)
        if layers is not None:
            layers = list(layers)
            if layer is None:
                if len(layers) != 1:
                    raise ValueError(f"this store holds layers {layers}: pass fit(store, layer=L) to choose one")
                layer = layers[0]
            elif layer not in layers:
                raise ValueError(f"layer {layer} is not in the store (layers {layers})")
        bounds = [(int(a), int(b)) for a, b in source.chunk_bounds]
        share = (0, int(source.n_tokens))
        if jax.process_count() > 1 and hasattr(source, "chunk_path"):
            from jsnmf.distributed import process_token_range

            share = process_token_range(source)
            bounds = [(a, b) for a, b in bounds if share[0] <= a and b <= share[1]]
        if chunk_tokens:
            bounds = [(share[0] + a, share[0] + b) for a, b in regular_bounds(share[1] - share[0], int(chunk_tokens))]
    elif isinstance(X, np.memmap) or ((chunk_tokens or force) and hasattr(X, "shape") and hasattr(X, "dtype")):
        if layer is not None:
            raise ValueError("layer= selects a layer of an ActivationStore; X is a plain array")
        source = ArraySource(X, chunk_tokens)
        bounds, share = source.chunk_bounds, (0, source.n_tokens)
    else:
        if layer is not None:
            raise ValueError("layer= selects a layer of an ActivationStore; X is a plain array")
        return None
    n, d = int(source.n_tokens), int(source.d_mlp)
    if n == 0 or d == 0:
        raise ValueError(f"X is empty: {n} tokens × {d} dimensions")
    _check_bounds(bounds, n, share)
    raw_name = getattr(source, "dtype", None)
    if raw_name is None:
        raw_name = np.dtype(source.read(layer, 0, 1, raw=True).dtype).name
    raw_name = str(raw_name)
    if raw_name not in DTYPES:
        raise ValueError(f"X is stored as {raw_name}; streaming reads float32, float16 or bfloat16")
    chunk_rows = max(stop - start for start, stop in bounds)
    return StreamPlan(source, layer, bounds, chunk_rows, DTYPES[raw_name])


def _check_bounds(bounds: list[tuple[int, int]], n: int, share: tuple[int, int]) -> None:
    expected = share[0]
    for start, stop in bounds:
        if start != expected or stop <= start:
            raise ValueError(f"chunk bounds must tile [{share[0]}, {share[1]}) in order; "
                             f"found ({start}, {stop}) after {expected}")
        expected = stop
    if expected != share[1]:
        raise ValueError(f"chunk bounds cover [{share[0]}, {expected}) but X has {n} tokens")


# -- codes buffers --------------------------------------------------------------------------------

class MemoryCodes:
    """An n×k float32 codes buffer in host memory."""

    def __init__(self, n: int, k: int):
        self.array = np.zeros((n, k), np.float32)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        out[: stop - start] = self.array[start:stop]

    def write(self, start: int, values: np.ndarray) -> None:
        self.array[start:start + len(values)] = values

    def full(self) -> np.ndarray:
        return self.array

    def result(self) -> np.ndarray:
        return self.array

    def close(self) -> None:
        pass


class DiskCodes:
    """An n×k float32 codes buffer in a ``.npy`` file, read and written with pread/pwrite."""

    def __init__(self, path: Path, n: int, k: int):
        self.path, self.n, self.k = Path(path), n, k
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": (n, k)})
            self.offset = f.tell()
            f.truncate(self.offset + n * k * 4)
        self.fd = os.open(self.path, os.O_RDWR)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        view = memoryview(out[: stop - start].reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], self.offset + start * self.k * 4 + done)
            if got <= 0:
                raise ValueError(f"{self.path}: file ends before row {stop} (truncated?)")
            done += got

    def write(self, start: int, values: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(values, "<f4").reshape(-1).view(np.uint8))
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], self.offset + start * self.k * 4 + done)

    def full(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def result(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _fill(buffer, values: np.ndarray, rows: int = 65536) -> None:
    for start in range(0, len(values), rows):
        buffer.write(start, np.asarray(values[start:start + rows], np.float32))


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


# -- the pass over the chunks ---------------------------------------------------------------------

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
        return DiskCodes(self.work_dir / f"{name}{_process_suffix()}.npy", self.n_local, self.k)

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
                _fill(current, restored.G[own])
                if restored.best_G is not None:
                    _fill(best, restored.best_G[own])
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
        final = self.work_dir / f"codes{_process_suffix()}.npy"
        os.replace(winner.path, final)
        for buffer in (current, following, best):
            if buffer is not winner and buffer.path.exists():
                buffer.path.unlink()
        return np.load(final, mmap_mode="r")


def _process_suffix() -> str:
    """Distinguishes the files of the processes of a multi-process fit sharing a directory."""
    return f"-process{jax.process_index()}" if jax.process_count() > 1 else ""


def _write_back(buffer, start: int, stop: int, G: np.ndarray) -> None:
    buffer.write(start, G[: stop - start])


def _stage(bar, text: str | None) -> None:
    if bar is not None and text is not None:
        bar.set_postfix_str(text)


def codes_directory(codes_on_disk) -> Path | None:
    """Where on-disk codes go: ``codes_on_disk`` if a path, a new temporary directory if True, else None.

    The directory is the caller's: the result stays there as ``codes.npy`` (``codes_`` maps it).
    """
    if codes_on_disk is False or codes_on_disk is None:
        return None
    if codes_on_disk is True:
        return Path(tempfile.mkdtemp(prefix="jsnmf-codes-"))
    path = Path(codes_on_disk).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"codes_on_disk {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path
