"""Shared by the benchmark scripts: timing, machine description, and RESULTS.md sections.

Each script owns one section of ``benchmarks/RESULTS.md`` per machine label, delimited by
``<!-- name:label -->`` … ``<!-- /name:label -->``; a re-run replaces its own section only.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).with_name("RESULTS.md")


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line: accelerator (if JAX sees one) or CPU, cores, and library versions."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        where = f"CPU {cpu_name()}, {os.cpu_count()} cores"
    else:
        where = f"{device.device_kind} ({device.platform}), host CPU {cpu_name()}"
    versions = [f"jax {jax.__version__}", f"python {platform.python_version()}"]
    for name in ("flax", "torch", "transformers", "overcomplete"):
        try:  # the installed distribution's version: importing overcomplete's package pulls in torchvision
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"{where}; {', '.join(versions)}"


def default_label() -> str:
    import jax

    device = jax.devices()[0]
    return "cpu" if device.platform == "cpu" else re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")


def write_section(name: str, label: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section ``name:label`` of RESULTS.md with ``body``; atomic write."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    begin, end = f"<!-- {name}:{label} -->", f"<!-- /{name}:{label} -->"
    block = f"{begin}\n{body.rstrip()}\n\n_Run {stamp} on {machine_description()}._\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
