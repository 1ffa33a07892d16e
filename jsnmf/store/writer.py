"""Writing an activation store: whole chunks committed atomically, in the background (:class:`StoreWriter`)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

import jsnmf
from jsnmf.io.files import FolderLock
from jsnmf.dtypes import DTYPES
from jsnmf.io.files import TMP_SUFFIX, atomic_write, atomic_write_json
from jsnmf.layout import hook_name
from jsnmf.io.manifest import corrupt
from jsnmf.store.format import (COMMITS_DIR, DOCUMENTS, FORMAT_NAME, FORMAT_VERSION, LOCK, MANIFEST, TOKENS_DIR,
                                TOKEN_COLUMNS, RESERVED_KEYS, save_npy_atomic, chunk_name, commit_record_name,
                                fsync_dir, layer_dir, now_utc, read_store_manifest, check_dtype)
from jsnmf.store.reader import ActivationStore


def _document_record(document) -> dict:
    if isinstance(document, str):
        return {"text": document, "label": None}
    return {"text": document.text, "label": document.label}


def _is_leftover_of_killed_create(path: Path) -> bool:
    """True if ``path`` is empty or holds only what ``create`` writes before its manifest (a create
    killed early)."""
    for entry in path.iterdir():
        name = entry.name
        known = name in (DOCUMENTS, TOKENS_DIR, COMMITS_DIR, LOCK) or name.startswith("layer_") or name.endswith(TMP_SUFFIX)
        if not known:
            return False
    return not (path / MANIFEST).exists()


def remove_store(path: str | os.PathLike) -> None:
    """Delete the store at ``path`` (only the files a store consists of; raise if it is not one)."""
    path = Path(path).expanduser().resolve()
    read_store_manifest(path)  # refuse to delete something that is not a store
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
        if entry.is_dir() and (entry.name in (TOKENS_DIR, COMMITS_DIR) or entry.name.startswith("layer_")):
            shutil.rmtree(entry)
        elif entry.name in (DOCUMENTS, MANIFEST) or entry.name.endswith(TMP_SUFFIX):
            entry.unlink()


class StoreWriter:
    """Appends tokens to a store, committing whole chunks of ``chunk_tokens`` tokens atomically."""

    def __init__(self, path: Path, manifest: dict, lock: FolderLock | None):
        self.path = path
        self.manifest = manifest  # owned by the commit thread while it runs; see _write_chunk
        self._lock = lock  # None: another process of the same extraction holds it (ChunkWriter)
        self._layers = list(manifest["layers"])
        self._acts: dict[int, list[np.ndarray]] = {layer: [] for layer in self._layers}
        self._tokens: list[np.ndarray] = []
        self._n_buffered = 0
        self._next_chunk = len(manifest["chunks"])
        self._next_start = int(manifest["n_tokens"])
        self._committer = _CommitThread(self._write_chunk)

    @classmethod
    def create(cls, path, *, layers, d_mlp, dtype, chunk_tokens, meta, documents, labels,
               site="hook_post") -> "StoreWriter":
        layers = [int(layer) for layer in layers]
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(f"layers must be distinct non-negative integers, got {layers}")
        check_dtype(dtype)
        hook_name(0, site)  # a known site, or ValueError
        if int(d_mlp) <= 0 or int(chunk_tokens) <= 0:
            raise ValueError(f"d_mlp and chunk_tokens must be positive, got {d_mlp} and {chunk_tokens}")
        clash = RESERVED_KEYS & set(meta)
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
                (path / layer_dir(layer)).mkdir(exist_ok=True)
            (path / TOKENS_DIR).mkdir(exist_ok=True)
            created = now_utc()
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "jsnmf_version": jsnmf.__version__,
                "created": created,
                "updated": created,
                "layers": layers,
                "hook_names": [hook_name(layer, site) for layer in layers],
                "hook_site": site,
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
            fsync_dir(path)
            atomic_write_json(path / MANIFEST, manifest)  # last: its presence makes the directory a store
            fsync_dir(path)
        except BaseException:
            lock.release()
            raise
        return cls(path, manifest, lock)

    @classmethod
    def resume(cls, path: Path) -> "StoreWriter":
        manifest = read_store_manifest(path)
        if manifest["complete"]:
            raise ValueError(f"{path}: the store is complete; nothing to resume")
        lock = FolderLock(path, LOCK, busy="another process is writing this store")
        writer = cls(path, manifest, lock)
        try:
            writer._drop_uncommitted_files()
            writer.adopt_records()
        except BaseException:
            writer.abort()
            raise
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
            clash = RESERVED_KEYS & set(meta or {})
            if clash:
                raise ValueError(f"meta may not set the store's own manifest keys {sorted(clash)}")
            if self._n_buffered:
                self._commit(self._n_buffered)
            self._committer.wait()
            if self.n_committed == 0:
                raise ValueError(f"{self.path}: no tokens were written; an empty store is not useful")
            self.manifest.update(meta or {})
            self.manifest["complete"] = True
            self.manifest["updated"] = now_utc()
            atomic_write_json(self.path / MANIFEST, self.manifest)
            fsync_dir(self.path)
            commits = self.path / COMMITS_DIR
            if commits.is_dir() and not any(commits.iterdir()):  # every record adopted
                commits.rmdir()
        finally:
            self.abort()
        return ActivationStore.open(self.path)

    def abort(self) -> None:
        """Stop writing without completing the store: chunks already handed over are still committed,
        buffered tokens are dropped (a resumed run recomputes them); the lock is released."""
        try:
            self._committer.stop()
        finally:
            if self._lock is not None:
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
        checksums = {**self.manifest.get("checksums", {}), **self._write_chunk_files(index, blocks, tokens)}
        manifest = {**self.manifest, "chunks": [*self.manifest["chunks"], [start, start + n]],
                    "n_tokens": start + n, "updated": now_utc(), "checksums": checksums}
        atomic_write_json(self.path / MANIFEST, manifest)
        self.manifest = manifest  # one assignment: readers of n_committed never see half an update

    def _write_chunk_files(self, index: int, blocks: dict, tokens: list) -> dict[str, str]:
        """Write and fsync chunk ``index``'s files (every layer and the tokens); return their sha256 by name."""
        checksums = {}
        for directory, rows in [*((layer_dir(layer), blocks[layer]) for layer in self._layers), (TOKENS_DIR, tokens)]:
            name = f"{directory}/{chunk_name(index)}"
            checksums[name] = save_npy_atomic(self.path / name, rows)
        for directory in [*(layer_dir(layer) for layer in self._layers), TOKENS_DIR]:
            fsync_dir(self.path / directory)
        return checksums

    def adopt_records(self) -> None:
        """List in the manifest the chunks other processes committed by record (:class:`ChunkWriter`) that
        continue its chunks without a gap, then delete their records. A kill between the two steps
        leaves records of listed chunks, which are ignored."""
        self._committer.wait()
        records = read_commit_records(self.path, self.manifest)
        listed = len(self.manifest["chunks"])
        chunks, checksums, index = list(self.manifest["chunks"]), dict(self.manifest.get("checksums", {})), listed
        while index in records:
            record = records[index]
            chunks.append([record["start"], record["stop"]])
            checksums.update(record["checksums"])
            index += 1
        if index > listed:
            manifest = {**self.manifest, "chunks": chunks, "n_tokens": chunks[-1][1], "updated": now_utc(),
                        "checksums": checksums}
            atomic_write_json(self.path / MANIFEST, manifest)
            self.manifest = manifest
            self._next_chunk, self._next_start = index, chunks[-1][1]
        for stale in [i for i in records if i < index]:
            (self.path / COMMITS_DIR / commit_record_name(stale)).unlink()

    @property
    def has_records(self) -> bool:
        """Whether chunks committed by record wait beyond the manifest's (a multi-process extraction's)."""
        listed = len(self.manifest["chunks"])
        return any(index >= listed for index in read_commit_records(self.path, self.manifest))

    def _drop_uncommitted_files(self) -> None:
        """Delete temporaries and chunk files past the committed ones (a chunk interrupted mid-write)."""
        n_chunks = len(self.manifest["chunks"])
        indices = sorted({*range(n_chunks), *read_commit_records(self.path, self.manifest)})
        committed = {chunk_name(i) for i in indices}
        for directory in [*(layer_dir(layer) for layer in self._layers), TOKENS_DIR]:
            for entry in (self.path / directory).iterdir():
                if entry.name not in committed:
                    entry.unlink()
        for folder in (self.path, self.path / COMMITS_DIR):
            for entry in (folder.iterdir() if folder.is_dir() else ()):
                if entry.name.endswith(TMP_SUFFIX):
                    entry.unlink()
        missing = [
            p for i in indices
            for p in [*(self.path / layer_dir(layer) / chunk_name(i) for layer in self._layers),
                      self.path / TOKENS_DIR / chunk_name(i)]
            if not p.is_file()
        ]
        if missing:
            raise ValueError(f"{self.path}: damaged store, committed chunk file {missing[0]} is missing")


