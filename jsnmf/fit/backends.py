"""Which data backend runs a fit: the one place that looks at ``X`` and picks the pass.

- an :class:`~jsnmf.store.ActivationStore`, a ``np.memmap``, a chunk source, or any array with
  ``chunk_tokens`` set: the streamed backend (:class:`~jsnmf.fit.stream.StreamedFit`), one pass over
  the chunks per iteration, each chunk split over the mesh's devices;
- an array on a mesh of several devices (or under several processes): the row-sharded
  :class:`~jsnmf.fit.arrays.ArrayBackend`;
- an array on one device: the in-memory :class:`~jsnmf.fit.arrays.ArrayBackend`;
- a streamed source whose rows fit the devices' free memory (``on_device``, :mod:`jsnmf.fit.on_device`):
  read once into device memory, then the array backend (one device or row-sharded) on it.

A new backend is one more branch here, a class with the driver's interface (docs/architecture.md,
"The driver and its backends") and, for the initializers, a :class:`~jsnmf.fit.starts.Rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jsnmf.distributed import sample_rows
from jsnmf.dtypes import DTYPES
from jsnmf.fit.arrays import ArrayBackend, Limits, active_mesh, sharded_rows, started_state
from jsnmf.fit.starts import TRACEABLE, initial_factors, sharded_initial_factors
from jsnmf.fit.on_device import HeldFit, choose
from jsnmf.fit.stream import StreamedFit, sample_plan_rows
from jsnmf.io.codes import codes_directory
from jsnmf.io.sources import make_plan
from jsnmf.kernels.fit import SolverConfig
from jsnmf.kernels.sharded import DATA
from jsnmf.validation import validate_matrix

__all__ = ["FitSpec", "make_backend", "check_rank"]


@dataclass(frozen=True)
class FitSpec:
    """What a backend needs of the estimator's settings: the rank, the start, the compute precision,
    the compiled iteration's settings for a width ``d`` and the stopping rule."""

    rank: int
    init: Any  # a name of jsnmf.fit.starts.INITIALIZERS or a pair (F0, G0)
    seed: int
    dtype: str
    solver_config: Callable[[int], SolverConfig]
    limits: Limits


def check_rank(rank: int, n: int, d: int) -> None:
    if rank > min(n, d):
        raise ValueError(f"rank {rank} exceeds min(n_tokens, d_mlp) = {min(n, d)} for X of shape {(n, d)}")


