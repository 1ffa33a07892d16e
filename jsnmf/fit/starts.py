"""The initializers, each written once as passes over rows, and the one check of a user's ``(F0, G0)``.

An initializer ``start(key, rows, k) -> Start`` reads the data only through :class:`Rows`: passes
over chunks of ``X`` (each chunk's ``X`` in its stored precision and a ``valid`` mask of its real
rows), a few sampled rows, and a way to put small arrays where the chunks are. The backends supply
the rows: in memory they are one chunk (:class:`ArrayRows`), sharded one chunk that is the global
row-sharded array (padding masked), streamed the store's chunks
(:class:`jsnmf.fit.stream.StreamedFit`). So every backend starts from the same algorithm: the
k-means start is Lloyd's iterations, one pass each; the tokens start is one pass; the SVD start is a subspace iteration on
``XᵀX`` with a Rayleigh–Ritz step and Ding et al.'s sign rule; the random start draws each row of
``G0`` by its global token index (``Rows.random_codes``), so it is the same whatever the chunks,
devices or processes.

To add an initializer: a function here and its :data:`INITIALIZERS` entry (per-chunk kernels in
:mod:`jsnmf.kernels.init`); the estimator's check, the CLI's ``--init`` and every backend take it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jsnmf.kernels.init import (CODES_FLOOR, KMEANS_ITERS, SVD_OVERSAMPLE, SVD_POWER_ITERS, gram_times,
                                kmeans_accumulate, kmeans_codes, projected_gram, random_codes, random_keys,
                                sign_masses, svd_codes, token_codes)
from jsnmf.validation import validate_matrix

__all__ = ["INITIALIZERS", "TRACEABLE", "ArrayRows", "Rows", "Start", "check_initial_pair", "initial_factors",
           "sharded_initial_factors", "start_factors"]


class Rows(Protocol):
    """What an initializer may read of ``X`` (n global rows × d)."""

    n: int
    d: int
    dtype: Any  # the compute precision chunks are cast to

    def chunks(self, step: str) -> Iterable:
        """One pass: objects with ``X`` (a chunk, stored precision) and ``valid`` (its real rows)."""

    def sample_rows(self, indices) -> np.ndarray:
        """Global rows ``indices`` as float32 host arrays."""

    def replicate(self, value) -> jax.Array:
        """A small host array placed where every chunk can use it."""

    def random_codes(self, key_G, chunk, k: int) -> jax.Array:
        """The chunk's rows of ``U[0, 1)`` codes drawn by global token index (zero on padding)."""

    def status(self, text: str) -> None:
        """Report what the start is doing (the progress bar's text)."""


class Start(NamedTuple):
    """An initializer's result: ``F0`` (d × k) and a function giving a chunk's initial codes."""

    features: jax.Array
    codes: Callable[[Any], jax.Array]


def random_start(key, rows: Rows, k: int) -> Start:
    """The paper's random start: ``G ~ U[0, 1)`` floored at 1e-6, ``F ~ N(0, 1)``."""
    key_F, key_G = random_keys(key)
    F0 = rows.replicate(jax.random.normal(key_F, (rows.d, k), jnp.float32))
    return Start(F0, lambda chunk: rows.random_codes(key_G, chunk, k))


def kmeans_start(key, rows: Rows, k: int) -> Start:
    """k-means start (Ding et al. 2010): Lloyd's iterations on the rows of ``X``, one pass each.

    Centroids start at ``k`` distinct random rows; a cluster that empties keeps its centroid. ``G``
    is the one-hot cluster indicator plus 0.2 (as Ding et al.), so every code starts positive.
    """
    seeds = rows.sample_rows(np.asarray(jax.random.choice(key, rows.n, (k,), replace=False)))
    centroids = rows.replicate(np.asarray(jnp.asarray(seeds, rows.dtype).astype(jnp.float32)))
    for it in range(KMEANS_ITERS):
        rows.status(f"init k-means {it + 1}/{KMEANS_ITERS}")
        acc = rows.replicate(np.zeros((k, rows.d), np.float32)), rows.replicate(np.zeros((k,), np.float32))
        for c in rows.chunks("kmeans"):
            acc = jax.block_until_ready(kmeans_accumulate(c.X, centroids, c.valid, acc, dtype=rows.dtype))
        sums, counts = acc
        centroids = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)
    return Start(centroids.T, lambda c: kmeans_codes(c.X, centroids, c.valid, dtype=rows.dtype))


