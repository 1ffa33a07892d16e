"""The codes-solver registry, and the solvers added through it alone: accelerated projected gradient (``apg``)
and HALS with the codes extrapolated between iterations (``ehals``)."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls

from jsnmf import SNMF
from jsnmf.cli import build_parser
from jsnmf.kernels.fit import SolverConfig
from jsnmf.kernels.solvers import APG_STEPS, get_solver, register_solver, solver_names
from jsnmf.kernels.steps import apg_codes, extrapolated_codes, extrapolated_statistics, hals_codes

from rounding import EPS32, rounding_tolerances
from snmf_reference import (apg_codes_reference, hals_codes_reference, planted_problem, run_extrapolated)


def nnls_problem(seed=4, n=25, d=40, k=6):
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(d, k))
    X = np.maximum(rng.normal(size=(n, k)), 0) @ F.T + 0.1 * rng.normal(size=(n, d))
    return X, F, X @ F, F.T @ F


@pytest.mark.parametrize("n_steps", [1, 2, 7])
def test_apg_codes_match_the_numpy_formula(n_steps):
    _, _, P, Q = nnls_problem()
    G0 = np.random.default_rng(1).random((25, 6))
    expected = apg_codes_reference(G0, P, Q, n_steps)
    got = apg_codes(n_steps)(*(jnp.asarray(a, jnp.float32) for a in (G0, P, Q)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_apg_codes_reach_the_nnls_optimum_and_keep_zero_rows_zero():
    X, F, P, Q = nnls_problem()
    P[3], G0 = 0.0, np.ones((25, 6))
    G0[3] = 0.0  # a padding row: P = 0 and G = 0
    G = np.asarray(apg_codes(2000)(*(jnp.asarray(a, jnp.float32) for a in (G0, P, Q))))
    assert (G >= 0).all() and (G[3] == 0).all()
    expected = np.stack([nnls(F, x)[0] for x in np.delete(X, 3, axis=0)])
    np.testing.assert_allclose(np.delete(G, 3, axis=0), expected, atol=2e-3)


def test_apg_is_registered_and_reaches_every_consumer():
    assert solver_names()[:3] == ("mu", "hals", "apg")
    assert "apg" in SNMF.solvers
    assert SolverConfig(solver="apg").codes_update is not None
    assert get_solver("apg").summary
    solver_option = next(a for a in build_parser()._subparsers._group_actions[0].choices["fit"]._actions
                         if a.dest == "solver")
    assert tuple(solver_option.choices) == solver_names()
    with pytest.raises(ValueError, match=r"unknown solver 'nope'; expected one of \('mu', 'hals', 'apg'"):
        SNMF(3, solver="nope")
    with pytest.raises(ValueError, match="registered already"):
        register_solver("mu", lambda config: None, "again")


def test_apg_fit_recovers_planted_features_and_stays_finite():
    X, F_true, _ = planted_problem(n=600, d=120, k=6, density=0.15, noise=0.01, seed=0)
    model = SNMF(6, solver="apg", sparsity=0.15, init="svd", max_iter=300, seed=0).fit(X)
    assert np.isfinite(model.loss_history_).all() and (model.codes_ >= 0).all()
    # apg makes more progress per pass than mu on the same budget.
    mu = SNMF(6, solver="mu", sparsity=0.15, init="svd", max_iter=30, seed=0).fit(X)
    fast = SNMF(6, solver="apg", sparsity=0.15, init="svd", max_iter=30, seed=0).fit(X)
    assert fast.relative_error_ < mu.relative_error_
    assert APG_STEPS >= 1


def test_cli_help_lists_registered_solvers():
    out = subprocess.run([sys.executable, "-m", "jsnmf", "fit", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "{" + ",".join(solver_names()) + "}" in out.replace(" ", "").replace("\n", "")
    assert solver_names()[:4] == ("mu", "hals", "apg", "ehals")


# -- ehals: HALS with the codes extrapolated between iterations (Ang & Gillis 2019) ---------------


@pytest.mark.parametrize("n_sweeps", [1, 4])
def test_hals_codes_match_the_numpy_formula(n_sweeps):
    _, _, P, Q = nnls_problem()
    G0 = np.random.default_rng(1).random((25, 6))
    expected = hals_codes_reference(G0, P, Q, n_sweeps)
    got = np.asarray(hals_codes(n_sweeps)(*(jnp.asarray(a, jnp.float32) for a in (G0, P, Q))))
    # float32 sweeps: each coordinate step sums k terms of P and G Q
    size = np.abs(P).max() + np.abs(expected).max() * np.abs(Q).sum(axis=0).max()
    bound = 8 * n_sweeps * EPS32 * size / Q.diagonal().min()
    np.testing.assert_allclose(got, expected, rtol=0, atol=bound)


@pytest.mark.parametrize("step", [0.0, 0.3, 1.0])
def test_extrapolated_statistics_are_the_products_of_the_extrapolated_codes(step):
    rng = np.random.default_rng(2)
    X, G, G_prev = rng.normal(size=(50, 12)), rng.random((50, 4)), rng.random((50, 4))
    scale = rng.uniform(0.5, 2.0, 4)
    G_hat = G + step * (G - G_prev / scale)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    XtG, GtG = (np.asarray(a) for a in extrapolated_statistics(
        f32(X.T @ G), f32(G.T @ G), f32(X.T @ G_prev), f32(G_prev.T @ G_prev), f32(G.T @ G_prev), f32(1 / scale),
        f32(step)))
    start = np.asarray(extrapolated_codes(f32(G), f32(G_prev), f32(1 / scale), f32(step)))
    np.testing.assert_allclose(start, np.maximum(G_hat, 0), rtol=4 * EPS32, atol=4 * EPS32 * (1 + step) * G.max())
    # float32 rounding of each of the (up to four) terms summed, each up to (1+β)² times the products' size
    terms = (1 + step) ** 2 * (np.abs(G).T @ np.abs(G) + 2 * np.abs(G).T @ np.abs(G_prev / scale)
                               + np.abs(G_prev / scale).T @ np.abs(G_prev / scale))
    np.testing.assert_allclose(GtG, G_hat.T @ G_hat, rtol=0, atol=float(8 * EPS32 * terms.max()))
    XtG_terms = (1 + step) * np.abs(X).T @ (np.abs(G) + np.abs(G_prev / scale))
    np.testing.assert_allclose(XtG, X.T @ G_hat, rtol=0, atol=float(8 * EPS32 * XtG_terms.max()))
    if step == 0.0:  # no extrapolation is the plain iteration, bit for bit
        np.testing.assert_array_equal(start, np.asarray(f32(G)))
        np.testing.assert_array_equal(GtG, np.asarray(f32(G.T @ G)))


def test_ehals_is_registered_with_its_extrapolation():
    solver = get_solver("ehals")
    assert "ehals" in SNMF.solvers and solver.summary
    assert solver.extrapolation is not None and get_solver("hals").extrapolation is None
    assert SolverConfig(solver="ehals").extrapolation() == solver.extrapolation


def test_ehals_fit_matches_the_numpy_reference():
    """The compiled loop (momentum carried in the state, ``F`` from the extrapolated statistics) against
    the formulas with ``Ĝ`` formed explicitly, restarts included."""
    X, _, _ = planted_problem(n=300, d=80, k=6, seed=4)  # its loss rises at iteration 8: a restart
    rng = np.random.default_rng(1)
    G0 = rng.random((300, 6)).astype(np.float32) + 0.01
    F0 = rng.normal(size=(80, 6)).astype(np.float32)
    n_iter, sparsity = 25, 0.2
    rule = get_solver("ehals").extrapolation
    reference = run_extrapolated(X, G0, n_iter, lambda G, P, Q: hals_codes_reference(G, P, Q, 4), p=sparsity,
                                 **rule._asdict())
    model, tolerances = rounding_tolerances(
        lambda: SNMF(6, solver="ehals", sparsity=sparsity, init=(F0, G0), max_iter=n_iter, patience=1000, tol=0.0), X)
    losses = np.array([loss for _, _, loss in reference])
    # The premise: the loss rose at least once (a restart is exercised), and every rise-or-fall decision
    # is clear of rounding, so float32 and float64 take the same branches.
    assert (np.diff(losses) > 0).any()
    assert (np.abs(np.diff(losses)) / losses[1:]).min() > tolerances.loss
    best = int(np.argmin(losses))
    F_ref, G_ref, _ = reference[best]
    tolerances.check(model, F_ref, G_ref, losses, "ehals vs the NumPy reference")
    assert model.n_iter_ == n_iter and (model.codes_ >= 0).all()


@pytest.mark.parametrize("chunk_tokens", [None, 128])
def test_ehals_resumes_to_the_uninterrupted_fit(tmp_path, chunk_tokens):
    """The momentum is in the checkpoint: a fit stopped at 12 iterations and resumed equals one run straight."""
    X, _, _ = planted_problem(n=1000, d=64, k=6, density=0.2, noise=0.1, seed=0)  # 128-row chunks: the last 104
    settings = dict(solver="ehals", sparsity=0.2, tol=0.0, patience=1000)
    whole = SNMF(6, max_iter=25, **settings).fit(X, chunk_tokens=chunk_tokens)
    SNMF(6, max_iter=12, **settings).fit(X, chunk_tokens=chunk_tokens, checkpoint_dir=tmp_path, checkpoint_every=5)
    resumed = SNMF(6, max_iter=25, **settings).fit(X, chunk_tokens=chunk_tokens, checkpoint_dir=tmp_path,
                                                  checkpoint_every=5, resume=True)
    np.testing.assert_array_equal(resumed.loss_history_, whole.loss_history_)
    np.testing.assert_array_equal(resumed.features_, whole.features_)
    np.testing.assert_array_equal(resumed.codes_, whole.codes_)
