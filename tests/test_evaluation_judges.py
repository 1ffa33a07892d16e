"""Steered generation (the paper's protocol) and the judges: lexicon and likelihood-ratio concept judges,
fluency, the matched-vs-mismatched validation, and the [0, 1] mapping with the harmonic mean."""
import json
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

import jsnmf.models as jm
from planted import planted_direction
from jsnmf import demo
from jsnmf.evaluation import (Fluency, LexiconJudge, LikelihoodRatioJudge, ScoreScale, harmonic_mean, prompt_ids,
                              steered_generate, text_logprobs, validate_judge)




# ---------------------------------------------------------------- steered generation


def test_steered_generation_has_the_requested_length_and_alpha_zero_is_unsteered(demo_model):
    model, tok, planted = demo_model
    v = planted_direction(model, planted, 1, "animals")
    samples = steered_generate(model, tok, v, 1, "hook_post", [0.0, 60.0], n_samples=3, max_new_tokens=50, seed=7)
    assert [s.alpha for s in samples] == [0.0, 60.0]
    for s in samples:
        assert s.tokens.shape == (3, 50) and len(s.texts) == 3
    ids = np.repeat(prompt_ids(tok)[None], 3, axis=0)
    assert ids[0, 0] == tok.bos_token_id
    plain = jm.generate(model, ids, max_new_tokens=50, temperature=1.0, top_k=30, top_p=0.3, seed=7,
                        stop_at_eos=False).new_tokens
    np.testing.assert_array_equal(samples[0].tokens, np.asarray(plain))
    # the steered samples are about the planted concept, the unsteered ones are not
    lexicon = LexiconJudge(demo.CONCEPTS)
    score = [lexicon(list(s.texts), ["animals"] * 3).mean() for s in samples]
    assert score[0] < 0.2 and score[1] > 0.8, score


