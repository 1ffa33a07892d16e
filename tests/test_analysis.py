"""jsnmf.analysis on small hand-made arrays with known answers."""

import numpy as np
import pytest

from jsnmf import analysis


def word_decode(vocab):
    """A word-level decode: tokens joined by single spaces."""
    return lambda ids: " ".join(vocab[i] for i in ids)


def bpe_decode(vocab):
    """A byte-level-BPE-like decode: tokens carry their own leading spaces, concatenated."""
    return lambda ids: "".join(vocab[i] for i in ids)


# ---------------------------------------------------------------- top activations


def test_top_activations_order_drop_nonpositive_and_ties():
    codes = np.array([
        [0.0, 1.0, 0.0],
        [3.0, 1.0, 0.0],
        [2.0, 0.0, 0.0],
        [5.0, 2.0, 0.0],
        [0.0, 1.0, 0.0],
    ])
    top = analysis.top_activations(codes, k_top=3)
    assert top[0].tolist() == [3, 1, 2]
    # ties (value 1.0 at rows 0, 1, 4) broken by the lower index
    assert top[1].tolist() == [3, 0, 1]
    assert top[2].tolist() == []  # dead feature: codes <= 0 are dropped
    # fewer positive codes than k_top
    assert analysis.top_activations(codes, k_top=10)[0].tolist() == [3, 1, 2]


def test_top_activations_matches_full_sort_on_random_codes():
    rng = np.random.default_rng(0)
    codes = np.maximum(rng.standard_normal((500, 7)), 0)
    top = analysis.top_activations(codes, k_top=25)
    for j in range(7):
        expected = np.argsort(-codes[:, j], kind="stable")[:25]
        assert top[j].tolist() == expected[codes[expected, j] > 0].tolist()


