"""Concept detection (max-token cosine, AUROC, mean gap), concept matching and DiffMeans: by hand on small
arrays, and on the planted demo model (sentence activations, DiffMeans, SNMF features matched to concepts)."""
import itertools
import json

import numpy as np
import pytest

import jsnmf.models as jm
from jsnmf import SNMF, demo
from jsnmf.evaluation import (auroc, carry_shares, concept_mask, detection_table, diff_means, diff_means_directions,
                              encode_sentences, match_concepts, mean_gap, sentence_activations, sentence_scores)

# ---------------------------------------------------------------- AUROC


def test_auroc_with_ties_by_hand():
    pos, neg = [0.9, 0.5, 0.5, 0.2], [0.5, 0.1, 0.2]
    # pairs won (ties ½): 0.9 → 3; each 0.5 → ½ + 1 + 1; 0.2 → 0 + 1 + ½  ⇒  U = 9.5 of 12
    assert auroc(pos, neg) == pytest.approx(9.5 / 12, abs=1e-15)
    assert auroc([1, 2], [0, 0]) == 1.0 and auroc([0, 0], [1, 2]) == 0.0
    assert auroc([3, 3, 3], [3, 3]) == 0.5


def test_auroc_equals_the_pair_count_on_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos, neg = rng.integers(0, 5, rng.integers(1, 30)), rng.integers(0, 5, rng.integers(1, 30))
        pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
        assert auroc(pos, neg) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_auroc_errors():
    with pytest.raises(ValueError, match="at least one"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auroc([np.nan], [1.0])


# ---------------------------------------------------------------- scores, table, matching


def test_sentence_scores_are_the_max_token_cosine():
    v = np.array([1.0, 0.0])
    sentences = [np.array([[3.0, 4.0], [0.0, 2.0]]),  # cosines 0.6, 0 → 0.6
                 np.array([[0.0, 0.0], [-1.0, 0.0]]),  # a zero activation scores 0; −1 → 0
                 np.array([[2.0, 0.0]])]  # 1
    np.testing.assert_allclose(sentence_scores(v * 7, sentences), [[0.6, 0.0, 1.0]])
    both = sentence_scores(np.array([[1.0, 0.0], [0.0, 1.0]]), sentences)  # directions as columns
    np.testing.assert_allclose(both, [[0.6, 0.0, 1.0], [1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="non-zero"):
        sentence_scores(np.zeros(2), sentences)


def test_detection_table_by_hand():
    v = np.array([[1.0], [0.0]])
    sentences = [np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]), np.array([[0.0, 1.0]]), np.array([[1.0, 0.2]])]
    labels = ["a", "a+b", "b", None]
    det = detection_table(v, sentences, labels, ["a", "b"])
    s = det.scores[0]
    np.testing.assert_allclose(s, [1.0, 2 ** -0.5, 0.0, 1 / np.hypot(1, 0.2)])
    assert det.auroc[0, 0] == pytest.approx(auroc(s[:2], s[2:]))  # "a+b" counts for a
    assert det.auroc[0, 1] == pytest.approx(auroc(s[1:3], s[[0, 3]]))
    assert det.gap[0, 1] == pytest.approx(mean_gap(s[1:3], s[[0, 3]]))
    assert det.for_matches({"a": 0, "b": None}) == {
        "a": {"feature": 0, "auroc": det.auroc[0, 0], "gap": det.gap[0, 0]},
        "b": {"feature": None, "auroc": None, "gap": None}}


def test_carry_and_matching_by_hand():
    # 6 tokens in 3 sentences (labels a, b, a+b); 3 features
    token_sentence = np.array([0, 0, 1, 1, 2, 2])
    codes = np.array([[5, 0, 0], [4, 0, 0], [0, 3, 0], [1, 2, 0], [0, 1, 0], [3, 0, 0]], float)
    labels = ["a", "b", "a+b"]
    shares = carry_shares(codes, token_sentence, labels, ["a", "b", "c"], k_top=3)
    # feature 0's top 3: tokens 0, 1, 5 → sentences 0, 0, 2: a in all 3, b in 1; feature 1: tokens 2, 3, 4
    np.testing.assert_allclose(shares, [[1.0, 1 / 3, 0.0], [1 / 3, 1.0, 0.0], [0.0, 0.0, 0.0]])
    matches = match_concepts(codes, token_sentence, labels, ["a", "b", "c"], k_top=3)
    assert matches == {"a": {"feature": 0, "carry": 1.0}, "b": {"feature": 1, "carry": 1.0},
                       "c": {"feature": None, "carry": 0.0}}


# ---------------------------------------------------------------- DiffMeans


def test_diff_means_by_hand():
    acts = [np.array([[1.0, 0.0], [3.0, 0.0]]), np.array([[0.0, 4.0]]), np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 6.0]])]
    inside = [True, False, False]
    # token means: (2, 0) − (0, 10/4); sentence means: (2, 0) − mean((0, 4), (0, 2)) = (2, −3)
    np.testing.assert_allclose(diff_means(acts, inside), np.array([2.0, -2.5]) / np.hypot(2, 2.5), rtol=1e-6)
    np.testing.assert_allclose(diff_means(acts, inside, token_mean=False), np.array([2.0, -3.0]) / np.sqrt(13),
                               rtol=1e-6)
    cols = diff_means_directions(acts, ["x", "y+x", "y"], ["x", "y"])  # "y+x" is in both
    np.testing.assert_allclose(cols[:, 0], diff_means(acts, [True, True, False]), rtol=1e-6)
    np.testing.assert_allclose(cols[:, 1], diff_means(acts, [False, True, True]), rtol=1e-6)
    with pytest.raises(ValueError, match="both"):
        diff_means(acts, [True, True, True])


