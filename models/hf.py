"""transformers, imported for its tokenizers only.

Without PyTorch, ``import transformers`` logs "PyTorch was not found. Models won't be available..." on
every import, an advice that does not apply: jsnmf uses transformers for tokenizers (and GGUF tokenizer
conversion) only, and its models are JAX ports. :func:`transformers_module` imports it with that
advice off (``TRANSFORMERS_NO_ADVISORY_WARNINGS`` set during the import only, then restored).
"""
from __future__ import annotations

import os
import sys

__all__ = ["transformers_module"]

_ADVICE_OFF = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def transformers_module():
    """The ``transformers`` module, imported without the PyTorch advice."""
    if "transformers" in sys.modules:
        return sys.modules["transformers"]
    before = os.environ.get(_ADVICE_OFF)
    os.environ[_ADVICE_OFF] = "1"
    try:
        import transformers
    finally:
        if before is None:
            os.environ.pop(_ADVICE_OFF, None)
        else:
            os.environ[_ADVICE_OFF] = before
    return transformers
