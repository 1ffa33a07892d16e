"""The one table of the precisions activations are stored, streamed and held in.

``X`` may be float32, float16 or bfloat16 on disk (the store's chunks), while streaming, and on the
device; products always accumulate in float32 and the factors are float32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = ["DTYPES", "DISK_DTYPES", "check_dtype"]

# In-memory dtype of each supported name (NumPy; JAX takes the same objects).
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# The dtype of the bits in a store's .npy files (bfloat16 is saved as its uint16 bits: .npy has no bfloat16).
DISK_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}


def check_dtype(dtype: str, what: str = "dtype") -> str:
    """Return ``dtype`` if it is a supported name, else raise ValueError listing the choices."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown {what} {dtype!r}; choose one of {sorted(DTYPES)}")
    return dtype
