"""The fit sharded over a device mesh equals the single-device fit.

Several devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts, so
one worker process (``sharded_worker.py sharded``) fits everything on meshes of 4 and 8 simulated
CPU devices while this process computes the single-device references; the rest of the suite keeps
one device. The in-process tests use a 1-device mesh, which runs the same sharded code.
"""

import numpy as np
import pytest

import jax
from jax.sharding import Mesh

from jsnmf import SNMF
from jsnmf.distributed import RowLayout, global_rows, process_token_range
from jsnmf.kernels.fit import SolverConfig, initial_state, run_block
from jsnmf.kernels.sharded import block_runner, state_initializer

import sharded_worker as worker
from rounding import relative, rounding_tolerances
from sharded_worker import CASES, RANK, SETTINGS, case_name


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """(X, X_new, single-device references, the worker's results on 4 and 8 devices).

    Each reference is ``(fitted SNMF, Tolerances)``: the bounds of its problem (tests/rounding.py).
    """
    folder = tmp_path_factory.mktemp("sharded")
    X, X_new = worker.problem()
    np.savez(folder / "in.npz", X=X, X_new=X_new)
    log = folder / "worker.log"
    process = worker.start_worker(["sharded", folder / "in.npz", folder / "out.npz"], 8, log)
    try:
        references = {
            case_name(solver, sparsity): rounding_tolerances(
                lambda: SNMF(RANK, solver=solver, sparsity=sparsity, **SETTINGS), X,
                X_new if (solver, sparsity) == ("hals", 0.2) else None)
            for solver, sparsity in CASES
        }
        references["svd"] = rounding_tolerances(
            lambda: SNMF(RANK, solver="hals", sparsity=0.2, init="svd", **SETTINGS), X[:296])
        references["tokens"] = rounding_tolerances(
            lambda: SNMF(RANK, solver="hals", sparsity=0.2, init="tokens", **SETTINGS), X)
        rng = np.random.default_rng(5)
        G0 = rng.random((X.shape[0], RANK)).astype(np.float32)
        F0 = rng.normal(size=(X.shape[1], RANK)).astype(np.float32)
        references["pair"] = rounding_tolerances(
            lambda: SNMF(RANK, solver="mu", sparsity=0.2, init=(F0, G0), **SETTINGS), X)
        for name, X_layer in {"a": X, "b": X[:, ::-1] * 2.0}.items():
            references[f"layer_{name}"] = rounding_tolerances(
                lambda: SNMF(RANK, solver="mu", sparsity=0.2, **SETTINGS), X_layer)
        for init in ("random", "kmeans"):
            references[f"streamed_{init}"] = rounding_tolerances(
                lambda: SNMF(RANK, solver="hals", sparsity=0.2, init=init, **SETTINGS), X, chunk_tokens=64)
        references["streamed_random_ehals"] = rounding_tolerances(
            lambda: SNMF(RANK, solver="ehals", sparsity=0.2, **SETTINGS), X, chunk_tokens=64)
        worker.finish_workers([process], [log], timeout=480)
    finally:
        worker.kill_workers([process])
    with np.load(folder / "out.npz") as out:
        results = dict(out)
    return X, X_new, references, results, folder / "sharded_checkpoint"


@pytest.mark.parametrize("mesh", ["4", "8"])
@pytest.mark.parametrize("solver, sparsity", CASES)
def test_sharded_fit_equals_single_device(sharded_run, mesh, solver, sparsity):
    X, _, references, results, _ = sharded_run
    assert int(results["device_count"]) == 8
    key = f"{mesh}_{case_name(solver, sparsity)}"
    assert results[f"{key}_codes"].shape == (301, RANK)
    reference, tolerances = references[case_name(solver, sparsity)]
    tolerances.check(reference, results[f"{key}_features"], results[f"{key}_codes"], results[f"{key}_loss"], key)


@pytest.mark.parametrize("mesh", ["4", "8", "4x2"])
def test_sharded_transform_and_score(sharded_run, mesh):
    _, X_new, references, results, _ = sharded_run
    reference, tolerances = references["hals_sparse"]
    key = f"{mesh}_hals_sparse"
    tolerances.check_transform(reference, X_new, results[f"{key}_transform"], results[f"{key}_score"], key)


def test_mesh_with_a_second_axis_shards_rows_over_data_only(sharded_run):
    _, _, references, results, _ = sharded_run
    reference, tolerances = references["hals_sparse"]
    tolerances.check(reference, results["4x2_hals_sparse_features"], results["4x2_hals_sparse_codes"],
                     results["4x2_hals_sparse_loss"])


