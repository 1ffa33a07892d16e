"""Result types returned by the forward pass and by generation."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jsnmf.layout import hook_name  # the one place hook names are spelled

__all__ = ["GenerateOutput", "ModelOutput", "hook_name"]


@dataclasses.dataclass
class ModelOutput:
    """``logits`` [batch, seq, vocab] (None when the forward stopped early);
    ``mlp_activations[layer]`` [batch, seq, d_mlp] for each layer captured at ``hook_post``;
    ``activations[hook name]`` every captured site by its TransformerLens name
    (``blocks.{L}.mlp.hook_post`` [.., d_mlp], ``blocks.{L}.hook_mlp_out`` and
    ``blocks.{L}.hook_resid_post`` [.., d_model])."""

    logits: jax.Array | None
    mlp_activations: dict[int, jax.Array]
    activations: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

    def hook(self, name: str) -> jax.Array:
        """Look an activation up by hook name, e.g. ``out.hook("blocks.3.hook_mlp_out")``."""
        if name in self.activations:
            return self.activations[name]
        for layer, value in self.mlp_activations.items():
            if hook_name(layer) == name:
                return value
        captured = sorted(set(self.activations) | {hook_name(l) for l in self.mlp_activations})
        raise KeyError(f"{name!r} was not captured; captured: {captured}")


@dataclasses.dataclass
class GenerateOutput:
    """Result of ``generate``.

    ``sequences`` [batch, prompt_len + max_new_tokens]: the left-padded prompt followed by the new tokens;
    ``new_tokens`` [batch, max_new_tokens]: only the generated part (after a sequence emits EOS the rest
    is ``pad_token_id``); ``prompt_mask`` [batch, prompt_len]; ``text``: decoded new tokens (special tokens
    skipped) when a tokenizer was given, else None.
    """

    sequences: np.ndarray
    new_tokens: np.ndarray
    prompt_mask: np.ndarray
    text: list[str] | None = None