def test_generation_never_stops_early_at_eos(demo_model, monkeypatch):
    """Every row gets the full length: generate is told not to stop at EOS (a row that sampled EOS keeps
    sampling), so the judges always see texts of the same length."""
    import jsnmf.evaluation.generation as gen

    model, tok, _ = demo_model
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return jm.generate(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", spy)
    samples = steered_generate(model, tok, np.ones(model.config.d_mlp, np.float32), 0, "hook_post", [5.0, -5.0],
                               n_samples=2, max_new_tokens=12, seed=0)
    assert [c["stop_at_eos"] for c in calls] == [False, False]
    assert all(s.tokens.shape == (2, 12) for s in samples)
    with pytest.raises(ValueError, match="site"):
        steered_generate(model, tok, np.ones(4), 0, "resid", [1.0])


# ---------------------------------------------------------------- log-probabilities


def test_text_logprobs_equal_a_per_row_hand_computation(demo_model):
    model, tok, _ = demo_model
    contexts = ["The weather was nice", "", "We took the bus to see the"]
    texts = [" and we walked home.", "Monday again.", " lion near the river ."]
    batched = text_logprobs(model, tok, contexts, texts, logits_budget=2 * 16 * model.config.vocab_size * 4)
    for context, text, got in zip(contexts, texts, batched):
        ctx = [tok.bos_token_id] + (tok(context, add_special_tokens=False)["input_ids"] if context else [])
        tids = tok(text, add_special_tokens=False)["input_ids"]
        ids = np.array([ctx + tids], np.int32)
        logits = np.asarray(model(ids).logits, np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        want = [logp[len(ctx) - 1 + t, tok_id] for t, tok_id in enumerate(tids)]
        assert got.shape == (len(tids),)
        np.testing.assert_allclose(got, want, atol=2e-4)


# ---------------------------------------------------------------- concept judges


def test_lexicon_judge_by_hand_and_its_validation_on_the_demo_corpus():
    judge = LexiconJudge({"animals": ["dog", "cat"], "fruits": ["apple"]})
    np.testing.assert_allclose(judge(["The dog saw a cat.", "An apple!", ""], ["animals", "fruits", "animals"]),
                               [2 / 5, 1 / 2, 0.0])
    records = demo.read_demo_corpus()
    validation = validate_judge(LexiconJudge(demo.CONCEPTS), [r["text"] for r in records],
                                [r["label"] for r in records], concepts=list(demo.CONCEPTS))
    assert validation.auroc == 1.0 and validation.n_sentences == sum(r["label"] != "filler" for r in records)
    print(json.dumps({"lexicon_judge_auroc": validation.auroc, "n": validation.n_sentences}))


class _AssociativeLM:
    """A tiny bag-of-words language model: once a word of group ``g`` (a concept's words and its name) has
    been read, every word of ``g`` gets +3 logits from then on. Naming a concept in the context therefore
    makes its words likelier, which is what the likelihood-ratio judge measures."""

    def __init__(self, vocab_size, groups):
        member = np.zeros((len(groups), vocab_size), np.float32)
        for g, ids in enumerate(groups):
            member[g, ids] = 1.0
        self.member = jnp.asarray(member)
        self.config = SimpleNamespace(vocab_size=vocab_size)

    def __call__(self, ids, attention_mask=None):
        hits = self.member.T[jnp.asarray(ids)]  # [batch, seq, groups]
        if attention_mask is not None:
            hits = hits * jnp.asarray(attention_mask)[..., None]
        seen = (jnp.cumsum(hits, axis=1) > 0).astype(jnp.float32)
        return SimpleNamespace(logits=3.0 * seen @ self.member)


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "[UNK]"] + sorted(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer, core.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<s>", unk_token="[UNK]",
                                   pad_token="<s>")


def test_likelihood_ratio_judge_ranks_matched_above_mismatched():
    records = [r for r in demo.read_demo_corpus() if r["label"] in demo.CONCEPTS]
    words = {w for ws in demo.CONCEPTS.values() for w in ws} | set(demo.CONCEPTS)
    words |= {"the", "following", "text", "is", "about", ":"}
    words |= {w.lower().strip(".,") for r in records for w in r["text"].split()}
    tok = _word_tokenizer(words)
    groups = [tok.convert_tokens_to_ids(list(ws) + [name]) for name, ws in demo.CONCEPTS.items()]
    lm = _AssociativeLM(len(tok), groups)
    judge = LikelihoodRatioJudge(lm, tok)
    texts, labels = [r["text"] for r in records], [r["label"] for r in records]
    validation = validate_judge(judge, texts, labels, seed=0)
    assert validation.auroc >= 0.99, validation.to_dict()
    # pair by pair: naming the right concept helps more than naming a wrong one (a matched score itself can
    # be negative: the boost for the concept's other words takes mass from the sentence's other words)
    assert (validation.matched > validation.mismatched).all()
    # by hand for one sentence: only the concept word's probability changes with the context
    text, concept = texts[0], labels[0]
    tids = tok(" " + text, add_special_tokens=False)["input_ids"]
    with_c = text_logprobs(lm, tok, [f"The following text is about {concept}:"], [" " + text])[0]
    without = text_logprobs(lm, tok, ["The following text:"], [" " + text])[0]
    np.testing.assert_allclose(judge([text], [concept])[0], (with_c - without).mean(), atol=1e-9)
    assert len(with_c) == len(tids)
    print(json.dumps({"lr_judge_associative_auroc": validation.auroc, "n": validation.n_sentences}))


def test_likelihood_ratio_judge_on_the_demo_model_is_at_chance_and_says_so(demo_model):
    """The demo tokenizer knows only the corpus' words: every concept name is [UNK], so the template reads
    the same for every concept and the judge cannot tell matched from mismatched. The validation must
    report exactly that (AUROC 0.5), which is why a judge's AUROC goes beside every table."""
    model, tok, _ = demo_model
    assert all(tok.convert_tokens_to_ids(name) == tok.unk_token_id for name in demo.CONCEPTS)
    records = [r for r in demo.read_demo_corpus() if r["label"] in demo.CONCEPTS][:60]
    judge = LikelihoodRatioJudge(model, tok)
    validation = validate_judge(judge, [r["text"] for r in records], [r["label"] for r in records], seed=0)
    np.testing.assert_array_equal(validation.matched, validation.mismatched)
    assert validation.auroc == 0.5 and validation.n_sentences == 60
    np.testing.assert_allclose(judge.fluency(["The dog ran."]), judge.neutral_logprob(["The dog ran."]))


# ---------------------------------------------------------------- fluency and combination


def test_fluency_is_the_mean_logprob_after_the_prompt(demo_model):
    model, tok, _ = demo_model
    fluency = Fluency(model, tok)
    texts = [" the dog ran home .", " dog dog dog dog dog"]
    got = fluency(texts)
    want = [text_logprobs(model, tok, ["I think that"], [t])[0].mean() for t in texts]
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert fluency.floor == pytest.approx(-np.log(model.config.vocab_size))


def test_score_scale_and_harmonic_mean():
    np.testing.assert_allclose(harmonic_mean([1.0, 0.0, 0.5, 0.0], [1.0, 1.0, 0.25, 0.0]), [1.0, 0.0, 1 / 3, 0.0])
    scale = ScoreScale(concept_reference=2.0, fluency_reference=-2.0, fluency_floor=-10.0)
    out = scale.combine([-1.0, 1.0, 4.0], [-12.0, -6.0, -1.0])
    np.testing.assert_allclose(out["concept"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(out["fluency"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(out["score"], [0.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        ScoreScale(concept_reference=0.0, fluency_reference=-2.0, fluency_floor=-10.0)
    with pytest.raises(ValueError, match="two concepts"):
        validate_judge(LexiconJudge({"a": ["x"]}), ["x"], ["a"])
