"""One SNMF iteration, as small pure functions over arrays (docs/architecture.md, "The algorithm").

Model ``X ≈ G Fᵀ`` with ``X`` (n × d), ``F`` (d × k, any sign), ``G`` (n × k, ≥ 0).
An iteration is split where the data pass is:

* :func:`features_step` needs only the statistics ``XᵀG`` (d×k) and ``GᵀG`` (k×k) of the last
  pass: the least-squares ``F``, winner-take-all sparsification, and the column rescaling.
* :func:`codes_step` is the pass over (a chunk of) ``X``: it rescales its rows of ``G``, forms
  ``P = X F``, updates ``G`` with a codes solver, and returns that chunk's contribution to the
  statistics for the next ``F`` and for the loss.

Because the statistics are sums over tokens, the same :func:`codes_step` serves the in-memory fit
(one chunk), the streamed fit (many chunks, summed) and the sharded fit (summed with ``psum``).

Codes solvers are built like optax transformations: :func:`mu_codes`, :func:`hals_codes` and
:func:`apg_codes` return a function ``update(G, P, Q) -> G``; :mod:`jsnmf.kernels.solvers` names
them (the registry every other module reads).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

CodesUpdate = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Column norms of G are floored here before dividing (the paper's value).
NORM_FLOOR = 1e-8


class Statistics(NamedTuple):
    """What one pass over ``X`` contributes; every field is a sum over tokens."""

    XtG: jax.Array  # (d, k)   Xᵀ G
    GtG: jax.Array  # (k, k)   Gᵀ G
    PG: jax.Array  # ()       Σ P ⊙ G = tr(Fᵀ Xᵀ G), the cross term of the loss

    def __add__(self, other: "Statistics") -> "Statistics":  # type: ignore[override]
        return Statistics(*(a + b for a, b in zip(self, other)))


def matmul_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` accumulated in float32.

    When ``a`` is a low-precision activation matrix (bfloat16/float16), ``b`` is cast down to
    match so the product runs on the fast low-precision path, while the accumulation and the
    result stay float32.
    """
    if a.dtype != b.dtype:
        b = b.astype(a.dtype)
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def cross_product(X: jax.Array, G: jax.Array) -> jax.Array:
    """``Xᵀ G`` (d × k), accumulated in float32.

    Formed as ``(Gᵀ X)ᵀ``: XLA's CPU backend runs the (k × d) product about twice as fast as
    ``X.T @ G`` (measured at n=8192, d=3072, k=100); the barrier keeps the compiler from folding
    the cheap k×d transpose back into the product.
    """
    GtX = lax.dot_general(G.astype(X.dtype), X, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return lax.optimization_barrier(GtX).T


def keep_count(sparsity: float | None, d: int) -> int | None:
    """Entries kept per column of ``F`` for a sparsity ``p``: ``ceil(p·d)`` (None = keep all)."""
    if sparsity is None:
        return None
    return max(1, min(d, math.ceil(sparsity * d)))


def least_squares_features(XtG: jax.Array, GtG: jax.Array, ridge: float) -> jax.Array:
    """Step 1: ``F = XᵀG (GᵀG + λI)⁻¹`` by a Cholesky solve of the k×k system."""
    k = GtG.shape[0]
    A = GtG + ridge * jnp.eye(k, dtype=GtG.dtype)
    chol = jax.scipy.linalg.cho_factor(A, lower=True)
    return jax.scipy.linalg.cho_solve(chol, XtG.T).T


def kth_largest_per_column(M: jax.Array, n: int) -> jax.Array:
    """The ``n``-th largest value of each column of a non-negative float32 matrix, exactly.

    Non-negative float32 values are ordered like their int32 bit patterns, so a bisection over the
    bits finds the largest ``t`` with ``count(M[:, j] >= t) >= n`` in 31 vectorized counting passes.
    XLA's CPU ``top_k`` sorts every column instead and was ~50× slower here (d=768, k=32).
    """
    bits = lax.bitcast_convert_type(M.astype(jnp.float32), jnp.int32)
    lo = jnp.zeros(M.shape[1], jnp.int32)  # count(bits >= lo) >= n always holds
    hi = jnp.max(bits, axis=0) + 1  # count(bits >= hi) == 0 < n

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid[None, :], axis=0) >= n
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = lax.fori_loop(0, 32, halve, (lo, hi))
    return lax.bitcast_convert_type(lo, jnp.float32)


