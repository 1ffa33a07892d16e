"""Flax NNX ports of GPT-2, Gemma 2 and Llama 3.x (and Gemma 1) that emit and steer MLP activations.

    import jsnmf.models as jm
    model, tok = jm.load("path/to/checkpoint_or_hub_id", dtype=jnp.float32)   # or jnp.bfloat16
    out = model(ids, attention_mask=mask, capture=[0, "blocks.5.mlp.hook_post"])
    out.logits                 # [batch, seq, vocab]
    out.mlp_activations[5]     # [batch, seq, d_mlp], the input of the MLP down-projection
    model(ids, capture=[3], stop_at_layer=4)             # only blocks 0..3, no unembedding
    model(ids, steering=[jm.Steering(5, v, alpha=4.0)])  # h ← h + 4·v/‖v‖ at blocks.5.mlp.hook_post
    u = jm.feature_to_mlp_out(model, 5, v)               # the paper's map of v to the residual site
    model(ids, steering=[jm.Steering("blocks.5.hook_mlp_out", u, alpha=4.0)])
    model.project_to_vocab(5, F)                         # [k, vocab] for F [d_mlp, k]
    jm.generate(model, ["Once upon"], tokenizer=tok, max_new_tokens=20, steering=...)

The MLP activation is GPT-2 ``gelu_new(c_fc(x))``, Gemma ``gelu_tanh(gate(x)) * up(x)``, Llama
``silu(gate(x)) * up(x)``; its hook name is ``blocks.{layer}.mlp.hook_post``. The forward is
jit-compiled; activations are returned and steering is passed in (nothing is mutated under jit).
On GPUs JAX runs float32 matmuls in TF32 by default; wrap calls in
``jax.default_matmul_precision("highest")`` for float32-exact results.
"""
from .base import CausalLM
from .config import ModelConfig, config_from_dict
from .generate import generate
from .gpt2 import GPT2
from .llamalike import LlamaLike
from .loading import load, load_model, load_tokenizer
from .outputs import GenerateOutput, ModelOutput, hook_name
from .steering import Steering, feature_to_mlp_out

__all__ = [
    "CausalLM", "GPT2", "GenerateOutput", "LlamaLike", "ModelConfig", "ModelOutput", "Steering",
    "config_from_dict", "feature_to_mlp_out", "generate", "hook_name", "load", "load_model", "load_tokenizer",
]
