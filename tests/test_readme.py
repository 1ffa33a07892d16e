"""Every snippet of README.md runs as written, in README order, in one scratch folder.

The rule, stated once:
- ```python blocks run, each as its own script (``python block.py``).
- ```bash blocks run with ``bash -euo pipefail`` (``jsnmf`` on PATH), each as a whole.
- ```bash no-run blocks are not run. Only installing, testing, downloading and jobs of several
  processes may be marked so: each of their commands must be a ``pip install``, a ``pytest`` run, a
  ``jsnmf.models.fetch``, a command on a fetched real model (``~/.cache/jsnmf/models``), or a ``jsnmf
  extract``/``jsnmf fit`` joining a multi-process job (``--coordinator``/``--distributed``: it needs
  several processes or hosts; tests/test_cli_multihost.py runs such jobs); the test checks that.
- ```text blocks are usage synopses (placeholders such as ``M``, ``RUN``), not commands.
- Any other fence fails the test, so no snippet goes untested unnoticed.
- The one rewrite: ``jsnmf/data/`` (files in the repository) becomes the absolute path of the
  package's data folder, since the scratch folder is not the repository root.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([\w-]*)([^\n]*)\n(.*?)^```\s*$", re.M | re.S)
NO_RUN_ALLOWED = re.compile(r"pip install|pytest|jsnmf\.models\.fetch|~/\.cache/jsnmf/models"
                            r"|jsnmf (?:extract|fit) .*--(?:coordinator|distributed)\b")


def readme_blocks() -> list[tuple[str, str, str]]:
    """``(language, info, code)`` of every fenced block, in order."""
    return [(m[1], m[2].strip(), m[3]) for m in FENCE.finditer(README.read_text(encoding="utf-8"))]


def _commands(code: str) -> list[str]:
    """Shell commands of a block: comments dropped, ``\\``-continued lines joined."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_fences_follow_the_rule():
    blocks = readme_blocks()
    assert any(lang == "python" for lang, _, _ in blocks) and any(lang == "bash" for lang, _, _ in blocks)
    for lang, info, code in blocks:
        assert lang in ("python", "bash", "text"), f"README fence ```{lang}{info}: not python, bash or text"
        assert info in ("", "no-run"), f"README fence ```{lang} {info}: unknown tag"
        if info == "no-run":
            assert lang == "bash", "only bash blocks may be marked no-run"
            for command in _commands(code):
                assert NO_RUN_ALLOWED.search(command), f"a no-run block runs {command!r}: only installs, tests, " \
                                                       "downloads, fetched-model commands and multi-process " \
                                                       "jobs may be left out"


@pytest.mark.slow
def test_readme_snippets_run(tmp_path):
    data = str((ROOT / "jsnmf" / "data").resolve()) + "/"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    ran = 0
    for index, (lang, info, code) in enumerate(readme_blocks()):
        if lang == "text" or info == "no-run":
            continue
        code = code.replace("jsnmf/data/", data)
        if lang == "python":
            script = tmp_path / f"readme_block_{index}.py"
            script.write_text(code, encoding="utf-8")
            command = [sys.executable, str(script)]
        else:
            command = ["bash", "-euo", "pipefail", "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"README block {index} ({lang}) failed:\n{code}\n--- stdout\n{done.stdout[-3000:]}" \
                                     f"\n--- stderr\n{done.stderr[-3000:]}"
        assert "PyTorch was not found" not in done.stderr
        ran += 1
    assert ran >= 6
