"""The example contexts of a feature: its top tokens and samples across activation quantiles, each
with every token of its window and that token's code, near-duplicates collapsed.

Two examples are near-duplicates when the tokens within ±``dedup_radius`` positions of the activating
token (same document) are the same ids: repeated templates and boilerplate show once, with a count.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from jsnmf import analysis

__all__ = ["token_pieces", "collapse_duplicates", "quantile_samples", "example_record"]


def token_pieces(ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[str]:
    """The text of each token of ``ids`` such that the pieces joined read as ``decode(ids)``.

    Decodes growing prefixes (right spacing for byte-level BPE, word-level and SentencePiece); a
    tokenizer that rewrites earlier text falls back to each token decoded alone, joined by spaces.
    """
    ids = [int(t) for t in ids]
    pieces, previous = [], ""
    for m in range(1, len(ids) + 1):
        text = decode(ids[:m])
        if not text.startswith(previous):
            return [("" if i == 0 else " ") + decode([t]) for i, t in enumerate(ids)]
        pieces.append(text[len(previous):])
        previous = text
    return pieces


def _dedup_key(i: int, token_ids: np.ndarray, documents: analysis.DocumentIndex, radius: int) -> tuple:
    before, after = documents.window(int(i), radius)
    return tuple(int(t) for t in token_ids[np.concatenate([before, [int(i)], after]).astype(np.int64)])


def collapse_duplicates(indices: Sequence[int], token_ids: np.ndarray, documents: analysis.DocumentIndex,
                        radius: int, limit: int | None = None) -> list[tuple[int, int]]:
    """``(token index, n collapsed into it)`` for ``indices`` in order, near-duplicates folded into the
    first of their kind; at most ``limit`` kept (duplicates of a kept one are still counted)."""
    kept: dict[tuple, list] = {}
    for i in indices:
        key = _dedup_key(int(i), token_ids, documents, radius)
        if key in kept:
            kept[key][1] += 1
        elif limit is None or len(kept) < limit:
            kept[key] = [int(i), 0]
    return [(i, n) for i, n in kept.values()]


def quantile_samples(column: np.ndarray, threshold: float, exclude: Sequence[int], n_quantiles: int,
                     per_quantile: int, seed: int) -> list[dict]:
    """Active tokens (code ≥ ``threshold``) split into ``n_quantiles`` intervals of equal count, highest
    first; from each, up to ``per_quantile`` token indices drawn at random (``seed``), largest code first,
    leaving out ``exclude`` (the top tokens). Each interval: ``{"quantiles", "range", "indices"}``."""
    if n_quantiles < 1 or per_quantile < 1 or not np.isfinite(threshold):
        return []
    active = np.flatnonzero(column >= threshold)
    if not active.size:
        return []
    values = column[active]
    edges = np.quantile(values, np.linspace(0.0, 1.0, n_quantiles + 1))
    rng = np.random.default_rng(seed)
    excluded = set(int(i) for i in exclude)
    result = []
    for q in reversed(range(n_quantiles)):
        lo, hi = edges[q], edges[q + 1]
        inside = (values >= lo) & ((values <= hi) if q == n_quantiles - 1 else (values < hi))
        pool = [int(i) for i in active[inside] if int(i) not in excluded]
        if not pool:
            continue
        chosen = rng.choice(np.asarray(pool), size=min(per_quantile * 3, len(pool)), replace=False)
        chosen = chosen[np.lexsort((chosen, -column[chosen]))]
        result.append({"quantiles": [q / n_quantiles, (q + 1) / n_quantiles], "range": [float(lo), float(hi)],
                       "indices": [int(i) for i in chosen]})
    return result


def example_record(i: int, j: int, codes: np.ndarray, token_ids: np.ndarray, documents: analysis.DocumentIndex,
                   decode, window: int, label: str | None, duplicates: int) -> dict:
    """One example of feature ``j`` at token ``i``: its code, the window's tokens and their codes of ``j``,
    the context as left/token/right text, and how many near-duplicates were collapsed into it."""
    before, after = documents.window(int(i), window)
    order = np.concatenate([before, [int(i)], after]).astype(np.int64)
    pieces = token_pieces(token_ids[order], decode)
    at = len(before)
    stripped = pieces[at].lstrip()
    lead = pieces[at][:len(pieces[at]) - len(stripped)] if stripped else ""
    token = stripped if stripped else pieces[at]
    return {
        "token_index": int(i),
        "token": decode([int(token_ids[i])]),
        "value": float(codes[i, j]),
        "document": int(documents.doc_index[i]),
        "position": int(documents.positions[i]),
        "label": label,
        "duplicates": int(duplicates),
        "context": {"left": "".join(pieces[:at]) + lead, "token": token, "right": "".join(pieces[at + 1:])},
        "window": {"tokens": pieces, "values": [float(f"{v:.5g}") for v in codes[order, j]], "at": at},
    }
