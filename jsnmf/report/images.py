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


def _integer_iterations(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def relative_error_history(loss_history, sq_norm: float | None) -> np.ndarray | None:
    """``sqrt(loss / ‖X‖²)`` per iteration, or None without ``‖X‖²``."""
    history = np.asarray(loss_history if loss_history is not None else [], dtype=np.float64)
    if not sq_norm or sq_norm <= 0 or not history.size:
        return None
    return np.sqrt(np.maximum(history, 0.0) / sq_norm)


def loss_png(loss_history: np.ndarray | None, sq_norm: float | None = None) -> bytes:
    """PNG of the relative error ‖X − G Fᵀ‖ / ‖X‖ per iteration (``sq_norm`` = ‖X‖²; without it, the raw
    loss), plain tick labels (no offset notation), integer iteration ticks."""
    from matplotlib.ticker import FuncFormatter

    def draw(figure):
        ax = figure.add_subplot()
        history = np.asarray(loss_history if loss_history is not None else [], dtype=np.float64)
        relative = relative_error_history(history, sq_norm)
        values = relative if relative is not None else history
        if values.size:
            ax.plot(np.arange(1, values.size + 1), values, color="#1f5fa8", lw=1.5)
            if relative is None and np.all(values > 0) and values.max() > 10 * values.min():
                ax.set_yscale("log")
            else:
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
            ax.set_title("relative error ‖X − G Fᵀ‖ / ‖X‖ (final {:.4f})".format(values[-1]) if relative is not None
                         else "SNMF loss ‖X − G Fᵀ‖²")
        else:
            ax.text(0.5, 0.5, "no loss history recorded", ha="center", va="center", transform=ax.transAxes)
            ax.set_title("relative error")
        _integer_iterations(ax)
        ax.set_xlabel("iteration")
        ax.set_ylabel("relative error" if relative is not None else "‖X − G Fᵀ‖²")
        ax.grid(alpha=0.3)
    return _figure_png(draw)


def _percent(value: float) -> str:
    return f"{value * 100:.3g}%"


def codes_png(unit_codes: np.ndarray, act) -> bytes:
    """PNG with the histogram of the active codes (unit-norm units, all features) and the histogram of
    feature densities under the activity rule (:mod:`jsnmf.report.activity`), decade ticks only."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    unit_codes = np.asarray(unit_codes)
    live = np.flatnonzero(~act.dead)
    active = np.concatenate([unit_codes[:, j][unit_codes[:, j] >= act.threshold[j]] for j in live]) \
        if live.size else np.zeros(0)
    density = np.asarray(act.density)

    def draw(figure):
        left, right = figure.subplots(1, 2)
        if active.size:
            left.hist(active, bins=60, color="#1f5fa8")
            left.set_yscale("log")
        left.set_xlabel("active code (unit-norm units)")
        left.set_ylabel("tokens × features")
        left.set_title(f"active codes ({active.size:,} of {unit_codes.size:,})", fontsize=10)
        values = density[~act.dead]
        values = values[values > 0]
        if values.size:
            lo = min(10 ** np.floor(np.log10(values.min())), 0.1)
            bins = np.logspace(np.log10(lo), 0, 30)
            right.hist(values, bins=bins, color="#c0602a")
            right.set_xscale("log")
            right.set_xlim(lo, 1.0)
            decades = 10.0 ** np.arange(np.round(np.log10(lo)), 1)
            step = max(1, int(np.ceil(len(decades) / 5)))
            right.xaxis.set_major_locator(FixedLocator(decades[::-1][::step][::-1]))
            right.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _percent(v)))
            right.xaxis.set_minor_formatter(NullFormatter())
        else:
            right.xaxis.set_minor_locator(NullLocator())
        right.yaxis.get_major_locator().set_params(integer=True)
        right.set_xlabel("feature density (share of tokens active)")
        right.set_ylabel("features")
        right.set_title(f"densities ({act.n_dead} dead)", fontsize=10)
    return _figure_png(draw)
