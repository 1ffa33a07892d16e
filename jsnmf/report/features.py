"""The content of a layer's report as data: the per-feature records of ``features.json``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from jsnmf import analysis
from jsnmf.io.manifest import read_manifest
from jsnmf.report.panels import PANELS, PanelInputs, ReportOptions

__all__ = ["FEATURES_FORMAT", "FEATURES_VERSION", "LayerInputs", "LayerReport", "build_features", "read_features"]

FEATURES_FORMAT = "jsnmf.report.features"
FEATURES_VERSION = 1


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


@dataclass(frozen=True)
class LayerInputs:
    """Everything a layer's report is computed from, in one object.

    ``features`` is F (d_mlp × k), ``codes`` is G (n_tokens × k); ``token_ids``, ``doc_index``,
    ``positions`` (and ``label_index``) describe the n_tokens rows, as an ``ActivationStore`` does;
    ``decode`` turns token ids into text; ``labels`` are the corpus labels. Optional: ``vocab`` per
    feature ``{"top": [(token, logit)], "bottom": [...]}`` (``analysis.vocab_projection``);
    ``loss_history`` and ``fit_info`` (``n_iter``, ``relative_error``, ``params``) of the fit;
    ``evaluation``: this layer's entry of ``jsnmf evaluate``'s ``evaluation.json`` (with its ``judge``
    and ``concepts``), shown by the steering and detection panels.
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


def build_features(inputs: LayerInputs, options: ReportOptions = None, progress: bool = False) -> list[dict]:
    """The per-feature records of ``features.json`` (see :mod:`jsnmf.report`) from a layer's inputs.

    Each panel of :data:`PANELS` adds its fields to every record.
    """
    features, codes, token_ids, doc_index, positions, decode = (
        inputs.features, inputs.codes, inputs.token_ids, inputs.doc_index, inputs.positions, inputs.decode)
    label_index, labels, vocab = inputs.label_index, inputs.labels, inputs.vocab
    options = options or ReportOptions()
    features, codes = np.asarray(features), np.asarray(codes)
    n_tokens, k = codes.shape
    if features.ndim != 2 or features.shape[1] != k:
        raise ValueError(f"features F {features.shape} and codes G {codes.shape} disagree on the rank")
    for name, array in (("token_ids", token_ids), ("doc_index", doc_index), ("positions", positions)):
        if len(array) != n_tokens:
            raise ValueError(f"{name} has {len(array)} rows but the codes G have {n_tokens}")
    if vocab is not None and len(vocab) != k:
        raise ValueError(f"vocab projection has {len(vocab)} rows, expected one per feature ({k})")
    has_labels = label_index is not None and len(labels) > 0
    token_ids = np.asarray(token_ids)
    documents = analysis.DocumentIndex(doc_index, positions)
    stats = analysis.code_statistics(codes)
    top = analysis.top_activations(codes, options.k_top)
    panel_inputs = PanelInputs(features=features, codes=codes, top=top,
                               label_index=label_index if has_labels else None, labels=list(labels), vocab=vocab,
                               options=options, evaluation=inputs.evaluation)
    panel_fields = [panel.compute(panel_inputs) for panel in PANELS]
    records = []
    for j in tqdm(range(k), desc="features", disable=not progress, leave=False):
        contexts = analysis.token_contexts(top[j], token_ids, documents, decode, options.window)
        top_tokens = []
        for i, context in zip(top[j], contexts):
            label = None
            if has_labels and label_index[i] >= 0:
                label = labels[int(label_index[i])]
            top_tokens.append({
                "token_index": int(i),
                "token": decode([int(token_ids[i])]),
                "value": float(codes[i, j]),
                "document": int(documents.doc_index[i]),
                "position": int(documents.positions[i]),
                "label": label,
                "context": context.to_dict(),
            })
        record = {
            "feature": j,
            "density": float(stats["density"][j]),
            "mean_code": float(stats["mean"][j]),
            "max_code": float(stats["max"][j]),
            "dead": bool(stats["dead"][j]),
            "top_tokens": top_tokens,
        }
        for fields in panel_fields:
            record.update(fields[j])
        records.append(record)
    return records


def read_features(path: str | os.PathLike) -> dict:
    """Read a ``features.json`` written by :func:`write_layer_report` (checks its format)."""
    return read_manifest(path, format=FEATURES_FORMAT, version=FEATURES_VERSION, what=f"{FEATURES_FORMAT} file")
