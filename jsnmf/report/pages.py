"""The report's HTML: the layer page (summary table, one section per feature with its panels)."""

from __future__ import annotations

import base64
from typing import Sequence

from jsnmf import analysis
from jsnmf.report.interactive import SCRIPT, filters_html
from jsnmf.report.panels import PANELS, Panel, esc, visible

__all__ = ["render_layer_html", "page", "data_uri", "CSS", "UNITS_NOTE", "feature_row", "feature_table_head",
           "distinct_tokens", "shaded_window"]


CSS = """
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
span.t{border-radius:2px}span.t.at{outline:1.5px solid #1d1d1f}
.flag{font-size:.7em;background:#b3261e;color:#fff;border-radius:3px;padding:0 4px;margin-left:4px;font-weight:normal}
.flag.dead{background:#888}
.note{background:#f1f4f8;border-left:3px solid #1f5fa8;padding:.4em .8em;font-size:.9em}
div.filters{margin:.5em 0;display:flex;gap:1em;flex-wrap:wrap;align-items:center;font-size:.9em}
div.filters input[type=number]{width:4.5em}
th.sorter{cursor:pointer;user-select:none}th[aria-sort=ascending]::after{content:" ▲"}
th[aria-sort=descending]::after{content:" ▼"}
svg.hist rect{fill:#1f5fa8}svg.hist text{font-size:10px;fill:#555}
table.bars td{padding:0 4px;font-size:.85em}.posbar{background:#1b6e2a}.negbar{background:#b3261e}
"""


def distinct_tokens(feature: dict, n: int = 6) -> list[str]:
    """The first ``n`` distinct token texts of a feature's top tokens."""
    seen: list[str] = []
    for t in feature["top_tokens"]:
        if t["token"] not in seen:
            seen.append(t["token"])
        if len(seen) == n:
            break
    return seen


def _top_label(feature: dict) -> tuple[str, float]:
    return next(iter(feature["label_shares"].items()), ("", 0.0))


def _flags(feature: dict) -> str:
    return ((" <span class=flag title=\"active on more than the dense threshold of tokens\">dense</span>"
             if feature.get("dense") else "") + (" <span class=\"flag dead\">dead</span>" if feature["dead"] else ""))


def feature_row(f: dict, link: str, first_cell: str, has_labels: bool, has_vocab: bool, extra_cells: str = "") -> str:
    """A feature's row of a searchable table: ``data-*`` for the filters, tokens, label, vocab."""
    tokens = distinct_tokens(f)
    vocab = [v["token"] for v in f.get("vocab_top", [])[:4]]
    label, share = _top_label(f)
    search = " ".join([f"feature {f['feature']}", *tokens, label, *vocab]).lower()
    cells = (f"{first_cell}<td class=num data-sort=\"{f['density']:.6g}\">{f['density']:.2%}{_flags(f)}</td>"
             f"<td class=num data-sort=\"{f['max_code']:.6g}\">{f['max_code']:.3g}</td>"
             + "<td>" + (" ".join(f"<code class=tok>{visible(t)}</code>" for t in tokens) if not f["dead"]
                         else "<span class=muted>dead</span>") + "</td>")
    if has_labels:
        cells += f"<td data-sort=\"{esc(label)}\">{esc(label)} {share:.0%}</td>" if label else "<td></td>"
    if has_vocab:
        cells += "<td>" + " ".join(f"<code class=tok>{visible(v)}</code>" for v in vocab) + "</td>"
    return (f"<tr data-search=\"{esc(search)}\" data-label=\"{esc(label)}\" data-density=\"{f['density']:.6g}\" "
            f"data-dense=\"{int(bool(f.get('dense')))}\" data-dead=\"{int(f['dead'])}\"{link}>{cells}{extra_cells}</tr>")


def feature_table_head(first: str, has_labels: bool, has_vocab: bool) -> str:
    return ("<thead><tr>" + first + "<th class=num>density</th><th class=num>max code</th><th>top tokens</th>"
            + ("<th>top label</th>" if has_labels else "") + ("<th>vocab top</th>" if has_vocab else "")
            + "</tr></thead>")


def _summary_table(records: list[dict], labels: list[str], has_vocab: bool) -> str:
    has_labels = bool(labels)
    rows = [feature_row(f, f" data-target=\"feature-{f['feature']}\"",
                        f"<td data-sort=\"{f['feature']}\"><a href=\"#feature-{f['feature']}\">Feature {f['feature']}</a></td>",
                        has_labels, has_vocab) for f in records]
    return (filters_html("features", labels)
            + "<table class=\"summary sortable\" id=features data-reorder=feature-sections>"
            + feature_table_head("<th>feature</th>", has_labels, has_vocab)
            + "<tbody>" + "\n".join(rows) + "</tbody></table>")


