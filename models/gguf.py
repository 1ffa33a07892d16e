"""Read a GGUF file (llama.cpp's format) as a Hugging Face checkpoint: config, tensors, tokenizer.

The file is parsed with the ``gguf`` package (pure Python + NumPy, memory-mapped) and every tensor is
de-quantized block of rows by block of rows straight into the compute dtype, so loading holds about
one copy of the weights. What llama.cpp's converter changed is undone here, so the ports see exactly
the Hugging Face tensors:

- the names (``blk.3.ffn_gate.weight`` → ``model.layers.3.mlp.gate_proj.weight``), one table a family;
- Llama's Q and K rows, which the converter permutes from the split-halves rotary layout to the
  interleaved one llama.cpp computes;
- Gemma's RMSNorm weights, which the converter stores as ``1 + w`` (the ports apply ``1 + w``);
- GPT-2's ``Conv1D`` weights, which the converter transposes to [out, in].

The config comes from the file's metadata, written in the keys of the family's ``config.json``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .tensors import CheckpointTensor

GGUF_MAGIC = b"GGUF"
# Rows de-quantized at once: bounds the float32 scratch to a few MB whatever the tensor.
_ROWS_PER_BLOCK = 4096

# GGUF tensor name (after ``blk.{i}.``) → Hugging Face name (after ``model.layers.{i}.``), per family.
_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA2_LAYER = {
    **_LLAMA_LAYER,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GEMMA3_LAYER = {
    **_GEMMA2_LAYER,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_LLAMA_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GPT2_LAYER = {
    "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight", "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight", "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight", "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight", "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias",
}
_GPT2_GLOBAL = {
    "token_embd.weight": "wte.weight",
    "position_embd.weight": "wpe.weight",
    "output_norm.weight": "ln_f.weight",
    "output_norm.bias": "ln_f.bias",
    "output.weight": "lm_head.weight",  # a tied copy, when a converter wrote one
}


@dataclass(frozen=True)
class Family:
    """How one GGUF architecture maps onto a port."""

    model_type: str  # the Hugging Face ``model_type`` the config is written for
    global_names: dict[str, str]
    layer_names: dict[str, str]
    layer_prefix: str  # the Hugging Face prefix of block ``{i}``
    norm_stored_plus_one: bool = False  # Gemma: the converter stored ``1 + w``
    permuted_qk: bool = False  # Llama: the converter interleaved the rotary halves of Q and K
    transposed: tuple[str, ...] = ()  # GPT-2: Conv1D weights stored [out, in]


FAMILIES = {
    "llama": Family("llama", _LLAMA_GLOBAL, _LLAMA_LAYER, "model.layers.{i}.", permuted_qk=True),
    "gemma": Family("gemma", _LLAMA_GLOBAL, _LLAMA_LAYER, "model.layers.{i}.", norm_stored_plus_one=True),
    "gemma2": Family("gemma2", _LLAMA_GLOBAL, _GEMMA2_LAYER, "model.layers.{i}.", norm_stored_plus_one=True),
    "gemma3": Family("gemma3_text", _LLAMA_GLOBAL, _GEMMA3_LAYER, "model.layers.{i}.", norm_stored_plus_one=True),
    "gpt2": Family("gpt2", _GPT2_GLOBAL, _GPT2_LAYER, "h.{i}.",
                   transposed=("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")),
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


class GGUFCheckpoint:
    """A GGUF file opened for loading: ``config`` (a ``config.json``-style dict) and ``tensors``."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: not a regular file")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except Exception as err:  # noqa: BLE001 - the reader fails in many ways on a damaged file
            raise ValueError(f"{self.path}: not a readable GGUF file (truncated or corrupt?): "
                             f"{type(err).__name__}: {err}") from None
        self.architecture = self._string("general.architecture")
        if self.architecture not in FAMILIES:
            raise ValueError(f"{self.path}: unsupported GGUF architecture {self.architecture!r}; "
                             f"supported: {', '.join(FAMILIES)}")
        self.family = FAMILIES[self.architecture]
        self.config = self._config()
        # The reader keeps the vocabulary as hundreds of thousands of small arrays (~700 MB for
        # Gemma 3's 262k tokens); the weights do not need it (the tokenizer re-reads the file).
        for key in [key for key in self._reader.fields if key.startswith("tokenizer.")]:
            del self._reader.fields[key]

    # -- metadata ---------------------------------------------------------------------------------

    def _value(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{self.path}: metadata {key!r} is unreadable ({err})") from None

    def _string(self, key: str) -> str:
        value = self._value(key)
        if not isinstance(value, str):
            raise ValueError(f"{self.path}: metadata {key!r} is missing or not a string (got {value!r})")
        return value

    def _int(self, key: str, default: Any = None) -> int | None:
        value = self._value(f"{self.architecture}.{key}", default)
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            raise ValueError(f"{self.path}: per-layer values for {self.architecture}.{key} are not supported")
        return int(value)

    def _required(self, key: str) -> int:
        value = self._int(key)
        if value is None:
            raise ValueError(f"{self.path}: metadata {self.architecture}.{key} is missing")
        return value

    def _float(self, key: str, default: float | None = None) -> float | None:
        value = self._value(f"{self.architecture}.{key}", default)
        return None if value is None else float(value)

    def _block_count(self) -> int:
        """``block_count``, checked against the ``blk.{i}.`` tensors before anything is sized by it: a
        damaged count (a uint32, up to ~4e9) would otherwise make per-layer lists of that length in
        this config and in ``config_from_dict`` before the loader's own layer check runs."""
        n_layers = self._required("block_count")
        blocks = {int(m.group(1)) for t in self._reader.tensors if (m := _BLOCK.fullmatch(t.name))}
        # distinct indices >= 0: as many as declared and the largest n - 1 means exactly 0..n-1
        if len(blocks) != n_layers or (blocks and max(blocks) != n_layers - 1):
            have = f"blocks 0..{max(blocks)} ({len(blocks)} distinct)" if blocks else "no blk.* tensors"
            raise ValueError(f"{self.path}: metadata {self.architecture}.block_count is {n_layers} "
                             f"but the file has {have}")
        return n_layers

    def _config(self) -> dict[str, Any]:
        arch, names = self.architecture, {t.name for t in self._reader.tensors}
        tokens = self._value("tokenizer.ggml.tokens")
        vocab = self._int("vocab_size") or (len(tokens) if tokens is not None else None)
        embedding = next((t for t in self._reader.tensors if t.name == "token_embd.weight"), None)
        if vocab is None and embedding is not None:
            vocab = int(embedding.shape[1])
        ids = {"bos_token_id": self._value("tokenizer.ggml.bos_token_id"),
               "eos_token_id": self._value("tokenizer.ggml.eos_token_id"),
               "pad_token_id": self._value("tokenizer.ggml.padding_token_id")}
        if arch == "gpt2":
            return {"model_type": "gpt2", "n_embd": self._required("embedding_length"),
                    "n_layer": self._block_count(), "n_head": self._required("attention.head_count"),
                    "n_inner": self._required("feed_forward_length"), "n_positions": self._required("context_length"),
                    "layer_norm_epsilon": self._float("attention.layer_norm_epsilon", 1e-5),
                    "vocab_size": vocab, **ids}
        d_model, n_heads = self._required("embedding_length"), self._required("attention.head_count")
        n_layers = self._block_count()
        head_dim = self._int("attention.key_length") or self._int("rope.dimension_count") or d_model // n_heads
        config = {
            "model_type": self.family.model_type, "hidden_size": d_model, "num_hidden_layers": n_layers,
            "intermediate_size": self._required("feed_forward_length"), "num_attention_heads": n_heads,
            "num_key_value_heads": self._int("attention.head_count_kv") or n_heads, "head_dim": head_dim,
            "rms_norm_eps": self._float("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._float("rope.freq_base", 10000.0), "vocab_size": vocab,
            "max_position_embeddings": self._int("context_length") or 0,
            "tie_word_embeddings": "output.weight" not in names, **ids,
        }
        scaling = self._value(f"{arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise ValueError(f"{self.path}: unsupported rope scaling {scaling!r} in the metadata")
            config["rope_scaling"] = {"rope_type": "linear", "factor": self._float("rope.scaling.factor")}
        if "rope_freqs.weight" in names:
            raise ValueError(f"{self.path}: tensor 'rope_freqs.weight' (llama3 rope scaling stored as factors) "
                             "is not supported yet; load the Hugging Face checkpoint instead")
        if arch == "llama":
            config["hidden_act"] = "silu"
        if arch in ("gemma2", "gemma3"):
            # llama.cpp's rule: the 27B models scale queries by d_model / n_heads, the others by head_dim.
            is_27b = (arch, n_layers) in (("gemma2", 46), ("gemma3", 62))
            config["query_pre_attn_scalar"] = d_model // n_heads if is_27b else head_dim
            config["sliding_window"] = self._int("attention.sliding_window")
            config["hidden_activation"] = "gelu_pytorch_tanh"
        if arch == "gemma2":
            config["attn_logit_softcapping"] = self._float("attn_logit_softcapping")
            config["final_logit_softcapping"] = self._float("final_logit_softcapping")
        if arch == "gemma3":
            # GGUF keeps the global base only; the local base and the 5-sliding-1-full pattern are
            # Gemma 3's fixed values (as in llama.cpp and transformers' Gemma3TextConfig defaults).
            config["rope_local_base_freq"] = 10000.0
            pattern = self._int("attention.sliding_window_pattern") or 6
            config["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                     for i in range(n_layers)]
        return config

    # -- tensors ----------------------------------------------------------------------------------

    def hf_name(self, gguf_name: str) -> str:
        """The Hugging Face name of a GGUF tensor; a clear error for one the family does not use."""
        if gguf_name in self.family.global_names:
            return self.family.global_names[gguf_name]
        match = _BLOCK.fullmatch(gguf_name)
        if match and match.group(2) in self.family.layer_names:
            prefix = self.family.layer_prefix.format(i=int(match.group(1)))
            return prefix + self.family.layer_names[match.group(2)]
        raise ValueError(f"{self.path}: tensor {gguf_name!r} is not used by the {self.architecture} port")

    def tensors(self) -> list[CheckpointTensor]:
        return [self._tensor(t) for t in self._reader.tensors]

    def _tensor(self, tensor) -> CheckpointTensor:
        name = self.hf_name(tensor.name)
        shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        suffix = tensor.name.split(".", 2)[-1] if tensor.name.startswith("blk.") else tensor.name
        transpose = suffix in self.family.transposed
        origin = f"{self.path}: tensor {tensor.name!r}"
        hf_shape = shape[::-1] if transpose else shape
        shift = self.family.norm_stored_plus_one and suffix.endswith("norm.weight")

        def read(dtype) -> np.ndarray:
            # A shifted norm is de-quantized to float32 and rounded to ``dtype`` once, after the shift:
            # ``1 + w`` rounded to bfloat16 first would keep only ~2^-8 absolute precision of ``w``.
            out = self._dequantize(tensor, shape, np.float32 if shift else dtype, origin)
            if shift:
                out = (out - np.float32(1.0)).astype(dtype)
            if self.family.permuted_qk and suffix in ("attn_q.weight", "attn_k.weight"):
                heads = self.config["num_attention_heads" if suffix == "attn_q.weight" else "num_key_value_heads"]
                out = unpermute_rotary(out, heads)
            return np.ascontiguousarray(out.T) if transpose else out

        return CheckpointTensor(name, hf_shape, origin, read)

    def _dequantize(self, tensor, shape, dtype, origin) -> np.ndarray:
        from gguf import GGMLQuantizationType, quants

        kind = GGMLQuantizationType(tensor.tensor_type)
        data = tensor.data
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return np.asarray(data).reshape(shape).astype(dtype)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        packed = np.asarray(data).reshape(rows, -1)
        out = np.empty((rows, shape[-1]), dtype)
        try:
            for start in range(0, rows, _ROWS_PER_BLOCK):
                block = quants.dequantize(packed[start:start + _ROWS_PER_BLOCK], kind)
                out[start:start + _ROWS_PER_BLOCK] = block.reshape(-1, shape[-1])
        except NotImplementedError:
            raise ValueError(f"{origin} uses quantization type {kind.name}, which cannot be de-quantized "
                             "by the installed gguf package") from None
        except ValueError as err:
            raise ValueError(f"{origin}: cannot de-quantize {kind.name} data of shape {shape} ({err})") from None
        return out.reshape(shape)


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of a Q or K projection [n_heads·head_dim, d_model].

    The converter reorders each head's rows from the split-halves layout (``rotate_half``: first
    half, second half) to pairs (0, hd/2), (1, hd/2+1), ...; this puts the halves back.
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tokenizer_cache(path: Path) -> Path:
    """Where the converted tokenizer of ``path`` is kept: keyed by the file's SHA-256 of its metadata
    prefix, size and name, so an edited or replaced file gets a fresh conversion."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 24))  # the metadata (vocabulary included) sits at the start
    digest.update(f"{path.name}:{path.stat().st_size}".encode())
    root = Path(os.environ.get("JSNMF_CACHE") or Path.home() / ".cache" / "jsnmf").expanduser()
    return root / "gguf-tokenizers" / digest.hexdigest()[:32]


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer stored in a GGUF file's metadata, converted by transformers.

    The conversion takes seconds to tens of seconds for large vocabularies, so its result is saved
    (as a ``tokenizer.json`` folder, written under a temporary name and renamed) and reused.
    """
    import shutil
    import tempfile

    from .hf import transformers_module

    AutoTokenizer = transformers_module().AutoTokenizer
    path = Path(path)
    cached = _tokenizer_cache(path)
    if (cached / "tokenizer_config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(cached), trust_remote_code=False)
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt below
            tok = None
        if tok is not None:
            return _with_pad(tok)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - transformers raises many types here
        raise ValueError(f"{path}: could not build the tokenizer from the GGUF metadata "
                         f"({type(err).__name__}: {err})") from err
    scratch = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        tok.save_pretrained(scratch)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(scratch, cached)
    except OSError:  # a read-only cache: convert again next time
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return _with_pad(tok)


def _with_pad(tok):
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
