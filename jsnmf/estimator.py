"""``jsnmf.SNMF``: the scikit-learn-style estimator around the kernels.

Settings go in the constructor, ``fit`` learns, learned state ends in ``_``, ``transform`` applies.
``X`` is (n_tokens × d_mlp); ``features_`` is ``F`` (d_mlp × k, any sign); ``codes_`` is ``G``
(n_tokens × k, ≥ 0); ``X ≈ codes_ @ features_.T``.
"""

from __future__ import annotations

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
from jsnmf.blas import single_threaded_lapack
from jsnmf.dtypes import DTYPES
from jsnmf.io.files import atomic_write_json
from jsnmf.io.manifest import read_manifest
from jsnmf.validation import validate_matrix
from jsnmf.kernels.fit import SolverConfig, initial_state, run_block, solve_codes
from jsnmf.kernels.solvers import solver_names
from jsnmf.kernels.init import INITIALIZERS
from jsnmf.kernels.steps import chunk_statistics, keep_count, matmul_f32
from jsnmf.checkpoint import FitCheckpointer, FitProgress, data_fingerprint, fingerprint_rows, problem_manifest
from jsnmf.io.codes import codes_directory
from jsnmf.io.sources import StreamPlan, make_plan
from jsnmf.streaming import StreamedFit
from jsnmf.kernels.init import random_codes, random_keys
from jsnmf.kernels.sharded import (DATA, block_runner, check_mesh, codes_solver, explained_variance, squared_norm,
                                   state_initializer, zero_rows)
from jsnmf.distributed import ShardedRows, default_mesh, global_rows, replicate, replicated_value, sample_rows

