"""``jsnmf extract``, ``fit``, ``report`` and ``run`` (the offline demo when ``run`` has no model)."""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path

from jsnmf.io.files import atomic_write_json
from jsnmf.layout import RunLayout
from jsnmf.presets import PRESETS

from jsnmf.cli.options import DEFAULT_RUNS_DIR, UserError, say
from jsnmf.cli.processes import is_first, together
from jsnmf.cli.steps import fit_settings, step_extract, step_fit, step_report, store_source


def cmd_extract(args) -> int:
    """Also one process of a job (jsnmf.cli.processes): every process extracts its share into the one store,
    process 0 alone clears the run folder (--overwrite) and narrates."""
    run_dir = Path(args.out).expanduser().resolve()
    if args.overwrite:
        with together("clearing the run folder"):
            if is_first():
                _clear_run_outputs(run_dir)
    store = step_extract(args.model, args.corpus, run_dir, args.layers, args, not args.quiet)
    say(f"store: {store.path} ({store.n_tokens:,} tokens, layers {store.layers})")
    return 0


def _open_store(path):
    from jsnmf.store import ActivationStore

    return ActivationStore.open(Path(path).expanduser())


def cmd_fit(args) -> int:
    if args.rank is None and args.preset is None:
        raise UserError("fit needs --rank (the number of features) or --preset")
    rank = args.rank if args.rank is not None else PRESETS[args.preset].settings["rank"]
    with together("opening the store"):  # e.g. a store not on a disk every process shares stops them all
        store = _open_store(args.store)
    snmf_dir = RunLayout.of_store(store.path).snmf
    step_fit(store, args.layers, rank, fit_settings(args), snmf_dir, not args.quiet, resume=args.resume,
             checkpoint_every=args.checkpoint_every, on_device={"auto": None, "yes": True, "no": False}[args.on_device])
    say(f"checkpoints: {snmf_dir}")
    return 0


def cmd_report(args) -> int:
    if args.window < 0:
        raise UserError(f"--window must be >= 0, got {args.window}")
    if args.run:
        run_dir = Path(args.run).expanduser().resolve()
        store_dir = RunLayout.of(run_dir).store
    else:
        store_dir = Path(args.store).expanduser().resolve()
        run_dir = store_dir.parent
    args.model_override = args.model
    index = step_report(run_dir, store_dir, args.layers, args, not args.quiet)
    say(f"report: {index}")
    return 0


def cmd_export(args) -> int:
    """Each fitted layer of the run as ``features.safetensors`` + ``cfg.json`` (``SNMF.export``)."""
    from jsnmf.estimator import SNMF
    from jsnmf.layout import layer_dir_name

    run = RunLayout.of(Path(args.run).expanduser().resolve())
    if not run.root.is_dir():
        raise FileNotFoundError(f"run directory not found: {run.root}")
    store = _open_store(run.store)
    layers = args.layers if args.layers is not None else [l for l in store.layers if run.fitted(l).is_dir()]
    missing = [layer for layer in layers if not run.fitted(layer).is_dir()]
    if missing:
        raise FileNotFoundError(f"layer(s) {missing} are not fitted: no {run.fitted(missing[0])}")
    if not layers:
        raise FileNotFoundError(f"no fitted layers in {run.snmf} (run `jsnmf fit` first)")
    out = Path(args.out).expanduser().resolve() if args.out else run.root / "export"
    for layer in layers:
        model = SNMF.load(run.fitted(layer))
        path = model.export(out / layer_dir_name(layer), codes=args.codes, source=store_source(store, layer),
                            n_tokens=store.n_tokens)
        say(f"layer {layer}: {path}")
    return 0


