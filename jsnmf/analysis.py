"""Analysis of fitted SNMF factors: pure functions over arrays.

Notation follows docs/architecture.md: ``X ≈ G Fᵀ`` with ``F`` (d_mlp × k) features of any sign and
``G`` (n_tokens × k) non-negative codes. Every function here takes plain NumPy arrays (and, where
text is needed, a ``decode(list[int]) -> str`` callable such as ``tokenizer.decode``), so each one
can be tested alone on small hand-made inputs.

The procedures follow the paper's evaluation code (see ``notes/ecosystem.md`` §4):

- top-activating tokens: per feature the ``k_top`` tokens with the largest code, codes ≤ 0 dropped;
- contexts: the tokens within ±``window`` positions *of the same document*, the activating token
  marked (future tokens included, as in the paper);
- vocabulary projection: the unit feature direction pushed through the MLP output weights, the
  final norm and the unembedding (``model.project_to_vocab``), top and bottom tokens;
- concept recovery: a concept counts as recovered when one feature's top-activating tokens are
  mostly (> 50 %) that concept's words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

Decode = Callable[[list[int]], str]

UNLABELLED = "(none)"


def _check_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes G must be 2-D (n_tokens, k), got shape {codes.shape}")
    if not np.all(np.isfinite(codes)):
        raise ValueError("codes G contain NaN or inf")
    return codes


def top_activations(codes: np.ndarray, k_top: int = 25) -> list[np.ndarray]:
    """Per feature, the indices of the ``k_top`` tokens with the largest code, largest first.

    Tokens whose code is ≤ 0 are dropped, so a feature may get fewer than ``k_top`` (none when dead).
    Ties are broken by the lower token index, so the answer is deterministic.
    """
    codes = _check_codes(codes)
    if k_top < 1:
        raise ValueError(f"k_top must be >= 1, got {k_top}")
    n_tokens, k = codes.shape
    k_top = min(k_top, n_tokens)
    result = []
    for j in range(k):
        column = codes[:, j]
        if k_top < n_tokens:
            # argpartition then a stable sort of the short list; lexsort breaks ties by index.
            candidates = np.argpartition(-column, k_top - 1)[:k_top]
            # Bring in every token tied with the k-th value so the tie-break is by index.
            kth_value = column[candidates].min()
            candidates = np.flatnonzero(column >= kth_value)
        else:
            candidates = np.arange(n_tokens)
        order = np.lexsort((candidates, -column[candidates]))
        chosen = candidates[order][:k_top]
        result.append(chosen[column[chosen] > 0].astype(np.int64))
    return result


@dataclass(frozen=True)
class Context:
    """A token shown in its document: ``left + token + right`` reads as the original text."""

    left: str
    token: str
    right: str

    def text(self, marker: tuple[str, str] = ("[[", "]]")) -> str:
        """The context as one string with the activating token wrapped in ``marker``."""
        return f"{self.left}{marker[0]}{self.token}{marker[1]}{self.right}"

    def to_dict(self) -> dict:
        return asdict(self)


class DocumentIndex:
    """Maps a stored token to its neighbours in the same document, ordered by position.

    Built once from the store's per-token ``doc_index`` and ``positions`` arrays.
    """

    def __init__(self, doc_index: np.ndarray, positions: np.ndarray):
        doc_index = np.asarray(doc_index, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        if doc_index.shape != positions.shape or doc_index.ndim != 1:
            raise ValueError(
                f"doc_index and positions must be 1-D of equal length, got {doc_index.shape} "
                f"and {positions.shape}"
            )
        self.doc_index = doc_index
        self.positions = positions
        # Tokens sorted by (document, position); rank[i] = where token i sits in that order.
        self.order = np.lexsort((positions, doc_index))
        self.rank = np.empty_like(self.order)
        self.rank[self.order] = np.arange(len(self.order))
        sorted_docs = doc_index[self.order]
        self.doc_start = np.searchsorted(sorted_docs, sorted_docs, side="left")
        self.doc_end = np.searchsorted(sorted_docs, sorted_docs, side="right")

    def window(self, token_index: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Token indices before and after ``token_index`` within ±``window`` positions, same document."""
        n = len(self.order)
        if not 0 <= token_index < n:
            raise ValueError(f"token index {token_index} out of range for {n} stored tokens")
        r = self.rank[token_index]
        lo, hi = self.doc_start[r], self.doc_end[r]
        neighbours = self.order[lo:hi]
        offsets = self.positions[neighbours] - self.positions[token_index]
        before = neighbours[(offsets < 0) & (offsets >= -window)]
        after = neighbours[(offsets > 0) & (offsets <= window)]
        return before, after


