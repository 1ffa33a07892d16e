"""Load a Hugging Face checkpoint (local directory or the local HF cache) into a port.

Weights are read straight from ``*.safetensors`` (single file or sharded with
``model.safetensors.index.json``) into JAX arrays; PyTorch is never imported. Every parameter slot of
the port must be filled and every checkpoint tensor used (GPT-2's attention-mask buffers excepted).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .base import CausalLM
from .config import ModelConfig, config_from_dict
from .gguf import GGUFCheckpoint, is_gguf, load_gguf_tokenizer
from .gpt2 import GPT2
from .hf import transformers_module
from .llamalike import LlamaLike
from .tensors import CheckpointTensor

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
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
        if not self.path.is_file():  # a FIFO or a device would block or never end
            raise ValueError(f"{self.path}: not a regular file")
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
    if path.is_dir() or is_gguf(path):
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file but not a GGUF file; pass a .gguf file or the checkpoint "
                                "directory that holds config.json")
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
        f"Download it where there is network (e.g. `hf download {repo_id}`) or pass the path of a "
        f"local checkpoint directory containing config.json, *.safetensors and the tokenizer files. ({reason})"
    )


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a valid safetensors index ({err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: weight_map must map tensor names to shard file names")
        root = directory.resolve()
        outside = sorted({f for f in weight_map.values() if (directory / f).resolve().parent != root})
        if outside:  # a shard must be a file of this directory: never follow ../ or absolute paths
            raise ValueError(f"{index}: weight_map points outside the checkpoint directory: {outside[:4]}")
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


def _safetensors_tensors(paths: list[Path]) -> list[CheckpointTensor]:
    """Every tensor of the safetensors files ``paths``."""

    def reader(f: SafetensorsFile, name: str):
        def read(dtype):
            arr = f.get(name)
            if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != ml_dtypes.bfloat16:
                raise ValueError(f"{f.path}: tensor {name!r} has non-float dtype {arr.dtype}")
            return arr.astype(dtype, copy=False)
        return read

    files = [SafetensorsFile(f) for f in paths]
    return [CheckpointTensor(name, f.shape(name), f"{f.path}: tensor {name!r}", reader(f, name))
            for f in files for name in f.keys()]


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def _check_declared_layers(cfg: ModelConfig, tensors: list[CheckpointTensor], where: str) -> None:
    """The config's layer count must match the tensors before anything is built (a config that
    declares a million layers would otherwise build a million-block model before failing).
    Tensors the port skips (a vision tower's layers) do not count."""
    family = _family(cfg)
    found = {int(m.group(1)) for t in tensors
             if family.canonical_name(t.name, cfg) is not None and (m := _LAYER_INDEX.search(t.name))}
    if found != set(range(cfg.n_layers)):
        have = f"layers 0..{max(found)} ({len(found)} distinct)" if found else "no layer tensors"
        raise ValueError(f"{where}: the config declares {cfg.n_layers} layers but the checkpoint has {have}")


def build_model(cfg: ModelConfig, tensors: list[CheckpointTensor], where: str, dtype=jnp.float32) -> CausalLM:
    """The port for ``cfg`` filled from ``tensors`` (Hugging Face names). Every parameter slot must be
    filled and every tensor used; ``where`` names the checkpoint in errors."""
    dt = _parse_dtype(dtype)
    _check_declared_layers(cfg, tensors, where)
    family = _family(cfg)
    abstract = nnx.eval_shape(lambda: family(cfg, dtype=dt))
    graphdef, state = nnx.split(abstract)
    slots = dict(nnx.to_flat_state(state))
    names = family.checkpoint_names(cfg)
    filled: dict[tuple, str] = {}
    tied_copies: list[CheckpointTensor] = []
    for tensor in tqdm(tensors, desc=f"loading {cfg.model_type}", unit="tensor",
                       disable=len(tensors) < 200 or None):
        key = family.canonical_name(tensor.name, cfg)
        if key is None:
            continue
        if key == "__tied_lm_head__":
            tied_copies.append(tensor)
            continue
        if key not in names:
            raise ValueError(f"{tensor.origin} is not used by the {cfg.model_type} port (unexpected tensor)")
        path = names[key]
        if path in filled:
            raise ValueError(f"{tensor.origin} duplicates one already read from {filled[path]}")
        expected = tuple(slots[path].get_value().shape)
        if tensor.shape != expected:
            raise ValueError(f"{tensor.origin} has shape {tensor.shape}, expected {expected} from the config")
        slots[path].set_value(jnp.asarray(tensor.read(dt)))
        filled[path] = tensor.origin

    unfilled = [key for key, path in names.items() if path not in filled]
    if unfilled:
        shown = ", ".join(repr(k) for k in unfilled[:8]) + (" ..." if len(unfilled) > 8 else "")
        raise ValueError(f"{where}: checkpoint is missing {len(unfilled)} tensor(s) needed by the "
                         f"{cfg.model_type} port: {shown}")
    model = nnx.merge(graphdef, nnx.from_flat_state(slots))
    for tensor in tied_copies:
        if not np.array_equal(np.asarray(tensor.read(dt)), np.asarray(model.tied_embedding_matrix())):
            raise ValueError(f"{tensor.origin} differs from the input embedding but the config ties them")
    return model


def load_model(path: str | os.PathLike, dtype=jnp.float32) -> CausalLM:
    """Build the port for a checkpoint directory (``config.json`` + safetensors) or a ``.gguf`` file."""
    path = Path(path)
    if is_gguf(path):
        checkpoint = GGUFCheckpoint(path)
        cfg = config_from_dict(checkpoint.config, source=str(path))
        return build_model(cfg, checkpoint.tensors(), str(path), dtype)
    cfg = load_config(path)
    files = _safetensors_files(path)
    where = f"{path} (read {', '.join(f.name for f in files)})"
    return build_model(cfg, _safetensors_tensors(files), where, dtype)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The config of a checkpoint directory or ``.gguf`` file, without reading any weight (cheap checks
    of layers and widths before a model is loaded)."""
    path = Path(path)
    if is_gguf(path):
        return config_from_dict(GGUFCheckpoint(path).config, source=str(path))
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: invalid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    return config_from_dict(raw, source=str(config_path))


def load_tokenizer(directory: str | os.PathLike):
    """``transformers.AutoTokenizer`` for ``directory`` (never ``trust_remote_code``), or the tokenizer
    stored in a ``.gguf`` file. A missing pad token is set to the EOS token so that batches can be padded."""
    AutoTokenizer = transformers_module().AutoTokenizer

    if is_gguf(directory):
        return load_gguf_tokenizer(directory)
    present = [p.name for p in Path(directory).glob("*") if p.name in _TOKENIZER_FILES]
    if not present:  # transformers would build an empty tokenizer that fails much later
        raise FileNotFoundError(f"{directory}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - transformers raises many types here
        raise FileNotFoundError(f"{directory}: could not load a tokenizer ({type(err).__name__}: {err})") from err
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load(path_or_id: str | os.PathLike, dtype=jnp.float32, tokenizer: bool = True):
    """Load ``(model, tokenizer)`` from a local checkpoint directory, a ``.gguf`` file, or a hub id in
    the local HF cache.

    ``dtype``: float32 or bfloat16 (parameters and activations). With ``tokenizer=False`` the tokenizer
    is not loaded and None is returned in its place.
    """
    if is_gguf(path_or_id):
        model = load_model(path_or_id, dtype=dtype)
        return model, (load_gguf_tokenizer(path_or_id) if tokenizer else None)
    directory = resolve_checkpoint_dir(path_or_id)
    model = load_model(directory, dtype=dtype)
    return model, (load_tokenizer(directory) if tokenizer else None)
