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
        ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
         r"full_attention rope.*unsupported rope type 'yarn' \(supported: default, linear, llama3\)"),
        ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "dynamic", "factor": 2.0}}},
         r"sliding_attention rope.*unsupported rope type 'dynamic'"),
        ("gemma3", {"rope_parameters": None, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}},
         "unsupported rope type 'longrope'"),
        ("gemma3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "keyed by layer type"),
        ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "linear"}}}, "positive factor"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma3_multimodal", {"text_config": None}, "text_config"),
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
    with pytest.raises(ValueError, match=r"\(read model\.safetensors\).*missing 1 tensor.*'model\.layers\.1\.mlp\.down_proj\.weight'"):
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


# ---- Gemma 3 -------------------------------------------------------------------------------------


def test_gemma3_legacy_and_v5_configs_agree():
    """Hub Gemma 3 files have ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` (global layers
    only) and ``sliding_window_pattern``; transformers v5 writes per-layer-type ``rope_parameters`` and
    ``layer_types``."""
    v5 = json.loads((tm.checkpoint("gemma3_linear")[0] / "config.json").read_text())
    assert set(v5["rope_parameters"]) == {"full_attention", "sliding_attention"}
    legacy = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
    legacy.update(rope_theta=5000.0, rope_local_base_freq=300.0, sliding_window_pattern=2,
                  rope_scaling={"rope_type": "linear", "factor": 4.0})
    a, b = config_from_dict(v5), config_from_dict(legacy)
    assert a == b
    assert a.sliding_layers == (True, False, True, False) and a.qk_norm
    assert (a.rope_theta, a.rope_scaling.factor, a.rope_local_theta, a.rope_local_scaling) == (5000.0, 4.0, 300.0, None)


def test_gemma3_multimodal_hub_config_uses_transformers_defaults():
    """gemma-3-4b-it style: the text_config states a few sizes, the rest are Gemma3TextConfig defaults;
    the token ids at the top level win."""
    raw = {
        "model_type": "gemma3", "eos_token_id": [1, 106], "image_token_index": 262144,
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    cfg = config_from_dict(raw)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == (8, 4, 256, 262_208)
    assert cfg.attn_scale == pytest.approx(256**-0.5) and cfg.sliding_window == 1024
    assert cfg.sliding_layers == tuple((i + 1) % 6 != 0 for i in range(34))
    assert (cfg.rope_theta, cfg.rope_scaling.factor, cfg.rope_local_theta, cfg.rope_local_scaling) == (1e6, 8.0, 1e4, None)
    assert cfg.eos_token_ids == (1, 106) and cfg.bos_token_id == 2 and cfg.tie_word_embeddings
    assert cfg.activation == "gelu_tanh" and cfg.attn_softcap is None and cfg.final_softcap is None


def _renamed(tensors, old_prefix, new_prefix):
    for name in [n for n in tensors if n.startswith(old_prefix)]:
        tensors[new_prefix + name[len(old_prefix):]] = tensors.pop(name)


def test_gemma3_multimodal_checkpoint_matches_torch(tmp_path):
    """A ``Gemma3ForConditionalGeneration`` checkpoint: the language model is read from its prefixed
    tensors (hub ``language_model.model.``, v5 ``model.language_model.``), the vision tensors are
    skipped, and the logits and MLP activations equal transformers' multimodal model on text."""
    directory, hf = tm.checkpoint("gemma3_multimodal")
    names = SafetensorsFile(directory / "model.safetensors").keys()
    assert any(n.startswith("language_model.model.layers.") for n in names)
    assert any(n.startswith("vision_tower.") for n in names) and any(n.startswith("multi_modal_projector.") for n in names)
    model, _ = tm.jsnmf_model("gemma3_multimodal")
    assert model.config.model_type == "gemma3" and model.config.qk_norm
    ids, mask = tm.padded_batch(seed=23, side="left")
    out = model(ids, attention_mask=mask, capture=[0, 3])
    ref_logits, ref_acts = tm.torch_forward(hf, ids, mask, capture=[0, 3])
    valid = mask.astype(bool)
    assert np.abs(ref_logits).max() > 0.5
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref_logits[valid], atol=1e-4)
    for layer in (0, 3):
        np.testing.assert_allclose(np.asarray(out.mlp_activations[layer])[valid], ref_acts[layer][valid], atol=1e-4)

    # the other layout of the same weights: v5 prefixes, vision tensors under ``model.``
    other = _copy_checkpoint("gemma3_multimodal", tmp_path / "v5")

    def to_v5_layout(t):
        _renamed(t, "language_model.model.", "model.language_model.")
        _renamed(t, "vision_tower.", "model.vision_tower.vision_model.")
        _renamed(t, "multi_modal_projector.", "model.multi_modal_projector.")

    _rewrite_weights(other, to_v5_layout)
    again, _ = jm.load(other, tokenizer=False)
    np.testing.assert_array_equal(np.asarray(again(ids, attention_mask=mask).logits), np.asarray(out.logits))

    # only the vision prefixes are skipped: any other unknown tensor is still an error
    _rewrite_weights(other, lambda t: t.update({"model.language_model.layers.0.self_attn.q_bias": np.ones(64, np.float32)}))
    with pytest.raises(ValueError, match=r"'model\.language_model\.layers\.0\.self_attn\.q_bias' is not used"):
        jm.load(other, tokenizer=False)


def test_gemma3_missing_query_norm_is_named(tmp_path):
    directory = _copy_checkpoint("gemma3", tmp_path / "m")
    _rewrite_weights(directory, lambda t: t.pop("model.layers.2.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*'model\.layers\.2\.self_attn\.k_norm\.weight'"):
        jm.load(directory, tokenizer=False)


# -- hostile checkpoints (hardening): refused promptly, with the file named ----------------------

def _set_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("kind, key", [("gpt2", "n_layer"), ("llama", "num_hidden_layers")])
def test_declared_layer_count_is_checked_before_building(tmp_path, kind, key):
    """A config declaring a million layers used to build a million-block model (minutes, GBs)."""
    import time

    directory = _copy_checkpoint(kind, tmp_path / "m")
    _set_config(directory, **{key: 1_000_000})
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"declares 1000000 layers but the checkpoint has layers 0\.\.2"):
        jm.load(directory, tokenizer=False)
    assert time.monotonic() - started < 30  # refused before anything is built (was minutes)


def test_fifo_named_model_safetensors_is_refused_without_blocking(tmp_path):
    import os

    directory = _copy_checkpoint("llama", tmp_path / "m")
    (directory / "model.safetensors").unlink()
    os.mkfifo(directory / "model.safetensors")  # opening it for reading would wait for a writer forever
    with pytest.raises(ValueError, match=r"model\.safetensors: not a regular file"):
        jm.load(directory, tokenizer=False)


@pytest.mark.parametrize("target", ["../../outside.safetensors", "/etc/passwd"])
def test_index_pointing_outside_the_directory_is_refused(tmp_path, target):
    directory = _copy_checkpoint("llama", tmp_path / "m")
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": target}}))
    with pytest.raises(ValueError, match=r"index\.json: weight_map points outside the checkpoint directory"):
        jm.load(directory, tokenizer=False)


def test_missing_tokenizer_files_are_named(tmp_path):
    """transformers builds an empty tokenizer from a bare directory, which failed much later with a
    misleading 'no tokens to extract'."""
    directory = _copy_checkpoint("llama", tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files"):
        jm.load(directory)
