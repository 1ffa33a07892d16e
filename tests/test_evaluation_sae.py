"""The TopK SAE baseline on a planted sparse problem: the loss falls, it reconstructs, its latents find the
planted atoms, and save/load (safetensors + JSON manifest) round-trips exactly."""
import json

import numpy as np
import pytest

from jsnmf.evaluation import TopKSAE, match_concepts

FVU_BOUND = 0.05  # on the planted problem below (measured 0.006; the noise alone leaves ≈ 1e-4)


def _planted(n=4096, d=64, atoms=16, active=2, seed=0):
    """Rows are sums of ``active`` random atoms (unit, in R^d) with sizes in [1, 3], plus small noise."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((atoms, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Z = np.zeros((n, atoms))
    for row in range(n):
        Z[row, rng.choice(atoms, active, replace=False)] = rng.uniform(1, 3, active)
    return (Z @ D + 0.01 * rng.standard_normal((n, d))).astype(np.float32), Z, D


@pytest.fixture(scope="module")
def fitted():
    X, Z, D = _planted()
    sae = TopKSAE.for_rank(16, multiple=2, k=2, epochs=40, batch_size=128, learning_rate=3e-3, seed=0).fit(X)
    return sae, X, Z, D


def test_loss_falls_and_it_reconstructs(fitted):
    sae, X, _, _ = fitted
    assert sae.width == 32 and sae.multiple == 2
    history = sae.loss_history_
    assert len(history) == 40 and history[-1] < 0.1 * history[0], history
    fvu, dead = sae.fvu(X), sae.dead_fraction(X)
    assert fvu < FVU_BOUND, fvu
    z = sae.encode(X[:100])
    assert (z >= 0).all() and ((z > 0).sum(axis=1) <= 2).all()
    np.testing.assert_allclose(np.linalg.norm(sae.directions, axis=0), 1.0, atol=1e-5)
    print(json.dumps({"sae_planted_fvu": round(fvu, 5), "sae_planted_dead": dead, "first_loss": history[0],
                      "last_loss": history[-1]}))


def test_latents_match_the_planted_atoms(fitted):
    """Matched the way detection matches SNMF features (top tokens carrying the label): label each row by
    its largest atom, and every atom finds a latent whose decoder row points along it."""
    sae, X, Z, D = fitted
    labels = [f"atom{j}" for j in Z.argmax(axis=1)]
    matches = match_concepts(sae.encode(X), np.arange(len(X)), labels, sorted(set(labels)), k_top=25)
    for name, m in matches.items():
        assert m["feature"] is not None and m["carry"] >= 0.8, (name, m)  # a row's second atom can top a latent
        cosines = D @ sae.directions[:, m["feature"]]  # the latent against every planted atom
        assert cosines.argmax() == int(name[4:]) and cosines.max() > 0.95, (name, cosines.round(2))


def test_save_load_round_trip_is_exact(fitted, tmp_path):
    sae, X, _, _ = fitted
    path = sae.save(tmp_path / "sae")
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "sae.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["width"] == 32 and manifest["k"] == 2 and manifest["multiple"] == 2
    back = TopKSAE.load(path)
    for name, value in sae.params_.items():
        np.testing.assert_array_equal(back.params_[name], value)
    np.testing.assert_array_equal(back.encode(X[:64]), sae.encode(X[:64]))
    assert back.loss_history_ == sae.loss_history_
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": "pickle"}))
    with pytest.raises(ValueError, match="not a jsnmf TopK SAE"):
        TopKSAE.load(path)


def test_validation():
    with pytest.raises(ValueError):
        TopKSAE(8, 9)
    with pytest.raises(RuntimeError, match="not fitted"):
        TopKSAE(8, 2).encode(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        TopKSAE(8, 2).fit(np.full((4, 3), np.nan))
