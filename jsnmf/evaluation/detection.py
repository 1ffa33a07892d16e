"""Concept detection: does a direction light up on a concept's sentences and not on the others?

The paper's procedure (``notes/ecosystem.md`` §4.2): with ``v`` a direction (a column of ``F`` at
``hook_post``, a DiffMeans or SAE direction at its own site), score a sentence by the **maximum over
its tokens** of ``cosine(v, a_t)``, BOS and padding excluded. The paper stops at the two score lists
(its aggregation is not in its code); here they become, per (direction, concept):

- **AUROC** of the concept's sentences against all other sentences: the Mann–Whitney statistic
  ``P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)``, so ties count half and 0.5 is chance;
- **mean gap**: mean score of the concept's sentences minus the others'.

Matching (so SNMF, DiffMeans and the SAE are scored on the same concepts): a concept is matched to
the feature whose top tokens *carry* its label most. A feature's top tokens are its ``k_top`` tokens
with the largest code ``G[:, j]`` (codes ≤ 0 dropped, ``analysis.top_activations``); its carry of a
concept is the share of those tokens that lie in a sentence labelled with the concept. The feature
with the largest carry wins (ties: the lower index); a concept no feature's top tokens touch stays
unmatched. Several concepts may match one feature.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jsnmf.analysis import top_activations

from .activations import concept_mask

__all__ = ["Detection", "auroc", "carry_shares", "detection_table", "match_concepts", "mean_gap",
           "sentence_scores"]


def sentence_scores(directions, sentence_acts: Sequence[np.ndarray]) -> np.ndarray:
    """Max over each sentence's tokens of ``cosine(v, a_t)``, for every direction: [k, n_sentences].

    ``directions``: [width] or [width, k] (columns, like ``F``). ``sentence_acts``: per sentence its
    scored tokens' activations [n_i, width] (``sentence_activations``: no BOS, no padding). A token
    whose activation is zero has cosine 0.
    """
    d = np.asarray(directions, np.float64)
    d = d[:, None] if d.ndim == 1 else d
    norms = np.linalg.norm(d, axis=0)
    if d.ndim != 2 or not np.all(np.isfinite(d)) or np.any(norms == 0):
        raise ValueError("directions must be finite, non-zero columns [width, k]")
    unit = d / norms
    scores = np.empty((d.shape[1], len(sentence_acts)))
    for i, acts in enumerate(sentence_acts):
        a = np.asarray(acts, np.float64)
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] != d.shape[0]:
            raise ValueError(f"sentence {i}: activations must be [n_tokens > 0, {d.shape[0]}], got {a.shape}")
        a_norm = np.linalg.norm(a, axis=1, keepdims=True)
        cos = (a / np.where(a_norm == 0, 1.0, a_norm)) @ unit  # zero rows stay zero
        scores[:, i] = cos.max(axis=0)
    return scores


def auroc(positive, negative) -> float:
    """Area under the ROC curve of ``positive`` vs ``negative`` scores, ties counting one half.

    Computed as the Mann–Whitney U statistic from average ranks: ``U = R⁺ − n⁺(n⁺+1)/2``,
    ``AUROC = U / (n⁺ n⁻)``.
    """
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError("scores contain NaN or inf")
    both = np.concatenate([pos, neg])
    order = np.argsort(both, kind="stable")
    sorted_scores = both[order]
    ranks = np.empty(both.size)
    # average rank (1-based) over each run of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], both.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = 0.5 * (s + 1 + e)
    u = ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def mean_gap(positive, negative) -> float:
    """Mean of ``positive`` minus mean of ``negative``."""
    return float(np.mean(positive) - np.mean(negative))


@dataclasses.dataclass(frozen=True)
class Detection:
    """Detection of every concept by every direction: ``auroc`` and ``gap`` [k, n_concepts],
    ``scores`` [k, n_sentences] (the per-sentence max-token cosines)."""

    concepts: tuple[str, ...]
    auroc: np.ndarray
    gap: np.ndarray
    scores: np.ndarray

    def for_matches(self, matches: dict) -> dict[str, dict]:
        """Per concept, the AUROC and gap of its matched direction (None when unmatched). ``matches``:
        concept → direction index, or ``match_concepts``' output."""
        result = {}
        for c, name in enumerate(self.concepts):
            j = matches.get(name)
            j = j["feature"] if isinstance(j, dict) else j
            result[name] = {"feature": j, "auroc": None if j is None else float(self.auroc[j, c]),
                            "gap": None if j is None else float(self.gap[j, c])}
        return result


def detection_table(directions, sentence_acts: Sequence[np.ndarray], labels: Sequence[str | None],
                    concepts: Sequence[str]) -> Detection:
    """Score every sentence with every direction, then AUROC and mean gap per (direction, concept),
    each concept's sentences against all the others."""
    if len(labels) != len(sentence_acts):
        raise ValueError(f"{len(labels)} labels for {len(sentence_acts)} sentences")
    scores = sentence_scores(directions, sentence_acts)
    aurocs = np.empty((scores.shape[0], len(concepts)))
    gaps = np.empty_like(aurocs)
    for c, name in enumerate(concepts):
        inside = concept_mask(labels, name)
        if inside.all() or not inside.any():
            raise ValueError(f"concept {name!r} needs sentences both in and out of it")
        for j, row in enumerate(scores):
            aurocs[j, c] = auroc(row[inside], row[~inside])
            gaps[j, c] = mean_gap(row[inside], row[~inside])
    return Detection(tuple(concepts), aurocs, gaps, scores)


def carry_shares(codes, token_sentence, labels: Sequence[str | None], concepts: Sequence[str],
                 k_top: int = 25) -> np.ndarray:
    """Per (feature, concept), the share of the feature's ``k_top`` top tokens (largest codes, codes ≤ 0
    dropped) that lie in a sentence of the concept: [k, n_concepts]; a dead feature's row is 0.

    ``codes``: ``G`` [n_tokens, k] of the labelled sentences' tokens (e.g. ``SNMF.transform``);
    ``token_sentence``: the sentence index of each token.
    """
    token_sentence = np.asarray(token_sentence, np.int64)
    codes = np.asarray(codes)
    if token_sentence.shape != (codes.shape[0],):
        raise ValueError(f"token_sentence needs one entry per code row ({codes.shape[0]}), got {token_sentence.shape}")
    members = np.stack([concept_mask(labels, c) for c in concepts], axis=1)  # [n_sentences, C]
    shares = np.zeros((codes.shape[1], len(concepts)))
    for j, top in enumerate(top_activations(codes, k_top)):
        if len(top):
            shares[j] = members[token_sentence[top]].mean(axis=0)
    return shares


def match_concepts(codes, token_sentence, labels: Sequence[str | None], concepts: Sequence[str],
                   k_top: int = 25) -> dict[str, dict]:
    """Each concept's feature: the one whose top tokens carry the concept most (module docstring).

    Returns ``{concept: {"feature": j or None, "carry": share}}``.
    """
    shares = carry_shares(codes, token_sentence, labels, concepts, k_top)
    result = {}
    for c, name in enumerate(concepts):
        j = int(np.argmax(shares[:, c])) if shares.size else 0  # argmax: the first (lowest) index on ties
        carry = float(shares[j, c]) if shares.size else 0.0
        result[name] = {"feature": j if carry > 0 else None, "carry": carry}
    return result
