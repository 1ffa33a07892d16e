"""Steering as the paper does it: unit directions at ``hook_post`` and ``hook_mlp_out`` against hand-written
transformers hooks on tiny random models (forward and KV-cached generation), the Gemma feature map,
steering the planted demo model, and the KL-matched search for α."""
import jax
import numpy as np
import pytest
import torch

import jsnmf.models as jm
from planted import planted_direction
import tiny_models as tm
from jsnmf import demo
from jsnmf.evaluation import alpha_for_kl, kl_at, next_token_kl, site_activations
from jsnmf.evaluation.steering import _search

ATOL = 1e-4
SITE_KINDS = ["gpt2", "llama", "gemma2", "gemma3"]


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _unit(v):
    return v / np.linalg.norm(v)


# ---------------------------------------------------------------- transformers references


def _mlp_out_module(hf, layer):
    """The module whose output is ``hook_mlp_out``: GPT-2's MLP (dropout included, off in eval), Llama's
    MLP, Gemma 2/3's post-feed-forward norm (applied to the MLP's output before the residual add)."""
    if hasattr(hf, "transformer"):
        return hf.transformer.h[layer].mlp
    block = hf.model.layers[layer]
    return getattr(block, "post_feedforward_layernorm", block.mlp)


def _hooks(hf, post_edits=None, out_edits=None, captured=None):
    """Register hand-written hooks: ``post_edits`` {layer: fn(h)} on the down-projection's input,
    ``out_edits`` {layer: fn(out)} on the MLP output; ``captured`` collects the (edited) MLP outputs."""
    handles = []
    for layer, fn in (post_edits or {}).items():
        handles.append(tm.mlp_down_module(hf, layer).register_forward_pre_hook(
            lambda m, args, fn=fn: (fn(args[0]),) + tuple(args[1:])))
    for layer in set(out_edits or {}) | set(captured if captured is not None else {}):
        def hook(m, args, out, layer=layer):
            if out_edits and layer in out_edits:
                out = out_edits[layer](out)
            if captured is not None and layer in captured:
                captured[layer] = out.detach().clone().numpy().astype(np.float64)
            return out
        handles.append(_mlp_out_module(hf, layer).register_forward_hook(hook))
    return handles


def _torch_logits(hf, ids, mask, **hooks):
    handles = _hooks(hf, **hooks)
    try:
        with torch.inference_mode():
            out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     position_ids=tm.torch_positions(mask), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.logits.float().numpy().astype(np.float64)


def _max_err(ours, ref, mask):
    keep = mask.astype(bool)
    return float(np.abs(np.asarray(ours, np.float64)[keep] - ref[keep]).max())


# ---------------------------------------------------------------- both sites against transformers


def test_unit_direction_is_the_default():
    model, _ = tm.jsnmf_model("gpt2")
    ids, mask = tm.padded_batch(seed=20)
    v = np.random.default_rng(20).normal(size=model.config.d_mlp) * 37.0
    unit = (v / np.linalg.norm(v)).astype(np.float32)
    a = model(ids, attention_mask=mask, steering=jm.Steering(1, v, alpha=2.5)).logits
    b = model(ids, attention_mask=mask, steering=jm.Steering(1, unit, alpha=2.5, normalize=False)).logits
    c = model(ids, attention_mask=mask, steering=jm.Steering(1, v, alpha=2.5, normalize=False)).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-2  # the raw vector is 37× longer


