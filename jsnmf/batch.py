"""Several layers at once: independent SNMF fits of same-shaped ``X`` in one compiled loop.

When the activations of several layers fit in device memory together, fitting them as a batch
(the array backend with a leading layer axis, :class:`jsnmf.fit.arrays.ArrayBackend`) runs one
dispatch per block for all of them and keeps the device busier than fitting them one by one. Each
layer follows its own stopping rule: the vmapped ``while_loop`` runs until every layer is done, and
the layers already done are masked (their state no longer changes). Each result equals fitting that
layer alone.

    models = jsnmf.fit_layers({6: X6, 12: X12}, rank=128, solver="hals", sparsity=0.01)
    models[12].features_
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import jax.numpy as jnp
import numpy as np

from jsnmf.blas import single_threaded_lapack
from jsnmf.dtypes import DTYPES
from jsnmf.estimator import SNMF, check_runtime, show_progress
from jsnmf.fit.arrays import ArrayBackend, active_mesh, sharded_rows
from jsnmf.fit.loop import fit as fit_loop
from jsnmf.fit.starts import initial_factors, sharded_initial_factors
from jsnmf.validation import validate_matrix

__all__ = ["fit_layers"]


@single_threaded_lapack
def fit_layers(layers: Mapping[Hashable, object], rank: int, *, mesh=None, progress: bool | None = None,
               **params) -> dict[Hashable, SNMF]:
    """Fit one :class:`~jsnmf.SNMF` per entry of ``layers`` (``{layer: X}``), all in one batch.

    Every ``X`` must have the same shape (n_tokens × d_mlp); ``params`` are ``SNMF``'s keyword
    arguments; ``mesh`` and ``progress`` are as in :meth:`SNMF.fit` (with a mesh the batch is
    sharded by rows as a single fit is, and under several processes each ``X`` is this process's
    rows). Returns ``{layer: fitted SNMF}``, each as if fitted alone with the same settings. All
    layers are held in device memory at once.
    """
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("layers must be a non-empty mapping {layer: X}")
    check_runtime(mesh=mesh)
    models = {name: SNMF(rank, **params) for name in layers}
    template = next(iter(models.values()))
    names, k = list(layers), int(template.rank)
    seed, init, dtype = int(template.seed), template.init, DTYPES[template.dtype]
    mesh = active_mesh(mesh)
    if mesh is None:
        checked = {name: validate_matrix(X, f"layers[{name!r}]") for name, X in layers.items()}
        shapes = {name: tuple(X.shape) for name, X in checked.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"fit_layers needs X of the same shape for every layer; got {shapes}")
        X = jnp.stack([jnp.asarray(checked[name], dtype) for name in names])
        del checked
        n, d, layout = X.shape[1], X.shape[2], None

        def starts():
            F0, G0 = zip(*(initial_factors(init, seed, X[i], k) for i in range(len(names))))
            return jnp.stack(F0), jnp.stack(G0)
    else:
        rows = [sharded_rows(layers[name], mesh, dtype, name=f"layers[{name!r}]") for name in names]
        layout = rows[0].layout
        for name, r in zip(names, rows):
            if r.layout != layout or r.n_columns != rows[0].n_columns:
                raise ValueError(f"fit_layers needs X of the same shape for every layer; layers[{name!r}] differs "
                                 f"from layers[{names[0]!r}]")
        n, d = layout.n_rows, rows[0].n_columns
        X = jnp.stack([r.array for r in rows])

        def starts():
            F0, G0 = zip(*(sharded_initial_factors(init, seed, r, k) for r in rows))
            return jnp.stack(F0), jnp.stack(G0)

    backend = ArrayBackend(X, config=template.solver_config(d), limits=template.limits(), starts=starts, mesh=mesh,
                           layout=layout, batched=True)
    for name, sq in zip(names, np.reshape(backend.sq_norms, -1)):
        if k > min(n, d):
            raise ValueError(f"layer {name!r}: rank {k} exceeds min(n_tokens, d_mlp) = {min(n, d)}")
        if sq == 0.0:
            raise ValueError(f"layer {name!r}: X is all zeros: there is nothing to factorize")
    results = fit_loop(backend, max_iter=int(template.max_iter), progress=show_progress(progress))
    for name, result in zip(names, results):
        models[name].set_fitted(result)
    return models
