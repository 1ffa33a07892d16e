"""ActivationStore: MLP activations on disk, chunked by tokens, with per-token metadata.

Layout of a store directory::

    manifest.json              format name/version, layers, dtype, d_mlp, committed chunks, run metadata
    documents.jsonl            the corpus texts (and labels), one JSON object per line, in order
    layer_{L:02d}/chunk_{i:06d}.npy   activations X[start:stop] of layer L, shape (stop-start, d_mlp)
    tokens/chunk_{i:06d}.npy   int32 (stop-start, 4): token_id, doc_index, position, label_index

Every layer shares the same token chunks ``[start, stop)`` (``store.chunk_bounds``); all chunks
hold ``chunk_tokens`` tokens except the last, so a jit-compiled consumer sees one shape (two
with the tail). Rows are tokens in document order (padding and, by default, BOS removed).

Why NumPy ``.npy`` chunk files (and not zarr or tensorstore):

- **Atomic commit is simple.** A chunk is written to temporary names, fsynced and moved into
  place with ``os.replace``; only then is the manifest (also written atomically) updated to
  list it. A kill at any moment leaves the manifest describing whole chunks only; files of a
  chunk that was being written when the process died are deleted when the writer resumes.
  zarr/tensorstore write chunk files in place and keep array-level metadata that would still
  have to be kept consistent with our own progress record.
- **No extra dependency.** NumPy reads the files; bfloat16 is stored as its uint16 bits (the
  manifest's ``dtype`` says how to read them back, via ``ml_dtypes.bfloat16``, which JAX ships).
- **Many readers at once.** ``np.load(mmap_mode="r")`` maps one chunk at a time read-only,
  so any number of processes (e.g. one per host of a sharded fit) can stream the store
  concurrently, and the OS page cache is shared between them. One file per (layer, chunk)
  lets a reader touch only the layer it fits.

Integrity: the manifest's ``checksums`` maps each committed chunk file (``layer_00/chunk_000000.npy``,
``tokens/...``) to the sha256 of its bytes, recorded when the chunk is committed. A reader verifies a
chunk the first time this process reads it (a verified file is remembered by inode, size and mtime,
so a streamed fit hashes each chunk once, not once per pass) and raises ValueError naming the file on
a mismatch. A chunk file that is a symbolic link resolving outside the store is refused. Stores
written before checksums were recorded (no ``checksums`` key) still open; their chunks are checked
for shape, dtype and size only.

One writer at a time holds an advisory lock (``.lock``, ``fcntl.flock``); the OS drops it
when the process dies, so a killed extraction can be resumed at once.
"""

from __future__ import annotations

import bisect
import datetime
import functools
import hashlib
import io
import json
import os
import queue
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

import jsnmf
from jsnmf.io.files import FolderLock
from jsnmf.dtypes import DISK_DTYPES, DTYPES, check_dtype as check_any_dtype
from jsnmf.io.files import TMP_SUFFIX, atomic_write, atomic_write_json
from jsnmf.io.manifest import INTEGER, corrupt, read_manifest
from jsnmf.layout import hook_name, layer_dir_name

__all__ = [
    "ActivationStore", "StoreWriter", "FORMAT_NAME", "FORMAT_VERSION", "DTYPES", "hook_name", "check_dtype",
    "remove_store",
]

FORMAT_NAME = "jsnmf.activation_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
TOKENS_DIR = "tokens"
LOCK = ".lock"
TOKEN_COLUMNS = ("token_id", "doc_index", "position", "label_index")

