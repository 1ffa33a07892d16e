"""A finished fit in a form anyone can read without jsnmf, JAX or orbax (the SAELens layout):

    <path>/features.safetensors   "F" (d_in × rank, float32): the feature directions, any sign;
                                  "G" (n_tokens × rank, float32, ≥ 0): the codes, when exported with them
    <path>/cfg.json               format, format_version, architecture "snmf", model_name, layer,
                                  hook_name, d_in, rank (d_sae, SAELens' name), sparsity, solver,
                                  n_tokens, dtype, jsnmf_version, params (every SNMF setting), n_iter,
                                  relative_error, sha256 of features.safetensors

Reading it back needs only safetensors::

    from safetensors.numpy import load_file            # or safetensors.torch
    F = load_file("export/layer_01/features.safetensors")["F"]

Both files are written atomically (``jsnmf.io.files``); ``cfg.json`` last, so a folder with a
``cfg.json`` is complete. orbax (``SNMF.save``) stays the form of checkpoints; this is the one to share.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from jsnmf import __version__
from jsnmf.io.files import atomic_write_bytes, atomic_write_json
from jsnmf.io.manifest import INTEGER, NUMBER, corrupt, read_manifest

__all__ = ["FORMAT", "VERSION", "FEATURES_FILE", "CFG_FILE", "is_export", "write_export", "read_export"]

FORMAT = "jsnmf.features"
VERSION = 1
FEATURES_FILE = "features.safetensors"
CFG_FILE = "cfg.json"
_TYPES = {"rank": INTEGER, "d_in": INTEGER, "params": dict, "n_iter": INTEGER, "relative_error": NUMBER,
          "features_sha256": str}


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`write_export`."""
    path = Path(path)
    return (path / CFG_FILE).is_file() and (path / FEATURES_FILE).is_file()


def write_export(path: str | os.PathLike, features: np.ndarray, codes: np.ndarray | None, *, params: dict,
                 facts: dict, source: dict | None = None, n_tokens: int | None = None) -> Path:
    """Write ``features`` (and ``codes`` when given) and ``cfg.json`` into folder ``path``; returns it.

    ``source``: what the fit was made from (``model``, ``layer``, ``hook``), each None when unknown.
    ``facts``: ``n_iter``, ``relative_error`` of the fit.
    """
    from safetensors.numpy import save

    path = Path(path).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"F": np.ascontiguousarray(features, dtype=np.float32)}
    if codes is not None:
        tensors["G"] = np.ascontiguousarray(codes, dtype=np.float32)
    data = save(tensors, metadata={"format": FORMAT})
    source = source or {}
    d_in, rank = tensors["F"].shape
    cfg = {
        "format": FORMAT,
        "format_version": VERSION,
        "architecture": "snmf",
        "model_name": source.get("model"),
        "layer": source.get("layer"),
        "hook_name": source.get("hook"),
        "d_in": int(d_in),
        "rank": int(rank),
        "d_sae": int(rank),
        "sparsity": params.get("sparsity"),
        "solver": params.get("solver"),
        "n_tokens": None if n_tokens is None else int(n_tokens),
        "dtype": "float32",
        "input_dtype": params.get("dtype"),
        "has_codes": codes is not None,
        "jsnmf_version": __version__,
        "params": params,
        "n_iter": int(facts["n_iter"]),
        "relative_error": float(facts["relative_error"]),
        "features_sha256": hashlib.sha256(data).hexdigest(),
    }
    atomic_write_bytes(path / FEATURES_FILE, data)
    atomic_write_json(path / CFG_FILE, cfg)
    return path


def read_export(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """``(cfg, {"F": ..., "G": ...})`` of an export (``G`` only when it was exported); checks the
    sha256 and the shapes against ``cfg.json``."""
    from safetensors.numpy import load

    path = Path(path).expanduser().absolute()
    cfg = read_manifest(path / CFG_FILE, format=FORMAT, version=VERSION, what="jsnmf features export",
                        missing_what="jsnmf features export", required=tuple(_TYPES), types=_TYPES)
    data = (path / FEATURES_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != cfg["features_sha256"]:
        raise ValueError(f"{path / FEATURES_FILE}: checksum mismatch with {CFG_FILE} (damaged or replaced)")
    arrays = load(data)
    F = arrays.get("F")
    if F is None or F.shape != (cfg["d_in"], cfg["rank"]):
        raise corrupt(path, f"'F' has shape {None if F is None else F.shape}, cfg.json says "
                            f"({cfg['d_in']}, {cfg['rank']})", CFG_FILE)
    G = arrays.get("G")
    if G is not None and (G.ndim != 2 or G.shape[1] != cfg["rank"]):
        raise corrupt(path, f"'G' has shape {G.shape}, expected (n_tokens, {cfg['rank']})", CFG_FILE)
    return cfg, arrays
