"""Closest features across layers.

The columns of ``F`` of two layers live in different neuron bases (neuron ``i`` of layer 3 is not
neuron ``i`` of layer 9), so their cosine would compare unrelated coordinates. Every layer's codes,
though, are over the same tokens of the same store: two features are close when they are active on
the same tokens with similar strength, i.e. by the cosine of their *active* codes (codes below the
feature's activity threshold set to 0, :mod:`jsnmf.report.activity`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from jsnmf.report.activity import Activity

__all__ = ["active_code_matrix", "closest_features"]


def active_code_matrix(unit_codes: np.ndarray, act: Activity) -> sp.csc_matrix:
    """The active codes (others 0) as a sparse n_tokens × k matrix with unit-norm columns (zero
    columns for dead features)."""
    n, k = unit_codes.shape
    columns = []
    for j in range(k):
        rows = np.flatnonzero(unit_codes[:, j] >= act.threshold[j]) if not act.dead[j] else np.zeros(0, np.int64)
        values = unit_codes[rows, j].astype(np.float32)
        norm = float(np.linalg.norm(values))
        columns.append(sp.csc_matrix((values / norm if norm else values, (rows, np.zeros_like(rows))), shape=(n, 1)))
    return sp.hstack(columns, format="csc") if columns else sp.csc_matrix((n, 0), dtype=np.float32)


def closest_features(matrices: dict[int, sp.csc_matrix], n_related: int, min_cosine: float = 0.05
                     ) -> dict[int, list[list[dict]]]:
    """Per layer, per feature: the ``n_related`` features of each other layer with the largest cosine
    of active codes (at least ``min_cosine``), as ``{"layer", "feature", "cosine"}``, best first within
    each layer, layers in order."""
    result = {layer: [[] for _ in range(m.shape[1])] for layer, m in matrices.items()}
    for a, ma in matrices.items():
        for b, mb in matrices.items():
            if a == b:
                continue
            cosine = np.asarray((ma.T @ mb).todense())
            for j in range(cosine.shape[0]):
                order = np.lexsort((np.arange(cosine.shape[1]), -cosine[j]))[:n_related]
                result[a][j] += [{"layer": int(b), "feature": int(f), "cosine": round(float(cosine[j, f]), 4)}
                                 for f in order if cosine[j, f] >= min_cosine]
    return result
