"""The ports against transformers on tiny random checkpoints: logits, MLP activations, steering,
vocabulary projection. Float32, ``highest`` matmul precision, padded batches (left and right)."""
import jax
import numpy as np
import pytest
import torch

import jsnmf.models as jm
import tiny_models as tm

KINDS = ["gpt2", "llama", "llama_tied", "gemma2", "gemma", "gemma3", "gemma3_linear"]
# the target families; tied Llama, Gemma 1 and Gemma 3 with linear RoPE get the forward checks
CORE_KINDS = ["gpt2", "llama", "gemma2", "gemma3"]
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _valid(mask):
    return mask.astype(bool)


def _max_err(ours, ref, mask):
    return float(np.abs(np.asarray(ours, np.float64)[_valid(mask)] - ref[_valid(mask)]).max())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_torch(kind, side):
    model, _ = tm.jsnmf_model(kind)
    _, hf = tm.checkpoint(kind)
    layers = list(range(model.config.n_layers))
    ids, mask = tm.padded_batch(seed=1, side=side)
    out = model(ids, attention_mask=mask, capture=layers)
    ref_logits, ref_acts = tm.torch_forward(hf, ids, mask, capture=layers)
    assert out.logits.shape == (3, 24, model.config.vocab_size)
    assert np.abs(ref_logits).max() > 0.5  # the check is not vacuous
    assert _max_err(out.logits, ref_logits, mask) < ATOL
    assert sorted(out.mlp_activations) == layers
    for layer in layers:
        assert out.mlp_activations[layer].shape == (3, 24, model.config.d_mlp)
        assert _max_err(out.mlp_activations[layer], ref_acts[layer], mask) < ATOL


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_capture_by_hook_name_and_stop_at_layer(kind):
    model, _ = tm.jsnmf_model(kind)
    ids, mask = tm.padded_batch(seed=2, side="left")
    full = model(ids, attention_mask=mask, capture=list(range(model.config.n_layers)))
    early = model(ids, attention_mask=jax.numpy.asarray(mask), capture=[jm.hook_name(1), 0], stop_at_layer=2)
    assert early.logits is None
    assert sorted(early.mlp_activations) == [0, 1]
    for layer in (0, 1):
        np.testing.assert_allclose(early.mlp_activations[layer], full.mlp_activations[layer], atol=1e-6)
    assert early.hook("blocks.1.mlp.hook_post") is early.mlp_activations[1]
    with pytest.raises(ValueError, match="not run"):
        model(ids, capture=[1], stop_at_layer=1)
    with pytest.raises(ValueError, match="hook name"):
        model(ids, capture=["blocks.0.attn.hook_z"])


