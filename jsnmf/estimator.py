"""``jsnmf.SNMF``: the scikit-learn-style estimator around the kernels.

Settings go in the constructor, ``fit`` learns, learned state ends in ``_``, ``transform`` applies.
``X`` is (n_tokens × d_mlp); ``features_`` is ``F`` (d_mlp × k, any sign); ``codes_`` is ``G``
(n_tokens × k, ≥ 0); ``X ≈ codes_ @ features_.T``.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsnmf import __version__
from jsnmf.blas import single_threaded_lapack
from jsnmf.checkpoint import (FitCheckpointer, array_digest, check_digests, data_fingerprint, fingerprint_rows,
                              problem_manifest)
from jsnmf.distributed import ShardedRows, replicate, replicated_value, sample_rows
from jsnmf.dtypes import DTYPES
from jsnmf.fit.arrays import ArrayBackend, Limits, active_mesh, sharded_rows
from jsnmf.fit.loop import FitResult
from jsnmf.fit.loop import fit as fit_loop
from jsnmf.fit.starts import initial_factors, sharded_initial_factors
from jsnmf.fit.stream import StreamedFit
from jsnmf.io.codes import codes_directory
from jsnmf.io.files import atomic_write_json, is_live_pid
from jsnmf.io.manifest import INTEGER, NUMBER, corrupt, read_manifest
from jsnmf.io.sources import make_plan
from jsnmf.kernels.fit import SolverConfig, solve_codes
from jsnmf.kernels.init import INITIALIZERS
from jsnmf.kernels.sharded import DATA, check_mesh, codes_solver, explained_variance
from jsnmf.kernels.solvers import solver_names
from jsnmf.kernels.steps import chunk_statistics, keep_count, matmul_f32
from jsnmf.validation import validate_matrix

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
    chunk_tokens: rows per chunk of a streamed fit (:mod:`jsnmf.fit.stream`). ``fit`` streams an
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

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's settings, as scikit-learn's ``get_params`` (no nested estimators, so ``deep``
        changes nothing)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> "SNMF":
        """Change constructor settings, as scikit-learn's ``set_params``; checked like the constructor's."""
        unknown = sorted(set(params) - set(self._param_names()))
        if unknown:
            raise ValueError(f"invalid parameters {unknown} for SNMF; valid ones are {list(self._param_names())}")
        for name, value in params.items():
            setattr(self, name, value)
        self._check_settings()
        return self

    @classmethod
    def _param_names(cls) -> tuple[str, ...]:
        import inspect

        return tuple(name for name, p in inspect.signature(cls.__init__).parameters.items()
                     if name != "self" and p.kind is not p.VAR_KEYWORD)

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
        if not (isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool)
                and -2**63 <= int(self.seed) < 2**63):
            raise ValueError(f"seed must be an integer in [-2**63, 2**63) (a 64-bit integer); got {self.seed!r}")
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

    def solver_config(self, d: int) -> SolverConfig:
        """The static settings of the compiled iteration for ``d_mlp = d``."""
        return SolverConfig(
            solver=self.solver,
            n_keep=keep_count(self.sparsity, d),
            ridge=float(self.ridge),
            hals_sweeps=int(self.hals_sweeps),
        )

    def limits(self) -> Limits:
        """The stopping rule's settings."""
        return Limits(tol=float(self.tol), patience=int(self.patience), max_iter=int(self.max_iter))

    # -- fitting --------------------------------------------------------------------------------

    @single_threaded_lapack
    def fit(self, X, y=None, *, layer: int | None = None, checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = False) -> "SNMF":
        """Learn ``features_`` and ``codes_`` from ``X`` (n_tokens × d_mlp). ``y`` is ignored.

        ``X`` may also be an :class:`~jsnmf.store.ActivationStore` (``layer`` picks the layer; it may
        be left out when the store holds one) or a ``np.memmap``: the fit then streams it, one pass
        over its chunks per iteration, with the same iterates as in memory (:mod:`jsnmf.fit.stream`).
        Any array is streamed when ``chunk_tokens`` is set.

        ``checkpoint_dir``: save the fit state there every ``checkpoint_every`` iterations and at the
        end (orbax; :mod:`jsnmf.checkpoint`). ``resume=True`` continues from the latest complete
        checkpoint in it (a fit killed at any moment ends with the same factors as an uninterrupted
        one), or starts afresh when there is none; a checkpoint of another problem is a ValueError.

        Sharded over ``mesh`` (see the class docstring): then ``X`` is this process's rows, or a
        :class:`jsnmf.distributed.ShardedRows` from :func:`jsnmf.distributed.global_rows`.

        Every case is the one driver (:func:`jsnmf.fit.loop.fit`) over a data backend.
        """
        self._check_settings()
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir= (the directory the fit checkpoints into)")
        backend, source, sample_rows = self._backend(X, layer)
        try:
            checkpointer = self._checkpointer(checkpoint_dir, resume, backend.n_tokens, backend.d, sample_rows, source)
        except BaseException:
            backend.close()
            raise
        (result,) = fit_loop(backend, max_iter=int(self.max_iter), progress=self.progress, checkpointer=checkpointer)
        return self.set_fitted(result)

    def _backend(self, X, layer):
        """The data backend for ``X``, a description of the source, and a reader of its global rows."""
        plan = make_plan(X, layer, self.chunk_tokens)
        if plan is not None:
            mesh = active_mesh(self.mesh)
            backend = StreamedFit(plan, rank=int(self.rank), init=self.init, seed=int(self.seed),
                                  config=self.solver_config(plan.d), limits=self.limits(),
                                  compute_dtype=DTYPES[self.dtype], mesh=mesh,
                                  work_dir=codes_directory(self.codes_on_disk))
            self._check_rank(backend.n_tokens, backend.d)
            source = dict(plan.describe(), **({} if mesh is None else {"devices": int(mesh.shape[DATA]),
                                                                       "processes": jax.process_count()}))
            return backend, source, backend.sample_rows
        mesh = active_mesh(self.mesh, X)
        k, dtype = int(self.rank), DTYPES[self.dtype]
        if mesh is not None:
            rows = sharded_rows(X, mesh, dtype)
            self._check_rank(rows.layout.n_rows, rows.n_columns)
            backend = ArrayBackend(rows.array, config=self.solver_config(rows.n_columns), limits=self.limits(),
                                   starts=lambda: sharded_initial_factors(self.init, int(self.seed), rows, k),
                                   mesh=mesh, layout=rows.layout)
            source = {"kind": "array", "dtype": str(rows.array.dtype), "devices": int(mesh.shape[DATA]),
                      "processes": jax.process_count()}
            sample = lambda indices: sample_rows(rows, indices)  # noqa: E731
        else:
            X_given = validate_matrix(X)
            self._check_rank(*X_given.shape)
            X = jnp.asarray(X_given, dtype)
            backend = ArrayBackend(X, config=self.solver_config(X.shape[1]), limits=self.limits(),
                                   starts=lambda: initial_factors(self.init, int(self.seed), X, k))
            source = {"kind": "array", "dtype": str(X_given.dtype)}
            sample = lambda indices: np.asarray(X_given[indices], np.float32)  # noqa: E731
        if float(backend.sq_norms) == 0.0:
            raise ValueError("X is all zeros: there is nothing to factorize")
        return backend, source, sample

    def _check_rank(self, n: int, d: int) -> None:
        if self.rank > min(n, d):
            raise ValueError(f"rank {self.rank} exceeds min(n_tokens, d_mlp) = {min(n, d)} for X of shape {(n, d)}")

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
        return active_mesh(self.mesh, X)

    def _rows(self, X, mesh, name: str = "X") -> ShardedRows:
        """``X`` (this process's rows) as a global row-sharded array in the storage dtype."""
        return sharded_rows(X, mesh, DTYPES[self.dtype], name)

    def set_fitted(self, result: FitResult) -> "SNMF":
        """Take the learned attributes from a fit's :class:`~jsnmf.fit.loop.FitResult` (any backend)."""
        history = np.asarray(result.loss_history)
        self.loss_history_ = history[~np.isnan(history)]
        if not np.isfinite(self.loss_history_).all():
            raise FloatingPointError("the SNMF loss became non-finite; try a larger ridge or float32 X")
        self.features_ = np.asarray(result.features)
        self.codes_ = result.codes if isinstance(result.codes, np.memmap) else np.asarray(result.codes)
        self.n_iter_ = int(result.n_iter)
        self.n_features_in_ = int(result.n_features_in)
        self.reconstruction_err_ = math.sqrt(result.best_loss)
        self.relative_error_ = math.sqrt(result.best_loss / result.sq_norm_X)
        self.fit_seconds_ = float(result.seconds)
        if not math.isnan(result.tokens_per_second):
            self.tokens_per_second_ = float(result.tokens_per_second)
        return self


    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted factors with orbax and a JSON manifest into directory ``path``.

        Written beside ``path`` and renamed into place, so a kill never leaves a half checkpoint; the
        manifest records the sha256 of each array (``checksums``), which :meth:`load` verifies.
        """
        self._check_fitted("save")
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(path)
        staging = path.parent / f".{path.name}{_STAGING}{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        try:
            staging.mkdir()
            self._write_checkpoint(staging)
            _replace_directory(staging, path)
        except BaseException:  # a full disk, an interrupt: leave no staging folder behind
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return path

    def _write_checkpoint(self, staging: Path) -> None:
        """The arrays (orbax) and the manifest of :meth:`save` into the folder ``staging``."""
        import orbax.checkpoint as ocp

        arrays = {"features": self.features_, "codes": self.codes_, "loss_history": self.loss_history_}
        with ocp.StandardCheckpointer() as checkpointer:
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
            "checksums": {name: array_digest(np.asarray(a)) for name, a in arrays.items()},
        }
        atomic_write_json(staging / MANIFEST, manifest)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SNMF":
        """Read a checkpoint written by :meth:`save`; a manifest or arrays that do not fit together
        raise one ValueError naming the checkpoint and the problem."""
        path = Path(path).absolute()
        manifest = read_manifest(path / MANIFEST, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                                 what="jsnmf SNMF checkpoint", missing_what="jsnmf checkpoint",
                                 required=_LOAD_REQUIRED, types=_LOAD_TYPES)
        shapes = _checked_shapes(manifest, path)
        try:
            model = cls(**_loadable_params(manifest["params"], path))
        except (TypeError, ValueError) as err:
            raise corrupt(path, f"its params are not valid SNMF settings ({err})", MANIFEST) from None
        arrays = _restore_arrays(path, shapes)
        check_digests(arrays, manifest.get("checksums") or {}, path / ARRAYS)
        model.features_ = arrays["features"]
        model.codes_ = arrays["codes"]
        model.loss_history_ = arrays["loss_history"]
        model.n_iter_ = int(manifest["n_iter"])
        model.n_features_in_ = int(manifest["n_features_in"])
        model.reconstruction_err_ = float(manifest["reconstruction_err"])
        model.relative_error_ = float(manifest["relative_error"])
        return model

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.get_params().items() if not (k == "init" and not isinstance(v, str))}
        return f"SNMF({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


_LOAD_REQUIRED = ("params", "shapes", "n_iter", "n_features_in", "reconstruction_err", "relative_error")
_LOAD_TYPES = {"params": dict, "shapes": dict, "dtypes": dict, "checksums": dict, "n_iter": INTEGER, "n_features_in": INTEGER,
               "reconstruction_err": NUMBER, "relative_error": NUMBER}
_ARRAY_RANKS = {"features": 2, "codes": 2, "loss_history": 1}  # the arrays of a checkpoint, their ndim


def _checked_shapes(manifest: dict, path: Path) -> dict[str, tuple[int, ...]]:
    """The manifest's ``shapes``, checked against each other, ``params.rank`` and ``n_features_in``."""
    shapes = manifest["shapes"]
    if set(shapes) != set(_ARRAY_RANKS):
        raise corrupt(path, f"'shapes' names {sorted(shapes)}, expected {sorted(_ARRAY_RANKS)}", MANIFEST)
    for name, ndim in _ARRAY_RANKS.items():
        shape = shapes[name]
        if not (isinstance(shape, list) and len(shape) == ndim
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise corrupt(path, f"shape of {name!r} is {shape!r}, expected {ndim} non-negative integers", MANIFEST)
    rank = manifest["params"].get("rank")
    (d, k_features), (_, k_codes) = shapes["features"], shapes["codes"]
    if not rank == k_features == k_codes:
        raise corrupt(path, f"rank {rank!r} does not match the shapes of features {shapes['features']} and "
                            f"codes {shapes['codes']}", MANIFEST)
    if manifest["n_features_in"] != d:
        raise corrupt(path, f"n_features_in {manifest['n_features_in']} does not match features "
                            f"{shapes['features']}", MANIFEST)
    return {name: tuple(shape) for name, shape in shapes.items()}


def _loadable_params(params: dict, path: Path) -> dict:
    """The constructor's keyword arguments from a manifest's ``params`` (settings this jsnmf no longer
    takes are left out; an ``init`` that was arrays becomes ``"random"``)."""
    known = set(SNMF._param_names())
    params = {name: value for name, value in params.items() if name in known}
    if params.get("init") == "arrays":
        params["init"] = "random"
    return params


def _restore_arrays(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The checkpoint's arrays (orbax), each with the shape the manifest gives."""
    import orbax.checkpoint as ocp

    where = path / ARRAYS
    if not where.is_dir():
        raise ValueError(f"{path}: damaged jsnmf SNMF checkpoint, {where.name}/ is missing")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            arrays = checkpointer.restore(where)
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many kinds; all mean unreadable
        raise ValueError(f"{where}: unreadable checkpoint arrays ({type(err).__name__}: {err})") from None
    if not isinstance(arrays, dict) or set(arrays) != set(shapes):
        found = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
        raise ValueError(f"{where}: holds arrays {found}, expected {sorted(shapes)}")
    for name, shape in shapes.items():
        if tuple(np.shape(arrays[name])) != shape:
            raise ValueError(f"{where}: array {name!r} has shape {np.shape(arrays[name])}, {MANIFEST} says {list(shape)}")
    return {name: np.asarray(array) for name, array in arrays.items()}


_STAGING = ".tmp-"  # .<name>.tmp-<pid>: a save in progress; .<name>.old-<pid>: the checkpoint it replaces


def _remove_stale_staging(path: Path) -> None:
    """Remove what saves into ``path`` killed (or failed without cleaning up) left: staging folders of
    processes that no longer run. A live writer's folder is left alone."""
    for entry in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = entry.name[len(path.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and (int(pid) == os.getpid() or not is_live_pid(int(pid))):
            if kind == "old" and not path.exists():
                continue  # killed between its two renames: the old checkpoint is the only one; keep it
            shutil.rmtree(entry, ignore_errors=True)


def _replace_directory(staging: Path, path: Path) -> None:
    """Move a finished ``staging`` directory to ``path``, replacing what is there."""
    if path.exists():
        retired = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, retired)
        os.replace(staging, path)
        shutil.rmtree(retired)
    else:
        os.replace(staging, path)
