"""The report's figures as PNG bytes (matplotlib's Agg canvas, no global pyplot state)."""

from __future__ import annotations

import io

import numpy as np

__all__ = ["loss_png", "codes_png"]


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
