"""Llama 3.x, Gemma 2, Gemma 3 text (and Gemma 1) in Flax NNX: one module with feature flags from ``ModelConfig``.

Parameters keep the checkpoint layout (``nn.Linear`` weights [out, in], so ``y = x @ W.T``). Attribute
names say the role of each norm, because the checkpoint names do not: Llama's
``post_attention_layernorm`` is the pre-MLP norm, Gemma 2/3's is the norm on the attention output.
The MLP activation (emitted and steered) is ``act(gate_proj(x)) * up_proj(x)``.

Multimodal Gemma 3 checkpoints (``model_type: gemma3``) are read for their language model only: the
text tensors carry a ``language_model.model.`` (hub) or ``model.language_model.`` prefix, and the vision
tower and projector are skipped. The port takes token ids, never pixels, and on text-only input
transformers' multimodal model never runs those weights (its logits equal this port's, see the tests).
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from flax import nnx

from .base import CausalLM
from .config import ModelConfig, RopeScaling
from .layers import activation_fn, apply_rope, attention, rms_norm, rope_inverse_frequencies, softcap, update_cache
from .steering import apply_steering


def _param(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


@functools.lru_cache(maxsize=None)
def _inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None):
    return rope_inverse_frequencies(head_dim, theta, scaling)


# Prefixes of the text tensors in multimodal Gemma 3 checkpoints (hub layout, transformers v5 layout),
# and of the vision tensors this text-only port skips.
_GEMMA3_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                         "language_model.lm_head.": "lm_head."}
_GEMMA3_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                           "model.multi_modal_projector.")


class LlamaLikeBlock(nnx.Module):
    """One decoder block (attention + gated MLP, optional Gemma 2/3 post-norms and Gemma 3 query/key norms)."""

    def __init__(self, cfg: ModelConfig, dtype):
        d, f, hd = cfg.d_model, cfg.d_mlp, cfg.head_dim
        self.attn_norm = _param((d,), dtype)
        self.q_proj = _param((cfg.n_heads * hd, d), dtype)
        self.k_proj = _param((cfg.n_kv_heads * hd, d), dtype)
        self.v_proj = _param((cfg.n_kv_heads * hd, d), dtype)
        self.o_proj = _param((d, cfg.n_heads * hd), dtype)
        if cfg.qk_norm:
            self.q_norm = _param((hd,), dtype)
            self.k_norm = _param((hd,), dtype)
        if cfg.post_attn_norm:
            self.attn_out_norm = _param((d,), dtype)
        self.mlp_norm = _param((d,), dtype)
        self.gate_proj = _param((f, d), dtype)
        self.up_proj = _param((f, d), dtype)
        self.down_proj = _param((d, f), dtype)
        if cfg.post_ffw_norm:
            self.mlp_out_norm = _param((d,), dtype)


class LlamaLike(CausalLM):
    """Llama / Gemma / Gemma 2 / Gemma 3 language model with MLP-activation capture and steering."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32):
        self.config = cfg
        self.param_dtype = jnp.dtype(dtype)
        self.embed_tokens = _param((cfg.vocab_size, cfg.d_model), dtype)
        self.layers = nnx.List([LlamaLikeBlock(cfg, dtype) for _ in range(cfg.n_layers)])
        self.norm = _param((cfg.d_model,), dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param((cfg.vocab_size, cfg.d_model), dtype)

    def _norm(self, x, weight):
        return rms_norm(x, weight[...], self.config.norm_eps, self.config.norm_plus_one)

    def embed(self, ids, positions):
        x = self.embed_tokens[...][ids]
        if self.config.embed_scale:  # the scale is rounded to the parameter dtype, as in transformers
            x = x * jnp.asarray(math.sqrt(self.config.d_model), dtype=x.dtype)
        return x

    def block(self, layer, x, positions, masks, plan, kv, start, mlp_only_tail=False):
        cfg, p = self.config, self.layers[layer]
        b, t, _ = x.shape
        a = self._norm(x, p.attn_norm)
        q = (a @ p.q_proj[...].T).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = (a @ p.k_proj[...].T).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = (a @ p.v_proj[...].T).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:  # per head, before RoPE (transformers' Gemma3Attention)
            q, k = self._norm(q, p.q_norm), self._norm(k, p.k_norm)
        sliding = cfg.sliding_layers[layer]
        if sliding and cfg.rope_local_theta is not None:  # Gemma 3: local layers have their own RoPE
            inv_freq = _inv_freq(cfg.head_dim, cfg.rope_local_theta, cfg.rope_local_scaling)
        else:
            inv_freq = _inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        inv_freq = jnp.asarray(inv_freq)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv is not None:
            k, v = update_cache(kv[0], k, start), update_cache(kv[1], v, start)
            kv = (k, v)
        mask = masks.sliding if sliding else masks.full
        o = attention(q, k, v, mask, cfg.attn_scale, cfg.attn_softcap)
        o = o.reshape(b, t, cfg.n_heads * cfg.head_dim) @ p.o_proj[...].T
        if cfg.post_attn_norm:
            o = self._norm(o, p.attn_out_norm)
        x = x + o
        a = self._norm(x, p.mlp_norm)
        h = activation_fn(cfg.activation)(a @ p.gate_proj[...].T) * (a @ p.up_proj[...].T)
        h = apply_steering(h, plan, layer)
        if mlp_only_tail:
            return x, h, kv
        return x + self.mlp_output(layer, h), h, kv

    def mlp_output(self, layer, h):
        p = self.layers[layer]
        out = h @ p.down_proj[...].T
        if self.config.post_ffw_norm:
            out = self._norm(out, p.mlp_out_norm)
        return out

    def final_logits(self, x):
        x = self._norm(x, self.norm)
        unembed = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        logits = jnp.einsum("btd,vd->btv", x, unembed[...])
        return softcap(logits, self.config.final_softcap)

    def tied_embedding_matrix(self):
        return self.embed_tokens[...]

    @staticmethod
    def canonical_name(name: str, cfg: ModelConfig) -> str | None:
        """Checkpoint name → key of ``checkpoint_names``; ``"__tied_lm_head__"`` for an ``lm_head.weight``
        stored although the config ties it to the embedding (it must then equal the embedding); None for
        the vision tensors of a multimodal Gemma 3 checkpoint (see the module docstring)."""
        if cfg.model_type == "gemma3":
            if name.startswith(_GEMMA3_VISION_PREFIXES):
                return None
            for prefix, replacement in _GEMMA3_TEXT_PREFIXES.items():
                if name.startswith(prefix):
                    name = replacement + name[len(prefix):]
                    break
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            return "__tied_lm_head__"
        return name

    @staticmethod
    def checkpoint_names(cfg: ModelConfig) -> dict[str, tuple]:
        """Checkpoint tensor name → parameter path."""
        names = {"model.embed_tokens.weight": ("embed_tokens",), "model.norm.weight": ("norm",)}
        if not cfg.tie_word_embeddings:
            names["lm_head.weight"] = ("lm_head",)
        per_layer = {
            "input_layernorm.weight": "attn_norm",
            "self_attn.q_proj.weight": "q_proj",
            "self_attn.k_proj.weight": "k_proj",
            "self_attn.v_proj.weight": "v_proj",
            "self_attn.o_proj.weight": "o_proj",
            "mlp.gate_proj.weight": "gate_proj",
            "mlp.up_proj.weight": "up_proj",
            "mlp.down_proj.weight": "down_proj",
        }
        if cfg.qk_norm:
            per_layer["self_attn.q_norm.weight"] = "q_norm"
            per_layer["self_attn.k_norm.weight"] = "k_norm"
        if cfg.post_attn_norm:  # Gemma 2/3 names
            per_layer["post_attention_layernorm.weight"] = "attn_out_norm"
            per_layer["pre_feedforward_layernorm.weight"] = "mlp_norm"
            per_layer["post_feedforward_layernorm.weight"] = "mlp_out_norm"
        else:
            per_layer["post_attention_layernorm.weight"] = "mlp_norm"
        for i in range(cfg.n_layers):
            for hf, attr in per_layer.items():
                names[f"model.layers.{i}.{hf}"] = ("layers", i, attr)
        return names