def sparsify_columns(F: jax.Array, n_keep: int) -> jax.Array:
    """Step 2: in each column keep the ``n_keep`` entries largest in |value|, zero the rest.

    Winner-take-all as in the paper: entries tied with the ``n_keep``-th largest are kept too.
    """
    magnitude = jnp.abs(F)
    threshold = kth_largest_per_column(magnitude, n_keep)  # (k,)
    return jnp.where(magnitude >= threshold[None, :], F, 0.0)


def column_norms(GtG: jax.Array) -> jax.Array:
    """ℓ2 norm of each column of ``G`` from ``GᵀG`` (floored, so it can divide)."""
    return jnp.maximum(jnp.sqrt(jnp.maximum(jnp.diagonal(GtG), 0.0)), NORM_FLOOR)


def features_step(XtG: jax.Array, GtG: jax.Array, *, ridge: float, n_keep: int | None):
    """Steps 1–3 from the statistics of the last pass.

    Returns ``(F, scale)``: the new features, already multiplied by ``scale`` (the column norms
    of ``G``), and ``scale`` itself, by which the codes pass must divide its rows of ``G`` (step 3;
    the product ``G Fᵀ`` is unchanged).
    """
    F = least_squares_features(XtG, GtG, ridge)
    if n_keep is not None:
        F = sparsify_columns(F, n_keep)
    scale = column_norms(GtG)
    return F * scale[None, :], scale


def mu_codes(eps: float = 1e-6) -> CodesUpdate:
    """Step 4, the multiplicative update of Ding, Li & Jordan (2010).

    ``G ← G ⊙ sqrt((P⁺ + G Q⁻) / (P⁻ + G Q⁺ + ε))`` with ``M⁺ = (|M|+M)/2``, ``M⁻ = (|M|−M)/2``.
    It never increases the loss for fixed ``F``; zeros in ``G`` stay zero.
    """

    def update(G: jax.Array, P: jax.Array, Q: jax.Array) -> jax.Array:
        Q_pos, Q_neg = (jnp.abs(Q) + Q) / 2, (jnp.abs(Q) - Q) / 2
        P_pos, P_neg = (jnp.abs(P) + P) / 2, (jnp.abs(P) - P) / 2
        numerator = P_pos + G @ Q_neg
        denominator = P_neg + G @ Q_pos + eps
        return G * jnp.sqrt(numerator / denominator)

    return update


def hals_codes(n_sweeps: int = 4) -> CodesUpdate:
    """Step 4 by block coordinate descent (HALS) on the codes.

    For fixed ``F`` the codes problem ``min_{G≥0} ‖X − G Fᵀ‖²`` separates per token and needs only
    ``P = X F`` and ``Q = FᵀF``. One sweep updates each column ``j`` exactly given the others:
    ``G[:, j] ← max(0, G[:, j] + (P[:, j] − G Q[:, j]) / Q[j, j])``. A sweep costs ``n·k²`` flops
    against ``n·d·k`` for the product ``X F``, so several sweeps per pass over ``X`` cost little and
    make far more progress than one multiplicative step.
    """

    def update(G: jax.Array, P: jax.Array, Q: jax.Array) -> jax.Array:
        # Work on Gᵀ so that a column of G is a contiguous row.
        Pt = P.T
        diag = jnp.diagonal(Q)
        safe_diag = jnp.where(diag > 0, diag, 1.0)
        k = Q.shape[0]

        def column(j, Gt):
            residual = Pt[j] - Q[j] @ Gt
            updated = jnp.maximum(Gt[j] + residual / safe_diag[j], 0.0)
            # An all-zero feature (Q[j, j] = 0) explains nothing: its codes are zero.
            updated = jnp.where(diag[j] > 0, updated, 0.0)
            return Gt.at[j].set(updated)

        def sweep(_, Gt):
            return lax.fori_loop(0, k, column, Gt)

        return lax.fori_loop(0, n_sweeps, sweep, G.T).T

    return update