def decode_context(left_ids: Sequence[int], token_id: int, right_ids: Sequence[int],
                   decode: Decode) -> Context:
    """Decode a window so that ``left + token + right`` equals the decoded whole.

    Decoding growing prefixes keeps tokenizer-specific spacing right for byte-level BPE (spaces
    inside tokens), word-level tokenizers (spaces between tokens) and SentencePiece alike.
    """
    left_ids, right_ids = [int(t) for t in left_ids], [int(t) for t in right_ids]
    left = decode(left_ids) if left_ids else ""
    with_token = decode(left_ids + [int(token_id)])
    whole = decode(left_ids + [int(token_id)] + right_ids) if right_ids else with_token
    if with_token.startswith(left) and whole.startswith(with_token):
        token = with_token[len(left):]
        # Leading spaces (a BPE token's " word", a word-level join) belong to the gap, not the token.
        stripped = token.lstrip()
        if stripped:
            left, token = left + token[:len(token) - len(stripped)], stripped
        return Context(left, token, whole[len(with_token):])
    # Tokenizers that rewrite text across boundaries: fall back to pieces joined by spaces.
    token = decode([int(token_id)])
    right = decode(right_ids) if right_ids else ""
    return Context(left + (" " if left else ""), token, (" " if right else "") + right)


def token_contexts(token_indices: Sequence[int], token_ids: np.ndarray, documents: DocumentIndex,
                   decode: Decode, window: int = 15) -> list[Context]:
    """The context of each stored token: ±``window`` tokens of the same document, decoded."""
    token_ids = np.asarray(token_ids)
    contexts = []
    for i in token_indices:
        before, after = documents.window(int(i), window)
        contexts.append(decode_context(token_ids[before], token_ids[int(i)], token_ids[after], decode))
    return contexts


def top_neurons(features: np.ndarray, n: int = 10) -> list[list[tuple[int, float]]]:
    """Per feature (column of ``F``), the ``n`` neurons with the largest |weight|, with their signed weight.

    Zero weights (pruned by the sparsification) are left out.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features F must be 2-D (d_mlp, k), got shape {features.shape}")
    result = []
    for j in range(features.shape[1]):
        column = features[:, j]
        order = np.lexsort((np.arange(len(column)), -np.abs(column)))[:n]
        result.append([(int(i), float(column[i])) for i in order if column[i] != 0])
    return result


def vocab_projection(logits: np.ndarray, decode: Decode, n: int = 10
                     ) -> list[dict[str, list[tuple[str, float]]]]:
    """Top and bottom tokens of each feature's vocabulary projection.

    ``logits`` is (k, vocab), e.g. from ``model.project_to_vocab(layer, F)``. Returns per feature
    ``{"top": [(token, logit), ...], "bottom": [...]}``, top descending, bottom ascending.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"vocab logits must be 2-D (k, vocab), got shape {logits.shape}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("vocab logits contain NaN or inf")
    n = min(n, logits.shape[1])
    result = []
    for row in logits:
        top = np.argsort(-row, kind="stable")[:n]
        bottom = np.argsort(row, kind="stable")[:n]
        result.append({
            "top": [(decode([int(t)]), float(row[t])) for t in top],
            "bottom": [(decode([int(t)]), float(row[t])) for t in bottom],
        })
    return result


