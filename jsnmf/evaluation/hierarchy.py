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

Joint fine-tuning (:func:`fine_tune_hierarchy`), as the paper does after the level-by-level fits: with
``V_l = diag(‖F_{l−1}‖) W_l`` the levels compose into one product, ``X ≈ G₀ V₁ V₂ … V_L F_Lᵀ``, and all
of its factors are trained together with Adam (optax) on the mean squared error. The paper lets the
non-negative factors go negative; ``nonnegative=True`` (the default here) projects ``G₀`` and the
``V_l`` back onto ``≥ 0`` after each step (projected Adam) so the result is still a tree with
non-negative edges. The level features are then the products ``F_{l−1} = F_l V_lᵀ``.
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
from jsnmf.io.files import atomic_write_json

__all__ = ["Hierarchy", "fit_hierarchy", "fine_tune_hierarchy"]


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
        atomic_write_json(path, self.to_dict(tokens, k_top))
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


def fine_tune_hierarchy(hierarchy: Hierarchy, X, *, steps: int = 300, learning_rate: float = 1e-2,
                        nonnegative: bool = True) -> tuple[Hierarchy, np.ndarray]:
    """Train all levels of ``hierarchy`` jointly on ``X`` (see the module docstring): Adam on
    ``mean((X − G₀ V₁ … V_L F_Lᵀ)²)``, ``steps`` full-batch steps compiled into one ``lax.scan``.

    Returns the fine-tuned hierarchy (every level's features, weights and codes recomputed from the
    trained product) and the loss before each step and after the last (``steps + 1`` values).
    ``nonnegative=False`` is the paper's unconstrained fine-tuning.
    """
    import jax
    import jax.numpy as jnp
    import optax

    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if len(hierarchy.ranks) < 2:
        raise ValueError("a hierarchy of one level has nothing to fine-tune jointly; fit at least two ranks")
    X = jnp.asarray(X, jnp.float32)
    if X.shape != (hierarchy.codes[0].shape[0], hierarchy.features[0].shape[0]):
        raise ValueError(f"X has shape {X.shape}; the hierarchy was fitted on "
                         f"{(hierarchy.codes[0].shape[0], hierarchy.features[0].shape[0])}")
    norms = [np.linalg.norm(F, axis=0) for F in hierarchy.features]
    params = {"G": jnp.asarray(hierarchy.codes[0], jnp.float32),
              "V": [jnp.asarray(norms[l - 1][:, None] * hierarchy.weights[l], jnp.float32)
                    for l in range(1, len(hierarchy.ranks))],
              "F": jnp.asarray(hierarchy.features[-1], jnp.float32)}
    optimizer = optax.adam(learning_rate)

    def loss(p):
        codes = p["G"]
        for V in p["V"]:
            codes = codes @ V
        return jnp.mean(jnp.square(X - codes @ p["F"].T))

    def project(p):
        if not nonnegative:
            return p
        return {"G": jnp.maximum(p["G"], 0.0), "V": [jnp.maximum(V, 0.0) for V in p["V"]], "F": p["F"]}

    def step(carry, _):
        p, state = carry
        value, grads = jax.value_and_grad(loss)(p)
        updates, state = optimizer.update(grads, state, p)
        return (project(optax.apply_updates(p, updates)), state), value

    @jax.jit
    def train(p):
        (p, _), history = jax.lax.scan(step, (p, optimizer.init(p)), None, length=steps)
        return p, jnp.append(history, loss(p))

    trained, history = train(params)
    history = np.asarray(history)
    if not np.isfinite(history).all():
        raise FloatingPointError(f"the fine-tuning loss became non-finite; try a smaller learning_rate than "
                                 f"{learning_rate}")
    return _from_product(hierarchy.ranks, trained), history


def _from_product(ranks: tuple[int, ...], p: dict) -> Hierarchy:
    """The levels of the product ``G₀ V₁ … V_L F_Lᵀ``: ``F_{l−1} = F_l V_lᵀ``, ``W_l = V_l / ‖F_{l−1}‖``,
    ``G_l = G₀ V₁ … V_l``."""
    Vs = [np.asarray(V, np.float32) for V in p["V"]]
    features = [np.asarray(p["F"], np.float32)]
    for V in reversed(Vs):
        features.insert(0, features[0] @ V.T)
    weights: list[np.ndarray | None] = [None]
    for level, V in enumerate(Vs, start=1):
        norms = np.linalg.norm(features[level - 1], axis=0)
        weights.append(V / np.where(norms > 0, norms, 1.0)[:, None])
    codes = [np.asarray(p["G"], np.float32)]
    for V in Vs:
        codes.append(codes[-1] @ V)
    return Hierarchy(ranks, features, weights, codes)