def tokens_start(key, rows: Rows, k: int) -> Start:
    """Tokens start: ``k`` distinct random tokens' activations are the features, ``F0 = X[S]ᵀ``, and each
    token's codes are its least squares on them, clipped at zero (:func:`token_codes`).

    Like the k-means start without Lloyd's iterations, but with codes that reconstruct each row from all
    the sampled tokens instead of a one-hot nearest one: one pass, and no host round trip, so an in-memory
    fit compiles it into its start (:data:`TRACEABLE`). Equal sampled tokens (repeated tokens have equal
    activations) only make ``F0ᵀF0`` singular, which the small ridge of :func:`token_codes` absorbs.

    On planted GELU problems (n=8192, d=3072, k=100 and n=4096, d=1536, k=64) ``ehals`` reached the error
    of 400 ``mu`` iterations in about half the iterations it needs from the random start, over several
    seeds (benchmarks/RESULTS.md, "Time to an answer").
    """
    seeds = rows.sample_rows(jax.random.choice(key, rows.n, (k,), replace=False))
    F0 = rows.replicate(jnp.asarray(jnp.asarray(seeds, rows.dtype), jnp.float32).T)  # in the compute precision
    return Start(F0, lambda c: token_codes(c.X, F0, c.valid, dtype=rows.dtype))


def svd_start(key, rows: Rows, k: int) -> Start:
    """SVD start in the spirit of Ding et al.: ``X ≈ U S Vᵀ`` (rank k), ``F = V``, ``G = (U S)⁺``.

    The top-k right singular subspace comes from a randomized subspace iteration on ``XᵀX``
    (Halko et al. 2011; ``SVD_POWER_ITERS + 1`` passes) and a Rayleigh–Ritz step (one pass), so it
    costs a few passes of ``n·d·k`` instead of ``n·d²``. Each component's sign is chosen so that its
    positive part carries more mass (one pass); the negative part is clipped and a small floor keeps
    ``G`` positive.
    """
    n, d, dtype = rows.n, rows.d, rows.dtype
    width = min(k + SVD_OVERSAMPLE, n, d)
    total = SVD_POWER_ITERS + 3
    V = rows.replicate(np.asarray(jax.random.normal(key, (d, width), jnp.float32)))
    for it in range(SVD_POWER_ITERS + 1):
        rows.status(f"init svd {it + 1}/{total}")
        Z = rows.replicate(np.zeros((d, width), np.float32))
        for c in rows.chunks("svd power"):
            Z = jax.block_until_ready(gram_times(c.X, V, Z, dtype=dtype))
        V, _ = jnp.linalg.qr(Z)
    rows.status(f"init svd {total - 1}/{total}")
    H = rows.replicate(np.zeros((width, width), np.float32))
    for c in rows.chunks("svd ritz"):
        H = jax.block_until_ready(projected_gram(c.X, V, H, dtype=dtype))
    _, W = jnp.linalg.eigh(H)  # ascending; the top k Ritz vectors are the last columns
    V = V @ W[:, ::-1][:, :k]
    rows.status(f"init svd {total}/{total}")
    masses = rows.replicate(np.zeros((4, k), np.float32))
    for c in rows.chunks("svd signs"):
        masses = jax.block_until_ready(sign_masses(c.X, V, masses, dtype=dtype))
    pos_sq, neg_sq, pos_sum, neg_sum = masses
    sign = jnp.where(pos_sq >= neg_sq, 1.0, -1.0)
    mean_G = jnp.sum(jnp.where(sign > 0, pos_sum, neg_sum)) / (n * k)
    floor = jnp.maximum(1e-3 * mean_G, CODES_FLOOR)
    V = V * sign[None, :]
    return Start(V, lambda c: svd_codes(c.X, V, floor, c.valid, dtype=dtype))


# The initializer registry: name -> start(key, rows, k).
INITIALIZERS: dict[str, Callable[[Any, Rows, int], Start]] = {
    "random": random_start, "svd": svd_start, "kmeans": kmeans_start, "tokens": tokens_start}

# Starts that are one computation on the array (no host-synchronized passes), so an in-memory fit can
# compile the start and the statistics of G0 as one executable (jsnmf.fit.arrays.started_state)
# instead of some twenty small ones.
TRACEABLE = frozenset({"random", "tokens"})


# -- the rows of an array backend: one chunk ------------------------------------------------------

@dataclass(frozen=True)
class WholeArray:
    """All rows as one chunk: ``X`` and its real-row mask."""

    X: jax.Array
    valid: jax.Array


