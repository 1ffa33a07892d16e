"""Hardening (issue 13): no hangs, integrity-checked files, one clean error, no leftovers, one fit per run.

The hang cases run in a subprocess under a generous timeout (a hang is forever, a clean exit takes
seconds) and assert a prompt, clean exit.
"""

import os
import subprocess
import sys
import textwrap

import pytest

HANG_TIMEOUT_S = 120  # a busy 2-core machine imports JAX and fits in well under this; a hang is forever


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the process hung (no exit within {HANG_TIMEOUT_S} s): {str(err.stderr)[-2000:]}")


# ---------------------------------------------------------------- 1: an interrupted checkpoint save exits


INTERRUPTED_SAVE = """
    import os, signal, sys
    import numpy as np
    import orbax.checkpoint as ocp
    from jsnmf import SNMF

    directory, how = sys.argv[1], sys.argv[2]
    original = ocp.StandardCheckpointHandler.async_save

    def async_save(self, *args, **kwargs):  # orbax is inside CheckpointManager.save, threads started
        if how == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        elif how == "raise":
            raise KeyboardInterrupt
        else:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    ocp.StandardCheckpointHandler.async_save = async_save
    X = np.abs(np.random.default_rng(0).standard_normal((64, 16))).astype("f4")
    try:
        SNMF(4, max_iter=5, checkpoint_every=1, progress=False).fit(X, checkpoint_dir=directory)
    except BaseException as err:
        print("raised", type(err).__name__, flush=True)
"""


@pytest.mark.parametrize("how", ["sigint", "raise", "oserror"])
def test_interrupted_or_failed_checkpoint_save_exits_promptly(tmp_path, how):
    result = run_script(INTERRUPTED_SAVE, tmp_path / "ck", how)
    expected = "OSError" if how == "oserror" else "KeyboardInterrupt"
    assert result.returncode == 0 and f"raised {expected}" in result.stdout, result.stderr[-3000:]
    assert "cannot schedule new futures" not in result.stderr
    if how == "sigint":  # Ctrl-C is delivered once orbax holds the save: that checkpoint completes
        assert (tmp_path / "ck" / "1").is_dir()


# ---------------------------------------------------------------- 6: SNMF.load checks its manifest


@pytest.fixture(scope="module")
def saved_snmf(tmp_path_factory):
    import numpy as np

    from jsnmf import SNMF

    X = np.abs(np.random.default_rng(0).standard_normal((40, 12))).astype("f4")
    path = tmp_path_factory.mktemp("snmf") / "ck"
    SNMF(4, max_iter=3, progress=False).fit(X).save(path)
    return path


def _edited_copy(saved, tmp_path, edit):
    import json
    import shutil

    path = tmp_path / "ck"
    shutil.copytree(saved, path)
    manifest_file = path / "manifest.json"
    edit(manifest_file, json.loads(manifest_file.read_text()))
    return path


def _write(file, value):
    import json

    file.write_text(json.dumps(value))


def _with(key_path, value):
    def edit(file, manifest):
        target = manifest
        for key in key_path[:-1]:
            target = target[key]
        target[key_path[-1]] = value
        _write(file, manifest)
    return edit


def _without(key):
    def edit(file, manifest):
        del manifest[key]
        _write(file, manifest)
    return edit


@pytest.mark.parametrize("edit, message", [
    (_with(("params", "rank"), 7), "rank 7 does not match"),
    (_with(("shapes",), {}), "'shapes' names []"),
    (_with(("shapes", "codes"), [40]), "shape of 'codes'"),
    (_without("format_version"), "format version None"),
    (_with(("format_version",), 0), "format version 0"),
    (lambda file, m: _write(file, [m]), "not a jsnmf SNMF checkpoint"),
    (lambda file, m: file.write_bytes(b"\x89PNG\xff\xfe\x00garbage"), "unreadable manifest"),
    (_without("params"), "missing ['params']"),
    (_with(("params",), []), "'params' is a list"),
    (_with(("n_iter",), "3"), "'n_iter' is a string"),
    (_with(("params", "solver"), "adam"), "params are not valid"),
])
def test_load_refuses_an_edited_manifest_with_one_clear_error(saved_snmf, tmp_path, edit, message):
    from jsnmf import SNMF

    path = _edited_copy(saved_snmf, tmp_path, edit)
    with pytest.raises(ValueError) as err:
        SNMF.load(path)
    assert message in str(err.value) and str(path) in str(err.value)