class ChunkWriter(StoreWriter):
    """Writes chunks ``first_chunk, first_chunk + 1, ...`` of a store that several processes write at once.

    Each chunk is committed by a record ``commits/chunk_{i:06d}.json`` (its token bounds and the sha256
    of its files), written atomically after its files, instead of by the manifest: the manifest has one
    writer, the coordinating process, which lists the recorded chunks when every process is done
    (:meth:`StoreWriter.adopt_records`). Chunk ``i`` holds tokens ``[i·chunk_tokens, (i+1)·chunk_tokens)``,
    as in a store one process writes, so the files are the same whoever writes them.
    The coordinating process holds the store's lock; this writer takes none.
    """

    def __init__(self, path: Path, manifest: dict, first_chunk: int):
        super().__init__(path, manifest, lock=None)
        self._next_chunk = int(first_chunk)
        self._next_start = int(first_chunk) * self.chunk_tokens
        self._n_tokens_expected = int(manifest["n_tokens_expected"])
        (path / COMMITS_DIR).mkdir(exist_ok=True)

    def _write_chunk(self, index: int, start: int, n: int, blocks: dict, tokens: list) -> None:
        """(Commit thread) Write chunk ``index``'s files, then its record: the commit point."""
        checksums = self._write_chunk_files(index, blocks, tokens)
        record = {"chunk": index, "start": start, "stop": start + n, "checksums": checksums}
        atomic_write_json(self.path / COMMITS_DIR / commit_record_name(index), record, private=True)
        fsync_dir(self.path / COMMITS_DIR)

    def finish(self) -> None:
        """Commit what is buffered (only the store's last chunk may be short) and wait for every commit."""
        try:
            if self._n_buffered:
                if self.n_tokens != self._n_tokens_expected:
                    raise RuntimeError(f"{self.path}: a share of the extraction ended at token {self.n_tokens}, "
                                       f"inside chunk {self._next_chunk} (a bug: shares end at chunk bounds)")
                self._commit(self._n_buffered)
            self._committer.wait()
        finally:
            self.abort()

    def close(self, meta: Mapping | None = None) -> ActivationStore:
        raise RuntimeError("a ChunkWriter does not complete the store: call finish(); the coordinating "
                           "process lists the chunks and completes it")


