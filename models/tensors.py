"""One checkpoint tensor, whatever the file format: the unit the loader fills the port from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class CheckpointTensor:
    """A tensor under its Hugging Face name; ``read(dtype)`` returns it in ``dtype`` (float types only).

    ``origin`` names the file and tensor in error messages.
    """

    name: str
    shape: tuple[int, ...]
    origin: str
    read: Callable[[np.dtype], np.ndarray]