def _steering(model, alphas, seed, replace_positions=None):
    """One steering structure for every steering test (so they share one compiled forward):
    add on layer 0 everywhere, add on the last layer at columns 3 and -1, replace on layer 1."""
    rng = np.random.default_rng(seed)
    d_mlp, last = model.config.d_mlp, model.config.n_layers - 1
    v0, v1, v2 = (rng.normal(size=d_mlp).astype(np.float32) for _ in range(3))
    steering = [
        jm.Steering(0, v0, alpha=alphas[0], normalize=False),  # raw alpha·v (unit: test_evaluation_steering)
        jm.Steering(last, v1, alpha=alphas[1], positions=[3, -1], normalize=False),
        jm.Steering(1, v2, alpha=alphas[2], mode="replace", positions=replace_positions),
    ]
    return steering, (v0, v1, v2)


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_steering_matches_torch_hooks(kind):
    model, _ = tm.jsnmf_model(kind)
    _, hf = tm.checkpoint(kind)
    layers = list(range(model.config.n_layers))
    last = layers[-1]
    ids, mask = tm.padded_batch(seed=3, side="left")
    steering, (v0, v1, v2) = _steering(model, (1.5, -0.7, 2.0), seed=3)
    out = model(ids, attention_mask=mask, capture=layers, steering=steering)

    cols = torch.zeros(ids.shape[1])
    cols[[3, ids.shape[1] - 1]] = 1.0
    unit = torch.as_tensor(v2 / np.linalg.norm(v2))
    edits = {
        0: lambda h: h + 1.5 * torch.as_tensor(v0),
        last: lambda h: h + (-0.7) * cols[None, :, None] * torch.as_tensor(v1),
        # replace: h ← h − (h·v̂)v̂ + alpha·v̂
        1: lambda h: h - (h @ unit)[..., None] * unit + 2.0 * unit,
    }
    ref_logits, ref_acts = tm.torch_forward(hf, ids, mask, capture=layers, edits=edits)
    unsteered, _ = tm.torch_forward(hf, ids, mask)
    assert np.abs(ref_logits - unsteered).max() > 1e-2  # the steering changes the output
    assert _max_err(out.logits, ref_logits, mask) < ATOL
    for layer in layers:
        assert _max_err(out.mlp_activations[layer], ref_acts[layer], mask) < ATOL
    # replace mode: the component along v̂ is now exactly alpha
    comp = np.asarray(out.mlp_activations[1]) @ unit.numpy()
    np.testing.assert_allclose(comp[_valid(mask)], 2.0, atol=1e-4)


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_alpha_zero_is_exactly_unsteered(kind):
    model, _ = tm.jsnmf_model(kind)
    layers = list(range(model.config.n_layers))
    ids, mask = tm.padded_batch(seed=5, side="left")
    plain = model(ids, attention_mask=mask, capture=layers)
    no_positions = np.zeros(ids.shape[1], bool)  # the replace entry acts nowhere
    steering, _ = _steering(model, (0.0, 0.0, 3.0), seed=5, replace_positions=no_positions)
    zero = model(ids, attention_mask=mask, capture=layers, steering=steering)
    np.testing.assert_array_equal(np.asarray(zero.logits), np.asarray(plain.logits))
    for layer in layers:
        np.testing.assert_array_equal(np.asarray(zero.mlp_activations[layer]), np.asarray(plain.mlp_activations[layer]))


def test_steering_errors():
    model, _ = tm.jsnmf_model("gpt2")
    ids, _ = tm.padded_batch()
    d_mlp = model.config.d_mlp
    with pytest.raises(ValueError, match="shape"):
        model(ids, steering=jm.Steering(0, np.ones(d_mlp + 1)))
    with pytest.raises(ValueError, match="out of range"):
        model(ids, steering=jm.Steering(7, np.ones(d_mlp)))
    with pytest.raises(ValueError, match="zero"):
        model(ids, steering=jm.Steering(0, np.zeros(d_mlp), mode="replace"))
    with pytest.raises(ValueError, match="mode"):
        jm.Steering(0, np.ones(d_mlp), mode="scale")
    with pytest.raises(ValueError, match="positions"):
        model(ids, steering=jm.Steering(0, np.ones(d_mlp), positions=[99]))


