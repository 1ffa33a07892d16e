"""TransformerLens capture points besides hook_post, against transformers on tiny checkpoints:
``blocks.{L}.hook_mlp_out`` (a hand-written hook on what the block adds to the residual stream: the
MLP module's output, after Gemma 2's post-feed-forward norm) and ``blocks.{L}.hook_resid_post``
(``hidden_states[L + 1]``; the last layer by a hook on the block, as transformers norms that entry)."""
import jax
import numpy as np
import pytest
import torch

import jsnmf.models as jm
import tiny_models as tm
from jsnmf.layout import hook_name, parse_hook_name

ATOL = 1e-4


def _blocks(hf):
    if hasattr(hf, "transformer"):
        return hf.transformer.h
    return getattr(hf.model, "language_model", hf.model).layers


def _mlp_out_module(hf, layer):
    block = _blocks(hf)[layer]
    return getattr(block, "post_feedforward_layernorm", None) or block.mlp


def _torch_sites(hf, ids, mask, layers):
    mlp_out, block_out, handles = {}, {}, []
    for layer in layers:
        handles.append(_mlp_out_module(hf, layer).register_forward_hook(
            lambda m, a, out, layer=layer: mlp_out.__setitem__(layer, out.detach().clone())))
        handles.append(_blocks(hf)[layer].register_forward_hook(
            lambda m, a, out, layer=layer: block_out.__setitem__(layer, (out[0] if isinstance(out, tuple) else out)
                                                                  .detach().clone())))
    try:
        with torch.inference_mode():
            out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     position_ids=tm.torch_positions(mask), use_cache=False, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    as64 = lambda t: t.float().numpy().astype(np.float64)  # noqa: E731
    return ({l: as64(v) for l, v in mlp_out.items()}, {l: as64(v) for l, v in block_out.items()},
            [as64(h) for h in out.hidden_states])


def _err(ours, ref, mask):
    keep = mask.astype(bool)
    return float(np.abs(np.asarray(ours, np.float64)[keep] - ref[keep]).max())


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2"])
def test_mlp_out_and_resid_post_match_transformers(kind):
    model, _ = tm.jsnmf_model(kind)
    _, hf = tm.checkpoint(kind)
    n = model.config.n_layers
    ids, mask = tm.padded_batch(seed=3, side="right")
    names = [hook_name(l, s) for l in range(n) for s in ("hook_mlp_out", "hook_resid_post")] + [0]
    with jax.default_matmul_precision("highest"):
        out = model(ids, attention_mask=mask, capture=names)
    mlp_out, block_out, hidden = _torch_sites(hf, ids, mask, range(n))
    assert sorted(out.mlp_activations) == [0]  # ints still mean hook_post
    for layer in range(n):
        got = out.hook(f"blocks.{layer}.hook_mlp_out")
        assert got.shape == (3, 24, model.config.d_model)
        assert np.abs(mlp_out[layer]).max() > 0.1
        assert _err(got, mlp_out[layer], mask) < ATOL
        resid = out.activations[f"blocks.{layer}.hook_resid_post"]
        reference = hidden[layer + 1] if layer < n - 1 else block_out[layer]
        assert _err(resid, reference, mask) < ATOL
    np.testing.assert_allclose(block_out[n - 2], hidden[n - 1], atol=1e-6)  # the hook reads what HF returns


def test_stop_at_layer_runs_the_tail_for_residual_sites():
    model, _ = tm.jsnmf_model("llama")
    ids, mask = tm.padded_batch(seed=4)
    full = model(ids, attention_mask=mask, capture=["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"])
    early = model(ids, attention_mask=mask, capture=["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", 1],
                  stop_at_layer=2)
    assert early.logits is None
    for name in ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"):
        np.testing.assert_allclose(early.hook(name), full.hook(name), atol=1e-6)
    assert early.hook("blocks.1.mlp.hook_post") is early.mlp_activations[1]
    with pytest.raises(ValueError, match="hook_resid_post"):
        model(ids, capture=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="out of range"):
        model(ids, capture=["blocks.9.hook_mlp_out"])


def test_hook_names_round_trip():
    for site in ("hook_post", "hook_mlp_out", "hook_resid_post"):
        assert parse_hook_name(hook_name(7, site)) == (7, site)
    assert hook_name(2, "hook_resid_post") == "blocks.2.hook_resid_post"
    with pytest.raises(ValueError, match="hook_post|hook_mlp_out"):  # steering stays at its two sites
        jm.Steering("blocks.0.hook_resid_post", np.ones(4))
