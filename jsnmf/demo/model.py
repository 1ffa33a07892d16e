"""The demo model: a tiny GPT-2 in Hugging Face format with planted concept neurons (see :mod:`jsnmf.demo`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from jsnmf.demo.corpus import CONCEPTS, demo_corpus_path, read_demo_corpus

SPECIAL_TOKENS = ("<|endoftext|>", "[UNK]")
PLANTED_FILE = "planted.json"


@dataclass(frozen=True)
class DemoSpec:
    """Sizes and seed of the demo model."""

    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_mlp: int = 256
    group_size: int = 8
    n_positions: int = 128
    seed: int = 0


# ---------------------------------------------------------------- tokenizer


def _corpus_vocabulary(records: list[dict]) -> list[str]:
    """Every word (lower-cased, punctuation split off) of the corpus and the concepts, sorted."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer, pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words = {w for ws in CONCEPTS.values() for w in ws}
    for record in records:
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(record["text"])))
    return sorted(words)


def _build_tokenizer(vocabulary: list[str], spec: DemoSpec):
    """A word-level fast tokenizer: lower-cases, splits on whitespace and punctuation."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from jsnmf.models.hf import transformers_module

    PreTrainedTokenizerFast = transformers_module().PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + vocabulary)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    eos = SPECIAL_TOKENS[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=eos, eos_token=eos, unk_token="[UNK]", pad_token=eos,
        model_max_length=spec.n_positions,
    )


# ---------------------------------------------------------------- weights


def _gelu_new(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def _concept_directions(rng: np.random.Generator, n_concepts: int, d_model: int) -> np.ndarray:
    """(n_concepts, d_model) orthonormal rows, each orthogonal to the all-ones vector."""
    basis = np.concatenate([np.ones((d_model, 1)), rng.standard_normal((d_model, n_concepts))], axis=1)
    q, _ = np.linalg.qr(basis)
    return q[:, 1:].T


def _embeddings(rng, vocab: list[str], directions: np.ndarray, d_model: int) -> np.ndarray:
    """Noise outside the concept subspace, plus α_w·d_c for the words of concept c."""
    noise = rng.standard_normal((len(vocab), d_model))
    noise -= (noise @ directions.T) @ directions
    concept_of = {w: c for c, words in enumerate(CONCEPTS.values()) for w in words}
    for i, word in enumerate(vocab):
        if word in concept_of:
            noise[i] += rng.uniform(5.0, 7.0) * directions[concept_of[word]]
    return noise.astype(np.float32)


def _mlp_weights(rng, spec: DemoSpec, directions: np.ndarray, residual: np.ndarray,
                 concept_rows: list[np.ndarray]):
    """One layer's ``c_fc`` (d_model, d_mlp), bias, ``c_proj`` (d_mlp, d_model) and planted groups.

    ``residual`` holds the residual stream of every vocabulary word entering this layer; biases of
    the planted neurons are set between the concept words' and the other words' pre-activations.
    """
    d, m = spec.d_model, spec.d_mlp
    w_fc = rng.standard_normal((d, m)) / np.sqrt(d)  # random neurons: pre-activation std ≈ 1
    b_fc = rng.normal(-1.5, 0.3, m)
    w_proj = rng.standard_normal((m, d)) * 0.02
    normed = _layer_norm(residual)
    neurons = rng.permutation(m)  # a different neuron layout in every layer
    groups = {}
    for c, name in enumerate(CONCEPTS):
        group = np.sort(neurons[c * spec.group_size:(c + 1) * spec.group_size])
        groups[name] = [int(n) for n in group]
        inside = np.zeros(len(residual), bool)
        inside[concept_rows[c]] = True
        for n in group:
            column = directions[c] + 0.15 * rng.standard_normal(d) / np.sqrt(d)
            pre = normed @ column
            threshold = 0.5 * (pre[inside].min() + pre[~inside].max())
            gain = 1.5 * rng.uniform(0.8, 1.2)
            w_fc[:, n] = gain * column
            b_fc[n] = -gain * threshold
            w_proj[n] = 0.05 * directions[c]
    return w_fc, b_fc, w_proj, groups


def _build_weights(spec: DemoSpec, vocab: list[str]) -> tuple[dict[str, np.ndarray], dict]:
    """All GPT-2 tensors (checkpoint names, Conv1D [in, out] layout) and the planted neuron groups."""
    rng = np.random.default_rng(spec.seed)
    d = spec.d_model
    directions = _concept_directions(rng, len(CONCEPTS), d)
    wte = _embeddings(rng, vocab, directions, d)
    wpe = (rng.standard_normal((spec.n_positions, d)) * 0.02).astype(np.float32)
    index = {w: i for i, w in enumerate(vocab)}
    concept_rows = [np.array([index[w] for w in words]) for words in CONCEPTS.values()]
    tensors = {"wte.weight": wte, "wpe.weight": wpe}
    residual = wte.astype(np.float64)  # position and attention contributions are negligible
    planted = {}
    for i in range(spec.n_layer):
        p = f"h.{i}."
        tensors[p + "ln_1.weight"] = np.ones(d)
        tensors[p + "ln_1.bias"] = np.zeros(d)
        tensors[p + "attn.c_attn.weight"] = rng.standard_normal((d, 3 * d)) * 1e-3
        tensors[p + "attn.c_attn.bias"] = np.zeros(3 * d)
        tensors[p + "attn.c_proj.weight"] = rng.standard_normal((d, d)) * 1e-3
        tensors[p + "attn.c_proj.bias"] = np.zeros(d)
        tensors[p + "ln_2.weight"] = np.ones(d)
        tensors[p + "ln_2.bias"] = np.zeros(d)
        w_fc, b_fc, w_proj, groups = _mlp_weights(rng, spec, directions, residual, concept_rows)
        tensors[p + "mlp.c_fc.weight"], tensors[p + "mlp.c_fc.bias"] = w_fc, b_fc
        tensors[p + "mlp.c_proj.weight"], tensors[p + "mlp.c_proj.bias"] = w_proj, np.zeros(d)
        planted[str(i)] = groups
        residual = residual + _gelu_new(_layer_norm(residual) @ w_fc + b_fc) @ w_proj
    tensors["ln_f.weight"] = np.ones(d)
    tensors["ln_f.bias"] = np.zeros(d)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, planted


def _config(spec: DemoSpec, vocab_size: int) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": spec.n_positions,
        "n_embd": spec.d_model,
        "n_layer": spec.n_layer,
        "n_head": spec.n_head,
        "n_inner": spec.d_mlp,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }


def build_demo_model(out_dir: str | os.PathLike, spec: DemoSpec = DemoSpec()) -> Path:
    """Write the demo checkpoint (Hugging Face GPT-2 format) to ``out_dir`` and return its path.

    Files: ``config.json``, ``model.safetensors``, ``tokenizer.json`` (+ tokenizer config files),
    ``planted.json`` (which neurons of which layer carry which concept). Deterministic for a given
    ``spec``; an existing demo checkpoint at ``out_dir`` built from the same spec is reused. The
    directory is assembled under a temporary name and moved into place, so a kill leaves no half model.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir).expanduser().resolve()
    if _is_built(out_dir, spec):
        return out_dir
    if out_dir.exists() and not (out_dir / PLANTED_FILE).is_file():
        if any(out_dir.iterdir()):
            raise ValueError(f"{out_dir}: exists and is not a jsnmf demo model; choose another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    vocab = list(SPECIAL_TOKENS) + _corpus_vocabulary(read_demo_corpus())
    tensors, planted = _build_weights(spec, vocab)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_config(spec, len(vocab)), indent=2) + "\n")
        _build_tokenizer(vocab[len(SPECIAL_TOKENS):], spec).save_pretrained(str(tmp))
        record = {"spec": asdict(spec), "corpus_sha256": _corpus_sha256(),
                  "concepts": {k: list(v) for k, v in CONCEPTS.items()}, "layers": planted}
        (tmp / PLANTED_FILE).write_text(json.dumps(record, indent=1) + "\n")
        if out_dir.exists():
            _replace_demo_files(tmp, out_dir)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _replace_demo_files(new: Path, out_dir: Path) -> None:
    """Move the freshly built files over the old demo's, touching nothing else in ``out_dir`` (a user's
    files there survive a rebuild). The marker ``planted.json`` goes first and comes back last, so a
    kill in between leaves a folder that is not taken for a built demo and is rebuilt next time."""
    (out_dir / PLANTED_FILE).unlink(missing_ok=True)
    for path in sorted(new.iterdir(), key=lambda p: p.name == PLANTED_FILE):
        os.replace(path, out_dir / path.name)


def _is_built(out_dir: Path, spec: DemoSpec) -> bool:
    try:
        record = json.loads((out_dir / PLANTED_FILE).read_text())
    except (OSError, ValueError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json")
    same = record.get("spec") == asdict(spec) and record.get("corpus_sha256") == _corpus_sha256()
    return same and all((out_dir / f).is_file() for f in files)


def _corpus_sha256() -> str:
    """The shipped corpus fixes the vocabulary, so a model built from another corpus is not reused."""
    return hashlib.sha256(demo_corpus_path().read_bytes()).hexdigest()


def read_planted(model_dir: str | os.PathLike) -> dict:
    """The ``planted.json`` of a demo checkpoint: spec, concepts, and per layer concept -> neurons."""
    path = Path(model_dir) / PLANTED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a jsnmf demo model (no {PLANTED_FILE})")
    return json.loads(path.read_text())
