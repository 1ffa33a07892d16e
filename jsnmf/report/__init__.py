"""Static HTML reports of fitted SNMF features: one page per layer, an index, JSON and PNGs.

Layout written by :func:`write_report` into ``<run>/report/``::

    index.html                  the run's facts and jsnmf version, the layers, the fit parameters, the demo's
                                recovery, and every feature of every layer (search, sort, filter)
    layer_{L:02d}/report.html   self-contained page (inline CSS and script, PNGs as data URIs, nothing fetched)
    layer_{L:02d}/features.json the same content as data (schema below)
    layer_{L:02d}/loss.png      relative error per iteration
    layer_{L:02d}/codes.png     distribution of the active codes, and of feature densities

Codes are reported in unit-norm units, ``G[i, j]·‖F[:, j]‖`` (:mod:`jsnmf.report.activity`), and a
feature is *active* on a token when its code is at least ``ReportOptions.active_fraction`` of its largest
code; density, L0, dead features and the histograms follow that rule, which every page states.

Per feature the page shows its top-activating tokens and samples across the quantiles of its active
codes, each in context (±``window`` tokens of the same document, every token shaded by its code,
near-duplicate contexts collapsed with a count), its activation histogram, its strongest neurons
(largest |F| entries, signed), its vocabulary projection (signed bars; a side whose logits are all about
zero is left out), the share of its top tokens per label (when the corpus has labels) and its closest
features in other layers. The tables search, sort and filter with an inline script. Token text is
HTML-escaped.

``features.json`` schema (``format`` = ``"jsnmf.report.features"``, ``format_version`` = 2)::

    {
      "format": "jsnmf.report.features", "format_version": 2, "jsnmf_version": str,
      "layer": int, "hook_name": "blocks.{L}.mlp.hook_post",
      "rank": int, "n_tokens": int, "d_mlp": int,
      "fit": {"n_iter": int|null, "relative_error": float|null, "final_loss": float|null,
              "params": {...}|null},
      "units": str,                      # how codes are scaled: G[i, j]·‖F[:, j]‖
      "activity": {"rule": str, "active_fraction": float, "dead_fraction": float, "dense_density": float},
      "l0": float,                       # mean number of active features per token
      "n_dead": int,
      "labels": [str, ...],              # the corpus labels ([] when none)
      "features": [
        {
          "feature": int,                # column of F / G
          "density": float,              # fraction of tokens on which the feature is active
          "threshold": float|null,       # active at codes >= this (null when dead)
          "norm": float,                 # ‖F[:, feature]‖
          "mean_code": float, "max_code": float,   # over all tokens, unit-norm units
          "dead": bool, "dense": bool,   # dense: density > activity.dense_density
          "top_tokens": [EXAMPLE],       # largest active codes first, near-duplicates collapsed
          "samples": [{"quantiles": [lo, hi],      # an interval of the active codes' quantiles, highest first
                       "range": [lo_code, hi_code], "examples": [EXAMPLE]}],
          "histogram": {"edges": [float], "counts": [int]},   # active codes, threshold..max ([] when dead)
          "top_neurons": [{"neuron": int, "weight": float}],  # largest |F[:, feature]| first
          "vocab_top": [{"token": str, "logit": float}],      # [] when no model was given
          "vocab_bottom": [{"token": str, "logit": float}],
          "label_shares": {label: float},                      # {} when the corpus has no labels
          "related": [{"layer": int, "feature": int, "cosine": float}],  # closest features in other layers
          "detection": [{"concept": str, "auroc": float, "gap": float,   # concepts matched to this feature
                         "<method> auroc": float|null}],                  # ([] without evaluation.json)
          "steering": [{"concept": str, "site": str, "targets": [{"target", "reached", "alpha", "kl", "score",
                        "concept", "fluency", "model_fluency", "sample"}]}]
        }
      ],
      "evaluation": {...}                # the layer's entry of RUN/evaluation.json (jsnmf evaluate), if any;
    }                                    # "hierarchy" in it (Hierarchy.to_dict) is drawn as the concept tree

    EXAMPLE = {"token_index": int,       # row of the store / of G
               "token": str, "value": float,           # the token's text and its code (unit-norm units)
               "document": int, "position": int, "label": str|null,
               "duplicates": int,                      # near-duplicate contexts collapsed into this one
               "context": {"left": str, "token": str, "right": str},   # left+token+right = the window
               "window": {"tokens": [str], "values": [float], "at": int}}  # every token of the window, its code
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from jsnmf import __version__, analysis
from jsnmf.io.files import atomic_write_bytes, atomic_write_text
from jsnmf.io.manifest import read_manifest
from jsnmf.layout import RunLayout, hook_name, layer_dir_name
from jsnmf.report.activity import activity_rule
from jsnmf.report.features import (FEATURES_FORMAT, FEATURES_VERSION, LayerInputs, LayerReport, build_features,
                                   prepare, read_features)
from jsnmf.report.images import codes_png, loss_png
from jsnmf.report.interactive import filters_html
from jsnmf.report.pages import (UNITS_NOTE, data_uri, distinct_tokens, feature_row, feature_table_head, page,
                                render_layer_html)
from jsnmf.report.related import active_code_matrix, closest_features
from jsnmf.report.panels import PANELS, Panel, PanelInputs, ReportOptions, esc

__all__ = ["FEATURES_FORMAT", "LayerInputs", "LayerReport", "ReportOptions", "Panel", "PanelInputs", "PANELS", "prepare", "build_features",
           "write_layer_report", "write_index", "write_report", "read_features", "render_layer_html",
           "loss_png", "codes_png", "layer_dir_name"]

log = logging.getLogger(__name__)


def write_layer_report(out_dir: str | os.PathLike, layer: int, inputs: LayerInputs, options: ReportOptions = None,
                       progress: bool = False, prepared=None) -> LayerReport:
    """Write ``report.html``, ``features.json``, ``loss.png`` and ``codes.png`` of ``layer`` into ``out_dir``
    (each atomically) from ``inputs`` (:class:`LayerInputs`); ``prepared``: :func:`prepare`'s answer."""
    options = options or ReportOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unit, act = prepared if prepared is not None else prepare(inputs, options)
    records = build_features(inputs, options=options, progress=progress, prepared=(unit, act))
    fit_info = dict(inputs.fit_info or {})
    history = None if inputs.loss_history is None else np.asarray(inputs.loss_history, dtype=np.float64)
    data = {
        "format": FEATURES_FORMAT,
        "format_version": FEATURES_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jsnmf_version": __version__,
        "layer": int(layer),
        "hook_name": fit_info.get("hook") or hook_name(layer),
        "rank": int(unit.shape[1]),
        "n_tokens": int(unit.shape[0]),
        "d_mlp": int(np.shape(inputs.features)[0]),
        "fit": {
            "n_iter": fit_info.get("n_iter"),
            "relative_error": fit_info.get("relative_error"),
            "final_loss": float(history[-1]) if history is not None and history.size else None,
            "params": fit_info.get("params"),
        },
        "units": "G[token, j]·‖F[:, j]‖ (unit-norm feature directions)",
        "activity": {"rule": activity_rule(options.active_fraction, options.dead_fraction),
                     "active_fraction": options.active_fraction, "dead_fraction": options.dead_fraction,
                     "dense_density": options.dense_density},
        "l0": float(act.l0),
        "n_dead": act.n_dead,
        "labels": list(inputs.labels),
        "features": records,
    }
    if inputs.evaluation is not None:
        data["evaluation"] = inputs.evaluation
    loss, code_hist = loss_png(history, _sq_norm(history, fit_info.get("relative_error"))), codes_png(unit, act)
    atomic_write_bytes(out_dir / "loss.png", loss)
    atomic_write_bytes(out_dir / "codes.png", code_hist)
    atomic_write_text(out_dir / "features.json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    atomic_write_text(out_dir / "report.html", render_layer_html(data, data_uri(loss), data_uri(code_hist)))
    return LayerReport(
        layer=int(layer), html=out_dir / "report.html", features_json=out_dir / "features.json",
        rank=data["rank"], n_tokens=data["n_tokens"], n_dead=act.n_dead, l0=data["l0"],
        relative_error=fit_info.get("relative_error"), n_iter=fit_info.get("n_iter"), params=fit_info.get("params"),
        features=[_index_summary(f) for f in records], activity=(options.active_fraction, options.dead_fraction))


def _sq_norm(history, relative_error) -> float | None:
    """‖X‖² from the fit's best loss and relative error (relative error = sqrt(best loss / ‖X‖²))."""
    if history is None or not history.size or not relative_error:
        return None
    return float(np.min(history)) / float(relative_error) ** 2


def _index_summary(f: dict) -> dict:
    """What the index's all-features table needs of a feature record."""
    keep = ("feature", "density", "max_code", "dead", "dense", "label_shares")
    return {**{k: f[k] for k in keep}, "top_tokens": [{"token": t} for t in distinct_tokens(f)],
            "vocab_top": f["vocab_top"][:4]}


def _params_table(layers: Sequence[LayerReport]) -> str:
    names = sorted({name for r in layers for name in (r.params or {})})
    if not names:
        return ""
    head = "<tr><th>parameter</th>" + "".join(f"<th>layer {r.layer}</th>" for r in layers) + "</tr>"
    rows = "".join(f"<tr><td>{esc(n)}</td>" + "".join(f"<td>{esc((r.params or {}).get(n, ''))}</td>" for r in layers)
                   + "</tr>" for n in names)
    return f"<h2>Fit parameters</h2><table class=summary>{head}{rows}</table>"


def _recovery_html(layers: Sequence[LayerReport]) -> str:
    results = [r for r in layers if r.recovery]
    if not results:
        return ""
    recovered = sum(r.recovery["recovered"] for r in results)
    total = sum(r.recovery["total"] for r in results)
    rows = []
    for r in results:
        missing = [c for c, v in r.recovery["concepts"].items() if not v["recovered"]]
        rows.append(f"<tr><td>layer {r.layer}</td><td class=num>{r.recovery['recovered']}/{r.recovery['total']}</td>"
                    f"<td>{esc(', '.join(missing)) if missing else 'none missing'}</td></tr>")
    return (f"<h2>Demo: planted concepts recovered</h2><p id=recovery><b>{recovered}/{total}</b> planted concepts "
            "recovered (a concept counts when one feature's top tokens are mostly its words).</p>"
            "<table class=summary><tr><th>layer</th><th class=num>recovered</th><th>missing</th></tr>"
            + "".join(rows) + "</table>")


def _all_features_html(layers: Sequence[LayerReport], report_dir: Path) -> str:
    labels = sorted({label for r in layers for f in r.features for label in f["label_shares"]})
    has_vocab = any(f["vocab_top"] for r in layers for f in r.features)
    rows = []
    for r in layers:
        link = os.path.relpath(r.html, report_dir)
        for f in r.features:
            first = (f"<td data-sort=\"{r.layer}\">{r.layer}</td><td data-sort=\"{f['feature']}\">"
                     f"<a href=\"{esc(link)}#feature-{f['feature']}\">Feature {f['feature']}</a></td>")
            rows.append(feature_row(f, "", first, bool(labels), has_vocab))
    return ("<h2>All features</h2>" + filters_html("all-features", labels)
            + "<table class=\"summary sortable\" id=all-features>"
            + feature_table_head("<th>layer</th><th>feature</th>", bool(labels), has_vocab)
            + "<tbody>" + "\n".join(rows) + "</tbody></table>")


def write_index(report_dir: str | os.PathLike, layers: Sequence[LayerReport], run_info: dict | None = None) -> Path:
    """Write ``report_dir/index.html``: the run's facts (and the jsnmf version), the layers (sortable),
    the fit parameters, the demo's recovery when there is one, and every feature of every layer
    (searchable); ``run_info``: name -> value facts."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    layers = sorted(layers, key=lambda r: r.layer)
    run_info = {**(run_info or {}), "jsnmf version": __version__}
    facts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in run_info.items())
    rows = []
    for r in layers:
        link = os.path.relpath(r.html, report_dir)
        rel = "" if r.relative_error is None else f"{r.relative_error:.4f}"
        dense = sum(bool(f.get("dense")) for f in r.features)
        rows.append(
            f"<tr><td data-sort=\"{r.layer}\"><a href=\"{esc(link)}\">Layer {r.layer}</a></td><td class=num>{r.rank}</td>"
            f"<td class=num data-sort=\"{r.n_tokens}\">{r.n_tokens:,}</td><td class=num>{rel}</td>"
            f"<td class=num>{r.n_iter if r.n_iter is not None else ''}</td>"
            f"<td class=num>{r.l0:.2f}</td><td class=num>{r.n_dead}</td><td class=num>{dense}</td></tr>")
    head = ("<thead><tr><th>layer</th><th class=num>rank</th><th class=num>tokens</th><th class=num>relative error</th>"
            "<th class=num>iterations</th><th class=num>L0</th><th class=num>dead</th><th class=num>dense</th></tr></thead>")
    body = ("<h1>jsnmf report</h1>" + f"<table class=summary>{facts}</table>"
            + "<h2>Layers</h2><table class=\"summary sortable\" id=layers>" + head + "<tbody>" + "\n".join(rows)
            + "</tbody></table>" + f"<p class=note>{esc(UNITS_NOTE)} "
            + (f"{esc(activity_rule(*layers[0].activity))}" if layers and layers[0].activity else "") + "</p>"
            + _recovery_html(layers) + _params_table(layers) + _all_features_html(layers, report_dir))
    path = report_dir / "index.html"
    atomic_write_text(path, page("jsnmf report", body))
    return path


def _load_decoder(store, model_path: str | None = None):
    """``tokenizer.decode`` for the store's tokenizer (recorded at extraction time), or the tokenizer of
    ``model_path`` (``--model``: the run folder was moved, or the model lives elsewhere now)."""
    from jsnmf.models import load_tokenizer
    from jsnmf.models.loading import resolve_checkpoint_dir

    if model_path is not None:
        tokenizer = load_tokenizer(resolve_checkpoint_dir(model_path))
        return lambda ids: tokenizer.decode(ids)
    path = store.tokenizer_path
    if path is None or not Path(path).exists():
        raise FileNotFoundError(
            f"{store.path}: the tokenizer recorded in the store ({path}) is not available; cannot decode tokens "
            "(pass the model with --model)")
    tokenizer = load_tokenizer(path)
    return lambda ids: tokenizer.decode(ids)


def _vocab_projections(model, layer: int, features: np.ndarray, decode, n: int, site: str = "hook_post") -> list[dict]:
    """Vocabulary projection of every feature; all-zero columns (dead features) get empty lists."""
    features = np.asarray(features, dtype=np.float32)
    live = np.flatnonzero(np.linalg.norm(features, axis=0) > 0)
    result = [{"top": [], "bottom": []} for _ in range(features.shape[1])]
    if live.size:
        for j, projection in zip(live, analysis.project_features_to_vocab(model, layer, features[:, live], decode, n, site)):
            result[j] = projection
    return result


def write_report(
    run_dir: str | os.PathLike,
    *,
    store_dir: str | os.PathLike | None = None,
    snmf_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    layers: Sequence[int] | None = None,
    model=None,
    model_path: str | None = None,
    options: ReportOptions = None,
    progress: bool = True,
) -> Path:
    """Write the report of a run and return the path of its ``index.html``.

    A run directory holds ``store/`` (the ActivationStore) and ``snmf/layer_{L:02d}/`` (``SNMF.save``
    checkpoints); ``store_dir``, ``snmf_dir`` and ``out_dir`` (default ``<run>/report``) override
    those places. ``layers`` defaults to every layer with a checkpoint. ``options.vocab``: compute
    the vocabulary projections, with ``model`` or else the model recorded in the store (skipped with
    a warning when that model cannot be loaded). ``model_path``: the model (and its tokenizer) to
    use instead of the one the store records (a moved or shared run folder).
    """
    options = options or ReportOptions()
    vocab = options.vocab
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
    decode = _load_decoder(store, model_path)
    if vocab and model is None:
        model = _try_load_model(model_path or store.model_path)
    evaluation = read_evaluation(run.evaluation)
    related = _related_across_layers(run, snmf_dir, layers, options) if len(layers) > 1 else {}
    planted = _demo_model_dir(model_path or store.model_path)
    reports = []
    for layer in tqdm(layers, desc="report", disable=not progress):
        fitted = SNMF.load(run.fitted(layer, snmf_dir))
        if fitted.codes_.shape[0] != store.n_tokens:
            raise ValueError(
                f"{run.fitted(layer, snmf_dir)}: the codes have {fitted.codes_.shape[0]} rows but the store "
                f"has {store.n_tokens} tokens; was it fitted on this store?")
        projections = (_vocab_projections(model, layer, fitted.features_, decode, options.n_vocab, store.hook_site)
                       if (vocab and model) else None)
        inputs = LayerInputs(
            features=fitted.features_, codes=fitted.codes_, token_ids=store.token_ids, doc_index=store.doc_index,
            positions=store.positions, decode=decode, label_index=store.label_index, labels=store.labels,
            vocab=projections, loss_history=getattr(fitted, "loss_history_", None),
            fit_info={"n_iter": getattr(fitted, "n_iter_", None),
                      "relative_error": getattr(fitted, "relative_error_", None), "params": _json_params(fitted),
                      "hook": store.hook_names[store.layers.index(layer)]},
            evaluation=layer_evaluation(evaluation, layer), related=related.get(layer))
        layer_report = write_layer_report(run.report_layer(layer, out_dir), layer, inputs, options)
        if planted is not None:
            from jsnmf import demo

            layer_report.recovery = demo.recovery_from_codes(np.asarray(fitted.codes_), store.token_ids, decode)
        reports.append(layer_report)
    run_info = {
        "model": model_path or store.model_path or "",
        "corpus": (store.manifest.get("corpus") or {}).get("path", ""),
        "store": str(store.path),
        "tokens": f"{store.n_tokens:,}",
        "documents": len(store.documents),
        "checkpoints": str(snmf_dir),
    }
    return write_index(out_dir, reports, run_info)


def _related_across_layers(run: RunLayout, snmf_dir: Path, layers: Sequence[int], options: ReportOptions) -> dict:
    """Per layer, per feature: its closest features in the other layers (:mod:`jsnmf.report.related`);
    one layer's codes in memory at a time, kept as sparse active codes."""
    from jsnmf.estimator import SNMF

    matrices = {}
    for layer in layers:
        fitted = SNMF.load(run.fitted(layer, snmf_dir))
        unit, act = prepare(LayerInputs(features=fitted.features_, codes=fitted.codes_, token_ids=(), doc_index=(),
                                        positions=(), decode=None), options)
        matrices[layer] = active_code_matrix(unit, act)
    return closest_features(matrices, options.n_related)


def _demo_model_dir(model_path: str | None) -> Path | None:
    """The store's model folder when it is the offline demo's (it holds the planted concepts), else None."""
    from jsnmf.demo import PLANTED_FILE

    if model_path and (Path(model_path) / PLANTED_FILE).is_file():
        return Path(model_path)
    return None


def read_evaluation(path: Path) -> dict | None:
    """``jsnmf evaluate``'s ``evaluation.json`` when the run has one (else None)."""
    from jsnmf.evaluation.run import EVALUATION_FORMAT, EVALUATION_VERSION

    if not Path(path).is_file():
        return None
    return read_manifest(path, format=EVALUATION_FORMAT, version=EVALUATION_VERSION, what="jsnmf evaluation file")


def layer_evaluation(evaluation: dict | None, layer: int) -> dict | None:
    """One layer's entry of an evaluation, with the run-wide facts its panels show (judge, targets)."""
    if evaluation is None or str(layer) not in evaluation.get("layers", {}):
        return None
    return dict(evaluation["layers"][str(layer)], judge=evaluation.get("judge"),
                kl_targets=evaluation.get("settings", {}).get("kl_targets"))


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
