"""Plain NumPy SNMF written from the formulas in docs/architecture.md, independent of the JAX kernels.

Float64 throughout; used as the reference the kernels and the estimator are checked against.
"""

import math

import numpy as np


def planted_problem(n=600, d=120, k=6, density=0.15, noise=0.01, seed=0):
    """``X = G Fᵀ + noise`` from a known column-sparse ``F`` and a sparse non-negative ``G``."""
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(d, k))
    for j in range(k):  # disjoint-ish supports make the features identifiable
        keep = rng.choice(d, size=max(2, int(density * d)), replace=False)
        mask = np.zeros(d, bool)
        mask[keep] = True
        F[~mask, j] = 0.0
    G = rng.exponential(size=(n, k)) * (rng.random((n, k)) < 0.4)
    X = G @ F.T + noise * rng.normal(size=(n, d))
    return X.astype(np.float32), F, G


def sparsify(F, p):
    """Keep the ``ceil(p·d)`` entries of each column largest in |value| (ties kept), zero the rest."""
    d = F.shape[0]
    m = math.ceil(p * d)
    out = F.copy()
    for j in range(F.shape[1]):
        threshold = np.sort(np.abs(F[:, j]))[-m]
        out[np.abs(F[:, j]) < threshold, j] = 0.0
    return out


def mu_iteration(X, G, p=None, ridge=1e-6, eps=1e-6):
    """The five steps of docs/architecture.md; returns ``(F, G, loss)`` after one iteration."""
    k = G.shape[1]
    F = X.T @ G @ np.linalg.inv(G.T @ G + ridge * np.eye(k))  # 1. least squares
    if p is not None:
        F = sparsify(F, p)  # 2. winner-take-all
    c = np.maximum(np.linalg.norm(G, axis=0), 1e-8)  # 3. rescale
    G = G / c
    F = F * c
    P, Q = X @ F, F.T @ F  # 4. multiplicative update
    pos = lambda M: (np.abs(M) + M) / 2  # noqa: E731
    neg = lambda M: (np.abs(M) - M) / 2  # noqa: E731
    G = G * np.sqrt((pos(P) + G @ neg(Q)) / (neg(P) + G @ pos(Q) + eps))
    loss = np.sum((X - G @ F.T) ** 2)  # 5. the loss, formed directly here
    return F, G, loss


def run_mu(X, G0, n_iter, p=None):
    """``n_iter`` iterations from ``G0``; returns the list of ``(F, G, loss)`` after each."""
    X = X.astype(np.float64)
    G = G0.astype(np.float64)
    iterates = []
    for _ in range(n_iter):
        F, G, loss = mu_iteration(X, G, p)
        iterates.append((F, G, loss))
    return iterates


def apg_codes_reference(G, P, Q, n_steps):
    """Accelerated projected gradient (FISTA) on ``min_{G≥0} ½·tr(G Q Gᵀ) − tr(Pᵀ G)``, from the formula:
    step ``1/L`` with ``L = max_i Σ_j |Q_ij|``; ``G⁺ = max(0, Y − (Y Q − P)/L)``,
    ``t⁺ = (1 + √(1 + 4t²))/2``, ``Y = G⁺ + ((t − 1)/t⁺)(G⁺ − G)``, from ``Y = G``, ``t = 1``."""
    G, P, Q = (np.asarray(a, np.float64) for a in (G, P, Q))
    L = np.max(np.sum(np.abs(Q), axis=1))
    Y, t = G.copy(), 1.0
    for _ in range(n_steps):
        G_next = np.maximum(Y - (Y @ Q - P) / L, 0.0)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        Y = G_next + ((t - 1.0) / t_next) * (G_next - G)
        G, t = G_next, t_next
    return G


def hals_codes_reference(G, P, Q, n_sweeps):
    """HALS sweeps from the formula: column by column ``G[:, j] ← max(0, G[:, j] + (P − G Q)[:, j] / Q[j, j])``
    (``G[:, j] = 0`` when ``Q[j, j] = 0``)."""
    G, P, Q = (np.array(a, np.float64) for a in (G, P, Q))
    for _ in range(n_sweeps):
        for j in range(G.shape[1]):
            G[:, j] = np.maximum(G[:, j] + (P[:, j] - G @ Q[:, j]) / Q[j, j], 0.0) if Q[j, j] > 0 else 0.0
    return G


def run_extrapolated(X, G0, n_iter, codes, p=None, beta0=0.5, eta=1.5, gamma=1.1, gamma_bar=1.05, ceiling=1.0,
                     ridge=1e-6):
    """The five steps with the codes extrapolated between iterations (Ang & Gillis 2019), from the formulas.

    Each iteration computes ``F`` from the extrapolated codes ``Ĝ`` (formed explicitly here, and its
    products taken directly), rescales by the column norms of ``Ĝ``, and updates the codes with
    ``codes(G, P, Q)`` from ``max(0, Ĝ)``. Then ``Ĝ = G_new + β·(G_new − G/c)`` with ``β = 0`` when the loss
    rose (restart: ``β ← β/η``, ``β̄ ← β``), else ``β ← min(β̄, γβ)``, ``β̄ ← min(ceiling, γ̄β̄)`` from
    ``β̄ = ceiling``; ``G/c`` is the previous codes in the new scaling. Returns the list of ``(F, G, loss)``
    after each iteration.
    """
    X = X.astype(np.float64)
    k = G0.shape[1]
    G = G_hat = G0.astype(np.float64)
    beta, beta_max, last = beta0, ceiling, np.inf
    iterates = []
    for _ in range(n_iter):
        F = X.T @ G_hat @ np.linalg.inv(G_hat.T @ G_hat + ridge * np.eye(k))
        if p is not None:
            F = sparsify(F, p)
        c = np.maximum(np.linalg.norm(G_hat, axis=0), 1e-8)
        F = F * c
        G_new = codes(np.maximum(G_hat, 0.0) / c, X @ F, F.T @ F)
        loss = np.sum((X - G_new @ F.T) ** 2)
        rose = loss > last
        step = 0.0 if rose else beta
        G_hat = G_new + step * (G_new - G / c)
        if rose:
            beta, beta_max = beta / eta, beta
        else:
            beta, beta_max = min(beta_max, gamma * beta), min(ceiling, gamma_bar * beta_max)
        G, last = G_new, loss
        iterates.append((F, G_new, loss))
    return iterates


def matched_cosines(F_true, F_found):
    """Cosine of each true column with its Hungarian-matched found column."""
    from scipy.optimize import linear_sum_assignment

    a = F_true / np.linalg.norm(F_true, axis=0)
    b = F_found / np.maximum(np.linalg.norm(F_found, axis=0), 1e-12)
    cos = a.T @ b
    rows, cols = linear_sum_assignment(-cos)
    return cos[rows, cols]
