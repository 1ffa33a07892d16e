"""``jsnmf extract`` and ``jsnmf fit`` as one job of several processes (``jax.distributed``).

Every process runs the same command line with its own ``--process-id`` (or, with ``--distributed``, the
cluster says which process it is). :func:`join` connects the process to the job before anything else in
it uses JAX; from then on:

* only process 0 narrates and draws progress bars (the others are quiet, warnings included);
* files outside the store (run-folder clean-up, the fitted layers, the fit lock) are written by process
  0 only, inside :func:`together` blocks, so that the others wait for it and fail with it;
* an error on any process ends the command on every process, each one printing
  ``jsnmf: error: process I: ...`` (:func:`error_prefix`).

Commands that cannot run as one job (report, run, export, evaluate, steer) refuse the options
(:func:`refuse`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass

from jsnmf.cli.options import UserError, set_narration

# The options of add_distributed_options, as (attribute, option) in the order they are named.
_EXPLICIT = (("coordinator", "--coordinator"), ("num_processes", "--num-processes"), ("process_id", "--process-id"))
COMMANDS = ("extract", "fit")  # the commands that can run as one job of several processes


@dataclass(frozen=True)
class Job:
    """This process's place in the job: ``index`` of ``count`` processes (0 of 1 when not joined)."""

    index: int = 0
    count: int = 1


_job = Job()


def job() -> Job:
    return _job


def is_first() -> bool:
    """Whether this process writes the shared files and narrates (process 0, or the only process)."""
    return _job.index == 0


def together(doing: str):
    """A block every process runs, after which they agree whether any failed
    (:func:`jsnmf.distributed.all_or_none`); one process: the block alone. Put work only process 0 does
    (``if is_first():``) in one, so that the others wait for it and stop when it fails."""
    if _job.count == 1:
        return contextlib.nullcontext()
    from jsnmf.distributed import all_or_none

    return all_or_none(doing)


def wants_to_join(args: argparse.Namespace) -> bool:
    """Whether the options ask to join a multi-process job."""
    return bool(getattr(args, "distributed", False)) or any(
        getattr(args, name, None) is not None for name, _ in _EXPLICIT)


def refuse(args: argparse.Namespace) -> None:
    """UserError when a command that runs in one process only was given the options of a job."""
    if wants_to_join(args) or getattr(args, "cpu_collectives", None) is not None:
        raise UserError(f"jsnmf {args.command} runs in one process: run `jsnmf extract` and `jsnmf fit` with "
                        f"--coordinator/--num-processes/--process-id (or --distributed) on every process, then "
                        f"`jsnmf {args.command}` once, without them")


def join(args: argparse.Namespace) -> Job:
    """Join the job the options describe (``jsnmf.distributed.initialize``); call it before any other use
    of JAX. Without those options nothing happens (one process). Processes other than 0 turn quiet:
    ``args.quiet`` is set, narration and warnings are off."""
    global _job
    if not wants_to_join(args):
        if getattr(args, "cpu_collectives", None) is not None:
            raise UserError(f"--cpu-collectives {args.cpu_collectives} is for a job of several processes: add "
                            "--coordinator HOST:PORT, --num-processes N and --process-id I (or --distributed)")
        return _job
    n, index = args.num_processes, args.process_id
    if n is not None and index is not None and index >= n:
        raise UserError(f"--process-id {index} is out of range for --num-processes {n} (0..{n - 1})")
    _initialize(args)
    import jax

    _job = Job(jax.process_index(), jax.process_count())
    if _job.index != 0:
        args.quiet = True
        set_narration(False)
        logging.getLogger("jsnmf").setLevel(logging.ERROR)
    return _job


def _initialize(args: argparse.Namespace) -> None:
    from jsnmf.distributed import initialize

    missing = [option for name, option in _EXPLICIT if getattr(args, name) is None]
    given = [option for name, option in _EXPLICIT if getattr(args, name) is not None]
    try:
        initialize(args.coordinator, args.num_processes, args.process_id, cpu_collectives=args.cpu_collectives)
    except ValueError as err:
        # JAX says "... must be defined" / "should be defined" of a setting neither given nor found in the
        # cluster's environment; anything else (e.g. an id the environment gave out of range) as it is
        if not missing or "defined" not in str(err):
            raise UserError(f"cannot join the job: {err}") from None
        clusters = "no cluster environment (SLURM, Open MPI, a Cloud TPU slice)"
        if not given:
            raise UserError(f"--distributed: {clusters} describes a job here; give --coordinator HOST:PORT, "
                            "--num-processes N and --process-id I instead") from None
        raise UserError(f"{_and(given)} given without {_and(missing)}, and {clusters} supplies "
                        f"{'it' if len(missing) == 1 else 'them'}: give all of --coordinator HOST:PORT, "
                        "--num-processes N and --process-id I") from None
    except RuntimeError as err:  # could not reach the coordinator in time, or JAX was in use already
        where = f" at {args.coordinator}" if args.coordinator else ""
        text = " ".join(str(err).split())
        raise UserError(f"could not join the job{where}: {text}") from None


def _and(options: list[str]) -> str:
    return " and ".join(options) if len(options) < 3 else ", ".join(options[:-1]) + " and " + options[-1]


def error_prefix() -> str:
    """``"process I: "`` in a job of several processes (each prints its own error), else ``""``."""
    return f"process {_job.index}: " if _job.count > 1 else ""
