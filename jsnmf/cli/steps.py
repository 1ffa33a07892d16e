"""The steps a command chains: extract a store, fit each layer (checkpointed, locked), write the report."""

from __future__ import annotations

import time
from pathlib import Path

from jsnmf.layout import RunLayout
from jsnmf.presets import PRESETS

from jsnmf.cli.options import NO_SPARSITY, UserError, say
from jsnmf.cli.processes import is_first, job, together

# Layers whose activations fit in memory together are fitted in memory; bigger ones are streamed.
IN_MEMORY_LIMIT_BYTES = 4 << 30


def step_extract(model: str, corpus: str, run_dir: Path, layers: list[int], args, progress: bool,
                 rank: int | None = None):
    """Extract into ``run_dir/store`` and return the store. ``rank``: the rank of the fit to follow,
    checked against the width (from the model's config, before loading it) and against the corpus'
    tokens (after tokenizing, before the forward pass).

    In a job of several processes every process calls this alike: ``extract`` shares the chunks out and
    process 0 completes the store; only process 0 looks at what the folder held before (to say it)."""
    from jsnmf.extract import extract

    hook = getattr(args, "hook", "hook_post")
    with together("checking the corpus and the options"):  # a process that cannot go on stops them all
        if not Path(corpus).expanduser().is_file():
            raise FileNotFoundError(f"corpus file not found: {corpus}")
        if args.keep_bos and not args.bos:
            raise UserError("--keep-bos keeps the BOS token's activations, but --no-bos leaves the BOS out: "
                            "use one or the other")
        if rank is not None:
            _check_rank_against_config(model, rank, hook)
    store_dir = RunLayout.of(run_dir).store
    overwrite = bool(getattr(args, "overwrite", False))
    before = _store_state(store_dir) if is_first() else None  # read before extract's first collective
    if overwrite and before is not None:
        say(f"--overwrite: replacing the store in {store_dir}")
    processes = f" by {job().count} processes" if job().count > 1 else ""
    say(f"extracting layers {','.join(map(str, layers))} of {model} on {corpus}{processes}")
    chunking = {} if getattr(args, "chunk_tokens", None) is None else {"chunk_tokens": args.chunk_tokens}
    store = extract(model, corpus, store_dir, layers=layers, max_length=args.max_length,
                    batch_size=args.batch_size, dtype=args.dtype, add_bos=args.bos, drop_bos=not args.keep_bos,
                    compute_dtype=getattr(args, "compute_dtype", "float32"), hook=hook, resume=not overwrite,
                    progress=progress, before_forward=None if rank is None else _rank_check(rank, hook),
                    **chunking)
    if before == "complete" and not overwrite:
        say(f"reused the store in {store.path}: it holds this model, corpus and settings already "
            "(--overwrite extracts again)")
    elif before == "partial" and not overwrite:
        say(f"resumed the interrupted extraction in {store.path}")
    return store


def _store_state(store_dir: Path) -> str | None:
    """``"complete"``, ``"partial"`` or None (no store) for the store folder ``store_dir``."""
    from jsnmf.store import MANIFEST, ActivationStore

    if not (store_dir / MANIFEST).is_file():
        return None
    try:
        return "complete" if ActivationStore.open(store_dir, allow_incomplete=True).complete else "partial"
    except ValueError:
        return "partial"  # damaged: extract says what is wrong with it


def _rank_message(rank: int, limit: int, why: str) -> str:
    return f"rank {rank} exceeds {why} = {limit}; choose --rank {limit} or less"


def _check_rank_against_config(model: str, rank: int, hook: str) -> None:
    """Refuse a rank wider than the layer, from the model's ``config.json`` alone (no weights read). A
    GGUF file (whose metadata takes as long to parse as loading it) or a model whose config cannot be
    read here is checked after tokenizing instead (``_rank_check``)."""
    from jsnmf.layout import hook_width
    from jsnmf.models.gguf import is_gguf
    from jsnmf.models.loading import load_config, resolve_checkpoint_dir

    if is_gguf(model):
        return
    try:
        config = load_config(resolve_checkpoint_dir(model))
    except (OSError, ValueError):
        return  # extract reports an unreadable model itself
    width = hook_width(hook, config.d_mlp, config.d_model)
    if rank > width:
        raise UserError(_rank_message(rank, width, f"the width of {hook} ({config.model_type})"))