def test_sharded_svd_tokens_and_explicit_starts(sharded_run):
    _, _, references, results, _ = sharded_run
    # 296 rows: no padding on 8 devices, so the SVD start is the same as on one device; the tokens start
    # runs on all 301 rows (padded), its codes solved row by row.
    for name in ("svd", "tokens", "pair"):
        reference, tolerances = references[name]
        assert tolerances.features >= relative(results[f"{name}_features"], reference.features_), name
        assert tolerances.loss >= relative(results[f"{name}_loss"], reference.loss_history_), name


def test_layers_fitted_together_on_a_mesh(sharded_run):
    _, _, references, results, _ = sharded_run
    for name in ("a", "b"):
        reference, tolerances = references[f"layer_{name}"]
        tolerances.check(reference, results[f"layers_{name}_features"], results[f"layers_{name}_codes"],
                         results[f"layers_{name}_loss"], f"layer {name}")


def test_sharded_checkpoint_resumes_on_another_mesh_and_on_one_device(sharded_run):
    """10 iterations on 4 devices, checkpointed; resumed to 15 on 8 devices; then to 20 on one."""
    X, _, references, results, checkpoint_dir = sharded_run
    reference, tolerances = references["hals_sparse"]
    tolerances.check(reference, results["resumed_features"], results["resumed_codes"], results["resumed_loss"])
    longer = dict(SETTINGS, max_iter=20)
    at_once, longer_tolerances = rounding_tolerances(lambda: SNMF(RANK, solver="hals", sparsity=0.2, **longer), X)
    moved = SNMF(RANK, solver="hals", sparsity=0.2, **longer).fit(X, checkpoint_dir=checkpoint_dir, resume=True)
    assert moved.n_iter_ == 20
    longer_tolerances.check(at_once, moved.features_, moved.codes_, moved.loss_history_)


def test_sharded_checkpoint_of_an_extrapolated_solver_resumes_on_another_mesh(sharded_run):
    """ehals: 10 iterations on 4 devices, checkpointed with its momentum; resumed to 15 on 8."""
    _, _, references, results, _ = sharded_run
    reference, tolerances = references["ehals_sparse"]
    tolerances.check(reference, results["resumed_ehals_features"], results["resumed_ehals_codes"],
                     results["resumed_ehals_loss"])


@pytest.mark.parametrize("mesh", ["4", "8"])
@pytest.mark.parametrize("init", ["random", "kmeans", "random_ehals"])
def test_streamed_fit_over_a_mesh_equals_single_device(sharded_run, mesh, init):
    """Chunks of 64 rows (the last 45), each split over the mesh: the single-device streamed fit
    (``random_ehals``: the extrapolated solver, its previous codes read beside the codes)."""
    _, _, references, results, _ = sharded_run
    key = f"streamed_{mesh}_{init}"
    reference, tolerances = references[f"streamed_{init}"]
    # The 20 Lloyd passes of the k-means start amplify rounding too: the perturbed fits include them.
    tolerances.check(reference, results[f"{key}_features"], results[f"{key}_codes"], results[f"{key}_loss"], key)


def test_mesh_without_data_axis_is_refused(sharded_run):
    _, _, _, results, _ = sharded_run
    assert "no 'data' axis" in str(results["bad_mesh_error"])
    one = np.array(jax.devices()[:1])
    with pytest.raises(ValueError, match="no 'data' axis"):
        SNMF(3).fit(np.ones((8, 4), np.float32), mesh=Mesh(one, ("model",)))
    with pytest.raises(ValueError, match="must be a jax.sharding.Mesh"):
        SNMF(3).fit(np.ones((8, 4), np.float32), mesh="data")


# -- in this process: one device ------------------------------------------------------------------

