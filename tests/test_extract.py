"""Extraction into an ActivationStore, proven against transformers' PyTorch GPT-2 on a tiny checkpoint.

Covers: equality with a direct forward pass (hook on ``mlp.act``), BOS handling, store dtypes, resume
after SIGKILL (byte-identical to an uninterrupted run), input validation and refusing to mix stores.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from jsnmf.extract import bucket_length, extract
from jsnmf.store import ActivationStore

WORDS = (
    "the a cat dog sat on mat ran fast slow red blue green big small house tree river city night day "
    "sun moon star sky sea boat car road bird fish eats sleeps sings walks jumps under over near far"
).split()
SPECIALS = ["<unk>", "<pad>", "<bos>"]
LAYERS = [0, 1]


def save_tokenizer(directory: Path, adds_bos: bool) -> None:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:  # like Llama / Gemma tokenizers
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<bos>"
    )
    fast.save_pretrained(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoint dirs with the same tiny random GPT-2: a tokenizer without BOS (GPT-2-like) and with."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(SPECIALS) + len(WORDS),
        bos_token_id=2, eos_token_id=2, pad_token_id=1,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    dirs = {}
    for adds_bos in (False, True):
        directory = root / ("bos" if adds_bos else "plain")
        model.save_pretrained(directory)
        save_tokenizer(directory, adds_bos)
        dirs[adds_bos] = directory
    with torch.no_grad():  # a copy whose layer-0 MLP activations exceed float16's range
        loud = transformers.GPT2LMHeadModel(config).eval()
        loud.load_state_dict(model.state_dict())
        loud.transformer.h[0].mlp.c_fc.bias.fill_(1e5)
    loud.save_pretrained(root / "loud")
    save_tokenizer(root / "loud", adds_bos=False)
    return {"plain": dirs[False], "bos": dirs[True], "loud": root / "loud", "torch": model}


def make_texts(n: int, seed: int = 0, longest: int = 22) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, longest, n)
    if longest > 8:
        lengths[3] = 45  # longer than max_length below: truncated
    return [" ".join(rng.choice(WORDS + ["zebra"], k)) for k in lengths]  # "zebra" is unknown


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    texts = make_texts(13)
    records = [{"prompt": t, "label": ["animals", "places"][i % 2] if i % 5 else None} for i, t in enumerate(texts)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.json"
    path.write_text(json.dumps(records))
    return path


def torch_mlp_activations(model, ids: list[int]) -> dict[int, np.ndarray]:
    """hook_post of each layer for one unpadded sequence, from transformers (the reference)."""
    captured = {}
    handles = [
        model.transformer.h[layer].mlp.act.register_forward_hook(
            lambda mod, inp, out, layer=layer: captured.__setitem__(layer, out[0].detach().numpy())
        )
        for layer in LAYERS
    ]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return captured


def reference(checkpoints, tokenizer_dir, texts, labels, max_length, keep_from):
    """Expected store contents computed document by document with transformers."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    label_list = sorted({label for label in labels if label is not None})
    acts = {layer: [] for layer in LAYERS}
    columns = {"token_ids": [], "doc_index": [], "positions": [], "label_index": []}
    for doc, (text, label) in enumerate(zip(texts, labels)):
        ids = tokenizer(text)["input_ids"][:max_length]
        per_layer = torch_mlp_activations(checkpoints["torch"], ids)
        for layer in LAYERS:
            acts[layer].append(per_layer[layer][keep_from:])
        n = len(ids) - keep_from
        columns["token_ids"].append(ids[keep_from:])
        columns["doc_index"].append([doc] * n)
        columns["positions"].append(list(range(keep_from, len(ids))))
        columns["label_index"].append([label_list.index(label) if label is not None else -1] * n)
    return ({layer: np.concatenate(a) for layer, a in acts.items()},
            {k: np.concatenate(v).astype(np.int64) for k, v in columns.items()})


