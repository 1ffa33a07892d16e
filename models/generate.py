"""KV-cached generation: one prefill over the left-padded prompt, then decode steps in a compiled
``lax.while_loop`` (the whole generation is one jit). Greedy or sampling (temperature, top-k, top-p),
with optional steering applied at every prompt and generated token."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .base import CausalLM, check_inputs, positions_from_mask
from .outputs import GenerateOutput
from .steering import Steering, build_plan


def _left_pack(ids: np.ndarray, mask: np.ndarray, pad_id: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's real tokens to the right end; pad the width up to a multiple (fewer compiles)."""
    lengths = mask.sum(1)
    if (lengths == 0).any():
        raise ValueError(f"prompt rows {np.flatnonzero(lengths == 0).tolist()} have no tokens")
    width = int(-(-lengths.max() // multiple) * multiple)
    out_ids = np.full((ids.shape[0], width), pad_id, np.int32)
    out_mask = np.zeros((ids.shape[0], width), np.int32)
    for row in range(ids.shape[0]):
        tokens = ids[row][mask[row].astype(bool)]
        out_ids[row, width - len(tokens):] = tokens
        out_mask[row, width - len(tokens):] = 1
    return out_ids, out_mask


def _filter_logits(logits, temperature, top_k, top_p):
    """Temperature, then top-k, then top-p (nucleus) filtering, in transformers' order.

    ``top_k`` (an int in [1, vocab]; vocab = off) and ``top_p`` (1.0 = off) are traced, so every
    sampling setting shares one compiled loop."""
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    kth = jax.lax.dynamic_slice_in_dim(sorted_logits, top_k - 1, 1, axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_logits = jnp.where(jnp.arange(logits.shape[-1]) < top_k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p) | (top_p >= 1.0)  # the most likely token is always kept
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _next_token(logits, key, temperature, top_k, top_p, greedy: bool):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = _filter_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "greedy", "eos_ids"))
def _generate_jit(model: CausalLM, ids, mask, prompt_plan, step_plan, temperature, top_k, top_p, key, pad_id,
                  *, max_new_tokens, greedy, eos_ids):
    batch, prompt_len = ids.shape
    total = prompt_len + max_new_tokens
    cache = model.init_cache(batch, total)
    valid = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(mask)
    positions = positions_from_mask(mask)
    logits, cache = model.cached_step(ids, positions, cache, valid, 0, prompt_plan)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    pick = functools.partial(_next_token, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)

    key, sub = jax.random.split(key)
    first = pick(logits[:, -1], sub)
    done = jnp.isin(first, eos)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    state = (jnp.int32(0), first, positions[:, -1] + 1, out, cache, valid, done, key)

    def keep_going(state):
        i, *_, done, _ = state
        return (i + 1 < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, token, pos, out, cache, valid, done, key = state
        slot = prompt_len + i
        valid = valid.at[:, slot].set(1)
        logits, cache = model.cached_step(token[:, None], pos[:, None], cache, valid, slot, step_plan)
        key, sub = jax.random.split(key)
        nxt = jnp.where(done, pad_id, pick(logits[:, 0], sub))
        out = out.at[:, i + 1].set(nxt)
        done = done | jnp.isin(nxt, eos)
        return (i + 1, nxt, pos + 1, out, cache, valid, done, key)

    state = jax.lax.while_loop(keep_going, step, state)
    return state[3]


def _default_pad_id(model: CausalLM, tokenizer) -> int:
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    cfg = model.config
    if cfg.pad_token_id is not None:
        return int(cfg.pad_token_id)
    return cfg.eos_token_ids[0] if cfg.eos_token_ids else 0


def generate(
    model: CausalLM,
    prompts,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    steering: Steering | Sequence[Steering] | None = None,
    tokenizer=None,
    attention_mask=None,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    pad_to_multiple: int = 8,
) -> GenerateOutput:
    """Generate ``max_new_tokens`` tokens for a batch of prompts with a KV cache.

    ``prompts``: a string or list of strings (then ``tokenizer`` is required), or token ids [batch, seq]
    with an optional ``attention_mask`` (any padding side; rows are re-packed to left padding).
    ``temperature=0`` is greedy; otherwise sample with ``top_k`` / ``top_p`` filtering and ``seed``.
    ``steering`` (positions must be None; either site) is applied at every prompt and generated token. With
    ``stop_at_eos`` a row that emits an EOS id (``eos_token_id``, default the config's, else the
    tokenizer's) gets the pad id afterwards and the loop ends early once every row is done. Compiled once per (batch, padded prompt length, max_new_tokens,
    sampling mode, steering structure).
    """
    cfg = model.config
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= cfg.vocab_size):
        raise ValueError(f"top_k must be None or an int in [1, {cfg.vocab_size}], got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not isinstance(pad_to_multiple, int) or pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be a positive int, got {pad_to_multiple!r}")

    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str)):
        if tokenizer is None:
            raise ValueError("string prompts need a tokenizer: generate(model, prompts, tokenizer=tok)")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="np")
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        ids, mask = prompts, attention_mask
    ids, mask = (np.asarray(a) for a in check_inputs(ids, mask, cfg))
    pad_id = _default_pad_id(model, tokenizer)
    ids, mask = _left_pack(ids, mask, pad_id, pad_to_multiple)
    if cfg.use_learned_positions and mask.sum(1).max() + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens exceeds n_positions={cfg.max_position_embeddings}")

    items = [steering] if isinstance(steering, Steering) else list(steering or [])
    if any(s.positions is not None for s in items if isinstance(s, Steering)):
        raise ValueError("generate applies steering at every token; Steering.positions must be None")
    prompt_plan = build_plan(items, cfg, ids.shape[0], ids.shape[1], model.dtype)
    step_plan = build_plan(items, cfg, ids.shape[0], 1, model.dtype)

    greedy = temperature == 0.0
    if eos_token_id is not None:
        eos_ids = (int(eos_token_id),) if isinstance(eos_token_id, (int, np.integer)) else tuple(int(e) for e in eos_token_id)
    else:
        eos_ids = tuple(cfg.eos_token_ids)
        if not eos_ids and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_ids = (int(tokenizer.eos_token_id),)
    eos_ids = eos_ids if stop_at_eos else ()
    new = _generate_jit(
        model, jnp.asarray(ids), jnp.asarray(mask), prompt_plan, step_plan,
        jnp.float32(temperature if not greedy else 1.0), jnp.int32(top_k if top_k is not None else cfg.vocab_size),
        jnp.float32(top_p if top_p is not None else 1.0), jax.random.key(seed), jnp.int32(pad_id),
        max_new_tokens=int(max_new_tokens), greedy=greedy, eos_ids=eos_ids,
    )
    new = np.asarray(new)
    text = tokenizer.batch_decode(new, skip_special_tokens=True) if tokenizer is not None else None
    return GenerateOutput(sequences=np.concatenate([ids, new], axis=1), new_tokens=new, prompt_mask=mask, text=text)
