"""Extraction by two processes (``jax.distributed`` on localhost, gloo, 2 CPU devices each) into one store
on a shared disk: each process writes its share of the chunks, process 0 completes the manifest. The
store is byte-identical to the one-process store, a store killed mid-way resumes with one process or
with two, and an error on one process stops both with a message naming it.
"""

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

import sharded_worker as worker
from sharded_worker import MULTIHOST_EXTRACT_SETTINGS as SETTINGS

from jsnmf.extract import chunk_runs, extract
from jsnmf.store import ActivationStore


def run_two_processes(root, name, targets, env=None, wait=True):
    """Start the 2 worker processes extracting into ``targets``; with ``wait``, wait for both (and fail on
    an error exit), else return them running."""
    np.savez(root / f"{name}.npz", model=np.array(str(root / "model")), corpus=np.array(str(root / "corpus.jsonl")),
             targets=np.array([str(t) for t in targets]))
    port = worker.free_port()
    logs = [root / f"{name}{i}.log" for i in range(2)]
    processes = [worker.start_worker(["extract_multihost", root / f"{name}.npz", root / name, port, i], 2, logs[i],
                                     env=env) for i in range(2)]
    if not wait:
        return processes
    try:
        worker.finish_workers(processes, logs, timeout=300)
    finally:
        worker.kill_workers(processes)
    return [json.loads((root / name / f"errors{i}.json").read_text()) for i in range(2)]


def store_files(path):
    """Every file of the store but its manifest, by relative path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", ".lock")}


def assert_same_store(path, reference):
    files, expected = store_files(path), store_files(reference)
    assert sorted(files) == sorted(expected)
    assert [name for name in files if files[name] != expected[name]] == []
    manifest = json.loads((path / "manifest.json").read_text())
    expected_manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["complete"]
    for key in ("chunks", "n_tokens", "checksums", "resume_identity", "n_tokens_expected"):
        assert manifest[key] == expected_manifest[key], key
    assert not (path / "commits").exists()  # every record was listed in the manifest, then removed
    assert not list(path.rglob("*.tmp"))
    return manifest


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(folder, the one-process reference store, the errors each process recorded) after two processes
    extracted into ``full`` and tried ``foreign`` (a folder holding a user's file)."""
    from jsnmf import demo
    from jsnmf.demo.corpus import demo_corpus_path

    root = tmp_path_factory.mktemp("extract_multihost")
    demo.build_demo_model(root / "model")
    (root / "corpus.jsonl").write_text("".join(demo_corpus_path().read_text().splitlines(keepends=True)[:45]))
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("not a store")
    errors = run_two_processes(root, "first", [root / "full", root / "foreign"])
    reference = extract(root / "model", root / "corpus.jsonl", root / "reference", **SETTINGS)
    assert len(reference.chunk_bounds) >= 8  # enough chunks for both processes and for a kill mid-way
    return root, reference, errors


def test_two_processes_write_the_one_process_store(shared):
    root, reference, errors = shared
    assert str(root / "full") not in errors[0] and str(root / "full") not in errors[1], errors
    manifest = assert_same_store(root / "full", reference.path)
    assert manifest["extract_processes"] == 2 and manifest["extract_devices"] == 4
    # Both processes wrote: the chunks cover the whole store, and the fit reads it like any store.
    assert ActivationStore.open(root / "full").n_tokens == reference.n_tokens


def test_an_error_on_one_process_stops_both(shared):
    root, _, errors = shared
    assert (root / "foreign" / "notes.txt").read_text() == "not a store"
    assert "directory is not empty" in errors[0][str(root / "foreign")]
    assert errors[1][str(root / "foreign")] == (
        "RuntimeError: process(es) [0] failed while opening the store (see their error); process 1 stops too")


def test_killed_store_resumes_with_one_or_two_processes(shared):
    root, reference, _ = shared
    killed = root / "killed"
    # Slow batches (1 s each) so that the kill lands while both processes are writing their shares.
    processes = run_two_processes(root, "slow", [killed], env={"JSNMF_EXTRACT_SLEEP_PER_BATCH": "1.0"}, wait=False)
    n_chunks = len(reference.chunk_bounds)
    deadline = time.monotonic() + 240
    try:
        while True:
            recorded = sorted(int(p.stem.split("_")[1]) for p in (killed / "commits").glob("chunk_*.json")) \
                if (killed / "commits").is_dir() else []
            if recorded and recorded[0] < n_chunks // 2 <= recorded[-1]:  # both processes have committed
                break
            assert all(p.poll() is None for p in processes), "a worker exited before the kill"
            assert time.monotonic() < deadline, "the two processes committed no chunks within 240 s"
            time.sleep(0.05)
        for process in processes:
            os.kill(process.pid, signal.SIGKILL)
    finally:
        worker.kill_workers(processes)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["chunks"] == []  # process 0 lists records only at the end
    recorded = sorted((killed / "commits").glob("chunk_*.json"))
    assert 2 <= len(recorded) < n_chunks
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore.open(killed)

    shutil.copytree(killed, root / "killed_copy")
    # One process takes over the chunks both processes had not committed.
    extract(root / "model", root / "corpus.jsonl", killed, **SETTINGS)
    manifest = assert_same_store(killed, reference.path)
    assert manifest["extract_processes"] == 1
    # Two processes share what is left of the copy.
    errors = run_two_processes(root, "resume", [root / "killed_copy"])
    assert errors == [{}, {}]
    assert assert_same_store(root / "killed_copy", reference.path)["extract_processes"] == 2


def test_chunk_runs_split_the_chunks_left_in_order():
    todo = [0, 1, 2, 5, 6, 9, 10]
    assert chunk_runs(todo, 0, 2) == [(0, 3)]
    assert chunk_runs(todo, 1, 2) == [(5, 7), (9, 11)]
    assert chunk_runs(todo, 0, 1) == [(0, 3), (5, 7), (9, 11)]
    shares = [chunk_runs(todo, p, 3) for p in range(3)]
    assert [i for runs in shares for a, b in runs for i in range(a, b)] == todo
    assert chunk_runs([4], 0, 2) == [] and chunk_runs([4], 1, 2) == [(4, 5)]  # more processes than chunks
