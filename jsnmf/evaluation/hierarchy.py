"""Hierarchical SNMF (the paper's recursive factorization): features of features.

Level 0 is an ordinary fit ``X ≈ G₀ F₀ᵀ`` with ``k₀ = ranks[0]`` features. Level ``l`` treats the
previous level's features as samples: with ``F̂`` the previous features scaled to unit columns,

    ``F̂_{l−1}ᵀ ≈ W_l F_lᵀ``,   ``W_l ≥ 0`` [k_{l−1}, k_l],   ``k_l < k_{l−1}``,

so every child feature is a non-negative mix of ``k_l`` parents, and a parent is what its children
share (a neuron group they all use). Columns are unit-normalised first so that every child counts the
same in the fit whatever its scale (SNMF puts the token scale in ``F``'s columns).

The tree: the edge weight of child ``i`` to parent ``p`` is ``W[i, p] · ‖F_l[:, p]‖`` (how much of the
unit child the parent accounts for); a child's **parent** is its heaviest edge, all positive edges are
exported too. Codes of a level follow from ``X ≈ G₀ F₀ᵀ``:
``G_l = G_{l−1} · diag(‖F_{l−1}‖) · W_l``, and a node's top tokens are the tokens with its largest
codes (``analysis.top_activations``).

(The paper then fine-tunes all levels jointly with Adam without keeping ``G ≥ 0``; not done here.)
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from jsnmf import SNMF
from jsnmf.analysis import top_activations

__all__ = ["Hierarchy", "fit_hierarchy"]


@dataclasses.dataclass
class Hierarchy:
    """Per level: ``features[l]`` [d, k_l]; ``weights[l]`` [k_{l−1}, k_l] (``weights[0]`` is None);
    ``codes[l]`` [n_tokens, k_l]."""

    ranks: tuple[int, ...]
    features: list[np.ndarray]
    weights: list[np.ndarray | None]
    codes: list[np.ndarray]

    def edge_weights(self, level: int) -> np.ndarray:
        """[k_{level−1}, k_level]: child i's weight on parent p, ``W[i, p] · ‖F_level[:, p]‖``."""
        if not 1 <= level < len(self.ranks):
            raise ValueError(f"level must be in [1, {len(self.ranks)}), got {level}")
        return self.weights[level] * np.linalg.norm(self.features[level], axis=0)[None, :]

    def parents(self, level: int) -> np.ndarray:
        """For each feature of ``level − 1``, the index of its heaviest parent at ``level`` (−1: none)."""
        w = self.edge_weights(level)
        return np.where(w.max(axis=1) > 0, w.argmax(axis=1), -1)

    def to_dict(self, tokens: Sequence[str] | None = None, k_top: int = 10) -> dict:
        """The tree as plain data: nodes per level (id, top tokens when ``tokens`` — one string per row of
        ``X`` — are given), each node's parent and its positive edges with weights."""
        levels = []
        for level, rank in enumerate(self.ranks):
            tops = top_activations(self.codes[level], k_top) if tokens is not None else None
            nodes = []
            for j in range(rank):
                node = {"id": f"L{level}.{j}", "level": level, "index": j}
                if tops is not None:
                    node["top_tokens"] = [tokens[t] for t in tops[j]]
                if level + 1 < len(self.ranks):
                    w = self.edge_weights(level + 1)[j]
                    parent = int(self.parents(level + 1)[j])
                    node["parent"] = None if parent < 0 else f"L{level + 1}.{parent}"
                    node["parent_weights"] = {f"L{level + 1}.{p}": float(w[p]) for p in np.flatnonzero(w > 0)}
                if level > 0:
                    w = self.edge_weights(level)[:, j]
                    node["children"] = {f"L{level - 1}.{c}": float(w[c]) for c in np.flatnonzero(w > 0)}
                nodes.append(node)
            levels.append({"level": level, "rank": rank, "nodes": nodes})
        return {"ranks": list(self.ranks), "levels": levels}

    def save_json(self, path: str | os.PathLike, tokens: Sequence[str] | None = None, k_top: int = 10) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(tokens, k_top), indent=2))
        return path


def fit_hierarchy(X, ranks: Sequence[int], *, sparsity: float | None | Sequence[float | None] = 0.01,
                  **snmf_kwargs) -> Hierarchy:
    """Fit level 0 on ``X`` [n_tokens, d] and each next level on the previous level's unit features.

    ``ranks``: strictly decreasing, e.g. ``(400, 200, 100, 50)`` at the paper's scale. ``sparsity``: one
    value for every level or one per level (a parent's support must cover what its children share, so
    upper levels usually need a larger share, or ``None``). ``snmf_kwargs`` go to every :class:`SNMF`.
    """
    ranks = tuple(int(r) for r in ranks)
    if not ranks or any(r < 1 for r in ranks) or any(b >= a for a, b in zip(ranks, ranks[1:])):
        raise ValueError(f"ranks must be positive and strictly decreasing, got {ranks}")
    levels = list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity] * len(ranks)
    if len(levels) != len(ranks):
        raise ValueError(f"{len(levels)} sparsity values for {len(ranks)} levels")
    model = SNMF(rank=ranks[0], sparsity=levels[0], **snmf_kwargs).fit(np.asarray(X, np.float32), progress=False)
    features, weights, codes = [np.asarray(model.features_)], [None], [np.asarray(model.codes_)]
    for rank, share in zip(ranks[1:], levels[1:]):
        prev = features[-1]
        norms = np.linalg.norm(prev, axis=0)
        samples = (prev / np.where(norms > 0, norms, 1.0)).T  # [k_prev, d]: each child a sample
        fit = SNMF(rank=rank, sparsity=share, **snmf_kwargs).fit(samples.astype(np.float32), progress=False)
        features.append(np.asarray(fit.features_))
        weights.append(np.asarray(fit.codes_))
        codes.append(codes[-1] @ (norms[:, None] * weights[-1]))
    return Hierarchy(ranks, features, weights, codes)
