"""The store's on-disk format: names, the manifest check, chunk files written atomically and verified."""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jsnmf.dtypes import check_dtype as check_any_dtype
from jsnmf.io.files import atomic_write
from jsnmf.io.manifest import INTEGER, corrupt, read_manifest
from jsnmf.layout import layer_dir_name


FORMAT_NAME = "jsnmf.activation_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
TOKENS_DIR = "tokens"
# Chunks committed by the processes of a multi-process extraction, one record each, until the
# coordinating process lists them in the manifest (jsnmf.store.writer.ChunkWriter).
COMMITS_DIR = "commits"
LOCK = ".lock"
TOKEN_COLUMNS = ("token_id", "doc_index", "position", "label_index")

# Keys the store itself owns in the manifest; run metadata (``meta``) may not override them.
RESERVED_KEYS = {
    "format", "format_version", "jsnmf_version", "created", "updated", "layers", "hook_names", "dtype",
    "d_mlp", "chunk_tokens", "chunks", "n_tokens", "complete", "labels", "n_documents", "token_columns",
    "checksums", "hook_site",
}
REQUIRED_KEYS = RESERVED_KEYS - {"jsnmf_version", "created", "updated", "n_documents", "token_columns", "checksums",
                                  "hook_site"}
# JSON types of the manifest's keys (io.manifest checks them before anything reads them).
_TYPES = {"layers": list, "dtype": str, "d_mlp": INTEGER, "chunk_tokens": INTEGER, "chunks": list,
          "n_tokens": INTEGER, "complete": bool, "labels": list, "checksums": dict, "hook_site": str}


def check_dtype(dtype: str) -> str:
    """Return ``dtype`` if the store supports it, else raise ValueError listing the choices."""
    return check_any_dtype(dtype, "store dtype")


layer_dir = layer_dir_name


def chunk_name(index: int) -> str:
    return f"chunk_{index:06d}.npy"


def commit_record_name(index: int) -> str:
    return f"chunk_{index:06d}.json"


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- atomic files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_npy_atomic(path: Path, blocks: Sequence[np.ndarray]) -> str:
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


def read_store_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"{path}: not a jsnmf activation store (no such directory)")
    manifest = read_manifest(path / MANIFEST, format=FORMAT_NAME, version=FORMAT_VERSION,
                             what="jsnmf activation store", required=REQUIRED_KEYS, types=_TYPES)
    check_chunks(manifest, path)
    return manifest


def check_chunks(manifest: dict, path: Path) -> None:
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


def load_npy(file: Path, mmap_mode: str | None = None) -> np.ndarray:
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


