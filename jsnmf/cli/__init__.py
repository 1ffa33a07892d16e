"""The ``jsnmf`` command line: extract → fit → report, or all three with ``jsnmf run``.

    jsnmf run --model gpt2 --corpus prompts.jsonl --layers 0,6,11 --rank 100
    jsnmf run                                   # the offline demo (planted concepts)
    jsnmf extract --model M --corpus C --layers 0,6,11 --out RUN
    jsnmf fit --store RUN/store --layers 0,6,11 --rank 100
    jsnmf report --run RUN [--model M]
    jsnmf export --run RUN [--layers 6] [--codes]   # features.safetensors + cfg.json per layer
    jsnmf extract ... --coordinator HOST:PORT --num-processes N --process-id I   # on every process

A run directory holds ``store/`` (the ActivationStore), ``snmf/layer_{L:02d}/`` (``SNMF.save``
checkpoints) and ``report/`` (``index.html`` and one page per layer). User errors (bad arguments,
missing files, layers the model does not have) print one ``jsnmf: error: ...`` line and exit with 2.

``extract`` and ``fit`` also run as one job of several processes (``--coordinator``/``--num-processes``/
``--process-id`` or ``--distributed``; :mod:`jsnmf.cli.processes`): the job is joined before anything else
uses JAX, and each process's error line names it (``jsnmf: error: process 1: ...``).
"""


from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence


from jsnmf import __version__
from jsnmf.cli.commands import cmd_export, cmd_extract, cmd_fit, cmd_report, cmd_run
from jsnmf.cli import processes
from jsnmf.cli.options import (DEFAULT_RUNS_DIR, PROG, UserError, add_command, add_distributed_options,
                               add_extract_options, add_fit_options, add_report_options, narrating, Parser,
                               layer_list, positive_int, say)
from jsnmf.cli.steps import fit_settings, step_fit

__all__ = ["main", "build_parser", "UserError", "fit_settings", "step_fit", "layer_list", "positive_int", "say"]


