"""Corpus readers: text files in, a list of labelled documents out.

Accepted formats (detected from the extension, then the content):

- plain text (``.txt`` or any other extension whose content is not JSON): one document per
  line; blank lines are skipped; the line is kept as is except for its line ending;
- JSON Lines (``.jsonl``/``.ndjson``): one object per line with a string ``"text"`` (or
  ``"prompt"``) and an optional ``"label"``; blank lines are skipped;
- JSON (``.json``) holding either a list of records ``{"prompt": str, "label": str}`` (the
  paper's dataset format; ``"text"`` is accepted for ``"prompt"``, the label is optional,
  a bare string is a document without label) or an object mapping label -> list of strings.

Labels may be strings or integers (integers become their decimal string); ``null`` means
no label. A bad file raises ``ValueError`` naming the file and the line (text, JSONL) or the
record (JSON) at fault; nothing is silently dropped except blank lines of line-based files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

__all__ = ["Document", "Corpus", "read_corpus"]

_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_JSON_SUFFIXES = {".json"}
_TEXT_KEYS = ("text", "prompt")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: its text and its label (``None`` when the corpus has none for it)."""

    text: str
    label: str | None = None


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The documents of one corpus file, in file order."""

    path: str  # absolute path of the file read
    documents: list[Document]
    sha256: str  # of the file bytes
    format: str  # "text", "jsonl", "json-records" or "json-label-map"

    @property
    def labels(self) -> list[str]:
        """Sorted unique labels of the documents ([] when no document has a label)."""
        return sorted({d.label for d in self.documents if d.label is not None})

    @property
    def texts(self) -> list[str]:
        return [d.text for d in self.documents]

    def __len__(self) -> int:
        return len(self.documents)


def read_corpus(path: str | os.PathLike) -> Corpus:
    """Read a corpus file (plain text, JSONL or JSON; see the module docstring)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    raw = path.read_bytes()
    sha256 = hashlib.sha256(raw).hexdigest()
    text = _decode_utf8(raw, path)
    if not text.strip():
        raise ValueError(f"{path}: the corpus file is empty")
    fmt, documents = _parse(text, path)
    if not documents:
        raise ValueError(f"{path}: the corpus holds no documents")
    return Corpus(path=str(path), documents=documents, sha256=sha256, format=fmt)


def _decode_utf8(raw: bytes, path: Path) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte offset {err.start})") from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the first document


def _parse(text: str, path: Path) -> tuple[str, list[Document]]:
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl", _parse_jsonl(text, path)
    if suffix in _JSON_SUFFIXES:
        return _parse_json_file(text, path)
    if suffix == ".txt" or text.lstrip()[:1] not in ("[", "{"):
        return "text", _parse_text(text)
    # Unknown extension with JSON-looking content: a whole JSON value, else JSON Lines.
    try:
        value = _loads(text, path)
    except json.JSONDecodeError:
        return "jsonl", _parse_jsonl(text, path)
    return _parse_json_value(value, path)


def _loads(text: str, where) -> object:
    """``json.loads``; JSON nested too deeply for the parser is a ValueError naming ``where``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None


def _parse_text(text: str) -> list[Document]:
    return [Document(line) for line in text.splitlines() if line.strip()]


def _parse_jsonl(text: str, path: Path) -> list[Document]:
    documents = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = _loads(line, where)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: malformed JSON line ({err.msg}, column {err.colno})") from None
        documents.append(_record_to_document(record, where))
    return documents


def _parse_json_file(text: str, path: Path) -> tuple[str, list[Document]]:
    try:
        value = _loads(text, path)
    except json.JSONDecodeError as err:
        if _first_line_is_json_object(text):  # JSON Lines saved as .json
            return "jsonl", _parse_jsonl(text, path)
        raise ValueError(f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
    return _parse_json_value(value, path)


def _first_line_is_json_object(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _parse_json_value(value, path: Path) -> tuple[str, list[Document]]:
    if isinstance(value, list):
        return "json-records", [_record_to_document(r, f"{path}: record {i}") for i, r in enumerate(value)]
    if isinstance(value, dict):
        return "json-label-map", _parse_label_map(value, path)
    raise ValueError(
        f"{path}: expected a JSON list of records or an object mapping label -> list of texts, "
        f"got {type(value).__name__}"
    )


def _parse_label_map(value: dict, path: Path) -> list[Document]:
    documents = []
    for label, texts in value.items():
        if not isinstance(texts, list):
            raise ValueError(f"{path}: label {label!r} maps to {type(texts).__name__}, expected a list of texts")
        for i, text in enumerate(texts):
            documents.append(Document(_check_text(text, f"{path}: label {label!r} item {i}"), label))
    return documents


def _record_to_document(record, where: str) -> Document:
    if isinstance(record, str):
        return Document(_check_text(record, where))
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with a 'text' or 'prompt' field, got {type(record).__name__}")
    keys = [k for k in _TEXT_KEYS if k in record]
    if not keys:
        raise ValueError(f"{where}: missing field 'text' (or 'prompt'); fields present: {sorted(record)}")
    if len(keys) > 1:
        raise ValueError(f"{where}: has both 'text' and 'prompt'; keep one")
    return Document(_check_text(record[keys[0]], where), _check_label(record.get("label"), where))


def _check_text(text, where: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{where}: text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where}: text is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate from a JSON escape such as "\ud800"
        raise ValueError(f"{where}: text holds an unpaired surrogate {text[err.start]!r} at character "
                         f"{err.start}, which is not a Unicode character") from None
    return text


def _check_label(label, where: str) -> str | None:
    if label is None or isinstance(label, str):
        return label
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    raise ValueError(f"{where}: label must be a string, an integer or null, got {type(label).__name__}")
