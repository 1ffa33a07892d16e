"""Codes in comparable units, and when a feature counts as active on a token.

Units: the fit keeps each column of ``G`` at unit ℓ2 norm and lets ``F`` carry the scale, so raw codes
of two features are not comparable. The report shows ``G[:, j]·‖F[:, j]‖``: the coefficient of the unit
direction ``F[:, j]/‖F[:, j]‖`` in the token's reconstruction (the same number a steering strength
along that unit direction is measured in).

Activity: multiplicative updates never reach exactly 0, so "code > 0" marks every token. A feature is
*active* on a token when its code is at least ``active_fraction`` of that feature's largest code. A
feature is *dead* when its direction is zero, or when its largest code is below ``dead_fraction`` of
the median feature's largest code (in unit-norm units); a dead feature is active nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Activity", "unit_norm_codes", "activity", "activity_rule", "active_histogram"]


def unit_norm_codes(codes: np.ndarray, features: np.ndarray) -> np.ndarray:
    """``G·diag(‖F_j‖)`` (float32): codes in units where each feature direction has unit norm."""
    norms = np.linalg.norm(np.asarray(features, dtype=np.float64), axis=0)
    return (np.asarray(codes, dtype=np.float32) * norms.astype(np.float32)[None, :]).astype(np.float32)


@dataclass(frozen=True)
class Activity:
    """Per feature: ``threshold`` (a code counts as active at or above it), ``density`` (fraction of
    tokens active), ``mean``/``max`` (of all codes), ``dead``; ``l0``: mean active features per token."""

    threshold: np.ndarray
    density: np.ndarray
    mean: np.ndarray
    max: np.ndarray
    dead: np.ndarray
    l0: float

    @property
    def n_dead(self) -> int:
        return int(self.dead.sum())


def activity(codes: np.ndarray, active_fraction: float, dead_fraction: float) -> Activity:
    """The activity of each column of ``codes`` (unit-norm codes, n_tokens × k) under the rule above."""
    codes = np.asarray(codes)
    n, k = codes.shape
    if not 0 < active_fraction <= 1:
        raise ValueError(f"active_fraction must be in (0, 1], got {active_fraction}")
    largest = codes.max(axis=0).astype(np.float64) if n else np.zeros(k)
    live_max = largest[largest > 0]
    floor = dead_fraction * float(np.median(live_max)) if live_max.size else 0.0
    dead = (largest <= 0) | (largest < floor)
    threshold = np.where(dead, np.inf, active_fraction * largest)
    counts = np.zeros(k, dtype=np.int64)
    per_token = np.zeros(n, dtype=np.int64)
    for j in np.flatnonzero(~dead):  # column by column: no n × k boolean copy
        active = codes[:, j] >= threshold[j]
        counts[j] = int(active.sum())
        per_token += active
    return Activity(
        threshold=threshold, density=counts / n if n else np.zeros(k), dead=dead, max=largest,
        mean=codes.mean(axis=0).astype(np.float64) if n else np.zeros(k),
        l0=float(per_token.mean()) if n else 0.0)


def activity_rule(active_fraction: float, dead_fraction: float) -> str:
    """The rule in words, as the pages state it."""
    return (f"A feature is active on a token when its code is at least {active_fraction:g} × that feature's "
            f"largest code. Dead: a zero direction, or a largest code below {dead_fraction:g} × the median "
            "feature's largest code. Density, L0, dead features and the histograms all use this rule.")


def active_histogram(column: np.ndarray, threshold: float, bins: int) -> dict:
    """Histogram of a feature's active codes: ``{"edges": [bins + 1], "counts": [bins]}`` from the
    threshold to the largest code (empty lists when nothing is active)."""
    values = np.asarray(column, dtype=np.float64)
    values = values[values >= threshold] if np.isfinite(threshold) else values[:0]
    if not values.size:
        return {"edges": [], "counts": []}
    top = float(values.max())
    counts, edges = np.histogram(values, bins=bins, range=(float(threshold), max(top, float(threshold) * (1 + 1e-6))))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
