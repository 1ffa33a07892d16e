"""The offline demo: corpus, checkpoint (against transformers and our loader), and `jsnmf run` end to end."""

import hashlib
import json
import re

import numpy as np
import pytest

from jsnmf import demo


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return demo.build_demo_model(tmp_path_factory.mktemp("demo") / "model")


def _words(text):
    from tokenizers import normalizers, pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(normalizers.Lowercase().normalize_str(text))]


# ---------------------------------------------------------------- corpus


def test_shipped_corpus_is_the_generated_one():
    assert demo.read_demo_corpus() == demo.compose_corpus()


def test_corpus_labels_match_the_concept_words():
    records = demo.read_demo_corpus()
    assert 300 <= len(records) <= 600
    concept_of = {w: c for c, words in demo.CONCEPTS.items() for w in words}
    counts = {w: 0 for w in concept_of}
    for r in records:
        present = sorted({concept_of[w] for w in _words(r["text"]) if w in concept_of})
        assert r["label"] == ("+".join(present) if present else "filler"), r
        for w in _words(r["text"]):
            if w in counts:
                counts[w] += 1
    assert len(demo.CONCEPTS) >= 8
    assert min(counts.values()) >= 3, "every concept word appears a few times"


# ---------------------------------------------------------------- checkpoint


def test_build_is_deterministic_and_reused(model_dir, tmp_path):
    other = demo.build_demo_model(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "planted.json"):
        assert hashlib.sha256((model_dir / name).read_bytes()).digest() == \
            hashlib.sha256((other / name).read_bytes()).digest(), name
    stamp = (other / "model.safetensors").stat().st_mtime_ns
    assert demo.build_demo_model(other) == other
    assert (other / "model.safetensors").stat().st_mtime_ns == stamp  # an existing build is reused


def test_rebuild_replaces_only_the_demo_files(model_dir, tmp_path):
    """A stale demo (here: another corpus hash) is rebuilt in place; a user's files beside it survive
    (the rebuild used to delete the whole folder)."""
    import json
    import shutil

    stale = tmp_path / "stale"
    shutil.copytree(model_dir, stale)
    (stale / "notes.txt").write_text("mine")
    record = json.loads((stale / "planted.json").read_text())
    record["corpus_sha256"] = "0" * 64
    (stale / "planted.json").write_text(json.dumps(record))
    (stale / "model.safetensors").write_bytes(b"stale")
    assert demo.build_demo_model(stale) == stale.resolve()
    assert (stale / "notes.txt").read_text() == "mine"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "planted.json"):
        assert (stale / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".stale.")]  # no scratch left


def test_build_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a jsnmf demo model"):
        demo.build_demo_model(tmp_path / "x")


def _pad(sequences):
    """Right-padded ids (pad 0) and the attention mask."""
    length = max(len(ids) for ids in sequences)
    ids = np.zeros((len(sequences), length), np.int64)
    mask = np.zeros((len(sequences), length), np.int64)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
    return ids, mask


