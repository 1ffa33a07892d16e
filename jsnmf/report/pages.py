"""The report's HTML: the layer page (summary table, one section per feature with its panels)."""

from __future__ import annotations

import base64
from typing import Sequence

from jsnmf import analysis
from jsnmf.report.panels import PANELS, Panel, esc, visible

__all__ = ["render_layer_html", "page", "data_uri", "CSS"]


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
"""


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
        tokens = " ".join(f"<code class=tok>{visible(t)}</code>" for t in _distinct_tokens(f))
        row = (f"<tr><td><a href=\"#feature-{f['feature']}\">Feature {f['feature']}</a></td>"
               f"<td class=num>{f['density']:.2%}</td><td class=num>{f['max_code']:.3g}</td>"
               f"<td>{tokens if not f['dead'] else '<span class=muted>dead</span>'}</td>")
        if has_labels:
            label, share = next(iter(f["label_shares"].items()), ("", 0.0))
            row += f"<td>{esc(label)} {share:.0%}</td>" if label else "<td></td>"
        if has_vocab:
            row += "<td>" + " ".join(f"<code class=tok>{visible(v['token'])}</code>" for v in f["vocab_top"][:4]) + "</td>"
        rows.append(row + "</tr>")
    return "<table class=summary>" + "\n".join(rows) + "</table>"


def _contexts_html(feature: dict, has_labels: bool) -> str:
    if not feature["top_tokens"]:
        return "<p class=muted>No token has a positive code for this feature (dead).</p>"
    rows = []
    for t in feature["top_tokens"]:
        c = t["context"]
        text = f"{visible(c['left'])}<mark>{visible(c['token'])}</mark>{visible(c['right'])}"
        row = f"<tr><td class=num>{t['value']:.3f}</td><td class=text>{text}</td>"
        if has_labels:
            row += f"<td class=muted>{esc(t['label'] or analysis.UNLABELLED)}</td>"
        rows.append(row + "</tr>")
    return "<table class=ctx>" + "\n".join(rows) + "</table>"


def _feature_html(feature: dict, has_labels: bool, panels: Sequence[Panel]) -> str:
    j = feature["feature"]
    stats = (f"density {feature['density']:.2%} · max {feature['max_code']:.3g} · "
             f"mean {feature['mean_code']:.3g}" + (" · dead" if feature["dead"] else ""))
    side = "".join(f"<h3>{esc(panel.title)}</h3>{panel.render(feature)}" for panel in panels)
    css_class = "feature dead" if feature["dead"] else "feature"
    return (f"<section class=\"{css_class}\" id=\"feature-{j}\"><h2>Feature {j}<span class=stats>{stats}</span></h2>"
            f"<div class=cols><div class=contexts><h3>Top activations ({len(feature['top_tokens'])})</h3>"
            f"{_contexts_html(feature, has_labels)}</div><div class=side>{side}</div></div></section>")


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
        f"<h1>Layer {data['layer']} <span class=stats>{esc(data['hook_name'])}</span>{esc(title_extra)}</h1>",
        f"<p>{' · '.join(esc(x) for x in facts)}</p>",
        f"<div class=cols><div><img src=\"{loss_image}\" alt=\"loss curve\"></div>"
        f"<div><img src=\"{codes_image}\" alt=\"code distribution\"></div></div>",
        _evaluation_html(data["evaluation"]) if data.get("evaluation") else "",
        "<h2>Features</h2>",
        _summary_table(records, has_labels, has_vocab),
        *(_feature_html(f, has_labels, [panel for panel in PANELS if panel.shown(data)]) for f in records),
        f"<p class=muted>Written by jsnmf on {esc(data.get('created', ''))}. "
        "Data: <a href=\"features.json\">features.json</a>.</p>",
    ]
    return page(f"jsnmf · layer {data['layer']}", "\n".join(body))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
