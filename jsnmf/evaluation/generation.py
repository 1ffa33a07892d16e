"""The paper's steered-generation protocol (``notes/ecosystem.md`` §4.4): sampled continuations at each α.

From the prompt "I think that" (BOS prepended, as TransformerLens does), ``n_samples`` continuations of
``max_new_tokens`` = 50 tokens are sampled at temperature 1 with top-k 30 and top-p 0.3, through the
KV-cached :func:`jsnmf.models.generate`, with ``α · v̂`` added at every prompt and generated position
(:class:`jsnmf.models.Steering`). Choices made here:

- **Always the requested length.** EOS does not stop a row (``stop_at_eos=False``): a steered model
  that emits EOS early would otherwise hand the judges shorter, incomparable texts.
- **The same seed at every α** (common random numbers): the samples at two strengths differ because
  of the steering, not because of different sampling noise, and α = 0 reproduces unsteered sampling
  with that seed exactly (``Steering`` with α = 0 leaves the model unchanged).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jsnmf.models import Steering, generate
from jsnmf.models.steering import SITES

__all__ = ["PAPER_PROMPT", "PAPER_SAMPLING", "SteeredSamples", "prompt_ids", "steered_generate"]

PAPER_PROMPT = "I think that"
# The paper's sampling settings (its causal/generate_causal_output.py).
PAPER_SAMPLING = {"max_new_tokens": 50, "temperature": 1.0, "top_k": 30, "top_p": 0.3}


@dataclasses.dataclass(frozen=True)
class SteeredSamples:
    """The continuations sampled at one α: ``tokens`` [n_samples, max_new_tokens] and their ``texts``."""

    alpha: float
    tokens: np.ndarray
    texts: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "texts": list(self.texts), "tokens": self.tokens.tolist()}


def prompt_ids(tokenizer, prompt: str = PAPER_PROMPT, *, bos: bool = True) -> np.ndarray:
    """The prompt's token ids [seq], without the tokenizer's own special tokens and with the BOS
    prepended when ``bos`` and the tokenizer has one (the paper's TransformerLens default)."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if bos and tokenizer.bos_token_id is not None:
        ids = [int(tokenizer.bos_token_id)] + ids
    if not ids:
        raise ValueError(f"prompt {prompt!r} has no tokens")
    return np.asarray(ids, np.int32)


def steered_generate(model, tokenizer, direction, layer: int, site: str, alphas: Sequence[float], *,
                     prompt: str = PAPER_PROMPT, n_samples: int = 8, max_new_tokens: int = 50,
                     temperature: float = 1.0, top_k: int | None = 30, top_p: float | None = 0.3,
                     seed: int = 0, bos: bool = True) -> list[SteeredSamples]:
    """``n_samples`` continuations of ``prompt`` at every α in ``alphas`` (module docstring), one
    :class:`SteeredSamples` per α in the order given.

    ``direction``: the vector to steer along (any norm; ``d_mlp`` at ``hook_post``, ``d_model`` at
    ``hook_mlp_out``); negative α steers along ``−v̂``. The samples of one α are one batch, so each α
    costs one compiled generation (compiled once for all α: only the steering vector's values change).
    """
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    ids = np.repeat(prompt_ids(tokenizer, prompt, bos=bos)[None], n_samples, axis=0)
    results = []
    for alpha in alphas:
        steer = Steering(int(layer), direction, alpha=float(alpha), site=site)
        out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, steering=steer, stop_at_eos=False)
        tokens = np.asarray(out.new_tokens)
        texts = tuple(tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True))
        results.append(SteeredSamples(float(alpha), tokens, texts))
    return results
