"""The offline demo: a tiny GPT-2 with planted concept features, and a labelled corpus for it.

``jsnmf run`` with no ``--model`` builds this model (deterministically, in well under a second),
extracts its MLP activations on the shipped corpus, fits SNMF and checks that every planted concept
comes back as a feature. It needs no network and no downloaded weights, and it goes through the same
loader as a real checkpoint: the model is written in Hugging Face format (``config.json``,
``model.safetensors`` with GPT-2's tensor names, ``tokenizer.json`` with a word-level tokenizer).

How the concepts are planted (``d_model`` = 64, ``d_mlp`` = 256, 2 layers):

- Each concept ``c`` owns a unit direction ``d_c`` in the residual stream (orthonormal, and
  orthogonal to the all-ones vector so LayerNorm's centring leaves it alone).
- A word's embedding is Gaussian noise kept out of the concept subspace, plus, for a word of
  concept ``c``, ``α_w·d_c`` (``α_w`` varies a little per word).
- Attention weights are tiny, so the residual stream at every layer is about the token's embedding
  (plus a small MLP write-back, plus a small position embedding).
- In every layer a group of ``group_size`` neurons per concept reads ``d_c`` (``c_fc`` column
  = ``d_c`` + a little noise) with a negative bias set between the concept words' and the other
  words' pre-activations, so the group fires together on that concept's words and on nothing else.
  Their ``c_proj`` rows write ``d_c`` back, so a concept feature's vocabulary projection puts the
  concept's words on top. The remaining neurons are random.

The corpus (:mod:`jsnmf.demo.corpus`) is a few hundred template sentences, each labelled with the
concept(s) whose words it holds; the model is built by :mod:`jsnmf.demo.model`.
"""

from __future__ import annotations

import numpy as np

from jsnmf.demo.corpus import CONCEPTS, compose_corpus, demo_corpus_path, read_demo_corpus
from jsnmf.demo.model import PLANTED_FILE, DemoSpec, build_demo_model, read_planted

__all__ = [
    "CONCEPTS", "DemoSpec", "DEMO_LAYERS", "DEMO_RANK", "DEMO_SPARSITY", "DEMO_MAX_ITER", "DEMO_INIT",
    "PLANTED_FILE", "demo_corpus_path", "read_demo_corpus", "build_demo_model", "read_planted",
    "recovery_from_codes", "compose_corpus",
]

# The settings `jsnmf run` uses for the demo; they recover every planted concept.
DEMO_LAYERS = (0, 1)
DEMO_RANK = 16
DEMO_SPARSITY = 0.03  # ceil(0.03 * 256) = 8 neurons per feature, the size of a planted group
DEMO_MAX_ITER = 300
DEMO_INIT = "svd"  # random starts sometimes merge two concepts into one feature; SVD starts do not

def recovery_from_codes(codes: np.ndarray, token_ids: np.ndarray, decode, k_top: int = 25,
                        concepts: dict[str, tuple[str, ...]] = CONCEPTS) -> dict:
    """``analysis.concept_recovery`` of the features whose codes are ``codes`` (n_tokens, k)."""
    from jsnmf.analysis import concept_recovery, top_activations

    token_ids = np.asarray(token_ids)
    top_tokens = [[decode([int(t)]) for t in token_ids[idx]] for idx in top_activations(codes, k_top)]
    return concept_recovery(top_tokens, concepts)