def shaded_window(example: dict, scale: float, threshold: float | None) -> str:
    """Every token of an example's window, those at or above ``threshold`` shaded by code/``scale``
    (the feature's largest code); the activating token outlined; each active token's code in its title."""
    window = example.get("window")
    if not window:
        c = example["context"]
        return f"{visible(c['left'])}<mark>{visible(c['token'])}</mark>{visible(c['right'])}"
    parts = []
    for k, (text, value) in enumerate(zip(window["tokens"], window["values"])):
        active = threshold is not None and value >= threshold
        style = f" style=\"background:rgba(255,153,0,{min(1.0, value / scale) if scale > 0 else 0:.2f})\"" if active else ""
        css = "t at" if k == window["at"] else "t"
        if active or k == window["at"]:
            parts.append(f"<span class=\"{css}\"{style} title=\"{value:.4g}\">{visible(text)}</span>")
        else:
            parts.append(visible(text))
    return "".join(parts)


def _examples_table(examples: list[dict], feature: dict, has_labels: bool) -> str:
    rows = []
    for t in examples:
        dup = f" <span class=muted title=\"near-duplicate contexts collapsed into this one\">×{t['duplicates'] + 1}</span>" \
            if t.get("duplicates") else ""
        row = (f"<tr><td class=num>{t['value']:.3f}{dup}</td>"
               f"<td class=text>{shaded_window(t, feature['max_code'], feature.get('threshold'))}</td>")
        if has_labels:
            row += f"<td class=muted>{esc(t['label'] or analysis.UNLABELLED)}</td>"
        rows.append(row + "</tr>")
    return "<table class=ctx>" + "\n".join(rows) + "</table>"


def _contexts_html(feature: dict, has_labels: bool) -> str:
    if not feature["top_tokens"]:
        return "<p class=muted>No token is active for this feature (dead).</p>"
    parts = [f"<h3>Top activations ({len(feature['top_tokens'])})</h3>",
             _examples_table(feature["top_tokens"], feature, has_labels)]
    for interval in feature.get("samples", []):
        lo, hi = interval["quantiles"]
        parts.append(f"<h3>Sampled from the {lo:.0%}–{hi:.0%} quantiles of active codes "
                     f"<span class=stats>codes {interval['range'][0]:.3g}–{interval['range'][1]:.3g}</span></h3>"
                     + _examples_table(interval["examples"], feature, has_labels))
    return "".join(parts)


def _feature_html(feature: dict, has_labels: bool, panels: Sequence[Panel]) -> str:
    j = feature["feature"]
    threshold = feature.get("threshold")
    stats = (f"density {feature['density']:.2%} · max {feature['max_code']:.3g} · mean {feature['mean_code']:.3g}"
             + (f" · active ≥ {threshold:.3g}" if threshold is not None else "")
             + (f" · ‖F‖ {feature['norm']:.3g}" if "norm" in feature else ""))
    side = "".join(f"<h3>{esc(panel.title)}</h3>{panel.render(feature)}" for panel in panels)
    css_class = "feature dead" if feature["dead"] else "feature"
    return (f"<section class=\"{css_class}\" id=\"feature-{j}\"><h2>Feature {j}<span class=stats>{stats}</span>"
            f"{_flags(feature)}</h2><div class=cols><div class=contexts>{_contexts_html(feature, has_labels)}</div>"
            f"<div class=side>{side}</div></div></section>")


def _detection_summary(evaluation: dict) -> str:
    methods = list(evaluation["detection"])
    concepts = list(evaluation["detection"][methods[0]]["per_concept"])
    head = "<tr><th>concept</th>" + "".join(f"<th class=num>{esc(m)} AUROC</th>" for m in methods) + "</tr>"
    rows = []
    for concept in concepts:
        cells = []
        for m in methods:
            entry = evaluation["detection"][m]["per_concept"][concept]
            cells.append("<td class=num>—</td>" if entry["auroc"] is None else
                         f"<td class=num>{entry['auroc']:.3f}"
                         + (f" <span class=muted>(#{entry['feature']})</span>" if m != "DiffMeans" else "") + "</td>")
        rows.append(f"<tr><td>{esc(concept)}</td>{''.join(cells)}</tr>")
    means = "".join(f"<td class=num><b>{d['mean_auroc']:.3f}</b> ({d['matched']} matched)</td>" if d["mean_auroc"]
                    is not None else "<td class=num>—</td>" for d in evaluation["detection"].values())
    rows.append(f"<tr><th>mean</th>{means}</tr>")
    return "<table class=summary>" + head + "".join(rows) + "</table>"


