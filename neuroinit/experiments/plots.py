"""Figures from a sweep directory (or run files): the paper's figures 1-4, rate vs spiking, curvature.

Every figure shows, per condition, the runs at the learning rate chosen for that condition
(:func:`~neuroinit.experiments.sweep.select_best`: by default the lowest mean over seeds of the last 20 logged
losses; ``select="min"`` or ``"learning-time"`` for non-monotone curves), as the mean over seeds with a band of
+- one standard error of the mean (no band with one seed). Legends give the learning rate, marked when it is at an
edge of its grid; every figure states the selection criterion and the scale (N, seeds, iterations, flossing k;
:mod:`neuroinit.experiments.figstyle`, which also wraps titles and labels log-axis ticks). Each ``plot_*``
function writes the image (format from the file suffix: png, pdf, svg; written atomically) and returns the
number of curves it drew (error bands and reference lines not counted), so tests can check a figure.

* ``learning-curves`` (Fig. 1/2): training loss vs iteration, one curve per initial gain, a panel per
  task x model x rule.
* ``lyapunov`` (Fig. 3): max Lyapunov exponent (per step) vs gain: before training (one curve: the initial
  networks), after pre-flossing (for "+flossing" rules) and after training (one curve per rule).
* ``flossing`` (Fig. 4): rule X vs X+flossing: learning curves, one panel per gain, and final loss vs gain.
* ``rate-vs-spiking``: the controlled comparison: loss and accuracy vs iteration, one curve per model x rule
  (BPTT the reference for each model), a row of panels per gain, x range the iterations all curves share; what
  differs between the models (:func:`neuroinit.experiments.comparison.compare_models`) is stated on the figure.
* ``curvature`` (Liu et al. 2022): top Hessian eigenvalue of the loss w.r.t. ``W_rec`` of the trained network
  (untruncated, held-out trials) and the generalisation gap (test loss on fresh trials minus the final training
  loss) vs gain, one curve per rule. Computed on first use and cached in ``DIR/analysis/curvature.json``.

Matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from neuroinit.experiments import figstyle

# re-exported: the helpers and figures keep their old paths (alignment_plot, cli and tests import them here)
from neuroinit.experiments.plot_curves import plot_flossing, plot_learning_curves
from neuroinit.experiments.plot_draw import _figure, _loss_axes, _save
from neuroinit.experiments.plot_dynamics import (
    curvature_of_run,
    plot_curvature,
    plot_lyapunov,
)
from neuroinit.experiments.plot_rate_spiking import _curve_of, _model_label, plot_rate_vs_spiking  # noqa: F401
from neuroinit.experiments.plot_select import (  # noqa: F401
    _fmt_val,
    load_for_plot,
    rule_of,
)

__all__ = [
    "FIGURES",
    "curvature_of_run",
    "load_for_plot",
    "plot_compare",
    "plot_curvature",
    "plot_figure",
    "plot_flossing",
    "plot_learning_curves",
    "plot_lyapunov",
    "plot_rate_vs_spiking",
]

FIGURES = ("learning-curves", "lyapunov", "flossing", "rate-vs-spiking", "curvature", "alignment")


# ------------------------------------------------------------------------------------------ entry points

def plot_figure(sweep_dir, figure: str, out, *, task: str | None = None, model: str | None = None,
                gains: Iterable[float] | None = None, spec: str | None = None, max_iter: int = 100,
                smooth: int = 1, progress=None, select: str = "final") -> int:
    """Draw ``figure`` (one of :data:`FIGURES`) from the runs in ``sweep_dir`` into ``out``; returns the
    number of curves drawn. ``smooth``: learning curves as a trailing mean over this many logged losses (each
    seed's curve, before the mean over seeds). ``select``: how each condition's learning rate is chosen
    (:data:`~neuroinit.experiments.sweep.SELECT`)."""
    from neuroinit.experiments.sweep import SELECT

    if figure not in FIGURES:
        raise ValueError(f"Invalid figure {figure!r}: allowed {', '.join(FIGURES)}")
    if select not in SELECT:
        raise ValueError(f"Invalid select {select!r}: allowed {', '.join(SELECT)}")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"Invalid smooth {smooth!r}: an integer >= 1 (1 = raw logged losses)")
    if figure == "rate-vs-spiking" and model is not None:
        raise ValueError("Invalid --model with the rate-vs-spiking figure: it shows both models")
    if figure == "alignment":  # from a 'neuroinit alignment --out FILE.json' document, not a sweep directory
        from neuroinit.experiments.alignment_plot import plot_alignment

        return plot_alignment(sweep_dir, out, model=model, gains=gains)
    runs = load_for_plot(sweep_dir, task=task, model=model, gains=gains, spec=spec)
    if figure == "learning-curves":
        return plot_learning_curves(runs, out, smooth=smooth, select=select)
    if figure == "lyapunov":
        return plot_lyapunov(runs, out, select=select)
    if figure == "flossing":
        return plot_flossing(runs, out, smooth=smooth, select=select)
    if figure == "rate-vs-spiking":
        return plot_rate_vs_spiking(runs, out, smooth=smooth, select=select)
    return plot_curvature(runs, out, sweep_dir=sweep_dir, max_iter=max_iter, progress=progress, select=select)


def plot_compare(run_a, run_b, out) -> int:
    """Two run files side by side: learning curves (every learning rate; the selected one solid) and the top
    Lyapunov exponents before (dashed) and after (solid) training. The title lists the settings that differ."""
    from neuroinit.io.runfile import read_run

    files = [read_run(run_a), read_run(run_b)]
    names = [f"A: {Path(run_a).name}", f"B: {Path(run_b).name}"]
    diff = sorted(k for k in set(files[0].config) | set(files[1].config)
                  if k not in ("checkpoint_every", "checkpoint_seconds")
                  and files[0].config.get(k) != files[1].config.get(k))
    fig, axes = _figure(2, ncols=2, size=(5.2, 3.8))
    n = 0
    colors = ("#1b6ca8", "#d1495b")
    for rf, name, color in zip(files, names, colors):
        for k, rec in enumerate(rf.runs):
            if not rec.loss:
                continue
            sel = k == rf.selected_run or len(rf.runs) == 1
            axes[0].plot(rec.iteration, rec.loss, color=color, lw=1.5 if sel else 0.8, alpha=1.0 if sel else 0.45,
                         ls="-" if sel else ":", label=f"{name.split(':')[0]} lr {rec.lr:.2g}"
                         + (" (selected)" if sel and len(rf.runs) > 1 else ""))
            n += 1
        for which, ls in (("initial", "--"), ("final", "-")):
            res = rf.lyapunov.get(which)
            if res is None or "mean" not in res:
                continue
            spec = np.asarray(res["mean"], dtype=np.float64)
            axes[1].plot(np.arange(1, len(spec) + 1), spec, color=color, ls=ls, marker="o", ms=3,
                         label=f"{name.split(':')[0]} {'before' if which == 'initial' else 'after'} training")
            n += 1
    _loss_axes(axes[0])
    axes[0].legend(fontsize=7)
    axes[0].set_title("learning curves", fontsize=10)
    axes[1].axhline(0.0, color="k", lw=0.6, alpha=0.5)
    axes[1].set_xlabel("exponent index")
    axes[1].set_ylabel("Lyapunov exponent (per step)")
    axes[1].set_title("Lyapunov spectrum", fontsize=10)
    axes[1].grid(True, alpha=0.3)
    if axes[1].lines[1:]:
        axes[1].legend(fontsize=7)
    if n == 0:
        raise ValueError(f"{run_a}, {run_b}: neither run has a learning curve or Lyapunov exponents yet")
    what = ", ".join(f"{k}: {_fmt_val(files[0].config.get(k))} vs {_fmt_val(files[1].config.get(k))}"
                     for k in diff[:6]) or "same config"
    figstyle.suptitle(fig, f"{names[0]}  vs  {names[1]}\n{what}\n"
                           + figstyle.scale_text([f.config for f in files], bands=False))
    _save(fig, out)
    return n
