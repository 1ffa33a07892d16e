"""Checkpoint loading: config forms, hub-cache resolution, and clear errors for bad checkpoints."""
import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jsnmf.models as jm
import tiny_models as tm
from jsnmf.models.config import config_from_dict
from jsnmf.models.loading import SafetensorsFile


def _copy_checkpoint(kind, dst):
    src, _ = tm.checkpoint(kind)
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(directory, edit):
    """Apply ``edit(dict of arrays)`` to ``model.safetensors`` in place."""
    path = directory / "model.safetensors"
    tensors = dict(load_file(path))
    edit(tensors)
    save_file(tensors, path)
    return path


def test_hub_style_gpt2_names_and_mask_buffers(tmp_path):
    """Hub GPT-2 files have no ``transformer.`` prefix and carry ``attn.bias`` / ``attn.masked_bias`` buffers."""
    directory = _copy_checkpoint("gpt2", tmp_path / "gpt2")

    def to_hub_layout(t):
        for name in list(t):
            t[name.removeprefix("transformer.")] = t.pop(name)
        for i in range(3):
            t[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
            t[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)

    _rewrite_weights(directory, to_hub_layout)
    model, _ = jm.load(directory)
    reference, _ = tm.jsnmf_model("gpt2")
    ids, mask = tm.padded_batch(seed=20)
    np.testing.assert_array_equal(model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)


def test_public_config_fields():
    model, tok = tm.jsnmf_model("gemma2")
    cfg = model.config
    assert (cfg.model_type, cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.bos_token_id) == (
        "gemma2", 3, 64, 128, tm.VOCAB, 1)
    assert cfg.sliding_layers == (True, False, True) and cfg.sliding_window == 6
    assert cfg.head_dim == 32 and cfg.attn_scale == pytest.approx(24**-0.5)
    assert tok.pad_token_id == 0 and tok("w0 w1")["input_ids"] == [4, 5]
    assert jm.hook_name(3) == "blocks.3.mlp.hook_post"


def test_rope_parameters_and_legacy_rope_fields_agree():
    """transformers v5 writes ``rope_parameters``; hub files have ``rope_theta`` + ``rope_scaling``."""
    directory, _ = tm.checkpoint("llama")
    v5 = json.loads((directory / "config.json").read_text())
    assert "rope_parameters" in v5
    legacy = dict(v5)
    params = dict(legacy.pop("rope_parameters"))
    legacy["rope_theta"] = params.pop("rope_theta")
    legacy["rope_scaling"] = params
    a, b = config_from_dict(v5), config_from_dict(legacy)
    assert a == b
    assert a.rope_scaling is not None and a.rope_scaling.original_max_position_embeddings == 8
    # Gemma 2's legacy ``sliding_window_size`` and default layer types
    g = json.loads((tm.checkpoint("gemma2")[0] / "config.json").read_text())
    g_legacy = {k: v for k, v in g.items() if k not in ("layer_types", "sliding_window")}
    g_legacy["sliding_window_size"] = 6
    assert config_from_dict(g_legacy) == config_from_dict(g)


@pytest.mark.parametrize(
    "kind, change, message",
    [
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gpt2", {"activation_function": "gelu_10"}, "activation"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("gemma2", {"layer_types": ["sliding_attention"] * 2}, "layer_types"),
    ],
)
def test_unsupported_settings_raise(kind, change, message):
    raw = json.loads((tm.checkpoint(kind)[0] / "config.json").read_text())
    raw.update(change)
    with pytest.raises(ValueError, match=message):
        config_from_dict(raw)


def test_unknown_model_type(tmp_path):
    directory = _copy_checkpoint("gpt2", tmp_path / "m")
    raw = json.loads((directory / "config.json").read_text())
    raw["model_type"] = "mamba"
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"config\.json.*unsupported model_type 'mamba'"):
        jm.load(directory)


def test_missing_tensor_names_it(tmp_path):
    directory = _copy_checkpoint("llama", tmp_path / "m")
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*'model\.layers\.1\.mlp\.down_proj\.weight'.*model\.safetensors"):
        jm.load(directory)


def test_wrong_shape_names_file_and_tensor(tmp_path):
    directory = _copy_checkpoint("gemma2", tmp_path / "m")

    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]

    path = _rewrite_weights(directory, shrink)
    with pytest.raises(ValueError, match=rf"{path}.*'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(127, 64\), expected \(128, 64\)"):
        jm.load(directory)


def test_unexpected_tensor_is_an_error(tmp_path):
    directory = _copy_checkpoint("llama", tmp_path / "m")
    _rewrite_weights(directory, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_norm\.weight' is not used"):
        jm.load(directory)


def test_tied_lm_head_copy_must_match(tmp_path):
    directory = _copy_checkpoint("llama_tied", tmp_path / "m")
    path = _rewrite_weights(directory, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1.0}))
    with pytest.raises(ValueError, match=rf"{path}.*'lm_head\.weight' differs"):
        jm.load(directory, tokenizer=False)


def test_only_pickle_weights_is_refused(tmp_path):
    directory = _copy_checkpoint("gpt2", tmp_path / "m")
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        jm.load(directory)


def test_corrupt_safetensors(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        SafetensorsFile(bad)


def test_bfloat16_checkpoint_file_is_read(tmp_path):
    """Published Gemma 2 / Llama weights are stored as BF16: read them without NumPy bfloat16 support."""
    import torch
    from safetensors.torch import save_file as torch_save

    value = torch.randn(4, 8).to(torch.bfloat16)
    torch_save({"w": value}, tmp_path / "w.safetensors")
    arr = SafetensorsFile(tmp_path / "w.safetensors").get("w")
    np.testing.assert_array_equal(arr.astype(np.float32), value.float().numpy())


def test_hub_id_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache.*local checkpoint directory"):
        jm.load("someone/not-a-cached-model")


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    """A hub id resolves through the HF cache layout (models--org--name/snapshots/<rev>) offline."""
    src, _ = tm.checkpoint("gpt2")
    repo = tmp_path / "home" / "hub" / "models--tiny-org--tiny-gpt2"
    revision = "0" * 40
    shutil.copytree(src, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = jm.load("tiny-org/tiny-gpt2")
    reference, _ = tm.jsnmf_model("gpt2")
    ids, _ = tm.padded_batch(seed=21)
    np.testing.assert_array_equal(model(ids).logits, reference(ids).logits)
    assert tok.eos_token == "<eos>"


def test_bad_inputs_raise():
    model, _ = tm.jsnmf_model("gpt2")
    with pytest.raises(ValueError, match="out of range"):
        model(np.array([[1, 2, tm.VOCAB]]))
    with pytest.raises(ValueError, match="shape"):
        model(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(np.array([[1, 2, 3]]), attention_mask=np.array([[1, 2, 1]]))
    with pytest.raises(ValueError, match="n_positions"):
        model(np.ones((1, 65), np.int64))
    with pytest.raises(ValueError, match="dtype"):
        jm.load(tm.checkpoint("gpt2")[0], dtype="float16")
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(np.array([[1, 2]]), stop_at_layer=0)


def test_jax_array_inputs_accepted():
    model, _ = tm.jsnmf_model("gpt2")
    ids, mask = tm.padded_batch(seed=22)
    a = model(jax.numpy.asarray(ids), attention_mask=jax.numpy.asarray(mask), capture=[0, 1, 2])
    b = model(ids, attention_mask=mask, capture=[0, 1, 2])
    np.testing.assert_array_equal(a.logits, b.logits)
