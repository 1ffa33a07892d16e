"""``jsnmf.SNMF``: the scikit-learn-style estimator around the kernels.

Settings go in the constructor, ``fit`` learns, learned state ends in ``_``, ``transform`` applies.
``X`` is (n_tokens × d_mlp); ``features_`` is ``F`` (d_mlp × k, any sign); ``codes_`` is ``G``
(n_tokens × k, ≥ 0); ``X ≈ codes_ @ features_.T``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jsnmf.blas import single_threaded_lapack
from jsnmf.checkpoint import FitCheckpointer, data_fingerprint, fingerprint_rows, problem_manifest
from jsnmf.distributed import ShardedRows, replicate, replicated_value
from jsnmf.dtypes import DTYPES
from jsnmf.fit.arrays import Limits, active_mesh, sharded_rows
from jsnmf.fit.backends import FitSpec, make_backend
from jsnmf.fit.loop import FitResult
from jsnmf.fit.loop import fit as fit_loop
from jsnmf.io.manifest import corrupt
from jsnmf.io.saved import MANIFEST, read_saved, write_saved
from jsnmf.kernels.fit import SolverConfig, solve_codes
from jsnmf.fit.starts import INITIALIZERS
from jsnmf.kernels.sharded import check_mesh, codes_solver, explained_variance
from jsnmf.kernels.solvers import solver_names
from jsnmf.kernels.steps import chunk_statistics, keep_count, matmul_f32
from jsnmf.validation import validate_matrix




class SNMF:
    """Semi-Nonnegative Matrix Factorization ``X ≈ G Fᵀ`` with ``G ≥ 0`` (Ding, Li & Jordan 2010),
    with the winner-take-all sparsity on ``F`` of Shafran, Geiger & Geva (2025).

    Parameters
    ----------
    rank: number of features ``k``.
    solver: a name in ``SNMF.solvers``: ``"mu"`` (the paper's multiplicative update), ``"hals"`` (block
        coordinate descent sweeps on the codes; more progress per pass over ``X``), ``"apg"``
        (accelerated projected gradient) or ``"ehals"`` (``"hals"`` with the codes extrapolated between
        iterations; the fewest passes over ``X``).
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

    Where the fit runs (devices, chunking, codes on disk, checkpoints, the progress bar) is not a
    property of the factorization: those are arguments of :meth:`fit`, so ``get_params`` holds the
    algorithm alone, a saved model records no machine, and ``sklearn.base.clone`` copies settings
    that mean the same on any host.
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
        self._check_settings()

    # -- settings -------------------------------------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's settings, as scikit-learn's ``get_params`` (no nested estimators, so ``deep``
        changes nothing)."""
        return {name: getattr(self, name) for name in self._param_names()}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SNMF":
        """An SNMF with a named preset's hyperparameters (:mod:`jsnmf.presets`; ``"paper"``: the paper's
        fit), ``overrides`` on top, e.g. ``SNMF.from_preset("paper", rank=50)``."""
        from jsnmf.presets import get_preset

        return cls(**get_preset(name).params(**overrides))

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

    def solver_config(self, d: int) -> SolverConfig:
        """The static settings of the compiled iteration for ``d_mlp = d``."""
        n_keep = keep_count(self.sparsity, d)
        if n_keep is not None and n_keep < FEW_NEURONS:
            warnings.warn(few_neurons_message(self.sparsity, d, n_keep), FewNeuronsWarning, stacklevel=4)
        return SolverConfig(
            solver=self.solver,
            n_keep=n_keep,
            ridge=float(self.ridge),
            hals_sweeps=int(self.hals_sweeps),
        )

    def limits(self) -> Limits:
        """The stopping rule's settings."""
        return Limits(tol=float(self.tol), patience=int(self.patience), max_iter=int(self.max_iter))

    # -- fitting --------------------------------------------------------------------------------

    @single_threaded_lapack
    def fit(self, X, y=None, *, layer: int | None = None, mesh: Any = None, chunk_tokens: int | None = None,
            codes_on_disk: bool | str | os.PathLike = False, checkpoint_dir: str | os.PathLike | None = None,
            checkpoint_every: int = 50, max_to_keep: int = 2, resume: bool = False,
            progress: bool | None = None, on_device: bool | None = None) -> "SNMF":
        """Learn ``features_`` and ``codes_`` from ``X`` (n_tokens × d_mlp). ``y`` is ignored.

        ``X`` may also be an :class:`~jsnmf.store.ActivationStore` (``layer`` picks the layer; it may
        be left out when the store holds one) or a ``np.memmap``: the fit then streams it, one pass
        over its chunks per iteration, with the same iterates as in memory (:mod:`jsnmf.fit.stream`),
        or reads it once into device memory when it fits there (``on_device``).

        Where and how the fit runs (none of these changes the factors beyond float rounding):

        mesh: a ``jax.sharding.Mesh`` with an axis ``data`` to split the tokens over (see
            :mod:`jsnmf.distributed`). ``None``: every device JAX sees, so a single-device run is
            unchanged and one host with 8 GPUs shards over all 8. Under ``jax.process_count() > 1``
            every process passes its own rows (or the store: each streams its own share of its
            chunks) and ``codes_`` holds the process's own rows.
        chunk_tokens: rows per chunk of a streamed fit. Any array is streamed when this is set;
            ``None`` keeps a store's own chunks (65536 rows for a memmap).
        on_device: where the rows of a store, memmap or chunk source live during the fit
            (:mod:`jsnmf.fit.on_device`). ``None``: read once, chunk by chunk, into device memory when
            ``X`` in ``dtype`` and the fit's working set fit the free memory the devices report (GPUs
            and TPUs; CPU devices report none, so a CPU fit streams), else streamed from disk every
            iteration; ``True``: held on the device (a ValueError when the estimate says it cannot fit);
            ``False``: always streamed, an in-memory array too. An array given with ``chunk_tokens``, or
            any ``X`` with ``codes_on_disk``, is streamed unless ``on_device=True`` (which keeps the codes
            on the device too, so it does not go with ``codes_on_disk``). The factors are the same up to
            float rounding.
        codes_on_disk: where a streamed fit keeps ``G``: ``False`` in memory; ``True`` in ``.npy``
            files in a new temporary directory; a path: in that directory (``codes_`` is then a
            read-only memory map of ``codes.npy`` there).
        checkpoint_dir: save the fit state there every ``checkpoint_every`` iterations and at the
            end, keeping the newest ``max_to_keep`` (orbax; :mod:`jsnmf.checkpoint`). ``resume=True``
            continues from the latest complete checkpoint in it (a fit killed at any moment ends
            with the same factors as an uninterrupted one), or starts afresh when there is none; a
            checkpoint of another problem is a ValueError.
        progress: show a progress bar with the loss (process 0 only); ``None``: when stderr is a
            terminal.

        Every case is the one driver (:func:`jsnmf.fit.loop.fit`) over a data backend.
        """
        self._check_settings()
        check_runtime(mesh=mesh, chunk_tokens=chunk_tokens, codes_on_disk=codes_on_disk,
                      checkpoint_every=checkpoint_every, max_to_keep=max_to_keep, on_device=on_device)
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir= (the directory the fit checkpoints into)")
        spec = FitSpec(int(self.rank), self.init, int(self.seed), self.dtype, self.solver_config, self.limits())
        backend, source, sample_rows = make_backend(X, layer, spec, mesh=mesh, chunk_tokens=chunk_tokens,
                                                    codes_on_disk=codes_on_disk, on_device=on_device)
        try:
            checkpointer = self._checkpointer(checkpoint_dir, resume, backend.n_tokens, backend.d, sample_rows,
                                              source, every=checkpoint_every, max_to_keep=max_to_keep)
        except BaseException:
            backend.close()
            raise
        (result,) = fit_loop(backend, max_iter=int(self.max_iter), progress=show_progress(progress),
                             checkpointer=checkpointer)
        return self.set_fitted(result)

    def _checkpointer(self, checkpoint_dir, resume: bool, n: int, d: int, sample_rows, source: dict, *,
                      every: int, max_to_keep: int):
        """The :class:`~jsnmf.checkpoint.FitCheckpointer` of a fit, or None without ``checkpoint_dir``.

        ``sample_rows(indices)``: those rows of the (global) ``X``, for the data fingerprint.
        """
        if checkpoint_dir is None:
            return None
        fingerprint = data_fingerprint(sample_rows(fingerprint_rows(n)), n, d)
        problem = problem_manifest(self.get_params(), n, d, fingerprint, source)
        return FitCheckpointer(checkpoint_dir, problem, every=int(every), max_to_keep=int(max_to_keep), resume=resume)


    @single_threaded_lapack
    def fit_transform(self, X, y=None, **fit_params) -> np.ndarray:
        """``fit(X, **fit_params)`` and return ``codes_``."""
        return self.fit(X, **fit_params).codes_

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
    def transform(self, X, tol: float = 1e-5, *, mesh: Any = None) -> np.ndarray:
        """Codes of (new) tokens with ``F`` fixed: the non-negative least-squares ``G`` for ``X``.

        ``mesh`` as in :meth:`fit`: sharded, ``X`` is this process's rows and so are the codes.
        """
        self._check_fitted("transform")
        mesh = self._active_mesh(X, mesh)
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
    def score(self, X, y=None, *, mesh: Any = None) -> float:
        """Explained variance of ``X`` by its codes: ``1 − ‖X − G Fᵀ‖² / Σ_j ‖X_j − mean(X_j)‖²``.

        The conventional, per-dimension centred definition (scikit-learn's ``explained_variance``
        summed over columns); higher is better, 1 is perfect. ``X`` is encoded with ``transform``.
        Sharded (``mesh`` as in :meth:`fit`): ``X`` is this process's rows and the score is that of
        the whole global ``X``.
        """
        mesh = self._active_mesh(X, mesh)
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

    def _active_mesh(self, X, mesh):
        """The mesh to shard over, or None for the single-device path."""
        check_runtime(mesh=mesh)
        return active_mesh(mesh, X)

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

    def _saved_params(self) -> dict:
        params = self.get_params()
        if not isinstance(params["init"], str):
            params["init"] = "arrays"
        return params

    def _source(self, source: dict | None) -> dict | None:
        """``source`` (model, layer, hook), else the one this model was loaded with (``source_``)."""
        source = source if source is not None else getattr(self, "source_", None)
        if source is None:
            return None
        unknown = sorted(set(source) - set(SOURCE_KEYS))
        if unknown:
            raise ValueError(f"source names {unknown}; it may name {list(SOURCE_KEYS)}")
        return {key: source.get(key) for key in SOURCE_KEYS}

    def save(self, path: str | os.PathLike, *, source: dict | None = None) -> Path:
        """Write the fitted factors with orbax and a JSON manifest into directory ``path``
        (:mod:`jsnmf.io.saved`). Written beside ``path`` and renamed into place, so a kill never leaves
        a half checkpoint. ``source``: what ``X`` came from, ``{"model", "layer", "hook"}`` (any may
        be None), recorded in the manifest (default: ``source_`` of a loaded model)."""
        self._check_fitted("save")
        arrays = {"features": self.features_, "codes": self.codes_, "loss_history": self.loss_history_}
        facts = {"n_iter": self.n_iter_, "n_features_in": self.n_features_in_,
                 "reconstruction_err": self.reconstruction_err_, "relative_error": self.relative_error_}
        return write_saved(path, self._saved_params(), arrays, facts, source=self._source(source))

    def export(self, path: str | os.PathLike, *, codes: bool = False, source: dict | None = None,
               n_tokens: int | None = None) -> Path:
        """Write ``features.safetensors`` (``F``; with ``codes=True`` also ``G``) and ``cfg.json`` into
        folder ``path`` (:mod:`jsnmf.io.export`): readable with ``safetensors`` alone, in NumPy or
        PyTorch, and back with :meth:`load`. ``source``: ``{"model", "layer", "hook"}`` as in
        :meth:`save`; ``n_tokens``: tokens fitted (default: the rows of ``codes_``)."""
        from jsnmf.io.export import write_export

        self._check_fitted("export")
        G = np.asarray(self.codes_) if codes else None
        if codes and (G.ndim != 2 or G.shape[0] == 0):
            raise ValueError("codes=True, but this model holds no codes (it was loaded from an export without G)")
        if n_tokens is None and np.ndim(self.codes_) == 2:
            n_tokens = int(np.shape(self.codes_)[0])
        facts = {"n_iter": self.n_iter_, "relative_error": self.relative_error_}
        return write_export(path, np.asarray(self.features_), G, params=self._saved_params(), facts=facts,
                            source=self._source(source), n_tokens=n_tokens)

    @classmethod
    def _from_params(cls, params: dict, path: Path, manifest_name: str) -> "SNMF":
        # settings this jsnmf no longer takes (runtime settings saved by older versions) are left out
        params = {name: value for name, value in params.items() if name in cls._param_names()}
        if params.get("init") == "arrays":
            params["init"] = "random"
        try:
            return cls(**params)
        except (TypeError, ValueError) as err:
            raise corrupt(path, f"its params are not valid SNMF settings ({err})", manifest_name) from None

    @classmethod
    def _load_export(cls, path: Path) -> "SNMF":
        from jsnmf.io.export import CFG_FILE, read_export

        cfg, arrays = read_export(path)
        model = cls._from_params(cfg["params"], path, CFG_FILE)
        model.features_ = arrays["F"]
        model.codes_ = arrays.get("G", np.zeros((0, cfg["rank"]), np.float32))
        model.loss_history_ = np.zeros(0, np.float32)
        model.n_iter_ = int(cfg["n_iter"])
        model.n_features_in_ = int(cfg["d_in"])
        model.relative_error_ = float(cfg["relative_error"])
        model.reconstruction_err_ = float("nan")
        model.source_ = {"model": cfg.get("model_name"), "layer": cfg.get("layer"), "hook": cfg.get("hook_name")}
        return model

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SNMF":
        """Read a checkpoint written by :meth:`save`, or an export written by :meth:`export` (then
        ``codes_`` holds ``G`` when it was exported, else no rows, and ``loss_history_`` is empty); a
        manifest or arrays that do not fit together raise one ValueError naming the folder and the
        problem. ``source_`` is what the fit came from (``{"model", "layer", "hook"}``), or None."""
        from jsnmf.io.export import is_export

        path = Path(path).absolute()
        if is_export(path) and not (path / MANIFEST).is_file():
            return cls._load_export(path)
        saved = read_saved(path)
        model = cls._from_params(saved.params, path, MANIFEST)
        arrays = saved.restore()
        model.features_ = arrays["features"]
        model.codes_ = arrays["codes"]
        model.loss_history_ = arrays["loss_history"]
        model.n_iter_ = int(saved.facts["n_iter"])
        model.n_features_in_ = int(saved.facts["n_features_in"])
        model.reconstruction_err_ = float(saved.facts["reconstruction_err"])
        model.relative_error_ = float(saved.facts["relative_error"])
        model.source_ = saved.source
        return model

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.get_params().items() if not (k == "init" and not isinstance(v, str))}
        return f"SNMF({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


