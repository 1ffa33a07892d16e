"""Seeded initializers: each returns ``(F0, G0)`` with ``F0`` (d × k) and ``G0`` (n × k) ≥ 0.

The first iteration recomputes ``F`` from ``G`` (docs/architecture.md, step 1), so ``G0`` is what matters;
``F0`` is returned for completeness (and for users who want to inspect the starting point). The
initializers themselves, written once as passes over rows, are in :mod:`jsnmf.fit.starts`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.random import threefry2x32_p

from jsnmf.kernels.steps import least_squares_features, matmul_f32

# Initial codes are kept strictly positive: the multiplicative update cannot move a zero.
CODES_FLOOR = 1e-6
# The SVD start's subspace iteration, and the k-means start (Ding et al. 2010).
SVD_OVERSAMPLE, SVD_POWER_ITERS = 10, 2
KMEANS_ITERS, KMEANS_OFFSET = 20, 0.2
# The tokens start's least squares: λ relative to the mean squared norm of the sampled tokens, so the
# codes do not depend on the scale of X (and stay finite when two sampled tokens are equal).
TOKENS_RIDGE = 1e-6


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
    """``(key_F, key_G)``: the keys the random start draws ``F0`` and ``G0`` from."""
    key_F, key_G = jax.random.split(key)
    return key_F, key_G


# The per-chunk steps of the k-means and SVD starts. Each initializer is a sequence of passes over
# the rows (jsnmf.fit.starts): in memory the rows are one chunk, streamed they are the store's chunks,
# sharded they are the global row-sharded array. ``X_raw`` is a chunk in its stored precision, cast
# to the compute ``dtype`` here; ``valid`` (chunk_rows,) is False on padding rows; accumulating
# steps donate their accumulator.

@partial(jax.jit, static_argnames=("dtype",))
def kmeans_assign(X_raw, centroids, valid, *, dtype):
    """The chunk in ``dtype`` and the one-hot nearest centroid of each valid row."""
    X = X_raw.astype(dtype)
    sq_rows = jnp.sum(jnp.square(X.astype(jnp.float32)), axis=1)
    distance = sq_rows[:, None] - 2.0 * matmul_f32(X, centroids.T) + jnp.sum(centroids * centroids, axis=1)[None, :]
    onehot = jax.nn.one_hot(jnp.argmin(distance, axis=1), centroids.shape[0], dtype=jnp.float32)
    return X, onehot * valid[:, None]


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def kmeans_accumulate(X_raw, centroids, valid, acc, *, dtype):
    """One Lloyd iteration's sums: ``(Σ rows per cluster, count per cluster)`` added to ``acc``."""
    X, onehot = kmeans_assign(X_raw, centroids, valid, dtype=dtype)
    sums, counts = acc
    return sums + matmul_f32(X.T, onehot).T, counts + jnp.sum(onehot, axis=0)


@partial(jax.jit, static_argnames=("dtype",))
def kmeans_codes(X_raw, centroids, valid, *, dtype):
    """Ding et al.'s k-means codes: the cluster indicator plus ``KMEANS_OFFSET`` (zero on padding)."""
    _, onehot = kmeans_assign(X_raw, centroids, valid, dtype=dtype)
    return (onehot + KMEANS_OFFSET) * valid[:, None]


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def gram_times(X_raw, V, acc, *, dtype):
    """``acc + XᵀX V`` over the chunk (a step of the subspace iteration)."""
    X = X_raw.astype(dtype)
    return acc + matmul_f32(X.T, matmul_f32(X, V))


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def projected_gram(X_raw, V, acc, *, dtype):
    """``acc + (XV)ᵀ(XV)`` over the chunk (the Rayleigh–Ritz matrix)."""
    XV = matmul_f32(X_raw.astype(dtype), V)
    return acc + XV.T @ XV


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def sign_masses(X_raw, V, acc, *, dtype):
    """Per component of ``U S = X V``: squared and plain masses of its positive and negative parts."""
    US = matmul_f32(X_raw.astype(dtype), V)
    pos, neg = jnp.maximum(US, 0.0), jnp.maximum(-US, 0.0)
    return acc + jnp.stack([jnp.sum(pos * pos, 0), jnp.sum(neg * neg, 0), jnp.sum(pos, 0), jnp.sum(neg, 0)])


@partial(jax.jit, static_argnames=("dtype",))
def svd_codes(X_raw, V, floor, valid, *, dtype):
    """The SVD start's codes ``(X V)⁺ + floor`` (zero on padding)."""
    US = matmul_f32(X_raw.astype(dtype), V)
    return (jnp.maximum(US, 0.0) + floor) * valid[:, None]


@partial(jax.jit, static_argnames=("dtype",))
def token_codes(X_raw, F0, valid, *, dtype):
    """The tokens start's codes of a chunk: each row's least squares on the sampled tokens ``F0`` (d × k),
    clipped at zero, ``max(0, P (Q + λI)⁻¹)`` with ``P = X F0`` and ``Q = F0ᵀ F0``; floored at
    ``CODES_FLOOR`` so the multiplicative update can move every code; zero on padding. Each row is
    solved on its own, so the codes are the same whatever the chunks."""
    P = matmul_f32(X_raw.astype(dtype), F0)
    Q = F0.T @ F0
    ridge = TOKENS_RIDGE * jnp.maximum(jnp.mean(jnp.diagonal(Q)), jnp.finfo(jnp.float32).tiny)
    G = jnp.maximum(least_squares_features(P, Q, ridge), CODES_FLOOR)
    return G * valid[:, None]