def test_top_activations_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        analysis.top_activations(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        analysis.top_activations(np.array([[np.nan]]))
    with pytest.raises(ValueError, match="k_top"):
        analysis.top_activations(np.ones((2, 2)), k_top=0)


# ---------------------------------------------------------------- contexts


VOCAB = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far"]
# Two documents stored back to back, the second stored out of order to check sorting by position.
TOKEN_IDS = np.array([0, 1, 2, 3, 0, 4, 7, 5, 0, 6])
DOC_INDEX = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
POSITIONS = np.array([0, 1, 2, 3, 4, 5, 3, 1, 0, 2])
# document 1 in position order: the(8) dog(7) ran(9) far(6)


def test_context_window_stays_in_the_same_document():
    documents = analysis.DocumentIndex(DOC_INDEX, POSITIONS)
    before, after = documents.window(5, window=2)  # "mat", last token of document 0
    assert before.tolist() == [3, 4] and after.tolist() == []
    before, after = documents.window(8, window=5)  # "the", first token of document 1
    assert before.tolist() == [] and after.tolist() == [7, 9, 6]
    contexts = analysis.token_contexts([1, 7], TOKEN_IDS, documents, word_decode(VOCAB), window=2)
    assert contexts[0] == analysis.Context("the ", "cat", " sat on")
    assert contexts[1] == analysis.Context("the ", "dog", " ran far")
    assert contexts[1].text() == "the [[dog]] ran far"


def test_context_window_zero_and_bad_index():
    documents = analysis.DocumentIndex(DOC_INDEX, POSITIONS)
    [context] = analysis.token_contexts([2], TOKEN_IDS, documents, word_decode(VOCAB), window=0)
    assert context == analysis.Context("", "sat", "")
    with pytest.raises(ValueError, match="out of range"):
        documents.window(10, 3)


def test_context_keeps_bpe_spacing():
    vocab = ["The", " cat", " sat", ".", " A", " dog"]
    token_ids = np.array([0, 1, 2, 3, 4, 5])
    documents = analysis.DocumentIndex(np.array([0, 0, 0, 0, 1, 1]), np.array([0, 1, 2, 3, 0, 1]))
    [c] = analysis.token_contexts([1], token_ids, documents, bpe_decode(vocab), window=5)
    assert (c.left, c.token, c.right) == ("The ", "cat", " sat.")
    assert c.left + c.token + c.right == "The cat sat."


def test_document_index_shape_check():
    with pytest.raises(ValueError, match="equal length"):
        analysis.DocumentIndex(np.zeros(3), np.zeros(4))


# ---------------------------------------------------------------- neurons, vocab, labels, statistics


def test_top_neurons_by_absolute_weight_with_sign():
    F = np.array([
        [0.1, 0.0],
        [-0.9, 0.0],
        [0.5, 0.0],
        [0.0, 0.3],
    ])
    neurons = analysis.top_neurons(F, n=2)
    assert neurons[0] == [(1, pytest.approx(-0.9)), (2, pytest.approx(0.5))]
    assert neurons[1] == [(3, pytest.approx(0.3))]  # zero weights are left out


def test_vocab_projection_top_and_bottom():
    logits = np.array([[0.0, 3.0, -2.0, 1.0], [5.0, -1.0, 0.0, 2.0]])
    vocab = ["a", "b", "c", "d"]
    result = analysis.vocab_projection(logits, word_decode(vocab), n=2)
    assert result[0]["top"] == [("b", 3.0), ("d", 1.0)]
    assert result[0]["bottom"] == [("c", -2.0), ("a", 0.0)]
    assert result[1]["top"] == [("a", 5.0), ("d", 2.0)]
    assert result[1]["bottom"] == [("b", -1.0), ("c", 0.0)]


def test_project_features_to_vocab_calls_the_model():
    class Model:
        def project_to_vocab(self, layer, directions):
            assert layer == 3 and directions.shape == (2, 1)
            return np.array([[1.0, -1.0, 0.5]])

    [result] = analysis.project_features_to_vocab(Model(), 3, np.ones((2, 1)), word_decode(["x", "y", "z"]), n=1)
    assert result == {"top": [("x", 1.0)], "bottom": [("y", -1.0)]}


def test_label_shares():
    label_index = np.array([0, 0, 1, -1, 1, 0])
    labels = ["animals", "colours"]
    shares = analysis.label_shares([np.array([0, 1, 2, 3]), np.array([2, 4]), np.array([], int)],
                                   label_index, labels)
    assert shares[0] == {"animals": 0.5, "(none)": 0.25, "colours": 0.25}
    assert list(shares[0]) == ["animals", "(none)", "colours"]  # largest share first, then by name
    assert shares[1] == {"colours": 1.0}
    assert shares[2] == {}
    with pytest.raises(ValueError, match="out of range"):
        analysis.label_shares([np.array([0])], np.array([2]), labels)


def test_code_statistics():
    codes = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    stats = analysis.code_statistics(codes)
    np.testing.assert_allclose(stats["density"], [0.5, 0.25, 0.0])
    np.testing.assert_allclose(stats["mean"], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(stats["max"], [3.0, 2.0, 0.0])
    assert stats["dead"].tolist() == [False, False, True]
    assert stats["l0"] == pytest.approx(0.75)


# ---------------------------------------------------------------- concept recovery


def test_concept_recovery_majority_rule():
    concepts = {"colours": ["red", "blue", "green"], "animals": ["cat", "dog"], "fruits": ["apple"]}
    top_tokens = [
        [" red", "Blue", "green", "the"],        # 3/4 colours -> recovered
        ["cat", "the", "a", "dog"],              # 2/4 animals = 50 %: not more than half
        ["apple", "cat", "apple", "cat", "apple"],  # fruits 3/5 -> recovered; animals 2/5
        [],                                      # dead feature
    ]
    result = analysis.concept_recovery(top_tokens, concepts)
    assert result["recovered"] == 2 and result["total"] == 3
    assert result["concepts"]["colours"] == {"feature": 0, "share": 0.75, "recovered": True}
    assert result["concepts"]["animals"] == {"feature": 1, "share": 0.5, "recovered": False}
    assert result["concepts"]["fruits"]["feature"] == 2
    assert result["concepts"]["fruits"]["share"] == pytest.approx(0.6)


def test_concept_recovery_no_feature_has_the_concept():
    result = analysis.concept_recovery([["a", "b"]], {"months": ["may"]})
    assert result["concepts"]["months"] == {"feature": None, "share": 0.0, "recovered": False}
    with pytest.raises(ValueError, match="at least one concept"):
        analysis.concept_recovery([["a"]], {})
