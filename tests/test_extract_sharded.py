"""Data-parallel extraction: the store made on 8 and on 4 simulated CPU devices (whole batches dealt
out to the devices in turn, written back in order) is byte-identical to the store made on one device.

A worker process (``sharded_worker.py extract``, started with 8 simulated devices) extracts the first
documents of the demo corpus with the demo model; this process (one device) makes the references.
"""

import json

import numpy as np
import pytest

import sharded_worker as worker
from sharded_worker import EXTRACT_RUNS, EXTRACT_SETTINGS

from jsnmf.extract import extract
from jsnmf.store import ActivationStore


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(folder of the worker's stores, folder of the 1-device references, corpus, model dir)."""
    from jsnmf import demo
    from jsnmf.demo.corpus import demo_corpus_path

    root = tmp_path_factory.mktemp("extract_sharded")
    model_dir = demo.build_demo_model(root / "model")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(demo_corpus_path().read_text().splitlines(keepends=True)[:45]))
    np.savez(root / "in.npz", model=np.array(str(model_dir)), corpus=np.array(str(corpus)))
    log = root / "worker.log"
    process = worker.start_worker(["extract", root / "in.npz", root / "sharded"], 8, log)
    try:
        for name, (_, settings) in EXTRACT_RUNS.items():
            extract(model_dir, corpus, root / "single" / name, **EXTRACT_SETTINGS, **settings)
        worker.finish_workers([process], [log], timeout=480)
    finally:
        worker.kill_workers([process])
    return root / "sharded", root / "single"


def store_files(path):
    """Every file of the store but its manifest, by relative path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


@pytest.mark.parametrize("name", list(EXTRACT_RUNS))
def test_sharded_store_is_byte_identical(stores, name):
    sharded_root, single_root = stores
    sharded, single = sharded_root / name, single_root / name
    files, reference = store_files(sharded), store_files(single)
    assert sorted(files) == sorted(reference)
    assert any(f.startswith("tokens") for f in files) and any(f.startswith("layer_01") for f in files)
    different = [f for f in files if files[f] != reference[f]]
    assert not different, f"{name}: files differ from the 1-device store: {different}"
    sharded_store, single_store = ActivationStore.open(sharded), ActivationStore.open(single)
    assert sharded_store.chunk_bounds == single_store.chunk_bounds and len(single_store.chunk_bounds) >= 3
    manifest = json.loads((sharded / "manifest.json").read_text())
    reference_manifest = json.loads((single / "manifest.json").read_text())
    n_devices = EXTRACT_RUNS[name][0] or 8
    assert manifest["extract_devices"] == n_devices and reference_manifest["extract_devices"] == 1
    assert manifest["chunks"] == reference_manifest["chunks"]
    assert manifest["resume_identity"]["batch_size"] == reference_manifest["resume_identity"]["batch_size"]


def test_a_store_resumes_on_another_mesh(stores, tmp_path):
    """The device count is not part of the resume identity: the 8-device store is complete for 1 device."""
    sharded_root, single_root = stores
    store = ActivationStore.open(sharded_root / "8_float32_b6")
    again = extract(store.model_path, store.manifest["corpus"]["path"], sharded_root / "8_float32_b6",
                    **EXTRACT_SETTINGS, **EXTRACT_RUNS["8_float32_b6"][1])
    assert again.manifest["updated"] == store.manifest["updated"]  # nothing recomputed
