"""Judges of steered text, without a paid API: pluggable callables, each validated on labelled sentences.

The paper asks gpt-4o-mini for a concept score and a fluency score in {0, 1, 2} and reports their
harmonic mean (``notes/ecosystem.md`` §4.4). Here a judge is any callable:

- a **concept judge** ``judge(texts, concepts) -> scores`` (higher: the text is more about the
  concept): :class:`LikelihoodRatioJudge` under a local model, or :class:`LexiconJudge` (the share of
  a text's words in the concept's word set; for the planted demo, whose concepts *are* word sets);
- a **fluency judge** ``judge(texts) -> scores`` (higher: more fluent): :class:`Fluency`, the mean
  log-probability per token of the text under a model (the unsteered model, or the judge's).

The likelihood-ratio concept score of a text ``t`` is, per token of ``t``,
``[log p(t | "The following text is about {concept}:") − log p(t | "The following text:")] / |t|``:
how much naming the concept makes the text more predictable. It needs no instruction following (a
135M instruct model asked "Is this text about X?" answers at chance; the ratio does not).

Every judge must be validated before its numbers mean anything: :func:`validate_judge` scores each
labelled sentence against its own label and against a random other label and returns the AUROC of
matched vs mismatched (0.5 = the judge cannot tell); report it beside every table.

Combination (the paper's harmonic mean; :class:`ScoreScale` states the rule mapping each raw score
to [0, 1]):

- concept: ``clip(raw / r_c, 0, 1)`` with ``r_c`` the mean matched score of the judge's validation:
  a text as much about the concept as a human-written sentence of it scores 1, a text the concept
  does not make more likely (raw ≤ 0) scores 0;
- fluency: ``clip((lp − lp₀) / (lp_ref − lp₀), 0, 1)`` with ``lp_ref`` the mean log-probability of the
  unsteered samples (unsteered text scores 1) and ``lp₀ = −log(vocab)``, uniformly random tokens (0);
- final: ``2cf / (c + f)``, 0 when either is 0 (the paper's rule).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .detection import auroc

__all__ = ["ConceptJudge", "FluencyJudge", "Fluency", "JudgeValidation", "LexiconJudge", "LikelihoodRatioJudge",
           "ScoreScale", "harmonic_mean", "text_logprobs", "validate_judge"]


class ConceptJudge(Protocol):
    def __call__(self, texts: Sequence[str], concepts: Sequence[str]) -> np.ndarray:
        """One score per (text, concept) pair, higher = more about the concept."""


class FluencyJudge(Protocol):
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """One score per text, higher = more fluent."""


# ---------------------------------------------------------------- log-probabilities under a model


@functools.partial(jax.jit, static_argnames=())
def _gather_logprobs(logits, targets):
    # log p of each next token, computed on the device: the [batch, seq, vocab] log-softmax never leaves it
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[:, 1:, None], axis=-1)[..., 0]


def _context_ids(tokenizer, context: str, bos: bool) -> list[int]:
    ids = list(tokenizer(context, add_special_tokens=False)["input_ids"]) if context else []
    if bos and tokenizer.bos_token_id is not None:
        ids = [int(tokenizer.bos_token_id)] + ids
    if not ids:  # the first text token needs something to be predicted from
        fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [int(fallback)]
    return ids


def text_logprobs(model, tokenizer, contexts: Sequence[str], texts: Sequence[str], *, bos: bool = True,
                  logits_budget: int = 2 ** 28, bucket: int = 16) -> list[np.ndarray]:
    """Per (context, text) pair, ``log p(token | context, earlier tokens of text)`` for each token of the
    text: a float64 array per pair.

    The context and the text are tokenized separately and concatenated (BOS first when ``bos``), so a
    text has the same tokens whatever its context and per-token differences between contexts compare
    like with like. Rows run right-padded, grouped by length; rows per batch are chosen so that the
    logits stay under ``logits_budget`` bytes (a 262k-token vocabulary needs small batches).
    """
    if len(contexts) != len(texts):
        raise ValueError(f"{len(contexts)} contexts for {len(texts)} texts")
    ctx_cache: dict[str, list[int]] = {}
    rows, starts = [], []
    text_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
    for context, tids in zip(contexts, text_ids):
        if context not in ctx_cache:
            ctx_cache[context] = _context_ids(tokenizer, context, bos)
        if not tids:
            raise ValueError("a text has no tokens to score")
        rows.append(ctx_cache[context] + list(tids))
        starts.append(len(ctx_cache[context]))
    vocab = model.config.vocab_size
    result: list[np.ndarray | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    i = 0
    while i < len(order):
        width = -(-len(rows[order[i]]) // bucket) * bucket
        n = min(max(1, int(logits_budget // (width * vocab * 4))), len(order) - i)
        n = 1 << (n - 1).bit_length()  # a power of two ≥ the rows left: few distinct shapes, few compiles
        while n * width * vocab * 4 > logits_budget and n > 1:
            n //= 2
        chunk = [j for j in order[i:i + n] if len(rows[j]) <= width]
        ids = np.zeros((n, width), np.int32)
        mask = np.zeros((n, width), np.int32)
        for r in range(n):
            seq = rows[chunk[r] if r < len(chunk) else chunk[0]]
            ids[r, :len(seq)], mask[r, :len(seq)] = seq, 1
        logp = np.asarray(_gather_logprobs(model(ids, attention_mask=mask).logits, jnp.asarray(ids)), np.float64)
        for r, j in enumerate(chunk):  # logp[:, t] predicts token t + 1
            result[j] = logp[r, starts[j] - 1:len(rows[j]) - 1]
        i += len(chunk)
    return result  # type: ignore[return-value]


# ---------------------------------------------------------------- judges


class LikelihoodRatioJudge:
    """Concept score: mean per-token ``log p(text | template) − log p(text | neutral)`` (module docstring).

    ``template`` holds ``{concept}``; labels are stripped of surrounding spaces before they go in. The
    neutral log-probabilities are cached per text (they do not depend on the concept), and
    :meth:`fluency` reuses them: the judge's fluency of a text is its mean log-probability after the
    neutral context.
    """

    def __init__(self, model, tokenizer, *, template: str = "The following text is about {concept}:",
                 neutral: str = "The following text:", bos: bool = True, logits_budget: int = 2 ** 28):
        if "{concept}" not in template:
            raise ValueError("template must contain '{concept}'")
        self.model, self.tokenizer, self.template, self.neutral = model, tokenizer, template, neutral
        self.bos, self.logits_budget = bos, logits_budget
        self._neutral: dict[str, float] = {}

    def _mean_logprobs(self, contexts, texts) -> np.ndarray:
        # one space between context and text whatever the text's own leading whitespace, so the text's
        # tokens are the same in every context (whitespace-only text, e.g. a run of newlines, is kept)
        lps = text_logprobs(self.model, self.tokenizer, contexts, [" " + (t.strip() or t) for t in texts],
                            bos=self.bos, logits_budget=self.logits_budget)
        return np.array([lp.mean() for lp in lps])

    def neutral_logprob(self, texts: Sequence[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self._neutral})
        if missing:
            self._neutral.update(zip(missing, self._mean_logprobs([self.neutral] * len(missing), missing)))
        return np.array([self._neutral[t] for t in texts])

    def __call__(self, texts: Sequence[str], concepts: Sequence[str]) -> np.ndarray:
        if len(texts) != len(concepts):
            raise ValueError(f"{len(texts)} texts for {len(concepts)} concepts")
        prompts = [self.template.format(concept=c.strip()) for c in concepts]
        return self._mean_logprobs(prompts, texts) - self.neutral_logprob(texts)

    def fluency(self, texts: Sequence[str]) -> np.ndarray:
        return self.neutral_logprob(texts)


class Fluency:
    """Fluency score: mean per-token log-probability of each text after ``context`` under ``model``
    (the unsteered model with the generation prompt, so degenerate continuations score low)."""

    def __init__(self, model, tokenizer, *, context: str = "I think that", bos: bool = True,
                 logits_budget: int = 2 ** 28):
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.bos, self.logits_budget = bos, logits_budget

    @property
    def floor(self) -> float:
        """``−log(vocab)``: the mean log-probability of uniformly random tokens."""
        return -float(np.log(self.model.config.vocab_size))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        lps = text_logprobs(self.model, self.tokenizer, [self.context] * len(texts), list(texts), bos=self.bos,
                            logits_budget=self.logits_budget)
        return np.array([lp.mean() for lp in lps])


_WORD = re.compile(r"[a-z0-9']+")


class LexiconJudge:
    """Concept score: the share of a text's words (lower-cased runs of letters, digits, apostrophes)
    that lie in the concept's word set. ``lexicon``: concept → words."""

    def __init__(self, lexicon: Mapping[str, Sequence[str]]):
        self.lexicon = {c: frozenset(w.lower() for w in words) for c, words in lexicon.items()}

    def __call__(self, texts: Sequence[str], concepts: Sequence[str]) -> np.ndarray:
        if len(texts) != len(concepts):
            raise ValueError(f"{len(texts)} texts for {len(concepts)} concepts")
        scores = []
        for text, concept in zip(texts, concepts):
            words = _WORD.findall(text.lower())
            scores.append(sum(w in self.lexicon[concept] for w in words) / len(words) if words else 0.0)
        return np.array(scores)


