"""The paper's evaluation of a run's SNMF features against DiffMeans (and a TopK SAE), as one call.

:func:`evaluate` takes a model, its fitted SNMF per layer and a labelled corpus, and returns plain data
(written by ``jsnmf evaluate`` as ``RUN/evaluation.json``, format ``jsnmf.evaluation``), per layer:

- **detection**: each method's directions scored on every sentence (max-token cosine, BOS and padding
  excluded), AUROC and mean gap per concept for the direction matched to it (SNMF and SAE: the feature
  whose top tokens carry the concept most, codes of the labelled tokens by ``SNMF.transform``;
  DiffMeans: its own direction per concept), and how many concepts each method matched;
- **steering** of each matched concept: α for every KL target (``alpha_for_kl`` from the paper's
  prompt), ``n_samples`` continuations at each reached target, their concept score (the judge), their
  fluency, the paper's harmonic-mean score (``ScoreScale``: the stated rule to [0, 1]) and the mean
  log-probability under the unsteered model. The judge's own matched-vs-mismatched AUROC on the corpus
  is recorded beside them.

Sites as the paper: SNMF at ``hook_post`` (Gemma: mapped by ``feature_to_mlp_out`` to ``hook_mlp_out``),
DiffMeans and the SAE at ``hook_mlp_out``.
"""
from __future__ import annotations

import dataclasses
import datetime
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from jsnmf.models import feature_to_mlp_out

from .activations import encode_sentences, sentence_activations
from .baselines import diff_means_directions
from .detection import detection_table, match_concepts
from .generation import PAPER_PROMPT, prompt_ids, steered_generate
from .judges import ConceptJudge, Fluency, JudgeValidation, ScoreScale
from .sae import TopKSAE
from .steering import DEFAULT_KL_TARGETS, alpha_for_kl

__all__ = ["EVALUATION_FORMAT", "EVALUATION_VERSION", "EvaluationSettings", "Judge", "Method", "evaluate",
           "layer_methods", "steer_direction"]

EVALUATION_FORMAT = "jsnmf.evaluation"
EVALUATION_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """What :func:`evaluate` runs: KL targets, samples per reached target and their length, the prompt,
    how many concepts to steer (``None``: every concept; the same first ones for every method), the
    optional TopK SAE (width ``sae_multiple`` × the SNMF rank, ``sae_k`` active latents), the top tokens
    used for matching, the seed, and ``hierarchy``: the ranks of a hierarchical SNMF of the corpus'
    ``hook_post`` tokens (``fit_hierarchy``; the first level at the run's sparsity), exported as the
    layer's concept tree (``"hierarchy"``, ``Hierarchy.to_dict`` with each node's top tokens)."""

    kl_targets: tuple[float, ...] = DEFAULT_KL_TARGETS
    n_samples: int = 4
    max_new_tokens: int = 50
    prompt: str = PAPER_PROMPT
    steer_concepts: int | None = None
    sae: bool = False
    sae_multiple: int = 4
    sae_k: int = 16
    sae_epochs: int = 100
    k_top: int = 25
    seed: int = 0
    hierarchy: tuple[int, ...] | None = None


@dataclasses.dataclass
class Judge:
    """A concept judge with the concepts it can score (None: any), its fluency judge (None: the steered
    model's fluency) and its validation on the corpus."""

    name: str
    concept: ConceptJudge
    validation: JudgeValidation
    fluency: Callable[[Sequence[str]], np.ndarray] | None = None
    concepts: frozenset | None = None
    vocab_size: int | None = None

    def knows(self, concept: str) -> bool:
        return self.concepts is None or concept in self.concepts


@dataclasses.dataclass
class Method:
    """One method's directions [width, n] at ``site``, the sentence activations they are scored on, and
    each concept's direction index (``{concept: {"feature": j or None, ...}}``)."""

    directions: np.ndarray
    acts: list
    site: str
    matches: dict


def layer_methods(model, snmf, layer: int, post: list, out: list, labels, concepts,
                  settings: EvaluationSettings) -> tuple[dict[str, Method], dict]:
    """SNMF, DiffMeans and (``settings.sae``) TopK SAE directions of ``layer``; and the SAE's figures."""
    token_sentence = np.repeat(np.arange(len(post)), [len(a) for a in post])
    X_post, X_out = np.concatenate(post), np.concatenate(out)
    codes = snmf.transform(X_post)
    methods = {
        "SNMF": Method(np.asarray(snmf.features_), post, "hook_post",
                       match_concepts(codes, token_sentence, labels, concepts, settings.k_top)),
        "DiffMeans": Method(diff_means_directions(out, labels, concepts), out, "hook_mlp_out",
                            {c: {"feature": i} for i, c in enumerate(concepts)}),
    }
    sae_info = None
    if settings.sae:
        rank = int(snmf.features_.shape[1])
        sae = TopKSAE.for_rank(rank, multiple=settings.sae_multiple, k=min(settings.sae_k, rank * settings.sae_multiple),
                               epochs=settings.sae_epochs, seed=settings.seed).fit(X_out)
        methods["TopK SAE"] = Method(sae.directions, out, "hook_mlp_out",
                                     match_concepts(sae.encode(X_out), token_sentence, labels, concepts,
                                                    settings.k_top))
        sae_info = {"width": sae.width, "k": sae.k, "fvu": float(sae.fvu(X_out)),
                    "dead_fraction": float(sae.dead_fraction(X_out)), "trained_on": "hook_mlp_out of the corpus"}
    return methods, sae_info