def one_device_mesh():
    return Mesh(np.array(jax.devices()[:1]), ("data",))


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_padding_rows_keep_zero_codes_and_add_nothing(solver):
    """Zero rows of X with zero codes stay zero under both solvers and change no statistic."""
    rng = np.random.default_rng(0)
    X = rng.random((40, 12)).astype(np.float32)
    G0 = rng.random((40, 3)).astype(np.float32) + 0.1
    F0 = rng.normal(size=(12, 3)).astype(np.float32)
    X_padded = np.concatenate([X, np.zeros((9, 12), np.float32)])
    G0_padded = np.concatenate([G0, np.zeros((9, 3), np.float32)])
    config = SolverConfig(solver=solver, n_keep=None)
    sq = np.float32(np.sum(X.astype(np.float64) ** 2))
    limits = (np.float32(0.0), np.int32(1000), np.int32(1000))

    plain, plain_losses = run_block(X, sq, initial_state(X, F0, G0), *limits, config=config, block_size=8)
    mesh = one_device_mesh()
    state = state_initializer(mesh)(X_padded, F0, G0_padded)
    padded, padded_losses = block_runner(mesh, config, 8)(X_padded, sq, state, *limits, np.int32(1000))

    assert int(padded.iteration) == 8
    assert np.all(np.asarray(padded.G)[40:] == 0.0) and np.all(np.asarray(padded.best_G)[40:] == 0.0)
    np.testing.assert_allclose(np.asarray(padded.G)[:40], np.asarray(plain.G), rtol=1e-5, atol=1e-7)
    for name in ("XtG", "GtG"):
        np.testing.assert_allclose(getattr(padded.stats, name), getattr(plain.stats, name), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded_losses, plain_losses, rtol=1e-5)


def test_one_device_mesh_runs_the_sharded_path():
    X, X_new = worker.problem()
    settings = dict(solver="hals", sparsity=0.2, **SETTINGS)
    plain, tolerances = rounding_tolerances(lambda: SNMF(RANK, **settings), X, X_new)
    sharded = SNMF(RANK, **settings).fit(X, mesh=one_device_mesh())
    tolerances.check(plain, sharded.features_, sharded.codes_, sharded.loss_history_)
    assert sharded.n_iter_ == plain.n_iter_ == SETTINGS["max_iter"]
    assert sharded.relative_error_ == pytest.approx(plain.relative_error_, rel=tolerances.loss)
    tolerances.check_transform(plain, X_new, sharded.transform(X_new), sharded.score(X_new))
    # A global X assembled once can be fitted and scored again without re-assembling.
    rows = global_rows(X, one_device_mesh())
    assert rows.layout.n_rows == 301 and rows.n_columns == 60
    again = SNMF(RANK, **settings).fit(rows, mesh=one_device_mesh())
    np.testing.assert_array_equal(again.features_, sharded.features_)


def test_sharded_input_is_checked():
    mesh = one_device_mesh()
    X = np.ones((6, 5), np.float32)
    X[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at row 4, column 2\)"):
        SNMF(2).fit(X, mesh=mesh)
    with pytest.raises(ValueError, match="all zeros"):
        SNMF(2).fit(np.zeros((6, 5), np.float32), mesh=mesh)
    with pytest.raises(ValueError, match=r"rank 6 exceeds min\(n_tokens, d_mlp\) = 5"):
        SNMF(6).fit(np.ones((20, 5), np.float32), mesh=mesh)


def test_row_layout_pads_and_recovers_local_rows():
    layout = RowLayout.build(one_device_mesh(), [7])
    assert (layout.n_rows, layout.n_padded, layout.local_offset, layout.local_block) == (7, 7, 0, 7)
    local = np.arange(21, dtype=np.float32).reshape(7, 3)
    np.testing.assert_array_equal(layout.local_part(layout.assemble(local)), local)
    assert np.asarray(layout.valid()).all()


class _Chunks:
    def __init__(self, bounds):
        self.chunk_bounds, self.path = bounds, "store"


@pytest.mark.parametrize("sizes, count", [([100] * 10, 4), ([64, 64, 64, 10], 3), ([5, 500, 5, 5], 4), ([9], 1)])
def test_process_token_ranges_cover_the_store_in_order(sizes, count):
    stops = np.cumsum(sizes)
    store = _Chunks([(int(stop - size), int(stop)) for size, stop in zip(sizes, stops)])
    ranges = [process_token_range(store, p, count) for p in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == stops[-1]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in process order
    assert all(start < stop for start, stop in ranges)  # nobody is left without tokens
    starts = {start for start, _ in store.chunk_bounds}
    assert all(start in starts for start, _ in ranges)  # whole chunks


def test_process_token_ranges_balance_tokens():
    store = _Chunks([(i * 100, (i + 1) * 100) for i in range(12)])
    assert [process_token_range(store, p, 4) for p in range(4)] == [(0, 300), (300, 600), (600, 900), (900, 1200)]
    with pytest.raises(ValueError, match="2 chunks cannot be shared by 3 processes"):
        process_token_range(_Chunks([(0, 5), (5, 9)]), 0, 3)