def apg_codes(n_steps: int = 8) -> CodesUpdate:
    """Step 4 by accelerated projected gradient (Nesterov's method as FISTA, Beck & Teboulle 2009).

    For fixed ``F`` the codes minimize ``f(G) = ½·tr(G Q Gᵀ) − tr(Pᵀ G)`` over ``G ≥ 0`` (the loss up
    to a constant), whose gradient is ``G Q − P``. With the step ``1/L``, ``L = max_i Σ_j |Q_ij|`` (an
    upper bound of the largest eigenvalue of ``Q``, so every step is safe), each of ``n_steps`` steps is

        ``G⁺ = max(0, Y − (Y Q − P) / L)``,  ``t⁺ = (1 + √(1 + 4t²)) / 2``,
        ``Y = G⁺ + ((t − 1) / t⁺)·(G⁺ − G)``,

    from ``Y = G``, ``t = 1`` (restarted every iteration, so the solver carries no state). A step
    costs ``n·k²`` flops, like a HALS sweep. Rows with ``P = 0`` and ``G = 0`` (padding) stay zero.
    """

    def update(G: jax.Array, P: jax.Array, Q: jax.Array) -> jax.Array:
        L = jnp.max(jnp.sum(jnp.abs(Q), axis=1))
        inv_L = jnp.where(L > 0, 1.0 / jnp.where(L > 0, L, 1.0), 0.0)

        def step(_, carry):
            G, Y, t = carry
            G_next = jnp.maximum(Y - (Y @ Q - P) * inv_L, 0.0)
            t_next = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
            Y = G_next + ((t - 1.0) / t_next) * (G_next - G)
            return G_next, Y, t_next

        G, _, _ = lax.fori_loop(0, n_steps, step, (G, G, jnp.ones((), G.dtype)))
        return G

    return update


class Extrapolation(NamedTuple):
    """The weight rule of the extrapolated solvers (Ang & Gillis 2019, "Accelerating nonnegative matrix
    factorization algorithms using extrapolation"): after each iteration the codes move on past the new
    iterate, ``Ĝ = G + β·(G − G_prev)``, and the next iteration starts from ``Ĝ``. When the loss rises
    the next iteration restarts from ``G`` itself, ``β ← β/η`` and its cap ``β̄ ← β``; otherwise
    ``β ← min(β̄, γ·β)`` and ``β̄ ← min(ceiling, γ̄·β̄)``, from ``β = β₀``, ``β̄ = ceiling``.

    ``ceiling`` is 1 in the paper; with winner-take-all ``F`` a weight near 1 overshot into other
    sparsity patterns and worse local minima (on three GELU problems, n=4096, d=1536, k=64, it then took
    more iterations than plain HALS to some of HALS' errors), while 0.8 reached each of them sooner."""

    beta0: float = 0.5
    eta: float = 1.5
    gamma: float = 1.1
    gamma_bar: float = 1.05
    ceiling: float = 0.8


def extrapolated_codes(G: jax.Array, G_prev: jax.Array, inv_scale: jax.Array, step: jax.Array) -> jax.Array:
    """The start of the next codes update, ``max(0, G + β·(G − G_prev/s))`` (``inv_scale = 1/s``).

    ``G_prev/s`` is the previous iterate in the scaling of ``G`` (step 3 rescaled ``G`` by ``s`` since).
    Clipped, so ``G ≥ 0`` holds for every codes solver; zero rows of both stay zero (padding). At
    ``β = 0`` this is ``G`` exactly.
    """
    return jnp.maximum(G + step * (G - G_prev * inv_scale[None, :]), 0.0)