def read_commit_records(path: Path, manifest: dict) -> dict[int, dict]:
    """The commit records in ``path/commits/``, by chunk index (those of chunks the manifest lists too
    are left over from a kill during :meth:`StoreWriter.adopt_records`).

    Each is checked against the store's chunk layout (a record is written whole, atomically, so a
    record that does not parse was damaged afterwards: it is refused, naming the file)."""
    folder = path / COMMITS_DIR
    if not folder.is_dir():
        return {}
    chunk_tokens = int(manifest["chunk_tokens"])
    expected = manifest.get("n_tokens_expected")
    records = {}
    for file in sorted(folder.glob("chunk_*.json")):
        try:
            record = json.loads(file.read_text())
            index, start, stop = (record[key] for key in ("chunk", "start", "stop"))
            valid = (all(isinstance(v, int) and not isinstance(v, bool) for v in (index, start, stop))
                     and isinstance(record["checksums"], dict) and file.name == commit_record_name(index)
                     and start == index * chunk_tokens and start < stop <= start + chunk_tokens
                     and (stop == start + chunk_tokens or stop == expected))
        except (OSError, ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            raise corrupt(path, "a chunk's commit record is unreadable or does not match the store's chunks",
                          f"{COMMITS_DIR}/{file.name}")
        records[index] = record
    return records


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

