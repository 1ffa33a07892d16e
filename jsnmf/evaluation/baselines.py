"""Baseline directions the paper compares SNMF features with. DiffMeans here; the TopK SAE is separate.

DiffMeans (``notes/ecosystem.md`` §4.5): for a concept with sentences ``S⁺`` and the other sentences
``S⁻``, ``v = mean(a_t : t a token of S⁺) − mean(a_t : t a token of S⁻)``, normalised to unit length.

- **Token mean**, as the paper's code: every token of a set weighs the same, so longer sentences
  count more. A sentence mean would weigh sentences equally; we follow the paper so that its numbers
  can be reproduced (``token_mean=False`` gives the sentence mean for comparison).
- **BOS and padding excluded.** The paper keeps a BOS where the tokenizer adds one (Gemma, Llama, not
  GPT-2). Its activation is identical in every sentence but, under token means, weighs ``1/n_tokens``
  of each set, so it does not cancel when the sets' mean lengths differ, and in real models it is
  a large-norm outlier: we leave it out (the activations come from ``sentence_activations``).
- **Site**: any; the paper takes DiffMeans at ``hook_mlp_out`` (the residual site), where it also
  steers with them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .activations import concept_mask

__all__ = ["diff_means", "diff_means_directions"]


def _stack(sentences: Sequence[np.ndarray], which: np.ndarray, token_mean: bool) -> np.ndarray:
    chosen = [np.asarray(a, np.float64) for a, keep in zip(sentences, which) if keep]
    if token_mean:
        return np.concatenate(chosen, axis=0).mean(axis=0)
    return np.mean([a.mean(axis=0) for a in chosen], axis=0)


def diff_means(sentence_acts: Sequence[np.ndarray], in_concept, *, token_mean: bool = True) -> np.ndarray:
    """The unit DiffMeans direction of the sentences flagged by ``in_concept`` against all the others.

    ``sentence_acts``: per sentence [n_i, width] activations of its scored tokens (no BOS, no
    padding). ``in_concept``: a boolean per sentence. Returns float32 [width].
    """
    in_concept = np.asarray(in_concept, bool)
    if in_concept.shape != (len(sentence_acts),):
        raise ValueError(f"in_concept must have one flag per sentence ({len(sentence_acts)}), got {in_concept.shape}")
    if in_concept.all() or not in_concept.any():
        raise ValueError("DiffMeans needs sentences both in and out of the concept")
    if any(np.asarray(a).ndim != 2 or len(a) == 0 for a in sentence_acts):
        raise ValueError("every sentence needs a [n_tokens > 0, width] activation array")
    diff = _stack(sentence_acts, in_concept, token_mean) - _stack(sentence_acts, ~in_concept, token_mean)
    norm = float(np.linalg.norm(diff))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("the two means are equal (or not finite): no DiffMeans direction")
    return (diff / norm).astype(np.float32)


def diff_means_directions(sentence_acts: Sequence[np.ndarray], labels: Sequence[str | None],
                          concepts: Sequence[str] | None = None, *, token_mean: bool = True) -> np.ndarray:
    """DiffMeans of each concept against every other sentence, as columns: [width, n_concepts].

    ``labels`` per sentence (``+``-joined for several concepts, see ``concept_mask``); ``concepts``
    defaults to the sorted single labels. Laid out like ``F``, so detection takes either.
    """
    if len(labels) != len(sentence_acts):
        raise ValueError(f"{len(labels)} labels for {len(sentence_acts)} sentences")
    if concepts is None:
        concepts = sorted({name for lab in labels if lab is not None for name in lab.split("+")})
    return np.stack([diff_means(sentence_acts, concept_mask(labels, c), token_mean=token_mean) for c in concepts],
                    axis=1)
