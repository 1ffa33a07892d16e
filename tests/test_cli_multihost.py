"""`jsnmf extract` and `jsnmf fit` as one job of two processes (``--coordinator``, gloo, 2 CPU devices each):
the store is byte-identical to a one-process extraction, the fit equals the one-process fit up to float32
rounding, only process 0 narrates and writes the run folder's files, an error on one process stops both
and names it, and bad or partial job options are one-line errors."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from jsnmf import SNMF, demo
from jsnmf.cli import main
from jsnmf.store import ActivationStore

from rounding import rounding_tolerances
from sharded_worker import free_port, kill_workers
from test_cli import assert_user_error, run_cli
from test_extract_multihost import assert_same_store

EXTRACT = ["--layers", "0,1", "--max-length", "32", "--batch-size", "6", "--chunk-tokens", "32"]
FIT = ["--layers", "1", "--rank", "4", "--max-iter", "15", "--tol", "0", "--sparsity", "0.1", "--checkpoint-every", "5"]
FIT_SETTINGS = dict(max_iter=15, tol=0.0, sparsity=0.1)  # FIT as SNMF settings (rank 4, random start, seed 0)
# `jsnmf` with every layer streamed from the store (the in-memory limit at 0), as tests/test_cli.py does in-process.
STREAMING_JSNMF = ["-c", "import sys, jsnmf.cli.steps as steps; steps.IN_MEMORY_LIMIT_BYTES = 0; "
                         "from jsnmf.cli import main; sys.exit(main(sys.argv[1:]))"]
TIMEOUT = 300


def start_job(root, name, argv, entry=("-m", "jsnmf")):
    """Start ``jsnmf ARGV`` as a job of 2 processes (2 CPU devices each) on localhost."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    logs = [(root / f"{name}{i}.out", root / f"{name}{i}.err") for i in range(2)]
    processes = []
    try:
        for i, (out, err) in enumerate(logs):
            job = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                   "--cpu-collectives", "gloo"]
            with open(out, "w") as stdout, open(err, "w") as stderr:
                processes.append(subprocess.Popen([sys.executable, *entry, *map(str, argv), *job], env=env,
                                                  stdout=stdout, stderr=stderr))
    except BaseException:
        kill_workers(processes)
        raise
    return name, processes, logs


def finish_job(started):
    """Wait for a job's processes; each one's ``(exit status, stdout, stderr)``."""
    name, processes, logs = started
    deadline = time.monotonic() + TIMEOUT
    try:
        for process in processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name}: the job still runs after {TIMEOUT} s:\n" + _tails(logs)) from None
    finally:
        kill_workers(processes)
    return [(p.returncode, out.read_text(), err.read_text()) for p, (out, err) in zip(processes, logs)]


def run_job(root, name, argv, entry=("-m", "jsnmf")):
    return finish_job(start_job(root, name, argv, entry))


def _tails(logs):
    return "\n".join(f"--- {path}\n{path.read_text()[-3000:]}" for pair in logs for path in pair)


def assert_ok(results, name):
    assert [code for code, _, _ in results] == [0, 0], f"{name}:\n" + "\n".join(
        f"--- process {i} (exit {code})\n{out[-2000:]}\n{err[-3000:]}" for i, (code, out, err) in enumerate(results))


# Gloo's connection lines ("[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer
# ranks is : 1") come from several C++ threads writing piecewise into one stdout buffer, so their pieces can
# interleave anywhere (CI saw "[Gloo] Rank [Gloo] Rank 1 is ...\n1 is connected ..."): only their words are fixed.
GLOO_WORDS = frozenset("Gloo Rank is connected to peer ranks Expected number of".split())


def narration(text):
    """The words of a process's stdout that are jsnmf's: every word that is not one of gloo's."""
    return [word for word in re.findall(r"[A-Za-z_]+", text) if word not in GLOO_WORDS]


def test_narration_ignores_interleaved_gloo_lines_only():
    garbled = ("[Gloo] Rank [Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"
               "1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n")  # as CI saw it
    assert narration(garbled) == []
    assert narration(garbled + "fitting layer 1 by 2 processes\n") == ["fitting", "layer", "by", "processes"]


