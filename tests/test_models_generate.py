"""KV-cached generation against ``transformers`` ``generate(do_sample=False)``, steering during
generation, and the sampling options."""
import jax
import numpy as np
import pytest
import torch

import jsnmf.models as jm
import tiny_models as tm

N_NEW = 20
LENGTHS = (12, 7, 3)  # with 20 new tokens every row runs past the sliding windows (Gemma 2: 6, Gemma 3: 5)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _hf_generate(hf, ids, mask, steer=None):
    """Greedy tokens from transformers; ``steer=(layer, vector, alpha)`` adds alpha·v to the MLP
    activation through a pre-hook on the down-projection, at every prompt and generated token."""
    handle = None
    if steer is not None:
        layer, vector, alpha = steer
        delta = alpha * torch.as_tensor(vector)
        handle = tm.mlp_down_module(hf, layer).register_forward_pre_hook(lambda m, args: (args[0] + delta,))
    try:
        with torch.inference_mode():
            out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              max_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
    finally:
        if handle is not None:
            handle.remove()
    return out[:, ids.shape[1]:].numpy()


def _assert_same_tokens(ours, ref):
    # transformers stops when every row has emitted EOS; rows that stopped earlier are padded alike
    assert ref.shape[1] <= N_NEW
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2_untied", "gemma3_linear"])
def test_greedy_matches_transformers(kind):
    model, _ = tm.jsnmf_model(kind)
    _, hf = tm.checkpoint(kind)
    ids, mask = tm.padded_batch(seed=11, lengths=LENGTHS, side="left")
    out = jm.generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW)
    assert out.new_tokens.shape == (3, N_NEW)
    _assert_same_tokens(out.new_tokens, _hf_generate(hf, ids, mask))
    # right-padded input is re-packed to the left and gives the same tokens
    rids, rmask = tm.padded_batch(seed=11, lengths=LENGTHS, side="right")
    again = jm.generate(model, rids, attention_mask=rmask, max_new_tokens=N_NEW)
    np.testing.assert_array_equal(again.new_tokens, out.new_tokens)


@pytest.mark.parametrize("kind", ["gpt2", "gemma2_untied", "gemma3_linear"])
def test_steered_greedy_matches_transformers(kind):
    model, _ = tm.jsnmf_model(kind)
    _, hf = tm.checkpoint(kind)
    ids, mask = tm.padded_batch(seed=12, lengths=LENGTHS, side="left")
    vector = np.random.default_rng(12).normal(size=model.config.d_mlp).astype(np.float32)
    steering = jm.Steering(1, vector, alpha=4.0, normalize=False)
    out = jm.generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW, steering=[steering])
    ref = _hf_generate(hf, ids, mask, steer=(1, vector, 4.0))
    _assert_same_tokens(out.new_tokens, ref)
    assert (ref != _hf_generate(hf, ids, mask)).any()  # the steering changes the generation
    # alpha = 0 generates exactly the unsteered tokens
    zero = jm.generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW, steering=[jm.Steering(1, vector, alpha=0.0)])
    plain = jm.generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW)
    np.testing.assert_array_equal(zero.new_tokens, plain.new_tokens)


def test_sampling_is_seeded_and_filters():
    model, _ = tm.jsnmf_model("llama")
    ids, mask = tm.padded_batch(seed=13, lengths=LENGTHS, side="left")
    greedy = jm.generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW).new_tokens
    sample = lambda **kw: jm.generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW, temperature=1.0, **kw)

    a, b, c = sample(top_k=5, seed=1), sample(top_k=5, seed=1), sample(top_k=5, seed=2)
    np.testing.assert_array_equal(a.new_tokens, b.new_tokens)
    assert (a.new_tokens != c.new_tokens).any()
    # every sampled token is among the 5 most likely ones given its prefix (teacher-forced check)
    seq, full_mask = a.sequences, np.concatenate([a.prompt_mask, np.ones_like(a.new_tokens)], axis=1)
    logits = np.asarray(model(seq, attention_mask=full_mask).logits)
    width = a.prompt_mask.shape[1]
    top5 = np.argsort(logits, axis=-1)[..., -5:]
    for r in range(seq.shape[0]):
        for t in range(N_NEW):
            assert seq[r, width + t] in top5[r, width + t - 1]
            if seq[r, width + t] in model.config.eos_token_ids:
                break  # padding follows

    np.testing.assert_array_equal(sample(top_k=1, seed=3).new_tokens, greedy)
    np.testing.assert_array_equal(sample(top_p=1e-6, seed=4).new_tokens, greedy)


def test_string_prompts_return_text():
    model, tok = tm.jsnmf_model("gpt2")
    # shapes as in the greedy test (3 rows, padded width 16), so the compiled loop is reused
    prompts = [" ".join(f"w{i}" for i in range(20, 32)), "w5 w6 w7", "w9"]
    out = jm.generate(model, prompts, tokenizer=tok, max_new_tokens=N_NEW)
    assert out.new_tokens.shape == (3, N_NEW)
    assert len(out.text) == 3
    for row in range(3):
        assert out.text[row] == tok.decode(out.new_tokens[row], skip_special_tokens=True)
    # the same prompts as token ids (right-padded) give the same tokens
    words = [p.split() for p in prompts]
    ids = np.zeros((3, 12), np.int64)
    mask = np.zeros((3, 12), np.int64)
    for row, ws in enumerate(words):
        ids[row, : len(ws)] = tok.convert_tokens_to_ids(ws)
        mask[row, : len(ws)] = 1
    np.testing.assert_array_equal(jm.generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW).new_tokens, out.new_tokens)


def test_generate_errors():
    model, tok = tm.jsnmf_model("gpt2")
    ids = np.array([[5, 6, 7]])
    with pytest.raises(ValueError, match="tokenizer"):
        jm.generate(model, ["w1 w2"])
    with pytest.raises(ValueError, match="positions"):
        jm.generate(model, ids, steering=jm.Steering(0, np.ones(model.config.d_mlp), positions=[0]))
    with pytest.raises(ValueError, match="top_p"):
        jm.generate(model, ids, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="n_positions"):
        jm.generate(model, ids, max_new_tokens=64)
    with pytest.raises(ValueError, match="out of range"):
        jm.generate(model, np.array([[5, 999]]))
