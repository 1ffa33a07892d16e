"""The TopK sparse autoencoder baseline (Gao et al. 2024), trained in JAX with optax on an activation matrix.

The paper compares SNMF with an SAE trained on the same activations at ``hook_mlp_out``; this module
takes any ``X`` [n_tokens, width_in]. The model, for a row ``x``:

- encode: ``z = TopK(ReLU((x − b_dec) W_enc + b_enc))`` (the ``k`` largest pre-activations kept);
- decode: ``x̂ = z W_dec + b_dec``, the rows of ``W_dec`` (the latents' directions) kept at unit norm
  (renormalized after every Adam step) so a latent's size lives in ``z``, not in its direction;
- loss: mean squared error ``‖x − x̂‖²`` over the minibatch.

Width: ``width = multiple · rank`` latents (default 4× the SNMF rank it is compared with, stated in the
manifest), so the SAE has more directions to choose from than SNMF. Initialization: ``b_dec`` the data
mean, ``W_dec`` random unit rows, ``W_enc = W_decᵀ`` (the tied start the TopK paper uses).

Reported figures: **FVU** (fraction of variance unexplained, ``Σ‖x − x̂‖² / Σ‖x − x̄‖²``) and **dead
latents** (the share never in any row's top k over the data). ``directions`` lays the decoder rows out
as columns like ``F``, so detection, matching (``encode`` gives the codes) and steering take them as they
take SNMF features. Saved as ``sae.safetensors`` + ``manifest.json`` (no pickle).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["TopKSAE"]

_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
_FORMAT = "jsnmf.topk_sae/1"


def _encode(params, x, k):
    pre = jax.nn.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
    values, index = jax.lax.top_k(pre, k)
    return jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None], index].set(values)


def _loss(params, x, k):
    z = _encode(params, x, k)
    recon = z @ params["W_dec"] + params["b_dec"]
    return jnp.mean(jnp.sum((x - recon) ** 2, axis=-1))


def _unit_rows(w):
    return w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-12)


class TopKSAE:
    """A TopK SAE with ``width`` latents, ``k`` active per row (module docstring).

    ``TopKSAE.for_rank(rank, multiple=4, k=...)`` sets ``width = multiple · rank``. ``fit(X)`` trains for
    ``epochs`` passes over shuffled minibatches of ``batch_size`` rows with Adam (``learning_rate``);
    ``loss_history_`` holds the mean loss of each epoch.
    """

    def __init__(self, width: int, k: int, *, epochs: int = 20, batch_size: int = 256,
                 learning_rate: float = 1e-3, seed: int = 0, multiple: float | None = None):
        if not (isinstance(width, int) and isinstance(k, int) and 1 <= k <= width):
            raise ValueError(f"need ints 1 <= k <= width, got k={k!r}, width={width!r}")
        if epochs < 1 or batch_size < 1 or not learning_rate > 0:
            raise ValueError("epochs, batch_size and learning_rate must be positive")
        self.width, self.k, self.epochs, self.batch_size = width, k, epochs, batch_size
        self.learning_rate, self.seed, self.multiple = float(learning_rate), seed, multiple
        self.params_: dict[str, np.ndarray] | None = None
        self.loss_history_: list[float] = []

    @classmethod
    def for_rank(cls, rank: int, multiple: int = 4, **kwargs) -> "TopKSAE":
        """An SAE ``multiple`` times as wide as an SNMF of ``rank`` features."""
        return cls(int(multiple * rank), multiple=multiple, **kwargs)

    # ------------------------------------------------------------ training

    def fit(self, X) -> "TopKSAE":
        X = np.asarray(X, np.float32)
        if X.ndim != 2 or X.shape[0] < 2 or not np.all(np.isfinite(X)):
            raise ValueError(f"X must be a finite [n_tokens >= 2, width] matrix, got shape {X.shape}")
        n, d = X.shape
        key = jax.random.key(self.seed)
        key, sub = jax.random.split(key)
        w_dec = _unit_rows(jax.random.normal(sub, (self.width, d), jnp.float32))
        params = {"W_enc": w_dec.T, "b_enc": jnp.zeros(self.width, jnp.float32), "W_dec": w_dec,
                  "b_dec": jnp.asarray(X.mean(axis=0))}
        opt = optax.adam(self.learning_rate)
        state = opt.init(params)
        batch = min(self.batch_size, n)
        steps = n // batch  # every epoch the same number of full batches: one compiled scan
        k = self.k

        @jax.jit
        def epoch(params, state, order, data):
            def step(carry, rows):
                params, state = carry
                loss, grads = jax.value_and_grad(_loss)(params, data[rows], k)
                updates, state = opt.update(grads, state, params)
                params = optax.apply_updates(params, updates)
                params = {**params, "W_dec": _unit_rows(params["W_dec"])}
                return (params, state), loss
            (params, state), losses = jax.lax.scan(step, (params, state), order.reshape(steps, batch))
            return params, state, losses.mean()

        data = jnp.asarray(X)
        self.loss_history_ = []
        for _ in range(self.epochs):
            key, sub = jax.random.split(key)
            order = jax.random.permutation(sub, n)[:steps * batch]
            params, state, loss = epoch(params, state, order, data)
            self.loss_history_.append(float(loss))
        self.params_ = {name: np.asarray(params[name]) for name in _TENSORS}
        return self

    # ------------------------------------------------------------ use

    def _check(self):
        if self.params_ is None:
            raise RuntimeError("the SAE is not fitted; call fit(X) or TopKSAE.load(path)")

    def encode(self, X, batch_size: int = 4096) -> np.ndarray:
        """Codes ``z`` [n_tokens, width] (non-negative, at most ``k`` non-zero per row)."""
        self._check()
        params = {n: jnp.asarray(v) for n, v in self.params_.items()}
        X = np.asarray(X, np.float32)
        return np.concatenate([np.asarray(_encode(params, jnp.asarray(X[i:i + batch_size]), self.k))
                               for i in range(0, len(X), batch_size)]) if len(X) else np.zeros((0, self.width))

    def decode(self, Z) -> np.ndarray:
        self._check()
        return np.asarray(Z, np.float32) @ self.params_["W_dec"] + self.params_["b_dec"]

    @property
    def directions(self) -> np.ndarray:
        """The decoder rows as unit columns [width_in, width], laid out like ``F``."""
        self._check()
        return self.params_["W_dec"].T.copy()

    def fvu(self, X) -> float:
        """Fraction of variance unexplained: ``Σ‖x − x̂‖² / Σ‖x − x̄‖²`` over the rows of ``X``."""
        X = np.asarray(X, np.float64)
        residual = X - self.decode(self.encode(X)).astype(np.float64)
        return float((residual ** 2).sum() / ((X - X.mean(axis=0)) ** 2).sum())

    def dead_fraction(self, X) -> float:
        """The share of latents that are never active (never among a row's top ``k`` with a value > 0) on ``X``."""
        return float(((self.encode(X) > 0).sum(axis=0) == 0).mean())

    # ------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/sae.safetensors`` (the four tensors) and ``path/manifest.json`` (the settings)."""
        from safetensors.numpy import save_file

        self._check()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({n: np.ascontiguousarray(v) for n, v in self.params_.items()}, str(path / "sae.safetensors"))
        manifest = {"format": _FORMAT, "width": self.width, "k": self.k, "multiple": self.multiple,
                    "epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                    "seed": self.seed, "loss_history": self.loss_history_, "tensors": list(_TENSORS)}
        (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TopKSAE":
        from safetensors.numpy import load_file

        path = Path(path)
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a jsnmf TopK SAE (format {manifest.get('format')!r})")
        tensors = load_file(str(path / "sae.safetensors"))
        if set(tensors) != set(_TENSORS):
            raise ValueError(f"{path}: expected tensors {_TENSORS}, found {sorted(tensors)}")
        sae = cls(manifest["width"], manifest["k"], epochs=manifest["epochs"], batch_size=manifest["batch_size"],
                  learning_rate=manifest["learning_rate"], seed=manifest["seed"], multiple=manifest["multiple"])
        if tensors["W_dec"].shape[0] != sae.width:
            raise ValueError(f"{path}: W_dec has {tensors['W_dec'].shape[0]} rows, the manifest says {sae.width}")
        sae.params_ = tensors
        sae.loss_history_ = list(manifest["loss_history"])
        return sae
