"""Extract MLP activations (``blocks.{L}.mlp.hook_post``; or, with ``hook=``, ``blocks.{L}.hook_mlp_out``
or ``blocks.{L}.hook_resid_post``) of a corpus into an ActivationStore.

One forward pass captures every requested layer (it stops after the last one). Documents are
tokenized with the model's own tokenizer, the BOS prepended as the paper does for every family
(TransformerLens' ``prepend_bos``; ``add_bos`` changes that), truncated to ``max_length``, batched in
document order (``batch_size`` documents per batch) and right padded to a bucketed length
(:mod:`jsnmf.batches`), and the activations of real tokens (no padding; no BOS unless
``drop_bos=False``) are appended to the store in document order.

Resumable: batches are a pure function of the corpus and the settings, and the store commits
whole chunks atomically. A rerun after a kill reopens the store, finds the batch holding the
first uncommitted token, recomputes that batch and continues; every batch is computed with the
same shapes as in an uninterrupted run, so the result is byte-for-byte the same.

Data parallel: the forward runs on the devices of a mesh (every device of this process unless
``mesh=`` says otherwise), the parameters replicated on each, whole batches dealt out in turn (batch
``b`` on device ``b mod n``, one batch in flight per device) and written back in order. Whole batches,
not rows: XLA's results depend on the shapes it compiles for (on the CPU, a row of a 2-row matmul and
of a 16-row matmul differ in the last bits), so only a device running exactly the single-device
shapes gives the single-device bytes. The store is therefore byte-identical whatever the device
count, and a store can be resumed on another mesh.

Many processes (``jax.process_count() > 1``, under :func:`jsnmf.distributed.initialize`; every process
calls ``extract`` with the same arguments and ``out_dir`` on a file system they share): chunk ``i`` of
the store always holds tokens ``[i·chunk_tokens, (i+1)·chunk_tokens)``, so the chunks still to write
are split into one contiguous share per process. Each process runs the batches that cover its share
on its own devices (a batch that straddles two shares runs in both) and commits each chunk by a
record file (:class:`~jsnmf.store.writer.ChunkWriter`); process 0 opens the store, holds its lock and,
when every process is done, lists the recorded chunks in the manifest and completes it. The store is
byte-identical to the one-process store, and one killed at any point resumes with any number of
processes (the chunks committed by record count as done).

Test hook: the environment variable ``JSNMF_EXTRACT_SLEEP_PER_BATCH`` (seconds, float) makes
the loop sleep after each batch; the tests use it to kill an extraction deterministically
mid-way. It has no other effect.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jsnmf import models
from jsnmf.corpus import Corpus, read_corpus
from jsnmf.models.loading import resolve_checkpoint_dir
from jsnmf.dtypes import DTYPES
from jsnmf.layout import HOOK_SITES, hook_name, hook_width
from jsnmf.batches import Batch, BosPolicy, TokenPlan, bos_policy, bucket_length, make_batch, plan_tokens
from jsnmf.distributed import all_or_none, per_process
from jsnmf.kernels.sharded import DATA, check_mesh
from jsnmf.store import MANIFEST, ActivationStore, check_dtype, remove_store
from jsnmf.store.format import read_store_manifest
from jsnmf.store.writer import ChunkWriter, read_commit_records

__all__ = ["extract", "run_batches", "bucket_length", "STORE_CHUNK_TOKENS", "recorded_path"]

log = logging.getLogger(__name__)

STORE_CHUNK_TOKENS = 4096  # tokens per chunk file of the store (a streamed fit reads one at a time)
_SLEEP_ENV = "JSNMF_EXTRACT_SLEEP_PER_BATCH"
# Bump when batching, padding or token selection changes: a store started by another version is
# then not resumed (its remaining chunks would not match).
_PLAN_VERSION = 1


def extract(
    model_path_or_id: str | os.PathLike,
    corpus_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    layers: Sequence[int],
    max_length: int = 128,
    batch_size: int = 16,
    dtype: str = "float32",
    drop_bos: bool = True,
    add_bos: bool | None = True,
    chunk_tokens: int = STORE_CHUNK_TOKENS,
    compute_dtype: str = "float32",
    hook: str = "hook_post",
    resume: bool = True,
    progress: bool = True,
    before_forward: Callable[[int, int], None] | None = None,
    mesh: Mesh | None = None,
) -> ActivationStore:
    """Run ``model_path_or_id`` over the corpus and store the MLP activations of ``layers`` in ``out_dir``.

    ``dtype``: the store dtype ("float32", "float16", "bfloat16"). ``compute_dtype``: the dtype of
    the model's parameters and forward pass ("float32" or "bfloat16").
    ``add_bos``: True (the paper's way, default) starts every document with the model's BOS, whether
    or not its tokenizer adds one (Gemma/Llama tokenizers do, GPT-2's does not); None follows the
    tokenizer; False removes the BOS the tokenizer adds. ``drop_bos``: leave the BOS token's
    activations out of ``X`` (an attention-sink outlier, the same in every document) when a BOS is
    there. Padding never reaches ``X``. The manifest's ``"bos"`` entry records what was prepended and
    what was dropped.
    ``hook``: the capture point, by its TransformerLens site name: ``"hook_post"`` (the MLP
    activation, d_mlp wide, the paper's), ``"hook_mlp_out"`` or ``"hook_resid_post"`` (d_model wide);
    the store's ``hook_names`` and ``hook_site`` say which, its ``d_mlp`` is that width.
    ``before_forward(n_tokens, width)``: called after tokenization, before the first forward pass
    (and before anything is written), to refuse early what the tokens make impossible (e.g. a rank
    larger than ``min(n_tokens, width)``); it raises to stop.
    The model and tokenizer paths are recorded relative to the store's run folder when they lie in
    it (``ActivationStore.model_path`` resolves them), so a run folder can be moved.
    ``resume``: continue an interrupted extraction in ``out_dir`` (a store of a different corpus,
    model or settings is refused); with False an existing store in ``out_dir`` is replaced.
    ``mesh``: the devices of the forward pass, a ``jax.sharding.Mesh`` with an axis ``data`` whose positions
    (those of this process) take whole batches in turn, each holding a copy of the parameters; with
    more axes (e.g. ``Mesh(devices.reshape(4, 2), ("data", "model"))``) the devices of a position share
    one copy, sharded over them, for a model too large for one device. None: every device of this
    process, parameters replicated. The store is byte-identical whatever the ``data`` positions and
    the number of processes (the module docstring says how processes share the work); with sharded
    parameters XLA splits the matmuls, so the activations equal the one-device ones up to float
    rounding. The manifest records the device and process counts (``extract_devices``,
    ``extract_processes``) only as information; a resume may use others.
    Returns the finished store.
    """
    layers = _check_settings(layers, max_length, batch_size, dtype, chunk_tokens)
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {compute_dtype!r}")
    if hook not in HOOK_SITES:
        raise ValueError(f"hook must be one of {HOOK_SITES}, got {hook!r}")
    devices = extraction_devices(mesh)
    corpus = read_corpus(corpus_path)  # before loading the model: bad input fails fast
    out_dir = Path(out_dir).expanduser().resolve()

    model_dir = resolve_checkpoint_dir(model_path_or_id)
    model, tokenizer = models.load(model_dir, dtype=compute_dtype)
    config = model.config
    _check_layers(layers, config)
    if max_length > config.max_position_embeddings:
        raise ValueError(
            f"max_length={max_length} exceeds the model's {config.max_position_embeddings} positions"
        )
    bos = bos_policy(tokenizer, config, add_bos)
    plan = plan_tokens(corpus, tokenizer, bos, max_length, batch_size, drop_bos)
    _check_token_ids(plan, config)
    if plan.n_tokens == 0:
        raise ValueError(
            f"{corpus.path}: no tokens to extract after dropping BOS "
            f"(max_length={max_length}, drop_bos={drop_bos})"
        )
    if plan.n_truncated:
        log.warning("%d of %d documents were truncated to max_length=%d tokens",
                    plan.n_truncated, len(corpus), max_length)

    width = hook_width(hook, config.d_mlp, config.d_model)
    if before_forward is not None:
        before_forward(plan.n_tokens, width)
    meta = _manifest_meta(model_path_or_id, model_dir, config, tokenizer, corpus, bos, plan, layers, dtype,
                          compute_dtype, max_length, batch_size, drop_bos, chunk_tokens, add_bos,
                          run_dir=out_dir.parent, hook=hook)
    counts = {"extract_devices": int(per_process(sum(map(len, devices))).sum()), "extract_processes": jax.process_count()}
    with all_or_none("opening the store"):  # process 0 opens it; the others wait for it
        writer = (_open_writer(out_dir, meta, corpus, layers, width, dtype, chunk_tokens, resume, hook)
                  if jax.process_index() == 0 else None)
    if jax.process_count() == 1 and (writer is None or not writer.has_records):
        if writer is None:  # the store in out_dir is already complete
            return ActivationStore.open(out_dir)
        try:
            run_batches(model, plan, writer, layers, dtype, progress, hook, devices=devices)
            return writer.close(meta=counts)
        finally:
            writer.abort()
    try:
        return _extract_shares(model, plan, out_dir, writer, layers, dtype, progress, hook, devices, counts)
    finally:
        if writer is not None:  # unlocked also when another process failed: a retry here must not find it locked
            writer.abort()


def _extract_shares(model, plan: TokenPlan, out_dir: Path, writer, layers: list[int], dtype: str, progress: bool,
                    hook: str, devices: list, counts: dict) -> ActivationStore:
    """Every process writes its share of the chunks still to write (:func:`_share_of_chunks`) by record;
    then process 0 (the one holding ``writer``) lists them in the manifest and completes the store."""
    with all_or_none("reading the store"):
        manifest = _shared_manifest(out_dir)
        runs = [] if manifest["complete"] else _share_of_chunks(manifest, out_dir, plan.n_tokens)
    # Only now may anyone write: every process has seen the same committed chunks.
    with all_or_none("extracting its share of the chunks"):
        for first_chunk, stop_chunk in runs:
            chunk_writer = ChunkWriter(out_dir, manifest, first_chunk)
            try:
                run_batches(model, plan, chunk_writer, layers, dtype, progress, hook, devices=devices,
                            stop=min(stop_chunk * chunk_writer.chunk_tokens, plan.n_tokens))
                chunk_writer.finish()
            finally:
                chunk_writer.abort()
    with all_or_none("completing the store"):
        if writer is not None:
            writer.adopt_records()
            if writer.n_committed != plan.n_tokens:
                raise ValueError(f"{out_dir}: the processes committed {writer.n_committed} of "
                                 f"{plan.n_tokens} tokens without a gap; rerun the extraction to resume it")
            writer.close(meta=counts)
    return ActivationStore.open(out_dir)


def _shared_manifest(out_dir: Path) -> dict:
    try:
        return read_store_manifest(out_dir)
    except ValueError as err:
        raise ValueError(f"process {jax.process_index()} cannot read the store process 0 opened ({err}); every "
                         "process of a multi-process extraction needs out_dir on a file system they share") from None


def _share_of_chunks(manifest: dict, out_dir: Path, n_tokens: int) -> list[tuple[int, int]]:
    """This process's share of the chunks not committed yet (listed in the manifest or by a record), as
    runs ``[first, stop)`` of consecutive chunk indices (:func:`chunk_runs`)."""
    chunk_tokens = int(manifest["chunk_tokens"])
    done = {*range(len(manifest["chunks"])), *read_commit_records(out_dir, manifest)}
    todo = [i for i in range(-(-n_tokens // chunk_tokens)) if i not in done]
    return chunk_runs(todo, jax.process_index(), jax.process_count())


def chunk_runs(todo: list[int], process: int, n_processes: int) -> list[tuple[int, int]]:
    """Part ``process`` of ``todo`` (sorted chunk indices) cut into ``n_processes`` contiguous parts of
    (nearly) equal count, as runs ``[first, stop)`` of consecutive indices."""
    mine = todo[len(todo) * process // n_processes: len(todo) * (process + 1) // n_processes]
    runs: list[tuple[int, int]] = []
    for index in mine:
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


# ---------------------------------------------------------------- settings


def _check_settings(layers, max_length, batch_size, dtype, chunk_tokens) -> list[int]:
    check_dtype(dtype)
    for name, value in (("max_length", max_length), ("batch_size", batch_size), ("chunk_tokens", chunk_tokens)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(layers, (int, np.integer)):
        layers = [layers]
    layers = list(layers)
    if not layers or not all(isinstance(layer, (int, np.integer)) for layer in layers):
        raise ValueError(f"layers must be a non-empty list of integers, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers has duplicates: {layers}")
    return sorted(int(layer) for layer in layers)


def _check_layers(layers: list[int], config) -> None:
    bad = [layer for layer in layers if not 0 <= layer < config.n_layers]
    if bad:
        raise ValueError(
            f"layers {bad} are out of range: the {config.model_type} model has n_layers={config.n_layers} "
            f"(valid layers 0..{config.n_layers - 1})"
        )


def _check_token_ids(plan: TokenPlan, config) -> None:
    """Token ids the model has no embedding for (a tokenizer larger than the model's vocabulary), refused
    once for the whole corpus before any forward pass."""
    largest = max((int(s.max()) for s in plan.sequences if len(s)), default=0)
    if largest >= config.vocab_size:
        raise ValueError(f"the tokenizer produced token id {largest}, but the model's vocab_size is "
                         f"{config.vocab_size}: tokenizer and model do not match")


# ---------------------------------------------------------------- devices


def extraction_devices(mesh: Mesh | None) -> list[list]:
    """The groups of devices of this process that run the forward pass, one group per position of the
    mesh axis ``data`` (a group takes whole batches; its devices, along the mesh's other axes, hold one
    copy of the parameters sharded over them). For None: every device of this process, one per group."""
    if mesh is None:
        return [[device] for device in jax.local_devices()]
    check_mesh(mesh)
    by_position = np.moveaxis(mesh.devices, mesh.axis_names.index(DATA), 0).reshape(mesh.shape[DATA], -1)
    groups = []
    for position, group in enumerate(by_position):
        owners = {device.process_index for device in group}
        if len(owners) > 1:
            raise ValueError(f"the devices at position {position} of the mesh axis {DATA!r} belong to processes "
                             f"{sorted(owners)}: a copy of the parameters must lie within one process")
        if owners == {jax.process_index()}:
            groups.append(list(group))
    if not groups:
        raise ValueError(f"the extraction mesh holds no device of process {jax.process_index()} "
                         f"(axis {DATA!r}, {mesh.devices.size} devices); every process extracts on its own devices")
    return groups


PARAMETER_AXIS = "model"  # the axis of a device group's own mesh, over which its copy of the parameters is sharded


class Replica(NamedTuple):
    """One copy of the model on a group of devices, and where its inputs go (replicated over the group)."""

    model: object
    inputs: object  # a device, or a replicated NamedSharding over the group


def replicas(model, groups: list[list]) -> list[Replica]:
    """``model`` on each group of devices: on one device whole; on several, each parameter sharded over
    them (:func:`_parameter_spec`, XLA partitions the forward), for a model too large for one device."""
    graphdef, state = nnx.split(model)
    copies = []
    for group in groups:
        if len(group) == 1:
            copies.append(Replica(nnx.merge(graphdef, jax.device_put(state, group[0])), group[0]))
            continue
        group_mesh = Mesh(np.array(group), (PARAMETER_AXIS,))
        shardings = jax.tree.map(lambda a: NamedSharding(group_mesh, _parameter_spec(np.shape(a), len(group))), state)
        copies.append(Replica(nnx.merge(graphdef, jax.device_put(state, shardings)),
                              NamedSharding(group_mesh, PartitionSpec())))
    return copies


def _parameter_spec(shape: tuple, n_devices: int) -> PartitionSpec:
    """Shard a parameter along its last axis that ``n_devices`` divides (d_model, d_mlp and the vocabulary
    usually do), else keep it whole on every device (norm scales too small to matter)."""
    for axis in reversed(range(len(shape))):
        if shape[axis] % n_devices == 0 and shape[axis] >= n_devices:
            return PartitionSpec(*([None] * axis), PARAMETER_AXIS)
    return PartitionSpec()


# ---------------------------------------------------------------- the store


def _open_writer(out_dir: Path, meta: dict, corpus: Corpus, layers, d_mlp, dtype, chunk_tokens, resume: bool,
                 hook: str = "hook_post"):
    """The writer to continue or start the store in ``out_dir``; None if it is already complete."""
    if (out_dir / MANIFEST).is_file():
        if not resume:
            remove_store(out_dir)
        else:
            existing = ActivationStore.open(out_dir, allow_incomplete=True)
            _check_same_run(existing, meta)
            if existing.complete:
                return None
            return ActivationStore.resume(out_dir)
    return ActivationStore.create(
        out_dir, layers=layers, d_mlp=d_mlp, dtype=dtype, chunk_tokens=chunk_tokens, meta=meta,
        documents=corpus.documents, labels=corpus.labels, site=hook,
    )


def _check_same_run(existing: ActivationStore, meta: dict) -> None:
    old = existing.manifest.get("resume_identity")
    if not isinstance(old, dict):
        raise ValueError(f"{existing.path}: holds a store not made by jsnmf.extract; refusing to resume into it")
    new = meta["resume_identity"]  # what must match: a different value means a different result
    differences = [f"{key}: {old.get(key)!r} in the store, {new[key]!r} now" for key in new if old.get(key) != new[key]]
    if differences:
        raise ValueError(
            f"{existing.path}: refusing to resume, the store was made from a different run ("
            + "; ".join(differences) + "). Use another out_dir, or resume=False (CLI: --overwrite) to replace it."
        )


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _bos_record(bos: BosPolicy, add_bos: bool | None, plan: TokenPlan) -> dict:
    """What was done about BOS, in words a reader of the manifest needs: the policy asked for, whether
    jsnmf prepended a BOS or removed the tokenizer's, and what was dropped from ``X``."""
    policy = {True: "prepend", None: "tokenizer", False: "none"}[None if add_bos is None else bool(add_bos)]
    return {
        "policy": policy,
        "token_id": bos.token_id,
        "tokenizer_adds": bos.tokenizer_adds,
        "prepended": bos.present and not bos.tokenizer_adds,
        "removed": bos.tokenizer_adds and not bos.present,
        "present": bos.present,
        "dropped_from_x": plan.bos_dropped,
        "padding_dropped_from_x": True,
    }


def recorded_path(path: Path, run_dir: Path | None) -> str:
    """``path`` as a store records it: relative to the run folder (``run_dir``, the store's parent) when
    it lies inside it, so that the folder can be moved or shared; else absolute."""
    path = Path(path).resolve()
    if run_dir is not None:
        try:
            return path.relative_to(Path(run_dir).resolve()).as_posix()
        except ValueError:
            pass
    return str(path)


def _manifest_meta(model_path_or_id, model_dir: Path, config, tokenizer, corpus, bos, plan, layers, dtype,
                   compute_dtype, max_length, batch_size, drop_bos, chunk_tokens, add_bos=None,
                   run_dir: Path | None = None, hook: str = "hook_post") -> dict:
    model_dir = Path(model_dir).resolve()
    name_or_path = getattr(tokenizer, "name_or_path", None)
    tokenizer_dir = Path(name_or_path).resolve() if name_or_path and Path(name_or_path).is_dir() else model_dir
    config_sha = _file_sha256(model_dir / "config.json")
    tokenizer_sha = _file_sha256(tokenizer_dir / "tokenizer.json")
    tokenizer_info = {
        "path": recorded_path(tokenizer_dir, run_dir),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token_id": bos.token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "adds_bos": bos.tokenizer_adds,
        "tokenizer_json_sha256": tokenizer_sha,
    }
    identity = {
        "model": recorded_path(model_dir, run_dir), "model_config_sha256": config_sha, "model_type": config.model_type,
        "n_layers": config.n_layers, "d_mlp": config.d_mlp, "tokenizer_json_sha256": tokenizer_sha,
        "corpus_sha256": corpus.sha256, "layers": layers, "dtype": dtype, "max_length": max_length,
        "batch_size": batch_size, "drop_bos": drop_bos, "bos_present": bos.present, "chunk_tokens": chunk_tokens,
        "compute_dtype": compute_dtype, "plan_version": _PLAN_VERSION,
        **({} if hook == "hook_post" else {"hook_site": hook}),  # stores made before hooks resume as before
    }
    return {
        "model": {"path_or_id": (recorded_path(Path(model_path_or_id).expanduser(), run_dir)
                                 if Path(model_path_or_id).expanduser().exists() else str(model_path_or_id)),
                  "path": recorded_path(model_dir, run_dir),
                  "model_type": config.model_type,
                  "n_layers": config.n_layers, "d_model": config.d_model, "config_sha256": config_sha},
        "model_type": config.model_type,
        "corpus": {"path": corpus.path, "sha256": corpus.sha256, "format": corpus.format},
        "tokenizer": tokenizer_info,
        "max_length": max_length,
        "batch_size": batch_size,
        "compute_dtype": compute_dtype,
        "bos_present": bos.present,
        "drop_bos": drop_bos,
        "bos_dropped": plan.bos_dropped,
        "bos": _bos_record(bos, add_bos, plan),
        "n_tokens_expected": plan.n_tokens,
        "n_truncated_documents": plan.n_truncated,
        "resume_identity": identity,
    }


# ---------------------------------------------------------------- the loop


def run_batches(model, plan: TokenPlan, writer, layers: list[int], dtype: str, progress: bool,
                hook: str = "hook_post", devices: list | None = None, stop: int | None = None) -> None:
    """Run the batches holding tokens ``writer.n_tokens`` (the first it has not got) to ``stop`` (default:
    the last) and append those tokens' activations to ``writer``. ``devices``: this process's groups of
    devices (:func:`extraction_devices`; default: every device, one per group), each group given a copy of
    ``model``'s parameters (:func:`replicas`)."""
    start = writer.n_tokens
    stop = plan.n_tokens if stop is None else stop
    if start >= stop:
        return
    on_device = replicas(model, extraction_devices(None) if devices is None else devices)
    # The batches holding the first and the last token wanted.
    first = int(np.searchsorted(plan.batch_token_starts, start, side="right") - 1)
    last = int(np.searchsorted(plan.batch_token_starts, stop - 1, side="right") - 1)
    pad_id = 0  # any valid id: padded positions are masked out and never kept
    longest = max(len(s) for s in plan.sequences)  # buckets stop at the corpus's longest sequence
    sleep = float(os.environ.get(_SLEEP_ENV, "0") or 0)
    # Cast to a narrower store dtype on the device: half the copy to the host, and XLA's cast is
    # fast where NumPy's float32 -> float16 is slow (both round to nearest even: same bits).
    cast_on_device = DTYPES[dtype].itemsize < np.dtype(model.dtype).itemsize

    def forward(batch: Batch, replica: int):
        names = [hook_name(layer, hook) for layer in layers]
        ids, mask = jax.device_put((batch.input_ids, batch.attention_mask), on_device[replica].inputs)
        out = on_device[replica].model(ids, attention_mask=mask, capture=names,
                                 stop_at_layer=max(layers) + 1)  # runs blocks 0..max(layers) only
        acts = tuple(out.activations[name] for name in names)
        if not cast_on_device:
            return acts, None
        keep = np.zeros(batch.input_ids.shape, bool)
        keep[batch.rows, batch.cols] = True
        keep = jax.device_put(keep, on_device[replica].inputs)
        return _cast_and_max_abs(acts, keep, dtype)

    def kept(b: int) -> slice:  # the tokens of batch b within [start, stop), counted from its first
        batch_start = int(plan.batch_token_starts[b])
        return slice(max(start - batch_start, 0), stop - batch_start)

    one_process = jax.process_count() == 1
    bar = tqdm(total=plan.n_tokens if one_process else stop - start, initial=start if one_process else 0,
               unit="tok", unit_scale=True, desc="extract" if one_process else f"extract [{jax.process_index()}]",
               disable=not progress, dynamic_ncols=True)
    try:
        # One batch in flight per device: JAX dispatch is asynchronous, so the next forward on each
        # device runs while the oldest batch is copied to the host and handed to the store (which
        # commits in its own thread). Batch b runs on device (b - first) mod n; writes stay in order.
        pending: collections.deque = collections.deque()
        for b in range(first, last + 1):
            batch = make_batch(plan, b, pad_id, longest)
            pending.append((batch, forward(batch, (b - first) % len(on_device)), kept(b)))
            if len(pending) > len(on_device):
                _write_batch(writer, *pending.popleft(), layers, dtype, bar)
            if sleep:
                time.sleep(sleep)
        while pending:
            _write_batch(writer, *pending.popleft(), layers, dtype, bar)
    finally:
        bar.close()


@functools.partial(jax.jit, static_argnames=("dtype",))
def _cast_and_max_abs(acts: tuple, keep: jax.Array, dtype: str):
    """Activations cast to the store dtype, and each layer's largest |value| over kept tokens."""
    max_abs = tuple(jnp.max(jnp.where(keep[..., None], jnp.abs(a.astype(jnp.float32)), 0.0)) for a in acts)
    return tuple(a.astype(dtype) for a in acts), max_abs


def _write_batch(writer, batch: Batch, device_out, keep: slice, layers: list[int], dtype: str, bar) -> None:
    activations, max_abs = device_out
    if max_abs is not None:
        _check_range(np.asarray(max_abs), layers, dtype, batch)
    acts = {}
    for layer, values in zip(layers, activations):
        host = np.asarray(values)  # (batch_size, length, d_mlp)
        acts[layer] = host[batch.rows[keep], batch.cols[keep]]
    writer.append(acts, batch.token_ids[keep], batch.doc_index[keep], batch.cols[keep], batch.label_index[keep])
    bar.update(len(batch.token_ids[keep]))


def _check_range(max_abs: np.ndarray, layers: list[int], dtype: str, batch: Batch) -> None:
    """Say which layer overflows the store dtype (or is not finite), before the store sees infinities."""
    info = ml_dtypes.finfo(DTYPES[dtype])
    overflow_at = float(info.max) * (1 + 2.0 ** -(info.nmant + 1))  # rounds to inf from here on
    docs = f"documents {batch.doc_index.min()}..{batch.doc_index.max()}"
    for layer, value in zip(layers, max_abs):
        if not np.isfinite(value):
            raise ValueError(f"the model produced non-finite activations at layer {layer} ({docs})")
        if value >= overflow_at:
            raise ValueError(
                f"activations of layer {layer} overflow {dtype} (max |x| = {value:.4g}, {docs}); "
                "use dtype='bfloat16' or 'float32'"
            )
