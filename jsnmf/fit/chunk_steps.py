"""The compiled per-chunk steps of a streamed fit (:mod:`jsnmf.fit.stream`): the codes pass and the
initializers' passes (random, k-means, SVD), each compiled once per chunk shape.

Every step takes a chunk of ``X`` in its stored precision (``X_raw``) and casts it to the compute
``dtype`` on the device; accumulating steps donate their accumulator.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jsnmf.kernels.fit import SolverConfig
from jsnmf.kernels.init import KMEANS_OFFSET, random_codes
from jsnmf.kernels.steps import chunk_statistics, codes_step, features_step, loss_from_statistics, matmul_f32


def valid_rows(chunk_rows: int, valid: jax.Array) -> jax.Array:
    return (jnp.arange(chunk_rows) < valid)[:, None]


@partial(jax.jit, static_argnames=("chunk_rows", "k"))
def random_chunk(key_G, start, valid, *, chunk_rows, k):
    return random_codes(key_G, start, chunk_rows, k) * valid_rows(chunk_rows, valid)


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def initial_statistics(X_raw, G, acc, *, dtype):
    """Statistics of the initial codes, ``‖X‖²`` and whether the chunk is finite."""
    stats, sq_norm = acc
    finite = jnp.all(jnp.isfinite(X_raw))
    X = X_raw.astype(dtype)
    chunk = chunk_statistics(X, G)
    return (stats + chunk, sq_norm + jnp.sum(jnp.square(X.astype(jnp.float32)))), finite


@partial(jax.jit, static_argnames=("config",))
def features(XtG, GtG, *, config: SolverConfig):
    F, scale = features_step(XtG, GtG, ridge=config.ridge, n_keep=config.n_keep)
    return F, scale, F.T @ F


@partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("acc",))
def codes_chunk(X_raw, G, F, Q, scale, acc, *, config: SolverConfig, dtype):
    """One chunk of the codes pass: new codes for its rows, and its statistics added to ``acc``."""
    G, stats = codes_step(X_raw.astype(dtype), G, F, Q, scale, config.codes_update())
    return G, acc + stats


@jax.jit
def loss(sq_norm_X, stats, Q):
    return loss_from_statistics(sq_norm_X, stats, Q)


# k-means (Ding et al.'s start), streamed: each Lloyd iteration is a pass.
@partial(jax.jit, static_argnames=("dtype",))
def kmeans_assign(X_raw, centroids, valid, *, dtype):
    X = X_raw.astype(dtype)
    sq_rows = jnp.sum(jnp.square(X.astype(jnp.float32)), axis=1)
    distance = sq_rows[:, None] - 2.0 * matmul_f32(X, centroids.T) + jnp.sum(centroids * centroids, axis=1)[None, :]
    onehot = jax.nn.one_hot(jnp.argmin(distance, axis=1), centroids.shape[0], dtype=jnp.float32)
    return X, onehot * valid[:, None]


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def kmeans_accumulate(X_raw, centroids, valid, acc, *, dtype):
    X, onehot = kmeans_assign(X_raw, centroids, valid, dtype=dtype)
    sums, counts = acc
    return sums + matmul_f32(X.T, onehot).T, counts + jnp.sum(onehot, axis=0)


@partial(jax.jit, static_argnames=("dtype",))
def kmeans_codes(X_raw, centroids, valid, *, dtype):
    _, onehot = kmeans_assign(X_raw, centroids, valid, dtype=dtype)
    return (onehot + KMEANS_OFFSET) * valid[:, None]


# SVD start, streamed: subspace iteration on XᵀX, Rayleigh–Ritz, then Ding et al.'s sign rule.
@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def gram_times(X_raw, V, acc, *, dtype):
    X = X_raw.astype(dtype)
    XV = matmul_f32(X, V)
    return acc + matmul_f32(X.T, XV)


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def projected_gram(X_raw, V, acc, *, dtype):
    XV = matmul_f32(X_raw.astype(dtype), V)
    return acc + XV.T @ XV


@partial(jax.jit, static_argnames=("dtype",), donate_argnames=("acc",))
def sign_masses(X_raw, V, acc, *, dtype):
    US = matmul_f32(X_raw.astype(dtype), V)
    pos, neg = jnp.maximum(US, 0.0), jnp.maximum(-US, 0.0)
    return acc + jnp.stack([jnp.sum(pos * pos, 0), jnp.sum(neg * neg, 0), jnp.sum(pos, 0), jnp.sum(neg, 0)])


@partial(jax.jit, static_argnames=("dtype",))
def svd_codes(X_raw, V, floor, valid, *, dtype):
    US = matmul_f32(X_raw.astype(dtype), V)
    return (jnp.maximum(US, 0.0) + floor) * valid[:, None]
