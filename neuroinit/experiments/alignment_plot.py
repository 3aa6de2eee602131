"""The ``alignment`` figure: cosine similarity and relative error of a local rule's gradient vs BPTT's, vs gain.

Drawn from a ``neuroinit alignment --out FILE.json`` document (:mod:`neuroinit.dynamics.alignment`,
``docs/alignment.md``): one panel per measure (cosine, relative error) and parameter (``W_in``, ``W_rec`` by
default), one curve per model x rule (colour: rule; solid: rate, dashed: LIF), the mean over seeds with a band
of +- one standard error of the mean over seeds; the scale (task, N, batch, batches, seeds) in the title.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from neuroinit.experiments.plot_draw import _RULE_COLORS, _band, _figure, _save

__all__ = ["alignment_figure", "plot_alignment"]

_LABELS = {"w_in": "W_in", "w_rec": "W_rec", "bias": "bias", "w_out": "W_out", "b_out": "b_out"}
# colour per model x rule (rate: the rule's colour used by the other figures; LIF: its own, with square markers)
_LIF_COLORS = {"eprop": "#6a4c93", "rflo": "#8a5a00", "eprop-autograd": "#3d5a80"}
_MEASURES = {"cosine": "cosine similarity with BPTT", "rel_error": "relative error ||g - g_BPTT|| / ||g_BPTT||"}


def _curves(doc: dict, model: str | None, gains: Iterable[float] | None) -> dict[tuple[str, str], list[dict]]:
    keep = None if gains is None else {float(g) for g in gains}
    out: dict[tuple[str, str], list[dict]] = {}
    for c in doc["conditions"]:
        if (model is not None and c["model"] != model) or (keep is not None and float(c["gain"]) not in keep):
            continue
        out.setdefault((c["model"], c["rule"]), []).append(c)
    for conds in out.values():
        conds.sort(key=lambda c: float(c["gain"]))
    return out


def alignment_figure(doc: dict, *, params: Sequence[str] = ("w_in", "w_rec"), model: str | None = None,
                     gains: Iterable[float] | None = None):
    """The figure (a matplotlib ``Figure``) and the number of curves drawn."""
    for p in params:
        if p not in _LABELS:
            raise ValueError(f"Invalid parameter {p!r}: allowed {', '.join(_LABELS)}")
    curves = _curves(doc, model, gains)
    if not curves:
        raise ValueError("Invalid alignment figure: no conditions left to draw (check --model / --gains)")
    fig, axes = _figure(2 * len(params), ncols=len(params), size=(4.6, 3.4))
    all_gains = sorted({float(c["gain"]) for conds in curves.values() for c in conds})
    n = 0
    for row, measure in enumerate(("cosine", "rel_error")):
        for col, p in enumerate(params):
            ax = axes[row * len(params) + col]
            for (m, rule), conds in sorted(curves.items(), key=lambda kv: (kv[0][0] != "rate", kv[0][1])):
                xs, ys, sems = [], [], []
                for c in conds:
                    s = c["summary"][measure][p]
                    if s["mean"] is None:
                        continue
                    xs.append(float(c["gain"]))
                    ys.append(s["mean"])
                    sems.append((s["std_seeds"] or 0.0) / math.sqrt(max(s["n_seeds"], 1)))
                if not xs:
                    continue
                color = _RULE_COLORS.get(rule, "#555555") if m == "rate" else _LIF_COLORS.get(rule, "#333333")
                _band(ax, np.asarray(xs), np.asarray(ys), np.asarray(sems), color, ls="-" if m == "rate" else "--",
                      marker="o" if m == "rate" else "s", ms=3.5, lw=1.6, label=f"{m} {rule}")
                n += 1
            ref = 1.0 if measure == "cosine" else 0.0
            ax.axhline(ref, color="k", lw=0.6, alpha=0.5)
            if measure == "cosine":
                ax.axhline(0.0, color="k", lw=0.4, alpha=0.3, ls=":")
            ax.set_xticks(all_gains)
            ax.set_xticklabels([f"{g:g}" for g in all_gains], fontsize=8)
            ax.set_xlabel("initial gain g")
            ax.set_ylabel("cosine" if measure == "cosine" else "relative error")
            ax.set_title(f"{_LABELS[p]}: {_MEASURES[measure]}", fontsize=9)
            ax.grid(True, alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    st = doc["setup"]
    where = "at initialisation" if doc.get("source") == "fresh" else f"of stored networks ({st.get('which')})"
    seeds = len(st.get("seeds", []))
    fig.suptitle(f"Local rule vs BPTT gradient {where}: task {st['task']}, N = {st['hidden']}, batch {st['batch']}, "
                 f"{st['batches']} batches x {seeds} seed{'s' if seeds != 1 else ''} per point\n"
                 "mean ± s.e.m. over seeds (each seed: mean over batches); reference: BPTT"
                 + (f" truncated every {st['truncation']} steps" if st.get("truncation") else ""), fontsize=9)
    return fig, n


def plot_alignment(source, out, *, model: str | None = None, gains: Iterable[float] | None = None,
                   params: Sequence[str] = ("w_in", "w_rec")) -> int:
    """Draw the figure from an alignment document (a dict or a ``.json`` path) into ``out``; returns the number
    of curves."""
    from neuroinit.experiments.alignment_report import read_report

    doc = source if isinstance(source, dict) else read_report(source)
    fig, n = alignment_figure(doc, params=params, model=model, gains=gains)
    _save(fig, out)
    return n