def read_all(store: ActivationStore) -> dict[int, np.ndarray]:
    return {layer: store.layer_array(layer) for layer in store.layers}


def test_extraction_equals_direct_forward_pass(checkpoints, corpus_file, tmp_path):
    store = extract(checkpoints["plain"], corpus_file, tmp_path / "s", layers=LAYERS, max_length=32,
                    batch_size=4, chunk_tokens=20, add_bos=None, progress=False)  # as the tokenizer: no BOS
    records = json.loads(corpus_file.read_text())
    texts, labels = [r["prompt"] for r in records], [r["label"] for r in records]
    expected_acts, expected_columns = reference(checkpoints, checkpoints["plain"], texts, labels, 32, keep_from=0)

    assert store.n_tokens == len(expected_columns["token_ids"])
    assert all(stop - start == 20 for start, stop in store.chunk_bounds[:-1])
    for layer in LAYERS:
        np.testing.assert_allclose(store.layer_array(layer), expected_acts[layer], rtol=1e-4, atol=2e-5)
    for name, values in expected_columns.items():
        np.testing.assert_array_equal(getattr(store, name), values, err_msg=name)
    assert store.documents == texts
    assert store.labels == ["animals", "places"]
    m = store.manifest
    assert m["model_type"] == "gpt2" and m["hook_names"] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert m["bos_present"] is False and m["bos_dropped"] is False and m["tokenizer"]["adds_bos"] is False
    assert m["bos"] == {"policy": "tokenizer", "token_id": m["bos"]["token_id"], "tokenizer_adds": False,
                        "prepended": False, "removed": False, "present": False, "dropped_from_x": False,
                        "padding_dropped_from_x": True}
    assert m["n_truncated_documents"] == 1 and m["max_length"] == 32
    assert m["corpus"]["sha256"] and m["corpus"]["path"] == str(corpus_file.resolve())
    assert store.tokenizer_path == str(checkpoints["plain"].resolve())
    assert m["complete"] and m["n_tokens_expected"] == store.n_tokens


