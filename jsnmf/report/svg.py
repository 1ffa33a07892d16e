"""Small inline SVG and HTML figures of a feature (no images to fetch, no script): its activation
histogram and signed bars."""

from __future__ import annotations

import html

__all__ = ["histogram_svg", "signed_bars"]


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def histogram_svg(edges: list[float], counts: list[int], width: int = 280, height: int = 90) -> str:
    """Bars of ``counts`` over ``edges`` (square-root height scale, so single tokens stay visible);
    each bar has a ``<title>`` "lo–hi: n tokens" and a ``data-count``; the axis shows both ends."""
    if not counts:
        return "<p class=muted>No active tokens.</p>"
    top = max(counts) or 1
    plot_h, pad = height - 18, 2
    bar_w = (width - 2 * pad) / len(counts)
    bars = []
    for b, c in enumerate(counts):
        h = 0 if c == 0 else max(1.0, plot_h * (c / top) ** 0.5)
        bars.append(f"<rect x=\"{pad + b * bar_w:.1f}\" y=\"{plot_h - h:.1f}\" width=\"{max(bar_w - 1, 0.5):.1f}\" "
                    f"height=\"{h:.1f}\" data-count=\"{c}\"><title>{edges[b]:.3g}–{edges[b + 1]:.3g}: "
                    f"{c} tokens</title></rect>")
    axis = (f"<text x=\"{pad}\" y=\"{height - 4}\">{edges[0]:.3g}</text>"
            f"<text x=\"{width - pad}\" y=\"{height - 4}\" text-anchor=\"end\">{edges[-1]:.3g}</text>"
            f"<text x=\"{width / 2:.0f}\" y=\"{height - 4}\" text-anchor=\"middle\">max {top} tokens/bin</text>")
    return (f"<svg class=hist width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=img "
            f"aria-label=\"activation histogram\">{''.join(bars)}{axis}</svg>")


def signed_bars(rows: list[tuple[str, float]], scale: float, label_html=_esc, width: int = 110) -> str:
    """A table of (label, value) rows, each with a bar of length |value|/``scale`` (green positive, red
    negative) and the signed value."""
    if not rows:
        return ""
    scale = scale or 1.0
    cells = []
    for label, value in rows:
        sign = "pos" if value >= 0 else "neg"
        cells.append(f"<tr><td class=lbl>{label_html(label)}</td><td><span class=\"bar {sign}bar\" "
                     f"style=\"width:{max(abs(value) / scale * width, 1):.0f}px\"></span></td>"
                     f"<td class=\"num {sign}\">{value:+.3g}</td></tr>")
    return "<table class=bars>" + "".join(cells) + "</table>"
