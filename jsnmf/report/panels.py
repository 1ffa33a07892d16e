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

__all__ = ["ReportOptions", "PanelInputs", "Panel", "PANELS", "esc", "visible"]


@dataclass(frozen=True)
class ReportOptions:
    """What a report shows: ``k_top`` top tokens per feature with ``window`` tokens of context on each
    side, ``n_neurons`` strongest neurons, and (``vocab``) ``n_vocab`` vocabulary-projection tokens."""

    k_top: int = 25
    window: int = 15
    n_neurons: int = 10
    n_vocab: int = 10
    vocab: bool = True


@dataclass(frozen=True)
class PanelInputs:
    """What a panel computes from: the factors, each feature's top tokens, the corpus labels (None when
    the corpus has none), the vocabulary projections (None without a model), the options."""

    features: np.ndarray
    codes: np.ndarray
    top: list
    label_index: np.ndarray | None
    labels: list
    vocab: list | None
    options: ReportOptions


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


def _neurons_html(feature: dict) -> str:
    if not feature["top_neurons"]:
        return "<p class=muted>All weights are zero.</p>"
    rows = "".join(
        f"<tr><td class=num>{n['neuron']}</td><td class=\"num {'pos' if n['weight'] > 0 else 'neg'}\">"
        f"{n['weight']:+.3f}</td></tr>" for n in feature["top_neurons"])
    return f"<table><tr><th>neuron</th><th class=num>weight</th></tr>{rows}</table>"


def _vocab_html(feature: dict) -> str:
    def tokens(entries):
        return " ".join(f"<code class=tok title=\"{v['logit']:.3f}\">{visible(v['token'])}</code>" for v in entries)
    return (f"<div><b class=pos>top</b> {tokens(feature['vocab_top'])}</div>"
            f"<div><b class=neg>bottom</b> {tokens(feature['vocab_bottom'])}</div>")


def _labels_html(feature: dict) -> str:
    if not feature["label_shares"]:
        return "<p class=muted>No top tokens.</p>"
    rows = "".join(
        f"<tr><td>{esc(label)}</td><td><span class=bar style=\"width:{share * 120:.0f}px\"></span>{share:.0%}</td></tr>"
        for label, share in feature["label_shares"].items())
    return f"<table>{rows}</table>"


PANELS: list[Panel] = [
    Panel("Strongest neurons", _neurons, _neurons_html, lambda data: True),
    Panel("Vocabulary projection", _vocab, _vocab_html,
          lambda data: any(f["vocab_top"] for f in data["features"])),
    Panel("Labels of the top tokens", _label_shares, _labels_html, lambda data: bool(data["labels"])),
]