@pytest.mark.parametrize("kind", SITE_KINDS)
def test_both_sites_match_torch_hooks(kind):
    model, _ = tm.jsnmf_model(kind)
    _, hf = tm.checkpoint(kind)
    cfg, last = model.config, model.config.n_layers - 1
    ids, mask = tm.padded_batch(seed=21, side="left")
    rng = np.random.default_rng(21)
    v0 = rng.normal(size=cfg.d_mlp) * 5
    u1, u2 = (rng.normal(size=cfg.d_model) * 3 for _ in range(2))
    steering = [
        jm.Steering(0, v0, alpha=1.5),                                        # blocks.0.mlp.hook_post
        jm.Steering("blocks.1.hook_mlp_out", u1, alpha=-2.0),                  # the residual site
        jm.Steering(last, u2, alpha=0.8, site="hook_mlp_out", positions=[3, -1]),
    ]
    assert [s.hook for s in steering] == ["blocks.0.mlp.hook_post", "blocks.1.hook_mlp_out",
                                          f"blocks.{last}.hook_mlp_out"]
    out = model(ids, attention_mask=mask, capture=[0, 1], steering=steering)

    cols = torch.zeros(ids.shape[1])
    cols[[3, ids.shape[1] - 1]] = 1.0
    t = lambda x: torch.as_tensor(_unit(x), dtype=torch.float32)  # noqa: E731
    captured = {1: None}
    ref = _torch_logits(hf, ids, mask, post_edits={0: lambda h: h + 1.5 * t(v0)},
                        out_edits={1: lambda o: o - 2.0 * t(u1), last: lambda o: o + 0.8 * cols[None, :, None] * t(u2)},
                        captured=captured)
    assert np.abs(ref - _torch_logits(hf, ids, mask)).max() > 1e-2  # the steering changes the output
    assert _max_err(out.logits, ref, mask) < ATOL
    # hook_mlp_out as read by the evaluation (bias included for GPT-2) is the module's output (+ steering)
    mlp_out = site_activations(model, out.mlp_activations[1], 1, "hook_mlp_out") - 2.0 * _unit(u1)
    assert _max_err(mlp_out, captured[1], mask) < ATOL


@pytest.mark.parametrize("kind", ["gpt2", "gemma2", "gemma3"])
def test_feature_to_mlp_out_matches_torch(kind):
    """The paper's map: down-projection (no bias), then Gemma's post-feed-forward norm, normalised."""
    model, _ = tm.jsnmf_model(kind)
    _, hf = tm.checkpoint(kind)
    f = np.random.default_rng(22).normal(size=model.config.d_mlp).astype(np.float32) * 40
    with torch.inference_mode():
        x = torch.as_tensor(f)[None]
        if kind == "gpt2":
            y = x @ hf.transformer.h[1].mlp.c_proj.weight
        else:
            block = hf.model.layers[1]
            y = block.post_feedforward_layernorm(block.mlp.down_proj(x))
    expected = _unit(y[0].numpy().astype(np.float64))
    u = jm.feature_to_mlp_out(model, 1, f)
    assert u.shape == (model.config.d_model,)
    np.testing.assert_allclose(u, expected, atol=1e-5)
    with pytest.raises(ValueError, match="zero"):
        jm.feature_to_mlp_out(model, 1, np.zeros(model.config.d_mlp))


@pytest.mark.parametrize("kind", ["gpt2", "gemma2_untied"])
def test_generate_steers_both_sites_at_every_token(kind):
    model, _ = tm.jsnmf_model(kind)
    _, hf = tm.checkpoint(kind)
    ids, mask = tm.padded_batch(seed=23, lengths=(12, 7, 3), side="left")
    rng = np.random.default_rng(23)
    v, u = rng.normal(size=model.config.d_mlp), rng.normal(size=model.config.d_model)
    steering = [jm.Steering(1, v, alpha=3.0), jm.Steering(0, u, alpha=3.0, site="hook_mlp_out")]
    out = jm.generate(model, ids, attention_mask=mask, max_new_tokens=12, steering=steering)

    def hf_generate(**hooks):
        handles = _hooks(hf, **hooks)
        try:
            with torch.inference_mode():
                res = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                  max_new_tokens=12, do_sample=False, pad_token_id=0)
        finally:
            for h in handles:
                h.remove()
        return res[:, ids.shape[1]:].numpy()

    t = lambda x: torch.as_tensor(_unit(x), dtype=torch.float32)  # noqa: E731
    ref = hf_generate(post_edits={1: lambda h: h + 3.0 * t(v)}, out_edits={0: lambda o: o + 3.0 * t(u)})
    np.testing.assert_array_equal(out.new_tokens[:, :ref.shape[1]], ref)
    assert (ref != hf_generate()).any()  # the steering changes the generation


