"""A fitted SNMF on disk: its arrays with orbax and a JSON manifest that says what they are.

    <path>/manifest.json   format, version, the estimator's params, shapes, dtypes and sha256
                           (``checksums``) of the arrays, n_iter, n_features_in, reconstruction_err,
                           relative_error, and ``source`` when known: the model, layer and hook
                           (``blocks.{L}.mlp.hook_post``) the activations came from
    <path>/arrays/         orbax StandardCheckpointer: features (d × k), codes (n × k), loss_history

Written into a staging directory beside ``path`` (``.<name>.tmp-<pid>``) and renamed into place, so a
kill never leaves a half checkpoint; a failed save removes its staging folder, and the next save
removes those of dead processes. Read back with one schema check of the manifest (keys, types, shapes against each
other and against the rank) and of the arrays against the manifest, each failure one ValueError
naming the checkpoint and the problem.

A saved SNMF holds host (NumPy) arrays, so writing and reading it is the business of one process: orbax
runs process-local (:func:`_checkpointer`), also under ``jax.distributed``, where one process (e.g. process
0) saves a fit and any process may load it on its own.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jsnmf import __version__
from jsnmf.io.digests import array_digests, check_digests
from jsnmf.io.files import atomic_write_json, is_live_pid
from jsnmf.io.manifest import INTEGER, NUMBER, corrupt, read_manifest

__all__ = ["FORMAT", "VERSION", "MANIFEST", "ARRAYS", "Saved", "read_saved", "write_saved"]

FORMAT = "jsnmf.SNMF"
VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays"

_REQUIRED = ("params", "shapes", "n_iter", "n_features_in", "reconstruction_err", "relative_error")
_TYPES = {"source": dict, "params": dict, "shapes": dict, "dtypes": dict, "checksums": dict, "n_iter": INTEGER, "n_features_in": INTEGER,
          "reconstruction_err": NUMBER, "relative_error": NUMBER}
_ARRAY_RANKS = {"features": 2, "codes": 2, "loss_history": 1}  # the arrays of a checkpoint, their ndim
FACTS = ("n_iter", "n_features_in", "reconstruction_err", "relative_error")


def write_saved(path: str | os.PathLike, params: dict, arrays: dict[str, np.ndarray], facts: dict,
                source: dict | None = None) -> Path:
    """Write ``arrays`` (features, codes, loss_history) and the manifest into directory ``path``;
    ``source``: ``{"model", "layer", "hook"}`` the activations came from (None: not recorded)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(path)
    staging = path.parent / f".{path.name}{_STAGING}{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:  # a full disk, an interrupt: leave no staging folder behind
        staging.mkdir()
        with _checkpointer(ocp) as checkpointer:
            checkpointer.save(staging / ARRAYS, arrays)
            checkpointer.wait_until_finished()
        manifest = {
            "format": FORMAT,
            "format_version": VERSION,
            "jsnmf_version": __version__,
            **({} if source is None else {"source": source}),
            "params": params,
            "shapes": {name: list(np.shape(a)) for name, a in arrays.items()},
            "dtypes": {name: str(np.asarray(a).dtype) for name, a in arrays.items()},
            **{name: facts[name] for name in FACTS},
            "checksums": array_digests({name: np.asarray(a) for name, a in arrays.items()}),
        }
        atomic_write_json(staging / MANIFEST, manifest)
        _replace_directory(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


@dataclass(frozen=True)
class Saved:
    """A checked manifest of a saved SNMF; :meth:`restore` reads its arrays."""

    path: Path
    params: dict
    shapes: dict[str, tuple[int, ...]]
    facts: dict
    checksums: dict  # empty for checkpoints saved before checksums were recorded
    source: dict | None = None  # {"model", "layer", "hook"} when the saver knew them

    def restore(self) -> dict[str, np.ndarray]:
        """The checkpoint's arrays (orbax), each with the shape the manifest gives."""
        import orbax.checkpoint as ocp

        where = self.path / ARRAYS
        if not where.is_dir():
            raise ValueError(f"{self.path}: damaged jsnmf SNMF checkpoint, {where.name}/ is missing")
        try:
            with _checkpointer(ocp) as checkpointer:
                arrays = checkpointer.restore(where)
        except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many kinds; all mean unreadable
            raise ValueError(f"{where}: unreadable checkpoint arrays ({type(err).__name__}: {err})") from None
        if not isinstance(arrays, dict) or set(arrays) != set(self.shapes):
            found = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
            raise ValueError(f"{where}: holds arrays {found}, expected {sorted(self.shapes)}")
        for name, shape in self.shapes.items():
            if tuple(np.shape(arrays[name])) != shape:
                raise ValueError(f"{where}: array {name!r} has shape {np.shape(arrays[name])}, "
                                 f"{MANIFEST} says {list(shape)}")
        arrays = {name: np.asarray(array) for name, array in arrays.items()}
        check_digests(arrays, self.checksums, where)
        return arrays


def _checkpointer(ocp):
    """An orbax StandardCheckpointer of this process alone: under several processes orbax would otherwise
    wait at barriers for all of them (a save by process 0 alone would hang or fail a collective)."""
    import jax

    index = jax.process_index()
    local = ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index},
                                               barrier_sync_key_prefix=f"jsnmf-saved-{index}")
    return ocp.StandardCheckpointer(multiprocessing_options=local)