def build_parser() -> argparse.ArgumentParser:
    """The ``jsnmf`` argument parser (sub-commands extract, fit, report, run)."""
    parser = Parser(
        prog=PROG, description="Find interpretable features in language-model MLPs with SNMF.",
        epilog="examples:\n  jsnmf run                      # the offline demo\n"
               "  jsnmf run --model M --corpus prompts.jsonl --layers 0,6,11 --rank 100\n"
               "  jsnmf COMMAND --help           # each command's options and examples",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    quiet = Parser(add_help=False)  # -q also after the command; SUPPRESS keeps an earlier -q
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")

    p = add_command(sub, "extract", parents=[quiet], help="store MLP activations of a corpus",
                    description="Run the model over the corpus and store the activations of the layers (one forward "
                                "pass for all of them) in OUT/store. An interrupted extraction resumes; a finished "
                                "store of the same model, corpus and settings is reused.",
                    examples=["jsnmf extract --model gpt2 --corpus prompts.jsonl --layers 0,6,11 --out RUN",
                              "jsnmf extract --model M.gguf --corpus paper.json --layers 5 --out RUN --hook hook_mlp_out",
                              "jsnmf extract --model M --corpus other.jsonl --layers 5 --out RUN --overwrite",
                              "jsnmf extract --model M --corpus C --layers 5 --out /shared/RUN --coordinator "
                              "10.0.0.1:1234 --num-processes 4 --process-id I   # on each of 4 processes"])
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (local HF cache)")
    p.add_argument("--corpus", required=True, help="text (one document a line), JSONL or JSON file")
    p.add_argument("--layers", type=layer_list, required=True, help="comma-separated layers, e.g. 0,6,11")
    p.add_argument("--out", required=True, help="run directory (the store goes to OUT/store)")
    add_extract_options(p)
    add_distributed_options(p)

    p = add_command(sub, "fit", parents=[quiet], help="fit SNMF to the stored activations of each layer",
                    description="Fit one SNMF per layer of the store and save it to RUN/snmf/layer_LL (orbax + "
                                "manifest). --rank is required unless --preset gives it.",
                    examples=["jsnmf fit --store RUN/store --rank 100",
                              "jsnmf fit --store RUN/store --preset paper --layers 6",
                              "jsnmf fit --store RUN/store --rank 50 --solver hals --sparsity none",
                              "jsnmf fit --store RUN/store --rank 100 --resume   # after an interruption",
                              "jsnmf fit --store /shared/RUN/store --rank 100 --distributed   # on every process "
                              "of a SLURM job"],
                    usage="%(prog)s --store STORE (--rank K | --preset NAME) [options]")
    p.add_argument("--store", required=True, help="activation store directory (RUN/store)")
    p.add_argument("--layers", type=layer_list, default=None, help="layers to fit (all in the store)")
    add_fit_options(p, rank_help=" (required unless --preset)", rank_required=True)
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted fits from their checkpoints; keep layers already fitted")
    p.add_argument("--on-device", choices=("auto", "yes", "no"), default="auto",
                   help="hold a layer's activations in device memory: auto (when they fit a GPU/TPU's free memory), "
                        "yes, or no (stream them from disk every iteration)")
    add_distributed_options(p)

    p = add_command(sub, "report", parents=[quiet], help="write the HTML report of a run",
                    description="Write RUN/report/index.html and one page per fitted layer (top tokens in context, "
                                "vocabulary projections, label shares). --model points at the model (and its "
                                "tokenizer) when the run folder was moved or shared.",
                    examples=["jsnmf report --run RUN",
                              "jsnmf report --run RUN --layers 6 --top-k 50 --no-vocab",
                              "jsnmf report --run shared-run --model ~/models/gpt2"])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="run directory (holds store/ and snmf/)")
    where.add_argument("--store", help="activation store directory (checkpoints in its parent's snmf/)")
    p.add_argument("--layers", type=layer_list, default=None, help="layers to report (all fitted)")
    p.add_argument("--model", default=None,
                   help="the model and tokenizer (path or hub id; default: the one recorded in the store)")
    add_report_options(p)

    p = add_command(sub, "run", parents=[quiet], help="extract, fit and report in one go (no --model: the offline demo)",
                    description="extract -> fit -> report into one run folder. Without --model: the offline demo "
                                "(a tiny GPT-2 with planted concepts; ends with 'recovered N/M planted concepts'). "
                                "The rank is checked against the width before the model is loaded and against the "
                                "corpus' token count before the forward pass.",
                    examples=["jsnmf run",
                              "jsnmf run --model gpt2 --corpus prompts.jsonl --layers 0,6,11 --rank 100 --out RUN",
                              "jsnmf run --model M --corpus paper.json --layers 5 --preset paper --rank 100",
                              "jsnmf run --model M --corpus other.jsonl --layers 5 --out RUN --overwrite"])
    p.add_argument("--model", default=None, help="checkpoint directory or hub id; leave out for the demo")
    p.add_argument("--corpus", default=None, help="corpus file (required with --model)")
    p.add_argument("--layers", type=layer_list, default=None, help="comma-separated layers, e.g. 0,6,11")
    p.add_argument("--out", default=None, help=f"run directory (default ./{DEFAULT_RUNS_DIR}/<model>-<time>)")
    add_extract_options(p)
    add_fit_options(p, rank_help=" (100, the paper's; the demo: 16)")
    add_report_options(p)

    p = add_command(sub, "export", parents=[quiet], help="write each fitted layer as features.safetensors + cfg.json",
                    description="Export fitted layers in a form anyone can read without jsnmf (SAELens' layout): "
                                "features.safetensors holds F (width x rank; with --codes also G) and cfg.json names "
                                "the model, layer, hook, rank, sparsity, solver, token count, dtype and jsnmf version. "
                                "SNMF.load reads an export back.",
                    examples=["jsnmf export --run RUN                      # RUN/export/layer_LL/",
                              "jsnmf export --run RUN --layers 6 --codes --out features-l6"])
    p.add_argument("--run", required=True, help="run directory (holds store/ and snmf/)")
    p.add_argument("--layers", type=layer_list, default=None, help="layers to export (all fitted)")
    p.add_argument("--out", default=None, help="folder to write into (default RUN/export; one layer_LL/ per layer)")
    p.add_argument("--codes", action="store_true", help="also write the codes G (n_tokens x rank)")

    from jsnmf.cli.evaluate import add_parsers  # evaluate, steer (their own module)
    add_parsers(sub, quiet)
    for name, command in sub.choices.items():  # the others refuse the options of a job, in words
        if name not in processes.COMMANDS:
            add_distributed_options(command, hidden=True)
    return parser


_COMMANDS = {"extract": cmd_extract, "fit": cmd_fit, "report": cmd_report, "run": cmd_run, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jsnmf`` command line; returns the exit status (0 ok, 2 user error, 130 interrupted; in a
    job of several processes 1 on a process that stopped because another one failed)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed "jsnmf: error: ..." and the usage
        return int(exit_.code or 0)
    try:
        if args.command in processes.COMMANDS:
            processes.join(args)  # before anything else uses JAX
        else:
            processes.refuse(args)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return getattr(args, "handler", _COMMANDS.get(args.command))(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"{PROG}: error: {_named(_one_line(err))}", file=sys.stderr)
        return 2
    except (OSError, RecursionError, FloatingPointError) as err:  # a full disk, no permission, ...
        print(f"{PROG}: error: {_named(_one_line(err))}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if processes.job().count == 1:
            raise  # a bug: its traceback
        # another process failed (all_or_none says which), or the job's connection broke
        print(f"{PROG}: error: {_named(_one_line(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning during a command, as one ``jsnmf: warning: ...`` line on stderr (no source location);
    in a job of several processes only process 0's (they all run the same)."""
    if narrating():
        print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def _named(text: str) -> str:
    """The error of one process of a job, with the process named (unless the text names it first)."""
    prefix = processes.error_prefix()  # "process I: "
    if not prefix or text.startswith((prefix, prefix.replace(":", ""))):
        return text
    return prefix + text


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
