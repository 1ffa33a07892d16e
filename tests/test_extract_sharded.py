"""Data-parallel extraction: the store made on 8 and on 4 simulated CPU devices (whole batches dealt
out to the devices in turn, written back in order) is byte-identical to the store made on one device;
with the parameters sharded over a second mesh axis it equals it up to float32 rounding.

A worker process (``sharded_worker.py extract``, started with 8 simulated devices) extracts the first
documents of the demo corpus with the demo model; this process (one device) makes the references.
"""

import json

import numpy as np
import pytest

import sharded_worker as worker
from sharded_worker import EXTRACT_RUNS, EXTRACT_SETTINGS, SHARDED_PARAMETERS_RUN

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
        for name, (_, settings) in [*EXTRACT_RUNS.items(), (SHARDED_PARAMETERS_RUN[0], (None, SHARDED_PARAMETERS_RUN[1]))]:
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


def test_parameters_sharded_over_a_second_mesh_axis(stores):
    """Mesh (4 data, 2 model): each of 4 copies of the parameters is split over 2 devices; XLA splits the
    matmuls, so the activations equal the one-device ones up to float32 rounding, and all else is equal."""
    sharded_root, single_root = stores
    name = SHARDED_PARAMETERS_RUN[0]
    layout = json.loads((sharded_root / f"{name}_parameters.json").read_text())
    assert layout["copies"] == 4
    split = [(shape, part) for shape, part in layout["shapes"] if part != shape]
    assert all(part[:-1] == shape[:-1] and part[-1] * 2 == shape[-1] for shape, part in split)  # the last axis
    assert len(split) >= len(layout["shapes"]) * 3 // 4  # the matrices and most vectors are split
    sharded, single = ActivationStore.open(sharded_root / name), ActivationStore.open(single_root / name)
    assert sharded.chunk_bounds == single.chunk_bounds and sharded.manifest["extract_devices"] == 8
    np.testing.assert_array_equal(sharded.token_ids, single.token_ids)
    np.testing.assert_array_equal(sharded.positions, single.positions)
    for layer in single.layers:
        reference = single.read(layer)
        # Each block has a few matmuls of contraction length <= d_mlp; their float32 rounding, summed
        # over the blocks up to this layer, bounds the difference relative to the activations' scale.
        bound = 4 * (layer + 1) * single.d_mlp * np.finfo(np.float32).eps * np.abs(reference).max()
        difference = np.abs(sharded.read(layer) - reference).max()
        assert difference <= bound, (layer, difference, bound)