def read_saved(path: str | os.PathLike) -> Saved:
    """The checked manifest of the SNMF saved at ``path``."""
    path = Path(path).absolute()
    manifest = read_manifest(path / MANIFEST, format=FORMAT, version=VERSION, what="jsnmf SNMF checkpoint",
                             missing_what="jsnmf checkpoint", required=_REQUIRED, types=_TYPES)
    shapes = _checked_shapes(manifest, path)
    return Saved(path, dict(manifest["params"]), shapes, {name: manifest[name] for name in FACTS},
                 dict(manifest.get("checksums") or {}), manifest.get("source"))


def _checked_shapes(manifest: dict, path: Path) -> dict[str, tuple[int, ...]]:
    """The manifest's ``shapes``, checked against each other, ``params.rank`` and ``n_features_in``."""
    shapes = manifest["shapes"]
    if set(shapes) != set(_ARRAY_RANKS):
        raise corrupt(path, f"'shapes' names {sorted(shapes)}, expected {sorted(_ARRAY_RANKS)}", MANIFEST)
    for name, ndim in _ARRAY_RANKS.items():
        shape = shapes[name]
        if not (isinstance(shape, list) and len(shape) == ndim
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise corrupt(path, f"shape of {name!r} is {shape!r}, expected {ndim} non-negative integers", MANIFEST)
    rank = manifest["params"].get("rank")
    (d, k_features), (_, k_codes) = shapes["features"], shapes["codes"]
    if not rank == k_features == k_codes:
        raise corrupt(path, f"rank {rank!r} does not match the shapes of features {shapes['features']} and "
                            f"codes {shapes['codes']}", MANIFEST)
    if manifest["n_features_in"] != d:
        raise corrupt(path, f"n_features_in {manifest['n_features_in']} does not match features "
                            f"{shapes['features']}", MANIFEST)
    return {name: tuple(shape) for name, shape in shapes.items()}


_STAGING = ".tmp-"  # .<name>.tmp-<pid>: a save in progress; .<name>.old-<pid>: the checkpoint it replaces


def _remove_stale_staging(path: Path) -> None:
    """Remove what saves into ``path`` killed (or failed without cleaning up) left: staging folders of
    processes that no longer run. A live writer's folder is left alone."""
    for entry in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = entry.name[len(path.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and (int(pid) == os.getpid() or not is_live_pid(int(pid))):
            if kind == "old" and not path.exists():
                continue  # killed between its two renames: the old checkpoint is the only one; keep it
            shutil.rmtree(entry, ignore_errors=True)


def _replace_directory(staging: Path, path: Path) -> None:
    """Move a finished ``staging`` directory to ``path``, replacing what is there."""
    if path.exists():
        retired = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, retired)
        os.replace(staging, path)
        shutil.rmtree(retired)
    else:
        os.replace(staging, path)
