"""Tiny GGUF files written the way llama.cpp's ``convert_hf_to_gguf.py`` writes them, for the GGUF tests.

A tiny random transformers model (the reference) is converted with the ``gguf`` package's own tables
and writer methods, not with ``jsnmf.models.gguf``'s, so the loader is checked against an independent
source:

- tensor names from ``gguf.get_tensor_name_map`` (llama.cpp's ``TensorNameMap``, what the converter's
  ``map_tensor_name`` uses); the tied ``lm_head.weight`` is not written (the converter reads the
  safetensors files, which do not hold it), and Gemma 1/2 drop it always, as their converters do;
- Llama's Q and K rows permuted per head from the split-halves rotary layout to llama.cpp's
  interleaved pairs (``permute_rotary``, the converter's ``LlamaModel.permute``: Q with the query
  head count, K with the key-value head count);
- Gemma's RMSNorm weights stored as ``1 + w``;
- GPT-2's ``Conv1D`` weights transposed to [out, in], and ``output.weight`` written as a copy of
  the token embedding (what the GPT-2 converter did, and what llama.cpp falls back to without it);
- metadata through ``GGUFWriter.add_*`` (so the key names and value types are the converter's),
  and a small vocabulary (``vocabulary``): sentencepiece-style (``tokenizer.ggml.model`` "llama") for the Llama and
  Gemma families, byte-level BPE ("gpt2") for GPT-2.

The GGUF configs stay within what a GGUF states: Gemma 2/3 scale queries by ``head_dim`` (llama.cpp's
rule, ``query_pre_attn_scalar`` is not stored), Gemma 3 has llama.cpp's fixed local RoPE base 10000 and
5-sliding-1-full pattern, and Llama has no llama3 RoPE scaling (stored as ``rope_freqs.weight``, which
the loader refuses). Hence these models are built here rather than taken from ``tiny_models``, except
Gemma 1 and GPT-2, which are.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

import tiny_models as tm

VOCAB = tm.VOCAB
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2,
                 "gemma3": gguf.MODEL_ARCH.GEMMA3, "gpt2": gguf.MODEL_ARCH.GPT2}
# GPT-2's Conv1D weights, [in, out] in Hugging Face, [out, in] in GGUF
_GPT2_TRANSPOSED = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
# byte offsets of the float16 scale fields in one block of the K-quants gguf cannot quantize
_KQUANT_F16_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


# ---- the tiny reference models -------------------------------------------------------------------


def _ids():
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _finish(model, seed: int, plus_one: bool):
    tm.randomize(model, seed, plus_one)
    return model.eval()


def build_llama(seed: int = 11, tied: bool = False, linear_rope: float | None = None, n_layers: int = 3):
    """GQA (4 query heads, 2 KV heads), d_mlp 256 (a multiple of the K-quant block); optionally
    tied with linear RoPE scaling (``llama.rope.scaling.*`` in the metadata)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    extra = {"rope_scaling": {"rope_type": "linear", "factor": linear_rope}} if linear_rope else {}
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=500.0 if linear_rope else 10000.0, tie_word_embeddings=tied,
        attn_implementation="eager", **_ids(), **extra,
    )
    return _finish(LlamaForCausalLM(cfg), seed, plus_one=False)


def build_gemma2(seed: int = 12):
    """Gemma 2 as in ``tiny_models`` (window 6 < the test length, both soft-caps), tied, with
    ``query_pre_attn_scalar`` = head_dim = 32."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        max_position_embeddings=256, attn_implementation="eager", tie_word_embeddings=True, **_ids(),
    )
    return _finish(Gemma2ForCausalLM(cfg), seed, plus_one=True)


def build_gemma3(seed: int = 13):
    """Gemma 3 text, 6 layers (5 sliding with window 5 < the test length, then 1 full), query/key
    norms, global RoPE base 5000 with linear scaling 4, local base 10000 (llama.cpp's fixed value)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=5, sliding_window_pattern=6, rope_theta=5000.0, rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0}, max_position_embeddings=256,
        attn_implementation="eager", tie_word_embeddings=True, **_ids(),
    )
    return _finish(Gemma3ForCausalLM(cfg), seed, plus_one=True)


