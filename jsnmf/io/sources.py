"""Chunk sources and the plan of a streamed pass: which rows, in which chunks, read how.

A *chunk source* is anything with ``n_tokens``, ``d_mlp``, ``chunk_bounds`` and
``read(layer, start, stop, raw=True)`` (an :class:`~jsnmf.store.ActivationStore` is one;
:class:`ArraySource` wraps a 2-D array or ``np.memmap``). A source may also say where a chunk lies
in a file (``locate(layer, start, stop) -> (path, byte offset)``): such a chunk is memory-mapped
rather than copied (:func:`map_rows`). The store owns its chunk format; nothing here parses it.
:func:`make_plan` turns a source (and, under several processes, this process's share of it) into
a :class:`StreamPlan`, whose :meth:`StreamPlan.load` reads a chunk into host memory
(:mod:`jsnmf.io.hostbuffers`).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import numpy as np

from jsnmf.dtypes import DTYPES
from jsnmf.io.hostbuffers import HostChunks
from jsnmf.validation import check_matrix_layout

__all__ = ["ChunkSource", "ArraySource", "StreamPlan", "make_plan", "is_chunk_source", "map_rows",
           "regular_bounds", "ARRAY_CHUNK_TOKENS"]

# Rows per chunk when an array (not a store, which has its own chunks) is streamed.
ARRAY_CHUNK_TOKENS = 65536


class ChunkSource(Protocol):
    """What the streamed fit reads ``X`` from (an ActivationStore satisfies it)."""

    n_tokens: int
    d_mlp: int
    chunk_bounds: list[tuple[int, int]]

    def read(self, layer: Any, start: int, stop: int, *, raw: bool = False) -> np.ndarray: ...


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
        self._host = HostChunks((self.chunk_rows, self.d), self.raw_dtype)

    def _locate(self, start: int, stop: int):
        """Where the source says rows ``[start, stop)`` lie in a file, or None.

        A method, not a lambda stored on the plan: a lambda would make a reference cycle, keeping the
        plan (and the chunk files it still maps) alive after a fit until the garbage collector runs
        (measured: two chunks of X more in the next fit's resident set, bench_scale).
        """
        locate = getattr(self.source, "locate", None)
        return None if locate is None else locate(self.layer, start, stop)

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
