"""The compiled per-chunk steps of a streamed fit (:mod:`jsnmf.fit.stream`): the codes pass and the
random start's chunk, each compiled once per chunk shape (the k-means and SVD starts' per-chunk
steps are in :mod:`jsnmf.kernels.init`).

Every step takes a chunk of ``X`` in its stored precision (``X_raw``) and casts it to the compute
``dtype`` on the device; accumulating steps donate their accumulator.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jsnmf.kernels.fit import SolverConfig, advanced_momentum, extrapolated_features
from jsnmf.kernels.init import random_codes
from jsnmf.kernels.steps import (chunk_statistics, codes_step, extrapolated_codes, features_step,
                                 loss_from_statistics)


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


@partial(jax.jit, static_argnames=("config",))
def momentum_features(stats, momentum, *, config: SolverConfig):
    """An extrapolated solver's ``F`` (from the extrapolated statistics), ``scale``, ``Q`` and ``1/momentum.scale``."""
    F, scale, inv_prev_scale = extrapolated_features(stats, momentum, config)
    return F, scale, F.T @ F, inv_prev_scale


@partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("acc",))
def momentum_codes_chunk(X_raw, G_pair, F, Q, scale, inv_prev_scale, step, acc, *, config: SolverConfig, dtype):
    """One chunk of an extrapolated solver's codes pass. ``G_pair`` is the chunk's latest codes and its
    previous codes side by side (chunk_rows × 2k); the pass starts from their extrapolation and adds
    the chunk's statistics and ``cross = G_newᵀ G`` to ``acc = (statistics, cross)``."""
    k = F.shape[1]
    G, G_prev = G_pair[:, :k], G_pair[:, k:]
    start = extrapolated_codes(G, G_prev, inv_prev_scale, step)
    G_new, stats = codes_step(X_raw.astype(dtype), start, F, Q, scale, config.codes_update())
    total, cross = acc
    return G_new, (total + stats, cross + G_new.T @ G)


@partial(jax.jit, static_argnames=("config",))
def momentum_after(momentum, stats, cross, scale, loss, *, config: SolverConfig):
    """The momentum after a pass (its ``G`` stays None: the streamed fit keeps it in a codes buffer)."""
    return advanced_momentum(momentum, None, stats, cross, scale, loss, config.extrapolation())


@jax.jit
def loss(sq_norm_X, stats, Q):
    return loss_from_statistics(sq_norm_X, stats, Q)
