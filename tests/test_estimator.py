"""``jsnmf.SNMF``: recovery, faithfulness to the paper's algorithm, the estimator contract, bad input."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jsnmf
from rounding import rounding_tolerances
from jsnmf import SNMF

from snmf_reference import matched_cosines, planted_problem, run_mu


@pytest.fixture(scope="module")
def planted():
    return planted_problem(n=600, d=120, k=6, density=0.15, noise=0.01, seed=0)


@pytest.mark.parametrize("solver", SNMF.solvers)
def test_planted_features_are_recovered(planted, solver):
    X, F_true, _ = planted
    model = SNMF(6, solver=solver, sparsity=0.15, init="svd", max_iter=600, patience=100, seed=0).fit(X)
    cos = matched_cosines(F_true, model.features_)
    assert cos.min() >= 0.95, f"{solver}: matched cosines {np.round(cos, 3)}"
    assert (model.codes_ >= 0).all()


@pytest.mark.parametrize("sparsity", [None, 0.2])
def test_mu_agrees_with_numpy_reference(sparsity):
    X, _, _ = planted_problem(n=300, d=80, k=6, seed=3)
    rng = np.random.default_rng(1)
    G0 = rng.random((300, 6)).astype(np.float32) + 0.01
    F0 = rng.normal(size=(80, 6)).astype(np.float32)
    reference = run_mu(X, G0, 20, p=sparsity)
    model = SNMF(6, solver="mu", sparsity=sparsity, init=(F0, G0), max_iter=20, patience=1000, tol=0.0).fit(X)

    ref_losses = np.array([loss for _, _, loss in reference])
    assert model.n_iter_ == 20
    np.testing.assert_allclose(model.loss_history_, ref_losses, rtol=1e-4)
    best = int(np.argmin(ref_losses))  # the estimator returns the best iterate
    F_ref, G_ref, _ = reference[best]
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    assert rel(model.features_, F_ref) < 1e-4
    assert rel(model.codes_, G_ref) < 1e-4


def test_mu_loss_never_increases_without_sparsification(planted):
    X, _, _ = planted
    model = SNMF(6, solver="mu", sparsity=None, max_iter=150, patience=1000, tol=0.0).fit(X)
    steps = np.diff(model.loss_history_)
    # Float32 statistics: allow rounding of a few ulps of ‖X‖².
    assert steps.max() <= 1e-6 * float(np.sum(X.astype(np.float64) ** 2)), steps.max()


def test_hals_reaches_mu_error_in_fewer_iterations(planted):
    X, _, _ = planted
    mu = SNMF(6, solver="mu", sparsity=0.15, max_iter=200, patience=1000, tol=0.0).fit(X)
    hals = SNMF(6, solver="hals", sparsity=0.15, max_iter=200, patience=1000, tol=0.0).fit(X)
    target = mu.loss_history_.min()
    reached = np.nonzero(hals.loss_history_ <= target * 1.0001)[0]
    assert reached.size and reached[0] < 100


def test_fit_transform_attributes(planted):
    X, _, _ = planted
    model = SNMF(6, max_iter=30)
    G = model.fit_transform(X)
    assert G is model.codes_
    assert model.features_.shape == (120, 6) and model.codes_.shape == (600, 6)
    assert model.loss_history_.shape == (model.n_iter_,) == (30,)
    assert model.relative_error_ == pytest.approx(np.sqrt(model.loss_history_.min() / np.sum(X.astype(np.float64) ** 2)), rel=1e-4)
    recon = model.inverse_transform(model.codes_)
    assert recon.shape == X.shape
    assert np.linalg.norm(X - recon) / np.linalg.norm(X) == pytest.approx(model.relative_error_, rel=1e-3)


def test_transform_on_training_data_reproduces_codes(planted):
    X, _, _ = planted
    model = SNMF(6, solver="hals", sparsity=0.15, init="svd", max_iter=400).fit(X)
    G = model.transform(X)
    assert (G >= 0).all()
    assert np.linalg.norm(G - model.codes_) / np.linalg.norm(model.codes_) < 0.02
    # transform solves the codes problem exactly, so it is never worse than the fitted codes.
    err = lambda G: np.linalg.norm(X - G @ model.features_.T)  # noqa: E731
    assert err(G) <= err(model.codes_) * (1 + 1e-5)


def test_transform_new_tokens_and_score(planted):
    X, _, _ = planted
    model = SNMF(6, solver="hals", sparsity=0.15, init="svd", max_iter=300).fit(X[:500])
    assert model.transform(X[500:]).shape == (100, 6)
    ev = model.score(X[500:])
    assert 0.95 < ev <= 1.0
    centred = X[500:] - X[500:].mean(axis=0)
    recon = model.inverse_transform(model.transform(X[500:]))
    expected = 1 - np.sum((X[500:] - recon) ** 2) / np.sum(centred ** 2)
    assert ev == pytest.approx(expected, abs=1e-4)


def test_same_seed_same_result_different_seed_different(planted):
    X, _, _ = planted
    a = SNMF(6, max_iter=20, seed=11).fit(X)
    b = SNMF(6, max_iter=20, seed=11).fit(X)
    c = SNMF(6, max_iter=20, seed=12).fit(X)
    np.testing.assert_array_equal(a.features_, b.features_)
    np.testing.assert_array_equal(a.codes_, b.codes_)
    assert not np.array_equal(a.codes_, c.codes_)


def test_stopping_rule_patience(planted):
    X, _, _ = planted
    model = SNMF(6, solver="hals", max_iter=5000, tol=1e-3, patience=5).fit(X)
    assert model.n_iter_ < 5000
    losses = model.loss_history_
    sq = float(np.sum(X.astype(np.float64) ** 2))
    # The last `patience` iterations brought no improvement larger than tol·‖X‖² over the reference.
    assert losses[-6] - losses[-5:].min() <= 1e-3 * sq * 1.0001


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_input_is_accepted(planted, dtype):
    X, _, _ = planted
    X_low = jnp.asarray(X, dtype)
    model = SNMF(6, solver="hals", sparsity=0.15, init="svd", max_iter=200).fit(X_low)
    reference = SNMF(6, solver="hals", sparsity=0.15, init="svd", max_iter=200).fit(X)
    assert model.features_.dtype == np.float32
    assert model.relative_error_ == pytest.approx(reference.relative_error_, abs=0.01)


def test_save_load_round_trip_is_exact(planted, tmp_path):
    X, _, _ = planted
    model = SNMF(6, solver="hals", sparsity=0.1, max_iter=40, seed=3).fit(X)
    model.save(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["format"] == "jsnmf.SNMF" and manifest["jsnmf_version"] == jsnmf.__version__
    assert manifest["params"]["rank"] == 6 and manifest["shapes"]["features"] == [120, 6]
    loaded = SNMF.load(tmp_path / "ckpt")
    for name in ("features_", "codes_", "loss_history_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    assert loaded.get_params() == model.get_params()
    assert loaded.n_iter_ == model.n_iter_ and loaded.relative_error_ == model.relative_error_
    np.testing.assert_array_equal(loaded.transform(X[:10]), model.transform(X[:10]))
    # Saving again over the same directory replaces it whole.
    model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=2.5), "rank must be a positive integer"),
    (dict(rank=3, sparsity=0.0), "sparsity must be in"),
    (dict(rank=3, sparsity=1.5), "sparsity must be in"),
    (dict(rank=3, solver="adam"), "unknown solver 'adam'"),
    (dict(rank=3, init="nndsvd"), "unknown init 'nndsvd'"),
    (dict(rank=3, dtype="int8"), "unknown dtype"),
    (dict(rank=3, max_iter=0), "max_iter"),
    (dict(rank=3, patience=0), "patience"),
    (dict(rank=3, tol=-1.0), "tol"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SNMF(**kwargs)


@pytest.mark.parametrize("X, message", [
    (np.ones(10, np.float32), "must be 2-D"),
    (np.ones((2, 3, 4), np.float32), "must be 2-D"),
    (np.ones((0, 5), np.float32), "empty"),
    (np.ones((5, 4), np.int32), "must hold floats"),
    (np.zeros((5, 4), np.float32), "all zeros"),
])
def test_bad_matrices(X, message):
    with pytest.raises(ValueError, match=message):
        SNMF(2).fit(X)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_X_is_rejected_with_position(bad):
    X = np.ones((6, 5), np.float32)
    X[4, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at row 4, column 2\)"):
        SNMF(2).fit(X)


def test_rank_larger_than_data():
    with pytest.raises(ValueError, match=r"rank 6 exceeds min\(n_tokens, d_mlp\) = 5"):
        SNMF(6).fit(np.random.default_rng(0).random((20, 5)).astype(np.float32))


def test_init_pair_is_checked(planted):
    X, _, _ = planted
    with pytest.raises(ValueError, match="init F0 must have shape"):
        SNMF(6, init=(np.ones((5, 6)), np.ones((600, 6)))).fit(X)
    with pytest.raises(ValueError, match="non-negative"):
        SNMF(6, init=(np.ones((120, 6)), -np.ones((600, 6)))).fit(X)


def test_use_before_fit_and_wrong_width(planted):
    X, _, _ = planted
    with pytest.raises(ValueError, match="not fitted yet"):
        SNMF(3).transform(X)
    model = SNMF(3, max_iter=5).fit(X)
    with pytest.raises(ValueError, match="X has 100 columns but this SNMF was fitted on d_mlp = 120"):
        model.transform(X[:, :100])


def test_loading_something_else_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a jsnmf checkpoint"):
        SNMF.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not a jsnmf SNMF checkpoint"):
        SNMF.load(tmp_path)


def _clone_by_hand(model):
    """What ``sklearn.base.clone`` does: a new object from deep copies of ``get_params(deep=False)``,
    whose own parameters must then be those very objects (the constructor stores them unchanged)."""
    import copy

    params = {name: copy.deepcopy(value) for name, value in model.get_params(deep=False).items()}
    fresh = type(model)(**params)
    for name, value in fresh.get_params(deep=False).items():
        assert value is params[name], f"the constructor changed {name!r}"
    return fresh


def test_scikit_learn_parameter_contract(planted):
    import inspect

    X, _, _ = planted
    model = SNMF(4, solver="hals", sparsity=None, max_iter=5)
    constructor = [n for n in inspect.signature(SNMF.__init__).parameters if n != "self"]
    assert list(model.get_params()) == constructor == list(model.get_params(deep=False))
    assert model.set_params(max_iter=7, tol=0.0) is model and model.max_iter == 7 and model.tol == 0.0
    with pytest.raises(ValueError, match="invalid parameters \\['nope'\\]"):
        model.set_params(nope=1)
    with pytest.raises(ValueError, match="unknown solver"):
        model.set_params(solver="nope")
    model.set_params(solver="hals")

    model.fit(X)
    fresh = _clone_by_hand(model)
    assert fresh.get_params() == model.get_params() and not hasattr(fresh, "features_")
    np.testing.assert_array_equal(fresh.fit(X).features_, model.features_)


def test_sklearn_clone_works(planted):
    from sklearn import base

    model = SNMF(4, max_iter=5, init="svd")
    fresh = base.clone(model)
    assert fresh is not model and fresh.get_params() == model.get_params()


def test_runtime_settings_belong_to_fit_not_to_the_model(planted, tmp_path):
    """The constructor holds the algorithm; where a fit runs is given to ``fit``, and a model saved
    before that split (runtime settings among its params) still loads."""
    X, _, _ = planted
    assert set(SNMF(4).get_params()) == {"rank", "solver", "sparsity", "init", "max_iter", "tol", "patience",
                                         "seed", "dtype", "ridge", "hals_sweeps"}
    with pytest.raises(TypeError, match="chunk_tokens"):
        SNMF(4, chunk_tokens=100)
    in_memory, tolerances = rounding_tolerances(lambda: SNMF(4, max_iter=5), X)
    streamed = SNMF(4, max_iter=5).fit(X, chunk_tokens=100, codes_on_disk=tmp_path / "codes",
                                       checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, max_to_keep=1)
    tolerances.check(in_memory, streamed.features_, streamed.codes_, streamed.loss_history_, "streamed")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["5"]
    in_memory.save(tmp_path / "saved")
    manifest_path = tmp_path / "saved" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["params"].update(progress=False, mesh=None, chunk_tokens=None, codes_on_disk=False,
                              checkpoint_every=50, max_to_keep=2)
    manifest_path.write_text(json.dumps(manifest))
    assert SNMF.load(tmp_path / "saved").get_params() == in_memory.get_params()


# -- non-finite data and iterates (hardening): a clear error, never a NaN result or a checkpoint ----

@pytest.mark.parametrize("dtype, scale", [("float32", 1e20), ("float16", 1e5)])
def test_values_that_overflow_the_dtype_raise_instead_of_a_nan_fit(dtype, scale):
    """Used to return relative_error_ = nan after one iteration with an empty loss_history_."""
    from jsnmf.fit.loop import NonFiniteError

    X = np.abs(np.random.default_rng(0).standard_normal((200, 32))).astype(np.float32) * scale
    with pytest.raises(NonFiniteError, match=r"sum of squares of X is inf.*too large for the fit's dtype"):
        SNMF(4, max_iter=20, dtype=dtype).fit(X)


def test_overflow_with_checkpoints_exits_promptly_and_writes_no_checkpoint(tmp_path):
    """With checkpoint_dir set, the NaN fit used to fail inside orbax's save and never exit."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import numpy as np
        from jsnmf import SNMF
        X = np.abs(np.random.default_rng(0).standard_normal((200, 32))).astype("f4") * 1e20
        SNMF(4, max_iter=20).fit(X, checkpoint_dir={str(tmp_path / "ckpt")!r}, progress=False)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "NonFiniteError" in done.stderr and "sum of squares of X is inf" in done.stderr
    steps = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_dir() and p.name.isdigit()]
    assert steps == [], f"checkpoints were written: {steps}"


def test_non_finite_losses_are_told_from_padding():
    from jsnmf.fit.loop import NonFiniteError, check_finite_losses

    check_finite_losses(np.array([3.0, 2.0, np.nan], np.float32), advanced=2, start=0)  # one fit ended early
    check_finite_losses(np.array([[3.0, 2.0, 1.0], [3.0, np.nan, np.nan]], np.float32), advanced=3, start=5)
    with pytest.raises(NonFiniteError, match=r"loss became nan at iteration 12"):
        check_finite_losses(np.array([3.0, np.nan, 1.0], np.float32), advanced=3, start=10)
    with pytest.raises(NonFiniteError, match=r"loss became inf at iteration 2 \(fit 1\)"):
        check_finite_losses(np.array([[3.0, 2.0], [3.0, np.inf]], np.float32), advanced=2, start=0)
    with pytest.raises(NonFiniteError, match=r"iteration 2 \(fit 0\)"):
        check_finite_losses(np.array([[3.0, np.nan, 1.0], [1.0, 1.0, 1.0]], np.float32), advanced=3, start=0)
