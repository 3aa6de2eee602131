"""Drawing helpers shared by the figures: figure and save, colours, bands, loss axes, suptitle."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from neuroinit.experiments import figstyle
from neuroinit.experiments.sweep import SELECT_TEXT, RunSummary

_RULE_COLORS = {"bptt": "#1b6ca8", "eprop": "#d1495b", "eprop+flossing": "#2e933c", "eprop-autograd": "#8e6c8a",
                "rflo": "#edae49"}


def _figure(n_panels: int, *, ncols: int | None = None, size=(4.2, 3.3)):
    return figstyle.new_figure(n_panels, ncols=ncols, size=size)


def _save(fig, out) -> None:
    figstyle.save(fig, out)


def _gain_colors(gains: Iterable[float]):
    from matplotlib import colormaps

    gs = sorted(set(gains))
    cmap = colormaps["viridis"]
    if len(gs) == 1:
        return {gs[0]: cmap(0.35)}
    return {g: cmap(0.9 * i / (len(gs) - 1)) for i, g in enumerate(gs)}


def _band(ax, x, mean, sem, color, **kw):
    (line,) = ax.plot(x, mean, color=color, **kw)
    if np.any(sem > 0):
        ax.fill_between(x, mean - sem, mean + sem, color=color, alpha=0.2, linewidth=0)
    return line


def _loss_axes(ax) -> None:
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.grid(True, which="major", alpha=0.3)


def _suptitle(fig, runs: list[RunSummary], what: str, smooth: int = 1, select: str = "final",
              extra: str = "") -> None:
    """Title, scale (N, seeds, iterations, k), statistic and learning-rate criterion, wrapped to the figure."""
    configs = [r.config for r in runs if r.config and r.status == "complete"]
    figstyle.suptitle(fig, f"{what}\n{figstyle.scale_text(configs)}\nmean ± s.e.m. over seeds; learning rate per "
                           f"condition by {SELECT_TEXT[select]}"
                      + (f"; losses averaged over {smooth} logged points" if smooth > 1 else "")
                      + (f"\n{extra}" if extra else ""))