def test_steering_validation():
    model, _ = tm.jsnmf_model("gpt2")
    ids, _ = tm.padded_batch()
    cfg = model.config
    with pytest.raises(ValueError, match="shape"):  # hook_mlp_out vectors are d_model wide
        model(ids, steering=jm.Steering(0, np.ones(cfg.d_mlp), site="hook_mlp_out"))
    with pytest.raises(ValueError, match="zero"):
        model(ids, steering=jm.Steering(0, np.zeros(cfg.d_mlp)))
    model(ids, steering=jm.Steering(0, np.zeros(cfg.d_mlp), normalize=False))  # a raw zero vector is fine
    with pytest.raises(ValueError, match="hook_post"):
        jm.Steering(0, np.ones(cfg.d_model), mode="replace", site="hook_mlp_out")
    with pytest.raises(ValueError, match="site"):
        jm.Steering(0, np.ones(cfg.d_mlp), site="hook_resid_post")
    with pytest.raises(ValueError, match="hook"):
        jm.Steering("blocks.0.attn.hook_z", np.ones(cfg.d_mlp))
    with pytest.raises(ValueError, match="contradicts"):
        jm.Steering("blocks.0.mlp.hook_post", np.ones(cfg.d_mlp), site="hook_mlp_out")


def test_replace_with_a_raw_vector_sets_the_projection_to_alpha_v():
    model, _ = tm.jsnmf_model("gpt2")
    ids, mask = tm.padded_batch(seed=24)
    v = np.random.default_rng(24).normal(size=model.config.d_mlp) * 3
    out = model(ids, attention_mask=mask, capture=[1],
                steering=jm.Steering(1, v, alpha=0.5, mode="replace", normalize=False))
    comp = np.asarray(out.mlp_activations[1], np.float64) @ _unit(v)
    np.testing.assert_allclose(comp[mask.astype(bool)], 0.5 * np.linalg.norm(v), rtol=1e-4)


# ---------------------------------------------------------------- the planted demo model