_BUILDERS = {
    "llama": build_llama,
    "llama_linear": functools.partial(build_llama, seed=14, tied=True, linear_rope=4.0, n_layers=2),
    "gemma": lambda: tm.checkpoint("gemma")[1],
    "gemma2": build_gemma2,
    "gemma3": build_gemma3,
    "gpt2": lambda: tm.checkpoint("gpt2")[1],
}
KINDS = list(_BUILDERS)


@functools.cache
def reference(kind: str):
    """The torch model of ``kind``, built once per session."""
    return _BUILDERS[kind]()


def architecture(hf_model) -> str:
    model_type = hf_model.config.model_type
    return {"gemma3_text": "gemma3"}.get(model_type, model_type)


# ---- llama.cpp's tensor changes ------------------------------------------------------------------


def permute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's ``permute``: each head's rows (first half, second half) → pairs (0, hd/2), (1, hd/2+1), ..."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def inverse_permute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _heads(cfg, hf_name: str) -> int | None:
    """The head count llama.cpp permutes a Llama Q / K projection with (None for other tensors)."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return cfg.num_attention_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return cfg.num_key_value_heads or cfg.num_attention_heads
    return None


def to_gguf_layout(hf_model, hf_name: str, value: np.ndarray) -> np.ndarray:
    """A Hugging Face tensor as llama.cpp's converter stores it."""
    arch, cfg = architecture(hf_model), hf_model.config
    if arch == "llama" and (heads := _heads(cfg, hf_name)):
        value = permute_rotary(value, heads)
    if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
        value = value + np.float32(1.0)
    if arch == "gpt2" and hf_name.endswith(_GPT2_TRANSPOSED):
        value = value.T
    return np.ascontiguousarray(value, np.float32)


def from_gguf_layout(hf_model, hf_name: str, value: np.ndarray) -> np.ndarray:
    """The inverse of ``to_gguf_layout`` (float32): what a loader must make of a stored tensor."""
    arch, cfg = architecture(hf_model), hf_model.config
    if arch == "llama" and (heads := _heads(cfg, hf_name)):
        value = inverse_permute_rotary(value, heads)
    if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
        value = value.astype(np.float32) - np.float32(1.0)
    if arch == "gpt2" and hf_name.endswith(_GPT2_TRANSPOSED):
        value = value.T
    return np.ascontiguousarray(value, np.float32)


# ---- conversion ----------------------------------------------------------------------------------


@dataclass
class Converted:
    """A converted model: ``tensors`` (GGUF name → float32 array in llama.cpp's layout), ``hf_names``
    (GGUF name → Hugging Face name) and ``metadata`` (key → ``gguf.GGUFValue``, as the converter's
    ``GGUFWriter.add_*`` calls leave it)."""

    arch: str
    hf_model: Any
    tensors: dict[str, np.ndarray]
    hf_names: dict[str, str]
    metadata: dict[str, Any]


def _state(hf_model) -> dict[str, np.ndarray]:
    """The tensors a ``save_pretrained`` checkpoint holds: no tied ``lm_head``, no mask buffers."""
    tied = bool(getattr(hf_model.config, "tie_word_embeddings", False))
    out = {}
    for name, value in hf_model.state_dict().items():
        if (tied and name == "lm_head.weight") or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[name] = value.detach().float().numpy()
    return out


def _rope(cfg, layer_type: str = "full_attention") -> dict:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get(layer_type, params)