def said_on_stderr(text):
    """jsnmf's own lines, warnings and progress bars in a process's stderr (JAX's and gloo's logs aside)."""
    return [line for line in text.replace("\r", "\n").splitlines()
            if line.startswith("jsnmf:") or "it/s" in line or "tok/s" in line]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Two-process extraction into ``two/``, then two-process fits of layer 1 in memory (``two/``) and
    streamed (``streamed/``, a copy of the store); the one-process extraction into ``one/`` meanwhile."""
    import shutil

    root = tmp_path_factory.mktemp("cli_multihost")
    model = demo.build_demo_model(root / "model")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in demo.read_demo_corpus()[:45]))
    source = ["--model", model, "--corpus", corpus, *EXTRACT]
    started = start_job(root, "extract", ["extract", *source, "--out", root / "two", "--overwrite"])
    try:  # the one-process extraction meanwhile
        assert main(["--quiet", "extract", *map(str, source), "--out", str(root / "one")]) == 0
    finally:
        extracted = finish_job(started)
    assert_ok(extracted, "extract")
    shutil.copytree(root / "two" / "store", root / "streamed" / "store")
    fitted = run_job(root, "fit", ["fit", "--store", root / "two" / "store", *FIT])
    assert_ok(fitted, "fit")
    streamed = run_job(root, "streamed", ["fit", "--store", root / "streamed" / "store", *FIT], entry=STREAMING_JSNMF)
    assert_ok(streamed, "streamed fit")
    return root, {"extract": extracted, "fit": fitted, "streamed": streamed}


def test_two_processes_extract_the_one_process_store(job):
    root, _ = job
    manifest = assert_same_store(root / "two" / "store", root / "one" / "store")
    assert manifest["extract_processes"] == 2 and manifest["extract_devices"] == 4
    assert len(manifest["chunks"]) >= 8  # enough chunks that both processes wrote some


def test_only_process_zero_narrates(job):
    _, results = job
    for name, results_ in results.items():
        (_, out0, err0), (_, out1, err1) = results_
        assert narration(out1) == [] and said_on_stderr(err1) == [], f"{name}: process 1 spoke:\n{out1}\n{err1}"
        assert "Traceback" not in err0 + err1
    (_, out, err), _ = results["extract"]
    assert "by 2 processes" in out and "store:" in out
    assert "extract [0]" in err  # process 0's progress bar (its share of the tokens)
    (_, out, _), _ = results["fit"]
    assert "fitting layer 1 by 2 processes" in out and "relative error" in out


@pytest.fixture(scope="module")
def one_process_fit(job):
    """The one-process `jsnmf fit` of ``one/``, and the bounds of a fit that differs from it only in the order
    of float32 sums (tests/rounding.py: measured on this problem, not tuned)."""
    root, _ = job
    X = ActivationStore.open(root / "one" / "store").layer_array(1)
    reference, tolerances = rounding_tolerances(lambda: SNMF(4, **FIT_SETTINGS), X)
    assert main(["--quiet", "fit", "--store", str(root / "one" / "store"), *FIT]) == 0
    one = SNMF.load(root / "one" / "snmf" / "layer_01")
    # the one-process `jsnmf fit` is that reference fit exactly
    np.testing.assert_array_equal(one.features_, reference.features_)
    np.testing.assert_array_equal(one.codes_, reference.codes_)
    return one, tolerances


@pytest.mark.parametrize("run", ["two", "streamed"])
def test_two_process_fit_equals_the_one_process_fit(job, one_process_fit, run):
    """In memory (each process its half of the rows) and streamed (each its share of the chunks): the
    factors of the one-process fit up to float32 rounding; process 0 saved all the codes, in the store's
    order, and removed the checkpoints."""
    root, _ = job
    one, tolerances = one_process_fit
    two = SNMF.load(root / run / "snmf" / "layer_01")
    assert two.n_iter_ == one.n_iter_ == 15 and two.codes_.shape == one.codes_.shape
    assert two.codes_.shape == (ActivationStore.open(root / run / "store").n_tokens, 4)
    tolerances.check(one, two.features_, two.codes_, two.loss_history_, run)
    assert sorted(p.name for p in (root / run / "snmf").iterdir()) == [".lock", "layer_01"]  # checkpoints removed


def test_resume_keeps_the_fitted_layer_on_every_process(job):
    """`--resume` after the two-process fit: every process loads the saved layer on its own and keeps it."""
    root, _ = job
    saved = root / "two" / "snmf" / "layer_01" / "manifest.json"
    before = saved.read_bytes()
    (code0, out0, err0), (code1, out1, err1) = run_job(root, "resume", ["fit", "--store", root / "two" / "store",
                                                                        *FIT, "--resume"])
    assert (code0, code1) == (0, 0), err0 + err1
    assert "layer 1: already fitted" in out0 and narration(out1) == []
    assert saved.read_bytes() == before


def test_an_error_on_one_process_stops_both_and_is_named(job):
    """Process 0 cannot take the run folder's fit lock (held here): it says why, process 1 names it."""
    from jsnmf.io.files import FolderLock

    root, _ = job
    lock = FolderLock(root / "two" / "snmf", busy="held by the test")
    try:
        results = run_job(root, "locked", ["fit", "--store", root / "two" / "store", *FIT, "--layers", "0"])
    finally:
        lock.release()
    (code0, _, err0), (code1, _, err1) = results
    assert_user_error(code0, err0, "process 0: ", "another jsnmf fit is running on this run folder")
    assert code1 == 1 and "Traceback" not in err1
    assert [line for line in err1.splitlines() if line.startswith("jsnmf: error:")] == [
        "jsnmf: error: process 1: process(es) [0] failed while locking the run folder (see their error); "
        "process 1 stops too"]
    assert not (root / "two" / "snmf" / "layer_00").exists()


