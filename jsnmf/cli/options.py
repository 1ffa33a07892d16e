"""The command line's vocabulary: user errors, argument types, the parser class and the option groups
several commands share."""

from __future__ import annotations

import argparse

from jsnmf.dtypes import DTYPES
from jsnmf.extract import STORE_CHUNK_TOKENS
from jsnmf.fit.starts import INITIALIZERS
from jsnmf.layout import HOOK_SITES
from jsnmf.kernels.solvers import get_solver, solver_names
from jsnmf.presets import PRESETS


PROG = "jsnmf"
DEFAULT_RUNS_DIR = "jsnmf-runs"


class UserError(ValueError):
    """A problem with what the user asked for; reported in one line, exit status 2."""


_narrating = True


def say(*parts) -> None:
    """Print a line of the command's narration (flushed, so it interleaves with progress bars); nothing
    on the processes of a multi-process job other than process 0 (:func:`set_narration`)."""
    if _narrating:
        print(*parts, flush=True)


def narrating() -> bool:
    return _narrating


def set_narration(on: bool) -> None:
    """Turn :func:`say` (and the command's warnings) on or off for this process."""
    global _narrating
    _narrating = bool(on)


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


def process_index(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer", ">= 0")


def coordinator_address(text: str) -> str:
    """``--coordinator``: ``HOST:PORT``, the port a number in 1..65535."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 10.0.0.1:1234), got {text!r}")
    return f"{host}:{int(port)}"


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]", "in (0, 1]")


NO_SPARSITY = "none"  # --sparsity none: keep every neuron (SNMF(sparsity=None))


def sparsity_value(text: str) -> float | str:
    """``--sparsity``: a fraction in (0, 1], or ``none``/``off`` (no sparsification)."""
    if text.strip().lower() in ("none", "off"):
        return NO_SPARSITY
    return _number(text, float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1] or 'none'", "in (0, 1] (or 'none')")


# ---------------------------------------------------------------- parser


class Parser(argparse.ArgumentParser):
    """argparse with the one-line ``jsnmf: error: ...`` of every other user error (exit 2)."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def add_command(sub, name: str, *, help: str, description: str, examples: list[str], parents=(),
                usage: str | None = None) -> argparse.ArgumentParser:
    """A sub-command with its one-line ``help``, a ``description`` (wrapped) and an ``examples:`` epilog
    (shown as written)."""
    import textwrap

    epilog = "examples:\n" + "\n".join(f"  {example}" for example in examples)
    return sub.add_parser(name, parents=list(parents), help=help, description=textwrap.fill(description, 88),
                          epilog=epilog, usage=usage, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_extract_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-length", type=positive_int, default=128, help="truncate documents to this many tokens (128)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="documents per forward pass (16)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="precision of the stored activations (float32)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True,
                   help="start every document with the model's BOS, as the paper does for every family (default); "
                        "--no-bos: no BOS at all (the tokenizer's own is removed)")
    p.add_argument("--keep-bos", action="store_true",
                   help="keep the BOS token's activations in X (dropped by default, like the padding)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="precision of the model's weights and forward pass (float32)")
    p.add_argument("--hook", choices=HOOK_SITES, default="hook_post",
                   help="where to take the activations, by TransformerLens' names: hook_post = blocks.L.mlp.hook_post "
                        "(the MLP activation, d_mlp wide; the paper's, default), hook_mlp_out = blocks.L.hook_mlp_out, "
                        "hook_resid_post = blocks.L.hook_resid_post (d_model wide)")
    p.add_argument("--chunk-tokens", type=positive_int, default=STORE_CHUNK_TOKENS,
                   help=f"tokens per chunk file of the store ({STORE_CHUNK_TOKENS}); a fit across processes streams "
                        "whole chunks, so the store needs at least one per process")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what the run folder holds (store, fits, report) instead of refusing a different "
                        "corpus or settings; without it a finished store of the same run is reused")


def add_fit_options(p: argparse.ArgumentParser, rank_help: str, rank_required: bool = False) -> None:
    """The fit options; ``rank_required``: ``--rank`` is listed under "required unless --preset"."""
    where = p.add_argument_group("required unless --preset gives it") if rank_required else p
    where.add_argument("--rank", type=positive_int, default=None, metavar="K", help=f"number of features k{rank_help}")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a named set of hyperparameters (paper: the paper's fit, see jsnmf.presets); "
                        "the options below override it")
    p.add_argument("--solver", choices=solver_names(), default=None,
                   help="codes solver (mu, the paper's): " + "; ".join(f"{s}: {get_solver(s).summary}"
                                                                         for s in solver_names()))
    p.add_argument("--sparsity", type=sparsity_value, default=None, metavar="P|none",
                   help="fraction p of the layer's width kept per feature: ceil(p·width) entries of each column "
                        "of F (0.01, the paper's: 31 of GPT-2's 3072 neurons, 16 of SmolLM2-135M's 1536); "
                        "none: keep all. Fewer than 4 kept draws a warning")
    p.add_argument("--max-iter", type=positive_int, default=None, help="iteration cap (1000)")
    p.add_argument("--init", choices=tuple(INITIALIZERS), default=None, help="initialization (random)")
    p.add_argument("--seed", type=int, default=None, help="initialization seed (0)")
    p.add_argument("--tol", type=float, default=None,
                   help="an improvement of the loss counts when larger than tol·‖X‖² (1e-6)")
    p.add_argument("--patience", type=positive_int, default=None,
                   help="stop after this many iterations without one (100)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None,
                   help="checkpoint a running fit every this many iterations (50)")


def add_distributed_options(p: argparse.ArgumentParser, *, hidden: bool = False) -> None:
    """Joining a multi-process job (``jax.distributed``): every process runs the same command line, with
    its own ``--process-id``. ``hidden``: accepted but not shown, for commands that refuse them."""
    def shown(text: str) -> str:
        return argparse.SUPPRESS if hidden else text

    group = p if hidden else p.add_argument_group(
        "several processes (jax.distributed; every process runs the same command, process 0 writes the "
        "run folder's files and narrates)")
    group.add_argument("--coordinator", type=coordinator_address, default=None, metavar="HOST:PORT",
                       help=shown("address of process 0 and a free port there; with --num-processes and "
                                  "--process-id (any of the three joins the job; those a cluster environment "
                                  "supplies may be left out)"))
    group.add_argument("--num-processes", type=positive_int, default=None, metavar="N",
                       help=shown("number of processes in the job"))
    group.add_argument("--process-id", type=process_index, default=None, metavar="I",
                       help=shown("this process's index, 0..N-1 (0: the coordinator)"))
    group.add_argument("--distributed", action="store_true", default=False,
                       help=shown("join the job the cluster environment describes (SLURM, Open MPI, a Cloud TPU "
                                  "slice): jax.distributed.initialize() without arguments"))
    group.add_argument("--cpu-collectives", choices=("gloo",), default=None,
                       help=shown("collectives between processes on CPU devices (gloo), for a job of CPU processes"))


def add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-k", type=positive_int, default=25, help="top-activating tokens shown per feature (25)")
    p.add_argument("--window", type=int, default=15, help="context tokens on each side (15)")
    p.add_argument("--no-vocab", action="store_true", help="skip the vocabulary projections (no model load)")