def _detection(method: Method, labels, concepts) -> dict:
    per_concept = detection_table(method.directions, method.acts, labels, concepts).for_matches(method.matches)
    found = [d for d in per_concept.values() if d["feature"] is not None]
    return {"site": method.site, "per_concept": per_concept, "matched": len(found),
            "n_distinct": len({d["feature"] for d in found}),
            "mean_auroc": float(np.mean([d["auroc"] for d in found])) if found else None}


def steer_direction(model, layer: int, direction, site: str) -> tuple[np.ndarray, str]:
    """Where and along what the paper steers a direction: Gemma's ``hook_post`` features are mapped
    through the MLP's output (``feature_to_mlp_out``) to ``hook_mlp_out``; everything else as given."""
    if site == "hook_post" and model.config.model_type.startswith("gemma"):
        return feature_to_mlp_out(model, layer, direction), "hook_mlp_out"
    return np.asarray(direction, np.float32), site


def _per_text(score, texts, empty: float = float("nan")) -> np.ndarray:
    """``score(texts)`` for the texts with characters; ``empty`` for empty ones (a continuation of special
    tokens only decodes to nothing, and has no tokens to score)."""
    values = np.full(len(texts), empty, np.float64)
    filled = [i for i, t in enumerate(texts) if t.strip()]
    if filled:
        values[filled] = score([texts[i] for i in filled])
    return values


def _mean(values) -> float | None:
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def _samples_scores(texts, concept, judge: Judge | None, scale: ScoreScale | None, model_fluency) -> dict:
    """Scores of one cell's samples. An empty continuation scores 0 for concept and fluency (degenerate
    text, as the paper's judge would score it) and is left out of the mean log-probability."""
    lp_model = _per_text(model_fluency, texts)
    scores = {"model_fluency": _mean(lp_model), "empty_samples": int(np.isnan(lp_model).sum())}
    if judge is None or not judge.knows(concept):
        return scores
    raw_concept = _per_text(lambda t: judge.concept(t, [concept] * len(t)), texts, empty=0.0)
    raw_fluency = _per_text(judge.fluency, texts) if judge.fluency is not None else lp_model
    combined = scale.combine(raw_concept, np.where(np.isnan(raw_fluency), scale.fluency_floor, raw_fluency))
    scores.update(concept_raw=float(np.mean(raw_concept)), concept=float(combined["concept"].mean()),
                  fluency=_mean(combined["fluency"]), score=float(combined["score"].mean()))
    return scores


def _steer_concept(model, tokenizer, layer, method: Method, concept, judge, scale, model_fluency,
                   settings: EvaluationSettings) -> dict | None:
    j = method.matches.get(concept, {}).get("feature")
    if j is None:
        return None
    direction, site = steer_direction(model, layer, method.directions[:, j], method.site)
    search = alpha_for_kl(model, direction, site, layer, prompt_ids(tokenizer, settings.prompt), settings.kl_targets)
    targets = []
    for hit in search.targets:
        entry = {"target": hit.target, "reached": hit.reached, "alpha": hit.alpha, "kl": hit.kl, "note": hit.note}
        if hit.reached:
            sample = steered_generate(model, tokenizer, direction, layer, site, [hit.alpha], prompt=settings.prompt,
                                      n_samples=settings.n_samples, max_new_tokens=settings.max_new_tokens,
                                      seed=settings.seed)[0]
            entry.update(_samples_scores(list(sample.texts), concept, judge, scale, model_fluency),
                         samples=list(sample.texts))
        targets.append(entry)
    return {"feature": int(j), "site": site, "targets": targets}


