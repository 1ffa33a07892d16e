"""The ``jsnmf`` command line: extract → fit → report, or all three with ``jsnmf run``.

    jsnmf run --model gpt2 --corpus prompts.jsonl --layers 0,6,11 --rank 100
    jsnmf run                                   # the offline demo (planted concepts)
    jsnmf extract --model M --corpus C --layers 0,6,11 --out RUN
    jsnmf fit --store RUN/store --layers 0,6,11 --rank 100
    jsnmf report --run RUN

A run directory holds ``store/`` (the ActivationStore), ``snmf/layer_{L:02d}/`` (``SNMF.save``
checkpoints) and ``report/`` (``index.html`` and one page per layer). User errors (bad arguments,
missing files, layers the model does not have) print one ``jsnmf: error: ...`` line and exit with 2.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from jsnmf.io.files import atomic_write_json
from jsnmf.dtypes import DTYPES
from jsnmf.fit.starts import INITIALIZERS
from jsnmf.kernels.solvers import get_solver, solver_names
from jsnmf.layout import RunLayout
from jsnmf.presets import PRESETS

__all__ = ["main", "build_parser"]

PROG = "jsnmf"
DEFAULT_RUNS_DIR = "jsnmf-runs"
# Layers whose activations fit in memory together are fitted in memory; bigger ones are streamed.
IN_MEMORY_LIMIT_BYTES = 4 << 30


class UserError(ValueError):
    """A problem with what the user asked for; reported in one line, exit status 2."""


# ---------------------------------------------------------------- argument types


def layer_list(text: str) -> list[int]:
    """``"0,6,11"`` -> ``[0, 6, 11]`` (distinct non-negative integers)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list of layer numbers, e.g. 0,6,11")
    try:
        layers = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers like 0,6,11, got {text!r}") from None
    if any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"layer numbers must be >= 0, got {text!r}")
    if len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"layer numbers repeat in {text!r}")
    return layers


