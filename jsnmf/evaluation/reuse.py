"""Neuron reuse: which neurons, and which groups of neurons, several SNMF features share.

A feature ``j`` is a sparse column ``F[:, j]``; its **support** is the set of neurons with
``|F[i, j]| > tol`` (after SNMF's winner-take-all step, exactly its non-zero entries). For every pair of
features the table gives

- ``overlap[i][j]``: how many neurons the two supports share, and ``jaccard``: overlap / union;
- ``cosine[i][j]``: cosine of the two columns (shared neurons can carry opposite signs, so overlap
  alone does not say the features point the same way);

and, per neuron used by two or more features, the features using it (``shared_neurons``); neurons
used by exactly the same set of ≥ 2 features form a **shared group** (``groups``): the paper's reading
is that such groups are reusable building blocks, composed differently by different features.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["neuron_reuse", "reuse_heatmap"]


def neuron_reuse(features, tol: float = 0.0) -> dict:
    """The reuse table of ``features`` ``F`` [d_mlp, k] as plain lists and dicts (JSON-ready)."""
    F = np.asarray(features, np.float64)
    if F.ndim != 2 or not np.all(np.isfinite(F)):
        raise ValueError(f"features must be a finite [d_mlp, k] matrix, got shape {F.shape}")
    support = np.abs(F) > tol
    counts = support.sum(axis=0)
    overlap = support.T.astype(np.int64) @ support.astype(np.int64)
    union = counts[:, None] + counts[None, :] - overlap
    jaccard = np.where(union > 0, overlap / np.maximum(union, 1), 0.0)
    norms = np.linalg.norm(F, axis=0)
    safe = np.where(norms > 0, norms, 1.0)
    cosine = (F / safe).T @ (F / safe)
    cosine[norms == 0, :] = 0.0
    cosine[:, norms == 0] = 0.0
    users = {int(i): np.flatnonzero(support[i]).tolist() for i in range(F.shape[0]) if support[i].sum() >= 2}
    by_members: dict[tuple[int, ...], list[int]] = {}
    for neuron, members in users.items():
        by_members.setdefault(tuple(members), []).append(neuron)
    groups = [{"features": list(m), "neurons": n} for m, n in
              sorted(by_members.items(), key=lambda item: (-len(item[1]), item[0]))]
    return {"n_features": int(F.shape[1]), "n_neurons": int(F.shape[0]), "tol": tol,
            "support_size": counts.tolist(), "overlap": overlap.tolist(), "jaccard": jaccard.tolist(),
            "cosine": cosine.tolist(), "shared_neurons": users, "groups": groups,
            "neurons_used": int(support.any(axis=1).sum()), "neurons_shared": len(users)}


def reuse_heatmap(table: dict, path: str | os.PathLike, labels=None) -> Path:
    """Draw the support-overlap and cosine matrices of ``table`` (``neuron_reuse``) side by side as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    overlap, cosine = np.asarray(table["overlap"]), np.asarray(table["cosine"])
    k = overlap.shape[0]
    labels = [str(j) for j in range(k)] if labels is None else [str(x) for x in labels]
    size = max(4.0, 0.25 * k + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size))
    for ax, data, title, kw in ((axes[0], overlap, "shared neurons", {"cmap": "viridis"}),
                                (axes[1], cosine, "cosine", {"cmap": "RdBu_r", "vmin": -1, "vmax": 1})):
        image = ax.imshow(data, **kw)
        ax.set_title(title)
        if k <= 40:  # beyond that the tick labels overlap into a smear
            ax.set_xticks(range(k), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(k), labels, fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