# ---------------------------------------------------------------- validation and combination


@dataclasses.dataclass(frozen=True)
class JudgeValidation:
    """Matched-vs-mismatched validation of a concept judge: ``auroc`` of ``matched`` (each sentence
    with its own label) against ``mismatched`` (the same sentence with a random other label)."""

    auroc: float
    matched: np.ndarray
    mismatched: np.ndarray
    n_sentences: int

    def to_dict(self) -> dict:
        return {"auroc": self.auroc, "n_sentences": self.n_sentences,
                "matched_mean": float(self.matched.mean()), "mismatched_mean": float(self.mismatched.mean())}


def validate_judge(judge: ConceptJudge, texts: Sequence[str], labels: Sequence[str], *,
                   concepts: Sequence[str] | None = None, seed: int = 0) -> JudgeValidation:
    """Score every sentence against its own label and against one other label drawn at random (``seed``)
    from ``concepts`` (default: the distinct labels); AUROC of matched vs mismatched.

    Labels may be ``+``-joined (several concepts): the first one in ``concepts`` is the matched label and
    the mismatched one is drawn from those not in the sentence. Sentences with no label in ``concepts``
    are skipped.
    """
    pool = list(dict.fromkeys(concepts if concepts is not None else labels))
    if len(pool) < 2:
        raise ValueError("validation needs at least two concepts")
    rng = np.random.default_rng(seed)
    keep, own, other = [], [], []
    for text, label in zip(texts, labels):
        names = [label] if label in pool else [n for n in str(label).split("+") if n in pool]
        if not names:
            continue
        keep.append(text)
        own.append(names[0])
        others = [c for c in pool if c not in names]
        other.append(others[int(rng.integers(len(others)))])
    if not keep:
        raise ValueError("no sentence carries a label among the concepts")
    matched = np.asarray(judge(keep, own), np.float64)
    mismatched = np.asarray(judge(keep, other), np.float64)
    return JudgeValidation(auroc(matched, mismatched), matched, mismatched, len(keep))


