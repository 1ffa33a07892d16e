"""Hierarchical SNMF links nested planted concepts to their parents; the neuron-reuse table equals a hand
computation and its heatmap is written.

The demo model plants ten flat concepts (no nesting), so the nested problem is built here: two parent
concepts, each a neuron group shared by its three children, every child adding a group of its own.
"""
import json

import numpy as np
import pytest

from jsnmf.evaluation import fine_tune_hierarchy, fit_hierarchy, neuron_reuse, reuse_heatmap

PARENT_OF = [0, 0, 0, 1, 1, 1]  # planted child -> planted parent
GROUP = 4  # neurons in a parent's shared group


def _nested(n=1200, d=64, seed=0):
    """Children 0-2 share the parent group 0 (neurons 0-3), children 3-5 the parent group 1 (neurons 4-7);
    child c also uses its own 8 neurons 8 + 8c …; each token activates one child (plus a little noise).
    (With the shared group a large part of each child, 6 of 10 neurons, level-0 SNMF merges siblings from
    every start tried: the children must stay distinguishable for the level below the tree to exist.)"""
    rng = np.random.default_rng(seed)
    children = np.zeros((6, d))
    for c, p in enumerate(PARENT_OF):
        children[c, GROUP * p:GROUP * p + GROUP] = rng.uniform(0.8, 1.2, GROUP)
        children[c, 8 + 8 * c:16 + 8 * c] = rng.uniform(0.8, 1.2, 8)
    which = rng.integers(0, 6, n)
    G = np.zeros((n, 6))
    G[np.arange(n), which] = rng.uniform(0.5, 2.0, n)
    X = G @ children + 0.01 * rng.standard_normal((n, d))
    return X.astype(np.float32), which, children


@pytest.fixture(scope="module")
def tree():
    X, which, children = _nested()
    # level 0: ceil(0.18 · 64) = 12 neurons, one child's support; level 1 dense (a parent covers its children)
    hierarchy = fit_hierarchy(X, [6, 2], sparsity=[0.18, None], init="svd", max_iter=500, seed=0)
    return hierarchy, X, which, children


def test_the_tree_links_each_child_to_its_planted_parent(tree):
    hierarchy, _, _, children = tree
    F0 = hierarchy.features[0]
    cos = (children / np.linalg.norm(children, axis=1, keepdims=True)) @ (F0 / np.linalg.norm(F0, axis=0))
    found = cos.argmax(axis=1)  # planted child -> level-0 feature
    assert sorted(found) == list(range(6)) and cos.max(axis=1).min() > 0.95, cos.round(3)
    parents = hierarchy.parents(1)[found]  # planted child -> level-1 parent index
    assert len(set(parents[:3])) == 1 and len(set(parents[3:])) == 1 and parents[0] != parents[3], parents
    # each parent's largest neurons are its planted shared group (the rest is its children's own groups,
    # each weighted by one child only) and it leaves the other parent's group alone
    for planted_parent, level1 in ((0, parents[0]), (1, parents[3])):
        column = np.abs(hierarchy.features[1][:, level1])
        group = set(range(GROUP * planted_parent, GROUP * planted_parent + GROUP))
        other = list(range(GROUP * (1 - planted_parent), GROUP * (1 - planted_parent) + GROUP))
        assert set(np.argsort(-column)[:GROUP].tolist()) == group, column.round(2)
        assert column[other].max() < 0.01 * column.max(), column.round(2)
    weights = hierarchy.edge_weights(1)[found]
    for c, p in enumerate(parents):  # the planted parent carries most of the child's weight
        assert weights[c, p] > 2 * np.delete(weights[c], p).max(initial=0.0), weights.round(3)


def test_tree_json_export(tree, tmp_path):
    hierarchy, X, which, _ = tree
    tokens = [f"child{c}" for c in which]
    path = hierarchy.save_json(tmp_path / "tree.json", tokens=tokens, k_top=10)
    data = json.loads(path.read_text())
    assert data["ranks"] == [6, 2] and [lv["rank"] for lv in data["levels"]] == [6, 2]
    leaves, roots = data["levels"][0]["nodes"], data["levels"][1]["nodes"]
    for leaf in leaves:
        assert leaf["parent"] in {r["id"] for r in roots}
        assert leaf["parent"] in leaf["parent_weights"] and len(set(leaf["top_tokens"])) == 1  # one child's tokens
    for root in roots:
        kids = [leaf for leaf in leaves if leaf["parent"] == root["id"]]
        assert len(kids) == 3
        planted = {int(leaf["top_tokens"][0][5:]) for leaf in kids}
        assert {PARENT_OF[c] for c in planted} in ({0}, {1})  # the root's children are one planted family
        assert set(root["children"]) >= {leaf["id"] for leaf in kids}
        assert {int(t[5:]) for t in root["top_tokens"]} <= planted  # a parent's top tokens are its children's


