"""Tiny random Hugging Face checkpoints (GPT-2, Llama 3.1-style, Gemma 2, Gemma 3, Gemma 1) for the port tests.

Each builder makes a transformers model with every parameter randomised (norm weights included),
saves it with ``save_pretrained`` next to a small WordLevel tokenizer, and returns the directory and
the torch model (the reference). Nothing is downloaded.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

VOCAB = 128
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]


def save_tokenizer(directory: Path) -> None:
    """A whitespace WordLevel tokenizer over ``SPECIAL + WORDS`` (ids 0..VOCAB-1), saved in ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(directory)


def randomize(model: torch.nn.Module, seed: int, plus_one_norms: bool) -> None:
    """Randomise every parameter. Norm weights are ``1 + N(0, 0.2)`` (or ``N(0, 0.2)`` where the model
    multiplies by ``1 + w``, Gemma), so they are far from their initial values without killing the signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            is_norm = "norm" in name or ".ln_" in name or name.startswith(("ln_", "transformer.ln_f"))
            if is_norm and name.endswith("weight"):
                value = 0.2 * noise + (0.0 if plus_one_norms else 1.0)
            elif "embed" in name or "wte" in name or "wpe" in name:
                value = 0.1 * noise
            else:
                value = 0.2 * noise
            p.copy_(value.to(p.dtype))


def _finish(model, directory: Path, seed: int, plus_one: bool, **save_kwargs):
    randomize(model, seed, plus_one)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, **save_kwargs)
    save_tokenizer(directory)
    return directory, model


def build_gpt2(directory: Path, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=3, n_head=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return _finish(GPT2LMHeadModel(cfg), directory, seed, plus_one=False)


def llama_config(tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager",
    )


def build_llama(directory: Path, tied: bool = False, seed: int = 1, **save_kwargs):
    """Llama 3.1-style: GQA (4 query heads, 2 KV heads) and llama3 RoPE scaling with
    ``original_max_position_embeddings`` = 8, shorter than the test sequences."""
    from transformers import LlamaForCausalLM

    return _finish(LlamaForCausalLM(llama_config(tied)), directory, seed, plus_one=False, **save_kwargs)


def build_gemma2(directory: Path, seed: int = 2, tied: bool = True):
    """Gemma 2: sliding window 6 (< test sequence length) on layers 0 and 2, both soft-caps small enough
    to bend the numbers, head_dim 32 ≠ hidden/heads and query_pre_attn_scalar 24 ≠ head_dim.

    Tied (the real setting) tiny random models mostly copy their input token, so greedy generation
    repeats one token; the untied variant gives varied generations for the cache-path tests."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager", tie_word_embeddings=tied,
    )
    return _finish(Gemma2ForCausalLM(cfg), directory, seed, plus_one=True)


def build_gemma(directory: Path, seed: int = 3):
    """Gemma 1 (MQA: one KV head)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager",
    )
    return _finish(GemmaForCausalLM(cfg), directory, seed, plus_one=True)


def gemma3_text_config(linear_rope: bool = False, tied: bool = True):
    """Gemma 3 text settings: sliding window 5 (< test sequence length), both layer kinds, query/key norms,
    distinct global / local RoPE bases (both small enough to turn fast at these lengths),
    query_pre_attn_scalar 24 ≠ head_dim 16; optionally linear RoPE scaling on the global layers."""
    from transformers import Gemma3TextConfig

    extra = {"rope_scaling": {"rope_type": "linear", "factor": 4.0}} if linear_rope else {}
    # the linear variant states the legacy ``sliding_window_pattern`` (every 2nd layer full)
    layers = {"sliding_window_pattern": 2} if linear_rope else {
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]}
    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=5, rope_theta=5000.0, rope_local_base_freq=300.0, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager",
        tie_word_embeddings=tied, **layers, **extra,
    )


def build_gemma3(directory: Path, seed: int = 6, linear_rope: bool = False, tied: bool = True):
    """Gemma 3 text (``Gemma3ForCausalLM``). The linear-RoPE variant is untied, so that greedy
    generation varies (see ``build_gemma2``) for the cache-path tests."""
    from transformers import Gemma3ForCausalLM

    return _finish(Gemma3ForCausalLM(gemma3_text_config(linear_rope, tied)), directory, seed, plus_one=True)


def build_gemma3_multimodal(directory: Path, seed: int = 7):
    """Multimodal Gemma 3 (``Gemma3ForConditionalGeneration``) with a tiny SigLIP vision tower: the
    port reads its language model (prefixed tensor names) and skips the vision tensors."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=gemma3_text_config(linear_rope=True).to_dict(), vision_config=vision.to_dict(),
                       mm_tokens_per_image=4, attn_implementation="eager")
    return _finish(Gemma3ForConditionalGeneration(cfg), directory, seed, plus_one=True)


