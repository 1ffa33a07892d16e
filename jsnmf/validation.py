"""Checks of the matrices users pass in, with errors that name the problem."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_matrix_layout(X: Any, name: str = "X") -> None:
    """Check that ``X`` is a non-empty 2-D float matrix (its values are not read)."""
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_tokens, d_mlp); got {X.ndim} dimension(s), shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {X.shape}")
    if not jnp.issubdtype(X.dtype, jnp.floating):
        raise ValueError(f"{name} must hold floats (float32, float16 or bfloat16); got dtype {X.dtype}")


def validate_matrix(X: Any, name: str = "X", *, check_finite: bool = True) -> np.ndarray | jax.Array:
    """Check that ``X`` is a finite, non-empty 2-D float matrix; return it as an array.

    NumPy and JAX arrays (float64/32/16, bfloat16) are accepted; anything else raises a
    ``ValueError`` that names the problem. ``check_finite=False``: the caller checks the values.
    """
    if not isinstance(X, (np.ndarray, jax.Array)):
        try:
            X = np.asarray(X)
        except Exception as err:  # ragged lists and the like
            raise ValueError(f"{name} must be a 2-D array of floats; got {type(X).__name__}") from err
    check_matrix_layout(X, name)
    if not check_finite:
        return X
    finite = np.isfinite(X).all() if isinstance(X, np.ndarray) else bool(jnp.isfinite(X).all())
    if not finite:
        bad = np.argwhere(~np.isfinite(np.asarray(X, dtype=np.float32)))[0]
        raise ValueError(f"{name} contains NaN or Inf (first at row {bad[0]}, column {bad[1]})")
    return X
