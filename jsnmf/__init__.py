"""jsnmf: Semi-Nonnegative Matrix Factorization of language-model MLP activations, in JAX.

``X ≈ G Fᵀ``: ``X`` (n_tokens × d_mlp) activations, ``F`` (d_mlp × k) features of any sign,
``G`` (n_tokens × k) non-negative codes. See docs/architecture.md for the algorithm.
"""

__version__ = "0.1.0"

from jsnmf import compilation_cache as _compilation_cache

# Before anything compiles: JAX's persistent compilation cache in a per-user folder, unless the user
# set one or JSNMF_COMPILATION_CACHE=off (jsnmf/compilation_cache.py).
_compilation_cache.configure()

from jsnmf.estimator import SNMF
from jsnmf.batch import fit_layers

__all__ = ["SNMF", "fit_layers", "__version__"]

# Sub-packages reachable as attributes after a plain ``import jsnmf`` (``jsnmf.models.load(...)``),
# imported on first use so that ``import jsnmf`` stays light.
_LAZY = ("models", "kernels", "evaluation", "store", "report", "presets", "demo", "analysis", "extract")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"jsnmf.{name}")
    raise AttributeError(f"module 'jsnmf' has no attribute {name!r}")
