"""Initial factors ``(F0, G0)`` for the array backends, and the one check of a user's ``(F0, G0)``.

Named starts come from the initializer registry :data:`jsnmf.kernels.init.INITIALIZERS`; the
streamed backend draws the same starts chunk by chunk (:mod:`jsnmf.fit.stream`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jsnmf.kernels.init import INITIALIZERS, random_codes, random_keys
from jsnmf.kernels.sharded import zero_rows
from jsnmf.validation import validate_matrix

__all__ = ["check_initial_pair", "initial_factors", "sharded_initial_factors"]


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


def initial_factors(init, seed: int, X: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(F0, G0)`` for ``X`` on one device: a named start, or the given arrays checked."""
    n, d = X.shape
    if isinstance(init, str):
        return INITIALIZERS[init](jax.random.key(seed), X, k)
    F0, G0 = (validate_matrix(a, name) for a, name in zip(init, ("init F0", "init G0")))
    check_initial_pair((F0, G0), d, k, n)
    check_non_negative(G0)
    return jnp.asarray(F0, jnp.float32), jnp.asarray(G0, jnp.float32)


def sharded_initial_factors(init, seed: int, rows, k: int) -> tuple[jax.Array, jax.Array]:
    """``(F0, G0)`` as global arrays for :class:`~jsnmf.distributed.ShardedRows`, ``G0`` zero on padding rows.

    The random start draws each row of ``G0`` by its global token index, so it equals the
    single-device start whatever the layout. ``"svd"`` and ``"kmeans"`` run on the padded ``X``;
    when there is padding, SVD's small positive floor and k-means' choice of starting rows can
    differ from the single-device start.
    """
    from jsnmf.distributed import replicate

    layout, X, mesh = rows.layout, rows.array, rows.layout.mesh
    d = rows.n_columns
    if isinstance(init, str) and init == "random":
        key_F, key_G = random_keys(jax.random.key(seed))
        F0 = jax.random.normal(key_F, (d, k), jnp.float32)
        G_local = random_codes(key_G, jnp.int32(layout.local_offset), layout.local_rows, k)
        return replicate(np.asarray(F0), mesh), layout.assemble(np.asarray(G_local))
    if isinstance(init, str):
        F0, G0 = INITIALIZERS[init](jax.random.key(seed), X, k)
        return F0, zero_rows(G0, layout.valid())
    F0, G0 = (validate_matrix(a, name) for a, name in zip(init, ("init F0", "init G0")))
    check_initial_pair((F0, G0), d, k, layout.local_rows, own_rows=True)
    check_non_negative(G0)
    return replicate(np.asarray(F0, np.float32), mesh), layout.assemble(np.asarray(G0, np.float32))
