"""Two processes on localhost (``jax.distributed``, gloo CPU collectives, 2 devices each), each
feeding only its share of the tokens, fit the same factors as one process with all the tokens."""

import numpy as np
import pytest

from jsnmf import SNMF

import sharded_worker as worker
from rounding import relative, rounding_tolerances
from sharded_worker import RANK, SETTINGS, case_name, free_port

CUT = 151  # process 0 holds rows [0, 151), process 1 rows [151, 301): neither a multiple of 2


def write_store(path, X, chunk_tokens=50):
    from jsnmf.store import ActivationStore

    n = len(X)
    writer = ActivationStore.create(path, layers=[0], d_mlp=X.shape[1], dtype="float32", chunk_tokens=chunk_tokens)
    writer.append({0: X}, np.zeros(n, np.int32), np.zeros(n, np.int32), np.arange(n, dtype=np.int32),
                  np.full(n, -1, np.int32))
    return writer.close()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multihost")
    X, X_new = worker.problem()
    store = write_store(folder / "store", X)
    np.savez(folder / "in.npz", X=X, X_new=X_new, cut=np.array(CUT), checkpoint_dir=np.array(str(folder / "ckpt")),
             store=np.array(str(store.path)))
    port = free_port()
    logs = [folder / f"process{i}.log" for i in range(2)]
    processes = [worker.start_worker(["multihost", folder / "in.npz", folder / f"out{i}.npz", port, i], 2, logs[i])
                 for i in range(2)]
    try:
        # The one-process fits, each with the rounding bounds of its problem (tests/rounding.py).
        references = {case_name(solver, sparsity): rounding_tolerances(
            lambda: SNMF(RANK, solver=solver, sparsity=sparsity, **SETTINGS), X, X_new)
            for solver, sparsity in [("mu", 0.2), ("hals", None), ("ehals", 0.2)]}
        references["hals_sparse"] = rounding_tolerances(lambda: SNMF(RANK, solver="hals", sparsity=0.2, **SETTINGS), X)
        worker.finish_workers(processes, logs, timeout=300)
    finally:
        worker.kill_workers(processes)
    results = []
    for i in range(2):
        with np.load(folder / f"out{i}.npz") as out:
            results.append(dict(out))
    return X, X_new, references, results, folder / "ckpt"


@pytest.mark.parametrize("case", ["mu_sparse", "hals_dense", "ehals_sparse"])
def test_two_processes_fit_like_one(two_processes, case):
    X, X_new, references, (first, second), _ = two_processes
    reference, tolerances = references[case]
    # features_ and the losses are the same on both processes, and equal the one-process fit.
    np.testing.assert_array_equal(first[f"{case}_features"], second[f"{case}_features"])
    np.testing.assert_array_equal(first[f"{case}_loss"], second[f"{case}_loss"])
    # codes_ holds each process's own rows; together they are the one-process codes.
    assert first[f"{case}_codes"].shape == (CUT, RANK) and second[f"{case}_codes"].shape == (301 - CUT, RANK)
    codes = np.concatenate([first[f"{case}_codes"], second[f"{case}_codes"]])
    tolerances.check(reference, first[f"{case}_features"], codes, first[f"{case}_loss"], case)
    for result in (first, second):  # gather_rows assembles them on every process
        np.testing.assert_array_equal(result[f"{case}_all_codes"], codes)
    # transform gives each process the codes of its rows; score is global and agreed.
    transformed = np.concatenate([first[f"{case}_transform"], second[f"{case}_transform"]])
    assert float(first[f"{case}_score"]) == float(second[f"{case}_score"])
    tolerances.check_transform(reference, X_new, transformed, first[f"{case}_score"], case)


def test_two_processes_checkpoint_and_resume(two_processes):
    """Both processes write their rows of G into one checkpoint and resume from it; the fit also
    moves to a single process (the padding of each process's block is dropped on restore)."""
    X, _, references, (first, second), checkpoint_dir = two_processes
    reference, tolerances = references["mu_sparse"]  # 15 iterations at once, one process
    np.testing.assert_array_equal(first["resumed_features"], second["resumed_features"])
    tolerances.check(reference, first["resumed_features"],
                     np.concatenate([first["resumed_codes"], second["resumed_codes"]]), first["resumed_loss"])
    longer = dict(SETTINGS, max_iter=20)
    at_once, longer_tolerances = rounding_tolerances(lambda: SNMF(RANK, solver="mu", sparsity=0.2, **longer), X)
    moved = SNMF(RANK, solver="mu", sparsity=0.2, **longer).fit(X, checkpoint_dir=checkpoint_dir, resume=True)
    assert moved.n_iter_ == 20
    longer_tolerances.check(at_once, moved.features_, moved.codes_, moved.loss_history_)


@pytest.mark.parametrize("source", ["streamed", "store", "store_resumed"])
def test_two_processes_stream_their_own_chunks(two_processes, source):
    """Each process streams its own rows (an array in chunks, or its share of a store's chunks;
    also checkpointed after 10 iterations and resumed to 15): the one-process in-memory fit,
    features everywhere and each process's codes."""
    X, _, references, (first, second), _ = two_processes
    reference, tolerances = references["hals_sparse"]
    np.testing.assert_array_equal(first[f"{source}_features"], second[f"{source}_features"])
    codes = np.concatenate([first[f"{source}_codes"], second[f"{source}_codes"]])
    assert codes.shape == reference.codes_.shape
    tolerances.check(reference, first[f"{source}_features"], codes, first[f"{source}_loss"], source)
