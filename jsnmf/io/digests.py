"""Checksums of arrays, as the manifests of checkpoints record them (sha256 of dtype, shape and bytes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

__all__ = ["array_digest", "array_digests", "check_digests"]


def array_digest(array) -> str:
    """sha256 of an array's dtype, shape and bytes (C order): the checksum a checkpoint manifest records."""
    array = np.asarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def array_digests(tree: dict) -> dict[str, str]:
    """:func:`array_digest` of each host array of ``tree`` (a sharded fit's global codes, written by
    every process in parts, are not in it)."""
    return {name: array_digest(value) for name, value in tree.items() if isinstance(value, (np.ndarray, np.generic))}


def check_digests(arrays: dict, digests: dict, where: Path | str) -> None:
    """ValueError naming ``where`` and the array when an array does not match its recorded checksum."""
    for name, expected in digests.items():
        if name in arrays and array_digest(arrays[name]) != expected:
            raise ValueError(f"{where}: array {name!r} does not match the checksum its manifest records: the "
                             "checkpoint is damaged or was changed after it was written")
