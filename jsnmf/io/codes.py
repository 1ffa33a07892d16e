"""Where a streamed fit keeps the codes ``G``: host memory or ``.npy`` files read and written in place.

Both buffers hold this process's rows (n × k float32) and read and write row ranges, so a pass
touches only one chunk's codes at a time; :class:`DiskCodes` uses ``pread``/``pwrite`` so that
on-disk codes do not occupy resident memory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import numpy as np

__all__ = ["MemoryCodes", "DiskCodes", "fill", "codes_directory", "process_suffix"]


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


def fill(buffer, values: np.ndarray, rows: int = 65536) -> None:
    for start in range(0, len(values), rows):
        buffer.write(start, np.asarray(values[start:start + rows], np.float32))


def process_suffix() -> str:
    """Distinguishes the files of the processes of a multi-process fit sharing a directory."""
    return f"-process{jax.process_index()}" if jax.process_count() > 1 else ""


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
