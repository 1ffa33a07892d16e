"""Run by tests/test_sharded.py and tests/test_multihost.py in a fresh process with several devices.

    python sharded_worker.py sharded   IN.npz OUT.npz   # 8 simulated CPU devices, meshes of 4 and 8
    python sharded_worker.py multihost IN.npz OUT.npz PORT PROCESS_ID   # one of 2 processes, 2 devices each
    python sharded_worker.py extract   IN.npz OUT_DIR   # 8 simulated CPU devices: extractions on 8 and 4
    python sharded_worker.py extract_multihost IN.npz OUT_DIR PORT PROCESS_ID   # one of 2 processes, 2 devices each

``IN.npz`` holds ``X`` (and ``X_new``); the results go to ``OUT.npz`` (NumPy arrays only, no pickle).
The device count comes from ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set by the caller.
"""

import sys
from pathlib import Path

import numpy as np

CASES = [("mu", None), ("mu", 0.2), ("hals", None), ("hals", 0.2), ("ehals", 0.2)]
SETTINGS = dict(max_iter=15, patience=1000, tol=0.0)
RANK = 5


def case_name(solver, sparsity):
    return f"{solver}_{'dense' if sparsity is None else 'sparse'}"


def run_sharded(data, out):
    import jax
    from jax.sharding import Mesh

    import jsnmf
    from jsnmf.batch import fit_layers

    X, X_new = data["X"], data["X_new"]
    devices = np.array(jax.devices())
    assert devices.size == 8, devices
    results = {"device_count": np.array(devices.size)}
    meshes = {
        "4": Mesh(devices[:4], ("data",)),
        "8": None,  # the default: every device
        "4x2": Mesh(devices.reshape(4, 2), ("data", "model")),  # rows over 4, replicated over 'model'
    }
    for mesh_name, mesh in meshes.items():
        cases = CASES if mesh_name != "4x2" else [("hals", 0.2)]
        for solver, sparsity in cases:
            model = jsnmf.SNMF(RANK, solver=solver, sparsity=sparsity, **SETTINGS).fit(X, mesh=mesh)
            key = f"{mesh_name}_{case_name(solver, sparsity)}"
            results[f"{key}_features"] = model.features_
            results[f"{key}_codes"] = model.codes_
            results[f"{key}_loss"] = model.loss_history_
            if solver == "hals" and sparsity == 0.2:
                results[f"{key}_transform"] = model.transform(X_new)
                results[f"{key}_score"] = np.array(model.score(X_new))
    # svd, tokens and explicit starts, on 8 devices.
    model = jsnmf.SNMF(RANK, solver="hals", sparsity=0.2, init="svd", **SETTINGS).fit(X[:296])
    results["svd_features"], results["svd_loss"] = model.features_, model.loss_history_
    # The tokens start needs no padding-free rows: its codes are solved row by row.
    model = jsnmf.SNMF(RANK, solver="hals", sparsity=0.2, init="tokens", **SETTINGS).fit(X)
    results["tokens_features"], results["tokens_loss"] = model.features_, model.loss_history_
    rng = np.random.default_rng(5)
    G0 = rng.random((X.shape[0], RANK)).astype(np.float32)
    F0 = rng.normal(size=(X.shape[1], RANK)).astype(np.float32)
    model = jsnmf.SNMF(RANK, solver="mu", sparsity=0.2, init=(F0, G0), **SETTINGS).fit(X)
    results["pair_features"], results["pair_loss"] = model.features_, model.loss_history_
    # Several layers at once, sharded over 8 devices.
    layers = fit_layers({"a": X, "b": X[:, ::-1] * 2.0}, RANK, solver="mu", sparsity=0.2, **SETTINGS)
    for name, layer_model in layers.items():
        results[f"layers_{name}_features"] = layer_model.features_
        results[f"layers_{name}_codes"] = layer_model.codes_
        results[f"layers_{name}_loss"] = layer_model.loss_history_
    # Checkpoints: 10 iterations on 4 devices, then resumed to 15 on all 8 (another mesh).
    checkpoint_dir = Path(out).parent / "sharded_checkpoint"
    first = dict(SETTINGS, max_iter=10)
    jsnmf.SNMF(RANK, solver="hals", sparsity=0.2, **first).fit(X, mesh=meshes["4"], checkpoint_dir=checkpoint_dir,
                                                               checkpoint_every=5)
    model = jsnmf.SNMF(RANK, solver="hals", sparsity=0.2, **SETTINGS).fit(X, checkpoint_dir=checkpoint_dir,
                                                                          resume=True)
    results["resumed_features"], results["resumed_codes"] = model.features_, model.codes_
    results["resumed_loss"] = model.loss_history_
    # The same with an extrapolated solver: its momentum (previous codes by rows) moves meshes too.
    ehals_dir = Path(out).parent / "sharded_checkpoint_ehals"
    jsnmf.SNMF(RANK, solver="ehals", sparsity=0.2, **first).fit(X, mesh=meshes["4"], checkpoint_dir=ehals_dir,
                                                                checkpoint_every=5)
    model = jsnmf.SNMF(RANK, solver="ehals", sparsity=0.2, **SETTINGS).fit(X, checkpoint_dir=ehals_dir, resume=True)
    results["resumed_ehals_features"], results["resumed_ehals_codes"] = model.features_, model.codes_
    results["resumed_ehals_loss"] = model.loss_history_
    # Streamed (chunks of 64 rows, each split over the devices) on 4 and on all 8 devices.
    for mesh_name in ("4", "8"):
        for init, solver in (("random", "hals"), ("kmeans", "hals"), ("random", "ehals")):
            model = jsnmf.SNMF(RANK, solver=solver, sparsity=0.2, init=init, **SETTINGS).fit(
                X, mesh=meshes[mesh_name], chunk_tokens=64)
            key = f"streamed_{mesh_name}_{init}" + ("" if solver == "hals" else f"_{solver}")
            results[f"{key}_features"], results[f"{key}_codes"] = model.features_, model.codes_
            results[f"{key}_loss"] = model.loss_history_
    # A mesh without a 'data' axis is refused.
    try:
        jsnmf.SNMF(RANK).fit(X, mesh=Mesh(devices, ("model",)))
        results["bad_mesh_error"] = np.array("")
    except ValueError as err:
        results["bad_mesh_error"] = np.array(str(err))
    np.savez(out, **results)