# Keys the store itself owns in the manifest; run metadata (``meta``) may not override them.
_RESERVED_KEYS = {
    "format", "format_version", "jsnmf_version", "created", "updated", "layers", "hook_names", "dtype",
    "d_mlp", "chunk_tokens", "chunks", "n_tokens", "complete", "labels", "n_documents", "token_columns",
    "checksums",
}
_REQUIRED_KEYS = _RESERVED_KEYS - {"jsnmf_version", "created", "updated", "n_documents", "token_columns", "checksums"}
# JSON types of the manifest's keys (io.manifest checks them before anything reads them).
_TYPES = {"layers": list, "dtype": str, "d_mlp": INTEGER, "chunk_tokens": INTEGER, "chunks": list,
          "n_tokens": INTEGER, "complete": bool, "labels": list, "checksums": dict}


def check_dtype(dtype: str) -> str:
    """Return ``dtype`` if the store supports it, else raise ValueError listing the choices."""
    return check_any_dtype(dtype, "store dtype")


_layer_dir = layer_dir_name


def _chunk_name(index: int) -> str:
    return f"chunk_{index:06d}.npy"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_save_npy(path: Path, blocks: Sequence[np.ndarray]) -> str:
    """Save the row blocks ``blocks`` (same dtype and width) as one 2-D ``.npy`` file, without joining
    them in memory first; return the sha256 of the file's bytes."""
    first = blocks[0]
    header = {
        "descr": np.lib.format.dtype_to_descr(first.dtype),
        "fortran_order": False,
        "shape": (sum(len(b) for b in blocks), *first.shape[1:]),
    }

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, header)
    digest = hashlib.sha256(head.getvalue())

    def write(f):
        f.write(head.getvalue())
        for block in blocks:
            data = np.ascontiguousarray(block).data
            digest.update(data)
            f.write(data)

    atomic_write(path, write)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"{path}: not a jsnmf activation store (no such directory)")
    manifest = read_manifest(path / MANIFEST, format=FORMAT_NAME, version=FORMAT_VERSION,
                             what="jsnmf activation store", required=_REQUIRED_KEYS, types=_TYPES)
    _check_chunks(manifest, path)
    return manifest


def _check_chunks(manifest: dict, path: Path) -> None:
    expected_start = 0
    for entry in manifest["chunks"]:
        if not (isinstance(entry, list) and len(entry) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in entry)):
            raise corrupt(path, f"a chunk is {entry!r}, expected a pair of token numbers [start, stop]", MANIFEST)
        start, stop = entry
        if start != expected_start or stop <= start:
            raise ValueError(f"{path}: corrupt manifest, chunk bounds are not contiguous at token {start}")
        expected_start = stop
    if expected_start != manifest["n_tokens"]:
        raise ValueError(
            f"{path}: corrupt manifest, chunks cover {expected_start} tokens, n_tokens says {manifest['n_tokens']}"
        )


