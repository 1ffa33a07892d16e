"""Checkpoints of a running fit: a fit killed (SIGKILL) at any moment resumes to the same factors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jsnmf import SNMF
from jsnmf.checkpoint import PROBLEM_FILE
from jsnmf.store import ActivationStore

from snmf_reference import planted_problem

N, D, K, CHUNK, LAYER = 1000, 64, 6, 128, 2
SETTINGS = dict(rank=K, solver="hals", sparsity=0.2, tol=0.0, patience=1000)

# The fit the parent kills. Streamed, it reads the store through the plain chunk-source protocol
# with a pause per chunk, so that it lasts long enough to be killed in the middle.
CHILD = r"""
import json, sys, time
from jsnmf import SNMF
from jsnmf.store import ActivationStore

class SlowStore:
    def __init__(self, store):
        self.store = store
        self.n_tokens, self.d_mlp, self.chunk_bounds = store.n_tokens, store.d_mlp, store.chunk_bounds
        self.dtype, self.layers = store.dtype, store.layers

    def read(self, layer, start, stop, *, raw=False):
        time.sleep(0.02)
        return self.store.read(layer, start, stop, raw=raw)

mode, store_path, checkpoint_dir = sys.argv[1], sys.argv[2], sys.argv[3]
settings, run = json.loads(sys.argv[4]), json.loads(sys.argv[5])
store = ActivationStore.open(store_path)
X = SlowStore(store) if mode == "streamed" else store.layer_array(2)
model = SNMF(**settings).fit(X, checkpoint_dir=checkpoint_dir, resume=True, **run)
if len(sys.argv) > 6:  # where to put the result
    import numpy as np
    np.savez(sys.argv[6], features=model.features_, codes=model.codes_, loss=model.loss_history_,
             n_iter=model.n_iter_)
