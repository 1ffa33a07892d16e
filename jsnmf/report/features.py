"""The content of a layer's report as data: the per-feature records of ``features.json``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from jsnmf import analysis
from jsnmf.io.manifest import read_manifest
from jsnmf.report.activity import Activity, activity, unit_norm_codes
from jsnmf.report.examples import collapse_duplicates, example_record, quantile_samples
from jsnmf.report.panels import PANELS, PanelInputs, ReportOptions

__all__ = ["FEATURES_FORMAT", "FEATURES_VERSION", "LayerInputs", "LayerReport", "prepare", "build_features", "read_features"]

FEATURES_FORMAT = "jsnmf.report.features"
FEATURES_VERSION = 2  # 2: unit-norm codes, relative activity, windows, samples, histograms


@dataclass
class LayerReport:
    """Where a layer's report went, and its headline numbers (for the index page)."""

    layer: int
    html: Path
    features_json: Path
    rank: int
    n_tokens: int
    n_dead: int
    l0: float
    relative_error: float | None
    n_iter: int | None
    params: dict | None = None
    recovery: dict | None = None     # the demo's concept recovery of this layer (demo.recovery_from_codes)
    features: list = field(default_factory=list)  # per feature: a summary row for the index's search
    activity: tuple | None = None    # (active_fraction, dead_fraction) of the activity rule


@dataclass(frozen=True)
class LayerInputs:
    """Everything a layer's report is computed from, in one object.

    ``features`` is F (d_mlp × k), ``codes`` is G (n_tokens × k); ``token_ids``, ``doc_index``,
    ``positions`` (and ``label_index``) describe the n_tokens rows, as an ``ActivationStore`` does;
    ``decode`` turns token ids into text; ``labels`` are the corpus labels. Optional: ``vocab`` per
    feature ``{"top": [(token, logit)], "bottom": [...]}`` (``analysis.vocab_projection``);
    ``loss_history`` and ``fit_info`` (``n_iter``, ``relative_error``, ``params``) of the fit;
    ``evaluation``: this layer's entry of ``jsnmf evaluate``'s ``evaluation.json`` (with its ``judge``
    and ``concepts``), shown by the steering and detection panels; ``related``: per feature, its closest
    features in other layers (``[{"layer", "feature", "cosine"}]``, :mod:`jsnmf.report.related`).
    """

    features: np.ndarray
    codes: np.ndarray
    token_ids: np.ndarray
    doc_index: np.ndarray
    positions: np.ndarray
    decode: Callable[[list[int]], str]
    label_index: np.ndarray | None = None
    labels: Sequence[str] = ()
    vocab: list[dict] | None = None
    loss_history: np.ndarray | None = None
    fit_info: dict | None = None
    evaluation: dict | None = None
    related: list[list[dict]] | None = None


def prepare(inputs: LayerInputs, options: ReportOptions) -> tuple[np.ndarray, Activity]:
    """The layer's codes in unit-norm units (``G·‖F_j‖``) and their :class:`Activity` under ``options``."""
    unit = unit_norm_codes(inputs.codes, inputs.features)
    return unit, activity(unit, options.active_fraction, options.dead_fraction)


def _check(inputs: LayerInputs) -> None:
    features, codes = np.asarray(inputs.features), np.asarray(inputs.codes)
    n_tokens, k = codes.shape
    if features.ndim != 2 or features.shape[1] != k:
        raise ValueError(f"features F {features.shape} and codes G {codes.shape} disagree on the rank")
    for name, array in (("token_ids", inputs.token_ids), ("doc_index", inputs.doc_index), ("positions", inputs.positions)):
        if len(array) != n_tokens:
            raise ValueError(f"{name} has {len(array)} rows but the codes G have {n_tokens}")
    if inputs.vocab is not None and len(inputs.vocab) != k:
        raise ValueError(f"vocab projection has {len(inputs.vocab)} rows, expected one per feature ({k})")
    if inputs.related is not None and len(inputs.related) != k:
        raise ValueError(f"related features have {len(inputs.related)} rows, expected one per feature ({k})")


def _top_examples(unit: np.ndarray, act: Activity, token_ids, documents, options: ReportOptions) -> list[list]:
    """Per feature, ``(token index, duplicates)`` of its top active tokens, near-duplicates collapsed."""
    candidates = analysis.top_activations(unit, max(options.k_top * 4, 1))
    return [collapse_duplicates([i for i in idx if unit[i, j] >= act.threshold[j]], token_ids, documents,
                                options.dedup_radius, limit=options.k_top)
            for j, idx in enumerate(candidates)]


def build_features(inputs: LayerInputs, options: ReportOptions = None, progress: bool = False,
                   prepared: tuple[np.ndarray, Activity] | None = None) -> list[dict]:
    """The per-feature records of ``features.json`` (see :mod:`jsnmf.report`) from a layer's inputs.

    Code values are in unit-norm units and activity follows ``options`` (:mod:`jsnmf.report.activity`);
    ``prepared`` is :func:`prepare`'s answer when the caller has it. Each panel of :data:`PANELS` adds
    its fields to every record.
    """
    options = options or ReportOptions()
    _check(inputs)
    unit, act = prepared if prepared is not None else prepare(inputs, options)
    features = np.asarray(inputs.features)
    k = unit.shape[1]
    label_index, labels = inputs.label_index, list(inputs.labels)
    has_labels = label_index is not None and len(labels) > 0
    token_ids = np.asarray(inputs.token_ids)
    documents = analysis.DocumentIndex(inputs.doc_index, inputs.positions)
    top = _top_examples(unit, act, token_ids, documents, options)
    panel_inputs = PanelInputs(features=features, codes=unit, top=[np.array([i for i, _ in t], dtype=np.int64) for t in top],
                               label_index=label_index if has_labels else None, labels=labels, vocab=inputs.vocab,
                               options=options, evaluation=inputs.evaluation, activity=act, related=inputs.related)
    panel_fields = [panel.compute(panel_inputs) for panel in PANELS]
    norms = np.linalg.norm(features.astype(np.float64), axis=0)

    def label_of(i):
        return labels[int(label_index[i])] if has_labels and label_index[i] >= 0 else None

    def examples(j, pairs):
        return [example_record(i, j, unit, token_ids, documents, inputs.decode, options.window, label_of(i), n)
                for i, n in pairs]

    records = []
    for j in tqdm(range(k), desc="features", disable=not progress, leave=False):
        samples = []
        for interval in quantile_samples(unit[:, j], act.threshold[j], [i for i, _ in top[j]], options.n_quantiles,
                                         options.per_quantile, seed=j):
            pairs = collapse_duplicates(interval["indices"], token_ids, documents, options.dedup_radius,
                                        limit=options.per_quantile)
            samples.append({"quantiles": interval["quantiles"], "range": interval["range"],
                            "examples": examples(j, pairs)})
        record = {
            "feature": j,
            "density": float(act.density[j]),
            "threshold": None if act.dead[j] else float(act.threshold[j]),
            "norm": float(norms[j]),
            "mean_code": float(act.mean[j]),
            "max_code": float(act.max[j]),
            "dead": bool(act.dead[j]),
            "dense": bool(act.density[j] > options.dense_density),
            "top_tokens": examples(j, top[j]),
            "samples": samples,
        }
        for fields in panel_fields:
            record.update(fields[j])
        records.append(record)
    return records


def read_features(path: str | os.PathLike) -> dict:
    """Read a ``features.json`` written by :func:`write_layer_report` (checks its format)."""
    return read_manifest(path, format=FEATURES_FORMAT, version=FEATURES_VERSION, what=f"{FEATURES_FORMAT} file")
