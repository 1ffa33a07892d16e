"""ActivationStore: round trips in every dtype, chunked reads, atomic commits and resume."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from jsnmf import store as store_module
from jsnmf.store import writer as writer_module
from jsnmf.corpus import Document
from jsnmf.store import ActivationStore, remove_store

LAYERS = [1, 4]
D_MLP = 6
N = 23


def random_run(seed=0, n=N):
    rng = np.random.default_rng(seed)
    acts = {layer: rng.normal(scale=3.0, size=(n, D_MLP)).astype(np.float32) for layer in LAYERS}
    doc_index = np.repeat(np.arange(5), [5, 4, 6, 3, 5])[:n]
    meta = {
        "token_ids": rng.integers(0, 100, n),
        "doc_index": doc_index,
        "positions": np.concatenate([np.arange(1, k + 1) for k in [5, 4, 6, 3, 5]])[:n],
        "label_index": np.where(doc_index % 2 == 0, doc_index % 3, -1),
    }
    return acts, meta


def append_range(writer, acts, meta, start, stop):
    writer.append(
        {layer: a[start:stop] for layer, a in acts.items()},
        meta["token_ids"][start:stop], meta["doc_index"][start:stop],
        meta["positions"][start:stop], meta["label_index"][start:stop],
    )


def create(path, dtype="float32", chunk_tokens=7, **meta):
    documents = [Document(f"doc {i}", ["a", "b", None][i % 3]) for i in range(5)]
    return ActivationStore.create(
        path, layers=LAYERS, d_mlp=D_MLP, dtype=dtype, chunk_tokens=chunk_tokens,
        meta={"model_type": "test", "tokenizer": {"path": "/some/tokenizer"}, **meta},
        documents=documents, labels=["a", "b", "c"],
    )


def write_store(path, acts, meta, dtype="float32", cuts=(0, 3, 4, 15, N)):
    writer = create(path, dtype)
    for start, stop in zip(cuts[:-1], cuts[1:]):
        append_range(writer, acts, meta, start, stop)
    return writer.close()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    acts, meta = random_run()
    store = write_store(tmp_path / "s", acts, meta, dtype)
    disk = store_module.DTYPES[dtype]
    expected = {layer: a.astype(disk) for layer, a in acts.items()}

    reopened = ActivationStore.open(tmp_path / "s")
    assert reopened.layers == LAYERS and reopened.n_tokens == N and reopened.d_mlp == D_MLP
    assert reopened.dtype == dtype and reopened.complete
    assert reopened.chunk_bounds == [(0, 7), (7, 14), (14, 21), (21, 23)]
    assert reopened.hook_names == ["blocks.1.mlp.hook_post", "blocks.4.mlp.hook_post"]
    for layer in LAYERS:
        full = reopened.layer_array(layer)
        assert full.dtype == np.float32
        np.testing.assert_array_equal(full, expected[layer].astype(np.float32))
        raw = reopened.read(layer, raw=True)
        assert raw.dtype == disk
        np.testing.assert_array_equal(raw.view(np.uint8), expected[layer].view(np.uint8))
        # Ranges inside one chunk, across chunks, empty and up to the end.
        for start, stop in [(0, 1), (3, 9), (6, 22), (13, 13), (20, N)]:
            np.testing.assert_array_equal(reopened.read(layer, start, stop),
                                          expected[layer][start:stop].astype(np.float32))
        starts = []
        for start, chunk in reopened.iter_chunks(layer):
            stop = start + len(chunk)
            assert chunk.dtype == np.float32
            np.testing.assert_array_equal(chunk, expected[layer][start:stop].astype(np.float32))
            starts.append(start)
        assert starts == [a for a, _ in reopened.chunk_bounds]
        raw_chunk = next(reopened.iter_chunks(layer, raw=True))[1]
        assert raw_chunk.dtype == disk and raw_chunk.shape == (7, D_MLP)
    np.testing.assert_array_equal(reopened.token_ids, meta["token_ids"])
    np.testing.assert_array_equal(reopened.doc_index, meta["doc_index"])
    np.testing.assert_array_equal(reopened.positions, meta["positions"])
    np.testing.assert_array_equal(reopened.label_index, meta["label_index"])
    assert reopened.token_ids.dtype == np.int32
    assert reopened.labels == ["a", "b", "c"]
    assert reopened.documents == [f"doc {i}" for i in range(5)]
    assert reopened.document_labels == ["a", "b", None, "a", "b"]
    assert reopened.tokenizer_path == "/some/tokenizer"


def test_bfloat16_is_stored_as_uint16_bits_in_plain_npy(tmp_path):
    acts, meta = random_run()
    store = write_store(tmp_path / "s", acts, meta, "bfloat16")
    on_disk = np.load(store.chunk_path(1, 0), allow_pickle=False)  # readable without ml_dtypes
    assert on_disk.dtype == np.uint16
    np.testing.assert_array_equal(on_disk.view(ml_dtypes.bfloat16).astype(np.float32),
                                  acts[1][:7].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_manifest_contents(tmp_path):
    acts, meta = random_run()
    store = write_store(tmp_path / "s", acts, meta)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest == store.manifest
    assert manifest["format"] == "jsnmf.activation_store" and manifest["format_version"] == 1
    assert manifest["chunks"] == [[0, 7], [7, 14], [14, 21], [21, 23]]
    assert manifest["model_type"] == "test" and manifest["chunk_tokens"] == 7
    assert manifest["token_columns"] == ["token_id", "doc_index", "position", "label_index"]
    assert {"jsnmf_version", "created", "n_documents", "labels"} <= set(manifest)


def test_chunks_are_committed_as_soon_as_full(tmp_path):
    acts, meta = random_run()
    writer = create(tmp_path / "s")
    append_range(writer, acts, meta, 0, 16)
    writer.flush()  # commits run in a background thread
    assert writer.n_committed == 14 and writer.n_tokens == 16
    visible = ActivationStore.open(tmp_path / "s", allow_incomplete=True)
    assert visible.chunk_bounds == [(0, 7), (7, 14)] and not visible.complete
    np.testing.assert_array_equal(visible.read(4), acts[4][:14])
    with pytest.raises(ValueError, match=r"incomplete \(14 tokens committed\)"):
        ActivationStore.open(tmp_path / "s")
    writer.close()


def test_resume_after_crash_mid_commit_is_identical(tmp_path, monkeypatch):
    acts, meta = random_run()
    reference = write_store(tmp_path / "ref", acts, meta, "float16")

    # Crash while writing the files of the third chunk: one layer file already in place, no manifest update.
    real_save = writer_module.save_npy_atomic
    calls = {"n": 0}

    def crashing_save(path, array):
        calls["n"] += 1
        if calls["n"] == 2 * (len(LAYERS) + 1) + 2:
            raise KeyboardInterrupt("simulated kill")
        real_save(path, array)

    monkeypatch.setattr(writer_module, "save_npy_atomic", crashing_save)
    writer = create(tmp_path / "s", "float16")
    for start, stop in [(0, 5), (5, 12), (12, 23)]:
        append_range(writer, acts, meta, start, stop)
    with pytest.raises(KeyboardInterrupt):  # raised in the commit thread, re-raised here
        writer.close()
    assert not (tmp_path / "s" / "layer_01" / "chunk_000003.npy").exists()  # no commit after the failure
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["chunks"] == [[0, 7], [7, 14]]
    monkeypatch.setattr(writer_module, "save_npy_atomic", real_save)
    (tmp_path / "s" / "tokens" / "chunk_000002.npy.tmp").write_bytes(b"half a file")
    assert (tmp_path / "s" / "layer_01" / "chunk_000002.npy").exists()  # orphan of the unfinished chunk

    resumed = ActivationStore.resume(tmp_path / "s")
    assert resumed.n_committed == 14
    assert not (tmp_path / "s" / "layer_01" / "chunk_000002.npy").exists()
    assert not (tmp_path / "s" / "tokens" / "chunk_000002.npy.tmp").exists()
    append_range(resumed, acts, meta, 14, N)
    result = resumed.close()

    assert result.chunk_bounds == reference.chunk_bounds
    for index in range(len(reference.chunk_bounds)):
        for sub in ["layer_01", "layer_04", "tokens"]:
            name = f"chunk_{index:06d}.npy"
            assert (tmp_path / "s" / sub / name).read_bytes() == (tmp_path / "ref" / sub / name).read_bytes()


def write_chunks_by_record(path, acts, meta, first_chunk, stop):
    """Tokens ``[7·first_chunk, stop)`` written as another process of an extraction writes them."""
    writer = writer_module.ChunkWriter(path, json.loads((path / "manifest.json").read_text()), first_chunk)
    append_range(writer, acts, meta, 7 * first_chunk, stop)
    writer.finish()


def test_chunks_committed_by_record_in_any_order_make_the_same_store(tmp_path):
    """Chunks of 7 tokens: 0-7, 7-14, 14-21, 21-23. Written by record out of order, with a gap, and
    completed by the writer holding the store, the files equal those of one writer in order."""
    acts, meta = random_run()
    reference = write_store(tmp_path / "ref", acts, meta, "bfloat16")
    path = tmp_path / "s"
    create(path, "bfloat16", n_tokens_expected=N).abort()
    write_chunks_by_record(path, acts, meta, 2, N)  # chunks 2 and 3, the short last one included
    write_chunks_by_record(path, acts, meta, 0, 7)
    assert sorted(p.name for p in (path / "commits").iterdir()) == [
        "chunk_000000.json", "chunk_000002.json", "chunk_000003.json"]
    assert ActivationStore.open(path, allow_incomplete=True).n_tokens == 0  # the manifest lists none yet

    holder = ActivationStore.resume(path)  # lists chunk 0 (no gap before it); 2 and 3 wait for chunk 1
    assert holder.n_committed == 7 and holder.has_records
    assert sorted(p.name for p in (path / "commits").iterdir()) == ["chunk_000002.json", "chunk_000003.json"]
    write_chunks_by_record(path, acts, meta, 1, 14)
    holder.adopt_records()
    assert holder.n_committed == N and not holder.has_records
    store = holder.close()
    assert store.chunk_bounds == reference.chunk_bounds and not (path / "commits").exists()
    assert store.manifest["checksums"] == reference.manifest["checksums"]
    for sub in ["layer_01", "layer_04", "tokens"]:
        for index in range(4):
            name = f"{sub}/chunk_{index:06d}.npy"
            assert (path / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    np.testing.assert_array_equal(store.read(4), ActivationStore.open(tmp_path / "ref").read(4))


def test_commit_records_are_checked(tmp_path):
    acts, meta = random_run()
    path = tmp_path / "s"
    create(path, n_tokens_expected=N).abort()
    writer = writer_module.ChunkWriter(path, json.loads((path / "manifest.json").read_text()), 1)
    append_range(writer, acts, meta, 7, 10)  # stops inside chunk 1, which is not the last
    with pytest.raises(RuntimeError, match="ended at token 10, inside chunk 1"):
        writer.finish()
    write_chunks_by_record(path, acts, meta, 1, 14)
    record = path / "commits" / "chunk_000001.json"
    record.write_text(record.read_text().replace('"start": 7', '"start": 8'))
    with pytest.raises(ValueError, match=r"corrupt manifest \(commits/chunk_000001.json\), a chunk's commit record"):
        ActivationStore.resume(path)
    record.write_text("{")
    with pytest.raises(ValueError, match=r"commits/chunk_000001.json"):
        ActivationStore.resume(path)
    remove_store(path)
    assert not path.exists() or sorted(p.name for p in path.iterdir()) == [".lock"]


def test_commit_errors_reach_the_caller(tmp_path, monkeypatch):
    acts, meta = random_run()
    writer = create(tmp_path / "s")

    def disk_full(path, blocks):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module, "save_npy_atomic", disk_full)
    append_range(writer, acts, meta, 0, 8)  # hands chunk 0 to the commit thread
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    with pytest.raises(OSError, match="No space left"):
        append_range(writer, acts, meta, 8, 9)
    writer.abort()
    assert ActivationStore.open(tmp_path / "s", allow_incomplete=True).n_tokens == 0


def test_only_one_writer_at_a_time(tmp_path):
    writer = create(tmp_path / "s")
    with pytest.raises(ValueError, match="another process is writing"):
        ActivationStore.resume(tmp_path / "s")
    writer.abort()
    ActivationStore.resume(tmp_path / "s").abort()


def test_append_validation(tmp_path):
    acts, meta = random_run()
    writer = create(tmp_path / "s", "float16")
    ones = np.ones(3)
    with pytest.raises(ValueError, match=r"layer_acts has layers \[1\], the store has \[1, 4\]"):
        writer.append({1: acts[1][:3]}, ones, ones, ones, ones)
    with pytest.raises(ValueError, match=r"activations of layer 4 have shape \(3, 5\)"):
        writer.append({1: acts[1][:3], 4: acts[4][:3, :5]}, ones, ones, ones, ones)
    with pytest.raises(ValueError, match=r"doc_index has shape \(2,\)"):
        writer.append({1: acts[1][:3], 4: acts[4][:3]}, ones, ones[:2], ones, ones)
    big = acts[4][:3] * 1e5
    with pytest.raises(ValueError, match=r"layer 4 overflow float16 \(max \|x\| = "):
        writer.append({1: acts[1][:3], 4: big}, ones, ones, ones, ones)
    nan = acts[1][:3].copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"layer 1 are not finite"):
        writer.append({1: nan, 4: acts[4][:3]}, ones, ones, ones, ones)
    with pytest.raises(ValueError, match="no tokens were written"):
        writer.close()


def test_create_validation(tmp_path):
    kwargs = dict(layers=[0], d_mlp=4, dtype="float32", chunk_tokens=8)
    with pytest.raises(ValueError, match="unknown store dtype 'int8'"):
        ActivationStore.create(tmp_path / "a", **{**kwargs, "dtype": "int8"})
    with pytest.raises(ValueError, match="distinct"):
        ActivationStore.create(tmp_path / "a", **{**kwargs, "layers": [2, 2]})
    with pytest.raises(ValueError, match="may not set the store's own manifest keys"):
        ActivationStore.create(tmp_path / "a", **kwargs, meta={"n_tokens": 3})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="directory is not empty"):
        ActivationStore.create(tmp_path / "full", **kwargs)
    # What a create killed before its manifest leaves behind is cleaned up, not refused.
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "documents.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "killed" / "layer_00").mkdir()
    ActivationStore.create(tmp_path / "killed", **kwargs).abort()
    assert (tmp_path / "killed" / "manifest.json").exists()


def test_open_errors(tmp_path):
    with pytest.raises(ValueError, match=r"not a jsnmf activation store \(no such directory\)"):
        ActivationStore.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: not a jsnmf activation store \(no manifest.json\)"):
        ActivationStore.open(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"format": "zarr"}')
    with pytest.raises(ValueError, match="other: not a jsnmf activation store"):
        ActivationStore.open(tmp_path / "other")

    acts, meta = random_run()
    store = write_store(tmp_path / "s", acts, meta)
    with pytest.raises(ValueError, match=r"layer 2 is not in the store"):
        store.read(2)
    with pytest.raises(ValueError, match=r"token range \[5, 30\) is outside"):
        store.read(1, 5, 30)
    os.remove(store.chunk_path(4, 1))
    with pytest.raises(ValueError, match=r"committed chunk file .*layer_04/chunk_000001.npy is missing"):
        ActivationStore.open(tmp_path / "s")


def test_remove_store_only_removes_store_files(tmp_path):
    acts, meta = random_run()
    write_store(tmp_path / "s", acts, meta)
    remove_store(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".lock"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a jsnmf activation store"):
        remove_store(tmp_path / "plain")
