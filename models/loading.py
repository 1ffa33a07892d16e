"""Load a Hugging Face checkpoint (local directory or the local HF cache) into a port.

Weights are read straight from ``*.safetensors`` (single file or sharded with
``model.safetensors.index.json``) into JAX arrays; PyTorch is never imported. Every parameter slot of
the port must be filled and every checkpoint tensor used (GPT-2's attention-mask buffers excepted).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .base import CausalLM
from .config import ModelConfig, config_from_dict
from .gpt2 import GPT2
from .llamalike import LlamaLike

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
              "generation_config.json", "*.model", "vocab.json", "merges.txt"]


class SafetensorsFile:
    """A memory-mapped ``.safetensors`` file.

    A small reader instead of ``safetensors.safe_open(..., "numpy")`` because NumPy has no bfloat16 and
    that reader refuses BF16 tensors, which is how Gemma 2 and Llama 3 are published; here BF16 is read
    as ``ml_dtypes.bfloat16`` without a copy.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            header_len = int.from_bytes(prefix, "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"{self.path}: not a safetensors file (header length {header_len}, file size {size})")
            try:
                header = json.loads(fh.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{self.path}: corrupt safetensors header: {err}") from None
        self._data_start = 8 + header_len
        self._data_size = size - self._data_start
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only NumPy view of the file."""
        entry = self.entries[name]
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        begin, end = (int(o) for o in entry["data_offsets"])
        shape = self.shape(name)
        if not 0 <= begin <= end <= self._data_size or end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{self.path}: tensor {name!r} has inconsistent offsets {begin}..{end} for shape {shape}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(dtype).reshape(shape)


# ---- finding the checkpoint ---------------------------------------------------------------------


def _hub_cache_dir() -> str:
    """The HF hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(constants.HF_HUB_OFFLINE)


def resolve_checkpoint_dir(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id resolved through the local HF cache (then the hub,
    unless offline). Raises ``FileNotFoundError`` saying how to point at a local directory."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    from huggingface_hub import snapshot_download

    repo_id, cache_dir = str(path_or_id), _hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir, allow_patterns=_HUB_FILES))
    except Exception as local_err:  # noqa: BLE001 - any failure means "not usable from the cache"
        reason = f"{type(local_err).__name__}: {local_err}"
    if not _hub_offline():
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=_HUB_FILES))
        except Exception as hub_err:  # noqa: BLE001
            reason = f"{type(hub_err).__name__}: {hub_err}"
    raise FileNotFoundError(
        f"{repo_id!r} is not a local directory and is not in the local Hugging Face cache ({cache_dir}), "
        f"and the hub could not be reached{' (HF_HUB_OFFLINE is set)' if _hub_offline() else ''}. "
        f"Download it where there is network (e.g. `huggingface-cli download {repo_id}`) or pass the path of a "
        f"local checkpoint directory containing config.json, *.safetensors and the tokenizer files. ({reason})"
    )


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a valid safetensors index ({err})") from None
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard files that do not exist: {missing}")
        return files
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    if others:
        return [directory / name for name in others]
    legacy = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
    hint = f" Found {legacy}: only safetensors are read (no pickle)." if legacy else ""
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json.{hint}")


# ---- filling the parameters ---------------------------------------------------------------------


def _family(cfg: ModelConfig) -> type[CausalLM]:
    return GPT2 if cfg.model_type == "gpt2" else LlamaLike


def _parse_dtype(dtype) -> np.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return dt


def load_model(directory: str | os.PathLike, dtype=jnp.float32) -> CausalLM:
    """Build the port for ``directory``'s ``config.json`` and fill it from its safetensors."""
    directory = Path(directory)
    dt = _parse_dtype(dtype)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: invalid JSON ({err})") from None
    cfg = config_from_dict(raw, source=str(config_path))
    family = _family(cfg)
    abstract = nnx.eval_shape(lambda: family(cfg, dtype=dt))
    graphdef, state = nnx.split(abstract)
    slots = dict(nnx.to_flat_state(state))
    names = family.checkpoint_names(cfg)
    filled: dict[tuple, tuple[str, Path]] = {}
    tied_copies: list[tuple[Path, str, np.ndarray]] = []

    files = [SafetensorsFile(f) for f in _safetensors_files(directory)]
    todo = [(f, name) for f in files for name in f.keys()]
    for f, name in tqdm(todo, desc=f"loading {cfg.model_type}", unit="tensor", disable=len(todo) < 200 or None):
        key = family.canonical_name(name, cfg)
        if key is None:
            continue
        if key == "__tied_lm_head__":
            tied_copies.append((f.path, name, f.get(name)))
            continue
        if key not in names:
            raise ValueError(f"{f.path}: tensor {name!r} is not used by the {cfg.model_type} port (unexpected tensor)")
        path = names[key]
        if path in filled:
            raise ValueError(f"{f.path}: tensor {name!r} duplicates one already read from {filled[path][1]}")
        expected = tuple(slots[path].get_value().shape)
        if f.shape(name) != expected:
            raise ValueError(f"{f.path}: tensor {name!r} has shape {f.shape(name)}, expected {expected}")
        arr = f.get(name)
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != ml_dtypes.bfloat16:
            raise ValueError(f"{f.path}: tensor {name!r} has non-float dtype {arr.dtype}")
        slots[path].set_value(jnp.asarray(arr.astype(dt, copy=False)))
        filled[path] = (name, f.path)

    unfilled = [key for key, path in names.items() if path not in filled]
    if unfilled:
        shown = ", ".join(repr(k) for k in unfilled[:8]) + (" ..." if len(unfilled) > 8 else "")
        raise ValueError(
            f"{directory}: checkpoint is missing {len(unfilled)} tensor(s) needed by the {cfg.model_type} port: "
            f"{shown} (read {[str(f.path.name) for f in files]})"
        )
    model = nnx.merge(graphdef, nnx.from_flat_state(slots))
    for path, name, arr in tied_copies:
        if not np.array_equal(np.asarray(arr.astype(dt)), np.asarray(model.tied_embedding_matrix())):
            raise ValueError(f"{path}: tensor {name!r} differs from the input embedding but the config ties them")
    return model


def load_tokenizer(directory: str | os.PathLike):
    """``transformers.AutoTokenizer`` for ``directory`` (never ``trust_remote_code``). A missing pad
    token is set to the EOS token so that batches can be padded."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - transformers raises many types here
        raise FileNotFoundError(f"{directory}: could not load a tokenizer ({type(err).__name__}: {err})") from err
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load(path_or_id: str | os.PathLike, dtype=jnp.float32, tokenizer: bool = True):
    """Load ``(model, tokenizer)`` from a local checkpoint directory or a hub id in the local HF cache.

    ``dtype``: float32 or bfloat16 (parameters and activations). With ``tokenizer=False`` the tokenizer
    is not loaded and None is returned in its place.
    """
    directory = resolve_checkpoint_dir(path_or_id)
    model = load_model(directory, dtype=dtype)
    return model, (load_tokenizer(directory) if tokenizer else None)
