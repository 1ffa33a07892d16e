"""The paper's evaluation of features (``notes/ecosystem.md`` §4), as plain functions over arrays and models.

- :mod:`.activations`: sentences → per-sentence activations at ``hook_post`` / ``hook_mlp_out``
  (BOS prepended, then excluded with the padding);
- :mod:`.detection`: max-token cosine scores, AUROC (Mann–Whitney, ties half) and mean gap per
  direction and concept; matching concepts to features by their top tokens;
- :mod:`.baselines`: DiffMeans directions;
- :mod:`.steering`: the steering strength α at which KL(base ‖ steered) reaches each target;
- :mod:`.generation`: the paper's steered sampling (50 tokens, top-k 30, top-p 0.3, "I think that");
- :mod:`.judges`: pluggable concept and fluency judges (likelihood ratio, lexicon, log-probability),
  their matched-vs-mismatched validation and the harmonic-mean combination;
- :mod:`.sae`: the TopK sparse autoencoder baseline (JAX + optax, safetensors);
- :mod:`.reuse`: neurons and neuron groups shared across features (table and heatmap);
- :mod:`.hierarchy`: hierarchical SNMF and its tree as JSON.

Steering itself (unit directions, both sites, the Gemma feature map) is :class:`jsnmf.models.Steering`
and :func:`jsnmf.models.feature_to_mlp_out`.
"""
from .activations import concept_mask, encode_sentences, sentence_activations, site_activations
from .baselines import diff_means, diff_means_directions
from .detection import Detection, auroc, carry_shares, detection_table, match_concepts, mean_gap, sentence_scores
from .generation import PAPER_PROMPT, PAPER_SAMPLING, SteeredSamples, prompt_ids, steered_generate
from .hierarchy import Hierarchy, fine_tune_hierarchy, fit_hierarchy
from .judges import (ConceptJudge, Fluency, FluencyJudge, JudgeValidation, LexiconJudge, LikelihoodRatioJudge,
                     ScoreScale, harmonic_mean, text_logprobs, validate_judge)
from .reuse import neuron_reuse, reuse_heatmap
from .sae import TopKSAE
from .steering import DEFAULT_KL_TARGETS, AlphaSearch, KLTarget, alpha_for_kl, kl_at, next_token_kl

__all__ = [
    "PAPER_PROMPT", "PAPER_SAMPLING", "SteeredSamples", "prompt_ids", "steered_generate", "Hierarchy",
    "fit_hierarchy", "fine_tune_hierarchy", "ConceptJudge", "Fluency", "FluencyJudge", "JudgeValidation", "LexiconJudge",
    "LikelihoodRatioJudge", "ScoreScale", "harmonic_mean", "text_logprobs", "validate_judge", "neuron_reuse",
    "reuse_heatmap", "TopKSAE",
    "DEFAULT_KL_TARGETS", "AlphaSearch", "Detection", "KLTarget", "alpha_for_kl", "auroc", "carry_shares",
    "concept_mask", "detection_table", "diff_means", "diff_means_directions", "encode_sentences", "kl_at",
    "match_concepts", "mean_gap", "next_token_kl", "sentence_activations", "sentence_scores", "site_activations",
]
