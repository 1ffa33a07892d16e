"""``jsnmf.SNMF``: the scikit-learn-style estimator around the kernels.

Settings go in the constructor, ``fit`` learns, learned state ends in ``_``, ``transform`` applies.
``X`` is (n_tokens × d_mlp); ``features_`` is ``F`` (d_mlp × k, any sign); ``codes_`` is ``G``
(n_tokens × k, ≥ 0); ``X ≈ codes_ @ features_.T``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsnmf import __version__
from jsnmf.kernels.fit import SOLVERS, SolverConfig, initial_state, run_block, solve_codes
from jsnmf.kernels.init import INITIALIZERS
from jsnmf.kernels.steps import chunk_statistics, keep_count, matmul_f32

CHECKPOINT_FORMAT = "jsnmf.SNMF"
CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays"

# Precisions X may be held in on the device; products always accumulate in float32.
STORAGE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def validate_matrix(X: Any, name: str = "X") -> np.ndarray | jax.Array:
    """Check that ``X`` is a finite, non-empty 2-D float matrix; return it as an array.

    NumPy and JAX arrays (float64/32/16, bfloat16) are accepted; anything else raises a
    ``ValueError`` that names the problem.
    """
    if not isinstance(X, (np.ndarray, jax.Array)):
        try:
            X = np.asarray(X)
        except Exception as err:  # ragged lists and the like
            raise ValueError(f"{name} must be a 2-D array of floats; got {type(X).__name__}") from err
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_tokens, d_mlp); got {X.ndim} dimension(s), shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {X.shape}")
    if not jnp.issubdtype(X.dtype, jnp.floating):
        raise ValueError(f"{name} must hold floats (float32, float16 or bfloat16); got dtype {X.dtype}")
    finite = np.isfinite(X).all() if isinstance(X, np.ndarray) else bool(jnp.isfinite(X).all())
    if not finite:
        bad = np.argwhere(~np.isfinite(np.asarray(X, dtype=np.float32)))[0]
        raise ValueError(f"{name} contains NaN or Inf (first at row {bad[0]}, column {bad[1]})")
    return X


class SNMF:
    """Semi-Nonnegative Matrix Factorization ``X ≈ G Fᵀ`` with ``G ≥ 0`` (Ding, Li & Jordan 2010),
    with the winner-take-all sparsity on ``F`` of Shafran, Geiger & Geva (2025).

    Parameters
    ----------
    rank: number of features ``k``.
    solver: ``"mu"`` (the paper's multiplicative update) or ``"hals"`` (block coordinate descent
        sweeps on the codes; more progress per pass over ``X``).
    sparsity: fraction ``p`` of the entries kept in each column of ``F`` (``ceil(p·d_mlp)``, by
        absolute value); ``None`` turns sparsification off.
    init: ``"random"``, ``"svd"``, ``"kmeans"``, or a pair of arrays ``(F0, G0)``.
    max_iter: iteration cap.
    tol, patience: stop after ``patience`` iterations without an improvement of the loss larger
        than ``tol·‖X‖²``. The best iterate is kept.
    seed: seeds the initializer.
    dtype: precision ``X`` is held in on the device (``"float32"``, ``"bfloat16"``, ``"float16"``);
        products accumulate and factors are kept in float32.
    ridge: λ of the ``F`` least squares; hals_sweeps: sweeps per iteration of the ``"hals"`` solver.
    progress: show a progress bar with the loss.
    """

    solvers = SOLVERS
    inits = tuple(INITIALIZERS)

    def __init__(
        self,
        rank: int,
        *,
        solver: str = "mu",
        sparsity: float | None = 0.01,
        init: str | tuple = "random",
        max_iter: int = 1000,
        tol: float = 1e-6,
        patience: int = 100,
        seed: int = 0,
        dtype: str = "float32",
        ridge: float = 1e-6,
        hals_sweeps: int = 4,
        progress: bool = True,
    ):
        self.rank = rank
        self.solver = solver
        self.sparsity = sparsity
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.patience = patience
        self.seed = seed
        self.dtype = dtype
        self.ridge = ridge
        self.hals_sweeps = hals_sweeps
        self.progress = progress
        self._check_settings()

    # -- settings -------------------------------------------------------------------------------

    def get_params(self) -> dict[str, Any]:
        """The constructor's settings, as scikit-learn's ``get_params``."""
        names = ("rank", "solver", "sparsity", "init", "max_iter", "tol", "patience", "seed", "dtype",
                 "ridge", "hals_sweeps", "progress")
        return {name: getattr(self, name) for name in names}

    def _check_settings(self) -> None:
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer; got {self.rank!r}")
        if self.solver not in self.solvers:
            raise ValueError(f"unknown solver {self.solver!r}; expected one of {self.solvers}")
        if self.sparsity is not None and not (0.0 < float(self.sparsity) <= 1.0):
            raise ValueError(f"sparsity must be in (0, 1] or None; got {self.sparsity!r}")
        if isinstance(self.init, str):
            if self.init not in self.inits:
                raise ValueError(f"unknown init {self.init!r}; expected one of {self.inits} or a pair (F0, G0)")
        elif not (isinstance(self.init, (tuple, list)) and len(self.init) == 2):
            raise ValueError("init must be one of "
                             f"{self.inits} or a pair of arrays (F0, G0); got {type(self.init).__name__}")
        if not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer; got {self.max_iter!r}")
        if not (isinstance(self.patience, (int, np.integer)) and self.patience >= 1):
            raise ValueError(f"patience must be a positive integer; got {self.patience!r}")
        if not (math.isfinite(float(self.tol)) and float(self.tol) >= 0):
            raise ValueError(f"tol must be a finite number >= 0; got {self.tol!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {tuple(STORAGE_DTYPES)}")
        if not (math.isfinite(float(self.ridge)) and float(self.ridge) >= 0):
            raise ValueError(f"ridge must be a finite number >= 0; got {self.ridge!r}")
        if not (isinstance(self.hals_sweeps, (int, np.integer)) and self.hals_sweeps >= 1):
            raise ValueError(f"hals_sweeps must be a positive integer; got {self.hals_sweeps!r}")

    def _solver_config(self, d: int) -> SolverConfig:
        return SolverConfig(
            solver=self.solver,
            n_keep=keep_count(self.sparsity, d),
            ridge=float(self.ridge),
            hals_sweeps=int(self.hals_sweeps),
        )

    # -- fitting --------------------------------------------------------------------------------

    def _initial_factors(self, X: jax.Array) -> tuple[jax.Array, jax.Array]:
        n, d = X.shape
        k = int(self.rank)
        if isinstance(self.init, str):
            return INITIALIZERS[self.init](jax.random.key(self.seed), X, k)
        F0 = validate_matrix(self.init[0], "init F0")
        G0 = validate_matrix(self.init[1], "init G0")
        if F0.shape != (d, k):
            raise ValueError(f"init F0 must have shape (d_mlp, rank) = {(d, k)}; got {F0.shape}")
        if G0.shape != (n, k):
            raise ValueError(f"init G0 must have shape (n_tokens, rank) = {(n, k)}; got {G0.shape}")
        if bool((jnp.asarray(G0) < 0).any()):
            raise ValueError("init G0 must be non-negative (the codes of SNMF are >= 0)")
        return jnp.asarray(F0, jnp.float32), jnp.asarray(G0, jnp.float32)

    def fit(self, X, y=None) -> "SNMF":
        """Learn ``features_`` and ``codes_`` from ``X`` (n_tokens × d_mlp). ``y`` is ignored."""
        self._check_settings()
        X = validate_matrix(X)
        n, d = X.shape
        if self.rank > min(n, d):
            raise ValueError(f"rank {self.rank} exceeds min(n_tokens, d_mlp) = {min(n, d)} for X of shape {X.shape}")
        X = jnp.asarray(X, STORAGE_DTYPES[self.dtype])
        sq_norm_X = jnp.sum(jnp.square(X.astype(jnp.float32)))
        if float(sq_norm_X) == 0.0:
            raise ValueError("X is all zeros: there is nothing to factorize")
        F0, G0 = self._initial_factors(X)

        state = initial_state(X, F0, G0)
        config = self._solver_config(d)
        block_size = min(50, int(self.max_iter))
        tol, patience, max_iter = (jnp.float32(self.tol), jnp.int32(self.patience), jnp.int32(self.max_iter))
        history: list[np.ndarray] = []
        started = time.perf_counter()
        with _progress_bar(self.progress, self.max_iter) as bar:
            while True:
                state, losses = run_block(X, sq_norm_X, state, tol, patience, max_iter,
                                          config=config, block_size=block_size)
                losses = np.asarray(losses)
                losses = losses[~np.isnan(losses)]
                history.append(losses)
                if bar is not None and losses.size:
                    bar.update(losses.size)
                    bar.set_postfix(rel_err=f"{math.sqrt(max(losses[-1], 0) / float(sq_norm_X)):.4f}")
                if bool(state.done):
                    break

        self.loss_history_ = np.concatenate(history)
        if not np.isfinite(self.loss_history_).all():
            raise FloatingPointError("the SNMF loss became non-finite; try a larger ridge or float32 X")
        self.features_ = np.asarray(state.best_F)
        self.codes_ = np.asarray(state.best_G)
        self.n_iter_ = int(state.iteration)
        self.n_features_in_ = d
        self.reconstruction_err_ = math.sqrt(float(state.best_loss))
        self.relative_error_ = math.sqrt(float(state.best_loss) / float(sq_norm_X))
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def fit_transform(self, X, y=None) -> np.ndarray:
        """``fit(X)`` and return ``codes_``."""
        return self.fit(X).codes_

    # -- applying -------------------------------------------------------------------------------

    def _check_fitted(self, what: str) -> None:
        if not hasattr(self, "features_"):
            raise ValueError(f"this SNMF is not fitted yet: call fit(X) before {what}")

    def _check_width(self, X) -> None:
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} columns but this SNMF was fitted on d_mlp = {self.n_features_in_}"
            )

    def transform(self, X, tol: float = 1e-5) -> np.ndarray:
        """Codes of (new) tokens with ``F`` fixed: the non-negative least-squares ``G`` for ``X``."""
        self._check_fitted("transform")
        X = validate_matrix(X)
        self._check_width(X)
        X = jnp.asarray(X, STORAGE_DTYPES[self.dtype])
        return np.asarray(solve_codes(X, jnp.asarray(self.features_), jnp.float32(tol)))

    def inverse_transform(self, G) -> np.ndarray:
        """The reconstruction ``G Fᵀ`` (n × d_mlp) of codes ``G`` (n × rank)."""
        self._check_fitted("inverse_transform")
        G = validate_matrix(G, "G")
        if G.shape[1] != self.features_.shape[1]:
            raise ValueError(f"G has {G.shape[1]} columns but this SNMF has rank {self.features_.shape[1]}")
        return np.asarray(jnp.asarray(G, jnp.float32) @ jnp.asarray(self.features_).T)

    def score(self, X, y=None) -> float:
        """Explained variance of ``X`` by its codes: ``1 − ‖X − G Fᵀ‖² / Σ_j ‖X_j − mean(X_j)‖²``.

        The conventional, per-dimension centred definition (scikit-learn's ``explained_variance``
        summed over columns); higher is better, 1 is perfect. ``X`` is encoded with ``transform``.
        """
        G = jnp.asarray(self.transform(X))
        X = jnp.asarray(X, STORAGE_DTYPES[self.dtype])
        F = jnp.asarray(self.features_)
        sq_norm_X = jnp.sum(jnp.square(X.astype(jnp.float32)))
        stats = chunk_statistics(X, G, matmul_f32(X, F))
        residual = sq_norm_X - 2 * stats.PG + jnp.sum((F.T @ F) * stats.GtG)
        mean = jnp.mean(X.astype(jnp.float32), axis=0)
        total = sq_norm_X - X.shape[0] * jnp.sum(mean * mean)
        return float(1.0 - jnp.maximum(residual, 0.0) / total)

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted factors with orbax and a JSON manifest into directory ``path``.

        Written beside ``path`` and renamed into place, so a kill never leaves a half checkpoint.
        """
        import orbax.checkpoint as ocp

        self._check_fitted("save")
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.parent / f".{path.name}.tmp-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        arrays = {"features": self.features_, "codes": self.codes_, "loss_history": self.loss_history_}
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / ARRAYS, arrays)
        checkpointer.wait_until_finished()
        params = self.get_params()
        if not isinstance(params["init"], str):
            params["init"] = "arrays"
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "jsnmf_version": __version__,
            "params": params,
            "shapes": {name: list(np.shape(a)) for name, a in arrays.items()},
            "dtypes": {name: str(np.asarray(a).dtype) for name, a in arrays.items()},
            "n_iter": self.n_iter_,
            "n_features_in": self.n_features_in_,
            "reconstruction_err": self.reconstruction_err_,
            "relative_error": self.relative_error_,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_directory(staging, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SNMF":
        """Read a checkpoint written by :meth:`save`."""
        import orbax.checkpoint as ocp

        path = Path(path).absolute()
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(f"{path} is not a jsnmf checkpoint: it has no {MANIFEST}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest_path} is not valid JSON: {err}") from err
        if manifest.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a jsnmf SNMF checkpoint (format {manifest.get('format')!r})")
        if manifest.get("format_version", 0) > CHECKPOINT_VERSION:
            raise ValueError(f"{path} was written by a newer jsnmf (format version {manifest['format_version']})")
        params = dict(manifest["params"])
        if params["init"] == "arrays":
            params["init"] = "random"
        model = cls(**params)
        arrays = ocp.StandardCheckpointer().restore(path / ARRAYS)
        for name, shape in manifest["shapes"].items():
            if list(np.shape(arrays[name])) != shape:
                raise ValueError(f"{path}: array {name!r} has shape {np.shape(arrays[name])}, manifest says {shape}")
        model.features_ = np.asarray(arrays["features"])
        model.codes_ = np.asarray(arrays["codes"])
        model.loss_history_ = np.asarray(arrays["loss_history"])
        model.n_iter_ = int(manifest["n_iter"])
        model.n_features_in_ = int(manifest["n_features_in"])
        model.reconstruction_err_ = float(manifest["reconstruction_err"])
        model.relative_error_ = float(manifest["relative_error"])
        return model

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.get_params().items() if not (k == "init" and not isinstance(v, str))}
        return f"SNMF({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def _replace_directory(staging: Path, path: Path) -> None:
    """Move a finished ``staging`` directory to ``path``, replacing what is there."""
    if path.exists():
        retired = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, retired)
        os.replace(staging, path)
        shutil.rmtree(retired)
    else:
        os.replace(staging, path)


class _progress_bar:
    """A tqdm bar when ``enabled``, else nothing (usable in a ``with``)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="SNMF", unit="it", leave=False)
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