def extrapolated_statistics(XtG, GtG, XtG_prev, GtG_prev, cross, inv_scale, step):
    """``XᵀĜ`` and ``ĜᵀĜ`` of the unclipped ``Ĝ = G + β·(G − G_prev/s)`` from sums over tokens alone.

    ``XᵀĜ = (1+β)·XᵀG − β·XᵀG_prev/s``; ``ĜᵀĜ = (1+β)²·GᵀG − β(1+β)·(C + Cᵀ) + β²·G_prevᵀG_prev/(s sᵀ)``
    with ``C = GᵀG_prev/s`` (``cross = GᵀG_prev``). So the next ``F`` needs no extra pass over ``X``, and
    a streamed or sharded fit sums the same three statistics plus ``cross``. At ``β = 0`` these are
    ``XᵀG`` and ``GᵀG`` exactly.
    """
    C = cross * inv_scale[None, :]
    XtG_hat = (1.0 + step) * XtG - step * (XtG_prev * inv_scale[None, :])
    GtG_hat = ((1.0 + step) ** 2 * GtG - step * (1.0 + step) * (C + C.T)
               + step**2 * (GtG_prev * (inv_scale[:, None] * inv_scale[None, :])))
    return XtG_hat, GtG_hat


def next_weights(rule: Extrapolation, loss, last_loss, beta, beta_max):
    """``(step, beta, beta_max)`` after an iteration with ``loss``: the weight of the next extrapolation
    (0 when the loss rose above ``last_loss``: restart) and the updated ``β``, ``β̄`` (:class:`Extrapolation`)."""
    rose = loss > last_loss
    step = jnp.where(rose, 0.0, beta)
    return (step, jnp.where(rose, beta / rule.eta, jnp.minimum(beta_max, rule.gamma * beta)),
            jnp.where(rose, beta, jnp.minimum(rule.ceiling, rule.gamma_bar * beta_max)))


def codes_step(
    X: jax.Array, G: jax.Array, F: jax.Array, Q: jax.Array, scale: jax.Array, update: CodesUpdate
) -> tuple[jax.Array, Statistics]:
    """Step 3 (the codes half) and step 4 on a chunk of rows; returns the chunk's statistics.

    ``X`` and ``G`` are matching rows (a chunk, a shard, or everything). The statistics are those
    of the updated codes, which the next :func:`features_step` and :func:`loss_from_statistics` use.
    """
    G = G / scale[None, :]
    P = matmul_f32(X, F)
    G = update(G, P, Q)
    return G, chunk_statistics(X, G, P)


def chunk_statistics(X: jax.Array, G: jax.Array, P: jax.Array | None = None) -> Statistics:
    """``XᵀG``, ``GᵀG`` and (when ``P = X F`` is given) ``Σ P ⊙ G`` for a chunk of rows."""
    XtG = cross_product(X, G)
    GtG = G.T @ G
    PG = jnp.sum(P * G) if P is not None else jnp.zeros((), jnp.float32)
    return Statistics(XtG, GtG, PG)


def loss_from_statistics(sq_norm_X: jax.Array, stats: Statistics, Q: jax.Array) -> jax.Array:
    """Step 5: ``‖X − G Fᵀ‖² = ‖X‖² − 2·tr(Fᵀ XᵀG) + tr(FᵀF · GᵀG)``, never forming ``G Fᵀ``.

    Clipped at zero: the three terms nearly cancel at a good fit and float rounding must not
    report a negative error.
    """
    return jnp.maximum(sq_norm_X - 2.0 * stats.PG + jnp.sum(Q * stats.GtG), 0.0)