def make_backend(X, layer: int | None, spec: FitSpec, *, mesh=None, chunk_tokens: int | None = None,
                 codes_on_disk=False, on_device: bool | None = None):
    """``(backend, source, sample_rows)``: the backend for ``X``, a description of the source (for the
    checkpoint's manifest) and a reader of rows of the global ``X`` by index (for its fingerprint).

    ``on_device``: where a streamed source's rows live during the fit (:mod:`jsnmf.fit.on_device`).
    None: held on the device(s) when they report enough free memory, else streamed (CPU devices report
    none: streamed); True: held (a ValueError when the estimate says they cannot fit); False: streamed,
    an in-memory array too. An array given with ``chunk_tokens``, or any ``X`` with ``codes_on_disk``,
    is streamed unless ``on_device=True`` (which refuses ``codes_on_disk``: the codes stay on the device).
    """
    plan = make_plan(X, layer, chunk_tokens, force=on_device is False)
    k, dtype = int(spec.rank), DTYPES[spec.dtype]
    if plan is not None:
        mesh = active_mesh(mesh)
        config = spec.solver_config(plan.d)
        choice = choose(plan, on_device, k=k, dtype=dtype, extrapolated=config.extrapolation() is not None, mesh=mesh,
                        stream_asked=codes_on_disk is not False)  # codes on disk: the streamed fit keeps them there
        devices = {} if mesh is None else {"devices": int(mesh.shape[DATA]), "processes": jax.process_count()}
        if choice.hold:
            return _held_backend(plan, choice, spec, config, mesh, devices)
        backend = StreamedFit(plan, rank=k, init=spec.init, seed=int(spec.seed), config=config,
                              limits=spec.limits, compute_dtype=dtype, mesh=mesh,
                              work_dir=codes_directory(codes_on_disk))
        check_rank(k, backend.n_tokens, backend.d)
        source = dict(plan.describe(), **devices)
        return backend, source, backend.sample_rows
    mesh = active_mesh(mesh, X)
    if mesh is not None:
        rows = sharded_rows(X, mesh, dtype)
        check_rank(k, rows.layout.n_rows, rows.n_columns)
        backend = _sharded_backend(rows, spec, spec.solver_config(rows.n_columns), mesh)
        source = {"kind": "array", "dtype": str(rows.array.dtype), "devices": int(mesh.shape[DATA]),
                  "processes": jax.process_count()}
        sample = lambda indices: sample_rows(rows, indices)  # noqa: E731
    else:
        # Values are checked through ‖X‖² (computed on the device anyway): a host pass over X cost as
        # much as a few iterations' fixed cost. Only a non-finite sum looks for the bad entry.
        X_given = validate_matrix(X, check_finite=False)
        check_rank(k, *X_given.shape)
        # device_put shares a page-aligned host array on the CPU, else copies it; jnp.asarray always
        # copied and was slower (0.13 s against 0.05 s for an unaligned 100 MB X on 2 cores).
        X = jax.device_put(X_given) if X_given.dtype == dtype else jnp.asarray(X_given, dtype)
        backend = _array_backend(X, spec, spec.solver_config(X.shape[1]))
        if not np.isfinite(backend.sq_norms):
            validate_matrix(X_given)  # names the first NaN or Inf; finite values that overflow: drive says so
        source = {"kind": "array", "dtype": str(X_given.dtype)}
        sample = lambda indices: np.asarray(X_given[indices], np.float32)  # noqa: E731
    if float(backend.sq_norms) == 0.0:
        raise ValueError("X is all zeros: there is nothing to factorize")
    return backend, source, sample


def _array_backend(X: jax.Array, spec: FitSpec, config: SolverConfig) -> ArrayBackend:
    """The in-memory backend of ``X`` on one device (a traceable named start fused into one executable)."""
    k = int(spec.rank)
    fused = isinstance(spec.init, str) and spec.init in TRACEABLE
    return ArrayBackend(X, config=config, limits=spec.limits,
                        starts=lambda: initial_factors(spec.init, int(spec.seed), X, k),
                        start_state=(lambda: started_state(
                            X, jax.random.key(int(spec.seed)), init=spec.init, k=k,
                            extrapolation=config.extrapolation())) if fused else None)


def _sharded_backend(rows, spec: FitSpec, config: SolverConfig, mesh) -> ArrayBackend:
    """The in-memory backend of row-sharded ``rows`` (:class:`~jsnmf.distributed.ShardedRows`) on ``mesh``."""
    return ArrayBackend(rows.array, config=config, limits=spec.limits,
                        starts=lambda: sharded_initial_factors(spec.init, int(spec.seed), rows, int(spec.rank)),
                        mesh=mesh, layout=rows.layout)


def _held_backend(plan, choice, spec: FitSpec, config: SolverConfig, mesh, devices: dict):
    """A streamed source's rows held on the device(s) (:class:`~jsnmf.fit.on_device.HeldFit`), read when the
    fit starts; its fingerprint rows are read from the source, as a streamed fit reads them, so the two
    share checkpoints."""
    dtype = DTYPES[spec.dtype]
    if mesh is None:
        n_tokens, offset = plan.rows, 0

        def build(X):
            return _array_backend(X, spec, config)
    else:
        layout = choice.layout
        n_tokens, offset = layout.n_rows, layout.local_offset

        def build(rows):
            return _sharded_backend(rows, spec, config, mesh)
    check_rank(int(spec.rank), n_tokens, plan.d)
    backend = HeldFit(plan, choice, dtype, n_tokens=n_tokens, build=build)
    source = dict(plan.describe(), on_device=True, device_dtype=spec.dtype, **devices)
    return backend, source, lambda indices: sample_plan_rows(plan, offset, indices)