def _rank_check(rank: int, hook: str):
    """``extract``'s ``before_forward``: refuse a rank above min(n_tokens, width) before the forward pass."""
    def check(n_tokens: int, width: int) -> None:
        if rank > min(n_tokens, width):
            raise UserError(_rank_message(rank, min(n_tokens, width),
                                          f"min(n_tokens, width) of the tokenized corpus ({n_tokens:,} tokens, "
                                          f"{hook} {width} wide)"))
    return check


def fit_settings(args, defaults: dict | None = None) -> dict:
    """SNMF keyword arguments from the options the user set (the estimator's defaults otherwise)."""
    settings = dict(defaults or {})
    if getattr(args, "preset", None):
        settings = {k: v for k, v in PRESETS[args.preset].params().items() if k != "rank"}
    for name in ("solver", "sparsity", "max_iter", "init", "seed", "tol", "patience"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = None if value == NO_SPARSITY else value
    return settings


def _finished_fit(path: Path, rank: int, settings: dict):
    """The SNMF saved at ``path`` when it was fitted with ``rank`` and ``settings``; else None."""
    from jsnmf.estimator import MANIFEST, SNMF

    if not (path / MANIFEST).is_file():
        return None
    model = SNMF.load(path)
    wanted = dict(settings, rank=rank)
    same = all(model.get_params().get(name) == value for name, value in wanted.items())
    return model if same else None


def step_fit(store, layers: list[int] | None, rank: int, settings: dict, snmf_dir: Path, progress: bool,
             resume: bool = False, checkpoint_every: int | None = None, on_device: bool | None = None) -> dict:
    """Fit one SNMF per layer, save each to ``snmf_dir/layer_{L:02d}``; return ``{layer: SNMF}``.

    While a layer fits, its state is checkpointed every ``checkpoint_every`` iterations into
    ``snmf_dir/layer_{L:02d}.fitting`` (removed once the layer is saved). ``resume``: continue the
    interrupted fits from their checkpoints and keep the layers already saved with these settings.
    ``on_device``: as ``SNMF.fit``'s; None keeps a small layer in memory and lets a larger one's fit choose.
    """
    from jsnmf.io.files import FolderLock

    layers = list(store.layers) if layers is None else list(layers)
    missing = [layer for layer in layers if layer not in store.layers]
    if missing:
        raise UserError(f"layer(s) {missing} are not in the store {store.path} (it holds layers {store.layers})")
    if rank > min(store.n_tokens, store.d_mlp):
        raise UserError(f"rank {rank} exceeds min(n_tokens, width) = {min(store.n_tokens, store.d_mlp)} of the store")
    layout = RunLayout.of(snmf_dir.parent)
    lock = None
    try:
        with together("locking the run folder"):  # one lock for the job, held by process 0
            if is_first():
                snmf_dir.mkdir(parents=True, exist_ok=True)
                lock = FolderLock(snmf_dir, busy="another jsnmf fit is running on this run folder; wait for it "
                                                 "to finish")
        # Every process decides from the folder as it is before any layer is fitted, so that a refusal
        # changes nothing and all processes of a job decide alike.
        with together("checking the run folder"):
            if not resume:
                _refuse_interrupted_fits([(layer, layout.fitting(layer, snmf_dir)) for layer in layers])
            resuming = {layer: resume and layout.fitting(layer, snmf_dir).exists() for layer in layers}
            kept = {layer: _finished_fit(layout.fitted(layer, snmf_dir), rank, settings)
                    for layer in layers if resume and not resuming[layer]}
        fitted = {}
        for layer in layers:
            if kept.get(layer) is not None:
                say(f"layer {layer}: already fitted ({layout.fitted(layer, snmf_dir)}); kept")
                fitted[layer] = kept[layer]
            else:
                fitted[layer] = _fit_layer(store, layer, rank, settings, layout.fitted(layer, snmf_dir),
                                           layout.fitting(layer, snmf_dir), progress, resume, resuming[layer],
                                           checkpoint_every, on_device)
        return fitted
    finally:
        if lock is not None:
            lock.release()


def _refuse_interrupted_fits(checkpoint_dirs) -> None:
    """UserError when a layer has complete checkpoints of an earlier fit (``--resume`` continues them)."""
    from jsnmf.checkpoint import completed_steps

    for layer, checkpoint_dir in checkpoint_dirs:
        if completed_steps(checkpoint_dir):
            raise UserError(f"layer {layer} has an interrupted fit in {checkpoint_dir}: pass --resume to continue "
                            "it, or delete that directory to start again")


def _fit_layer(store, layer: int, rank: int, settings: dict, saved_path: Path, checkpoint_dir: Path,
               progress: bool, resume: bool, resuming: bool, checkpoint_every: int | None,
               on_device: bool | None = None):
    """Fit one layer, save it, remove its checkpoints. ``resuming``: its checkpoints are there to continue.

    In a job of several processes every process fits its share of the tokens (the codes of its rows);
    the codes are gathered and process 0 saves the fit and removes the checkpoints."""
    import shutil

    from jsnmf.estimator import SNMF

    model = SNMF(rank, **settings)
    width = f"{store.d_mlp} neurons" if store.hook_site == "hook_post" else f"{store.d_mlp} ({store.hook_site})"
    shared = f" by {job().count} processes" if job().count > 1 else ""
    say(f"fitting layer {layer}{shared}: rank {rank}, {store.n_tokens:,} tokens × {width}"
        + (" (resuming)" if resuming else ""))
    started = time.perf_counter()
    run = dict(checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
               **({} if checkpoint_every is None else {"checkpoint_every": checkpoint_every}))
    try:
        X, where = _fit_input(store, layer, on_device)
        model.fit(X, **where, **run)
    except BaseException:
        if is_first():
            _drop_unstarted_checkpoints(checkpoint_dir)
        raise
    if job().count > 1:
        from jsnmf.distributed import gather_rows

        model.codes_ = gather_rows(model.codes_)  # every process's rows, in the store's order
    with together(f"saving layer {layer}"):
        if is_first():
            model.save(saved_path, source=store_source(store, layer))
            shutil.rmtree(checkpoint_dir)  # the saved factors are the result now
    say(f"  layer {layer}: relative error {model.relative_error_:.4f} after {model.n_iter_} iterations "
        f"({time.perf_counter() - started:.1f} s) -> {saved_path}")
    return model


def _fit_input(store, layer: int, on_device: bool | None = None) -> tuple[object, dict]:
    """``(X, keywords)`` for ``SNMF.fit`` of ``layer``: with ``on_device`` None, the activations in host
    memory when (this process's share of) them fit under IN_MEMORY_LIMIT_BYTES; else the store itself,
    held on the device or streamed as ``on_device`` and the fit decide (:mod:`jsnmf.fit.on_device`). In a
    job of several processes each takes its share: the rows ``[i·n/N, (i+1)·n/N)`` in host memory, or
    whole chunks of the store (:func:`jsnmf.distributed.process_token_range`)."""
    index, count = job().index, job().count
    if on_device is None and -(-store.n_tokens // count) * store.d_mlp * 4 <= IN_MEMORY_LIMIT_BYTES:
        if count == 1:
            return store.layer_array(layer), {}
        return store.read(layer, store.n_tokens * index // count, store.n_tokens * (index + 1) // count), {}
    if len(store.chunk_bounds) < count:
        raise UserError(f"the store {store.path} has {len(store.chunk_bounds)} chunk(s), fewer than the {count} "
                        "processes that share them: extract it with a smaller --chunk-tokens")
    return store, {"layer": layer, "on_device": on_device}


def _drop_unstarted_checkpoints(checkpoint_dir: Path) -> None:
    """After a failed fit: remove its checkpoint folder when it holds no complete checkpoint (a fit that
    failed before its first one leaves nothing to resume, and nothing behind)."""
    import shutil

    from jsnmf.checkpoint import completed_steps

    if checkpoint_dir.is_dir() and not completed_steps(checkpoint_dir):
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def store_source(store, layer: int) -> dict:
    """What a fit of ``layer`` on ``store`` came from: ``{"model", "layer", "hook"}`` (SNMF.save/export)."""
    model = store.manifest.get("model")
    name = (model.get("path_or_id") or model.get("path")) if isinstance(model, dict) else model
    return {"model": name, "layer": int(layer), "hook": store.hook_names[store.layers.index(layer)]}


def step_report(run_dir: Path, store_dir: Path, layers, args, progress: bool) -> Path:
    from jsnmf.report import ReportOptions, write_report
    from jsnmf.store import ActivationStore

    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    ActivationStore.open(store_dir)  # not a store: its error, before anything is said or written
    say("writing the report")
    options = ReportOptions(k_top=args.top_k, window=args.window, vocab=not args.no_vocab)
    return write_report(run_dir, store_dir=store_dir, layers=layers, options=options, progress=progress,
                        model_path=getattr(args, "model_override", None))


