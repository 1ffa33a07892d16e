"""Seeded initializers: each returns ``(F0, G0)`` with ``F0`` (d × k) and ``G0`` (n × k) ≥ 0.

The first iteration recomputes ``F`` from ``G`` (docs/architecture.md, step 1), so ``G0`` is what matters;
``F0`` is returned for completeness (and for users who want to inspect the starting point).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.random import threefry2x32_p

from jsnmf.kernels.steps import matmul_f32

# Initial codes are kept strictly positive: the multiplicative update cannot move a zero.
CODES_FLOOR = 1e-6
# The SVD start's range finder, and the k-means start (Ding et al. 2010); the streamed starts
# (jsnmf.fit.stream) use the same values.
SVD_OVERSAMPLE, SVD_POWER_ITERS = 10, 2
KMEANS_ITERS, KMEANS_OFFSET = 20, 0.2


def _times_u32(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a · b`` for uint32 arrays as the (high, low) uint32 words of the 64-bit product."""
    mask = jnp.uint32(0xFFFF)
    a0, a1, b0, b1 = a & mask, a >> 16, b & mask, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1  # each fits in 32 bits
    middle = (p00 >> 16) + (p01 & mask) + (p10 & mask)
    low = (middle << 16) | (p00 & mask)
    high = p11 + (p01 >> 16) + (p10 >> 16) + (middle >> 16)
    return high, low


@partial(jax.jit, static_argnames=("n_rows", "k"))
def random_codes(key: jax.Array, start: jax.Array, n_rows: int, k: int) -> jax.Array:
    """Rows ``[start, start + n_rows)`` of the random initial codes ``G0 ~ U[0, 1)`` (floored at 1e-6).

    Element ``(i, j)`` is drawn from the Threefry counter ``i·k + j`` alone, exactly as JAX's
    (default, "partitionable") ``jax.random.uniform(key, (n, k))`` draws it, so any range of rows can
    be generated on its own: a streamed fit draws the rows of each chunk and starts from the same
    ``G0`` as the in-memory fit, whatever the chunk size. ``start`` may be traced (one compilation
    serves every chunk of a given size).
    """
    k1, k2 = jax.random.key_data(key)
    rows = jnp.asarray(start, jnp.uint32) + jnp.arange(n_rows, dtype=jnp.uint32)
    high, low = _times_u32(rows[:, None], jnp.full((1, 1), k, jnp.uint32))
    column = jnp.arange(k, dtype=jnp.uint32)[None, :]
    counter_low = low + column
    counter_high = high + (counter_low < low).astype(jnp.uint32)  # carry
    bits1, bits2 = threefry2x32_p.bind(k1, k2, counter_high, counter_low)
    bits = bits1 ^ bits2
    # jax.random.uniform's float32 construction: 23 random mantissa bits under the exponent of 1.0.
    floats = lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    return jnp.maximum(jnp.maximum(floats, 0.0), CODES_FLOOR)


def random_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(key_F, key_G)``: the keys :func:`random_init` draws ``F0`` and ``G0`` from."""
    key_F, key_G = jax.random.split(key)
    return key_F, key_G


@partial(jax.jit, static_argnames=("k",))
def random_init(key: jax.Array, X: jax.Array, k: int):
    """The paper's random start: ``G ~ U[0, 1)`` floored at 1e-6, ``F ~ N(0, 1)``.

    ``G0`` comes from :func:`random_codes`, so a streamed fit can reproduce it chunk by chunk.
    """
    n, d = X.shape
    key_F, key_G = random_keys(key)
    G = random_codes(key_G, jnp.int32(0), n, k)
    F = jax.random.normal(key_F, (d, k), jnp.float32)
    return F, G


@partial(jax.jit, static_argnames=("k", "oversample", "power_iters"))
def svd_init(key: jax.Array, X: jax.Array, k: int, oversample: int = SVD_OVERSAMPLE,
             power_iters: int = SVD_POWER_ITERS):
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
def kmeans_init(key: jax.Array, X: jax.Array, k: int, n_iter: int = KMEANS_ITERS, offset: float = KMEANS_OFFSET):
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


# The initializer registry: name -> in-memory start ``(key, X, k) -> (F0, G0)``. Each name also needs
# its streamed pass in jsnmf.fit.stream.STREAMED_STARTS (checked there at import).
INITIALIZERS = {"random": random_init, "svd": svd_init, "kmeans": kmeans_init}
