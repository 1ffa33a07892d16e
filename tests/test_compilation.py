"""Compilation: the stopping rule and the checkpoint cadence are runtime values (a fit with another
``max_iter``, ``tol``, ``patience`` or ``checkpoint_every`` compiles nothing new), and the persistent
compilation cache lets a second process skip compiling (:mod:`jsnmf.compilation_cache`).

Compilations are counted with JAX's own monitoring event for every backend compile (jitted
functions and eager operations alike), not timed.
"""

import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np
import pytest
from jax import monitoring
from jax.sharding import Mesh

import jsnmf
from jsnmf import SNMF
from jsnmf.compilation_cache import DISABLED, ENVIRONMENT, cache_folder

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT


@contextmanager
def compilations():
    """Count the backend compilations that happen inside the ``with`` (a list of their durations)."""
    seen = []

    def listen(event, duration, **_):
        if event == BACKEND_COMPILE:
            seen.append(duration)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        monitoring.unregister_event_duration_listener(listen)


def data(n=300, d=40, seed=0):
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(n, d)), 0).astype(np.float32)


# Three stopping rules and checkpoint cadences; the iterations they run differ (7, 13, 60).
LIMITS = [dict(max_iter=7, tol=1e-4, patience=5), dict(max_iter=13, tol=1e-3, patience=9),
          dict(max_iter=60, tol=0.0, patience=2)]
EVERY = [3, 4, 5]


def one_device_mesh():
    return Mesh(np.array(jax.devices()[:1]), ("data",))


@pytest.mark.parametrize("solver", ["mu", "ehals"])  # ehals: a loop that carries a momentum too
@pytest.mark.parametrize("where", ["memory", "mesh", "streamed", "batched", "checkpointed", "streamed_checkpointed"])
def test_other_limits_and_cadence_compile_nothing(where, solver, tmp_path):
    X = data()

    def fit(limits, every, run):
        if where == "batched":
            return jsnmf.fit_layers({0: X, 1: 2.0 * X}, 4, solver=solver, seed=0, progress=False, **limits)
        runtime = {"memory": {}, "mesh": dict(mesh=one_device_mesh()), "streamed": dict(chunk_tokens=128),
                   "checkpointed": dict(checkpoint_dir=tmp_path / f"ck{run}", checkpoint_every=every),
                   "streamed_checkpointed": dict(chunk_tokens=128, checkpoint_dir=tmp_path / f"ck{run}",
                                                 checkpoint_every=every)}[where]
        return SNMF(4, solver=solver, seed=0, **limits).fit(X, progress=False, **runtime)

    fit(LIMITS[0], EVERY[0], 0)  # compiles everything this shape needs
    with compilations() as seen:
        models = [fit(limits, every, run) for run, (limits, every) in enumerate(zip(LIMITS[1:], EVERY[1:]), 1)]
    assert seen == [], f"{len(seen)} compilation(s) for a fit that differs only in max_iter/tol/patience/cadence"
    # the limits were applied: the last fit ran to its patience or its max_iter, not the first fit's 7
    model = models[-1] if where != "batched" else models[-1][0]
    assert model.n_iter_ != 7 and model.n_iter_ <= LIMITS[2]["max_iter"]


def test_limits_do_not_change_iterates():
    """A fit capped at max_iter=m runs the same iterations as the first m of a longer fit (one block size for all)."""
    X = data(seed=1)
    short = SNMF(4, seed=0, max_iter=7, tol=0.0, patience=10**6).fit(X, progress=False)
    long = SNMF(4, seed=0, max_iter=60, tol=0.0, patience=10**6).fit(X, progress=False)
    assert short.n_iter_ == 7 and len(short.loss_history_) == 7
    np.testing.assert_array_equal(short.loss_history_, long.loss_history_[:7])


# -- the persistent compilation cache ---------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys
    from jax import monitoring
    hits = []
    monitoring.register_event_listener(
        lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    import numpy as np
    import jax
    import jsnmf
    rng = np.random.default_rng(0)
    X = np.maximum(rng.normal(size=(256, 48)), 0).astype(np.float32)
    jsnmf.SNMF(5, seed=0, max_iter=int(sys.argv[1])).fit(X, progress=False)
    print(json.dumps({"hits": len(hits), "dir": jax.config.jax_compilation_cache_dir}))
""")


def run_child(env_changes: dict, max_iter: int = 20) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in (ENVIRONMENT, "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", CHILD, str(max_iter)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cache_files(folder: Path) -> set:
    return {p.name for p in folder.rglob("*") if p.is_file()}


def test_second_process_reads_the_compilation_cache(tmp_path):
    folder = tmp_path / "cache"
    # The threshold at 0 s so that this tiny problem's quick compiles are cached too (a user's own
    # JAX setting, which jsnmf leaves alone).
    env = {ENVIRONMENT: str(folder), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    first = run_child(env)
    assert first["dir"] == str(folder) and first["hits"] == 0
    written = cache_files(folder)
    assert written, "the first process wrote nothing to the cache"
    second = run_child(env, max_iter=35)  # another max_iter: the same executables
    assert second["hits"] > 0
    assert cache_files(folder) == written, "the second process compiled something the first did not"


def test_cache_off_and_user_setting_respected(tmp_path):
    assert run_child({ENVIRONMENT: "off"})["dir"] is None
    own = tmp_path / "own"
    result = run_child({ENVIRONMENT: str(tmp_path / "ours"), "JAX_COMPILATION_CACHE_DIR": str(own)})
    assert result["dir"] == str(own)  # the user's own JAX setting wins
    assert not (tmp_path / "ours").exists()


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(ENVIRONMENT, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_folder() == tmp_path / "jsnmf" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_folder() == Path.home() / ".cache" / "jsnmf" / "jax"
    for word in DISABLED:
        monkeypatch.setenv(ENVIRONMENT, word)
        assert cache_folder() is None
    monkeypatch.setenv(ENVIRONMENT, str(tmp_path / "x"))
    assert cache_folder() == tmp_path / "x"


def test_suite_does_not_write_to_home():
    """conftest points the cache away from the user's home (to off, unless the run sets it itself)."""
    configured = jax.config.jax_compilation_cache_dir
    assert configured is None or not str(configured).startswith(str(Path.home() / ".cache"))