def _metadata(hf_model, arch: str, tokenizer: bool) -> dict[str, Any]:
    cfg = hf_model.config
    w = gguf.GGUFWriter(None, arch)
    w.add_name(f"tiny-{arch}")
    if arch == "gpt2":  # GPT2Model.set_gguf_parameters
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)  # config.json's n_ctx, which transformers 5 drops
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:  # TextModel / LlamaModel / Gemma*Model.set_gguf_parameters
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        rope = _rope(cfg)
        if arch in ("llama", "gemma3"):
            w.add_rope_freq_base(rope["rope_theta"])
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        if arch == "llama":
            w.add_vocab_size(cfg.vocab_size)
            w.add_rope_dimension_count(cfg.head_dim)
        if arch == "gemma2":
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        if arch in ("gemma2", "gemma3"):
            w.add_sliding_window(cfg.sliding_window)
    if tokenizer:
        _add_vocabulary(w, arch)
    return dict(w.kv_data[0])


def convert(hf_model, tokenizer: bool = True) -> Converted:
    """``hf_model`` as llama.cpp's converter writes it (float32 tensors, not yet quantized)."""
    arch = architecture(hf_model)
    names = gguf.get_tensor_name_map(ARCHITECTURES[arch], _n_layers(hf_model.config))
    tensors, hf_names = {}, {}
    for hf_name, value in _state(hf_model).items():
        if arch in ("gemma", "gemma2") and hf_name == "lm_head.weight":
            continue  # Gemma{,2}Model.filter_tensors: "lm_head is not used in llama.cpp"
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"llama.cpp has no name for {hf_name!r} in {arch}")
        tensors[name], hf_names[name] = to_gguf_layout(hf_model, hf_name, value), hf_name
        if arch == "gpt2" and name == "token_embd.weight":
            tensors["output.weight"], hf_names["output.weight"] = tensors[name].copy(), "lm_head.weight"
    return Converted(arch, hf_model, tensors, hf_names, _metadata(hf_model, arch, tokenizer))


def _n_layers(cfg) -> int:
    return cfg.n_layer if cfg.model_type == "gpt2" else cfg.num_hidden_layers


# ---- the vocabulary ------------------------------------------------------------------------------


def word(n: int) -> str:
    """The n-th word of the GGUF vocabulary: "w" and n's decimal digits spelled a..j ("wbc" for 12).
    Letters, not digits: GPT-2's pre-tokenizer splits digits from letters, so "w12" could not merge."""
    return "w" + "".join("abcdefghij"[int(c)] for c in str(n))


def vocabulary(marker: str) -> list[str]:
    """``VOCAB`` pieces: the four specials of ``tiny_models`` (ids 0..3), then ``marker``, "w", the
    letters a..j, ``marker + "w"`` and ``marker + word(n)`` for n = 0, 1, ...: each longer piece is a
    shorter one plus one character, so the merges are plain."""
    pieces = [*tm.SPECIAL, marker, "w", *"abcdefghij", marker + "w"]
    return pieces + [marker + word(n) for n in range(VOCAB - len(pieces))]


def _add_vocabulary(w: gguf.GGUFWriter, arch: str) -> None:
    control, unknown, normal = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN, gguf.TokenType.NORMAL)
    if arch == "gpt2":  # byte-level BPE: "Ġ" is the space byte
        tokens = vocabulary("\u0120")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([control, control, control, unknown] + [normal] * (VOCAB - 4))
        w.add_token_merges([f"{t[:-1]} {t[-1]}" for t in tokens[4:] if len(t) > 1])
    else:  # sentencepiece: "▁" marks a word start, scores give the merge order
        tokens = vocabulary("\u2581")
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) for i in range(VOCAB)])
        w.add_token_types([control, control, control, unknown] + [normal] * (VOCAB - 4))
        w.add_unk_token_id(3)
        if arch.startswith("gemma"):
            w.add_add_space_prefix(False)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)


# ---- writing -------------------------------------------------------------------------------------