def _product_loss(hierarchy, X):
    """The fine-tuning objective written out in NumPy: mean((X − G₀ V₁ … V_L F_Lᵀ)²), V_l = diag(‖F_{l−1}‖) W_l."""
    codes = hierarchy.codes[0].astype(np.float64)
    for level in range(1, len(hierarchy.ranks)):
        codes = codes @ (np.linalg.norm(hierarchy.features[level - 1], axis=0)[:, None] * hierarchy.weights[level])
    return float(np.mean((X - codes @ hierarchy.features[-1].T) ** 2))


@pytest.mark.parametrize("nonnegative", [True, False])
def test_joint_fine_tuning_lowers_the_product_loss(tree, nonnegative):
    """Adam on all levels at once (the paper's last step): the reported losses are the product's
    objective; the product has rank k_L = 2, so its loss is bounded below by the best rank-2
    approximation (truncated SVD), and fine-tuning closes most of the gap to that bound; with
    ``nonnegative`` the codes and edges stay ≥ 0 and every planted child keeps its planted parent."""
    hierarchy, X, _, children = tree
    tuned, history = fine_tune_hierarchy(hierarchy, X, steps=150, learning_rate=1e-2, nonnegative=nonnegative)
    assert history.shape == (151,)
    # float32 training vs the float64 formula: agreement to float32 rounding of a mean of ~1e5 terms
    assert history[0] == pytest.approx(_product_loss(hierarchy, X), rel=1e-4)
    assert history[-1] == pytest.approx(_product_loss(tuned, X), rel=1e-4)
    singular = np.linalg.svd(X.astype(np.float64), compute_uv=False)
    bound = float(np.sum(singular[2:] ** 2) / X.size)
    assert history[-1] >= bound * (1 - 1e-5)  # float32 rounding of the loss
    assert history[-1] - bound <= 0.05 * (history[0] - bound), (history[[0, -1]], bound)
    assert [F.shape for F in tuned.features] == [F.shape for F in hierarchy.features]
    if nonnegative:
        assert (tuned.codes[0] >= 0).all() and (tuned.weights[1] >= 0).all()
        F0 = tuned.features[0]
        cos = (children / np.linalg.norm(children, axis=1, keepdims=True)) @ (F0 / np.linalg.norm(F0, axis=0))
        parents = tuned.parents(1)[cos.argmax(axis=1)]
        assert len(set(parents[:3])) == 1 and len(set(parents[3:])) == 1 and parents[0] != parents[3], parents


def test_hierarchy_validation():
    with pytest.raises(ValueError, match="decreasing"):
        fit_hierarchy(np.ones((10, 4), np.float32), [2, 3])
    with pytest.raises(ValueError, match="sparsity"):
        fit_hierarchy(np.ones((10, 4), np.float32), [3, 2], sparsity=[0.5])
    X = np.abs(np.random.default_rng(0).standard_normal((30, 6))).astype(np.float32)
    two = fit_hierarchy(X, [3, 2], sparsity=None, max_iter=5)
    with pytest.raises(ValueError, match="X has shape"):
        fine_tune_hierarchy(two, X[:10])
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        fine_tune_hierarchy(two, X, steps=0)


def test_neuron_reuse_table_by_hand(tmp_path):
    F = np.array([[1, 0, 2], [0, 1, -1], [3, 0, 0], [0, 0, 0], [1, 0, 1]], np.float64)
    table = neuron_reuse(F)
    assert table["support_size"] == [3, 1, 3]
    assert table["overlap"] == [[3, 0, 2], [0, 1, 1], [2, 1, 3]]
    np.testing.assert_allclose(table["jaccard"], [[1, 0, 0.5], [0, 1, 1 / 3], [0.5, 1 / 3, 1]])
    np.testing.assert_allclose(table["cosine"], [[1, 0, 3 / np.sqrt(66)], [0, 1, -1 / np.sqrt(6)],
                                                 [3 / np.sqrt(66), -1 / np.sqrt(6), 1]], atol=1e-12)
    assert table["shared_neurons"] == {0: [0, 2], 1: [1, 2], 4: [0, 2]}
    assert table["groups"] == [{"features": [0, 2], "neurons": [0, 4]}, {"features": [1, 2], "neurons": [1]}]
    assert table["neurons_used"] == 4 and table["neurons_shared"] == 3
    json.dumps(table)  # JSON-ready
    png = reuse_heatmap(table, tmp_path / "plots" / "reuse.png", labels=["a", "b", "c"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_neuron_reuse_on_the_nested_problem(tree):
    """Children of one planted parent share exactly its neuron group; children of different parents share none."""
    hierarchy, _, _, children = tree
    F0 = hierarchy.features[0]
    found = ((children / np.linalg.norm(children, axis=1, keepdims=True)) @ (F0 / np.linalg.norm(F0, axis=0))).argmax(1)
    overlap = np.asarray(neuron_reuse(F0)["overlap"])[np.ix_(found, found)]
    for a in range(6):
        for b in range(6):
            if a != b:
                assert overlap[a, b] == (GROUP if PARENT_OF[a] == PARENT_OF[b] else 0), overlap