def _tree_html(tree: dict) -> str:
    """The concept tree (``Hierarchy.to_dict``), top level first, each node with its children nested."""
    levels = tree["levels"]

    def node_html(level: int, node: dict) -> str:
        tokens = " ".join(f"<code class=tok>{visible(t)}</code>" for t in dict.fromkeys(node.get("top_tokens", []))
                          if t.strip())
        children = ""
        if level > 0:
            kids = [levels[level - 1]["nodes"][int(c.split(".")[1])] for c in node.get("children", {})
                    if levels[level - 1]["nodes"][int(c.split(".")[1])].get("parent") == node["id"]]
            children = "<ul>" + "".join(f"<li>{node_html(level - 1, kid)} <span class=muted>weight "
                                        f"{node['children'][kid['id']]:.2f}</span></li>" for kid in kids) + "</ul>"
        return f"<b>{esc(node['id'])}</b> {tokens}{children}"

    top = len(levels) - 1
    return "<ul class=tree>" + "".join(f"<li>{node_html(top, n)}</li>" for n in levels[top]["nodes"]) + "</ul>"


def _evaluation_html(evaluation: dict) -> str:
    judge = evaluation.get("judge")
    parts = ["<h2 id=evaluation>Evaluation</h2>",
             "<p>" + (f"Judge: {esc(judge['name'])}, matched-vs-mismatched AUROC {judge['validation']['auroc']:.3f}. "
                      if judge else "No concept judge. ")
             + "Detection: max-token cosine of each method's matched direction, concept's sentences vs the rest "
               "(feature numbers in parentheses). Steering per feature below.</p>",
             _detection_summary(evaluation)]
    if evaluation.get("hierarchy"):
        parts += ["<h2 id=concept-tree>Concept tree</h2>", _tree_html(evaluation["hierarchy"])]
    return "\n".join(parts)


UNITS_NOTE = ("Codes are in unit-norm units: a token's code for feature j is G[token, j]·‖F[:, j]‖, the "
              "coefficient of the unit direction F[:, j]/‖F[:, j]‖ in its reconstruction, so codes (and steering "
              "strengths along unit directions) compare across features.")


def render_layer_html(data: dict, loss_image: str, codes_image: str, title_extra: str = "") -> str:
    """The layer page for ``features.json`` content ``data``; images are URIs (data: or file names)."""
    records = data["features"]
    has_labels = bool(data["labels"])
    has_vocab = any(f["vocab_top"] for f in records)
    fit = data["fit"]
    n_dense = sum(bool(f.get("dense")) for f in records)
    facts = [f"rank {data['rank']}", f"{data['n_tokens']:,} tokens", f"d_mlp {data['d_mlp']}",
             f"L0 {data['l0']:.2f} active features per token", f"{sum(f['dead'] for f in records)} dead features",
             f"{n_dense} dense features"]
    if fit.get("relative_error") is not None:
        facts.append(f"relative error {fit['relative_error']:.4f}")
    if fit.get("n_iter") is not None:
        facts.append(f"{fit['n_iter']} iterations")
    rule = data.get("activity", {})
    dense_note = (f" A feature is flagged dense when active on more than {rule['dense_density']:.0%} of tokens."
                  if "dense_density" in rule else "")
    body = [
        "<p><a href=\"../index.html\">← all layers</a></p>",
        f"<h1>Layer {data['layer']} <span class=stats>{esc(data['hook_name'])}</span>{esc(title_extra)}</h1>",
        f"<p>{' · '.join(esc(x) for x in facts)}</p>",
        f"<p class=note id=units>{esc(UNITS_NOTE)} {esc(rule.get('rule', ''))}{esc(dense_note)}</p>",
        f"<div class=cols><div><img src=\"{loss_image}\" alt=\"relative error per iteration\"></div>"
        f"<div><img src=\"{codes_image}\" alt=\"distribution of active codes and of feature densities\"></div></div>",
        _evaluation_html(data["evaluation"]) if data.get("evaluation") else "",
        "<h2>Features</h2>",
        _summary_table(records, list(data["labels"]), has_vocab),
        "<div id=feature-sections>",
        *(_feature_html(f, has_labels, [panel for panel in PANELS if panel.shown(data)]) for f in records),
        "</div>",
        f"<p class=muted>Written by jsnmf {esc(data.get('jsnmf_version', ''))} on {esc(data.get('created', ''))}. "
        "Data: <a href=\"features.json\">features.json</a>.</p>",
    ]
    return page(f"jsnmf · layer {data['layer']}", "\n".join(body))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def page(title: str, body: str) -> str:
    """A self-contained page: inline CSS, the inline search/sort script, nothing fetched."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<link rel=\"icon\" href=\"data:,\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n<script>{SCRIPT}</script>\n</body></html>\n"
    )