def _prompt(tokenizer, text="We saw a"):
    return np.array([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def test_steering_a_planted_feature_raises_its_words(demo_model):
    model, tok, planted = demo_model
    layer = 1
    prompt = _prompt(tok)[None]
    plain = np.asarray(model(prompt).logits)
    for concept in ("animals", "months", "vehicles"):
        words = tok.convert_tokens_to_ids(list(demo.CONCEPTS[concept]))
        v = planted_direction(model, planted, layer, concept)
        u = jm.feature_to_mlp_out(model, layer, v)
        sites = {"hook_post": (v, (0.0, 20.0, 40.0, 60.0, 80.0)), "hook_mlp_out": (u, (0.0, 4.0, 8.0, 12.0))}
        for site, (direction, alphas) in sites.items():
            mass = []
            for alpha in alphas:
                steer = jm.Steering(layer, direction, alpha=alpha, site=site)
                logits = np.asarray(model(prompt, steering=steer).logits)
                if alpha == 0.0:
                    np.testing.assert_array_equal(logits, plain)  # α = 0 changes nothing
                p = np.exp(logits[0, -1] - logits[0, -1].max())
                mass.append(float((p / p.sum())[words].sum()))
            assert mass[0] < 0.01 and mass[-1] > 0.9, (concept, site, mass)
            assert all(b >= a - 1e-6 for a, b in zip(mass, mass[1:])), (concept, site, mass)
        # in generation, at every prompt and generated token
        steer = jm.Steering(f"blocks.{layer}.hook_mlp_out", u, alpha=10.0)
        new = jm.generate(model, prompt, max_new_tokens=6, steering=steer).new_tokens[0]
        assert set(new.tolist()) <= set(words), (concept, tok.convert_ids_to_tokens(new.tolist()))
    unsteered = jm.generate(model, prompt, max_new_tokens=6).new_tokens[0]
    zero = jm.generate(model, prompt, max_new_tokens=6, steering=jm.Steering(layer, v, alpha=0.0)).new_tokens[0]
    np.testing.assert_array_equal(zero, unsteered)


# ---------------------------------------------------------------- alpha_for_kl


@pytest.mark.parametrize("site", ["hook_post", "hook_mlp_out"])
def test_alpha_for_kl_hits_every_reachable_target(demo_model, site):
    model, tok, planted = demo_model
    prompt = _prompt(tok, "I think")
    v = planted_direction(model, planted, 1, "animals")
    direction = v if site == "hook_post" else jm.feature_to_mlp_out(model, 1, v)
    search = alpha_for_kl(model, direction, site, 1, prompt, rtol=0.02)
    assert [t.target for t in search.targets] == [0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
    assert all(t.reached for t in search.targets), search.targets
    check = kl_at(model, direction, site, 1, prompt, [t.alpha for t in search.targets])
    for t, kl in zip(search.targets, check):
        assert abs(t.kl - t.target) <= 0.02 * t.target
        assert kl == pytest.approx(t.kl, rel=1e-6)  # the reported α reproduces the reported KL
    alphas = [t.alpha for t in search.targets]
    assert alphas == sorted(alphas) and alphas[0] > 0
    assert search.alphas() == {t.target: t.alpha for t in search.targets}


def test_alpha_for_kl_reports_unreachable_targets(demo_model):
    model, tok, planted = demo_model
    prompt = _prompt(tok, "I think")
    v = planted_direction(model, planted, 1, "animals")
    # α is capped below where KL climbs past the larger targets
    search = alpha_for_kl(model, v, "hook_post", 1, prompt, targets=(0.025, 0.1, 5.0, 1e6), alpha_max=46.0)
    assert len(search.targets) == 4  # no target is dropped
    max_kl = max(kl for _, kl in search.evaluations)
    assert max(a for a, _ in search.evaluations) == 46.0
    for t in search.targets:
        if t.target <= max_kl:
            assert t.reached and abs(t.kl - t.target) <= search.rtol * t.target
        else:
            assert not t.reached and t.kl == max_kl and "unreachable" in t.note
    assert [t.reached for t in search.targets] == [True, True, False, False]


@pytest.mark.parametrize("site, captured", [("hook_post", "mlp.hook_post"), ("hook_mlp_out", "hook_resid_post")])
def test_default_search_limit_follows_the_steered_activation(demo_model, site, captured):
    """Without ``alpha_max`` the search may go to 64 × the median norm (BOS left out) of what the
    steering is added to, and at least 4096: a model whose residual stream is large (Gemma-3's ~2·10⁴)
    is not cut off at a fixed α."""
    from jsnmf.evaluation.steering import ALPHA_MAX_FLOOR, ALPHA_MAX_SCALE, activation_scale

    model, tok, planted = demo_model
    prompt = _prompt(tok, "I think")
    v = planted_direction(model, planted, 1, "animals")
    direction = v if site == "hook_post" else jm.feature_to_mlp_out(model, 1, v)
    name = f"blocks.1.{captured}"
    acts = np.asarray(model(np.asarray(prompt)[None], capture=[name]).activations[name][0], np.float64)
    scale = float(np.median(np.linalg.norm(acts[1:], axis=-1)))
    assert activation_scale(model, site, 1, prompt) == pytest.approx(scale, rel=1e-6)
    expected = max(ALPHA_MAX_FLOOR, ALPHA_MAX_SCALE * scale)
    search = alpha_for_kl(model, direction, site, 1, prompt, targets=(0.1,))
    assert search.alpha_max == pytest.approx(expected, rel=1e-5)


class _FakeKL:
    """KL as a given function of α, with the cache ``_search`` expects."""

    def __init__(self, fn):
        self.fn, self.cache = fn, {0.0: 0.0}

    def __call__(self, a):
        self.cache.setdefault(float(a), float(self.fn(a)))
        return self.cache[float(a)]


def test_search_handles_non_monotone_kl_and_jumps():
    # KL rises, dips, rises again: every target is still hit within tolerance at a true crossing
    wavy = _FakeKL(lambda a: 0.01 * a + 0.3 * np.sin(a / 3.0) ** 2)
    for t in _search(wavy, [0.025, 0.1, 0.25, 0.5, 1.0], 1.0, 2.0, 1000.0, 0.01, 60):
        assert t.reached and abs(t.kl - t.target) <= 0.01 * t.target and t.kl == wavy.fn(t.alpha)
    # a step: KL jumps from 0.01 to 2 at α = 7.3, so 0.1 and 1.0 are never hit; both are reported
    step = _FakeKL(lambda a: 0.01 if a < 7.3 else 2.0)
    results = _search(step, [0.01, 0.1, 1.0, 2.0, 3.0], 1.0, 2.0, 64.0, 0.01, 60)
    assert [r.reached for r in results] == [True, False, False, True, False]
    assert "jumps" in results[1].note and results[1].alpha == pytest.approx(7.3, abs=1e-6)
    assert "unreachable" in results[4].note


def test_next_token_kl_by_hand():
    p, q = np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.25, 0.5])
    expected = 0.5 * np.log(2) + 0.25 * np.log(0.5)
    assert next_token_kl(np.log(p), np.log(q) + 3.0) == pytest.approx(expected, rel=1e-12)  # logits up to a shift
    assert next_token_kl(np.log(p), np.log(p)) == 0.0