def padded_batch(seed: int = 0, lengths=(24, 17, 9), side: str = "left"):
    """Random token ids (no special tokens) and a 0/1 mask, padded on ``side`` with id 0."""
    rng = np.random.default_rng(seed)
    seq = max(lengths)
    ids = np.zeros((len(lengths), seq), np.int64)
    mask = np.zeros((len(lengths), seq), np.int64)
    for row, n in enumerate(lengths):
        tokens = rng.integers(len(SPECIAL), VOCAB, size=n)
        cols = slice(seq - n, seq) if side == "left" else slice(0, n)
        ids[row, cols], mask[row, cols] = tokens, 1
    return ids, mask


def torch_positions(mask: np.ndarray) -> torch.Tensor:
    """Position ids as transformers' ``generate`` derives them: ``cumsum(mask) - 1``, padding set to 1."""
    m = torch.as_tensor(mask)
    pos = m.long().cumsum(-1) - 1
    return pos.masked_fill(m == 0, 1)


def mlp_down_module(hf_model, layer: int) -> torch.nn.Module:
    """The module whose input is the MLP activation: GPT-2 ``mlp.c_proj``, others ``mlp.down_proj``."""
    if hasattr(hf_model, "transformer"):
        return hf_model.transformer.h[layer].mlp.c_proj
    text_model = getattr(hf_model.model, "language_model", hf_model.model)  # multimodal Gemma 3
    return text_model.layers[layer].mlp.down_proj


def torch_forward(hf_model, ids, mask, capture=(), edits=None):
    """Reference forward. Returns (logits, {layer: MLP activation}) as float64 NumPy arrays.

    ``edits``: {layer: fn(h) -> h} applied to the MLP activation through a forward pre-hook on the
    down-projection (the same point the port steers)."""
    edits = edits or {}
    captured, handles = {}, []
    for layer in set(capture) | set(edits):
        def hook(module, args, layer=layer):
            h = args[0]
            if layer in edits:
                h = edits[layer](h)
            captured[layer] = h.detach().clone()
            return (h,) + tuple(args[1:])

        handles.append(mlp_down_module(hf_model, layer).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            out = hf_model(
                input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                position_ids=torch_positions(mask), use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    logits = out.logits.float().numpy().astype(np.float64)
    return logits, {l: captured[l].float().numpy().astype(np.float64) for l in capture}


# ---- built once per test session, shared by every test module ------------------------------------

_ROOT: list[Path] = []


def _root() -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="jsnmf-tiny-models-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return _ROOT[0]


_BUILDERS = {
    "gpt2": build_gpt2,
    "llama": functools.partial(build_llama, tied=False),
    "llama_tied": functools.partial(build_llama, tied=True, seed=4),
    # same weights as "llama" (same seed), written as several shards with an index
    "llama_sharded": functools.partial(build_llama, tied=False, max_shard_size="100KB"),
    "gemma2": build_gemma2,
    "gemma2_untied": functools.partial(build_gemma2, tied=False, seed=5),
    "gemma": build_gemma,
    "gemma3": build_gemma3,
    "gemma3_linear": functools.partial(build_gemma3, seed=8, linear_rope=True, tied=False),
    "gemma3_multimodal": build_gemma3_multimodal,
}


@functools.cache
def checkpoint(kind: str):
    """(directory, torch reference model) of the tiny checkpoint ``kind``, built once per session."""
    return _BUILDERS[kind](_root() / kind)


@functools.cache
def jsnmf_model(kind: str, dtype: str = "float32"):
    """(model, tokenizer) loaded with ``jsnmf.models.load`` from ``checkpoint(kind)``, once per session."""
    import jsnmf.models as jm

    return jm.load(checkpoint(kind)[0], dtype=dtype)
