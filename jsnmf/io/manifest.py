"""The one reader and checker of the JSON manifests that name what a directory or file holds.

Every format jsnmf writes (activation store, SNMF checkpoint, fit checkpoint, report features)
carries ``format`` (a name) and ``format_version`` (an integer; this jsnmf reads up to a given
version). :func:`read_manifest` reads such a file; :func:`check_manifest` checks an already parsed
value (a manifest restored by orbax, for example).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_manifest", "check_manifest"]


def check_manifest(manifest: Any, where: str | os.PathLike, *, format: str, version: int, what: str,
                   required: tuple[str, ...] | frozenset = (), name: str = "its manifest") -> dict:
    """``manifest`` if it is a dict of format ``format`` at a version ``1..version`` holding every
    ``required`` key; otherwise ValueError naming ``where`` and ``what`` it should have been
    (``name``: how to call the manifest in the message)."""
    if not isinstance(manifest, dict) or manifest.get("format") != format:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{where}: not a {what} ({name} has format {found!r}, expected {format!r})")
    found_version = manifest.get("format_version")
    if not isinstance(found_version, int) or isinstance(found_version, bool) or not 1 <= found_version <= version:
        raise ValueError(f"{where}: {what} format version {found_version!r} is not supported "
                         f"(this jsnmf reads versions 1 to {version}; a newer jsnmf wrote it?)")
    missing = sorted(set(required) - set(manifest))
    if missing:
        raise ValueError(f"{where}: corrupt manifest, missing {missing}")
    return manifest


def read_manifest(path: str | os.PathLike, *, format: str, version: int, what: str,
                  required: tuple[str, ...] | frozenset = (), missing_what: str | None = None) -> dict:
    """Read and check the JSON manifest at ``path`` (see :func:`check_manifest`).

    A missing file is reported as "``<folder>``: not a ``missing_what`` (no ``<name>``)" (``missing_what``
    defaults to ``what``); unreadable JSON names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path.parent}: not a {missing_what or what} (no {path.name})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: unreadable manifest ({err})") from None
    return check_manifest(manifest, path.parent, format=format, version=version, what=what, required=required,
                          name=path.name)