def _score_scale(model, tokenizer, texts, judge: Judge | None, model_fluency, settings: EvaluationSettings):
    """The stated [0, 1] rule (``ScoreScale``): the concept reference is the judge's mean matched score on
    the corpus; the fluency reference the mean fluency of unsteered samples, or of the first corpus
    sentences when every unsteered sample is empty (recorded as ``fluency_reference_from``)."""
    plain = steered_generate(model, tokenizer, np.ones(model.config.d_mlp, np.float32), 0, "hook_post", [0.0],
                             prompt=settings.prompt, n_samples=settings.n_samples,
                             max_new_tokens=settings.max_new_tokens, seed=settings.seed)[0]
    samples = list(plain.texts)
    unsteered = {"model_fluency": _mean(_per_text(model_fluency, samples)), "samples": samples}
    if judge is None:
        return None, unsteered
    fluency = judge.fluency if judge.fluency is not None else model_fluency
    vocab = judge.vocab_size if judge.fluency is not None else model.config.vocab_size
    reference = _mean(_per_text(fluency, samples))
    unsteered["fluency_reference_from"] = "unsteered samples"
    if reference is None:
        reference = _mean(_per_text(fluency, list(texts[:20])))
        unsteered["fluency_reference_from"] = "corpus sentences (every unsteered sample is empty)"
    floor, concept_reference = -float(np.log(vocab)), float(judge.validation.matched.mean())
    if reference is None or reference <= floor:  # the model reads its own text no better than noise
        unsteered["fluency_reference_from"] += f": mean log p {reference} not above the floor {floor:.3f}, " \
                                               "fluency not scored (score = concept score)"
        return ConceptOnlyScale(concept_reference), unsteered
    return ScoreScale(concept_reference, reference, floor), unsteered


@dataclasses.dataclass(frozen=True)
class ConceptOnlyScale:
    """``ScoreScale``'s concept rule alone, for a model whose fluency cannot be scaled (the planted demo
    model gives human text no more probability than uniform noise): the score is the concept score."""

    concept_reference: float
    fluency_floor: float = float("nan")

    def combine(self, concept_raw, fluency_raw) -> dict[str, np.ndarray]:
        c = np.clip(np.asarray(concept_raw, np.float64) / self.concept_reference, 0.0, 1.0)
        return {"concept": c, "fluency": np.full_like(c, np.nan), "score": c}


def _concept_tree(snmf, post, sequences, skip: int, tokenizer, settings: EvaluationSettings) -> dict:
    from .hierarchy import fit_hierarchy

    ranks = tuple(settings.hierarchy)
    tree = fit_hierarchy(np.concatenate(post), ranks, sparsity=[snmf.sparsity] + [None] * (len(ranks) - 1),
                         init=snmf.init if isinstance(snmf.init, str) else "random", seed=settings.seed)
    ids = np.concatenate([seq[skip:] for seq in sequences])
    names = {int(i): tokenizer.decode([int(i)]) for i in np.unique(ids)}
    return tree.to_dict([names[int(i)] for i in ids], k_top=5)


def evaluate(model, tokenizer, fitted: dict, texts: Sequence[str], labels: Sequence[str | None], *,
             judge: Judge | None = None, settings: EvaluationSettings = EvaluationSettings(),
             progress: bool = False) -> dict:
    """Detection and KL-matched steering of every layer's SNMF features (``fitted``: layer → SNMF) against
    DiffMeans (and the SAE), on the labelled sentences ``texts`` (module docstring). Plain data."""
    concepts = sorted({name for lab in labels if lab is not None for name in lab.split("+")})
    if len(concepts) < 2:
        raise ValueError(f"the corpus needs at least two labels to evaluate against; it has {concepts}")
    sequences, skip = encode_sentences(tokenizer, texts)
    model_fluency = Fluency(model, tokenizer, context=settings.prompt)
    scale, unsteered = _score_scale(model, tokenizer, texts, judge, model_fluency, settings)
    steered = concepts[:settings.steer_concepts] if settings.steer_concepts is not None else concepts
    result = {
        "format": EVALUATION_FORMAT, "format_version": EVALUATION_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "concepts": concepts, "n_sentences": len(texts), "settings": dataclasses.asdict(settings),
        "judge": None if judge is None else {"name": judge.name, "validation": judge.validation.to_dict()},
        "scale": None if scale is None else dataclasses.asdict(scale), "unsteered": unsteered,
        "steered_concepts": steered, "layers": {},
    }
    for layer, snmf in fitted.items():
        post = sentence_activations(model, sequences, layer, "hook_post", skip=skip)
        out = sentence_activations(model, sequences, layer, "hook_mlp_out", skip=skip)
        methods, sae_info = layer_methods(model, snmf, layer, post, out, labels, concepts, settings)
        layer_result = {"rank": int(snmf.features_.shape[1]), "sae": sae_info,
                        "detection": {name: _detection(m, labels, concepts) for name, m in methods.items()},
                        "steering": {name: {} for name in methods}}
        if settings.hierarchy:
            layer_result["hierarchy"] = _concept_tree(snmf, post, sequences, skip, tokenizer, settings)
        cells = [(name, c) for name in methods for c in steered]
        for name, concept in tqdm(cells, desc=f"steer layer {layer}", disable=not progress, leave=False):
            cell = _steer_concept(model, tokenizer, layer, methods[name], concept, judge, scale, model_fluency,
                                  settings)
            if cell is not None:
                layer_result["steering"][name][concept] = cell
        result["layers"][str(layer)] = layer_result
    return result