def _model_name(model: str) -> str:
    name = Path(model.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def _default_run_dir(name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(DEFAULT_RUNS_DIR) / f"{name}-{stamp}"


def cmd_run(args) -> int:
    if args.window < 0:
        raise UserError(f"--window must be >= 0, got {args.window}")
    if args.model is None:
        return run_demo(args)
    if args.corpus is None:
        raise UserError("run --model needs --corpus (a text, JSONL or JSON file of documents)")
    if args.layers is None:
        raise UserError("run --model needs --layers (e.g. --layers 0,6,11)")
    if not Path(args.corpus).expanduser().is_file():
        raise FileNotFoundError(f"corpus file not found: {args.corpus}")
    rank = args.rank if args.rank is not None else 100  # the paper's default K
    run_dir = Path(args.out or _default_run_dir(_model_name(args.model))).expanduser().resolve()
    say(f"run directory: {run_dir}")
    progress = not args.quiet
    if args.overwrite:
        _clear_run_outputs(run_dir)
    store = step_extract(args.model, args.corpus, run_dir, args.layers, args, progress, rank=rank)
    step_fit(store, args.layers, rank, fit_settings(args), RunLayout.of(run_dir).snmf, progress,
             checkpoint_every=getattr(args, "checkpoint_every", None))
    index = step_report(run_dir, store.path, args.layers, args, progress)
    _print_places(run_dir, store, args.layers, index)
    return 0


def _clear_run_outputs(run_dir: Path) -> None:
    """``--overwrite``: remove what was made from the old store (fits, checkpoints, report, evaluation,
    export); the store itself is replaced by the extraction. Nothing else in the folder is touched."""
    import shutil

    run = RunLayout.of(run_dir)
    removed = [p for p in (run.snmf, run.report, run.root / "export") if p.is_dir()]
    for path in removed:
        shutil.rmtree(path)
    if run.evaluation.is_file():
        run.evaluation.unlink()
        removed.append(run.evaluation)
    if removed:
        say(f"--overwrite: removed {', '.join(p.name for p in removed)} of {run_dir}")


def _print_places(run_dir: Path, store, layers, index: Path) -> None:

    say(f"store:       {store.path}")
    for layer in layers:
        say(f"checkpoint:  {RunLayout.of(run_dir).fitted(layer)}")
    say(f"report:      {index}")


def run_demo(args) -> int:
    """``jsnmf run`` without ``--model``: build the demo model, run everything, check the concepts."""
    from jsnmf import demo

    if args.corpus is not None:
        raise UserError("--corpus needs --model; the demo (no --model) uses its own corpus")
    started = time.perf_counter()
    run_dir = Path(args.out or Path(DEFAULT_RUNS_DIR) / "demo").expanduser().resolve()
    layers = args.layers if args.layers is not None else list(demo.DEMO_LAYERS)
    rank = args.rank if args.rank is not None else demo.DEMO_RANK
    settings = fit_settings(args, {"sparsity": demo.DEMO_SPARSITY, "max_iter": demo.DEMO_MAX_ITER,
                                   "init": demo.DEMO_INIT})
    progress = not args.quiet
    say(f"jsnmf demo: a tiny GPT-2 with {len(demo.CONCEPTS)} planted concepts; run directory {run_dir}")
    model_dir = demo.build_demo_model(run_dir / "demo-model")
    n_layers = demo.read_planted(model_dir)["spec"]["n_layer"]
    if args.overwrite:
        _clear_run_outputs(run_dir)
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise UserError(f"layer(s) {bad} do not exist: the demo model has {n_layers} layers (0-{n_layers - 1})")
    store = step_extract(str(model_dir), str(demo.demo_corpus_path()), run_dir, layers, args, progress, rank=rank)
    fitted = step_fit(store, layers, rank, settings, RunLayout.of(run_dir).snmf, progress)
    index = step_report(run_dir, store.path, layers, args, progress)
    recovered, total, per_layer = _demo_recovery(model_dir, store, fitted)
    atomic_write_json(run_dir / "recovery.json", {"recovered": recovered, "total": total, "layers": per_layer})
    _print_places(run_dir, store, layers, index)
    for layer, result in per_layer.items():
        missing = [name for name, c in result["concepts"].items() if not c["recovered"]]
        note = f" (missing: {', '.join(missing)})" if missing else ""
        say(f"layer {layer}: {result['recovered']}/{result['total']} concepts{note}")
    say(f"demo finished in {time.perf_counter() - started:.0f} s")
    say(f"recovered {recovered}/{total} planted concepts")
    return 0


def _demo_recovery(model_dir: Path, store, fitted: dict) -> tuple[int, int, dict]:
    from jsnmf import demo
    from jsnmf.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    per_layer = {}
    for layer, model in fitted.items():
        per_layer[str(layer)] = demo.recovery_from_codes(model.codes_, store.token_ids, tokenizer.decode)
    recovered = sum(r["recovered"] for r in per_layer.values())
    total = sum(r["total"] for r in per_layer.values())
    return recovered, total, per_layer


