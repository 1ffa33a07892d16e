"""How far apart two float32 fits of one problem may land when they differ only in rounding.

A sharded, multi-process or streamed fit sums its statistics in another order than the
single-device fit, so the two differ by rounding, amplified by the iterations. How much depends
on the problem (its conditioning, the iteration count, the solver), so no fixed tolerance is right
for every problem and every CPU: 1e-5 was crossed by a transform that amplifies the features'
rounding 20-fold. Instead the amplification is measured on the problem itself: the same fit is
repeated on ``X`` perturbed by one float32 rounding per entry (``X·(1 ± ε)``), and the spread of
the results is the problem's response to one rounding. A sum of ``n`` rows taken in another order
differs by about ``√n`` roundings, so two paths that differ in their summation order must agree to
``√n`` times that response (with a floor of ``√n·ε`` for quantities that did not move at all).
"""

from dataclasses import dataclass

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@dataclass(frozen=True)
class Tolerances:
    """Largest allowed relative differences (``score``: absolute) from the reference fit."""

    features: float
    codes: float
    loss: float
    transform: float
    score: float

    def check(self, reference, features, codes, losses, where=""):
        """Assert a fit's features, codes and losses agree with ``reference`` (a fitted SNMF)."""
        assert np.shape(losses) == reference.loss_history_.shape, where
        for name, value, expected, bound in [("features", features, reference.features_, self.features),
                                             ("codes", codes, reference.codes_, self.codes),
                                             ("loss", losses, reference.loss_history_, self.loss)]:
            error = relative(value, expected)
            assert error <= bound, f"{where} {name}: relative difference {error:.3g} > {bound:.3g} (rounding bound)"

    def check_transform(self, reference, X_new, transformed, score, where=""):
        error = relative(transformed, reference.transform(X_new))
        assert error <= self.transform, f"{where} transform: {error:.3g} > {self.transform:.3g} (rounding bound)"
        gap = abs(float(score) - reference.score(X_new))
        assert gap <= self.score, f"{where} score: {gap:.3g} > {self.score:.3g} (rounding bound)"


def rounding_tolerances(make_model, X, X_new=None, trials: int = 3, **fit_params):
    """``(reference, Tolerances)``: ``make_model().fit(X, **fit_params)`` and the bounds derived as above.

    ``make_model`` builds an unfitted estimator with the settings under test; the perturbed
    fits use the same settings, seeds and starting point.
    """
    X = np.asarray(X, np.float32)
    reference = make_model().fit(X, **fit_params)
    transformed = reference.transform(X_new) if X_new is not None else None
    score = reference.score(X_new) if X_new is not None else 0.0
    spread = dict(features=0.0, codes=0.0, loss=0.0, transform=0.0, score=0.0)
    rng = np.random.default_rng(12345)
    for _ in range(trials):
        perturbed = (X * (1 + EPS32 * rng.choice([-1.0, 1.0], size=X.shape))).astype(np.float32)
        model = make_model().fit(perturbed, **fit_params)
        spread["features"] = max(spread["features"], relative(model.features_, reference.features_))
        spread["codes"] = max(spread["codes"], relative(model.codes_, reference.codes_))
        spread["loss"] = max(spread["loss"], relative(model.loss_history_, reference.loss_history_))
        if X_new is not None:
            spread["transform"] = max(spread["transform"], relative(model.transform(X_new), transformed))
            spread["score"] = max(spread["score"], abs(model.score(X_new) - score))
    growth = float(np.sqrt(X.shape[0]))
    return reference, Tolerances(**{name: growth * max(value, EPS32) for name, value in spread.items()})