def test_bos_is_dropped_by_default_and_kept_on_request(checkpoints, corpus_file, tmp_path):
    records = json.loads(corpus_file.read_text())
    texts, labels = [r["prompt"] for r in records], [r["label"] for r in records]
    dropped = extract(checkpoints["bos"], corpus_file, tmp_path / "dropped", layers=LAYERS, max_length=32,
                      batch_size=4, progress=False)
    expected_acts, expected_columns = reference(checkpoints, checkpoints["bos"], texts, labels, 32, keep_from=1)
    assert dropped.manifest["tokenizer"]["adds_bos"] and dropped.manifest["bos_dropped"]
    assert dropped.positions.min() == 1 and 2 not in dropped.token_ids  # no <bos> rows
    for layer in LAYERS:
        np.testing.assert_allclose(dropped.layer_array(layer), expected_acts[layer], rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(dropped.token_ids, expected_columns["token_ids"])

    kept = extract(checkpoints["bos"], corpus_file, tmp_path / "kept", layers=LAYERS, max_length=32,
                   batch_size=4, drop_bos=False, progress=False)
    expected_acts, expected_columns = reference(checkpoints, checkpoints["bos"], texts, labels, 32, keep_from=0)
    assert not kept.manifest["bos_dropped"] and kept.n_tokens == dropped.n_tokens + len(texts)
    np.testing.assert_allclose(kept.layer_array(1), expected_acts[1], rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(kept.positions, expected_columns["positions"])

    # The default (the paper's: BOS prepended for every family, then dropped) on the BOS-less tokenizer
    # gives the same tokens and activations as the tokenizer that adds BOS itself.
    added = extract(checkpoints["plain"], corpus_file, tmp_path / "added", layers=LAYERS, max_length=32,
                    batch_size=4, progress=False)
    assert added.manifest["bos_present"] and not added.manifest["tokenizer"]["adds_bos"]
    assert added.manifest["bos"]["policy"] == "prepend" and added.manifest["bos"]["prepended"]
    assert added.manifest["bos"]["dropped_from_x"] and not dropped.manifest["bos"]["prepended"]
    assert added.positions.min() == 1
    np.testing.assert_array_equal(added.token_ids, dropped.token_ids)
    np.testing.assert_array_equal(added.layer_array(0), dropped.layer_array(0))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stores_round_the_float32_activations(checkpoints, corpus_file, tmp_path, dtype):
    full = extract(checkpoints["plain"], corpus_file, tmp_path / "f32", layers=LAYERS, max_length=32, batch_size=4,
                   progress=False)
    half = extract(checkpoints["plain"], corpus_file, tmp_path / dtype, layers=LAYERS, max_length=32, batch_size=4,
                   dtype=dtype, progress=False)
    disk = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    assert half.dtype == dtype and half.read(1, raw=True).dtype == disk
    for layer in LAYERS:
        np.testing.assert_array_equal(half.read(layer, raw=True), full.layer_array(layer).astype(disk))
    np.testing.assert_array_equal(half.token_ids, full.token_ids)


def test_float16_overflow_is_reported_by_layer(checkpoints, corpus_file, tmp_path):
    with pytest.raises(ValueError, match=r"activations of layer 0 overflow float16 \(max \|x\| = 1(\.0\d*)?e\+05, documents 0\.\.3\)"):
        extract(checkpoints["loud"], corpus_file, tmp_path / "f16", layers=LAYERS, max_length=32, batch_size=4,
                dtype="float16", progress=False)
    store = extract(checkpoints["loud"], corpus_file, tmp_path / "bf16", layers=LAYERS, max_length=32,
                    batch_size=4, dtype="bfloat16", progress=False)
    assert store.read(0).max() >= 9.9e4


def test_bucket_lengths():
    assert [bucket_length(n, 128) for n in (1, 8, 9, 16, 17, 100, 128)] == [8, 8, 16, 16, 32, 128, 128]
    assert bucket_length(40, 45) == 45


def manifest_of(path: Path) -> dict | None:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_resume_after_sigkill_is_byte_identical(checkpoints, tmp_path):
    corpus = tmp_path / "corpus.txt"
    # Short documents (one padded length, so the child compiles one shape) in 10 batches of 4.
    corpus.write_text("\n".join(make_texts(40, seed=1, longest=8)) + "\n")
    settings = dict(layers=LAYERS, max_length=32, batch_size=4, chunk_tokens=16, dtype="bfloat16")
    reference_store = extract(checkpoints["plain"], corpus, tmp_path / "ref", progress=False, **settings)
    assert len(reference_store.chunk_bounds) >= 6

    out = tmp_path / "killed"
    child_code = (
        "import sys; from jsnmf.extract import extract; "
        f"extract(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, **{settings!r})"
    )
    env = {**os.environ, "JSNMF_EXTRACT_SLEEP_PER_BATCH": "0.3", "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", child_code, str(checkpoints["plain"]), str(corpus), str(out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while True:
            manifest = manifest_of(out)
            if manifest and manifest["chunks"]:
                break
            assert child.poll() is None, f"extraction child exited early: {child.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no chunk was committed within 120 s"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    killed = manifest_of(out)
    assert not killed["complete"] and 0 < killed["n_tokens"] < reference_store.n_tokens
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore.open(out)

    resumed = extract(checkpoints["plain"], corpus, out, progress=False, **settings)
    assert resumed.complete and resumed.chunk_bounds == reference_store.chunk_bounds
    for sub in ["layer_00", "layer_01", "tokens"]:
        names = sorted(p.name for p in (out / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "ref" / sub).iterdir())
        for name in names:
            assert (out / sub / name).read_bytes() == (tmp_path / "ref" / sub / name).read_bytes(), f"{sub}/{name}"
    assert (out / "documents.jsonl").read_bytes() == (tmp_path / "ref" / "documents.jsonl").read_bytes()
    assert not list(out.rglob("*.tmp"))


def test_refuses_to_mix_stores(checkpoints, corpus_file, tmp_path):
    out = tmp_path / "s"
    common = dict(max_length=32, batch_size=4, progress=False)
    first = extract(checkpoints["plain"], corpus_file, out, layers=LAYERS, **common)
    # Same run again: the complete store is returned as is, nothing recomputed.
    again = extract(checkpoints["plain"], corpus_file, out, layers=LAYERS, **common)
    assert again.manifest["updated"] == first.manifest["updated"]

    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("the cat sat\nthe dog ran\n")
    with pytest.raises(ValueError, match=r"refusing to resume.*corpus_sha256"):
        extract(checkpoints["plain"], other_corpus, out, layers=LAYERS, **common)
    with pytest.raises(ValueError, match=r"refusing to resume.*layers: \[0, 1\] in the store, \[1\] now"):
        extract(checkpoints["plain"], corpus_file, out, layers=[1], **common)
    with pytest.raises(ValueError, match=r"refusing to resume.*model: "):
        extract(checkpoints["bos"], corpus_file, out, layers=LAYERS, **common)
    with pytest.raises(ValueError, match=r"refusing to resume.*dtype: 'float32' in the store, 'float16' now"):
        extract(checkpoints["plain"], corpus_file, out, layers=LAYERS, dtype="float16", **common)

    replaced = extract(checkpoints["plain"], other_corpus, out, layers=[1], resume=False, **common)
    assert replaced.layers == [1] and replaced.documents == ["the cat sat", "the dog ran"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "documents.jsonl", "layer_01", "manifest.json", "tokens"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a store")
    with pytest.raises(ValueError, match="directory is not empty"):
        extract(checkpoints["plain"], corpus_file, foreign, layers=LAYERS, **common)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": [2]}, r"layers \[2\] are out of range: the gpt2 model has n_layers=2"),
        ({"layers": [0, -1]}, r"layers \[-1\] are out of range"),
        ({"layers": []}, "non-empty list"),
        ({"layers": [1, 1]}, "duplicates"),
        ({"layers": [0], "dtype": "int8"}, "unknown store dtype 'int8'"),
        ({"layers": [0], "max_length": 0}, "max_length must be a positive integer"),
        ({"layers": [0], "batch_size": 2.5}, "batch_size must be a positive integer"),
        ({"layers": [0], "compute_dtype": "float16"}, "compute_dtype must be"),
        ({"layers": [0], "max_length": 100}, "max_length=100 exceeds the model's 64 positions"),
    ],
)
def test_bad_settings(checkpoints, corpus_file, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        extract(checkpoints["plain"], corpus_file, tmp_path / "s", progress=False, **{"max_length": 32, **kwargs})
    assert not (tmp_path / "s").exists()


def test_no_tokens_after_dropping_bos(checkpoints, corpus_file, tmp_path):
    with pytest.raises(ValueError, match=r"corpus.json: no tokens to extract after dropping BOS \(max_length=1"):
        extract(checkpoints["bos"], corpus_file, tmp_path / "s", layers=[0], max_length=1, progress=False)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "the cat"}\n{"txt": "x"}\n', r"bad\.jsonl:2: missing field 'text'"),
        ("bad.jsonl", '{"text": "the cat"}\n{"text": \n', r"bad\.jsonl:2: malformed JSON line"),
        ("bad.json", '[{"prompt": ["a"], "label": "x"}]', r"bad\.json: record 0: text must be a string"),
        ("bad.txt", "", r"bad\.txt: the corpus file is empty"),
        ("bad.txt", b"the cat\n\xc3\x28\n", r"bad\.txt:2: not valid UTF-8"),
    ],
)
def test_bad_corpus_is_reported_before_loading_the_model(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError, match=message):
        extract(tmp_path / "no-model-here", path, tmp_path / "s", layers=[0], progress=False)
