"""Files written whole or not at all: a temporary name in the same directory, fsync, then rename.

The one atomic writer of the package: JSON manifests, report pages and images, store chunks and
corpora all go through :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, IO

TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, tmp_name: str | None = None) -> None:
    """Write ``path`` through ``write(file)`` under a temporary name, fsync, then rename over it.

    ``tmp_name`` defaults to ``<name>.tmp``; writers that may race (several hosts sharing a file
    system) pass a name of their own. A failed write (a full disk, for example) removes the temporary file and raises the OSError
    with the file's name in it.
    """
    path = Path(path)
    tmp = path.with_name(tmp_name or path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.filename is None:
            raise with_filename(err, path) from err
        raise


def with_filename(err: OSError, path: os.PathLike | str) -> OSError:
    """``err`` again (same errno, so the same OSError subclass) naming ``path``."""
    return OSError(err.errno, err.strerror or str(err), str(path))


def is_live_pid(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (owners of temporaries named after their writer's pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def atomic_write_json(path: Path, value: Any, *, private: bool = False) -> None:
    """``value`` as indented UTF-8 JSON at ``path``, atomically.

    ``private``: use a temporary name unique to this host and process (for files that processes
    of a multi-host job may write at the same time).
    """
    path = Path(path)
    data = (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    tmp_name = f".{path.name}.{socket.gethostname()}-{os.getpid()}{TMP_SUFFIX}" if private else None
    atomic_write(path, lambda f: f.write(data), tmp_name=tmp_name)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``data`` at ``path``, atomically (a temporary name unique to this process, then rename)."""
    path = Path(path)
    atomic_write(path, lambda f: f.write(data), tmp_name=f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` as UTF-8 at ``path``, atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


class FolderLock:
    """Advisory exclusive lock on the file ``name`` in ``folder``, for folders with one writer at a
    time (a store being written, a run's ``snmf/`` being fitted); released by :meth:`release` or when
    the process dies. ``busy`` is the error when another process holds it."""

    def __init__(self, folder: Path, name: str = ".lock", *, busy: str):
        self._fd = os.open(Path(folder) / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ValueError(f"{folder}: {busy}") from None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

