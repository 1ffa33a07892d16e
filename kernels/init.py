"""Seeded initializers: each returns ``(F0, G0)`` with ``F0`` (d × k) and ``G0`` (n × k) ≥ 0.

The first iteration recomputes ``F`` from ``G`` (DESIGN.md step 1), so ``G0`` is what matters;
``F0`` is returned for completeness (and for users who want to inspect the starting point).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jsnmf.kernels.steps import matmul_f32

# Initial codes are kept strictly positive: the multiplicative update cannot move a zero.
CODES_FLOOR = 1e-6


@partial(jax.jit, static_argnames=("k",))
def random_init(key: jax.Array, X: jax.Array, k: int):
    """The paper's random start: ``G ~ U[0, 1)`` floored at 1e-6, ``F ~ N(0, 1)``."""
    n, d = X.shape
    key_F, key_G = jax.random.split(key)
    G = jnp.maximum(jax.random.uniform(key_G, (n, k), jnp.float32), CODES_FLOOR)
    F = jax.random.normal(key_F, (d, k), jnp.float32)
    return F, G


@partial(jax.jit, static_argnames=("k", "oversample", "power_iters"))
def svd_init(key: jax.Array, X: jax.Array, k: int, oversample: int = 10, power_iters: int = 2):
    """SVD start in the spirit of Ding et al.: ``X ≈ U S Vᵀ`` (rank k), ``F = V``, ``G = (U S)⁺``.

    The truncated SVD is a randomized range finder (Halko et al. 2011) so it costs a few passes of
    ``n·d·k`` instead of ``n·d²``. Each component's sign is chosen so that its positive part
    carries more mass; the negative part is clipped and a small floor keeps ``G`` positive.
    """
    n, d = X.shape
    width = min(k + oversample, n, d)
    omega = jax.random.normal(key, (d, width), jnp.float32)
    Y, _ = jnp.linalg.qr(matmul_f32(X, omega))
    for _ in range(power_iters):
        Z, _ = jnp.linalg.qr(matmul_f32(X.T, Y))
        Y, _ = jnp.linalg.qr(matmul_f32(X, Z))
    B = matmul_f32(X.T, Y).T  # (width, d) = Yᵀ X
    U_b, S, Vt = jnp.linalg.svd(B, full_matrices=False)
    US = (Y @ U_b[:, :k]) * S[None, :k]
    V = Vt[:k].T
    positive_mass = jnp.sum(jnp.maximum(US, 0.0) ** 2, axis=0)
    negative_mass = jnp.sum(jnp.maximum(-US, 0.0) ** 2, axis=0)
    sign = jnp.where(positive_mass >= negative_mass, 1.0, -1.0)
    US, V = US * sign, V * sign
    G = jnp.maximum(US, 0.0)
    floor = jnp.maximum(1e-3 * jnp.mean(G), CODES_FLOOR)
    return V, G + floor


@partial(jax.jit, static_argnames=("k", "n_iter"))
def kmeans_init(key: jax.Array, X: jax.Array, k: int, n_iter: int = 20, offset: float = 0.2):
    """k-means start (Ding et al. 2010): Lloyd's iterations on the rows of ``X``.

    ``F`` holds the centroids, ``G`` the one-hot cluster indicators plus ``offset`` (0.2, as Ding
    et al.), so that every code starts positive. Centroids start at ``k`` distinct random rows;
    a cluster that empties keeps its previous centroid.
    """
    n, _ = X.shape
    rows = jax.random.choice(key, n, (k,), replace=False)
    centroids = X[rows].astype(jnp.float32)
    sq_norm_rows = jnp.sum(jnp.square(X.astype(jnp.float32)), axis=1)

    def assign(C):
        distance = sq_norm_rows[:, None] - 2.0 * matmul_f32(X, C.T) + jnp.sum(C * C, axis=1)[None, :]
        return jax.nn.one_hot(jnp.argmin(distance, axis=1), k, dtype=jnp.float32)

    def lloyd(_, C):
        onehot = assign(C)
        counts = jnp.sum(onehot, axis=0)
        sums = matmul_f32(X.T, onehot).T  # (k, d)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], C)

    centroids = lax.fori_loop(0, n_iter, lloyd, centroids)
    G = assign(centroids) + offset
    return centroids.T, G


INITIALIZERS = {"random": random_init, "svd": svd_init, "kmeans": kmeans_init}
