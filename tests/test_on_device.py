"""X held on the device (jsnmf.fit.on_device): a store read once into device memory and fitted in memory.

The memory query is replaced here (``free_device_memory``) to stand for an accelerator with enough or
too little free memory; CPU devices report none, so by default a CPU fit streams as before.
Several devices (and processes) run in fresh worker processes: this file, run as a script.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

N, D, K, CHUNK, LAYER = 600, 48, 5, 128, 3  # 5 chunks, the last short (88 rows); on 2 devices, 300 rows each
SETTINGS = dict(sparsity=0.2, max_iter=12, tol=0.0, patience=1000)


def write_store(path, X, dtype="float32"):
    from jsnmf.store import ActivationStore

    n = len(X)
    writer = ActivationStore.create(path, layers=[LAYER], d_mlp=D, dtype=dtype, chunk_tokens=CHUNK)
    writer.append({LAYER: X}, np.zeros(n, np.int32), np.zeros(n, np.int32), np.arange(n, dtype=np.int32),
                  np.full(n, -1, np.int32))
    return writer.close()


def problem():
    from snmf_reference import planted_problem

    X, _, _ = planted_problem(n=N, d=D, k=K, density=0.2, noise=0.1, seed=3)
    return X


# ---------------------------------------------------------------- workers (this file run as a script)


def run_mesh_worker(store_path, out):
    """2 simulated devices, one process: the store held on the mesh equals the array fit on the mesh."""
    import jax

    from jsnmf import SNMF
    from jsnmf.fit import on_device
    from jsnmf.fit.backends import FitSpec, make_backend
    from jsnmf.store import ActivationStore

    assert jax.device_count() == 2
    store = ActivationStore.open(store_path)
    X = store.layer_array(LAYER)
    array = SNMF(K, **SETTINGS).fit(X)  # the row-sharded in-memory fit over both devices
    held = SNMF(K, **SETTINGS).fit(store, on_device=True)
    for name in ("features_", "codes_", "loss_history_"):
        np.testing.assert_array_equal(getattr(held, name), getattr(array, name), err_msg=name)
    # Automatic, with both devices reporting room: held, rows split 300 + 300 (a chunk straddles the cut).
    on_device.free_device_memory = lambda devices: 1 << 40
    model = SNMF(K, **SETTINGS)
    backend, source, _ = make_backend(store, None, FitSpec(K, "random", 0, "float32", model.solver_config,
                                                           model.limits()))
    backend.start(lambda text: None)
    shards = sorted((s.device.id, s.data.shape[0]) for s in backend.backend.X.addressable_shards)
    np.testing.assert_array_equal(np.asarray(backend.backend.X)[:N], X)
    auto = model.fit(store)
    np.savez(out, features=held.features_, codes=held.codes_, loss=held.loss_history_,
             auto_features=auto.features_, shards=np.array(shards), source=json.dumps(source))


def run_processes_worker(store_path, out, port, process_id):
    """One of 2 processes with one device each: each holds its share of the store on its device."""
    from jsnmf import distributed

    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           cpu_collectives="gloo")
    import jax

    from jsnmf import SNMF
    from jsnmf.fit import on_device
    from jsnmf.store import ActivationStore

    assert jax.process_count() == 2 and jax.local_device_count() == 1
    store = ActivationStore.open(store_path)
    streamed = SNMF(K, **SETTINGS).fit(store)  # CPU devices report no memory: streamed
    loaded = []
    load_rows = on_device.load_rows
    on_device.load_rows = lambda *args: loaded.append(1) or load_rows(*args)
    held = SNMF(K, **SETTINGS).fit(store, on_device=True)
    assert loaded == [1]
    # One process short of memory: both stream (they agree), and on_device=True fails on both.
    on_device.free_device_memory = lambda devices: (1 << 40) if process_id == 0 else 1000
    SNMF(K, **SETTINGS).fit(store)
    assert loaded == [1]
    try:
        SNMF(K, **SETTINGS).fit(store, on_device=True)
        raise AssertionError("on_device=True should have failed")
    except ValueError as err:
        message = str(err)
    np.savez(out, features=held.features_, codes=held.codes_, loss=held.loss_history_,
             streamed_features=streamed.features_, streamed_codes=streamed.codes_, streamed_loss=streamed.loss_history_,
             message=message)


def start(args, n_devices, log):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, __file__, *map(str, args)], env=env, stdout=handle,
                                stderr=subprocess.STDOUT)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1] == "mesh":
        run_mesh_worker(sys.argv[2], sys.argv[3])
    else:
        run_processes_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    sys.exit(0)


# ---------------------------------------------------------------- tests

from jsnmf import SNMF  # noqa: E402
from jsnmf.fit import on_device  # noqa: E402
from jsnmf.fit.backends import FitSpec, make_backend  # noqa: E402
from jsnmf.fit.on_device import MARGIN, HeldFit, held_bytes  # noqa: E402
from jsnmf.fit.stream import StreamedFit  # noqa: E402

from rounding import rounding_tolerances  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    X = problem()
    root = tmp_path_factory.mktemp("on_device")
    store = write_store(root / "f32", X)
    bf16 = write_store(root / "bf16", X, dtype="bfloat16")
    memory, tolerances = rounding_tolerances(lambda: SNMF(K, **SETTINGS), X)
    return X, store, bf16, memory, tolerances


def backend_of(X, dtype="float32", **fit):
    model = SNMF(K, dtype=dtype, **SETTINGS)
    spec = FitSpec(K, "random", 0, dtype, model.solver_config, model.limits())
    return make_backend(X, None, spec, **fit)


def needed(dtype="float32", raw_dtype="float32"):
    """The estimate for the test store on one device (mu: no extrapolated codes)."""
    return held_bytes(N, D, K, dtype=dtype, raw_dtype=raw_dtype, chunk_rows=CHUNK, extrapolated=False)


def free_memory(monkeypatch, free):
    monkeypatch.setattr(on_device, "free_device_memory", lambda devices: free)


def test_cpu_reports_no_memory_so_the_default_streams(data):
    _, store, _, _, _ = data
    import jax

    assert on_device.free_device_memory(jax.devices()) is None  # the real query on CPU devices
    backend, source, _ = backend_of(store)
    assert isinstance(backend, StreamedFit) and "on_device" not in source


def test_enough_memory_holds_x_and_equals_the_in_memory_and_streamed_fits(data, monkeypatch):
    X, store, _, memory, tolerances = data
    streamed = SNMF(K, **SETTINGS).fit(store)
    # The estimate's boundary: held when it fits the free memory less the margin, streamed just short of it.
    free_memory(monkeypatch, int(np.ceil(needed() / (1 - MARGIN))) + 1)
    backend, source, _ = backend_of(store)
    assert isinstance(backend, HeldFit)
    assert source["on_device"] is True and source["device_dtype"] == "float32" and source["layer"] == LAYER
    held = SNMF(K, **SETTINGS).fit(store)
    # Same rows, same array backend and executable as the fit of the array: the same numbers.
    for name in ("features_", "codes_", "loss_history_"):
        np.testing.assert_array_equal(getattr(held, name), getattr(memory, name), err_msg=name)
    # The streamed fit sums chunk by chunk: equal up to that rounding (bounds derived in tests/rounding.py).
    tolerances.check(memory, held.features_, held.codes_, held.loss_history_, "held")
    tolerances.check(memory, streamed.features_, streamed.codes_, streamed.loss_history_, "streamed")


def test_too_little_memory_streams_and_on_device_true_says_why(data, monkeypatch):
    _, store, _, _, _ = data
    free = int(np.floor(needed() / (1 - MARGIN))) - 1
    free_memory(monkeypatch, free)
    backend, _, _ = backend_of(store)
    assert isinstance(backend, StreamedFit)
    # The extrapolated solver keeps two more codes arrays: it needs more than mu.
    assert held_bytes(N, D, K, dtype="float32", raw_dtype="float32", chunk_rows=CHUNK, extrapolated=True) > needed()
    with pytest.raises(ValueError, match=r"^on_device=True, but X needs about .* free .*stream X$") as error:
        SNMF(K, **SETTINGS).fit(store, on_device=True)
    assert "\n" not in str(error.value) and f"{N:,} rows × {D} in float32" in str(error.value)


def test_on_device_true_on_cpu_and_false(data, tmp_path):
    X, store, _, memory, _ = data
    held = SNMF(K, **SETTINGS).fit(store, on_device=True)
    np.testing.assert_array_equal(held.features_, memory.features_)
    np.testing.assert_array_equal(held.codes_, memory.codes_)
    assert isinstance(backend_of(store, on_device=True)[0], HeldFit)
    assert isinstance(backend_of(store, on_device=False)[0], StreamedFit)
    # An array: in memory by default, streamed with on_device=False or chunk_tokens (unless on_device=True).
    assert type(backend_of(X)[0]).__name__ == "ArrayBackend"
    assert isinstance(backend_of(X, on_device=False)[0], StreamedFit)
    np.save(tmp_path / "X.npy", X)
    X_map = np.load(tmp_path / "X.npy", mmap_mode="r")
    assert isinstance(backend_of(X_map, on_device=True)[0], HeldFit)
    chunked = SNMF(K, **SETTINGS).fit(X, chunk_tokens=100, on_device=True)
    np.testing.assert_array_equal(chunked.features_, memory.features_)
    with pytest.raises(ValueError, match="on_device must be None"):
        SNMF(K, **SETTINGS).fit(store, on_device="yes")


def test_chunk_tokens_with_an_array_or_codes_on_disk_still_stream_automatically(data, monkeypatch, tmp_path):
    X, store, _, _, _ = data
    free_memory(monkeypatch, 1 << 40)
    assert isinstance(backend_of(X, chunk_tokens=100)[0], StreamedFit)
    assert isinstance(backend_of(X, chunk_tokens=100, on_device=True)[0], HeldFit)
    # Codes on disk are the streamed fit's: asked for, the fit streams; with on_device=True it is refused.
    streamed = SNMF(K, **SETTINGS).fit(store, codes_on_disk=tmp_path / "codes")
    assert isinstance(streamed.codes_, np.memmap)
    with pytest.raises(ValueError, match="^on_device=True keeps X and the codes on the device, codes_on_disk"):
        SNMF(K, **SETTINGS).fit(store, codes_on_disk=True, on_device=True)


def test_a_bfloat16_store_is_read_in_its_precision_and_held_in_the_compute_dtype(data, monkeypatch):
    X, store, bf16, _, _ = data
    pieces = []
    write = on_device._write
    monkeypatch.setattr(on_device, "_write", lambda buffer, piece, start: pieces.append(piece.dtype)
                        or write(buffer, piece, start))
    free_memory(monkeypatch, 1 << 40)
    # dtype="bfloat16": X is held in 2 bytes a value, as the store keeps it and as the streamed steps compute.
    backend, source, _ = backend_of(bf16, dtype="bfloat16")
    assert isinstance(backend, HeldFit) and source["dtype"] == "bfloat16" and source["device_dtype"] == "bfloat16"
    backend.start(lambda text: None)
    assert backend.backend.X.dtype == np.dtype("bfloat16") and pieces and set(map(str, pieces)) == {"bfloat16"}
    assert needed("bfloat16", "bfloat16") < needed()
    exact = store.layer_array(LAYER)  # float32 values; bfloat16 rounds them as the store did
    held = SNMF(K, dtype="bfloat16", **SETTINGS).fit(bf16)
    in_memory = SNMF(K, dtype="bfloat16", **SETTINGS).fit(bf16.layer_array(LAYER))
    np.testing.assert_array_equal(held.features_, in_memory.features_)
    np.testing.assert_array_equal(held.codes_, in_memory.codes_)
    streamed = SNMF(K, dtype="bfloat16", **SETTINGS).fit(bf16, on_device=False)
    # bfloat16 keeps 8 bits of mantissa: both fits land near each other and near the float32 fit of X.
    assert abs(held.relative_error_ - streamed.relative_error_) < 0.01
    assert abs(held.relative_error_ - SNMF(K, **SETTINGS).fit(exact).relative_error_) < 0.01
    # dtype="float32" from a bfloat16 store: read as bfloat16, held as float32, the fit of its float32 values.
    pieces.clear()
    held32 = SNMF(K, **SETTINGS).fit(bf16)
    assert set(map(str, pieces)) == {"bfloat16"}
    np.testing.assert_array_equal(held32.features_, SNMF(K, **SETTINGS).fit(bf16.layer_array(LAYER)).features_)


def test_the_checkpoint_records_it_and_resumes_across_streamed_and_held(data, tmp_path, monkeypatch):
    X, store, _, memory, tolerances = data
    first = dict(SETTINGS, max_iter=6)
    SNMF(K, **first).fit(store, checkpoint_dir=tmp_path / "a", checkpoint_every=3)  # streamed (CPU)
    assert "on_device" not in json.loads((tmp_path / "a" / "problem.json").read_text())["source"]
    resumed = SNMF(K, **SETTINGS).fit(store, checkpoint_dir=tmp_path / "a", resume=True, on_device=True)
    source = json.loads((tmp_path / "a" / "problem.json").read_text())["source"]
    assert source["on_device"] is True and source["device_dtype"] == "float32"
    tolerances.check(memory, resumed.features_, resumed.codes_, resumed.loss_history_, "streamed, then held")
    SNMF(K, **first).fit(store, checkpoint_dir=tmp_path / "b", checkpoint_every=3, on_device=True)
    resumed = SNMF(K, **SETTINGS).fit(store, checkpoint_dir=tmp_path / "b", resume=True, on_device=False)
    tolerances.check(memory, resumed.features_, resumed.codes_, resumed.loss_history_, "held, then streamed")
    # Held throughout, resumed held: the uninterrupted in-memory fit's numbers.
    SNMF(K, **first).fit(store, checkpoint_dir=tmp_path / "c", checkpoint_every=3, on_device=True)
    resumed = SNMF(K, **SETTINGS).fit(store, checkpoint_dir=tmp_path / "c", resume=True, on_device=True)
    np.testing.assert_array_equal(resumed.features_, memory.features_)


def test_non_finite_and_zero_x_held(tmp_path):
    X = problem()
    X[400, 7] = np.nan  # a store refuses it when written; a memmap is read as it is
    np.save(tmp_path / "nan.npy", X)
    found = r"NaN or Inf \(first at row 400, column 7 of .*nan\.npy, chunk \[400, 500\)\)"
    with pytest.raises(ValueError, match=found):
        SNMF(K, **SETTINGS).fit(np.load(tmp_path / "nan.npy", mmap_mode="r"), chunk_tokens=100, on_device=True)
    with pytest.raises(ValueError, match="all zeros"):
        SNMF(K, **SETTINGS).fit(write_store(tmp_path / "zero", np.zeros_like(X)), on_device=True)


def test_progress_bar_says_x_was_loaded(data, capsys):
    _, store, _, _, _ = data
    SNMF(K, **dict(SETTINGS, max_iter=2)).fit(store, on_device=True, progress=True)
    err = capsys.readouterr().err
    assert "loading X onto the device (" in err and "X on the device (" in err


def test_cli_fit_on_device(data, tmp_path, monkeypatch, capsys):
    from jsnmf.cli import main

    X, _, _, _, _ = data
    store = write_store(tmp_path / "run" / "store", X)
    loads = []
    load_rows = on_device.load_rows
    monkeypatch.setattr(on_device, "load_rows", lambda *args: loads.append(args) or load_rows(*args))
    assert main(["--quiet", "fit", "--store", str(store.path), "--rank", "3", "--max-iter", "2",
                 "--on-device", "yes"]) == 0
    assert len(loads) == 1  # read into device memory from the store (a small layer otherwise goes via the host)
    assert main(["--quiet", "fit", "--store", str(store.path), "--rank", "3", "--max-iter", "2", "--on-device", "no",
                 "--seed", "1"]) == 0
    assert len(loads) == 1
    capsys.readouterr()


def test_two_devices_hold_their_rows(data, tmp_path):
    """One process, a mesh of 2 simulated devices: rows sharded 300 + 300 over them."""
    X, store, _, memory, tolerances = data
    log = tmp_path / "mesh.log"
    worker = start(["mesh", store.path, tmp_path / "out.npz"], 2, log)
    try:
        assert worker.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    with np.load(tmp_path / "out.npz") as out:
        out = dict(out)
    assert out["shards"].tolist() == [[0, 300], [1, 300]]
    source = json.loads(str(out["source"]))
    assert source["on_device"] is True and source["devices"] == 2 and source["processes"] == 1
    tolerances.check(memory, out["features"], out["codes"], out["loss"], "held on 2 devices")
    np.testing.assert_array_equal(out["auto_features"], out["features"])


def test_two_processes_hold_their_shares(data, tmp_path):
    """Two processes (one device each) share the store: each holds its chunks; they agree on streaming."""
    from sharded_worker import free_port

    X, store, _, memory, tolerances = data
    port = free_port()
    logs = [tmp_path / f"process{p}.log" for p in range(2)]
    workers = [start(["processes", store.path, tmp_path / f"out{p}.npz", port, p], 1, logs[p]) for p in range(2)]
    try:
        for worker, log in zip(workers, logs):
            assert worker.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    outs = []
    for p in range(2):
        with np.load(tmp_path / f"out{p}.npz") as out:
            outs.append(dict(out))
    codes = np.concatenate([out["codes"] for out in outs])
    tolerances.check(memory, outs[0]["features"], codes, outs[0]["loss"], "held by 2 processes")
    streamed = np.concatenate([out["streamed_codes"] for out in outs])
    tolerances.check(memory, outs[0]["streamed_features"], streamed, outs[0]["streamed_loss"],
                     "streamed by 2 processes")
    assert str(outs[0]["message"]).startswith("on_device=True, but the devices of process(es) [1]")
    assert str(outs[1]["message"]).startswith("on_device=True, but X needs about")
