"""``jsnmf.batch.fit_layers``: several layers in one vmapped loop equal separate fits."""

import numpy as np
import pytest

from jsnmf import SNMF
from jsnmf.batch import fit_layers

from snmf_reference import planted_problem


def relative(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def layers():
    """Three same-shaped layers that converge at different speeds."""
    return {
        3: planted_problem(n=240, d=50, k=4, noise=0.01, seed=10)[0],
        "mlp.7": planted_problem(n=240, d=50, k=4, noise=0.3, seed=11)[0],
        9: planted_problem(n=240, d=50, k=4, noise=0.05, seed=12)[0] * 10,
    }


@pytest.mark.parametrize("solver, sparsity", [("mu", 0.2), ("hals", None), ("ehals", 0.2)])
def test_layers_together_equal_separate_fits(layers, solver, sparsity):
    settings = dict(solver=solver, sparsity=sparsity, max_iter=120, tol=1e-4, patience=4, seed=3)
    together = fit_layers(layers, 4, **settings)
    assert list(together) == list(layers)
    stopped_at = []
    for name, X in layers.items():
        alone = SNMF(4, **settings).fit(X)
        model = together[name]
        assert model.n_iter_ == alone.n_iter_
        stopped_at.append(alone.n_iter_)
        assert relative(model.features_, alone.features_) < 1e-5
        assert relative(model.codes_, alone.codes_) < 1e-5
        np.testing.assert_allclose(model.loss_history_, alone.loss_history_, rtol=1e-5,
                                   atol=1e-6 * float(np.sum(X.astype(np.float64) ** 2)))
        assert model.relative_error_ == pytest.approx(alone.relative_error_, abs=1e-5)  # sqrt(loss/‖X‖²)
        assert model.get_params() == alone.get_params()
    # The layers stopped at different iterations, so the finished ones were masked while others ran.
    assert len(set(stopped_at)) > 1, stopped_at


def test_fit_layers_bad_input(layers):
    X = layers[3]
    with pytest.raises(ValueError, match="non-empty mapping"):
        fit_layers({}, 4)
    with pytest.raises(ValueError, match="same shape for every layer"):
        fit_layers({0: X, 1: X[:200]}, 4)
    with pytest.raises(ValueError, match=r"layer 1: X is all zeros"):
        fit_layers({0: X, 1: np.zeros_like(X)}, 4)
    with pytest.raises(ValueError, match=r"layers\[1\] contains NaN or Inf"):
        fit_layers({0: X, 1: np.full_like(X, np.nan)}, 4)
    with pytest.raises(ValueError, match="unknown solver"):
        fit_layers({0: X}, 4, solver="adam")