def random_kquant(shape: tuple[int, ...], qtype: Q, rng: np.random.Generator, std: float = 0.2) -> np.ndarray:
    """Random ``qtype`` blocks (bytes, shape as ``gguf.quants.quantize`` returns) whose float16 scales
    give values of about ``std``: for the K-quants, which gguf de-quantizes but cannot quantize."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)

    def set_scales(value: float) -> None:
        for offset in _KQUANT_F16_FIELDS[qtype]:
            raw[:, offset:offset + 2] = np.full((n_blocks, 1), value, np.float16).view(np.uint8)

    set_scales(1.0)  # values are linear in the scales: measure, then rescale
    spread = float(gguf.quants.dequantize(raw, qtype).std())
    set_scales(std / spread)
    return raw.reshape(gguf.quant_shape_to_byte_shape(shape, qtype))


def encode(value: np.ndarray, qtype: Q, rng: np.random.Generator | None = None) -> np.ndarray:
    """``value`` (float32) as a ``qtype`` tensor's data; random blocks for the K-quants (see ``random_kquant``)."""
    if qtype in _KQUANT_F16_FIELDS:
        return random_kquant(value.shape, qtype, rng or np.random.default_rng(0))
    return gguf.quants.quantize(value, qtype)


def write(path: str | Path, converted: Converted, *, qtypes: Mapping[str, Q] | None = None,
          metadata: Mapping[str, Any] | None = None, arch: str | None = None, raw: Mapping[str, tuple] | None = None,
          seed: int = 0) -> Path:
    """Write ``converted`` as a GGUF file at ``path``.

    ``qtypes``: GGUF tensor name → storage type (default F32). ``metadata``: key → new value (the
    key's type is kept; ``(value, GGUFValueType)`` for a new key; None drops the key). ``arch``: the
    ``general.architecture`` written instead. ``raw``: tensor name → ``(bytes array, type)`` written as is.
    """
    rng = np.random.default_rng(seed)
    qtypes, raw = dict(qtypes or {}), dict(raw or {})
    writer = gguf.GGUFWriter(path, arch or converted.arch)
    for key, value in converted.metadata.items():
        if key != gguf.Keys.General.ARCHITECTURE:
            writer.kv_data[0][key] = value
    for key, value in (metadata or {}).items():
        if value is None:
            writer.kv_data[0].pop(key, None)
        elif isinstance(value, tuple):
            writer.kv_data[0][key] = gguf.GGUFValue(value[0], value[1])
        else:
            old = writer.kv_data[0][key]
            writer.kv_data[0][key] = gguf.GGUFValue(value, old.type, old.sub_type)
    for name, value in converted.tensors.items():
        if name in raw:
            data, qtype = raw[name]
            writer.add_tensor(name, data, raw_dtype=qtype)
            continue
        qtype = qtypes.get(name, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(name, value)
        elif qtype == Q.F16:
            writer.add_tensor(name, value.astype(np.float16))
        else:
            writer.add_tensor(name, encode(value, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def stored_values(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, de-quantized by ``gguf.quants.dequantize`` to float32, in numpy
    order (GGUF lists dimensions innermost first)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    return out


def reference_from_file(converted: Converted, path: str | Path):
    """A copy of the torch reference holding the weights the file stores (after de-quantization),
    mapped back to the Hugging Face layout by ``from_gguf_layout``."""
    import copy

    model = copy.deepcopy(converted.hf_model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in stored_values(path).items():
            hf_name = converted.hf_names[name]
            if hf_name == "lm_head.weight" and hf_name not in params:  # GPT-2's tied copy
                continue
            params[hf_name].copy_(torch.from_numpy(from_gguf_layout(model, hf_name, value)))
    return model


def gguf_file(kind: str, directory: str | Path, **write_kwargs) -> tuple[Path, Converted]:
    """Write the tiny ``kind`` model to ``directory/{kind}.gguf`` (F32 unless told otherwise)."""
    converted = convert(reference(kind))
    return write(Path(directory) / f"{kind}.gguf", converted, **write_kwargs), converted