FEW_NEURONS = 4  # fewer neurons than this per feature draws a FewNeuronsWarning
SOURCE_KEYS = ("model", "layer", "hook")  # what a saved or exported fit records about its X


class FewNeuronsWarning(UserWarning):
    """The sparsity keeps so few neurons per feature that the features are nearly single neurons."""


def few_neurons_message(sparsity: float, d: int, n_keep: int) -> str:
    return (f"sparsity {sparsity} keeps ceil({sparsity}·{d}) = {n_keep} of {d} neurons per feature (fewer than "
            f"{FEW_NEURONS}): the features are nearly single neurons. Sparsity is a fraction of the width, so "
            "a narrow layer needs a larger value, or none (sparsity=None; CLI: --sparsity none)")


def show_progress(progress: bool | None) -> bool:
    """Whether to draw a progress bar: as asked, or (``None``) when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def check_runtime(*, mesh: Any = None, chunk_tokens: int | None = None, codes_on_disk: Any = False,
                  checkpoint_every: int = 1, max_to_keep: int = 1, on_device: bool | None = None) -> None:
    """Refuse runtime settings of :meth:`SNMF.fit` that cannot work, naming the setting."""
    if on_device is not None and not isinstance(on_device, (bool, np.bool_)):
        raise ValueError(f"on_device must be None (automatic), True or False; got {on_device!r}")
    if on_device is True and codes_on_disk is not False:
        raise ValueError("on_device=True keeps X and the codes on the device, codes_on_disk keeps the codes of a "
                         "streamed fit on disk: pass one of them")
    if mesh is not None:
        check_mesh(mesh)
    if chunk_tokens is not None and not (
            isinstance(chunk_tokens, (int, np.integer)) and not isinstance(chunk_tokens, bool) and chunk_tokens >= 1):
        raise ValueError(f"chunk_tokens must be a positive integer or None; got {chunk_tokens!r}")
    if not isinstance(codes_on_disk, (bool, str, os.PathLike)):
        raise ValueError(f"codes_on_disk must be True, False or a directory path; got {codes_on_disk!r}")
    for name, value in (("checkpoint_every", checkpoint_every), ("max_to_keep", max_to_keep)):
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