print("finished")
"""
# "sharded" runs the in-memory fit on this many simulated devices (the default mesh holds all of them).
SHARDED_DEVICES = 4


def child_command(mode, store, checkpoint_dir, settings, run, out=None):
    env = dict(os.environ)
    if mode == "sharded":
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={SHARDED_DEVICES}")
    command = [sys.executable, "-c", CHILD, mode, str(store.path), str(checkpoint_dir), json.dumps(settings),
               json.dumps(run)]
    return command + ([str(out)] if out is not None else []), env


def write_store(path, X, chunk_tokens=CHUNK):
    n = len(X)
    writer = ActivationStore.create(path, layers=[LAYER], d_mlp=X.shape[1], dtype="float32", chunk_tokens=chunk_tokens)
    writer.append({LAYER: X}, np.zeros(n, np.int32), np.zeros(n, np.int32), np.arange(n, dtype=np.int32),
                  np.full(n, -1, np.int32))
    return writer.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    X, _, _ = planted_problem(n=N, d=D, k=K, density=0.2, noise=0.1, seed=0)
    return write_store(tmp_path_factory.mktemp("resume") / "store", X)


def steps(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def run_and_kill(mode, store, checkpoint_dir, settings, run, kill_after_steps=2):
    """Start the fit in a subprocess, SIGKILL it once ``kill_after_steps`` checkpoints are complete."""
    command, env = child_command(mode, store, checkpoint_dir, settings, run)
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while len(steps(checkpoint_dir)) < kill_after_steps:
            if child.poll() is not None:
                pytest.fail(f"the fit ended before it was killed:\n{child.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint appeared within 240 s")
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return steps(checkpoint_dir)


def assert_same_fit(a, b):
    np.testing.assert_array_equal(a.loss_history_, b.loss_history_)
    np.testing.assert_array_equal(a.features_, b.features_)
    np.testing.assert_array_equal(a.codes_, b.codes_)
    assert a.n_iter_ == b.n_iter_


def test_killed_streamed_fit_resumes_to_the_same_factors(store, tmp_path):
    settings, run = dict(SETTINGS, max_iter=15), dict(checkpoint_every=3)
    left = run_and_kill("streamed", store, tmp_path / "ckpt", settings, run)
    assert left and max(left) < 15  # killed in the middle of the fit
    resumed = SNMF(**settings).fit(store, layer=LAYER, checkpoint_dir=tmp_path / "ckpt", resume=True, **run)
    uninterrupted = SNMF(**settings).fit(store, layer=LAYER, checkpoint_dir=tmp_path / "reference", **run)
    assert_same_fit(resumed, uninterrupted)
    assert resumed.n_iter_ == 15


def test_killed_in_memory_fit_resumes_to_the_same_factors(store, tmp_path):
    settings, run = dict(SETTINGS, max_iter=12), dict(checkpoint_every=1, max_to_keep=3)
    left = run_and_kill("memory", store, tmp_path / "ckpt", settings, run, kill_after_steps=3)
    assert left and max(left) < 12
    X = store.layer_array(LAYER)
    resumed = SNMF(**settings).fit(X, checkpoint_dir=tmp_path / "ckpt", resume=True, **run)
    uninterrupted = SNMF(**settings).fit(X, checkpoint_dir=tmp_path / "reference", **run)
    assert_same_fit(resumed, uninterrupted)
    assert len(steps(tmp_path / "ckpt")) <= 3  # max_to_keep


def test_killed_sharded_fit_resumes_to_the_same_factors(store, tmp_path):
    """A fit over 4 devices, killed, resumed over 4 devices: the same factors as an uninterrupted one."""
    settings, run = dict(SETTINGS, max_iter=12), dict(checkpoint_every=1, max_to_keep=3)
    left = run_and_kill("sharded", store, tmp_path / "ckpt", settings, run, kill_after_steps=3)
    assert left and max(left) < 12
    results = {}
    for name in ("ckpt", "reference"):
        command, env = child_command("sharded", store, tmp_path / name, settings, run, out=tmp_path / f"{name}.npz")
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert finished.returncode == 0, finished.stderr[-3000:]
        with np.load(tmp_path / f"{name}.npz") as out:
            results[name] = dict(out)
    resumed, uninterrupted = results["ckpt"], results["reference"]
    for name in ("features", "codes", "loss", "n_iter"):
        np.testing.assert_array_equal(resumed[name], uninterrupted[name])
    assert int(resumed["n_iter"]) == 12
    problem = json.loads((tmp_path / "ckpt" / PROBLEM_FILE).read_text())
    assert problem["source"]["devices"] == SHARDED_DEVICES


def test_checkpoint_contents_and_resuming_a_finished_fit(store, tmp_path):
    settings, run = dict(SETTINGS, max_iter=20), dict(checkpoint_every=7, max_to_keep=2)
    first = SNMF(**settings).fit(store, checkpoint_dir=tmp_path / "ckpt", codes_on_disk=tmp_path / "codes", **run)
    assert steps(tmp_path / "ckpt") == [14, 20]  # every 7 iterations and at the end; the newest 2 kept
    problem = json.loads((tmp_path / "ckpt" / PROBLEM_FILE).read_text())
    assert problem["format"] == "jsnmf.fit_checkpoint"
    assert (problem["rank"], problem["solver"], problem["sparsity"], problem["seed"]) == (K, "hals", 0.2, 0)
    assert (problem["n_tokens"], problem["d_mlp"], problem["init"]) == (N, D, "random")
    assert problem["source"]["path"] == str(store.path) and problem["source"]["layer"] == LAYER
    assert len(problem["fingerprint"]) == 64
    # Resuming a finished fit runs no iteration and returns the same result.
    again = SNMF(**settings).fit(store, checkpoint_dir=tmp_path / "ckpt", resume=True, **run)
    assert_same_fit(again, first)
    # A larger max_iter continues it, to the same factors as a fit run that long at once.
    longer = dict(settings, max_iter=26)
    continued = SNMF(**longer).fit(store, checkpoint_dir=tmp_path / "ckpt", resume=True, **run)
    assert_same_fit(continued, SNMF(**longer).fit(store, checkpoint_dir=tmp_path / "reference", **run))
    # The in-memory fit resumes the streamed fit's checkpoint (equal up to float rounding).
    in_memory = SNMF(**dict(longer, max_iter=30)).fit(store.layer_array(LAYER), checkpoint_dir=tmp_path / "ckpt",
                                                     resume=True, **run)
    streamed = SNMF(**dict(longer, max_iter=30)).fit(store)
    assert in_memory.n_iter_ == 30
    # Float32 rounding differs between the paths; the loss is a difference of nearly cancelling terms.
    np.testing.assert_allclose(in_memory.loss_history_, streamed.loss_history_, rtol=1e-4)


def test_resume_refuses_a_checkpoint_of_another_problem(store, tmp_path):
    settings = dict(SETTINGS, max_iter=4)
    checkpoint_dir = tmp_path / "ckpt"
    SNMF(**settings).fit(store, checkpoint_dir=checkpoint_dir, checkpoint_every=2)
    X = store.layer_array(LAYER)
    for change, message in [
        (dict(rank=5), "rank 6 \\(checkpoint\\) vs 5 \\(this fit\\)"),
        (dict(solver="mu"), "solver 'hals' \\(checkpoint\\) vs 'mu' \\(this fit\\)"),
        (dict(sparsity=0.1), "sparsity 0.2 \\(checkpoint\\) vs 0.1"),
    ]:
        with pytest.raises(ValueError, match="holds a checkpoint of a different problem: " + message):
            SNMF(**dict(settings, **change)).fit(store, checkpoint_dir=checkpoint_dir, resume=True)
    with pytest.raises(ValueError, match="n_tokens 1000 \\(checkpoint\\) vs 900 \\(this fit\\)"):
        SNMF(**settings).fit(X[:900], checkpoint_dir=checkpoint_dir, resume=True)
    other, _, _ = planted_problem(n=N, d=D, k=K, density=0.2, noise=0.1, seed=5)  # same shape, other data
    other_store = write_store(tmp_path / "other", other)
    with pytest.raises(ValueError, match="different problem: fingerprint"):
        SNMF(**settings).fit(other_store, checkpoint_dir=checkpoint_dir, resume=True)
    with pytest.raises(ValueError, match="already holds checkpoints .* pass resume=True"):
        SNMF(**settings).fit(store, checkpoint_dir=checkpoint_dir)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir="):
        SNMF(**settings).fit(store, resume=True)
    # Nothing was overwritten: the original fit still resumes.
    assert SNMF(**settings).fit(store, checkpoint_dir=checkpoint_dir, resume=True).n_iter_ == 4
    # An empty directory with resume=True simply starts the fit.
    fresh = SNMF(**settings).fit(store, checkpoint_dir=tmp_path / "empty", resume=True, checkpoint_every=2)
    assert fresh.n_iter_ == 4 and steps(tmp_path / "empty") == [2, 4]
    assert os.path.isfile(tmp_path / "empty" / PROBLEM_FILE)