# ---------------------------------------------------------------- the planted demo model


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    directory = demo.build_demo_model(tmp_path_factory.mktemp("demo") / "model")
    model, tokenizer = jm.load(directory)
    records = demo.read_demo_corpus()
    sequences, skip = encode_sentences(tokenizer, [r["text"] for r in records])
    return directory, model, tokenizer, sequences, skip, [r["label"] for r in records]


def test_sentence_activations_exclude_bos_and_padding(demo_setup):
    _, model, tokenizer, sequences, skip, _ = demo_setup
    assert skip == 1 and all(s[0] == tokenizer.bos_token_id for s in sequences)
    some = [sequences[i] for i in (0, 5, 17)]
    batched = sentence_activations(model, some, 1, skip=skip, batch_size=2)
    for seq, acts in zip(some, batched):  # each sentence alone, no padding at all
        alone = np.asarray(model(seq[None], capture=[1]).mlp_activations[1])[0]
        assert acts.shape == (len(seq) - 1, model.config.d_mlp)
        np.testing.assert_allclose(acts, alone[1:], atol=1e-5)


def test_diff_means_on_the_demo_equals_a_hand_computation(demo_setup):
    """DiffMeans at hook_mlp_out from the batched pipeline = token means of h·W + b, each sentence run alone,
    BOS dropped, with the checkpoint's own c_proj weights."""
    from safetensors.numpy import load_file

    directory, model, _, sequences, skip, labels = demo_setup
    weights = load_file(str(directory / "model.safetensors"))
    w, b = weights["h.1.mlp.c_proj.weight"], weights["h.1.mlp.c_proj.bias"]
    subset = list(range(0, len(sequences), 4))
    seqs, labs = [sequences[i] for i in subset], [labels[i] for i in subset]
    pipeline = diff_means_directions(sentence_activations(model, seqs, 1, "hook_mlp_out", skip=skip), labs,
                                     ["animals", "months"])
    by_hand = {}
    for i, seq in enumerate(seqs):
        h = np.asarray(model(seq[None], capture=[1]).mlp_activations[1], np.float64)[0, 1:]
        by_hand[i] = h @ w + b
    for c, concept in enumerate(["animals", "months"]):
        inside = concept_mask(labs, concept)
        diff = (np.concatenate([by_hand[i] for i in range(len(seqs)) if inside[i]]).mean(0)
                - np.concatenate([by_hand[i] for i in range(len(seqs)) if not inside[i]]).mean(0))
        np.testing.assert_allclose(pipeline[:, c], diff / np.linalg.norm(diff), atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_planted_features_detect_their_concepts(demo_setup, layer):
    directory, model, _, sequences, skip, labels = demo_setup
    planted = demo.read_planted(directory)["layers"][str(layer)]
    concepts = list(demo.CONCEPTS)
    directions = np.zeros((model.config.d_mlp, len(concepts)), np.float32)
    for c, name in enumerate(concepts):
        directions[planted[name], c] = 1.0
    det = detection_table(directions, sentence_activations(model, sequences, layer, skip=skip), labels, concepts)
    own = np.diag(det.auroc)
    assert own.min() >= 0.9, dict(zip(concepts, own))
    assert np.diag(det.gap).min() > 0.5
    print(json.dumps({"layer": layer, "planted_auroc": dict(zip(concepts, own.round(4).tolist()))}))


def test_snmf_features_matched_to_concepts_detect_them(demo_setup):
    _, model, _, sequences, skip, labels = demo_setup
    concepts = list(demo.CONCEPTS)
    acts = sentence_activations(model, sequences, 1, skip=skip)
    X = np.concatenate(acts)
    token_sentence = np.repeat(np.arange(len(acts)), [len(a) for a in acts])
    snmf = SNMF(rank=demo.DEMO_RANK, sparsity=demo.DEMO_SPARSITY, init=demo.DEMO_INIT, max_iter=demo.DEMO_MAX_ITER, seed=0).fit(X)
    matches = match_concepts(snmf.codes_, token_sentence, labels, concepts)
    assert all(m["feature"] is not None and m["carry"] >= 0.9 for m in matches.values()), matches
    assert len({m["feature"] for m in matches.values()}) == len(concepts)  # one feature per planted concept
    snmf_det = detection_table(snmf.features_, acts, labels, concepts).for_matches(matches)
    # DiffMeans at the paper's site for the same concepts
    mlp_out = sentence_activations(model, sequences, 1, "hook_mlp_out", skip=skip)
    dm = detection_table(diff_means_directions(mlp_out, labels, concepts), mlp_out, labels, concepts)
    dm_auroc = np.diag(dm.auroc)
    assert min(r["auroc"] for r in snmf_det.values()) >= 0.9, snmf_det
    assert dm_auroc.min() >= 0.9
    print(json.dumps({"snmf_matched_auroc": {k: round(v["auroc"], 4) for k, v in snmf_det.items()},
                      "diffmeans_auroc": dict(zip(concepts, dm_auroc.round(4).tolist()))}))