def _number(text: str, kind, accept, expected: str, must: str):
    """``kind(text)`` if ``accept`` holds for it; else an argparse error saying what was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"must be {must}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "an integer", ">= 1")


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]", "in (0, 1]")


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line ``jsnmf: error: ...`` of every other user error (exit 2)."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _add_extract_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-length", type=positive_int, default=128, help="truncate documents to this many tokens (128)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="documents per forward pass (16)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="precision of the stored activations (float32)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True,
                   help="start every document with the model's BOS, as the paper does for every family (default); "
                        "--no-bos: no BOS at all (the tokenizer's own is removed)")
    p.add_argument("--keep-bos", action="store_true",
                   help="keep the BOS token's activations in X (dropped by default, like the padding)")


def _add_fit_options(p: argparse.ArgumentParser, rank_help: str) -> None:
    p.add_argument("--rank", type=positive_int, default=None, help=f"number of features k{rank_help}")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a named set of hyperparameters (paper: the paper's fit, see jsnmf.presets); "
                        "the options below override it")
    p.add_argument("--solver", choices=solver_names(), default=None,
                   help="codes solver (mu, the paper's): " + "; ".join(f"{s}: {get_solver(s).summary}"
                                                                         for s in solver_names()))
    p.add_argument("--sparsity", type=fraction, default=None,
                   help="fraction of neurons kept per feature (0.01, the paper's)")
    p.add_argument("--max-iter", type=positive_int, default=None, help="iteration cap (1000)")
    p.add_argument("--init", choices=tuple(INITIALIZERS), default=None, help="initialization (random)")
    p.add_argument("--seed", type=int, default=None, help="initialization seed (0)")
    p.add_argument("--tol", type=float, default=None,
                   help="an improvement of the loss counts when larger than tol·‖X‖² (1e-6)")
    p.add_argument("--patience", type=positive_int, default=None,
                   help="stop after this many iterations without one (100)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None,
                   help="checkpoint a running fit every this many iterations (50)")


def _add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-k", type=positive_int, default=25, help="top-activating tokens shown per feature (25)")
    p.add_argument("--window", type=int, default=15, help="context tokens on each side (15)")
    p.add_argument("--no-vocab", action="store_true", help="skip the vocabulary projections (no model load)")


def build_parser() -> argparse.ArgumentParser:
    """The ``jsnmf`` argument parser (sub-commands extract, fit, report, run)."""
    parser = _Parser(
        prog=PROG, description="Find interpretable features in language-model MLPs with SNMF.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    quiet = _Parser(add_help=False)  # -q also after the command; SUPPRESS keeps an earlier -q
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")

    p = sub.add_parser("extract", parents=[quiet], help="store MLP activations of a corpus")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (local HF cache)")
    p.add_argument("--corpus", required=True, help="text (one document a line), JSONL or JSON file")
    p.add_argument("--layers", type=layer_list, required=True, help="comma-separated layers, e.g. 0,6,11")
    p.add_argument("--out", required=True, help="run directory (the store goes to OUT/store)")
    _add_extract_options(p)

    p = sub.add_parser("fit", parents=[quiet], help="fit SNMF to the stored activations of each layer")
    p.add_argument("--store", required=True, help="activation store directory (RUN/store)")
    p.add_argument("--layers", type=layer_list, default=None, help="layers to fit (all in the store)")
    _add_fit_options(p, rank_help=" (required unless --preset)")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted fits from their checkpoints; keep layers already fitted")

    p = sub.add_parser("report", parents=[quiet], help="write the HTML report of a run")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="run directory (holds store/ and snmf/)")
    where.add_argument("--store", help="activation store directory (checkpoints in its parent's snmf/)")
    p.add_argument("--layers", type=layer_list, default=None, help="layers to report (all fitted)")
    _add_report_options(p)

    p = sub.add_parser("run", parents=[quiet], help="extract, fit and report in one go (no --model: the offline demo)")
    p.add_argument("--model", default=None, help="checkpoint directory or hub id; leave out for the demo")
    p.add_argument("--corpus", default=None, help="corpus file (required with --model)")
    p.add_argument("--layers", type=layer_list, default=None, help="comma-separated layers, e.g. 0,6,11")
    p.add_argument("--out", default=None, help=f"run directory (default ./{DEFAULT_RUNS_DIR}/<model>-<time>)")
    _add_extract_options(p)
    _add_fit_options(p, rank_help=" (100, the paper's; the demo: 16)")
    _add_report_options(p)

    from jsnmf.cli_evaluate import add_parsers  # evaluate, steer (their own module)
    add_parsers(sub, quiet)
    return parser


# ---------------------------------------------------------------- steps


def _say(*parts) -> None:
    print(*parts, flush=True)


def step_extract(model: str, corpus: str, run_dir: Path, layers: list[int], args, progress: bool):
    """Extract into ``run_dir/store`` and return the store."""
    from jsnmf.extract import extract

    if not Path(corpus).expanduser().is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus}")
    if args.keep_bos and not args.bos:
        raise UserError("--keep-bos keeps the BOS token's activations, but --no-bos leaves the BOS out: "
                        "use one or the other")
    _say(f"extracting layers {','.join(map(str, layers))} of {model} on {corpus}")
    return extract(model, corpus, RunLayout.of(run_dir).store, layers=layers, max_length=args.max_length,
                   batch_size=args.batch_size, dtype=args.dtype, add_bos=args.bos, drop_bos=not args.keep_bos,
                   progress=progress)


def fit_settings(args, defaults: dict | None = None) -> dict:
    """SNMF keyword arguments from the options the user set (the estimator's defaults otherwise)."""
    settings = dict(defaults or {})
    if getattr(args, "preset", None):
        settings = {k: v for k, v in PRESETS[args.preset].params().items() if k != "rank"}
    for name in ("solver", "sparsity", "max_iter", "init", "seed", "tol", "patience"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
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
             resume: bool = False, checkpoint_every: int | None = None) -> dict:
    """Fit one SNMF per layer, save each to ``snmf_dir/layer_{L:02d}``; return ``{layer: SNMF}``.

    While a layer fits, its state is checkpointed every ``checkpoint_every`` iterations into
    ``snmf_dir/layer_{L:02d}.fitting`` (removed once the layer is saved). ``resume``: continue the
    interrupted fits from their checkpoints and keep the layers already saved with these settings.
    """
    from jsnmf.io.files import FolderLock

    layers = list(store.layers) if layers is None else list(layers)
    missing = [layer for layer in layers if layer not in store.layers]
    if missing:
        raise UserError(f"layer(s) {missing} are not in the store {store.path} (it holds layers {store.layers})")
    if rank > min(store.n_tokens, store.d_mlp):
        raise UserError(f"rank {rank} exceeds min(n_tokens, d_mlp) = {min(store.n_tokens, store.d_mlp)} of the store")
    snmf_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(snmf_dir, busy="another jsnmf fit is running on this run folder; wait for it to finish")
    try:
        layout = RunLayout.of(snmf_dir.parent)
        if not resume:  # before any layer is fitted, so that a refusal changes nothing
            _refuse_interrupted_fits([(layer, layout.fitting(layer, snmf_dir)) for layer in layers])
        return {layer: _fit_layer(store, layer, rank, settings, layout.fitted(layer, snmf_dir),
                                  layout.fitting(layer, snmf_dir), progress, resume, checkpoint_every)
                for layer in layers}
    finally:
        lock.release()


def _refuse_interrupted_fits(checkpoint_dirs) -> None:
    """UserError when a layer has complete checkpoints of an earlier fit (``--resume`` continues them)."""
    from jsnmf.checkpoint import completed_steps

    for layer, checkpoint_dir in checkpoint_dirs:
        if completed_steps(checkpoint_dir):
            raise UserError(f"layer {layer} has an interrupted fit in {checkpoint_dir}: pass --resume to continue "
                            "it, or delete that directory to start again")


def _fit_layer(store, layer: int, rank: int, settings: dict, saved_path: Path, checkpoint_dir: Path,
               progress: bool, resume: bool, checkpoint_every: int | None):
    """Fit one layer (or keep it, ``resume`` and already fitted), save it, remove its checkpoints."""
    import shutil

    from jsnmf.estimator import SNMF

    if resume and not checkpoint_dir.exists():
        finished = _finished_fit(saved_path, rank, settings)
        if finished is not None:
            _say(f"layer {layer}: already fitted ({saved_path}); kept")
            return finished
    model = SNMF(rank, **settings)
    _say(f"fitting layer {layer}: rank {rank}, {store.n_tokens:,} tokens × {store.d_mlp} neurons"
         + (" (resuming)" if resume and checkpoint_dir.exists() else ""))
    started = time.perf_counter()
    run = dict(checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
               **({} if checkpoint_every is None else {"checkpoint_every": checkpoint_every}))
    try:
        if store.n_tokens * store.d_mlp * 4 <= IN_MEMORY_LIMIT_BYTES:
            model.fit(store.layer_array(layer), **run)
        else:  # streamed from disk, one pass over the chunks per iteration
            model.fit(store, layer=layer, **run)
    except BaseException:
        _drop_unstarted_checkpoints(checkpoint_dir)
        raise
    path = model.save(saved_path)
    shutil.rmtree(checkpoint_dir)  # the saved factors are the result now
    _say(f"  layer {layer}: relative error {model.relative_error_:.4f} after {model.n_iter_} iterations "
         f"({time.perf_counter() - started:.1f} s) -> {path}")
    return model


def _drop_unstarted_checkpoints(checkpoint_dir: Path) -> None:
    """After a failed fit: remove its checkpoint folder when it holds no complete checkpoint (a fit that
    failed before its first one leaves nothing to resume, and nothing behind)."""
    import shutil

    from jsnmf.checkpoint import completed_steps

    if checkpoint_dir.is_dir() and not completed_steps(checkpoint_dir):
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def step_report(run_dir: Path, store_dir: Path, layers, args, progress: bool) -> Path:
    from jsnmf.report import ReportOptions, write_report

    _say("writing the report")
    options = ReportOptions(k_top=args.top_k, window=args.window, vocab=not args.no_vocab)
    return write_report(run_dir, store_dir=store_dir, layers=layers, options=options, progress=progress)


# ---------------------------------------------------------------- commands


def cmd_extract(args) -> int:
    run_dir = Path(args.out).expanduser().resolve()
    store = step_extract(args.model, args.corpus, run_dir, args.layers, args, not args.quiet)
    _say(f"store: {store.path} ({store.n_tokens:,} tokens, layers {store.layers})")
    return 0


def _open_store(path):
    from jsnmf.store import ActivationStore

    return ActivationStore.open(Path(path).expanduser())


def cmd_fit(args) -> int:
    if args.rank is None and args.preset is None:
        raise UserError("fit needs --rank (the number of features) or --preset")
    rank = args.rank if args.rank is not None else PRESETS[args.preset].settings["rank"]
    store = _open_store(args.store)
    snmf_dir = RunLayout.of_store(store.path).snmf
    step_fit(store, args.layers, rank, fit_settings(args), snmf_dir, not args.quiet, resume=args.resume,
             checkpoint_every=args.checkpoint_every)
    _say(f"checkpoints: {snmf_dir}")
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
    index = step_report(run_dir, store_dir, args.layers, args, not args.quiet)
    _say(f"report: {index}")
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
    _say(f"run directory: {run_dir}")
    progress = not args.quiet
    store = step_extract(args.model, args.corpus, run_dir, args.layers, args, progress)
    step_fit(store, args.layers, rank, fit_settings(args), RunLayout.of(run_dir).snmf, progress,
             checkpoint_every=getattr(args, "checkpoint_every", None))
    index = step_report(run_dir, store.path, args.layers, args, progress)
    _print_places(run_dir, store, args.layers, index)
    return 0


def _print_places(run_dir: Path, store, layers, index: Path) -> None:

    _say(f"store:       {store.path}")
    for layer in layers:
        _say(f"checkpoint:  {RunLayout.of(run_dir).fitted(layer)}")
    _say(f"report:      {index}")


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
    _say(f"jsnmf demo: a tiny GPT-2 with {len(demo.CONCEPTS)} planted concepts; run directory {run_dir}")
    model_dir = demo.build_demo_model(run_dir / "demo-model")
    n_layers = demo.read_planted(model_dir)["spec"]["n_layer"]
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise UserError(f"layer(s) {bad} do not exist: the demo model has {n_layers} layers (0-{n_layers - 1})")
    store = step_extract(str(model_dir), str(demo.demo_corpus_path()), run_dir, layers, args, progress)
    fitted = step_fit(store, layers, rank, settings, RunLayout.of(run_dir).snmf, progress)
    index = step_report(run_dir, store.path, layers, args, progress)
    recovered, total, per_layer = _demo_recovery(model_dir, store, fitted)
    atomic_write_json(run_dir / "recovery.json", {"recovered": recovered, "total": total, "layers": per_layer})
    _print_places(run_dir, store, layers, index)
    for layer, result in per_layer.items():
        missing = [name for name, c in result["concepts"].items() if not c["recovered"]]
        note = f" (missing: {', '.join(missing)})" if missing else ""
        _say(f"layer {layer}: {result['recovered']}/{result['total']} concepts{note}")
    _say(f"demo finished in {time.perf_counter() - started:.0f} s")
    _say(f"recovered {recovered}/{total} planted concepts")
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


_COMMANDS = {"extract": cmd_extract, "fit": cmd_fit, "report": cmd_report, "run": cmd_run}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jsnmf`` command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed "jsnmf: error: ..." and the usage
        return int(exit_.code or 0)
    try:
        return getattr(args, "handler", _COMMANDS.get(args.command))(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (OSError, RecursionError, FloatingPointError) as err:  # a full disk, no permission, ...
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    """The error as one line; an OSError as "<file>: <what went wrong>" (its filename when it has one)."""
    if isinstance(err, OSError) and err.strerror:
        files = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        text = f"{files}: {err.strerror}" if files else f"{err.strerror} (no file named; errno {err.errno})"
    elif isinstance(err, RecursionError):
        text = f"input nested too deeply to process ({err})"
    else:
        text = str(err)
    return " ".join(text.split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