# ---------------------------------------------------------------- bad options


def test_commands_that_run_in_one_process_refuse_the_job_options(capsys, tmp_path):
    for argv in (["report", "--run", tmp_path, "--coordinator", "10.0.0.1:1234"],
                 ["run", "--distributed"],
                 ["export", "--run", tmp_path, "--num-processes", "2", "--process-id", "0"]):
        code, _, err = run_cli(capsys, *argv)
        assert_user_error(code, err, f"jsnmf {argv[0]} runs in one process", "`jsnmf extract` and `jsnmf fit`")


def test_malformed_job_options_are_argparse_errors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "fit", "--store", tmp_path, "--rank", "2", "--coordinator", "10.0.0.1")
    assert_user_error(code, err, "--coordinator", "HOST:PORT")
    code, _, err = run_cli(capsys, "fit", "--store", tmp_path, "--rank", "2", "--process-id", "-1")
    assert_user_error(code, err, "--process-id", ">= 0")
    code, _, err = run_cli(capsys, "extract", "--model", "m", "--corpus", "c", "--layers", "0", "--out", tmp_path,
                           "--cpu-collectives", "mpi")
    assert_user_error(code, err, "--cpu-collectives", "gloo")


# Each case: argv, and what its one error line must say. They reach jax.distributed.initialize, which must
# run before JAX is used, so they run in a fresh process (this one has used JAX); had the command line touched
# a JAX backend before joining, initialize would refuse and these messages would not come.
PARTIAL = [
    (["fit", "--store", "S", "--rank", "2", "--coordinator", "127.0.0.1:1234"],
     ["--coordinator given without --num-processes and --process-id", "no cluster environment"]),
    (["extract", "--model", "M", "--corpus", "C", "--layers", "0", "--out", "O", "--num-processes", "2",
      "--process-id", "1"], ["--num-processes and --process-id given without --coordinator"]),
    (["fit", "--store", "S", "--rank", "2", "--distributed"], ["--distributed: no cluster environment"]),
    (["fit", "--store", "S", "--rank", "2", "--coordinator", "127.0.0.1:1234", "--num-processes", "2",
      "--process-id", "2"], ["--process-id 2 is out of range for --num-processes 2 (0..1)"]),
    (["fit", "--store", "S", "--rank", "2", "--cpu-collectives", "gloo"],
     ["--cpu-collectives gloo is for a job of several processes"]),
]
_CASES_SCRIPT = """
import contextlib, io, json, sys
from jsnmf.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_partial_job_options_name_what_is_missing():
    cluster = ("SLURM_", "OMPI_", "PMI_", "TPU_", "KUBERNETES_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(cluster)}  # nothing to auto-detect here
    done = subprocess.run([sys.executable, "-c", _CASES_SCRIPT, json.dumps([argv for argv, _ in PARTIAL])],
                          env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    for (argv, fragments), (code, err) in zip(PARTIAL, json.loads(done.stdout.splitlines()[-1])):
        assert_user_error(code, err, *fragments)