class ArrayRows:
    """:class:`Rows` of an array in memory (``X`` on one device), or of
    :class:`~jsnmf.distributed.ShardedRows` (the padded global array; ``sharded`` given)."""

    def __init__(self, X: jax.Array, sharded=None):
        self.sharded = sharded
        self.X = X if sharded is None else sharded.array
        self.n = int(X.shape[0]) if sharded is None else sharded.layout.n_rows
        self.d = int(self.X.shape[1])
        self.dtype = self.X.dtype
        valid = jnp.ones(self.X.shape[0], bool) if sharded is None else sharded.layout.valid()
        self.whole = WholeArray(self.X, valid)

    def chunks(self, step: str) -> Iterable[WholeArray]:
        return (self.whole,)

    def sample_rows(self, indices) -> jax.Array | np.ndarray:
        if self.sharded is None:  # traceable: see TRACEABLE
            return jnp.take(self.X, jnp.asarray(indices), axis=0).astype(jnp.float32)
        from jsnmf.distributed import sample_rows

        return sample_rows(self.sharded, indices)

    def replicate(self, value) -> jax.Array:
        if self.sharded is None:
            return jnp.asarray(value)  # traceable: see TRACEABLE
        from jsnmf.distributed import replicate

        return replicate(np.asarray(value), self.sharded.layout.mesh)

    def random_codes(self, key_G, chunk, k: int) -> jax.Array:
        if self.sharded is None:
            return random_codes(key_G, jnp.int32(0), self.n, k)
        layout = self.sharded.layout  # this process's rows by their global index, padding zero
        return layout.assemble(np.asarray(random_codes(key_G, jnp.int32(layout.local_offset), layout.local_rows, k)))

    def status(self, text: str) -> None:
        pass


def initial_factors(init, seed: int, X: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(F0, G0)`` for ``X`` on one device: a named start, or the given arrays checked."""
    n, d = X.shape
    if isinstance(init, str):
        return start_factors(init, jax.random.key(seed), ArrayRows(X), k)
    F0, G0 = (validate_matrix(a, name) for a, name in zip(init, ("init F0", "init G0")))
    check_initial_pair((F0, G0), d, k, n)
    check_non_negative(G0)
    return jnp.asarray(F0, jnp.float32), jnp.asarray(G0, jnp.float32)


def sharded_initial_factors(init, seed: int, rows, k: int) -> tuple[jax.Array, jax.Array]:
    """``(F0, G0)`` as global arrays for :class:`~jsnmf.distributed.ShardedRows`, ``G0`` zero on padding
    rows; a named start is the single-device start up to the order of float sums."""
    from jsnmf.distributed import replicate

    if isinstance(init, str):
        return start_factors(init, jax.random.key(seed), ArrayRows(rows.array, sharded=rows), k)
    layout = rows.layout
    F0, G0 = (validate_matrix(a, name) for a, name in zip(init, ("init F0", "init G0")))
    check_initial_pair((F0, G0), rows.n_columns, k, layout.local_rows, own_rows=True)
    check_non_negative(G0)
    return replicate(np.asarray(F0, np.float32), layout.mesh), layout.assemble(np.asarray(G0, np.float32))


def start_factors(init: str, key, rows: ArrayRows, k: int) -> tuple[jax.Array, jax.Array]:
    """``(F0, G0)`` of the named start on array rows (traceable for the starts in :data:`TRACEABLE`)."""
    start = INITIALIZERS[init](key, rows, k)
    return start.features, start.codes(rows.whole)


def check_initial_pair(init, d: int, k: int, n_rows: int, *, own_rows: bool = False):
    """A user's ``init = (F0, G0)`` with ``F0`` (d × k) and ``G0`` (n_rows × k); ValueError otherwise.

    ``own_rows``: ``G0`` holds this process's rows (the message says so). Values of ``G0`` are not
    read here (a streamed fit checks them chunk by chunk); see :func:`check_non_negative`.
    """
    F0, G0 = init
    if tuple(np.shape(F0)) != (d, k):
        raise ValueError(f"init F0 must have shape (d_mlp, rank) = {(d, k)}; got {tuple(np.shape(F0))}")
    if tuple(np.shape(G0)) != (n_rows, k):
        mine = " (this process's rows)" if own_rows else ""
        raise ValueError(f"init G0 must have shape (n_tokens, rank) = {(n_rows, k)}{mine}; got {tuple(np.shape(G0))}")
    return F0, G0


def check_non_negative(G0) -> None:
    if bool((np.asarray(G0) < 0).any()):
        raise ValueError("init G0 must be non-negative (the codes of SNMF are >= 0)")
