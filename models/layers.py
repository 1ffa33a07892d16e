"""Pure functions shared by the ports: norms, activations, RoPE, masked attention with an optional KV cache."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import LinearRopeScaling, RopeScaling

# Large finite negative used for masked attention scores (as transformers: the dtype minimum).
_MASK_VALUE = float(np.finfo(np.float32).min)


def activation_fn(name: str):
    """The elementwise MLP nonlinearity for a ``ModelConfig.activation`` name."""
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unknown activation {name!r}")


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm computed in float32 (two-pass variance, as torch), cast back to the input dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool) -> jax.Array:
    """RMSNorm as transformers computes it.

    Gemma (``plus_one``): scale by ``1 + w`` in float32, then cast. Llama: cast the normalised x back
    to the input dtype first, then multiply by ``w`` (this order only matters in bfloat16).
    """
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    if plus_one:
        return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * y.astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap · tanh(x / cap)``; identity when ``cap`` is None."""
    if cap is None:
        return x
    return jnp.tanh(x / cap) * cap


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """RoPE inverse frequencies (float32, length head_dim/2), with the linear or llama3 rescaling when given.

    Transcribed from ``_compute_linear_scaling_rope_parameters`` / ``_compute_llama3_parameters`` in
    transformers' ``modeling_rope_utils.py``.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)
    if scaling is None:
        return inv.astype(np.float32)
    if isinstance(scaling, LinearRopeScaling):  # float32 division, as torch's in-place ``inv_freq /= factor``
        return (inv.astype(np.float32) / np.float32(scaling.factor)).astype(np.float32)
    old_ctx = scaling.original_max_position_embeddings
    lo, hi, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate ``x`` [B, T, H, hd] by ``positions`` [B, T] in the split-halves (``rotate_half``) form."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMasks:
    """Boolean masks [B, 1, T, S] for the two attention kinds (``sliding`` is None when unused)."""

    full: jax.Array
    sliding: jax.Array | None


def build_masks(
    query_slots: jax.Array, key_valid: jax.Array, sliding_window: int | None
) -> AttentionMasks:
    """Causal (+ sliding-window) masks over key slots.

    ``query_slots`` [T]: the slot (column) of each query; ``key_valid`` [B, S]: which key slots hold a
    real token. Keys are slots ``0..S-1``. A query at slot q sees key k when ``k <= q`` and, on sliding
    layers, ``q - k < window`` (transformers' ``sliding_window_overlay``).
    """
    key_slots = jnp.arange(key_valid.shape[1])
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    full = causal[None, None] & key_valid[:, None, None, :].astype(bool)
    sliding = None
    if sliding_window is not None:
        near = (query_slots[:, None] - key_slots[None, :]) < sliding_window
        sliding = full & near[None, None]
    return AttentionMasks(full=full, sliding=sliding)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    softcap_value: float | None = None,
) -> jax.Array:
    """Grouped-query attention. q [B,T,H,hd], k/v [B,S,K,hd], mask [B,1,T,S] → [B,T,H,hd].

    Query head h uses KV head ``h // (H/K)`` (transformers' ``repeat_kv`` is a repeat-interleave).
    Scores are soft-capped before masking (Gemma 2) and softmaxed in float32.
    """
    b, t, h, hd = q.shape
    n_kv = k.shape[2]
    group = h // n_kv
    qg = q.reshape(b, t, n_kv, group, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = softcap(scores, softcap_value)
    scores = jnp.where(mask[:, :, None], scores, _MASK_VALUE)  # mask [B,1,1,T,S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


def update_cache(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write ``new`` [B, T, K, hd] into ``cache`` [B, S, K, hd] at slot ``start``."""
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, start, 0, 0))
