"""Which data backend runs a fit: the one place that looks at ``X`` and picks the pass.

- an :class:`~jsnmf.store.ActivationStore`, a ``np.memmap``, a chunk source, or any array with
  ``chunk_tokens`` set: the streamed backend (:class:`~jsnmf.fit.stream.StreamedFit`), one pass over
  the chunks per iteration, each chunk split over the mesh's devices;
- an array on a mesh of several devices (or under several processes): the row-sharded
  :class:`~jsnmf.fit.arrays.ArrayBackend`;
- an array on one device: the in-memory :class:`~jsnmf.fit.arrays.ArrayBackend`.

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
from jsnmf.fit.stream import StreamedFit
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
                 codes_on_disk=False):
    """``(backend, source, sample_rows)``: the backend for ``X``, a description of the source (for the
    checkpoint's manifest) and a reader of rows of the global ``X`` by index (for its fingerprint)."""
    plan = make_plan(X, layer, chunk_tokens)
    k, dtype = int(spec.rank), DTYPES[spec.dtype]
    if plan is not None:
        mesh = active_mesh(mesh)
        backend = StreamedFit(plan, rank=k, init=spec.init, seed=int(spec.seed), config=spec.solver_config(plan.d),
                              limits=spec.limits, compute_dtype=dtype, mesh=mesh,
                              work_dir=codes_directory(codes_on_disk))
        check_rank(k, backend.n_tokens, backend.d)
        source = dict(plan.describe(), **({} if mesh is None else {"devices": int(mesh.shape[DATA]),
                                                                   "processes": jax.process_count()}))
        return backend, source, backend.sample_rows
    mesh = active_mesh(mesh, X)
    if mesh is not None:
        rows = sharded_rows(X, mesh, dtype)
        check_rank(k, rows.layout.n_rows, rows.n_columns)
        backend = ArrayBackend(rows.array, config=spec.solver_config(rows.n_columns), limits=spec.limits,
                               starts=lambda: sharded_initial_factors(spec.init, int(spec.seed), rows, k),
                               mesh=mesh, layout=rows.layout)
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
        config = spec.solver_config(X.shape[1])
        fused = isinstance(spec.init, str) and spec.init in TRACEABLE
        backend = ArrayBackend(X, config=config, limits=spec.limits,
                               starts=lambda: initial_factors(spec.init, int(spec.seed), X, k),
                               start_state=(lambda: started_state(
                                   X, jax.random.key(int(spec.seed)), init=spec.init, k=k,
                                   extrapolation=config.extrapolation())) if fused else None)
        if not np.isfinite(backend.sq_norms):
            validate_matrix(X_given)  # names the first NaN or Inf; finite values that overflow: drive says so
        source = {"kind": "array", "dtype": str(X_given.dtype)}
        sample = lambda indices: np.asarray(X_given[indices], np.float32)  # noqa: E731
    if float(backend.sq_norms) == 0.0:
        raise ValueError("X is all zeros: there is nothing to factorize")
    return backend, source, sample
