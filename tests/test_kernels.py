"""The JAX kernels against plain NumPy written from the formulas."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls

from jsnmf.kernels.fit import solve_codes
from jsnmf.fit.starts import INITIALIZERS, initial_factors
from jsnmf.kernels.steps import (
    chunk_statistics,
    codes_step,
    features_step,
    hals_codes,
    keep_count,
    least_squares_features,
    loss_from_statistics,
    mu_codes,
    sparsify_columns,
)
import jax

from snmf_reference import planted_problem, sparsify


@pytest.fixture(scope="module")
def problem():
    X, _, G = planted_problem(n=200, d=60, k=5, seed=1)
    rng = np.random.default_rng(2)
    G0 = rng.random((200, 5)).astype(np.float32) + 0.05
    return X, G0


def test_keep_count_is_ceil_of_fraction():
    assert keep_count(0.01, 3072) == 31
    assert keep_count(0.5, 7) == 4
    assert keep_count(1.0, 10) == 10
    assert keep_count(None, 10) is None


def test_least_squares_features_matches_normal_equations(problem):
    X, G0 = problem
    stats = chunk_statistics(jnp.asarray(X), jnp.asarray(G0))
    F = np.asarray(least_squares_features(stats.XtG, stats.GtG, 1e-6))
    X64, G64 = X.astype(np.float64), G0.astype(np.float64)
    expected = X64.T @ G64 @ np.linalg.inv(G64.T @ G64 + 1e-6 * np.eye(5))
    np.testing.assert_allclose(F, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_sparsify_keeps_largest_magnitudes_per_column():
    rng = np.random.default_rng(0)
    F = rng.normal(size=(50, 7)).astype(np.float32)
    out = np.asarray(sparsify_columns(jnp.asarray(F), 5))
    np.testing.assert_array_equal(out, sparsify(F, 5 / 50))
    assert ((out != 0).sum(axis=0) == 5).all()
    assert (out[out != 0] == F[out != 0]).all()  # kept entries keep their sign and value


def test_features_step_rescales_columns_by_code_norms(problem):
    X, G0 = problem
    stats = chunk_statistics(jnp.asarray(X), jnp.asarray(G0))
    F, scale = features_step(stats.XtG, stats.GtG, ridge=1e-6, n_keep=None)
    np.testing.assert_allclose(np.asarray(scale), np.linalg.norm(G0, axis=0), rtol=1e-5)
    unscaled = least_squares_features(stats.XtG, stats.GtG, 1e-6)
    np.testing.assert_allclose(np.asarray(F), np.asarray(unscaled) * np.asarray(scale), rtol=1e-5)


def test_mu_codes_matches_formula():
    rng = np.random.default_rng(3)
    G, P, Q = rng.random((30, 4)), rng.normal(size=(30, 4)), rng.normal(size=(4, 4))
    Q = Q + Q.T
    pos = lambda M: (np.abs(M) + M) / 2  # noqa: E731
    neg = lambda M: (np.abs(M) - M) / 2  # noqa: E731
    expected = G * np.sqrt((pos(P) + G @ neg(Q)) / (neg(P) + G @ pos(Q) + 1e-6))
    got = mu_codes(1e-6)(*(jnp.asarray(a, jnp.float32) for a in (G, P, Q)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_hals_sweeps_reach_the_nnls_optimum():
    rng = np.random.default_rng(4)
    F = rng.normal(size=(40, 6))
    X = np.maximum(rng.normal(size=(25, 6)), 0) @ F.T + 0.1 * rng.normal(size=(25, 40))
    P, Q = X @ F, F.T @ F
    G = hals_codes(200)(jnp.ones((25, 6)), jnp.asarray(P, jnp.float32), jnp.asarray(Q, jnp.float32))
    expected = np.stack([nnls(F, x)[0] for x in X])
    np.testing.assert_allclose(np.asarray(G), expected, atol=1e-3)


def test_solve_codes_is_nnls_per_token():
    rng = np.random.default_rng(5)
    F = rng.normal(size=(30, 5))
    X = rng.normal(size=(20, 30))  # codes hit the bound often
    G = np.asarray(solve_codes(jnp.asarray(X, jnp.float32), jnp.asarray(F, jnp.float32), jnp.float32(1e-7)))
    expected = np.stack([nnls(F, x)[0] for x in X])
    assert (G >= 0).all()
    np.testing.assert_allclose(G, expected, atol=1e-4)


def test_loss_from_statistics_equals_direct_residual(problem):
    X, G0 = problem
    Xj = jnp.asarray(X)
    stats = chunk_statistics(Xj, jnp.asarray(G0))
    F, scale = features_step(stats.XtG, stats.GtG, ridge=1e-6, n_keep=10)
    Q = F.T @ F
    G, new_stats = codes_step(Xj, jnp.asarray(G0), F, Q, scale, mu_codes())
    direct = np.sum((X.astype(np.float64) - np.asarray(G, np.float64) @ np.asarray(F, np.float64).T) ** 2)
    got = float(loss_from_statistics(jnp.sum(Xj * Xj), new_stats, Q))
    assert got == pytest.approx(direct, rel=1e-4)


def test_chunked_statistics_sum_to_the_whole(problem):
    X, G0 = problem
    whole = chunk_statistics(jnp.asarray(X), jnp.asarray(G0))
    parts = [chunk_statistics(jnp.asarray(X[i:i + 64]), jnp.asarray(G0[i:i + 64])) for i in range(0, 200, 64)]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    for a, b in zip(whole, total):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(INITIALIZERS))
def test_initializers_are_seeded_shaped_and_positive(problem, name):
    X, _ = problem
    F0, G0 = initial_factors(name, 7, jnp.asarray(X), 5)
    F1, G1 = initial_factors(name, 7, jnp.asarray(X), 5)
    assert F0.shape == (60, 5) and G0.shape == (200, 5)
    assert bool((G0 > 0).all()), "initial codes must be strictly positive for the multiplicative update"
    np.testing.assert_array_equal(np.asarray(G0), np.asarray(G1))
    np.testing.assert_array_equal(np.asarray(F0), np.asarray(F1))


def test_svd_init_spans_the_top_singular_subspace(problem):
    X, _ = problem
    F0, _ = initial_factors("svd", 0, jnp.asarray(X), 5)
    V = np.linalg.svd(X.astype(np.float64), full_matrices=False)[2][:5].T
    # Principal angles between the subspaces are ~0: the projection of F0 onto span(V) keeps its norm.
    F0 = np.asarray(F0, np.float64)
    projected = V @ (V.T @ F0)
    np.testing.assert_allclose(np.linalg.norm(projected, axis=0), np.linalg.norm(F0, axis=0), rtol=1e-3)


def relative_error(actual, expected) -> float:
    return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))


def test_tokens_init_is_sampled_rows_and_clipped_least_squares(problem):
    """F0: k distinct rows of X; G0 = max(P (Q + λI)⁻¹, 1e-6), P = X F0, Q = F0ᵀF0, λ = 1e-6·mean diag Q
    (float64 NumPy from the formula); both the in-memory fused start and the pass-by-pass start."""
    from jsnmf.fit.arrays import started_state

    X, _ = problem
    F0, G0 = (np.asarray(a) for a in initial_factors("tokens", 3, jnp.asarray(X), 5))
    matches = [np.nonzero((X == F0[:, j][None, :]).all(axis=1))[0] for j in range(5)]
    assert all(m.size >= 1 for m in matches), "every initial feature is a row of X"
    assert len({int(m[0]) for m in matches}) == 5, "the sampled rows are distinct"
    F, Xd = F0.astype(np.float64), X.astype(np.float64)
    Q = F.T @ F
    expected = np.maximum(np.linalg.solve(Q + 1e-6 * np.mean(np.diag(Q)) * np.eye(5), (Xd @ F).T).T, 1e-6)
    # A float32 solve of (Q + λI) G = P: norm-wise relative error ≲ cond(Q)·eps32 (10×: the products too).
    tolerance = 10 * np.linalg.cond(Q) * np.finfo(np.float32).eps
    assert relative_error(G0, expected) <= tolerance
    assert (G0 > 0).all() and np.mean(G0 > 1e-6) > 0.2, "codes are positive and not all at the floor"
    # The in-memory fit compiles the same start into one executable (TRACEABLE): the same rows, and the
    # same codes up to the rounding of the differently fused float32 products.
    state = started_state(jnp.asarray(X), jax.random.key(3), init="tokens", k=5)
    assert relative_error(np.asarray(state.G), expected) <= tolerance


def test_tokens_init_does_not_depend_on_the_scale_of_X(problem):
    X, _ = problem
    F0, G0 = (np.asarray(a) for a in initial_factors("tokens", 3, jnp.asarray(X), 5))
    _, G1 = initial_factors("tokens", 3, jnp.asarray(X * 1000.0), 5)
    F = F0.astype(np.float64)
    tolerance = 10 * np.linalg.cond(F.T @ F) * np.finfo(np.float32).eps  # as in the test above
    assert relative_error(np.asarray(G1), G0) <= tolerance
    # A repeated token twice in the sample leaves Q singular: the ridge keeps the codes finite.
    X_repeated = np.repeat(X[:3], 40, axis=0)  # 3 distinct rows, 120 tokens: k=5 samples must repeat
    F2, G2 = initial_factors("tokens", 0, jnp.asarray(X_repeated), 5)
    assert np.isfinite(np.asarray(G2)).all() and (np.asarray(G2) > 0).all()
    recon = np.asarray(G2) @ np.asarray(F2).T
    assert np.linalg.norm(X_repeated - recon) < 1e-2 * np.linalg.norm(X_repeated)


def test_kmeans_init_codes_are_one_hot_plus_offset(problem):
    X, _ = problem
    F0, G0 = initial_factors("kmeans", 0, jnp.asarray(X), 5)
    G0 = np.asarray(G0)
    assert np.allclose(np.sort(G0, axis=1)[:, :-1], 0.2)
    assert np.allclose(G0.max(axis=1), 1.2)
    # Each centroid is the mean of its cluster's rows.
    labels = G0.argmax(axis=1)
    for j in np.unique(labels):
        np.testing.assert_allclose(np.asarray(F0)[:, j], X[labels == j].mean(axis=0), rtol=1e-3, atol=1e-3)
