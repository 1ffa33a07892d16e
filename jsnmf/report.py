"""Static HTML reports of fitted SNMF features: one page per layer, an index, JSON and PNGs.

Layout written by :func:`write_report` into ``<run>/report/``::

    index.html                  links to the layers, with a summary row per layer
    layer_{L:02d}/report.html   self-contained page (inline CSS, PNGs embedded as data URIs, no JS)
    layer_{L:02d}/features.json the same content as data (schema below)
    layer_{L:02d}/loss.png      loss per iteration
    layer_{L:02d}/codes.png     distribution of the non-zero codes, and of feature densities

Per feature the page shows its top-activating tokens in context (±``window`` tokens of the same
document, the token highlighted, its code value), its strongest neurons (largest |F| entries, signed),
its vocabulary projection (top and bottom tokens of ``model.project_to_vocab``) and, when the corpus
has labels, the share of its top tokens per label. All token text is HTML-escaped.

``features.json`` schema (``format`` = ``"jsnmf.report.features"``, ``format_version`` = 1)::

    {
      "format": "jsnmf.report.features", "format_version": 1,
      "layer": int, "hook_name": "blocks.{L}.mlp.hook_post",
      "rank": int, "n_tokens": int, "d_mlp": int,
      "fit": {"n_iter": int|null, "relative_error": float|null, "final_loss": float|null,
              "params": {...}|null},
      "l0": float,                       # mean number of active features per token
      "labels": [str, ...],              # the corpus labels ([] when none)
      "features": [
        {
          "feature": int,                # column of F / G
          "density": float,              # fraction of tokens with code > 0
          "mean_code": float, "max_code": float, "dead": bool,
          "top_tokens": [                # largest codes first, codes <= 0 left out
            {"token_index": int,         # row of the store / of G
             "token": str,               # the token's text
             "value": float,             # its code G[token_index, feature]
             "document": int, "position": int,
             "label": str|null,
             "context": {"left": str, "token": str, "right": str}}   # left+token+right = the window
          ],
          "top_neurons": [{"neuron": int, "weight": float}],          # largest |F[:, feature]| first
          "vocab_top": [{"token": str, "logit": float}],              # [] when no model was given
          "vocab_bottom": [{"token": str, "logit": float}],
          "label_shares": {label: float}                               # {} when the corpus has no labels
        }
      ]
    }
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from jsnmf import analysis
from jsnmf.io.files import atomic_write_bytes, atomic_write_text
from jsnmf.io.manifest import read_manifest
from jsnmf.layout import RunLayout, hook_name, layer_dir_name

__all__ = ["FEATURES_FORMAT", "LayerReport", "build_features", "write_layer_report", "write_index",
           "write_report", "read_features", "layer_dir_name"]

log = logging.getLogger(__name__)

FEATURES_FORMAT = "jsnmf.report.features"
FEATURES_VERSION = 1




# ---------------------------------------------------------------- content


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


def build_features(
    features: np.ndarray,
    codes: np.ndarray,
    *,
    token_ids: np.ndarray,
    doc_index: np.ndarray,
    positions: np.ndarray,
    decode: Callable[[list[int]], str],
    label_index: np.ndarray | None = None,
    labels: Sequence[str] = (),
    vocab: list[dict] | None = None,
    k_top: int = 25,
    window: int = 15,
    n_neurons: int = 10,
    progress: bool = False,
) -> list[dict]:
    """The per-feature records of ``features.json`` (see the module docstring) from plain arrays.

    ``features`` is F (d_mlp × k), ``codes`` is G (n_tokens × k); ``token_ids``, ``doc_index``,
    ``positions`` (and ``label_index``) describe the n_tokens rows, as an ``ActivationStore`` does.
    ``vocab``: per feature ``{"top": [(token, logit)], "bottom": [...]}`` (``analysis.vocab_projection``).
    """
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
    top = analysis.top_activations(codes, k_top)
    neurons = analysis.top_neurons(features, n_neurons)
    shares = analysis.label_shares(top, label_index, labels) if has_labels else [{} for _ in range(k)]
    records = []
    for j in tqdm(range(k), desc="features", disable=not progress, leave=False):
        contexts = analysis.token_contexts(top[j], token_ids, documents, decode, window)
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
        records.append({
            "feature": j,
            "density": float(stats["density"][j]),
            "mean_code": float(stats["mean"][j]),
            "max_code": float(stats["max"][j]),
            "dead": bool(stats["dead"][j]),
            "top_tokens": top_tokens,
            "top_neurons": [{"neuron": n, "weight": w} for n, w in neurons[j]],
            "vocab_top": [{"token": t, "logit": v} for t, v in (vocab[j]["top"] if vocab else [])],
            "vocab_bottom": [{"token": t, "logit": v} for t, v in (vocab[j]["bottom"] if vocab else [])],
            "label_shares": shares[j],
        })
    return records


# ---------------------------------------------------------------- files


def _figure_png(draw) -> bytes:
    """Render ``draw(figure)`` to PNG bytes with the Agg canvas (no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    draw(figure)
    # Fixed margins: constrained/tight layout cost seconds per figure on a small CPU.
    figure.subplots_adjust(left=0.15, right=0.97, bottom=0.16, top=0.9, wspace=0.4)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def loss_png(loss_history: np.ndarray | None) -> bytes:
    """PNG of the loss ‖X − G Fᵀ‖² per iteration (log scale)."""
    def draw(figure):
        ax = figure.add_subplot()
        history = np.asarray(loss_history if loss_history is not None else [], dtype=np.float64)
        if history.size:
            ax.plot(np.arange(1, history.size + 1), history, color="#1f5fa8", lw=1.5)
            if np.all(history > 0) and history.max() > 10 * history.min():
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        else:
            ax.text(0.5, 0.5, "no loss history recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("iteration")
        ax.set_ylabel("‖X − G Fᵀ‖²")
        ax.set_title("SNMF loss")
        ax.grid(alpha=0.3)
    return _figure_png(draw)


def codes_png(codes: np.ndarray) -> bytes:
    """PNG with the histogram of the non-zero codes and the histogram of feature densities."""
    codes = np.asarray(codes)
    nonzero = codes[codes > 0]
    density = (codes > 0).mean(axis=0) if codes.shape[0] else np.zeros(codes.shape[1])

    def draw(figure):
        left, right = figure.subplots(1, 2)
        if nonzero.size:
            left.hist(nonzero, bins=60, color="#1f5fa8")
            left.set_yscale("log")
        left.set_xlabel("code value (> 0)")
        left.set_ylabel("tokens")
        left.set_title(f"non-zero codes ({nonzero.size:,} of {codes.size:,})")
        live = density[density > 0]
        if live.size:
            bins = np.logspace(np.log10(live.min()), np.log10(max(live.max(), live.min() * 1.01)), 30)
            right.hist(live, bins=bins, color="#c0602a")
            right.set_xscale("log")
        right.set_xlabel("feature density (fraction of tokens)")
        right.set_ylabel("features")
        right.set_title(f"densities ({int((density == 0).sum())} dead)")
    return _figure_png(draw)


def read_features(path: str | os.PathLike) -> dict:
    """Read a ``features.json`` written by :func:`write_layer_report` (checks its format)."""
    return read_manifest(path, format=FEATURES_FORMAT, version=FEATURES_VERSION, what=f"{FEATURES_FORMAT} file")


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#1d1d1f;background:#fafafa}
h1{font-size:1.5em}h2{font-size:1.15em;margin:0 0 .4em}h3{font-size:.95em;margin:.8em 0 .3em;color:#444}
a{color:#1f5fa8}
table{border-collapse:collapse}td,th{padding:2px 6px;vertical-align:top;text-align:left}
table.summary td,table.summary th{border-bottom:1px solid #ddd;font-size:.9em}
.num{text-align:right;font-variant-numeric:tabular-nums}
section.feature{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:1em 0}
section.dead{opacity:.6}
.stats{font-weight:normal;color:#666;font-size:.85em;margin-left:.6em}
.cols{display:flex;gap:1.5em;flex-wrap:wrap}.contexts{flex:3 1 560px;min-width:0}.side{flex:1 1 260px}
table.ctx td{border-bottom:1px solid #f0f0f0;font-size:.85em}
td.text{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
mark{background:#ffd54a;padding:0 1px;border-radius:2px}
code.tok{background:#eef2f7;border-radius:3px;padding:0 3px;margin:1px;display:inline-block;white-space:pre;
font-size:.85em}
.bar{display:inline-block;height:.7em;background:#1f5fa8;vertical-align:middle;margin-right:4px}
.neg{color:#b3261e}.pos{color:#1b6e2a}.muted{color:#888;font-size:.85em}
img{max-width:100%}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _visible(token: str) -> str:
    """Token text made visible: newlines and tabs as symbols, escaped."""
    return _esc(token.replace("\n", "↵").replace("\t", "⇥"))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _distinct_tokens(feature: dict, n: int = 6) -> list[str]:
    seen: list[str] = []
    for t in feature["top_tokens"]:
        if t["token"] not in seen:
            seen.append(t["token"])
        if len(seen) == n:
            break
    return seen


def _summary_table(records: list[dict], has_labels: bool, has_vocab: bool) -> str:
    head = "<tr><th>feature</th><th class=num>density</th><th class=num>max code</th><th>top tokens</th>"
    head += "<th>top label</th>" if has_labels else ""
    head += "<th>vocab top</th>" if has_vocab else ""
    rows = [head + "</tr>"]
    for f in records:
        tokens = " ".join(f"<code class=tok>{_visible(t)}</code>" for t in _distinct_tokens(f))
        row = (f"<tr><td><a href=\"#feature-{f['feature']}\">Feature {f['feature']}</a></td>"
               f"<td class=num>{f['density']:.2%}</td><td class=num>{f['max_code']:.3g}</td>"
               f"<td>{tokens if not f['dead'] else '<span class=muted>dead</span>'}</td>")
        if has_labels:
            label, share = next(iter(f["label_shares"].items()), ("", 0.0))
            row += f"<td>{_esc(label)} {share:.0%}</td>" if label else "<td></td>"
        if has_vocab:
            row += "<td>" + " ".join(f"<code class=tok>{_visible(v['token'])}</code>" for v in f["vocab_top"][:4]) + "</td>"
        rows.append(row + "</tr>")
    return "<table class=summary>" + "\n".join(rows) + "</table>"


def _contexts_html(feature: dict, has_labels: bool) -> str:
    if not feature["top_tokens"]:
        return "<p class=muted>No token has a positive code for this feature (dead).</p>"
    rows = []
    for t in feature["top_tokens"]:
        c = t["context"]
        text = f"{_visible(c['left'])}<mark>{_visible(c['token'])}</mark>{_visible(c['right'])}"
        row = f"<tr><td class=num>{t['value']:.3f}</td><td class=text>{text}</td>"
        if has_labels:
            row += f"<td class=muted>{_esc(t['label'] or analysis.UNLABELLED)}</td>"
        rows.append(row + "</tr>")
    return "<table class=ctx>" + "\n".join(rows) + "</table>"


def _neurons_html(feature: dict) -> str:
    if not feature["top_neurons"]:
        return "<p class=muted>All weights are zero.</p>"
    rows = "".join(
        f"<tr><td class=num>{n['neuron']}</td><td class=\"num {'pos' if n['weight'] > 0 else 'neg'}\">"
        f"{n['weight']:+.3f}</td></tr>" for n in feature["top_neurons"])
    return f"<table><tr><th>neuron</th><th class=num>weight</th></tr>{rows}</table>"


def _vocab_html(feature: dict) -> str:
    def tokens(entries):
        return " ".join(f"<code class=tok title=\"{v['logit']:.3f}\">{_visible(v['token'])}</code>" for v in entries)
    return (f"<div><b class=pos>top</b> {tokens(feature['vocab_top'])}</div>"
            f"<div><b class=neg>bottom</b> {tokens(feature['vocab_bottom'])}</div>")


def _labels_html(feature: dict) -> str:
    if not feature["label_shares"]:
        return "<p class=muted>No top tokens.</p>"
    rows = "".join(
        f"<tr><td>{_esc(label)}</td><td><span class=bar style=\"width:{share * 120:.0f}px\"></span>{share:.0%}</td></tr>"
        for label, share in feature["label_shares"].items())
    return f"<table>{rows}</table>"


def _feature_html(feature: dict, has_labels: bool, has_vocab: bool) -> str:
    j = feature["feature"]
    stats = (f"density {feature['density']:.2%} · max {feature['max_code']:.3g} · "
             f"mean {feature['mean_code']:.3g}" + (" · dead" if feature["dead"] else ""))
    side = f"<h3>Strongest neurons</h3>{_neurons_html(feature)}"
    if has_vocab:
        side += f"<h3>Vocabulary projection</h3>{_vocab_html(feature)}"
    if has_labels:
        side += f"<h3>Labels of the top tokens</h3>{_labels_html(feature)}"
    css_class = "feature dead" if feature["dead"] else "feature"
    return (f"<section class=\"{css_class}\" id=\"feature-{j}\"><h2>Feature {j}<span class=stats>{stats}</span></h2>"
            f"<div class=cols><div class=contexts><h3>Top activations ({len(feature['top_tokens'])})</h3>"
            f"{_contexts_html(feature, has_labels)}</div><div class=side>{side}</div></div></section>")


def render_layer_html(data: dict, loss_image: str, codes_image: str, title_extra: str = "") -> str:
    """The layer page for ``features.json`` content ``data``; images are URIs (data: or file names)."""
    records = data["features"]
    has_labels = bool(data["labels"])
    has_vocab = any(f["vocab_top"] for f in records)
    fit = data["fit"]
    facts = [f"rank {data['rank']}", f"{data['n_tokens']:,} tokens", f"d_mlp {data['d_mlp']}",
             f"L0 {data['l0']:.2f}", f"{sum(f['dead'] for f in records)} dead features"]
    if fit.get("relative_error") is not None:
        facts.append(f"relative error {fit['relative_error']:.4f}")
    if fit.get("n_iter") is not None:
        facts.append(f"{fit['n_iter']} iterations")
    body = [
        "<p><a href=\"../index.html\">← all layers</a></p>",
        f"<h1>Layer {data['layer']} <span class=stats>{_esc(data['hook_name'])}</span>{_esc(title_extra)}</h1>",
        f"<p>{' · '.join(_esc(x) for x in facts)}</p>",
        f"<div class=cols><div><img src=\"{loss_image}\" alt=\"loss curve\"></div>"
        f"<div><img src=\"{codes_image}\" alt=\"code distribution\"></div></div>",
        "<h2>Features</h2>",
        _summary_table(records, has_labels, has_vocab),
        *(_feature_html(f, has_labels, has_vocab) for f in records),
        f"<p class=muted>Written by jsnmf on {_esc(data.get('created', ''))}. "
        "Data: <a href=\"features.json\">features.json</a>.</p>",
    ]
    return _page(f"jsnmf · layer {data['layer']}", "\n".join(body))


# ---------------------------------------------------------------- writers


def write_layer_report(
    out_dir: str | os.PathLike,
    *,
    layer: int,
    features: np.ndarray,
    codes: np.ndarray,
    token_ids: np.ndarray,
    doc_index: np.ndarray,
    positions: np.ndarray,
    decode: Callable[[list[int]], str],
    label_index: np.ndarray | None = None,
    labels: Sequence[str] = (),
    vocab: list[dict] | None = None,
    loss_history: np.ndarray | None = None,
    fit_info: dict | None = None,
    k_top: int = 25,
    window: int = 15,
    n_neurons: int = 10,
    progress: bool = False,
) -> LayerReport:
    """Write ``report.html``, ``features.json``, ``loss.png`` and ``codes.png`` into ``out_dir``.

    Arguments as :func:`build_features`; ``fit_info`` may hold ``n_iter``, ``relative_error``,
    ``params`` of the fit. Each file is written atomically.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    codes = np.asarray(codes)
    records = build_features(
        features, codes, token_ids=token_ids, doc_index=doc_index, positions=positions, decode=decode,
        label_index=label_index, labels=labels, vocab=vocab, k_top=k_top, window=window,
        n_neurons=n_neurons, progress=progress)
    stats = analysis.code_statistics(codes)
    fit_info = dict(fit_info or {})
    history = None if loss_history is None else np.asarray(loss_history, dtype=np.float64)
    data = {
        "format": FEATURES_FORMAT,
        "format_version": FEATURES_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layer": int(layer),
        "hook_name": hook_name(layer),
        "rank": int(codes.shape[1]),
        "n_tokens": int(codes.shape[0]),
        "d_mlp": int(np.shape(features)[0]),
        "fit": {
            "n_iter": fit_info.get("n_iter"),
            "relative_error": fit_info.get("relative_error"),
            "final_loss": float(history[-1]) if history is not None and history.size else None,
            "params": fit_info.get("params"),
        },
        "l0": float(stats["l0"]),
        "labels": list(labels),
        "features": records,
    }
    loss, code_hist = loss_png(history), codes_png(codes)
    atomic_write_bytes(out_dir / "loss.png", loss)
    atomic_write_bytes(out_dir / "codes.png", code_hist)
    atomic_write_text(out_dir / "features.json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    atomic_write_text(out_dir / "report.html", render_layer_html(data, _data_uri(loss), _data_uri(code_hist)))
    return LayerReport(
        layer=int(layer), html=out_dir / "report.html", features_json=out_dir / "features.json",
        rank=data["rank"], n_tokens=data["n_tokens"], n_dead=int(stats["dead"].sum()), l0=data["l0"],
        relative_error=fit_info.get("relative_error"), n_iter=fit_info.get("n_iter"),
    )


def write_index(report_dir: str | os.PathLike, layers: Sequence[LayerReport], run_info: dict | None = None) -> Path:
    """Write ``report_dir/index.html`` linking every layer's page; ``run_info``: name -> value facts."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    facts = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in (run_info or {}).items())
    rows = ["<tr><th>layer</th><th class=num>rank</th><th class=num>tokens</th><th class=num>relative error</th>"
            "<th class=num>iterations</th><th class=num>L0</th><th class=num>dead</th></tr>"]
    for r in sorted(layers, key=lambda r: r.layer):
        link = os.path.relpath(r.html, report_dir)
        rel = "" if r.relative_error is None else f"{r.relative_error:.4f}"
        rows.append(
            f"<tr><td><a href=\"{_esc(link)}\">Layer {r.layer}</a></td><td class=num>{r.rank}</td>"
            f"<td class=num>{r.n_tokens:,}</td><td class=num>{rel}</td><td class=num>{r.n_iter if r.n_iter is not None else ''}</td>"
            f"<td class=num>{r.l0:.2f}</td><td class=num>{r.n_dead}</td></tr>")
    body = ("<h1>jsnmf report</h1>" + (f"<table class=summary>{facts}</table>" if facts else "")
            + "<h2>Layers</h2><table class=summary>" + "\n".join(rows) + "</table>")
    path = report_dir / "index.html"
    atomic_write_text(path, _page("jsnmf report", body))
    return path


def _load_decoder(store):
    """``tokenizer.decode`` for the store's tokenizer (recorded at extraction time)."""
    from jsnmf.models import load_tokenizer

    path = store.tokenizer_path
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(
            f"{store.path}: the tokenizer recorded in the store ({path}) is not available; cannot decode tokens")
    tokenizer = load_tokenizer(path)
    return lambda ids: tokenizer.decode(ids)


def _store_model_path(store) -> str | None:
    model = store.manifest.get("model")
    if isinstance(model, dict):
        return model.get("path") or model.get("path_or_id")
    return model


def _vocab_projections(model, layer: int, features: np.ndarray, decode, n: int) -> list[dict]:
    """Vocabulary projection of every feature; all-zero columns (dead features) get empty lists."""
    features = np.asarray(features, dtype=np.float32)
    live = np.flatnonzero(np.linalg.norm(features, axis=0) > 0)
    result = [{"top": [], "bottom": []} for _ in range(features.shape[1])]
    if live.size:
        for j, projection in zip(live, analysis.project_features_to_vocab(model, layer, features[:, live], decode, n)):
            result[j] = projection
    return result


def write_report(
    run_dir: str | os.PathLike,
    *,
    store_dir: str | os.PathLike | None = None,
    snmf_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    layers: Sequence[int] | None = None,
    vocab: bool = True,
    model=None,
    k_top: int = 25,
    window: int = 15,
    n_neurons: int = 10,
    n_vocab: int = 10,
    progress: bool = True,
) -> Path:
    """Write the report of a run and return the path of its ``index.html``.

    A run directory holds ``store/`` (the ActivationStore) and ``snmf/layer_{L:02d}/`` (``SNMF.save``
    checkpoints); ``store_dir``, ``snmf_dir`` and ``out_dir`` (default ``<run>/report``) override
    those places. ``layers`` defaults to every layer with a checkpoint. ``vocab``: compute the
    vocabulary projections, with ``model`` or else the model recorded in the store (skipped with a
    warning when that model cannot be loaded).
    """
    from jsnmf.estimator import SNMF
    from jsnmf.store import ActivationStore

    run_dir = Path(run_dir).expanduser().resolve()
    run = RunLayout.of(run_dir)
    store = ActivationStore.open(Path(store_dir) if store_dir else run.store)
    snmf_dir = Path(snmf_dir) if snmf_dir else run.snmf
    out_dir = Path(out_dir) if out_dir else run.report
    if layers is None:
        layers = [layer for layer in store.layers if run.fitted(layer, snmf_dir).is_dir()]
        if not layers:
            raise FileNotFoundError(f"no fitted layers: {snmf_dir} has no layer_XX checkpoints (run `jsnmf fit` first)")
    for layer in layers:
        if layer not in store.layers:
            raise ValueError(f"layer {layer} is not in the store {store.path} (layers {store.layers})")
        if not run.fitted(layer, snmf_dir).is_dir():
            raise FileNotFoundError(f"no checkpoint for layer {layer}: {run.fitted(layer, snmf_dir)} is missing")
    decode = _load_decoder(store)
    if vocab and model is None:
        model = _try_load_model(_store_model_path(store))
    reports = []
    for layer in tqdm(layers, desc="report", disable=not progress):
        fitted = SNMF.load(run.fitted(layer, snmf_dir))
        if fitted.codes_.shape[0] != store.n_tokens:
            raise ValueError(
                f"{run.fitted(layer, snmf_dir)}: the codes have {fitted.codes_.shape[0]} rows but the store "
                f"has {store.n_tokens} tokens; was it fitted on this store?")
        projections = _vocab_projections(model, layer, fitted.features_, decode, n_vocab) if (vocab and model) else None
        reports.append(write_layer_report(
            run.report_layer(layer, out_dir), layer=layer, features=fitted.features_, codes=fitted.codes_,
            token_ids=store.token_ids, doc_index=store.doc_index, positions=store.positions, decode=decode,
            label_index=store.label_index, labels=store.labels, vocab=projections,
            loss_history=getattr(fitted, "loss_history_", None),
            fit_info={"n_iter": getattr(fitted, "n_iter_", None),
                      "relative_error": getattr(fitted, "relative_error_", None),
                      "params": _json_params(fitted)},
            k_top=k_top, window=window, n_neurons=n_neurons))
    run_info = {
        "model": _store_model_path(store) or "",
        "corpus": (store.manifest.get("corpus") or {}).get("path", ""),
        "store": str(store.path),
        "tokens": f"{store.n_tokens:,}",
        "documents": len(store.documents),
        "checkpoints": str(snmf_dir),
    }
    return write_index(out_dir, reports, run_info)


def _json_params(fitted) -> dict | None:
    try:
        params = fitted.get_params()
    except AttributeError:
        return None
    return {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool, type(None)))}


def _try_load_model(path: str | None):
    """The model for vocabulary projections, or None (with a warning) when it cannot be loaded."""
    if not path:
        log.warning("the store records no model; the report leaves out vocabulary projections")
        return None
    from jsnmf import models

    try:
        model, _ = models.load(path, tokenizer=False)
        return model
    except (OSError, ValueError) as err:
        log.warning("cannot load the model %s (%s); the report leaves out vocabulary projections", path, err)
        return None
