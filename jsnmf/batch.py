"""Several layers at once: independent SNMF fits of same-shaped ``X`` in one compiled loop.

When the activations of several layers fit in device memory together, fitting them as a batch
(``jax.vmap`` over a leading layer axis of the block loop) runs one dispatch per block for all of
them and keeps the device busier than fitting them one by one. Each layer follows its own stopping
rule: the vmapped ``while_loop`` runs until every layer is done, and the layers already done are
masked (their state no longer changes). Each result equals fitting that layer alone.

    models = jsnmf.fit_layers({6: X6, 12: X12}, rank=128, solver="hals", sparsity=0.01)
    models[12].features_
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jsnmf.distributed import replicated_value
from jsnmf.dtypes import DTYPES
from jsnmf.estimator import SNMF, _drive_blocks
from jsnmf.validation import validate_matrix
from jsnmf.kernels.fit import initial_state
from jsnmf.kernels.sharded import batched_block_runner, block_runner, squared_norm, state_initializer
from jsnmf.blas import single_threaded_lapack

__all__ = ["fit_layers"]


@single_threaded_lapack
def fit_layers(layers: Mapping[Hashable, object], rank: int, **settings) -> dict[Hashable, SNMF]:
    """Fit one :class:`~jsnmf.SNMF` per entry of ``layers`` (``{layer: X}``), all in one batch.

    Every ``X`` must have the same shape (n_tokens × d_mlp); ``settings`` are ``SNMF``'s keyword
    arguments (``mesh`` included: the batch is then sharded by rows as a single fit is, and under
    several processes each ``X`` is this process's rows). Returns ``{layer: fitted SNMF}``, each as
    if fitted alone with the same settings. All layers are held in device memory at once.
    """
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("layers must be a non-empty mapping {layer: X}")
    models = {name: SNMF(rank, **settings) for name in layers}
    template = next(iter(models.values()))
    mesh = template._active_mesh()
    if mesh is None:
        _fit_batch_in_memory(models, layers)
    else:
        _fit_batch_sharded(models, layers, mesh)
    return models


def _check_layer_matrices(layers: Mapping) -> dict:
    """Validate each ``X`` (errors name the layer) and require one shape for all."""
    checked = {name: validate_matrix(X, f"layers[{name!r}]") for name, X in layers.items()}
    shapes = {name: tuple(X.shape) for name, X in checked.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"fit_layers needs X of the same shape for every layer; got {shapes}")
    return checked


def _check_fit_size(name, rank: int, n: int, d: int, sq_norm: float) -> None:
    if rank > min(n, d):
        raise ValueError(f"layer {name!r}: rank {rank} exceeds min(n_tokens, d_mlp) = {min(n, d)}")
    if sq_norm == 0.0:
        raise ValueError(f"layer {name!r}: X is all zeros: there is nothing to factorize")


def _limits(model: SNMF):
    return np.float32(model.tol), np.int32(model.patience), np.int32(model.max_iter)


def _fit_batch_in_memory(models: dict, layers: Mapping) -> None:
    template = next(iter(models.values()))
    checked = _check_layer_matrices(layers)
    names = list(checked)
    X = jnp.stack([jnp.asarray(checked[name], DTYPES[template.dtype]) for name in names])
    del checked
    _, n, d = X.shape
    sq_norm_X = squared_norm(X)
    sq_norms = np.asarray(sq_norm_X, np.float64)
    for name, sq in zip(names, sq_norms):
        _check_fit_size(name, int(template.rank), n, d, float(sq))
    started = time.perf_counter()
    starts = [models[name]._initial_factors(X[i]) for i, name in enumerate(names)]
    F0, G0 = (jnp.stack(factors) for factors in zip(*starts))
    del starts
    state = jax.jit(jax.vmap(initial_state))(X, F0, G0)
    block_size = min(50, int(template.max_iter))
    step = batched_block_runner(template._solver_config(d), block_size)
    limits = _limits(template)
    state, history = _drive_blocks(lambda s, stop_at: step(X, sq_norm_X, s, *limits, stop_at), state,
                                   int(template.max_iter), template.progress, sq_norms)
    best_F, best_G = np.asarray(state.best_F), np.asarray(state.best_G)
    iterations, best_loss = np.asarray(state.iteration), np.asarray(state.best_loss)
    for i, name in enumerate(names):
        models[name]._set_fitted(best_F[i], best_G[i], history[i], int(iterations[i]), float(best_loss[i]),
                                 float(sq_norms[i]), d, started)


def _fit_batch_sharded(models: dict, layers: Mapping, mesh) -> None:
    template = next(iter(models.values()))
    names = list(layers)
    rows = [template._rows(layers[name], mesh, name=f"layers[{name!r}]") for name in names]
    layout = rows[0].layout
    for name, r in zip(names, rows):
        if r.layout != layout or r.n_columns != rows[0].n_columns:
            raise ValueError(f"fit_layers needs X of the same shape for every layer; layers[{name!r}] differs "
                             f"from layers[{names[0]!r}]")
    n, d = layout.n_rows, rows[0].n_columns
    X = jnp.stack([r.array for r in rows])
    sq_norm_X = squared_norm(X)
    sq_norms = np.asarray(replicated_value(sq_norm_X), np.float64)
    for name, sq in zip(names, sq_norms):
        _check_fit_size(name, int(template.rank), n, d, float(sq))
    started = time.perf_counter()
    starts = [models[name]._sharded_initial_factors(r) for name, r in zip(names, rows)]
    del rows
    F0, G0 = (jnp.stack(factors) for factors in zip(*starts))
    del starts
    state = state_initializer(mesh, batched=True)(X, F0, G0)
    block_size = min(50, int(template.max_iter))
    step = block_runner(mesh, template._solver_config(d), block_size, batched=True)
    limits = _limits(template)
    state, history = _drive_blocks(lambda s, stop_at: step(X, sq_norm_X, s, *limits, stop_at), state,
                                   int(template.max_iter), template.progress, sq_norms)
    best_F = replicated_value(state.best_F)
    best_G = layout.local_part(state.best_G, row_axis=1)
    iterations, best_loss = replicated_value(state.iteration), replicated_value(state.best_loss)
    for i, name in enumerate(names):
        models[name]._set_fitted(best_F[i], best_G[i], history[i], int(iterations[i]), float(best_loss[i]),
                                 float(sq_norms[i]), d, started)