def run_multihost(data, out, port, process_id):
    import jax

    from jsnmf import distributed

    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           cpu_collectives="gloo")
    import jsnmf

    X, X_new = data["X"], data["X_new"]
    # Uneven shares: process 0 gets rows [0, cut), process 1 the rest; neither a multiple of 2.
    cut = int(data["cut"])
    mine = X[:cut] if process_id == 0 else X[cut:]
    new_cut = X_new.shape[0] // 2
    new_mine = X_new[:new_cut] if process_id == 0 else X_new[new_cut:]
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    results = {}
    for solver, sparsity in [("mu", 0.2), ("hals", None), ("ehals", 0.2)]:
        model = jsnmf.SNMF(RANK, solver=solver, sparsity=sparsity, **SETTINGS).fit(mine)
        key = case_name(solver, sparsity)
        results[f"{key}_features"] = model.features_
        results[f"{key}_codes"] = model.codes_
        results[f"{key}_all_codes"] = distributed.gather_rows(model.codes_)
        results[f"{key}_loss"] = model.loss_history_
        results[f"{key}_transform"] = model.transform(new_mine)
        results[f"{key}_score"] = np.array(model.score(new_mine))
    # Streamed: each process its own rows in chunks of 40 (process 0: 4 chunks, process 1: 4 chunks);
    # and a store both share, each reading its own whole chunks (the store has chunks of 50 rows).
    model = jsnmf.SNMF(RANK, solver="hals", sparsity=0.2, **SETTINGS).fit(mine, chunk_tokens=40)
    results["streamed_features"], results["streamed_codes"] = model.features_, model.codes_
    results["streamed_loss"] = model.loss_history_
    from jsnmf.store import ActivationStore

    store = ActivationStore.open(data["store"].item())
    model = jsnmf.SNMF(RANK, solver="hals", sparsity=0.2, **SETTINGS).fit(store)
    results["store_features"], results["store_codes"] = model.features_, model.codes_
    results["store_loss"] = model.loss_history_
    store_checkpoint = Path(data["checkpoint_dir"].item() + "_store")
    jsnmf.SNMF(RANK, solver="hals", sparsity=0.2, **dict(SETTINGS, max_iter=10)).fit(
        store, checkpoint_dir=store_checkpoint, checkpoint_every=5)
    model = jsnmf.SNMF(RANK, solver="hals", sparsity=0.2, **SETTINGS).fit(store, checkpoint_dir=store_checkpoint,
                                                                          resume=True)
    results["store_resumed_features"], results["store_resumed_codes"] = model.features_, model.codes_
    results["store_resumed_loss"] = model.loss_history_
    # Checkpoints written by both processes (each its own rows of G), then resumed by both.
    checkpoint_dir = Path(data["checkpoint_dir"].item())
    first = dict(SETTINGS, max_iter=10)
    jsnmf.SNMF(RANK, solver="mu", sparsity=0.2, **first).fit(mine, checkpoint_dir=checkpoint_dir, checkpoint_every=5)
    model = jsnmf.SNMF(RANK, solver="mu", sparsity=0.2, **SETTINGS).fit(mine, checkpoint_dir=checkpoint_dir,
                                                                        resume=True)
    results["resumed_features"], results["resumed_codes"] = model.features_, model.codes_
    results["resumed_loss"] = model.loss_history_
    np.savez(out, **results)