def project_features_to_vocab(model, layer: int, features: np.ndarray, decode: Decode, n: int = 10,
                              site: str = "hook_post"):
    """``vocab_projection`` of ``model.project_to_vocab(layer, F, site)`` (the paper's logit-lens view)."""
    features = np.asarray(features, dtype=np.float32)
    extra = {} if site == "hook_post" else {"site": site}  # hook_post: any object with project_to_vocab(layer, F)
    logits = np.asarray(model.project_to_vocab(layer, features, **extra), dtype=np.float32)
    return vocab_projection(logits, decode, n)


def label_shares(top_indices: Sequence[np.ndarray], label_index: np.ndarray,
                 labels: Sequence[str]) -> list[dict[str, float]]:
    """Per feature, the share of its top tokens that come from documents of each label.

    ``label_index`` is per token, −1 meaning no label (counted as ``"(none)"``). Shares sum to 1 for
    features with top tokens, and the dict is empty for dead features. Sorted by share, largest first.
    """
    label_index = np.asarray(label_index, dtype=np.int64)
    if label_index.size and label_index.max() >= len(labels):
        raise ValueError(f"label index {int(label_index.max())} out of range for {len(labels)} labels")
    result = []
    for indices in top_indices:
        counts: dict[str, int] = {}
        for li in label_index[np.asarray(indices, dtype=np.int64)]:
            name = labels[li] if li >= 0 else UNLABELLED
            counts[name] = counts.get(name, 0) + 1
        total = sum(counts.values())
        shares = {name: c / total for name, c in counts.items()} if total else {}
        result.append(dict(sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))))
    return result


def code_statistics(codes: np.ndarray) -> dict[str, np.ndarray]:
    """Per feature: ``density`` (fraction of tokens with code > 0), ``mean``, ``max`` and ``dead``.

    A feature is dead when no token has a positive code. Also returns ``l0``: the mean number of
    active features per token.
    """
    codes = _check_codes(codes)
    active = codes > 0
    density = active.mean(axis=0) if codes.shape[0] else np.zeros(codes.shape[1])
    return {
        "density": density,
        "mean": codes.mean(axis=0) if codes.shape[0] else np.zeros(codes.shape[1]),
        "max": codes.max(axis=0) if codes.shape[0] else np.zeros(codes.shape[1]),
        "dead": ~active.any(axis=0),
        "l0": np.float64(active.sum(axis=1).mean()) if codes.shape[0] else np.float64(0.0),
    }


def normalize_word(word: str) -> str:
    """How token text is compared with concept words: stripped of spaces and markers, lower case."""
    return word.strip().lstrip("Ġ▁").lower()


def concept_recovery(top_tokens: Sequence[Sequence[str]], concepts: Mapping[str, Sequence[str]],
                     threshold: float = 0.5) -> dict:
    """Which concepts one feature picks out: a feature's top tokens are mostly (> ``threshold``) its words.

    ``top_tokens`` holds, per feature, the text of its top-activating tokens; ``concepts`` maps a
    concept name to its words. Words are compared by ``normalize_word``. Returns
    ``{"recovered": int, "total": int, "concepts": {name: {"feature", "share", "recovered"}}}`` where
    ``feature`` is the feature with the largest share of the concept's words (None if no feature has any).
    """
    if not concepts:
        raise ValueError("concept_recovery needs at least one concept")
    per_concept = {}
    normalized = [[normalize_word(t) for t in tokens] for tokens in top_tokens]
    for name, words in concepts.items():
        vocabulary = {normalize_word(w) for w in words}
        best_feature, best_share = None, 0.0
        for j, tokens in enumerate(normalized):
            if not tokens:
                continue
            share = sum(t in vocabulary for t in tokens) / len(tokens)
            if share > best_share:
                best_feature, best_share = j, share
        per_concept[name] = {
            "feature": best_feature,
            "share": best_share,
            "recovered": best_share > threshold,
        }
    recovered = sum(c["recovered"] for c in per_concept.values())
    return {"recovered": recovered, "total": len(per_concept), "concepts": per_concept}
