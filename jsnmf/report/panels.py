"""Report panels: the boxes beside each feature's top tokens, each a (compute, render) pair.

A panel's ``compute`` adds fields to every feature's ``features.json`` record; its ``render`` turns a
record into HTML. Adding a panel is one entry of :data:`PANELS` (and its fields in the schema of
:mod:`jsnmf.report`); nothing else changes.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Callable

import numpy as np

from jsnmf import analysis
from jsnmf.layout import layer_dir_name
from jsnmf.report.activity import Activity, active_histogram
from jsnmf.report.svg import histogram_svg, signed_bars

__all__ = ["ReportOptions", "PanelInputs", "Panel", "PANELS", "esc", "visible"]


@dataclass(frozen=True)
class ReportOptions:
    """What a report shows: ``k_top`` top tokens per feature with ``window`` tokens of context on each
    side, ``n_neurons`` strongest neurons, and (``vocab``) ``n_vocab`` vocabulary-projection tokens.

    Activity (:mod:`jsnmf.report.activity`): active at ≥ ``active_fraction`` × the feature's largest
    code, dead below ``dead_fraction`` × the median feature's largest code; a feature is flagged dense
    above ``dense_density``. Examples: ``n_quantiles`` intervals of the active codes, ``per_quantile``
    sampled from each; near-duplicates (same tokens within ±``dedup_radius``) collapsed. ``hist_bins``
    bars per activation histogram; ``n_related`` closest features listed per other layer.
    """

    k_top: int = 25
    window: int = 15
    n_neurons: int = 10
    n_vocab: int = 10
    vocab: bool = True
    active_fraction: float = 0.1
    dead_fraction: float = 0.01
    dense_density: float = 0.1
    n_quantiles: int = 4
    per_quantile: int = 3
    dedup_radius: int = 3
    hist_bins: int = 30
    n_related: int = 3


@dataclass(frozen=True)
class PanelInputs:
    """What a panel computes from: the features F, the codes in unit-norm units (``G·‖F_j‖``), each
    feature's top tokens, the corpus labels (None when the corpus has none), the vocabulary projections
    (None without a model), the options, the layer's evaluation (``jsnmf evaluate``; None when the run
    has none), the codes' :class:`~jsnmf.report.activity.Activity`, and each feature's closest features
    in other layers (None with one layer)."""

    features: np.ndarray
    codes: np.ndarray
    top: list
    label_index: np.ndarray | None
    labels: list
    vocab: list | None
    options: ReportOptions
    evaluation: dict | None = None  # the layer's entry of evaluation.json (jsnmf evaluate), if any
    activity: Activity | None = None
    related: list | None = None


@dataclass(frozen=True)
class Panel:
    """A box beside each feature's top tokens.

    ``compute(inputs)`` returns, per feature, the fields it adds to that feature's ``features.json``
    record; ``render(record)`` is its HTML; ``shown(layer data)`` says whether the page shows it. A
    new panel is one entry of :data:`PANELS` (and its fields in the schema above).
    """

    title: str
    compute: Callable[[PanelInputs], list[dict]]
    render: Callable[[dict], str]
    shown: Callable[[dict], bool]


def _neurons(inputs: PanelInputs) -> list[dict]:
    return [{"top_neurons": [{"neuron": n, "weight": w} for n, w in neurons]}
            for neurons in analysis.top_neurons(inputs.features, inputs.options.n_neurons)]


def _vocab(inputs: PanelInputs) -> list[dict]:
    vocab = inputs.vocab or [{"top": [], "bottom": []}] * inputs.codes.shape[1]
    return [{"vocab_top": [{"token": t, "logit": v} for t, v in entry["top"]],
             "vocab_bottom": [{"token": t, "logit": v} for t, v in entry["bottom"]]} for entry in vocab]


def _label_shares(inputs: PanelInputs) -> list[dict]:
    if inputs.label_index is None:
        return [{"label_shares": {}} for _ in range(inputs.codes.shape[1])]
    return [{"label_shares": shares} for shares in analysis.label_shares(inputs.top, inputs.label_index, inputs.labels)]


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def visible(token: str) -> str:
    """Token text made visible: newlines and tabs as symbols, escaped."""
    return esc(token.replace("\n", "↵").replace("\t", "⇥"))


def _two_column_table(entries: list, empty: str, header: tuple[str, str], cells) -> str:
    """A small table of ``entries`` (``cells(entry)`` gives its two ``<td>``s), or the ``empty`` note."""
    if not entries:
        return f"<p class=muted>{empty}</p>"
    rows = "".join(f"<tr>{cells(entry)}</tr>" for entry in entries)
    return f"<table><tr><th>{header[0]}</th><th class=num>{header[1]}</th></tr>{rows}</table>"


def _neurons_html(feature: dict) -> str:
    return _two_column_table(
        feature["top_neurons"], "All weights are zero.", ("neuron", "weight"),
        lambda n: f"<td class=num>{n['neuron']}</td><td class=\"num {'pos' if n['weight'] > 0 else 'neg'}\">"
                  f"{n['weight']:+.3f}</td>")


VOCAB_ZERO = 1e-6  # |logit| at or below this (relative to the feature's largest) counts as zero


def _vocab_sides(feature: dict) -> tuple[list, list]:
    """The top entries with a positive logit and the bottom ones with a negative logit (a side whose
    logits are all about zero is empty)."""
    values = [abs(v["logit"]) for v in feature["vocab_top"] + feature["vocab_bottom"]]
    floor = VOCAB_ZERO * max(values, default=0.0)
    return ([v for v in feature["vocab_top"] if v["logit"] > floor],
            [v for v in feature["vocab_bottom"] if v["logit"] < -floor])


def _vocab_html(feature: dict) -> str:
    top, bottom = _vocab_sides(feature)
    if not top and not bottom:
        return "<p class=muted>All logits are about zero.</p>"
    scale = max(abs(v["logit"]) for v in top + bottom)
    parts = []
    for name, side in (("promoted", top), ("suppressed", bottom)):
        if side:
            parts.append(f"<div class=muted>{name}</div>" + signed_bars(
                [(v["token"], v["logit"]) for v in side], scale,
                label_html=lambda t: f"<code class=tok>{visible(t)}</code>"))
    return "".join(parts)


def _histogram(inputs: PanelInputs) -> list[dict]:
    act = inputs.activity
    return [{"histogram": active_histogram(inputs.codes[:, j], act.threshold[j], inputs.options.hist_bins)}
            for j in range(inputs.codes.shape[1])]


def _histogram_html(feature: dict) -> str:
    h = feature["histogram"]
    return histogram_svg(h["edges"], h["counts"])


def _related(inputs: PanelInputs) -> list[dict]:
    related = inputs.related or [[] for _ in range(inputs.codes.shape[1])]
    return [{"related": list(entries)} for entries in related]


def _related_html(feature: dict) -> str:
    return _two_column_table(
        feature["related"], "No other layer has a similar feature.", ("feature", "cosine"),
        lambda r: f"<td><a href=\"../{layer_dir_name(r['layer'])}/report.html#feature-{r['feature']}\">layer "
                  f"{r['layer']} · feature {r['feature']}</a></td><td class=num>{r['cosine']:.2f}</td>")


def _labels_html(feature: dict) -> str:
    if not feature["label_shares"]:
        return "<p class=muted>No top tokens.</p>"
    rows = "".join(
        f"<tr><td>{esc(label)}</td><td><span class=bar style=\"width:{share * 120:.0f}px\"></span>{share:.0%}</td></tr>"
        for label, share in feature["label_shares"].items())
    return f"<table>{rows}</table>"


def _matched_here(inputs: PanelInputs, part: str) -> list[list[tuple[str, dict]]]:
    """Per feature, the (concept, entry) pairs of the SNMF ``part`` ("steering"/"detection") of the
    evaluation whose matched feature it is."""
    per_feature = [[] for _ in range(inputs.codes.shape[1])]
    if inputs.evaluation is None:
        return per_feature
    entries = inputs.evaluation[part].get("SNMF", {})
    for concept, entry in (entries.get("per_concept", entries) if part == "detection" else entries).items():
        if entry.get("feature") is not None:
            per_feature[entry["feature"]].append((concept, entry))
    return per_feature


def _steering(inputs: PanelInputs) -> list[dict]:
    fields = []
    for pairs in _matched_here(inputs, "steering"):
        fields.append({"steering": [
            {"concept": concept, "site": cell["site"],
             "targets": [{**{k: t.get(k) for k in ("target", "reached", "alpha", "kl", "score", "concept",
                                                   "fluency", "model_fluency")},
                          "sample": (t.get("samples") or [None])[0]} for t in cell["targets"]]}
            for concept, cell in pairs]})
    return fields


def _detection(inputs: PanelInputs) -> list[dict]:
    others = {} if inputs.evaluation is None else inputs.evaluation["detection"]
    fields = []
    for pairs in _matched_here(inputs, "detection"):
        rows = []
        for concept, entry in pairs:
            row = {"concept": concept, "auroc": entry["auroc"], "gap": entry["gap"]}
            for method, det in others.items():
                if method != "SNMF":
                    row[f"{method} auroc"] = det["per_concept"].get(concept, {}).get("auroc")
            rows.append(row)
        fields.append({"detection": rows})
    return fields


def _num(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _steering_html(feature: dict) -> str:
    parts = []
    for cell in feature["steering"]:
        rows = "".join(
            f"<tr><td class=num>{t['target']:g}</td><td class=num>{_num(t['alpha'], '.3g')}</td>"
            f"<td class=num>{_num(t['kl'], '.3g')}</td><td class=num>{_num(t['score'], '.2f') if t['reached'] else 'not reached'}</td>"
            f"<td class=text>{visible(t['sample'] or '')}</td></tr>" for t in cell["targets"])
        parts.append(f"<div>steered towards <b>{esc(cell['concept'])}</b> at {esc(cell['site'])}</div>"
                     "<table><tr><th class=num>KL target</th><th class=num>α</th><th class=num>KL</th>"
                     f"<th class=num>score</th><th>sample</th></tr>{rows}</table>")
    return "".join(parts) or "<p class=muted>No concept is matched to this feature.</p>"


def _detection_html(feature: dict) -> str:
    if not feature["detection"]:
        return "<p class=muted>No concept is matched to this feature.</p>"
    others = [k for k in feature["detection"][0] if k.endswith(" auroc")]
    head = "<tr><th>concept</th><th class=num>AUROC</th><th class=num>gap</th>" + "".join(
        f"<th class=num>{esc(k[:-6])}</th>" for k in others) + "</tr>"
    rows = "".join(f"<tr><td>{esc(r['concept'])}</td><td class=num>{r['auroc']:.3f}</td><td class=num>{r['gap']:.3f}</td>"
                   + "".join(f"<td class=num>{_num(r[k])}</td>" for k in others) + "</tr>"
                   for r in feature["detection"])
    return f"<table>{head}{rows}</table>"


PANELS: list[Panel] = [
    Panel("Activation histogram (active tokens)", _histogram, _histogram_html, lambda data: True),
    Panel("Strongest neurons", _neurons, _neurons_html, lambda data: True),
    Panel("Vocabulary projection", _vocab, _vocab_html,
          lambda data: any(f["vocab_top"] for f in data["features"])),
    Panel("Labels of the top tokens", _label_shares, _labels_html, lambda data: bool(data["labels"])),
    Panel("Concept detection (max-token cosine)", _detection, _detection_html, lambda data: "evaluation" in data),
    Panel("Steering at matched KL", _steering, _steering_html, lambda data: "evaluation" in data),
    Panel("Closest features in other layers (cosine of active codes)", _related, _related_html,
          lambda data: any(f["related"] for f in data["features"])),
]