def _torch_forward(model_dir, texts):
    """transformers ids, logits and MLP activations (input of c_proj) per text, in one padded batch."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model, info = GPT2LMHeadModel.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    captured = {}
    for i, block in enumerate(model.transformer.h):
        block.mlp.c_proj.register_forward_pre_hook(lambda mod, a, i=i: captured.__setitem__(i, a[0].numpy()))
    sequences = [tokenizer(text)["input_ids"] for text in texts]
    ids, mask = _pad(sequences)
    with torch.no_grad():
        logits = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    return tokenizer, [(seq, logits[row, :len(seq)], {layer: a[row, :len(seq)] for layer, a in captured.items()})
                       for row, seq in enumerate(sequences)]


def test_checkpoint_loads_in_transformers_and_our_loader_with_equal_logits(model_dir):
    from jsnmf import models

    texts = [r["text"] for r in demo.read_demo_corpus()[:8]]
    _, reference = _torch_forward(model_dir, texts)
    model, tokenizer = models.load(model_dir)
    assert model.config.n_layers == 2 and model.config.d_mlp == demo.DemoSpec().d_mlp
    sequences = [tokenizer(text)["input_ids"] for text in texts]
    assert sequences == [ids for ids, _, _ in reference]
    ids, mask = _pad(sequences)
    out = model(ids.astype(np.int32), attention_mask=mask.astype(np.int32), capture=[0, 1])
    for row, (seq, logits, acts) in enumerate(reference):
        n = len(seq)
        np.testing.assert_allclose(np.asarray(out.logits)[row, :n], logits, atol=2e-4, rtol=1e-4)
        for layer in (0, 1):
            np.testing.assert_allclose(np.asarray(out.mlp_activations[layer])[row, :n], acts[layer],
                                       atol=2e-5, rtol=1e-4)


def test_planted_groups_fire_on_their_concept_words_only(model_dir):
    planted = demo.read_planted(model_dir)
    records = demo.read_demo_corpus()
    tokenizer, results = _torch_forward(model_dir, [r["text"] for r in records[:120]])
    concept_of = {w: c for c, words in demo.CONCEPTS.items() for w in words}
    seen = set()
    for ids, _, acts in results:
        words = tokenizer.convert_ids_to_tokens(ids)
        for layer in (0, 1):
            for concept, neurons in planted["layers"][str(layer)].items():
                assert len(neurons) == demo.DemoSpec().group_size
                group = acts[layer][:, neurons]
                for word, row in zip(words, group):
                    if concept_of.get(word) == concept:
                        assert row.min() > 0.5, (layer, concept, word, row)
                        seen.add(concept)
                    else:
                        assert row.max() < 0.05, (layer, concept, word, row)
    assert seen == set(demo.CONCEPTS)


def test_vocab_projection_of_a_planted_group_names_its_concept(model_dir):
    from jsnmf import models

    model, tokenizer = models.load(model_dir)
    planted = demo.read_planted(model_dir)
    for concept, neurons in planted["layers"]["1"].items():
        direction = np.zeros((model.config.d_mlp, 1), np.float32)
        direction[neurons, 0] = 1.0
        logits = np.asarray(model.project_to_vocab(1, direction))[0]
        top = tokenizer.convert_ids_to_tokens(np.argsort(-logits)[:5].tolist())
        assert set(top) <= set(demo.CONCEPTS[concept]), (concept, top)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_demo_end_to_end_recovers_the_planted_concepts(tmp_path, capsys):
    from jsnmf.cli import main
    from jsnmf.report import read_features

    run = tmp_path / "demo-run"
    assert main(["--quiet", "run", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"recovered (\d+)/(\d+) planted concepts", last)
    assert match, out
    recovered, total = int(match[1]), int(match[2])
    assert total == len(demo.CONCEPTS) * len(demo.DEMO_LAYERS)
    assert recovered >= 0.9 * total, out
    assert f"report:      {run / 'report' / 'index.html'}" in out

    recovery = json.loads((run / "recovery.json").read_text())
    assert recovery["recovered"] == recovered
    planted = demo.read_planted(run / "demo-model")
    for layer in demo.DEMO_LAYERS:
        data = read_features(run / "report" / f"layer_{layer:02d}" / "features.json")
        assert data["rank"] == demo.DEMO_RANK
        for concept, result in recovery["layers"][str(layer)]["concepts"].items():
            if not result["recovered"]:
                continue
            feature = data["features"][result["feature"]]
            # the recovered feature is the planted neuron group, and it reads out as the concept
            neurons = {n["neuron"] for n in feature["top_neurons"][:demo.DemoSpec().group_size]}
            assert len(neurons & set(planted["layers"][str(layer)][concept])) >= demo.DemoSpec().group_size - 2
            assert {v["token"] for v in feature["vocab_top"][:3]} <= set(demo.CONCEPTS[concept])
            assert feature["label_shares"].get(concept, 0) >= 0.5
