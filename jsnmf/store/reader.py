"""Read access to an activation store (:class:`ActivationStore`)."""

from __future__ import annotations

import bisect
import functools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jsnmf.dtypes import DISK_DTYPES, DTYPES
from jsnmf.layout import hook_name
from jsnmf.store.format import (DOCUMENTS, TOKENS_DIR, TOKEN_COLUMNS, chunk_name, layer_dir, load_npy,
                                read_store_manifest, verify_file)

if TYPE_CHECKING:
    from jsnmf.store.writer import StoreWriter


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
        manifest = read_store_manifest(path)
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
        site: str = "hook_post",
    ) -> "StoreWriter":
        """Create a new, empty store at ``path`` and return its writer.

        ``documents``: texts (str) or objects with ``.text``/``.label`` (e.g. ``corpus.Document``),
        saved to ``documents.jsonl``. ``labels``: the label list that ``label_index`` refers to.
        ``meta``: JSON-serialisable run metadata merged into the manifest (model, corpus, ...).
        ``site``: the hook the activations are taken at (``jsnmf.layout.HOOK_SITES``); ``d_mlp`` is its width.
        """
        from jsnmf.store.writer import StoreWriter

        return StoreWriter.create(
            Path(path).expanduser().resolve(), layers=layers, d_mlp=d_mlp, dtype=dtype,
            chunk_tokens=chunk_tokens, meta=meta or {}, documents=documents or [], labels=labels or [], site=site,
        )

    @classmethod
    def resume(cls, path: str | os.PathLike) -> "StoreWriter":
        """Reopen an incomplete store for writing after its committed chunks (drops uncommitted files)."""
        from jsnmf.store.writer import StoreWriter

        return StoreWriter.resume(Path(path).expanduser().resolve())

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
    def hook_site(self) -> str:
        """Where the activations were taken: ``hook_post`` (the MLP activation; stores without the
        entry), ``hook_mlp_out`` or ``hook_resid_post``. ``d_mlp`` is that site's width."""
        return self.manifest.get("hook_site", "hook_post")

    @property
    def hook_names(self) -> list[str]:
        return [hook_name(layer, self.hook_site) for layer in self.layers]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer directory recorded at extraction time (a path relative to the run folder,
        the store's parent, is resolved against it), or None."""
        tokenizer = self.manifest.get("tokenizer")
        return _resolved(tokenizer.get("path") if isinstance(tokenizer, dict) else None, self.path.parent)

    @property
    def model_path(self) -> str | None:
        """The model recorded at extraction time: its path (resolved against the run folder when
        recorded relative to it) when that exists, else what the user named (a hub id, or the path as
        given); None when the store records no model."""
        model = self.manifest.get("model")
        if not isinstance(model, dict):
            return model if isinstance(model, str) else None
        path = _resolved(model.get("path"), self.path.parent)
        if path and Path(path).exists():
            return path
        given = model.get("path_or_id")
        if given:
            candidate = _resolved(given, self.path.parent)
            return candidate if Path(candidate).exists() else given
        return path

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
        return self.path / layer_dir(layer) / chunk_name(index)

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
        array = load_npy(file, mmap_mode="r")
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
            paths.append(self.path / TOKENS_DIR / chunk_name(index))
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
            file = self.path / TOKENS_DIR / chunk_name(index)
            self._verify(file)
            part = load_npy(file)
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


def _resolved(recorded: str | None, run_dir: Path) -> str | None:
    """A path recorded in the manifest: absolute as it is, relative against the run folder."""
    if not recorded:
        return recorded
    path = Path(recorded)
    return str(path) if path.is_absolute() else str(run_dir / path)