CHECKPOINT_FORMAT = "jsnmf.SNMF"
CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays"



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
    mesh: a ``jax.sharding.Mesh`` with an axis ``data`` to split the tokens over (see
        :mod:`jsnmf.distributed`). ``None``: every device JAX sees, so a plain single-device run
        is unchanged and one host with 8 GPUs shards over all 8. Under ``jax.process_count() > 1``
        every process passes its own rows to ``fit``/``transform``/``score``; ``features_`` is the
        same everywhere and ``codes_`` holds the process's own rows.
    chunk_tokens: rows per chunk of a streamed fit (:mod:`jsnmf.streaming`). ``fit`` streams an
        ``ActivationStore``, a ``np.memmap`` or any array when this is set; ``None`` keeps a store's
        own chunks (65536 rows for a memmap). A streamed fit on a mesh splits each chunk over its
        devices; under several processes each streams its own share of a store's chunks (or its
        own rows of an array) and ``codes_`` holds them.
    codes_on_disk: where a streamed fit keeps ``G``: ``False`` in memory; ``True`` in ``.npy`` files
        in a new temporary directory; a path: in that directory (``codes_`` is then a read-only
        memory map of ``codes.npy`` there).
    checkpoint_every, max_to_keep: with ``fit(..., checkpoint_dir=...)``, save the fit state every
        ``checkpoint_every`` iterations (and at the end), keeping the newest ``max_to_keep``.
    """

    solvers = solver_names()  # the codes-solver registry (jsnmf.kernels.solvers) when this class was made
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
        mesh: Any = None,
        chunk_tokens: int | None = None,
        codes_on_disk: bool | str | os.PathLike = False,
        checkpoint_every: int = 50,
        max_to_keep: int = 2,
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
        self.mesh = mesh
        self.chunk_tokens = chunk_tokens
        self.codes_on_disk = codes_on_disk
        self.checkpoint_every = checkpoint_every
        self.max_to_keep = max_to_keep
        self._check_settings()

    # -- settings -------------------------------------------------------------------------------

    def get_params(self) -> dict[str, Any]:
        """The constructor's settings, as scikit-learn's ``get_params``."""
        names = ("rank", "solver", "sparsity", "init", "max_iter", "tol", "patience", "seed", "dtype",
                 "ridge", "hals_sweeps", "progress", "mesh", "chunk_tokens", "codes_on_disk", "checkpoint_every",
                 "max_to_keep")
        return {name: getattr(self, name) for name in names}

    def _check_settings(self) -> None:
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer; got {self.rank!r}")
        if self.solver not in solver_names():
            raise ValueError(f"unknown solver {self.solver!r}; expected one of {solver_names()}")
        if self.sparsity is not None and not (0.0 < float(self.sparsity) <= 1.0):
            raise ValueError(f"sparsity must be in (0, 1] or None; got {self.sparsity!r}")
        if isinstance(self.init, str):
            if self.init not in INITIALIZERS:
                raise ValueError(f"unknown init {self.init!r}; expected one of {tuple(INITIALIZERS)} "
                                 "or a pair (F0, G0)")
        elif not (isinstance(self.init, (tuple, list)) and len(self.init) == 2):
            raise ValueError("init must be one of "
                             f"{self.inits} or a pair of arrays (F0, G0); got {type(self.init).__name__}")
        if not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer; got {self.max_iter!r}")
        if not (isinstance(self.patience, (int, np.integer)) and self.patience >= 1):
            raise ValueError(f"patience must be a positive integer; got {self.patience!r}")
        if not (math.isfinite(float(self.tol)) and float(self.tol) >= 0):
            raise ValueError(f"tol must be a finite number >= 0; got {self.tol!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {tuple(DTYPES)}")
        if not (math.isfinite(float(self.ridge)) and float(self.ridge) >= 0):
            raise ValueError(f"ridge must be a finite number >= 0; got {self.ridge!r}")
        if not (isinstance(self.hals_sweeps, (int, np.integer)) and self.hals_sweeps >= 1):
            raise ValueError(f"hals_sweeps must be a positive integer; got {self.hals_sweeps!r}")
        if self.mesh is not None:
            check_mesh(self.mesh)
        if self.chunk_tokens is not None and not (
                isinstance(self.chunk_tokens, (int, np.integer)) and self.chunk_tokens >= 1):
            raise ValueError(f"chunk_tokens must be a positive integer or None; got {self.chunk_tokens!r}")
        if not isinstance(self.codes_on_disk, (bool, str, os.PathLike)):
            raise ValueError(f"codes_on_disk must be True, False or a directory path; got {self.codes_on_disk!r}")
        for name in ("checkpoint_every", "max_to_keep"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")

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

    @single_threaded_lapack
    def fit(self, X, y=None, *, layer: int | None = None, checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = False) -> "SNMF":
        """Learn ``features_`` and ``codes_`` from ``X`` (n_tokens × d_mlp). ``y`` is ignored.

        ``X`` may also be an :class:`~jsnmf.store.ActivationStore` (``layer`` picks the layer; it may
        be left out when the store holds one) or a ``np.memmap``: the fit then streams it, one pass
        over its chunks per iteration, with the same iterates as in memory (:mod:`jsnmf.streaming`).
        Any array is streamed when ``chunk_tokens`` is set.

        ``checkpoint_dir``: save the fit state there every ``checkpoint_every`` iterations and at the
        end (orbax; :mod:`jsnmf.checkpoint`). ``resume=True`` continues from the latest complete
        checkpoint in it (a fit killed at any moment ends with the same factors as an uninterrupted
        one), or starts afresh when there is none; a checkpoint of another problem is a ValueError.

        Sharded over ``mesh`` (see the class docstring): then ``X`` is this process's rows, or a
        :class:`jsnmf.distributed.ShardedRows` from :func:`jsnmf.distributed.global_rows`.
        """
        self._check_settings()
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir= (the directory the fit checkpoints into)")
        plan = make_plan(X, layer, self.chunk_tokens)
        if plan is not None:
            return self._fit_streamed(plan, self._active_mesh(), checkpoint_dir, resume)
        mesh = self._active_mesh(X)
        if mesh is not None:
            return self._fit_sharded(X, mesh, checkpoint_dir, resume)
        X = validate_matrix(X)
        n, d = X.shape
        if self.rank > min(n, d):
            raise ValueError(f"rank {self.rank} exceeds min(n_tokens, d_mlp) = {min(n, d)} for X of shape {X.shape}")
        X_given = X
        X = jnp.asarray(X, DTYPES[self.dtype])
        sq_norm_X = jnp.sum(jnp.square(X.astype(jnp.float32)))
        if float(sq_norm_X) == 0.0:
            raise ValueError("X is all zeros: there is nothing to factorize")
        checkpointer = self._checkpointer(checkpoint_dir, resume, n, d, lambda rows: np.asarray(X_given[rows], np.float32),
                                          {"kind": "array", "dtype": str(X_given.dtype)})
        try:
            restored = checkpointer.restore_latest() if checkpointer is not None else None
            if restored is None:
                F0, G0 = self._initial_factors(X)
                state = initial_state(X, F0, G0)
                history = []
            else:
                state = restored.to_fit_state(patience=int(self.patience), max_iter=int(self.max_iter))
                history = [restored.loss_history]
            started = time.perf_counter()
            config = self._solver_config(d)
            block_size = min(50, int(self.max_iter))
            limits = (jnp.float32(self.tol), jnp.int32(self.patience), jnp.int32(self.max_iter))
            state, history = _drive_blocks(
                lambda s, stop_at: run_block(X, sq_norm_X, s, *limits, stop_at, config=config, block_size=block_size),
                state, int(self.max_iter), self.progress, float(sq_norm_X), history=history, n_tokens=n,
                checkpointer=checkpointer,
                progress_of=lambda s, losses: FitProgress.from_fit_state(s, losses, float(sq_norm_X)))
        finally:
            if checkpointer is not None:
                checkpointer.close()

        self._set_fitted(state.best_F, state.best_G, history, int(state.iteration),
                         float(state.best_loss), float(sq_norm_X), d, started)
        return self

    def _checkpointer(self, checkpoint_dir, resume: bool, n: int, d: int, sample_rows, source: dict):
        """The :class:`~jsnmf.checkpoint.FitCheckpointer` of a fit, or None without ``checkpoint_dir``.

        ``sample_rows(indices)``: those rows of the (global) ``X``, for the data fingerprint.
        """
        if checkpoint_dir is None:
            return None
        fingerprint = data_fingerprint(sample_rows(fingerprint_rows(n)), n, d)
        problem = problem_manifest(self.get_params(), n, d, fingerprint, source)
        return FitCheckpointer(checkpoint_dir, problem, every=int(self.checkpoint_every),
                               max_to_keep=int(self.max_to_keep), resume=resume)

    def _fit_streamed(self, plan: StreamPlan, mesh, checkpoint_dir, resume: bool) -> "SNMF":
        """``fit`` streaming ``X`` chunk by chunk (:mod:`jsnmf.streaming`), each chunk split over ``mesh``."""
        fit = StreamedFit(self, plan, DTYPES[self.dtype], mesh=mesh,
                          work_dir=codes_directory(self.codes_on_disk))
        n, d = fit.n, plan.d
        if self.rank > min(n, d):
            raise ValueError(f"rank {self.rank} exceeds min(n_tokens, d_mlp) = {min(n, d)} for X of shape {(n, d)}")
        started = time.perf_counter()
        source = dict(plan.describe(), **({} if mesh is None else {"devices": int(mesh.shape[DATA]),
                                                                   "processes": jax.process_count()}))
        fit.checkpointer = self._checkpointer(checkpoint_dir, resume, n, d, fit.sample_rows, source)
        try:
            with _progress_bar(self.progress and jax.process_index() == 0, self.max_iter) as bar:
                result = fit.run(bar)
        finally:
            if fit.checkpointer is not None:
                fit.checkpointer.close()
        self._set_fitted(result.features, result.codes, result.loss_history, result.n_iter, result.best_loss,
                         result.sq_norm_X, d, started)
        self.codes_ = result.codes  # keeps an on-disk result a np.memmap
        self.tokens_per_second_ = fit.tokens_per_second
        return self

    @single_threaded_lapack
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

    @single_threaded_lapack
    def transform(self, X, tol: float = 1e-5) -> np.ndarray:
        """Codes of (new) tokens with ``F`` fixed: the non-negative least-squares ``G`` for ``X``."""
        self._check_fitted("transform")
        mesh = self._active_mesh(X)
        if mesh is not None:  # this process's rows in, their codes out
            rows = self._rows(X, mesh)
            self._check_width(rows.array)
            G = codes_solver(mesh)(rows.array, replicate(self.features_, mesh), np.float32(tol))
            return rows.layout.local_part(G)
        X = validate_matrix(X)
        self._check_width(X)
        X = jnp.asarray(X, DTYPES[self.dtype])
        return np.asarray(solve_codes(X, jnp.asarray(self.features_), jnp.float32(tol)))

    def inverse_transform(self, G) -> np.ndarray:
        """The reconstruction ``G Fᵀ`` (n × d_mlp) of codes ``G`` (n × rank)."""
        self._check_fitted("inverse_transform")
        G = validate_matrix(G, "G")
        if G.shape[1] != self.features_.shape[1]:
            raise ValueError(f"G has {G.shape[1]} columns but this SNMF has rank {self.features_.shape[1]}")
        return np.asarray(jnp.asarray(G, jnp.float32) @ jnp.asarray(self.features_).T)

    @single_threaded_lapack
    def score(self, X, y=None) -> float:
        """Explained variance of ``X`` by its codes: ``1 − ‖X − G Fᵀ‖² / Σ_j ‖X_j − mean(X_j)‖²``.

        The conventional, per-dimension centred definition (scikit-learn's ``explained_variance``
        summed over columns); higher is better, 1 is perfect. ``X`` is encoded with ``transform``.
        Sharded: ``X`` is this process's rows and the score is that of the whole global ``X``.
        """
        mesh = self._active_mesh(X)
        if mesh is not None:
            self._check_fitted("score")
            rows = self._rows(X, mesh)
            self._check_width(rows.array)
            F = replicate(self.features_, mesh)
            G = codes_solver(mesh)(rows.array, F, np.float32(1e-5))
            return float(replicated_value(explained_variance(rows.array, G, F, np.float32(rows.layout.n_rows))))
        G = jnp.asarray(self.transform(X))
        X = jnp.asarray(X, DTYPES[self.dtype])
        F = jnp.asarray(self.features_)
        sq_norm_X = jnp.sum(jnp.square(X.astype(jnp.float32)))
        stats = chunk_statistics(X, G, matmul_f32(X, F))
        residual = sq_norm_X - 2 * stats.PG + jnp.sum((F.T @ F) * stats.GtG)
        mean = jnp.mean(X.astype(jnp.float32), axis=0)
        total = sq_norm_X - X.shape[0] * jnp.sum(mean * mean)
        return float(1.0 - jnp.maximum(residual, 0.0) / total)

    # -- sharded fitting (jsnmf.distributed) ------------------------------------------------------

    def _active_mesh(self, X=None):
        """The mesh to shard over, or None for the single-device path."""
        if isinstance(X, ShardedRows):
            if self.mesh is not None and X.layout.mesh != self.mesh:
                raise ValueError("X was assembled (global_rows) on a different mesh than this SNMF's mesh")
            return X.layout.mesh
        if self.mesh is not None:
            return check_mesh(self.mesh)
        if jax.process_count() > 1 or jax.device_count() > 1:
            return default_mesh()
        return None

    def _rows(self, X, mesh, name: str = "X") -> ShardedRows:
        """``X`` (this process's rows) as a global row-sharded array in the storage dtype."""
        dtype = DTYPES[self.dtype]
        if isinstance(X, ShardedRows):
            return X if X.array.dtype == dtype else ShardedRows(X.array.astype(dtype), X.layout)
        return global_rows(X, mesh, dtype=dtype, name=name)

    def _sharded_initial_factors(self, rows: ShardedRows) -> tuple[jax.Array, jax.Array]:
        """``(F0, G0)`` as global arrays, ``G0`` zero on padding rows.

        The random start draws each row of ``G0`` by its global token index, so it equals the
        single-device start whatever the layout. ``"svd"`` and ``"kmeans"`` run on the padded ``X``;
        when there is padding, SVD's small positive floor and k-means' choice of starting rows can
        differ from the single-device start.
        """
        layout, X, mesh = rows.layout, rows.array, rows.layout.mesh
        d, k = rows.n_columns, int(self.rank)
        if isinstance(self.init, str) and self.init == "random":
            key_F, key_G = random_keys(jax.random.key(self.seed))
            F0 = jax.random.normal(key_F, (d, k), jnp.float32)
            G_local = random_codes(key_G, jnp.int32(layout.local_offset), layout.local_rows, k)
            return replicate(np.asarray(F0), mesh), layout.assemble(np.asarray(G_local))
        if isinstance(self.init, str):
            F0, G0 = INITIALIZERS[self.init](jax.random.key(self.seed), X, k)
            return F0, zero_rows(G0, layout.valid())
        F0 = validate_matrix(self.init[0], "init F0")
        G0 = validate_matrix(self.init[1], "init G0")
        if F0.shape != (d, k):
            raise ValueError(f"init F0 must have shape (d_mlp, rank) = {(d, k)}; got {F0.shape}")
        if G0.shape != (layout.local_rows, k):
            raise ValueError(f"init G0 must have shape (n_tokens, rank) = {(layout.local_rows, k)} "
                             f"(this process's rows); got {G0.shape}")
        if bool((np.asarray(G0) < 0).any()):
            raise ValueError("init G0 must be non-negative (the codes of SNMF are >= 0)")
        return replicate(np.asarray(F0, np.float32), mesh), layout.assemble(np.asarray(G0, np.float32))

    def _fit_sharded(self, X, mesh, checkpoint_dir=None, resume: bool = False) -> "SNMF":
        """``fit`` with the tokens split over ``mesh`` (:mod:`jsnmf.kernels.sharded`).

        Checkpoints hold the codes as the global row-sharded arrays (each process writes its own
        rows); a resume reads them back whatever the mesh it runs on, so a fit may move between
        meshes, processes, or to the single-device path (:mod:`jsnmf.checkpoint`).
        """
        rows = self._rows(X, mesh)
        layout, X = rows.layout, rows.array
        n, d = layout.n_rows, rows.n_columns
        if self.rank > min(n, d):
            raise ValueError(f"rank {self.rank} exceeds min(n_tokens, d_mlp) = {min(n, d)} for X of shape {(n, d)}")
        sq_norm_X = squared_norm(X)
        sq_norm = float(replicated_value(sq_norm_X))
        if sq_norm == 0.0:
            raise ValueError("X is all zeros: there is nothing to factorize")
        checkpointer = self._checkpointer(
            checkpoint_dir, resume, n, d, lambda indices: sample_rows(rows, indices),
            {"kind": "array", "dtype": str(X.dtype), "devices": int(mesh.shape[DATA]),
             "processes": jax.process_count()})
        try:
            restored = checkpointer.restore_latest() if checkpointer is not None else None
            if restored is None:
                F0, G0 = self._sharded_initial_factors(rows)
                state = state_initializer(mesh)(X, F0, G0)
                history = []
            else:
                own = slice(layout.local_offset, layout.local_offset + layout.local_rows)
                best_G = restored.G if restored.best_G is None else restored.best_G
                state = restored.to_fit_state(patience=int(self.patience), max_iter=int(self.max_iter),
                                              G=layout.assemble(restored.G[own]), best_G=layout.assemble(best_G[own]),
                                              place=lambda value: replicate(value, mesh))
                history = [restored.loss_history]
            started = time.perf_counter()
            block_size = min(50, int(self.max_iter))
            step = block_runner(mesh, self._solver_config(d), block_size)
            limits = (np.float32(self.tol), np.int32(self.patience), np.int32(self.max_iter))
            state, history = _drive_blocks(
                lambda s, stop_at: step(X, sq_norm_X, s, *limits, stop_at), state, int(self.max_iter),
                self.progress, sq_norm, history=history, n_tokens=n, checkpointer=checkpointer,
                progress_of=lambda s, losses: FitProgress.from_fit_state(s, losses, sq_norm, layout))
        finally:
            if checkpointer is not None:
                checkpointer.close()
        self._set_fitted(replicated_value(state.best_F), layout.local_part(state.best_G), history,
                         int(replicated_value(state.iteration)), float(replicated_value(state.best_loss)),
                         sq_norm, d, started)
        return self

    def _set_fitted(self, features, codes, history, n_iter, best_loss, sq_norm, d, started) -> None:
        """Store the learned attributes (``history``: the losses, ``nan`` for iterations not run)."""
        self.loss_history_ = history[~np.isnan(history)]
        if not np.isfinite(self.loss_history_).all():
            raise FloatingPointError("the SNMF loss became non-finite; try a larger ridge or float32 X")
        self.features_ = np.asarray(features)
        self.codes_ = np.asarray(codes)
        self.n_iter_ = n_iter
        self.n_features_in_ = d
        self.reconstruction_err_ = math.sqrt(best_loss)
        self.relative_error_ = math.sqrt(best_loss / sq_norm)
        self.fit_seconds_ = time.perf_counter() - started

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
        params.pop("mesh", None)  # devices belong to the run, not to the factors
        if not isinstance(params.get("codes_on_disk", False), bool):
            params["codes_on_disk"] = str(params["codes_on_disk"])
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
        atomic_write_json(staging / MANIFEST, manifest)
        _replace_directory(staging, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SNMF":
        """Read a checkpoint written by :meth:`save`."""
        import orbax.checkpoint as ocp

        path = Path(path).absolute()
        manifest = read_manifest(path / MANIFEST, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                                 what="jsnmf SNMF checkpoint", missing_what="jsnmf checkpoint",
                                 required=("params", "shapes", "n_iter", "n_features_in", "reconstruction_err",
                                           "relative_error"))
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


def _drive_blocks(step, state, total: int, progress: bool, sq_norm, *, history=(), n_tokens: int | None = None,
                  checkpointer=None, progress_of=None):
    """Run compiled blocks ``step(state, stop_at) -> (state, losses)`` until ``state.done`` holds everywhere.

    For one fit (``losses`` of shape (block,)) or a batch of fits (layers × block). Returns the
    final state and the losses (``history``, the losses before a resume, then those of every block)
    concatenated along the last axis, ``nan`` where a fit ran no iteration. A block pauses at
    ``stop_at``: ``total``, or the next checkpoint boundary of ``checkpointer``, which then saves
    ``progress_of(state, losses)`` (one fit only). The progress bar (process 0 only) shows the
    worst relative error and, given ``n_tokens``, the tokens per second.
    """
    blocks = [np.asarray(h, np.float32) for h in history]
    sq_norm = np.asarray(sq_norm, np.float64).reshape(-1)
    with _progress_bar(progress and jax.process_index() == 0, total) as bar:
        if bar is not None:
            bar.update(int(np.max(replicated_value(state.iteration))))
        while not bool(np.all(replicated_value(state.done))):
            iteration = int(np.max(replicated_value(state.iteration)))
            stop_at = total if checkpointer is None else checkpointer.next_boundary(iteration)
            block_started = time.perf_counter()
            state, losses = step(state, np.int32(stop_at))
            losses = replicated_value(losses)
            blocks.append(losses)
            ran = np.sum(~np.isnan(losses.reshape(-1, losses.shape[-1])), axis=1)
            if bar is not None and ran.max() > 0:
                bar.update(int(ran.max()))
                last = [row[n - 1] / sq for row, n, sq in zip(losses.reshape(len(ran), -1), ran, sq_norm) if n]
                postfix = {"rel_err": f"{math.sqrt(max(max(last), 0)):.4f}"}
                if n_tokens is not None:
                    postfix["tok_s"] = f"{n_tokens * ran.max() / (time.perf_counter() - block_started):.3g}"
                bar.set_postfix(postfix)
            if checkpointer is not None:
                iteration, done = int(replicated_value(state.iteration)), bool(replicated_value(state.done))
                if done or checkpointer.due(iteration):
                    losses = np.concatenate(blocks)
                    checkpointer.save(progress_of(state, losses[~np.isnan(losses)]))
    if not blocks:
        return state, np.zeros(np.shape(sq_norm)[:-1] + (0,), np.float32)
    return state, np.concatenate(blocks, axis=-1)


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
