"""The one reader and checker of the JSON manifests that name what a directory or file holds.

Every format jsnmf writes (activation store, SNMF checkpoint, fit checkpoint, report features)
carries ``format`` (a name) and ``format_version`` (an integer; this jsnmf reads up to a given
version). :func:`read_manifest` reads such a file; :func:`check_manifest` checks an already parsed
value (a manifest restored by orbax, for example). ``types`` checks the JSON type of keys (a schema
of the top level); a format's own cross-field checks raise :func:`corrupt` errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

__all__ = ["read_manifest", "check_manifest", "corrupt", "NUMBER", "INTEGER"]

# ``types`` values: a type or a tuple of them; INTEGER and NUMBER never accept a bool.
INTEGER = int
NUMBER = (int, float)
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true/false", type(None): "null"}


def corrupt(where: str | os.PathLike, problem: str, name: str = "its manifest") -> ValueError:
    """The error of a manifest that is readable but wrong: names ``where`` (and the file ``name``) and the problem."""
    file = "" if name == "its manifest" else f" ({name})"
    return ValueError(f"{where}: corrupt manifest{file}, {problem}")


def _is_a(value: Any, expected) -> bool:
    expected = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        return bool in expected
    return isinstance(value, expected)


def _describe(expected) -> str:
    expected = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_JSON_NAMES.get(t, t.__name__) for t in expected)


def check_manifest(manifest: Any, where: str | os.PathLike, *, format: str, version: int, what: str,
                   required: tuple[str, ...] | frozenset = (), name: str = "its manifest",
                   types: Mapping[str, Any] | None = None) -> dict:
    """``manifest`` if it is a dict of format ``format`` at a version ``1..version`` holding every
    ``required`` key, and each key of ``types`` that it holds is of that JSON type (``dict``, ``list``,
    ``str``, ``INTEGER``, ``NUMBER``, ``bool``, a tuple of them; ``type(None)`` for null); otherwise
    ValueError naming ``where`` and ``what`` it should have been (``name``: how to call the manifest
    in the message)."""
    if not isinstance(manifest, dict) or manifest.get("format") != format:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{where}: not a {what} ({name} has format {found!r}, expected {format!r})")
    found_version = manifest.get("format_version")
    if not isinstance(found_version, int) or isinstance(found_version, bool) or not 1 <= found_version <= version:
        raise ValueError(f"{where}: {what} format version {found_version!r} is not supported "
                         f"(this jsnmf reads versions 1 to {version}; a newer jsnmf wrote it?)")
    missing = sorted(set(required) - set(manifest))
    if missing:
        raise corrupt(where, f"missing {missing}", name)
    for key, expected in (types or {}).items():
        if key in manifest and not _is_a(manifest[key], expected):
            raise corrupt(where, f"{key!r} is {_JSON_NAMES.get(type(manifest[key]), 'a value')} "
                                 f"({_short(manifest[key])}), expected {_describe(expected)}", name)
    return manifest


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, (set, bytes)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_manifest(path: str | os.PathLike, *, format: str, version: int, what: str,
                  required: tuple[str, ...] | frozenset = (), missing_what: str | None = None,
                  types: Mapping[str, Any] | None = None) -> dict:
    """Read and check the JSON manifest at ``path`` (see :func:`check_manifest`).

    A missing file is reported as "``<folder>``: not a ``missing_what`` (no ``<name>``)" (``missing_what``
    defaults to ``what``); unreadable JSON names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path.parent}: not a {missing_what or what} (no {path.name})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise ValueError(f"{path}: unreadable manifest ({err})") from None
    return check_manifest(manifest, path.parent, format=format, version=version, what=what, required=required,
                          name=path.name, types=types)
