"""Activations of labelled sentences at a steering site, one array per sentence (BOS and padding excluded).

The paper runs every sentence with a BOS prepended (TransformerLens' default) and scores only the
sentence's own tokens. Here every family gets the same treatment: sentences are tokenized without
special tokens and the model's BOS is prepended (``bos=True``), so the rest of the sentence is read
as the model was trained to read it; the BOS position itself is never returned, because its
activation is the same for every sentence (it attends only to itself) and, in real models, a
large-norm attention-sink outlier that would dominate a mean or a maximum.

Sites are the steering sites of :mod:`jsnmf.models.steering`: ``hook_post`` (``d_mlp``, the MLP's hidden
activation, where SNMF's ``F`` lives) and ``hook_mlp_out`` (``d_model``, what the MLP writes to the
residual stream, bias included, after Gemma 2/3's post-feed-forward norm).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jsnmf.models.steering import SITES

__all__ = ["concept_mask", "encode_sentences", "sentence_activations", "site_activations"]


def concept_mask(labels: Sequence[str | None], concept: str) -> np.ndarray:
    """Which sentences belong to ``concept``: the label equals it, or lists it among ``+``-joined names.

    ``+``-joined labels are the demo corpus's sentences with two concepts (``"animals+weekdays"``);
    the paper's labels are single free-text descriptions and compare by equality.
    """
    return np.array([lab is not None and (lab == concept or concept in lab.split("+")) for lab in labels], bool)


def encode_sentences(tokenizer, texts: Sequence[str], *, bos: bool = True, bos_token_id: int | None = None,
                     max_length: int | None = None) -> tuple[list[np.ndarray], int]:
    """Token ids per sentence, and how many leading positions to exclude (1 with ``bos``, else 0).

    Sentences are tokenized without special tokens; with ``bos`` the BOS id (``bos_token_id``, else the
    tokenizer's) is prepended. ``max_length`` truncates (BOS included).
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a list of sentences, not one string")
    if bos:
        bos_token_id = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
        if bos_token_id is None:
            raise ValueError("bos=True but the tokenizer defines no BOS token; pass bos_token_id or bos=False")
    sequences = []
    for text, ids in zip(texts, tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        ids = ([int(bos_token_id)] if bos else []) + list(ids)
        ids = ids[:max_length] if max_length else ids
        if len(ids) <= int(bos):
            raise ValueError(f"sentence {text!r} has no tokens to score")
        sequences.append(np.asarray(ids, np.int32))
    return sequences, int(bos)


def site_activations(model, hidden, layer: int, site: str) -> np.ndarray:
    """Turn MLP activations ``hidden`` [..., d_mlp] (``hook_post`` of ``layer``) into the site's values.

    ``hook_post`` returns them as they are; ``hook_mlp_out`` applies the layer's MLP output map
    (``model.mlp_output``: down-projection, Gemma 2/3's post-feed-forward norm) and adds GPT-2's
    down-projection bias, which ``mlp_output`` leaves out.
    """
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    hidden = np.asarray(hidden, np.float32)
    if site == "hook_post":
        return hidden
    out = np.asarray(model.mlp_output(int(layer), hidden.astype(model.dtype)), np.float32)
    blocks = getattr(model, "h", None)  # GPT-2, the only family whose down-projection has a bias
    bias = getattr(blocks[layer], "mlp_c_proj_bias", None) if blocks is not None else None
    return out if bias is None else out + np.asarray(bias[...], np.float32)


def sentence_activations(model, sequences: Sequence[np.ndarray], layer: int, site: str = "hook_post", *,
                         skip: int = 1, batch_size: int = 32, bucket: int = 16) -> list[np.ndarray]:
    """Per sentence, the activations of its scored tokens at (``layer``, ``site``): [n_i − skip, width].

    ``sequences``: token ids per sentence (``encode_sentences``); ``skip``: leading positions left out
    (the BOS). Sentences run in right-padded batches of ``batch_size`` rows, the width rounded up to a
    multiple of ``bucket`` so the jitted forward compiles a few times only; the forward stops after
    ``layer``. Padding never reaches the result.
    """
    if not sequences:
        raise ValueError("no sentences")
    n_layers = model.config.n_layers
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < n_layers:
        raise ValueError(f"layer must be an int in [0, {n_layers}), got {layer!r}")
    results: list[np.ndarray] = []
    for start in range(0, len(sequences), batch_size):
        chunk = list(sequences[start:start + batch_size])
        longest = max(len(s) for s in chunk)
        width = -(-longest // bucket) * bucket
        ids = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for row in range(batch_size):  # short last batches repeat their first row: same compiled shape
            seq = chunk[row] if row < len(chunk) else chunk[0]
            ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
        out = model(ids, attention_mask=mask, capture=[int(layer)], stop_at_layer=int(layer) + 1)
        hidden = np.asarray(out.mlp_activations[int(layer)], np.float32)
        for row, seq in enumerate(chunk):
            results.append(site_activations(model, hidden[row, skip:len(seq)], layer, site))
    return results