def _load_npy(file: Path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of a chunk file (no pickles); a truncated or unreadable file is a ValueError naming it."""
    try:
        return np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # mmap: "mmap length is greater than file size"
        raise ValueError(f"{file}: unreadable or truncated chunk file ({err})") from None


_VERIFIED: set[tuple] = set()  # (path, device, inode, size, mtime_ns, sha256) of files verified in this process
_VERIFIED_LOCK = threading.Lock()


def verify_file(file: Path, expected_sha256: str) -> None:
    """Raise ValueError naming ``file`` unless its bytes have the sha256 ``expected_sha256``.

    Each version of a file (inode, size, mtime) is hashed once per process; later calls are a ``stat``.
    """
    try:
        info = os.stat(file)
    except OSError as err:
        raise ValueError(f"{file}: unreadable chunk file ({err.strerror})") from None
    key = (str(file), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, expected_sha256)
    with _VERIFIED_LOCK:
        if key in _VERIFIED:
            return
    try:
        with open(file, "rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:
        raise ValueError(f"{file}: unreadable chunk file ({err.strerror})") from None
    if actual != expected_sha256:
        raise ValueError(f"{file}: checksum mismatch, the file is damaged or was changed after it was "
                         f"written (sha256 {actual[:16]}..., the manifest records {expected_sha256[:16]}...)")
    with _VERIFIED_LOCK:
        _VERIFIED.add(key)


# ---------------------------------------------------------------- reader


class ActivationStore:
    """Read access to a store directory (see the module docstring for the layout)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._chunk_starts = [start for start, _ in manifest["chunks"]]

    # -- construction

    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_incomplete: bool = False) -> "ActivationStore":
        """Open an existing store for reading.

        Raises ValueError if ``path`` is not a jsnmf store, or if its extraction has not finished
        (unless ``allow_incomplete``: then only the chunks committed so far are visible).
        """
        path = Path(path).expanduser().resolve()
        manifest = _read_manifest(path)
        if not manifest["complete"] and not allow_incomplete:
            expected = manifest.get("n_tokens_expected")
            of = f" of {expected}" if expected is not None else ""
            raise ValueError(
                f"{path}: the store is incomplete ({manifest['n_tokens']}{of} tokens committed); "
                "rerun the extraction to resume it, or open it with allow_incomplete=True"
            )
        store = cls(path, manifest)
        store._check_files()
        return store

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        layers: Sequence[int],
        d_mlp: int,
        dtype: str,
        chunk_tokens: int,
        meta: Mapping | None = None,
        documents: Sequence | None = None,
        labels: Sequence[str] | None = None,
    ) -> "StoreWriter":
        """Create a new, empty store at ``path`` and return its writer.

        ``documents``: texts (str) or objects with ``.text``/``.label`` (e.g. ``corpus.Document``),
        saved to ``documents.jsonl``. ``labels``: the label list that ``label_index`` refers to.
        ``meta``: JSON-serialisable run metadata merged into the manifest (model, corpus, ...).
        """
        return StoreWriter._create(
            Path(path).expanduser().resolve(), layers=layers, d_mlp=d_mlp, dtype=dtype,
            chunk_tokens=chunk_tokens, meta=meta or {}, documents=documents or [], labels=labels or [],
        )

    @classmethod
    def resume(cls, path: str | os.PathLike) -> "StoreWriter":
        """Reopen an incomplete store for writing after its committed chunks (drops uncommitted files)."""
        return StoreWriter._resume(Path(path).expanduser().resolve())

    # -- description

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def d_mlp(self) -> int:
        return int(self.manifest["d_mlp"])

    @property
    def dtype(self) -> str:
        """The on-disk dtype name: "float32", "float16" or "bfloat16"."""
        return self.manifest["dtype"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def chunk_bounds(self) -> list[tuple[int, int]]:
        """Token ranges ``(start, stop)`` of the chunks, the same for every layer."""
        return [(int(a), int(b)) for a, b in self.manifest["chunks"]]

    @property
    def hook_names(self) -> list[str]:
        return [hook_name(layer) for layer in self.layers]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer directory recorded at extraction time, or None."""
        tokenizer = self.manifest.get("tokenizer")
        return tokenizer.get("path") if isinstance(tokenizer, dict) else None

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, layers={self.layers}, n_tokens={self.n_tokens}, "
            f"d_mlp={self.d_mlp}, dtype={self.dtype!r}, chunks={len(self.chunk_bounds)})"
        )

    # -- activations

    def read(self, layer: int, start: int = 0, stop: int | None = None, *, raw: bool = False) -> np.ndarray:
        """Activations ``X[start:stop]`` of ``layer``, shape (stop-start, d_mlp).

        float32 unless ``raw`` (then the on-disk dtype: float32, float16 or ml_dtypes.bfloat16).
        Only the chunks overlapping the range are read.
        """
        self._check_layer(layer)
        stop = self.n_tokens if stop is None else stop
        if not 0 <= start <= stop <= self.n_tokens:
            raise ValueError(f"token range [{start}, {stop}) is outside the store's [0, {self.n_tokens})")
        out = np.empty((stop - start, self.d_mlp), DTYPES[self.dtype] if raw else np.float32)
        first = max(bisect.bisect_right(self._chunk_starts, start) - 1, 0)
        for index in range(first, len(self._chunk_starts)):
            chunk_start, chunk_stop = self.manifest["chunks"][index]
            if chunk_start >= stop:
                break
            lo, hi = max(start, chunk_start), min(stop, chunk_stop)
            chunk = self._load_chunk(layer, index)
            out[lo - start : hi - start] = chunk[lo - chunk_start : hi - chunk_start]
        return out

    def iter_chunks(self, layer: int, raw: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, X[start:stop])`` for each chunk of ``layer``, one chunk in memory at a time.

        float32 arrays unless ``raw``; raw arrays are read-only memory maps of the chunk files.
        """
        self._check_layer(layer)
        for index, (start, _) in enumerate(self.manifest["chunks"]):
            chunk = self._load_chunk(layer, index)
            yield int(start), (chunk if raw else chunk.astype(np.float32))

    def layer_array(self, layer: int) -> np.ndarray:
        """All activations of ``layer`` as one float32 array (n_tokens, d_mlp); loads everything."""
        return self.read(layer)

    def chunk_path(self, layer: int, index: int) -> Path:
        """The .npy file of chunk ``index`` of ``layer`` (for tools that read it themselves)."""
        return self.path / _layer_dir(layer) / _chunk_name(index)

    def locate(self, layer: int, start: int, stop: int) -> tuple[Path, int] | None:
        """Where the rows ``[start, stop)`` of ``layer`` lie contiguously on disk: ``(chunk file, byte
        offset of its data)`` when they are exactly one chunk, else None (a streamed fit then maps the
        chunk instead of copying it; :mod:`jsnmf.io.sources`)."""
        index = self._chunk_index.get((int(start), int(stop)))
        if index is None:
            return None
        path = self.chunk_path(layer, index)
        self._verify(path)
        try:
            with open(path, "rb") as f:  # the .npy header: the data follows it
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable chunk file ({err})") from None
        if tuple(shape) != (stop - start, self.d_mlp) or fortran or dtype != DISK_DTYPES[self.dtype]:
            raise ValueError(f"{path}: expected a C-ordered {DISK_DTYPES[self.dtype]} array of shape "
                             f"{(stop - start, self.d_mlp)}, found {dtype} {shape}")
        if offset + (stop - start) * self.d_mlp * dtype.itemsize > size:
            raise ValueError(f"{path}: truncated chunk file ({size} bytes, its header needs "
                             f"{offset + (stop - start) * self.d_mlp * dtype.itemsize})")
        return path, offset

    @functools.cached_property
    def _chunk_index(self) -> dict[tuple[int, int], int]:
        return {(int(a), int(b)): i for i, (a, b) in enumerate(self.manifest["chunks"])}

    def _load_chunk(self, layer: int, index: int) -> np.ndarray:
        start, stop = self.manifest["chunks"][index]
        file = self.chunk_path(layer, index)
        self._verify(file)
        array = _load_npy(file, mmap_mode="r")
        if array.shape != (stop - start, self.d_mlp) or array.dtype != DISK_DTYPES[self.dtype]:
            raise ValueError(
                f"{file}: expected {DISK_DTYPES[self.dtype]} of shape {(stop - start, self.d_mlp)}, "
                f"found {array.dtype} of shape {array.shape}"
            )
        return array.view(DTYPES[self.dtype]) if self.dtype == "bfloat16" else array

    def _check_layer(self, layer: int) -> None:
        if layer not in self.manifest["layers"]:
            raise ValueError(f"layer {layer} is not in the store {self.path} (layers {self.layers})")

    def _check_files(self) -> None:
        for index in range(len(self.manifest["chunks"])):
            paths = [self.chunk_path(layer, index) for layer in self.layers]
            paths.append(self.path / TOKENS_DIR / _chunk_name(index))
            for p in paths:
                if not p.is_file():
                    raise ValueError(f"{self.path}: damaged store, committed chunk file {p} is missing")
                self._check_inside(p)

    def _check_inside(self, file: Path) -> None:
        """Refuse a chunk file that is a link leading out of the store (it would read another store's data)."""
        if file.is_symlink() and not file.resolve().is_relative_to(self.path):
            raise ValueError(f"{file}: a symbolic link to {file.resolve()}, outside the store {self.path}; "
                             "chunk files must lie inside the store")

    def _verify(self, file: Path) -> None:
        """Check ``file`` against the manifest's sha256 (once per process and file version; see the module doc)."""
        self._check_inside(file)
        expected = self.manifest.get("checksums", {}).get(file.relative_to(self.path).as_posix())
        if expected is not None:
            verify_file(file, expected)

    # -- token metadata

    @functools.cached_property
    def _token_table(self) -> np.ndarray:
        parts = []
        for index, (start, stop) in enumerate(self.manifest["chunks"]):
            file = self.path / TOKENS_DIR / _chunk_name(index)
            self._verify(file)
            part = _load_npy(file)
            if part.shape != (stop - start, len(TOKEN_COLUMNS)) or part.dtype != np.int32:
                expected = (stop - start, len(TOKEN_COLUMNS))
                raise ValueError(f"{file}: expected int32 of shape {expected}, found {part.dtype} {part.shape}")
            parts.append(part)
        table = np.concatenate(parts) if parts else np.zeros((0, len(TOKEN_COLUMNS)), np.int32)
        table.setflags(write=False)
        return table

    @property
    def token_ids(self) -> np.ndarray:
        """Token id of each row, int32 (n_tokens,)."""
        return self._token_table[:, 0]

    @property
    def doc_index(self) -> np.ndarray:
        """Index (into ``documents``) of the document each row comes from, int32 (n_tokens,)."""
        return self._token_table[:, 1]

    @property
    def positions(self) -> np.ndarray:
        """Position of each row in its tokenized sequence (BOS, if any, is position 0), int32."""
        return self._token_table[:, 2]

    @property
    def label_index(self) -> np.ndarray:
        """Index into ``labels`` of each row's document label, -1 when it has none, int32."""
        return self._token_table[:, 3]

    @functools.cached_property
    def _document_records(self) -> list[dict]:
        file = self.path / DOCUMENTS
        with open(file, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    @property
    def documents(self) -> list[str]:
        """The texts of the corpus the store was extracted from, in order."""
        return [r["text"] for r in self._document_records]

    @property
    def document_labels(self) -> list[str | None]:
        """The label of each document (None where it has none)."""
        return [r.get("label") for r in self._document_records]


# ---------------------------------------------------------------- writer


def _document_record(document) -> dict:
    if isinstance(document, str):
        return {"text": document, "label": None}
    return {"text": document.text, "label": document.label}


def _is_leftover_of_killed_create(path: Path) -> bool:
    """True if ``path`` is empty or holds only what ``create`` writes before its manifest (a create
    killed early)."""
    for entry in path.iterdir():
        name = entry.name
        known = name in (DOCUMENTS, TOKENS_DIR, LOCK) or name.startswith("layer_") or name.endswith(TMP_SUFFIX)
        if not known:
            return False
    return not (path / MANIFEST).exists()


def remove_store(path: str | os.PathLike) -> None:
    """Delete the store at ``path`` (only the files a store consists of; raise if it is not one)."""
    path = Path(path).expanduser().resolve()
    _read_manifest(path)  # refuse to delete something that is not a store
    lock = FolderLock(path, LOCK, busy="another process is writing this store")
    try:
        (path / MANIFEST).unlink()  # first: from here on the directory is no longer a store
        _remove_store_files(path)
    finally:
        lock.release()


def _remove_store_files(path: Path) -> None:
    for entry in path.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and (entry.name == TOKENS_DIR or entry.name.startswith("layer_")):
            shutil.rmtree(entry)
        elif entry.name in (DOCUMENTS, MANIFEST) or entry.name.endswith(TMP_SUFFIX):
            entry.unlink()


class StoreWriter:
    """Appends tokens to a store, committing whole chunks of ``chunk_tokens`` tokens atomically."""

    def __init__(self, path: Path, manifest: dict, lock: FolderLock):
        self.path = path
        self.manifest = manifest  # owned by the commit thread while it runs; see _write_chunk
        self._lock = lock
        self._layers = list(manifest["layers"])
        self._acts: dict[int, list[np.ndarray]] = {layer: [] for layer in self._layers}
        self._tokens: list[np.ndarray] = []
        self._n_buffered = 0
        self._next_chunk = len(manifest["chunks"])
        self._next_start = int(manifest["n_tokens"])
        self._committer = _CommitThread(self._write_chunk)

    @classmethod
    def _create(cls, path, *, layers, d_mlp, dtype, chunk_tokens, meta, documents, labels) -> "StoreWriter":
        layers = [int(layer) for layer in layers]
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(f"layers must be distinct non-negative integers, got {layers}")
        check_dtype(dtype)
        if int(d_mlp) <= 0 or int(chunk_tokens) <= 0:
            raise ValueError(f"d_mlp and chunk_tokens must be positive, got {d_mlp} and {chunk_tokens}")
        clash = _RESERVED_KEYS & set(meta)
        if clash:
            raise ValueError(f"meta may not set the store's own manifest keys {sorted(clash)}")
        if path.exists() and not _is_leftover_of_killed_create(path):
            raise ValueError(f"{path}: directory is not empty; refusing to create a store in it")
        path.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(path, LOCK, busy="another process is writing this store")
        try:
            if not _is_leftover_of_killed_create(path):  # again, now that no one else can be creating it
                raise ValueError(f"{path}: directory is not empty; refusing to create a store in it")
            _remove_store_files(path)
            records = [_document_record(d) for d in documents]
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
            atomic_write(path / DOCUMENTS, lambda f: f.write(data))
            for layer in layers:
                (path / _layer_dir(layer)).mkdir(exist_ok=True)
            (path / TOKENS_DIR).mkdir(exist_ok=True)
            created = _now()
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "jsnmf_version": jsnmf.__version__,
                "created": created,
                "updated": created,
                "layers": layers,
                "hook_names": [hook_name(layer) for layer in layers],
                "dtype": dtype,
                "d_mlp": int(d_mlp),
                "chunk_tokens": int(chunk_tokens),
                "token_columns": list(TOKEN_COLUMNS),
                "labels": list(labels),
                "n_documents": len(records),
                **dict(meta),
                "complete": False,
                "n_tokens": 0,
                "chunks": [],
            }
            _fsync_dir(path)
            atomic_write_json(path / MANIFEST, manifest)  # last: its presence makes the directory a store
            _fsync_dir(path)
        except BaseException:
            lock.release()
            raise
        return cls(path, manifest, lock)

    @classmethod
    def _resume(cls, path: Path) -> "StoreWriter":
        manifest = _read_manifest(path)
        if manifest["complete"]:
            raise ValueError(f"{path}: the store is complete; nothing to resume")
        lock = FolderLock(path, LOCK, busy="another process is writing this store")
        writer = cls(path, manifest, lock)
        writer._drop_uncommitted_files()
        return writer

    # -- state

    @property
    def n_committed(self) -> int:
        """Tokens in committed chunks (what a resumed run would start after). Commits run in a
        background thread, so this may lag ``n_tokens``; ``flush()`` waits for them."""
        return int(self.manifest["n_tokens"])

    @property
    def n_tokens(self) -> int:
        """Tokens appended so far, committed, being committed or buffered."""
        return self._next_start + self._n_buffered

    @property
    def chunk_tokens(self) -> int:
        return int(self.manifest["chunk_tokens"])

    # -- writing

    def append(
        self,
        layer_acts: Mapping[int, np.ndarray],
        token_ids: np.ndarray,
        doc_index: np.ndarray,
        positions: np.ndarray,
        label_index: np.ndarray,
    ) -> None:
        """Append tokens: ``layer_acts[L]`` (n, d_mlp) for every store layer, and n-vectors of metadata.

        Activations are converted to the store dtype here; a value that is not finite after the
        conversion (e.g. beyond float16's range) raises ValueError. Each time ``chunk_tokens``
        tokens are buffered, they are handed to a background thread that writes and commits the
        chunk (at most one more chunk waits for it, so memory stays bounded); an error there is
        raised by the next ``append``, ``flush`` or ``close``.
        """
        n = len(token_ids)
        columns = [np.asarray(c) for c in (token_ids, doc_index, positions, label_index)]
        for name, column in zip(TOKEN_COLUMNS, columns):
            if column.shape != (n,):
                raise ValueError(f"{name} has shape {column.shape}, expected ({n},)")
        if set(layer_acts) != set(self._layers):
            raise ValueError(f"layer_acts has layers {sorted(layer_acts)}, the store has {self._layers}")
        converted = {layer: self._to_disk(layer, layer_acts[layer], n) for layer in self._layers}
        self._committer.raise_error()
        if n == 0:
            return
        for layer, array in converted.items():
            self._acts[layer].append(array)
        self._tokens.append(np.stack(columns, axis=1).astype(np.int32))
        self._n_buffered += n
        while self._n_buffered >= self.chunk_tokens:
            self._commit(self.chunk_tokens)

    def flush(self) -> None:
        """Wait until every full chunk appended so far is committed (the buffered tail is not)."""
        self._committer.wait()

    def close(self, meta: Mapping | None = None) -> ActivationStore:
        """Commit the buffered tail, mark the store complete (merging ``meta`` into the manifest), unlock."""
        try:
            clash = _RESERVED_KEYS & set(meta or {})
            if clash:
                raise ValueError(f"meta may not set the store's own manifest keys {sorted(clash)}")
            if self._n_buffered:
                self._commit(self._n_buffered)
            self._committer.wait()
            if self.n_committed == 0:
                raise ValueError(f"{self.path}: no tokens were written; an empty store is not useful")
            self.manifest.update(meta or {})
            self.manifest["complete"] = True
            self.manifest["updated"] = _now()
            atomic_write_json(self.path / MANIFEST, self.manifest)
            _fsync_dir(self.path)
        finally:
            self.abort()
        return ActivationStore.open(self.path)

    def abort(self) -> None:
        """Stop writing without completing the store: chunks already handed over are still committed,
        buffered tokens are dropped (a resumed run recomputes them); the lock is released."""
        try:
            self._committer.stop()
        finally:
            self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def _to_disk(self, layer: int, array: np.ndarray, n: int) -> np.ndarray:
        array = np.asarray(array)
        d_mlp = self.manifest["d_mlp"]
        if array.shape != (n, d_mlp):
            raise ValueError(f"activations of layer {layer} have shape {array.shape}, expected ({n}, {d_mlp})")
        dtype = self.manifest["dtype"]
        with np.errstate(over="ignore"):  # overflow is reported below, by layer
            converted = array.astype(DTYPES[dtype], copy=False)
        if not _all_finite(converted):
            source_finite = np.isfinite(array).all()
            why = f"overflow {dtype} (max |x| = {np.abs(array).max():.4g})" if source_finite else "are not finite"
            raise ValueError(f"activations of layer {layer} {why}; store dtype {dtype!r}")
        return converted.view(np.uint16) if dtype == "bfloat16" else converted

    def _commit(self, n: int) -> None:
        """Hand the first ``n`` buffered tokens to the commit thread as the next chunk."""
        blocks = {}
        for layer in self._layers:
            blocks[layer], self._acts[layer] = _split_buffer(self._acts[layer], n)
        tokens, self._tokens = _split_buffer(self._tokens, n)
        index, start = self._next_chunk, self._next_start
        self._next_chunk += 1
        self._next_start += n
        self._n_buffered -= n
        self._committer.submit((index, start, n, blocks, tokens))

    def _write_chunk(self, index: int, start: int, n: int, blocks: dict, tokens: list) -> None:
        """(Commit thread) Write chunk ``index``'s files, then list it in the manifest: the commit point."""
        checksums = dict(self.manifest.get("checksums", {}))
        for directory, rows in [*((_layer_dir(layer), blocks[layer]) for layer in self._layers), (TOKENS_DIR, tokens)]:
            name = f"{directory}/{_chunk_name(index)}"
            checksums[name] = _atomic_save_npy(self.path / name, rows)
        for directory in [*(_layer_dir(layer) for layer in self._layers), TOKENS_DIR]:
            _fsync_dir(self.path / directory)
        manifest = {**self.manifest, "chunks": [*self.manifest["chunks"], [start, start + n]],
                    "n_tokens": start + n, "updated": _now(), "checksums": checksums}
        atomic_write_json(self.path / MANIFEST, manifest)
        self.manifest = manifest  # one assignment: readers of n_committed never see half an update

    def _drop_uncommitted_files(self) -> None:
        """Delete temporaries and chunk files past the committed ones (a chunk interrupted mid-write)."""
        n_chunks = len(self.manifest["chunks"])
        committed = {_chunk_name(i) for i in range(n_chunks)}
        for directory in [*(_layer_dir(layer) for layer in self._layers), TOKENS_DIR]:
            for entry in (self.path / directory).iterdir():
                if entry.name not in committed:
                    entry.unlink()
        for entry in self.path.iterdir():
            if entry.name.endswith(TMP_SUFFIX):
                entry.unlink()
        missing = [
            p for i in range(n_chunks)
            for p in [*(self.path / _layer_dir(layer) / _chunk_name(i) for layer in self._layers),
                      self.path / TOKENS_DIR / _chunk_name(i)]
            if not p.is_file()
        ]
        if missing:
            raise ValueError(f"{self.path}: damaged store, committed chunk file {missing[0]} is missing")


class _CommitThread:
    """Runs chunk commits one at a time, in order, in a background thread.

    The file writes and fsyncs release the GIL, so they overlap the caller's next batch. At most
    one chunk waits while another is written (``submit`` blocks beyond that). The first error
    stops further commits and is re-raised in the caller by ``raise_error``/``wait``.
    """

    def __init__(self, write):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="jsnmf-store-commit", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._write(*job)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                self._error = err
            finally:
                self._queue.task_done()

    def submit(self, job) -> None:
        self.raise_error()
        if not self._thread.is_alive():
            raise RuntimeError("the store writer is closed")
        self._queue.put(job)

    def wait(self) -> None:
        """Block until every submitted commit is done; re-raise a commit error."""
        self._queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Finish the submitted commits and end the thread (idempotent; errors are not re-raised)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


# Exponent bits of the half-precision formats: all ones means inf or nan.
_HALF_EXPONENT_BITS = {np.dtype(np.float16): 0x7C00, np.dtype(ml_dtypes.bfloat16): 0x7F80}


def _all_finite(array: np.ndarray) -> bool:
    """np.isfinite(array).all(), computed on the bits for half precision (several times faster there)."""
    bits = _HALF_EXPONENT_BITS.get(array.dtype)
    if bits is None:
        return bool(np.isfinite(array).all())
    return not bool(((array.view(np.uint16) & bits) == bits).any())


def _split_buffer(blocks: list[np.ndarray], n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split a list of row blocks into the blocks holding its first ``n`` rows and the rest (views, no copies)."""
    head, rest, remaining = [], list(blocks), n
    while remaining:
        block = rest.pop(0)
        if len(block) > remaining:
            rest.insert(0, block[remaining:])
            block = block[:remaining]
        head.append(block)
        remaining -= len(block)
    return head, rest