def harmonic_mean(a, b) -> np.ndarray:
    """``2ab / (a + b)`` elementwise, 0 where ``a + b = 0`` (the paper's: 0 if either score is 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    total = a + b
    return np.where(total > 0, 2 * a * b / np.where(total > 0, total, 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class ScoreScale:
    """The stated rule mapping raw judge scores to [0, 1] (module docstring): ``concept_reference`` r_c,
    ``fluency_reference`` lp_ref and ``fluency_floor`` lp₀."""

    concept_reference: float
    fluency_reference: float
    fluency_floor: float

    def __post_init__(self):
        if not self.concept_reference > 0:
            raise ValueError(f"concept_reference must be > 0 (a judge whose matched mean is not positive "
                             f"fails validation), got {self.concept_reference}")
        if not self.fluency_reference > self.fluency_floor:
            raise ValueError("fluency_reference must exceed fluency_floor")

    def concept(self, raw) -> np.ndarray:
        return np.clip(np.asarray(raw, np.float64) / self.concept_reference, 0.0, 1.0)

    def fluency(self, raw) -> np.ndarray:
        raw = np.asarray(raw, np.float64)
        return np.clip((raw - self.fluency_floor) / (self.fluency_reference - self.fluency_floor), 0.0, 1.0)

    def combine(self, concept_raw, fluency_raw) -> dict[str, np.ndarray]:
        c, f = self.concept(concept_raw), self.fluency(fluency_raw)
        return {"concept": c, "fluency": f, "score": harmonic_mean(c, f)}
