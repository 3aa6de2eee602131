"""Shared figure styling: figures a paper can print.

* :func:`new_figure`: a constrained-layout grid of panels on the Agg canvas (no pyplot, no global backend).
* :func:`wrapped`: titles wrapped to the width they have (no cut-off titles).
* :func:`scale_text`: the scale of the runs behind a figure (N, seeds, iterations, k of flossing runs), written on
  every figure, with a note when the error bands come from fewer than :data:`MIN_SEEDS_FOR_BANDS` seeds.
* :func:`save`: labels at least two ticks of every log-scale axis (:func:`label_log_ticks`), then writes the
  image atomically (format from the suffix).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable
from pathlib import Path

__all__ = ["MIN_SEEDS_FOR_BANDS", "label_log_ticks", "labelled_ticks", "new_figure", "save", "scale_text",
           "wrapped"]

MIN_SEEDS_FOR_BANDS = 3          # error bands over fewer seeds are marked as such
_CHARS_PER_INCH = {7: 19.0, 8: 16.5, 9: 14.5, 10: 13.0}   # a conservative text width per font size (DejaVu Sans)


def new_figure(n_panels: int, *, ncols: int | None = None, size=(4.2, 3.3), title_lines: int = 3):
    """A figure with ``n_panels`` panels (``ncols`` per row), each ``size`` inches, plus room for a suptitle of
    ``title_lines`` lines; returns ``(fig, axes)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = ncols or min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(max(size[0] * ncols, 6.0), size[1] * nrows + 0.2 + 0.17 * title_lines),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def wrapped(text: str, width_inches: float, fontsize: int = 9) -> str:
    """``text`` with each of its lines wrapped to fit ``width_inches`` at ``fontsize``."""
    per_inch = _CHARS_PER_INCH.get(fontsize, 13.0 * 10 / max(fontsize, 1))
    width = max(20, int(width_inches * per_inch))
    return "\n".join(textwrap.fill(line, width) if line else "" for line in text.split("\n"))


def set_title(ax, text: str, fontsize: int = 9) -> None:
    """A panel title wrapped to the panel's width."""
    fig = ax.get_figure()
    ncols = ax.get_gridspec().ncols if ax.get_gridspec() is not None else 1
    ax.set_title(wrapped(text, fig.get_figwidth() / ncols * 0.95, fontsize), fontsize=fontsize)


def suptitle(fig, text: str, fontsize: int = 9) -> None:
    """The figure title, wrapped to the figure's width."""
    fig.suptitle(wrapped(text, fig.get_figwidth() * 0.95, fontsize), fontsize=fontsize)


def _fmt_set(values: Iterable) -> str:
    vals = sorted({v for v in values if v is not None}, key=lambda v: (isinstance(v, str), v))
    return "/".join(str(v) for v in vals) if vals else "?"


def scale_text(configs: Iterable[dict], *, bands: bool = True) -> str:
    """``"N = 256 · 3 seeds · 2000 iterations · flossing k = 32"`` for the runs' configs, plus a note when the
    error bands (``bands``) come from fewer than :data:`MIN_SEEDS_FOR_BANDS` seeds."""
    from neuroinit.experiments.sweep import rule_label

    configs = [c for c in configs if c]
    seeds_per = {}
    for c in configs:
        key = tuple(sorted((k, str(v)) for k, v in c.items() if k not in ("seed", "lr", "lr_grid")))
        seeds_per.setdefault(key, set()).add(c.get("seed"))
    n_seeds = sorted({len(s) for s in seeds_per.values()}) or [0]
    seeds = f"{n_seeds[0]}" if len(n_seeds) == 1 else f"{n_seeds[0]}-{n_seeds[-1]}"
    parts = [f"N = {_fmt_set(c.get('hidden') for c in configs)}",
             f"{seeds} seed{'s' if n_seeds[-1] != 1 else ''}",
             f"{_fmt_set(c.get('iters') for c in configs)} iterations",
             f"batch {_fmt_set(c.get('batch') for c in configs)}"]
    flossed = [c for c in configs if rule_label(c).endswith("+flossing")]
    if flossed:
        parts.append(f"flossing k = {_fmt_set(c.get('floss_k') for c in flossed)}")
    text = " · ".join(parts)
    if bands and n_seeds[0] < MIN_SEEDS_FOR_BANDS:
        text += (f" (fewer than {MIN_SEEDS_FOR_BANDS} seeds: bands are s.e.m. of {n_seeds[0]}"
                 + (", none with 1" if n_seeds[0] == 1 else "") + ")")
    return text


def label_log_ticks(ax) -> None:
    """Make sure every log-scale axis of ``ax`` has at least two labelled ticks in its view: where fewer than two
    powers of ten fall in the limits, label 1-2-5 (or every integer multiple) of each decade in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis, get_lim, scale in ((ax.yaxis, ax.get_ylim, ax.get_yscale), (ax.xaxis, ax.get_xlim, ax.get_xscale)):
        if scale() != "log":
            continue
        lo, hi = sorted(get_lim())
        if not (lo > 0 and math.isfinite(hi)):
            continue
        decades = math.floor(math.log10(hi)) - math.ceil(math.log10(lo)) + 1
        if decades >= 2:
            continue
        for subs in ((1.0, 2.0, 5.0), tuple(float(s) for s in range(1, 10))):
            loc = LogLocator(base=10.0, subs=subs)
            if sum(lo <= t <= hi for t in loc.tick_values(lo, hi)) >= 2:
                break
        axis.set_major_locator(loc)
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.3g}"))
        axis.set_minor_formatter(NullFormatter())


def labelled_ticks(ax, which: str = "y") -> list[str]:
    """The non-empty tick labels of ``ax``'s ``which`` axis inside its view limits, as drawn (for tests)."""
    fig = ax.get_figure()
    fig.canvas.draw()
    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = sorted(ax.get_ylim() if which == "y" else ax.get_xlim())
    tol = 1e-9 * (hi - lo)
    out = []
    for tick in axis.get_major_ticks() + axis.get_minor_ticks():
        loc = tick.get_loc()
        text = tick.label1.get_text()
        if tick.label1.get_visible() and text and lo - tol <= loc <= hi + tol:
            out.append(text)
    return out


def save(fig, out) -> None:
    """Label log axes (:func:`label_log_ticks`), then write ``fig`` to ``out`` atomically (png, pdf, svg, jpg)."""
    from neuroinit.io.atomic import atomic_write_path

    out = Path(out)
    fmt = out.suffix.lstrip(".").lower() or "png"
    if fmt not in ("png", "pdf", "svg", "jpg", "jpeg"):
        raise ValueError(f"Invalid output {str(out)!r}: allowed suffixes .png, .pdf, .svg, .jpg")
    for ax in fig.axes:
        if ax.get_visible():
            label_log_ticks(ax)
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=130)
