"""The codes-solver registry, and the solver added through it alone: accelerated projected gradient."""

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
from jsnmf.kernels.steps import apg_codes

from snmf_reference import apg_codes_reference, planted_problem


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
    assert "{mu,hals,apg}" in out.replace(" ", "").replace("\n", "")
