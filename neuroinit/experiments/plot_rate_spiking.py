"""The rate-vs-spiking figure: the controlled comparison of rate and LIF networks."""

from __future__ import annotations

import json

from neuroinit.experiments import figstyle
from neuroinit.experiments.plot_draw import _RULE_COLORS, _band, _figure, _loss_axes, _save, _suptitle
from neuroinit.experiments.plot_select import (
    _IGNORE,
    _MODEL_FIELDS,
    _MODEL_ORDER,
    _RULE_ORDER,
    _best_runs,
    _extras,
    _lr_text,
    _mean_band,
    _panel_key,
    _smooth,
    _title,
    rule_of,
)
from neuroinit.experiments.sweep import RunSummary


def _curve_of(runs: list[RunSummary], what: str, smooth: int = 1):
    """Mean and s.e.m. over seeds of the logged ``what`` ("loss" or "accuracy") curve."""
    have = [r for r in runs if r.iteration is not None and getattr(r, what) is not None and len(getattr(r, what))]
    if not have:
        return None
    n = min(len(getattr(r, what)) for r in have)
    mean, sem = _mean_band([_smooth(getattr(r, what)[:n], smooth) for r in have])
    return have[0].iteration[:n], mean, sem


def _model_label(config: dict, memories: set[float]) -> str:
    """"rate", or "LIF" with its eligibility memory when the LIF conditions do not all share one."""
    from neuroinit.experiments.comparison import eligibility_memory

    if config.get("model") == "rate":
        return "rate"
    if len(memories) <= 1:
        return "LIF"
    unit = "task tau" if str(config.get("task")).lower() == "romo" else "ms"
    return f"LIF (tau_m {eligibility_memory(config):g} {unit})"


def plot_rate_vs_spiking(runs: list[RunSummary], out, *, smooth: int = 1, select: str = "final") -> int:
    """The controlled rate-vs-LIF comparison (module docstring): a row per gain with a loss and an accuracy panel,
    one curve per model x rule (colour: rule, BPTT the reference; line: model), learning rates in the legend, the
    x axis cut to the iterations every curve has; what differs between the models is stated in the title."""
    from neuroinit.experiments.comparison import compare_models, eligibility_memory

    best = _best_runs(runs, select)
    models = {c.get("model") for c, _, _ in best}
    if not {"rate", "lif"} <= models:
        raise ValueError(f"the rate-vs-spiking figure needs finished runs of both models; found {sorted(models)}")
    tasks = sorted({str(c.get("task")) for c, _, _ in best})
    if len(tasks) > 1:
        raise ValueError(f"the rate-vs-spiking figure compares one task; found {tasks} (use --task)")
    mismatches = compare_models([r.config for _, _, rs in best for r in rs])
    memories = {eligibility_memory(c) for c, _, _ in best if c.get("model") == "lif"}
    fields = ["gain", "profile"]
    fields += _extras([c for c, _, _ in best], fields + ["model", "rule"], _IGNORE | _MODEL_FIELDS)
    panels: dict[tuple, list] = {}
    for t in best:
        panels.setdefault(_panel_key(t[0], fields), []).append(t)
    keys = sorted(panels, key=lambda k: (json.loads(dict(k)["gain"]), k))
    ends = [int(cur[0][-1]) for _, _, rs in best if (cur := _curve_of(rs, "loss")) is not None]
    if not ends:
        raise ValueError("no finished runs with learning curves to plot")
    common = min(ends)
    fig, axes = _figure(2 * len(keys), ncols=2, size=(5.0, 3.6))
    styles = {"rate": "-", "lif": "--"}
    n = 0
    for row, key in enumerate(keys):
        items = sorted(panels[key], key=lambda t: (_MODEL_ORDER.get(t[0].get("model"), 9),
                                                   eligibility_memory(t[0]), _RULE_ORDER.get(rule_of(t[0]), 9)))
        for col, what in enumerate(("loss", "accuracy")):
            ax = axes[2 * row + col]
            for c, lr, rs in items:
                cur = _curve_of(rs, what, smooth)
                if cur is None:
                    continue
                x, m, e = cur
                keep = x <= common
                rule = rule_of(c)
                ls = styles.get(c.get("model"), "-")
                if c.get("model") == "lif" and len(memories) > 1 and eligibility_memory(c) == min(memories):
                    ls = ":"
                _band(ax, x[keep], m[keep], e[keep], _RULE_COLORS.get(rule, None), ls=ls, lw=1.4,
                      label=f"{_model_label(c, memories)} {rule} ({_lr_text(lr)})")
                n += what == "loss"
            ax.set_xlim(0, common)
            ax.set_xlabel("iteration")
            if what == "loss":
                _loss_axes(ax)
            else:
                ax.set_ylabel("training accuracy")
                ax.grid(True, which="major", alpha=0.3)
            c0 = items[0][0]
            figstyle.set_title(ax, f"{c0.get('task')} · {what} · " + _title(c0, fields, set()), fontsize=9)
            ax.legend(fontsize=6.5)
    if mismatches:
        stated = "Differs between the models: " + "; ".join(m.text() for m in mismatches)
    else:
        stated = "Matched: iterations, seeds, batch, task timing, learning-rate grid, eligibility memory"
    if tasks[0].lower() == "romo" and mismatches:
        stated += " (timing and eligibility memory in task tau)"
    if len(memories) > 1:
        stated += "; dotted: LIF with its eligibility memory matched to the rate net's"
    _suptitle(fig, runs, "Rate vs spiking (LIF) networks: loss and accuracy, BPTT as each model's reference",
              smooth, select, extra=stated)
    _save(fig, out)
    return n
