"""GPT-2 (``GPT2LMHeadModel``) in Flax NNX.

Parameters keep the checkpoint layout: GPT-2's ``Conv1D`` weights are [in, out], so ``y = x @ W + b``.
The MLP activation (emitted and steered) is ``gelu_new(ln_2(x) @ c_fc.W + c_fc.b)``.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
from flax import nnx

from .base import CausalLM
from .config import ModelConfig
from .layers import activation_fn, attention, layer_norm, update_cache
from .steering import apply_steering


# Non-parameter causal-mask buffers stored by old GPT-2 checkpoints.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def _param(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


class GPT2Block(nnx.Module):
    """One GPT-2 block; attribute names follow the checkpoint (``h.{i}.ln_1.weight`` → ``ln_1_weight``)."""

    def __init__(self, cfg: ModelConfig, dtype):
        d, f = cfg.d_model, cfg.d_mlp
        self.ln_1_weight, self.ln_1_bias = _param((d,), dtype), _param((d,), dtype)
        self.c_attn_weight, self.c_attn_bias = _param((d, 3 * d), dtype), _param((3 * d,), dtype)
        self.attn_c_proj_weight, self.attn_c_proj_bias = _param((d, d), dtype), _param((d,), dtype)
        self.ln_2_weight, self.ln_2_bias = _param((d,), dtype), _param((d,), dtype)
        self.c_fc_weight, self.c_fc_bias = _param((d, f), dtype), _param((f,), dtype)
        self.mlp_c_proj_weight, self.mlp_c_proj_bias = _param((f, d), dtype), _param((d,), dtype)


class GPT2(CausalLM):
    """GPT-2 language model with MLP-activation capture and steering (see ``CausalLM.__call__``)."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32):
        self.config = cfg
        self.param_dtype = jnp.dtype(dtype)
        self.wte = _param((cfg.vocab_size, cfg.d_model), dtype)
        self.wpe = _param((cfg.max_position_embeddings, cfg.d_model), dtype)
        self.h = nnx.List([GPT2Block(cfg, dtype) for _ in range(cfg.n_layers)])
        self.ln_f_weight, self.ln_f_bias = _param((cfg.d_model,), dtype), _param((cfg.d_model,), dtype)

    def embed(self, ids, positions):
        return self.wte[...][ids] + self.wpe[...][positions]

    def block(self, layer, x, positions, masks, plan, kv, start, mlp_only_tail=False):
        cfg, p = self.config, self.h[layer]
        b, t, d = x.shape
        a = layer_norm(x, p.ln_1_weight[...], p.ln_1_bias[...], cfg.norm_eps)
        qkv = a @ p.c_attn_weight[...] + p.c_attn_bias[...]
        q, k, v = (z.reshape(b, t, cfg.n_heads, cfg.head_dim) for z in jnp.split(qkv, 3, axis=-1))
        if kv is not None:
            k, v = update_cache(kv[0], k, start), update_cache(kv[1], v, start)
            kv = (k, v)
        o = attention(q, k, v, masks.full, cfg.attn_scale).reshape(b, t, d)
        x = x + (o @ p.attn_c_proj_weight[...] + p.attn_c_proj_bias[...])
        a = layer_norm(x, p.ln_2_weight[...], p.ln_2_bias[...], cfg.norm_eps)
        h = activation_fn(cfg.activation)(a @ p.c_fc_weight[...] + p.c_fc_bias[...])
        h = apply_steering(h, plan, layer)
        if mlp_only_tail:
            return x, h, kv
        x = x + (h @ p.mlp_c_proj_weight[...] + p.mlp_c_proj_bias[...])
        return x, h, kv

    def mlp_output(self, layer, h):
        return h @ self.h[layer].mlp_c_proj_weight[...]

    def mlp_output_bias(self, layer):
        return self.h[layer].mlp_c_proj_bias[...]

    def final_logits(self, x):
        x = layer_norm(x, self.ln_f_weight[...], self.ln_f_bias[...], self.config.norm_eps)
        return jnp.einsum("btd,vd->btv", x, self.wte[...])

    def tied_embedding_matrix(self):
        return self.wte[...]

    @staticmethod
    def canonical_name(name: str, cfg: ModelConfig) -> str | None:
        """Checkpoint name → key of ``checkpoint_names``; None for the attention-mask buffers;
        ``"__tied_lm_head__"`` for an ``lm_head.weight`` that must equal ``wte``."""
        if name == "lm_head.weight":
            return "__tied_lm_head__"
        name = name.removeprefix("transformer.")
        if _MASK_BUFFER.fullmatch(name):
            return None
        return name

    @staticmethod
    def checkpoint_names(cfg: ModelConfig) -> dict[str, tuple]:
        """Checkpoint tensor name (without the optional ``transformer.`` prefix) → parameter path."""
        names = {
            "wte.weight": ("wte",),
            "wpe.weight": ("wpe",),
            "ln_f.weight": ("ln_f_weight",),
            "ln_f.bias": ("ln_f_bias",),
        }
        per_layer = {
            "ln_1.weight": "ln_1_weight", "ln_1.bias": "ln_1_bias",
            "attn.c_attn.weight": "c_attn_weight", "attn.c_attn.bias": "c_attn_bias",
            "attn.c_proj.weight": "attn_c_proj_weight", "attn.c_proj.bias": "attn_c_proj_bias",
            "ln_2.weight": "ln_2_weight", "ln_2.bias": "ln_2_bias",
            "mlp.c_fc.weight": "c_fc_weight", "mlp.c_fc.bias": "c_fc_bias",
            "mlp.c_proj.weight": "mlp_c_proj_weight", "mlp.c_proj.bias": "mlp_c_proj_bias",
        }
        for i in range(cfg.n_layers):
            for hf, attr in per_layer.items():
                names[f"h.{i}.{hf}"] = ("h", i, attr)
        return names