def _torch_project(hf, kind, layer, directions):
    """The reference vocabulary projection with the torch modules."""
    unit = torch.as_tensor(directions / np.linalg.norm(directions, axis=0)).T  # [k, d_mlp]
    with torch.inference_mode():
        if kind == "gpt2":
            resid = unit @ hf.transformer.h[layer].mlp.c_proj.weight
            x = hf.transformer.ln_f(resid)
        else:
            blk = hf.model.layers[layer]
            resid = torch.nn.functional.linear(unit, blk.mlp.down_proj.weight)
            if kind.startswith(("gemma2", "gemma3")):
                resid = blk.post_feedforward_layernorm(resid)
            x = hf.model.norm(resid)
        logits = hf.lm_head(x)
        cap = getattr(hf.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    return logits.numpy().astype(np.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_project_to_vocab_matches_torch(kind):
    model, _ = tm.jsnmf_model(kind)
    _, hf = tm.checkpoint(kind)
    rng = np.random.default_rng(6)
    directions = rng.normal(size=(model.config.d_mlp, 5)).astype(np.float32) * rng.uniform(0.1, 10, size=5).astype(np.float32)
    for layer in (0, model.config.n_layers - 1):
        ours = np.asarray(model.project_to_vocab(layer, directions))
        ref = _torch_project(hf, kind, layer, directions)
        assert ours.shape == (5, model.config.vocab_size)
        np.testing.assert_allclose(ours, ref, atol=ATOL)
    # unit-normalised first: the scale of a direction does not matter
    scaled = np.asarray(model.project_to_vocab(0, directions * 7.0))
    np.testing.assert_allclose(scaled, np.asarray(model.project_to_vocab(0, directions)), atol=1e-5)
    with pytest.raises(ValueError, match="zero"):
        model.project_to_vocab(0, np.zeros((model.config.d_mlp, 2), np.float32))
    with pytest.raises(ValueError, match="d_mlp"):
        model.project_to_vocab(0, np.ones((3, 2), np.float32))


def test_sharded_checkpoint_matches_torch():
    directory, hf = tm.checkpoint("llama_sharded")
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    model, _ = tm.jsnmf_model("llama_sharded")
    ids, mask = tm.padded_batch(seed=7, side="left")
    out = model(ids, attention_mask=mask, capture=[0, 1, 2])
    ref_logits, ref_acts = tm.torch_forward(hf, ids, mask, capture=[1])
    assert _max_err(out.logits, ref_logits, mask) < ATOL
    assert _max_err(out.mlp_activations[1], ref_acts[1], mask) < ATOL


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2"])
def test_bfloat16_loads_and_runs(kind):
    model, _ = tm.jsnmf_model(kind, "bfloat16")
    _, hf = tm.checkpoint(kind)
    assert model.dtype == jax.numpy.bfloat16
    ids, mask = tm.padded_batch(seed=8, side="left")
    out = model(ids, attention_mask=mask, capture=[0, 1, 2])
    assert out.logits.dtype == jax.numpy.bfloat16
    assert out.mlp_activations[1].dtype == jax.numpy.bfloat16
    ref_logits, ref_acts = tm.torch_forward(hf, ids, mask, capture=[1])
    scale = np.abs(ref_logits).max()
    assert _max_err(out.logits.astype(np.float32), ref_logits, mask) < 0.05 * scale
    assert _max_err(out.mlp_activations[1].astype(np.float32), ref_acts[1], mask) < 0.05 * np.abs(ref_acts[1]).max()


@pytest.mark.parametrize(
    "kind, feature",
    [("gemma2", "attn_softcap"), ("gemma2", "final_softcap"), ("gemma2", "sliding_layers"), ("llama", "rope_scaling"),
     ("gemma3", "sliding_layers"), ("gemma3", "sliding_window"), ("gemma3", "qk_norm"), ("gemma3", "rope_local_theta"),
     ("gemma3_linear", "rope_scaling")],
)
def test_tiny_configs_exercise_each_feature(kind, feature):
    """Switching a feature off changes the logits clearly, so the parity tests above do test it."""
    import dataclasses

    model, _ = tm.jsnmf_model(kind)
    ids, mask = tm.padded_batch(seed=9, side="left")
    reference = np.asarray(model(ids, attention_mask=mask).logits)
    off = {"sliding_layers": (False,) * model.config.n_layers, "qk_norm": False,
           "sliding_window": 1000}.get(feature, None)  # a window wider than the batch: no window
    variant, _ = jm.load(tm.checkpoint(kind)[0], tokenizer=False)
    variant.config = dataclasses.replace(model.config, **{feature: off})
    changed = np.asarray(variant(ids, attention_mask=mask).logits)
    assert np.abs(changed - reference)[_valid(mask)].max() > 1e-2
