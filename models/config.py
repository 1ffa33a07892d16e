"""One configuration type for every supported family, parsed from a Hugging Face ``config.json``.

The parser reads both the hub form (``rope_theta`` / ``rope_scaling``) and the form transformers v5
``save_pretrained`` writes (``rope_parameters``, per layer type for Gemma 3). A multimodal ``gemma3``
config is read through its ``text_config``. Settings the ports do not implement raise a
``ValueError`` instead of silently producing wrong numbers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "gemma", "gemma2", "gemma3_text", "gemma3")

# HF activation names → the activation the port computes. "gelu" for Gemma 1 is the legacy name of
# the tanh approximation (transformers rewrites it the same way, see configuration_gemma.py).
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """The ``rope_type: llama3`` frequency rescaling of Llama 3.1 / 3.2."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """The ``rope_type: linear`` scaling (Gemma 3's global layers): inverse frequencies divided by ``factor``."""

    factor: float


RopeScaling = Llama3RopeScaling | LinearRopeScaling

# Gemma3TextConfig's defaults: hub configs of the multimodal Gemma 3 models (e.g. gemma-3-12b-it) state
# only a few text settings and rely on these, so the parser must fill them in as transformers does.
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
    "bos_token_id": 2, "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM, in the port's vocabulary (hashable: it is static under jit).

    ``d_mlp`` is the width of the MLP activation (the input of the down-projection).
    Llama-like flags: ``norm_plus_one`` (Gemma's ``(1 + w)`` RMSNorm), ``embed_scale`` (multiply the
    embeddings by ``sqrt(d_model)``), ``post_attn_norm`` / ``post_ffw_norm`` (Gemma 2's extra norms),
    ``attn_softcap`` / ``final_softcap`` (``c·tanh(x/c)``), ``sliding_layers`` (per layer: does it use
    the ``sliding_window`` mask), ``qk_norm`` (Gemma 3's per-head RMSNorm of queries and keys before
    RoPE), ``rope_local_theta`` / ``rope_local_scaling`` (Gemma 3: the RoPE of the sliding layers; None
    means every layer uses ``rope_theta`` / ``rope_scaling``).
    """

    model_type: str
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    activation: str
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    attn_scale: float = 1.0  # multiplies q·k
    # GPT-2
    use_learned_positions: bool = False
    # Llama-like
    rope_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    norm_plus_one: bool = False
    embed_scale: bool = False
    post_attn_norm: bool = False
    post_ffw_norm: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    qk_norm: bool = False
    rope_local_theta: float | None = None
    rope_local_scaling: RopeScaling | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids as a tuple (possibly empty)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)


def _require(raw: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in raw or raw[key] is None:
        raise ValueError(f"{source}: required setting {key!r} is missing")
    return raw[key]


def _positive(raw: Mapping[str, Any], key: str, source: str) -> int:
    """The required setting ``key`` as a positive integer (sizes are divided by, so 0 is refused here)."""
    value = _require(raw, key, source)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
        raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
    return int(value)


def _reject_if(condition: bool, source: str, message: str) -> None:
    if condition:
        raise ValueError(f"{source}: unsupported configuration: {message}")


def _activation(name: str | None, source: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"{source}: unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _token_ids(raw: Mapping[str, Any]) -> dict[str, Any]:
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(int(e) for e in eos)
    return {
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": raw.get("pad_token_id"),
    }


def _gpt2(raw: Mapping[str, Any], source: str) -> ModelConfig:
    _reject_if(bool(raw.get("scale_attn_by_inverse_layer_idx")), source, "scale_attn_by_inverse_layer_idx=true")
    _reject_if(bool(raw.get("reorder_and_upcast_attn")), source, "reorder_and_upcast_attn=true")
    _reject_if(bool(raw.get("add_cross_attention")), source, "add_cross_attention=true")
    _reject_if(raw.get("tie_word_embeddings", True) is False, source, "GPT-2 with untied embeddings")
    d_model = _positive(raw, "n_embd", source)
    n_heads = _positive(raw, "n_head", source)
    if d_model % n_heads:
        raise ValueError(f"{source}: n_embd={d_model} is not divisible by n_head={n_heads}")
    head_dim = d_model // n_heads
    n_inner = raw.get("n_inner")
    return ModelConfig(
        model_type="gpt2",
        n_layers=int(_require(raw, "n_layer", source)),
        d_model=d_model,
        d_mlp=int(n_inner) if n_inner is not None else 4 * d_model,
        vocab_size=int(_require(raw, "vocab_size", source)),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=head_dim,
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        activation=_activation(raw.get("activation_function", "gelu_new"), source),
        tie_word_embeddings=True,
        max_position_embeddings=int(_require(raw, "n_positions", source)),
        attn_scale=head_dim**-0.5 if raw.get("scale_attn_weights", True) else 1.0,
        use_learned_positions=True,
        **_token_ids(raw),
    )


def _rope_scaling(params: Mapping[str, Any], source: str) -> RopeScaling | None:
    """The scaling of one RoPE settings dict (``rope_scaling`` or ``rope_parameters[...]``)."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    _reject_if(params.get("partial_rotary_factor") not in (None, 1, 1.0), source, "partial_rotary_factor != 1")
    if rope_type == "default":
        return None
    if rope_type == "linear":
        factor = params.get("factor")
        if not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"{source}: linear rope scaling needs a positive factor, got {factor!r}")
        return LinearRopeScaling(factor=float(factor))
    if rope_type != "llama3":
        raise ValueError(f"{source}: unsupported rope type {rope_type!r} (supported: default, linear, llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"{source}: llama3 rope scaling is missing {missing}")
    _reject_if(params.get("attention_factor") not in (None, 1.0), source, "llama3 rope with attention_factor != 1")
    return Llama3RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _rope(raw: Mapping[str, Any], source: str, default_theta: float) -> tuple[float, RopeScaling | None]:
    """Read RoPE settings from either ``rope_parameters`` (transformers v5) or ``rope_theta``/``rope_scaling``."""
    params = raw.get("rope_parameters")
    if isinstance(params, Mapping) and params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"{source}: per-layer-type rope_parameters are not supported: {dict(params)}")
    if isinstance(params, Mapping) and params:
        theta = float(params.get("rope_theta", raw.get("rope_theta", default_theta)))
        scaling = params
    else:
        theta = float(raw.get("rope_theta") or default_theta)
        scaling = raw.get("rope_scaling") or {}
    return theta, _rope_scaling(scaling, source)


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _rope_gemma3(raw: Mapping[str, Any], source: str):
    """Gemma 3's two RoPEs → ``(global theta, global scaling, local theta, local scaling)``.

    As ``Gemma3TextConfig.convert_rope_params_to_dict``: v5 writes ``rope_parameters`` per layer type;
    hub files have ``rope_theta`` (global, default 1e6), ``rope_local_base_freq`` (local, default 1e4)
    and a ``rope_scaling`` that applies to the global (full-attention) layers only.
    """
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"{source}: rope_parameters must be an object, got {params!r}")
    params = dict(params or {})
    if set(params) - set(_LAYER_TYPES):
        raise ValueError(
            f"{source}: gemma3 rope_parameters must be keyed by layer type {_LAYER_TYPES}, got {sorted(params)}"
        )
    full = dict(params.get("full_attention") or {})
    full.update(raw.get("rope_scaling") or {})
    local = dict(params.get("sliding_attention") or {})
    full.setdefault("rope_theta", raw.get("rope_theta") or 1_000_000.0)
    local.setdefault("rope_theta", raw.get("rope_local_base_freq") or 10_000.0)
    return (float(full["rope_theta"]), _rope_scaling(full, f"{source} (full_attention rope)"),
            float(local["rope_theta"]), _rope_scaling(local, f"{source} (sliding_attention rope)"))