# Data-parallel extraction (tests/test_extract_sharded.py): name -> (devices of the mesh, None: all 8;
# settings). The 45 documents make 8 batches of 6 (last one short) and 6 batches of 8 (fewer than 8 devices).
EXTRACT_RUNS = {
    "8_float32_b6": (None, dict(batch_size=6, dtype="float32")),
    "4_bfloat16_b6": (4, dict(batch_size=6, dtype="bfloat16")),
    "4_float32_b8": (4, dict(batch_size=8, dtype="float32")),
}
EXTRACT_SETTINGS = dict(layers=[0, 1], max_length=32, chunk_tokens=128, progress=False)
# The mesh (4 data, 2 model): 4 copies of the parameters, each sharded over 2 devices.
SHARDED_PARAMETERS_RUN = ("4x2_float32_b6", dict(batch_size=6, dtype="float32"))


def run_extract(data, out):
    """Extract ``data['corpus']`` with ``data['model']`` for every EXTRACT_RUNS entry into ``out``/NAME."""
    import jax
    from jax.sharding import Mesh

    from jsnmf.extract import extract

    devices = np.array(jax.devices())
    assert devices.size == 8, devices
    for name, (n_devices, settings) in EXTRACT_RUNS.items():
        mesh = None if n_devices is None else Mesh(devices[:n_devices], ("data",))
        extract(data["model"].item(), data["corpus"].item(), Path(out) / name, mesh=mesh,
                **EXTRACT_SETTINGS, **settings)
    import json

    from flax import nnx

    from jsnmf import models
    from jsnmf.extract import extraction_devices, replicas

    name, settings = SHARDED_PARAMETERS_RUN
    mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
    extract(data["model"].item(), data["corpus"].item(), Path(out) / name, mesh=mesh, **EXTRACT_SETTINGS, **settings)
    # How the parameters of one copy lie: (shape, shape of the part each device holds) per parameter.
    model, _ = models.load(data["model"].item())
    copies = replicas(model, extraction_devices(mesh))
    parameters = jax.tree.leaves(nnx.state(copies[0].model))
    (Path(out) / f"{name}_parameters.json").write_text(json.dumps(
        {"copies": len(copies), "shapes": [[list(a.shape), list(a.sharding.shard_shape(a.shape))] for a in parameters]}))


# Multi-process extraction (tests/test_extract_multihost.py): the settings every run uses.
MULTIHOST_EXTRACT_SETTINGS = dict(layers=[0, 1], max_length=32, batch_size=6, chunk_tokens=32, dtype="bfloat16",
                                  progress=False)


def run_extract_multihost(data, out, port, process_id):
    """Extract ``data['corpus']`` into each of ``data['targets']`` (folders on the shared disk) as one of 2
    processes; an error is recorded in ``OUT_DIR/errors{process_id}.json`` (target -> message) and the
    next target is tried, so the test sees what each process said."""
    import json

    from jsnmf import distributed

    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           cpu_collectives="gloo")
    import jax

    from jsnmf.extract import extract

    assert jax.process_count() == 2 and jax.local_device_count() == 2
    errors = {}
    for target in data["targets"]:
        try:
            extract(data["model"].item(), data["corpus"].item(), target, **MULTIHOST_EXTRACT_SETTINGS)
        except Exception as err:  # noqa: BLE001 - recorded for the test
            errors[str(target)] = f"{type(err).__name__}: {err}"
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"errors{process_id}.json").write_text(json.dumps(errors))


def main():
    mode, path_in, path_out = sys.argv[1:4]
    with np.load(path_in) as data:
        data = dict(data)
    if mode == "sharded":
        run_sharded(data, path_out)
    elif mode == "extract":
        run_extract(data, path_out)
    elif mode == "multihost":
        run_multihost(data, path_out, int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "extract_multihost":
        run_extract_multihost(data, path_out, int(sys.argv[4]), int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()


# -- launching workers from the tests ---------------------------------------------------------------

WORKER = __file__


def problem():
    """The planted problem the sharded tests fit: n = 301 rows (not a multiple of 2, 4 or 8)."""
    from snmf_reference import planted_problem

    X, _, _ = planted_problem(n=301, d=60, k=RANK, seed=1)
    X_new, _, _ = planted_problem(n=37, d=60, k=RANK, seed=2)
    return X, X_new


def free_port() -> int:
    """A TCP port free on localhost now (for a jax.distributed coordinator)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(args, n_devices, log_path, env=None):
    """Start ``python sharded_worker.py ARGS`` with ``n_devices`` simulated CPU devices."""
    import os
    import subprocess

    env = dict(os.environ, **(env or {}), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
    log = open(log_path, "w")
    try:
        return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    finally:
        log.close()  # the child holds its own descriptor


def finish_workers(processes, log_paths, timeout):
    """Wait for every worker (``timeout`` seconds in all); kill them all and fail on any error."""
    import subprocess
    import time

    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        kill_workers(processes)
        raise AssertionError(f"workers still running after {timeout} s:\n{_logs(log_paths)}")
    failed = [p.returncode for p in processes if p.returncode != 0]
    if failed:
        kill_workers(processes)
        raise AssertionError(f"worker(s) failed with exit codes {failed}:\n{_logs(log_paths)}")


def kill_workers(processes):
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def _logs(log_paths):
    from pathlib import Path

    return "\n".join(f"--- {path}\n{Path(path).read_text()[-4000:]}" for path in log_paths)
