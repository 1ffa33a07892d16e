"""Tokenization and batches of an extraction (:mod:`jsnmf.extract`): a pure function of the corpus,
the tokenizer and the settings, so a resumed extraction recomputes exactly the batches it lost.

- :func:`bos_policy`: whether sequences start with BOS (the paper prepends it for every family) and
  what the tokenizer does by itself;
- :func:`plan_tokens`: the token ids of every document (BOS as the policy says, truncated), which
  positions are kept (BOS dropped from ``X`` unless asked), and where each batch's tokens start;
- :func:`make_batch`: one batch, right padded to :func:`bucket_length` (powers of two from 8, capped
  at the corpus's longest sequence) so the jitted forward compiles only a handful of times.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jsnmf.corpus import Corpus

__all__ = ["BosPolicy", "bos_policy", "TokenPlan", "plan_tokens", "tokenize", "bucket_length", "Batch", "make_batch"]

_MIN_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class BosPolicy:
    token_id: int | None
    tokenizer_adds: bool  # what the tokenizer does by itself
    present: bool  # whether sequences start with BOS after the policy


def bos_policy(tokenizer, config, add_bos: bool | None) -> BosPolicy:
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = bos_id is not None and len(with_special) > len(without) and with_special[0] == bos_id
    if add_bos and bos_id is None:
        raise ValueError("add_bos=True (the default: BOS prepended as the paper does) but neither the tokenizer "
                         "nor the model config defines a BOS token; pass add_bos=None (CLI: --no-bos)")
    present = adds if add_bos is None else bool(add_bos)
    return BosPolicy(token_id=None if bos_id is None else int(bos_id), tokenizer_adds=adds, present=present)


@dataclasses.dataclass
class TokenPlan:
    """Everything about the run that follows from the corpus and settings alone."""

    sequences: list[np.ndarray]  # token ids per document (with BOS if present), truncated
    keep_from: int  # first position kept in each sequence (1 when BOS is dropped)
    batch_size: int
    batch_token_starts: np.ndarray  # index of each batch's first kept token; last entry = n_tokens
    label_index: np.ndarray  # per document
    n_truncated: int
    bos_dropped: bool

    @property
    def n_tokens(self) -> int:
        return int(self.batch_token_starts[-1])

    @property
    def n_batches(self) -> int:
        return len(self.batch_token_starts) - 1

    def batch_documents(self, batch: int) -> range:
        start = batch * self.batch_size
        return range(start, min(start + self.batch_size, len(self.sequences)))


def plan_tokens(corpus: Corpus, tokenizer, bos: BosPolicy, max_length: int, batch_size: int, drop_bos: bool) -> TokenPlan:
    sequences, n_truncated = tokenize(corpus.texts, tokenizer, bos, max_length)
    bos_dropped = drop_bos and bos.present
    keep_from = 1 if bos_dropped else 0
    kept = np.array([max(len(s) - keep_from, 0) for s in sequences], np.int64)
    per_batch = [kept[i : i + batch_size].sum() for i in range(0, len(kept), batch_size)]
    label_of = {label: i for i, label in enumerate(corpus.labels)}
    labels = np.array([label_of.get(d.label, -1) for d in corpus.documents], np.int32)
    return TokenPlan(sequences, keep_from, batch_size, np.concatenate([[0], np.cumsum(per_batch)]).astype(np.int64),
                 labels, n_truncated, bos_dropped)


def tokenize(texts: list[str], tokenizer, bos: BosPolicy, max_length: int) -> tuple[list[np.ndarray], int]:
    sequences, n_truncated = [], 0
    for start in range(0, len(texts), 256):
        for ids in tokenizer(texts[start : start + 256])["input_ids"]:
            if bos.present and not bos.tokenizer_adds:
                ids = [bos.token_id, *ids]
            elif bos.tokenizer_adds and not bos.present:
                ids = ids[1:]
            n_truncated += len(ids) > max_length
            sequences.append(np.asarray(ids[:max_length], np.int32))
    return sequences, n_truncated


def bucket_length(n: int, max_length: int) -> int:
    """The padded length for a batch whose longest sequence has ``n`` tokens: the next power of two
    (at least 8), capped at ``max_length``."""
    return min(max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), max_length)


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray  # (batch_size, length) int32, right padded
    attention_mask: np.ndarray  # (batch_size, length) int32
    rows: np.ndarray  # (n_kept,) row of each kept token
    cols: np.ndarray  # (n_kept,) position of each kept token
    token_ids: np.ndarray
    doc_index: np.ndarray
    label_index: np.ndarray


def make_batch(plan: TokenPlan, batch: int, pad_id: int, longest: int) -> Batch:
    docs = plan.batch_documents(batch)
    length = bucket_length(max(len(plan.sequences[d]) for d in docs), longest)
    # Always batch_size rows (filler rows hold one pad token) so the last batch compiles nothing new.
    input_ids = np.full((plan.batch_size, length), pad_id, np.int32)
    mask = np.zeros((plan.batch_size, length), np.int32)
    mask[:, 0] = 1
    rows, cols, doc_index = [], [], []
    for row, doc in enumerate(docs):
        seq = plan.sequences[doc]
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        positions = np.arange(plan.keep_from, len(seq))
        rows.append(np.full(len(positions), row))
        cols.append(positions)
        doc_index.append(np.full(len(positions), doc))
    rows, cols, doc_index = (np.concatenate(x).astype(np.int32) for x in (rows, cols, doc_index))
    return Batch(input_ids, mask, rows, cols, input_ids[rows, cols], doc_index, plan.label_index[doc_index])