def _gemma3_text_config(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The text settings of a multimodal ``gemma3`` config: its ``text_config``, with the token ids and
    the embedding tying taken from the top level where stated there (transformers' multimodal model
    reads ``tie_word_embeddings`` from its top-level config)."""
    text = raw.get("text_config")
    if not isinstance(text, Mapping):
        raise ValueError(f"{source}: model_type 'gemma3' needs a 'text_config' object with the text settings")
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise ValueError(f"{source}: text_config.model_type must be 'gemma3_text', got {text.get('model_type')!r}")
    merged = dict(text)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if raw.get(key) is not None:
            merged[key] = raw[key]
    return merged


def _llamalike(raw: Mapping[str, Any], source: str, model_type: str) -> ModelConfig:
    if model_type in ("gemma3", "gemma3_text"):
        raw = {**_GEMMA3_TEXT_DEFAULTS, **(_gemma3_text_config(raw, source) if model_type == "gemma3" else raw)}
    _reject_if(bool(raw.get("attention_bias")), source, "attention_bias=true")
    _reject_if(bool(raw.get("mlp_bias")), source, "mlp_bias=true")
    _reject_if(bool(raw.get("use_bidirectional_attention")), source, "use_bidirectional_attention=true")
    _reject_if(int(raw.get("pretraining_tp", 1) or 1) != 1, source, "pretraining_tp != 1")
    d_model = int(_require(raw, "hidden_size", source))
    n_heads = _positive(raw, "num_attention_heads", source)
    n_kv_heads = int(raw.get("num_key_value_heads") or n_heads)
    if n_heads % n_kv_heads:
        raise ValueError(f"{source}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv_heads}")
    head_dim = int(raw.get("head_dim") or d_model // n_heads)
    n_layers = int(_require(raw, "num_hidden_layers", source))
    is_gemma = model_type in ("gemma", "gemma2", "gemma3_text", "gemma3")
    is_gemma3 = model_type in ("gemma3_text", "gemma3")
    if is_gemma3:
        theta, scaling, local_theta, local_scaling = _rope_gemma3(raw, source)
    else:
        theta, scaling = _rope(raw, source, default_theta=10000.0)
        local_theta = local_scaling = None

    if model_type != "gemma" and is_gemma:
        act_name = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    elif model_type == "gemma":
        act_name = raw.get("hidden_act") or "gelu_pytorch_tanh"
        act_name = "gelu_pytorch_tanh" if act_name == "gelu" else act_name
    else:
        act_name = raw.get("hidden_act", "silu")
    common = dict(
        model_type=model_type,
        n_layers=n_layers,
        d_model=d_model,
        d_mlp=int(_require(raw, "intermediate_size", source)),
        vocab_size=int(_require(raw, "vocab_size", source)),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        activation=_activation(act_name, source),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", is_gemma)),
        max_position_embeddings=int(raw.get("max_position_embeddings") or 0),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_plus_one=is_gemma,
        embed_scale=is_gemma,
        sliding_layers=(False,) * n_layers,
        **_token_ids(raw),
    )
    if model_type not in ("gemma2", "gemma3_text", "gemma3"):
        _reject_if(raw.get("sliding_window") is not None and model_type == "llama", source, "sliding_window on llama")
        return ModelConfig(attn_scale=head_dim**-0.5, **common)

    query_scalar = float(raw.get("query_pre_attn_scalar") or head_dim)
    window = raw.get("sliding_window", raw.get("sliding_window_size"))
    # transformers' defaults: Gemma 2 alternates (layer 0 slides); Gemma 3's older configs say
    # ``sliding_window_pattern`` N (default 6): every Nth layer is full, the others slide.
    pattern = int(raw.get("sliding_window_pattern") or 6) if is_gemma3 else 2
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)
    ]
    if len(layer_types) != n_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"{source}: layer_types must list 'sliding_attention'/'full_attention' per layer, got {layer_types}")
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    if any(sliding) and not window:
        raise ValueError(f"{source}: sliding_attention layers need a positive sliding_window")
    common["sliding_layers"] = sliding
    return ModelConfig(
        attn_scale=query_scalar**-0.5,
        post_attn_norm=True,
        post_ffw_norm=True,
        attn_softcap=raw.get("attn_logit_softcapping"),
        final_softcap=raw.get("final_logit_softcapping"),
        sliding_window=int(window) if window else None,
        qk_norm=is_gemma3,
        rope_local_theta=local_theta,
        rope_local_scaling=local_scaling,
        **common,
    )


def config_from_dict(raw: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Parse a Hugging Face ``config.json`` dictionary; ``source`` names the file in error messages."""
    model_type = raw.get("model_type")
    if raw.get("quantization_config"):
        raise ValueError(f"{source}: quantized checkpoints are not supported (quantization_config is set)")
    if model_type == "gpt2":
        cfg = _gpt2(raw, source)
    elif model_type in ("llama", "gemma", "gemma2", "gemma3_text", "gemma3"):
        cfg = _llamalike(raw, source, model_type)
    else:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for name in ("n_layers", "d_model", "d_mlp", "vocab_size", "n_heads", "head_dim"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{source}: {name} must be positive, got {getattr(cfg, name)}")
    if cfg.attn_softcap is not None and not (math.isfinite(cfg.attn_softcap) and cfg.attn_softcap > 0):
        raise ValueError(f"{source}: attn_logit_softcapping must be positive, got {cfg.attn_softcap}")
    if cfg.final_softcap is not None and not (math.isfinite(cfg.final_softcap) and cfg.final_softcap > 0):
        raise ValueError(f"{source}: final_logit_softcapping must be positive, got {cfg.final_softcap}")
    return cfg
