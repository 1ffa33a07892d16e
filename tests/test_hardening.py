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
