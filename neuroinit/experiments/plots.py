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

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from neuroinit.experiments import figstyle
from neuroinit.experiments.sweep import (
    FLOSS_SUFFIX,
    SELECT_TEXT,
    RunSummary,
    edge_mark,
    select_best,
    summaries_from_dir,
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
_RULE_ORDER = {"bptt": 0, "eprop": 1, "eprop+flossing": 2, "eprop-autograd": 3, "rflo": 4}
_IGNORE = {"seed", "lr", "lr_grid", "checkpoint_every", "checkpoint_seconds", "gain", "rule", "floss_iters",
           "floss_mode", "floss_k", "floss_lr", "floss_inter_every", "floss_inter_iters", "_rule"}
_MODEL_FIELDS = {"model", "dt_ms", "tau_ms", "tau_m_ms", "tau_out_ms",
                 "v_th", "reset", "n_refractory", "input_scale", "form",
                 "activation", "iters", "log_every"}
_RULE_COLORS = {"bptt": "#1b6ca8", "eprop": "#d1495b", "eprop+flossing": "#2e933c", "eprop-autograd": "#8e6c8a",
                "rflo": "#edae49"}
_CURVATURE_CACHE = "analysis/curvature.json"


# ------------------------------------------------------------------------------------------ data

def load_for_plot(sweep_dir, *, task: str | None = None, model: str | None = None,
                  gains: Iterable[float] | None = None, spec: str | None = None,
                  curves: bool = True) -> list[RunSummary]:
    """The sweep's runs (of every spec run into ``sweep_dir``, or of the one named ``spec``), filtered by task
    (a name or alias such as ``2af``), model and gains (numbers compared to 1e-9)."""
    runs = summaries_from_dir(sweep_dir, curves=curves, spec=spec)
    if not runs:
        raise ValueError(f"{sweep_dir}: no runs found (run 'neuroinit sweep SPEC --out {sweep_dir}' first)")
    out = [r for r in runs if r.config]
    if task is not None:
        from neuroinit.tasks import TASK_ALIASES

        want = TASK_ALIASES.get(task.lower(), task).lower()
        out = [r for r in out if str(r.config.get("task")).lower() == want]
    if model is not None:
        out = [r for r in out if r.config.get("model") == model]
    if gains is not None:
        gs = [float(g) for g in gains]
        out = [r for r in out if any(abs(float(r.config.get("gain", math.nan)) - g) < 1e-9 for g in gs)]
    if not any(r.status == "complete" for r in out):
        filt = ", ".join(f"{k} {v}" for k, v in (("task", task), ("model", model), ("gains", gains)) if v is not None)
        raise ValueError(f"{sweep_dir}: no finished runs" + (f" matching {filt}" if filt else "")
                         + " (is the sweep done? 'neuroinit sweep' resumes it)")
    return out


class _Rate(float):
    """A chosen learning rate that remembers whether it is at an edge of its grid (for legends)."""

    edge: str | None = None


def _rate(lr: float, edge: str | None) -> _Rate:
    r = _Rate(lr)
    r.edge = edge
    return r


def _lr_text(lr: float) -> str:
    """``"lr 0.0002"``, plus the grid-edge mark of a :class:`_Rate` at an end of its grid."""
    return f"lr {lr:.2g}" + edge_mark(getattr(lr, "edge", None))


def _best_runs(runs: list[RunSummary], select: str = "final") -> list[tuple[dict, float, list[RunSummary]]]:
    """(config of the condition, chosen lr (a :class:`_Rate`), runs at that lr) per condition."""
    return _name_floss_variants([(b.runs[0].config, _rate(b.lr, b.edge), list(b.runs))
                                 for b in select_best(runs, select).values()])


def _varying(configs: list[dict], ignore: set[str]) -> list[str]:
    keys = set().union(*configs) - ignore if configs else set()
    return sorted(k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1)


def _extras(configs: list[dict], explicit: list[str], ignore: set[str]) -> list[str]:
    """Settings (beyond ``explicit``) that differ between conditions sharing the explicit fields: they go into
    the panel key and title, so two such conditions never share a curve."""
    groups: dict[tuple, list[dict]] = {}
    for c in configs:
        c = {**c, "rule": rule_of(c)}
        groups.setdefault(_panel_key(c, explicit), []).append(c)
    out: set[str] = set()
    for group in groups.values():
        out |= set(_varying(group, ignore | set(explicit)))
    return sorted(out)


def _panels_by_network(best: list[tuple]) -> tuple[list[str], dict[tuple, list], list[tuple]]:
    """Group ``(config, lr, runs)`` conditions into one panel per task, model, profile (and any other setting
    that varies): the panel fields, the panels, and their keys in display order."""
    fields = ["task", "model", "profile"]
    fields += _extras([c for c, _, _ in best], fields, _IGNORE)
    panels: dict[tuple, list] = {}
    for t in best:
        panels.setdefault(_panel_key(t[0], fields), []).append(t)
    return fields, panels, sorted(panels, key=_panel_order)


def _panel_key(config: dict, fields: Iterable[str]) -> tuple:
    return tuple((f, json.dumps(config.get(f), sort_keys=True)) for f in fields)


_MODEL_ORDER = {"rate": 0, "lif": 1}


def _panel_order(key: tuple) -> tuple:
    """Panels in reading order: rate before LIF, rules as BPTT, e-prop, e-prop+flossing, others."""
    out = []
    for f, v in key:
        try:
            val = json.loads(v)
        except (TypeError, ValueError):
            val = v
        if f == "model":
            out.append((_MODEL_ORDER.get(val, 9), str(val)))
        elif f in ("rule", "base_rule"):
            out.append((_RULE_ORDER.get(val, 9), str(val)))
        else:
            out.append((0, v))
    return tuple(out)


def _fmt_val(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _title(config: dict, fields: Iterable[str], show: Iterable[str]) -> str:
    parts = []
    for f in fields:
        v = rule_of(config) if f == "rule" else config.get(f)
        if f == "profile" and v == "ideal":
            continue
        parts.append(_fmt_val(v) if f in show else f"{f}={_fmt_val(v)}")
    return " · ".join(parts)


def rule_of(config: dict) -> str:
    """The rule's name in figures: ``rule_label`` (e.g. "eprop+flossing"), with the flossing settings that vary
    between the figure's flossing conditions when :func:`_best_runs` found some (e.g. "eprop+flossing (k 32)")."""
    from neuroinit.experiments.sweep import rule_label

    return config.get("_rule") or rule_label(config)


_FLOSS_FIELDS = {"floss_k": "k", "floss_iters": "iters", "floss_mode": "mode", "floss_lr": "lr",
                 "floss_inter_every": "every", "floss_inter_iters": "inter iters"}


def _name_floss_variants(best: list[tuple]) -> list[tuple]:
    """Where flossing conditions differ in their flossing settings (k, iterations, ...), put those settings into
    their rule names (``_rule``), so they get their own curves and legend entries instead of sharing one."""
    from neuroinit.experiments.sweep import rule_label

    flossed = [c for c, _, _ in best if rule_label(c).endswith(FLOSS_SUFFIX)]
    varying = [f for f in _FLOSS_FIELDS if len({json.dumps(c.get(f)) for c in flossed}) > 1]
    if not varying:
        return best
    out = []
    for c, lr, rs in best:
        name = rule_label(c)
        if name.endswith(FLOSS_SUFFIX):
            c = {**c, "_rule": f"{name} ({', '.join(f'{_FLOSS_FIELDS[f]} {_fmt_val(c.get(f))}' for f in varying)})"}
        out.append((c, lr, rs))
    return out


def _mean_band(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    n = min(len(a) for a in arrays)
    m = np.stack([np.asarray(a[:n], dtype=np.float64) for a in arrays])
    mean = m.mean(axis=0)
    sem = m.std(axis=0, ddof=1) / math.sqrt(len(arrays)) if len(arrays) > 1 else np.zeros_like(mean)
    return mean, sem


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    """Trailing moving average over ``k`` logged points (the first point stays the initial loss)."""
    if k <= 1 or len(y) == 0:
        return y
    c = np.cumsum(np.insert(np.asarray(y, dtype=np.float64), 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - k, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _curve(runs: list[RunSummary], smooth: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    have = [r for r in runs if r.iteration is not None and r.loss is not None and len(r.loss)]
    if not have:
        return None
    n = min(len(r.loss) for r in have)
    mean, sem = _mean_band([_smooth(r.loss[:n], smooth) for r in have])
    return have[0].iteration[:n], mean, sem


_STAT_LABEL = {"final": "final loss (mean of last 20 logged)", "min": "lowest logged loss",
               "learning-time": "learning time (iterations; never = all)"}


def _stat_of(r: RunSummary, select: str) -> float | None:
    """A run's value of the ``select`` statistic (learning time: never settled counts as its iterations)."""
    if select == "final":
        return r.final_loss
    if select == "min":
        return r.min_loss
    return float(r.learned_at) if r.learned_at is not None else float(r.config.get("iters", math.nan))


def _stat(values: list[float | None]) -> tuple[float, float]:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan
    return float(np.mean(xs)), (float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0)


# ------------------------------------------------------------------------------------------ drawing

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


# ------------------------------------------------------------------------------------------ figures

def plot_learning_curves(runs: list[RunSummary], out, *, smooth: int = 1, select: str = "final") -> int:
    """Fig. 1/2: learning curves by initial gain, one panel per task x model x rule."""
    best = _best_runs(runs, select)
    if not best:
        raise ValueError("no finished runs to plot")
    fields = ["task", "model", "rule", "profile"]
    fields += _extras([c for c, _, _ in best], fields, _IGNORE)
    panels: dict[tuple, list] = {}
    for c, lr, rs in best:
        panels.setdefault(_panel_key({**c, "rule": rule_of(c)}, fields), []).append((c, lr, rs))
    keys = sorted(panels, key=_panel_order)
    colors = _gain_colors(float(c["gain"]) for c, _, _ in best)
    fig, axes = _figure(len(keys), ncols=min(len(keys), max(1, len({k[2] for k in keys}))))
    n = 0
    for ax, key in zip(axes, keys):
        items = sorted(panels[key], key=lambda t: t[0]["gain"])
        for c, lr, rs in items:
            cur = _curve(rs, smooth)
            if cur is None:
                continue
            _band(ax, *cur, colors[float(c["gain"])], label=f"g = {c['gain']:g} ({_lr_text(lr)})", lw=1.4)
            n += 1
        c0 = items[0][0]
        figstyle.set_title(ax, _title(c0, fields, {"task", "model", "rule"}), fontsize=10)
        _loss_axes(ax)
        ax.legend(fontsize=7, title="initial gain", title_fontsize=7)
    _suptitle(fig, runs, "Learning curves by initial gain", smooth, select)
    _save(fig, out)
    return n


def plot_lyapunov(runs: list[RunSummary], out, *, per: str = "step", select: str = "final") -> int:
    """Fig. 3: max Lyapunov exponent vs gain, before training and after training (per rule)."""
    key_name = "max_per_step" if per == "step" else "max_per_tau"
    best = [(c, lr, [r for r in rs if r.lyapunov]) for c, lr, rs in _best_runs(runs, select)]
    best = [t for t in best if t[2]]
    if not best:
        raise ValueError("no finished runs with Lyapunov exponents (train with lyapunov = true)")
    fields, panels, keys = _panels_by_network(best)
    fig, axes = _figure(len(keys), ncols=min(len(keys), 2), size=(5.2, 3.8))
    n = 0
    for ax, key in zip(axes, keys):
        items = panels[key]
        rules = sorted({rule_of(c) for c, _, _ in items}, key=lambda r: (_RULE_ORDER.get(r, 9), r))
        # before training: the initial networks (the same init for every rule at a gain and seed)
        before: dict[float, dict[int, float]] = {}
        for c, _, rs in items:
            for r in rs:
                v = r.lyapunov.get("initial", {}).get(key_name)
                if v is not None and math.isfinite(v):
                    before.setdefault(float(c["gain"]), {})[int(r.config["seed"])] = v
        curves = [("before training", "#555555", "--", "o",
                   {g: list(d.values()) for g, d in before.items()})]
        for rule in rules:
            if FLOSS_SUFFIX in rule:
                fl = {float(c["gain"]): [r.lyapunov.get("floss", {}).get(key_name) for r in rs]
                      for c, _, rs in items if rule_of(c) == rule}
                label = f"after flossing ({rule.replace(FLOSS_SUFFIX, '', 1)})"
                curves.append((label, _RULE_COLORS.get(rule, None), ":", "^", fl))
        for rule in rules:
            after = {float(c["gain"]): [r.lyapunov.get("final", {}).get(key_name) for r in rs]
                     for c, _, rs in items if rule_of(c) == rule}
            curves.append((f"after training: {rule}", _RULE_COLORS.get(rule, None), "-", "s", after))
        for label, color, ls, marker, data in curves:
            gs = sorted(g for g in data if math.isfinite(_stat(data[g])[0]))
            if not gs:
                continue
            st = [_stat(data[g]) for g in gs]
            m, e = np.array([s[0] for s in st]), np.array([s[1] for s in st])
            ax.errorbar(gs, m, yerr=e, label=label, color=color, ls=ls, marker=marker, ms=4, capsize=2, lw=1.4)
            n += 1
        ax.axhline(0.0, color="k", lw=0.6, alpha=0.5)
        ax.set_xlabel("initial gain g")
        ax.set_ylabel(f"max Lyapunov exponent (per {per})")
        figstyle.set_title(ax, _title(items[0][0], fields, {"task", "model"}), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _suptitle(fig, runs, "Max Lyapunov exponent before and after training", select=select)
    _save(fig, out)
    return n


def plot_flossing(runs: list[RunSummary], out, *, smooth: int = 1, select: str = "final") -> int:
    """Fig. 4: rule X with vs without flossing, by gain (learning curves per gain, then the ``select`` statistic
    vs gain)."""
    best = _best_runs(runs, select)
    flossed = [t for t in best if FLOSS_SUFFIX in rule_of(t[0])]
    if not flossed:
        raise ValueError("no finished runs with a '+flossing' rule: the flossing figure compares rule X with "
                         "X+flossing (add e.g. rule = ['eprop', 'eprop+flossing'] to the spec)")
    fields = ["task", "model", "profile"]
    fields += _extras([c for c, _, _ in best], fields, _IGNORE)
    pairs: dict[tuple, dict[float, dict[str, tuple]]] = {}
    for c, lr, rs in best:
        rule = rule_of(c)
        plain = rule.split(FLOSS_SUFFIX)[0]
        key = _panel_key(c, fields) + (("base_rule", plain),)
        pairs.setdefault(key, {}).setdefault(float(c["gain"]), {})[rule] = (c, lr, rs)
    # keep the groups that have both X and some X+flossing at a gain
    groups = {k: {g: d for g, d in v.items() if dict(k)["base_rule"] in d and len(d) >= 2}
              for k, v in pairs.items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        raise ValueError("no gain has finished runs of both X and X+flossing with otherwise equal settings")
    n_panels = sum(len(v) + 1 for v in groups.values())
    fig, axes = _figure(n_panels, ncols=min(4, n_panels), size=(3.6, 3.0))
    n = 0
    it = iter(axes)
    for key in sorted(groups, key=_panel_order):
        by_gain = groups[key]
        plain = dict(key)["base_rule"]
        variants = sorted({r for d in by_gain.values() for r in d} - {plain})
        rules = (plain, *variants)
        colors = {plain: _RULE_COLORS.get(plain, None)}
        if len(variants) == 1:
            colors[variants[0]] = _RULE_COLORS.get(plain + FLOSS_SUFFIX, None)
        else:
            from matplotlib import colormaps

            colors.update({v: colormaps["viridis"](0.15 + 0.7 * i / (len(variants) - 1))
                           for i, v in enumerate(variants)})
        summary = {r: {} for r in rules}
        for g in sorted(by_gain):
            ax = next(it)
            for r in rules:
                if r not in by_gain[g]:
                    continue
                c, lr, rs = by_gain[g][r]
                cur = _curve(rs, smooth)
                if cur is not None:
                    _band(ax, *cur, colors[r], label=f"{r} ({_lr_text(lr)})", lw=1.4)
                    n += 1
                summary[r][g] = [_stat_of(x, select) for x in rs]
            first = by_gain[g][plain][0]
            figstyle.set_title(ax, _title(first, fields, {"task", "model"}) + f" · g = {g:g}", fontsize=9)
            _loss_axes(ax)
            ax.legend(fontsize=7)
        ax = next(it)
        for r in rules:
            gs = sorted(summary[r])
            st = [_stat(summary[r][g]) for g in gs]
            ax.errorbar(gs, [s[0] for s in st], yerr=[s[1] for s in st], label=r, color=colors[r],
                        marker="o", ms=4, capsize=2, lw=1.4)
            n += 1
        if select != "learning-time":
            ax.set_yscale("log")
        ax.set_xlabel("initial gain g")
        ax.set_ylabel(_STAT_LABEL[select], fontsize=8)
        figstyle.set_title(ax, f"{_STAT_LABEL[select]} vs gain", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    iters = sorted({int(t[0].get("floss_iters", 0)) for t in flossed})
    inter = sorted({(int(t[0].get("floss_inter_every", 0) or 0), int(t[0].get("floss_inter_iters", 0) or 0))
                    for t in flossed} - {(0, 0)})
    _suptitle(fig, runs, f"Pre-flossing ({'/'.join(map(str, iters))} iterations, "
                         f"{'/'.join(sorted({str(t[0].get('floss_mode')) for t in flossed}))}"
                         + "".join(f"; {i} every {e}" for e, i in inter) + ") vs none", smooth, select)
    _save(fig, out)
    return n


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


# ------------------------------------------------------------------------------------------ curvature

def curvature_of_run(path: str, config: dict, final_loss: float | None, *, max_iter: int = 100,
                     tol: float = 1e-6, test_trials: int = 256) -> dict:
    """Top Hessian eigenvalue (w.r.t. W_rec, float64, untruncated, ``config.batch`` held-out trials) of the
    trained network in ``path``, and the generalisation gap: loss on ``test_trials`` fresh trials minus the run's
    final training loss. Trials are drawn from ``SeedSequence([seed, 1004])`` (not a stream training uses), at
    the run's time step and input scale."""
    import torch

    from neuroinit.dynamics import batch_loss, top_hessian_eigenvalue
    from neuroinit.io.runfile import load_cell, read_run

    rf = read_run(path)
    task, scale = rf.make_task(), rf.input_scale
    cell = load_cell(path, "final", dtype=torch.float64)
    seed = int(np.random.SeedSequence([int(config["seed"]), 1004]).generate_state(1, np.uint64)[0])
    gen = torch.Generator().manual_seed(seed)

    def draw(n):
        b = task.batch(n, generator=gen, dtype=torch.float64)
        return b if scale == 1.0 else b._replace(inputs=b.inputs * scale)

    held_out = draw(int(config.get("batch", 32)))
    res = top_hessian_eigenvalue(cell, held_out, task, max_iter=max_iter, tol=tol, generator=gen)
    test_loss = batch_loss(cell, draw(test_trials), task)
    gap = test_loss - final_loss if final_loss is not None and math.isfinite(final_loss) else math.nan
    return {"top_eigenvalue": res.top_eigenvalue, "iterations": res.iterations, "converged": res.converged,
            "test_loss": test_loss, "train_loss": final_loss, "gap": gap, "max_iter": max_iter,
            "held_out_trials": int(config.get("batch", 32)), "test_trials": test_trials}


def _curvature_cache(sweep_dir) -> tuple[Path | None, dict]:
    root = Path(sweep_dir)
    if not root.is_dir():
        return None, {}
    p = root / _CURVATURE_CACHE
    try:
        return p, json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return p, {}


def _write_cache(p: Path | None, data: dict) -> None:
    if p is None:
        return
    from neuroinit.io.atomic import atomic_write_path

    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(p) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=float))
    except OSError:
        pass


def plot_curvature(runs: list[RunSummary], out, *, sweep_dir=None, max_iter: int = 100, progress=None,
                   select: str = "final") -> int:
    """Top Hessian eigenvalue and generalisation gap vs gain, one curve per rule (seed 004's measure)."""
    best = _best_runs(runs, select)
    if not best:
        raise ValueError("no finished runs to plot")
    cache_path, cache = _curvature_cache(sweep_dir) if sweep_dir is not None else (None, {})
    todo = [r for _, _, rs in best for r in rs]
    values: dict[str, dict] = {}
    for i, r in enumerate(todo):
        key = f"{r.run_id}:{max_iter}"
        if key not in cache:
            cache[key] = curvature_of_run(r.path, r.config, r.final_loss, max_iter=max_iter)
            _write_cache(cache_path, cache)
        values[r.run_id] = cache[key]
        if progress is not None:
            progress(i + 1, len(todo))
    fields, panels, keys = _panels_by_network(best)
    fig, axes = _figure(2 * len(keys), ncols=2, size=(4.8, 3.5))
    n = 0
    for row, key in enumerate(keys):
        items = panels[key]
        rules = sorted({rule_of(c) for c, _, _ in items}, key=lambda r: (_RULE_ORDER.get(r, 9), r))
        for col, (what, label, log) in enumerate((("top_eigenvalue", "top Hessian eigenvalue (W_rec)", True),
                                                  ("gap", "generalisation gap (test - train loss)", False))):
            ax = axes[2 * row + col]
            for rule in rules:
                data = {float(c["gain"]): [values[r.run_id][what] for r in rs] for c, _, rs in items
                        if rule_of(c) == rule}
                gs = sorted(g for g in data if math.isfinite(_stat(data[g])[0]))
                if not gs:
                    continue
                st = [_stat(data[g]) for g in gs]
                ax.errorbar(gs, [s[0] for s in st], yerr=[s[1] for s in st], label=rule, marker="o", ms=4, capsize=2,
                            color=_RULE_COLORS.get(rule, None), lw=1.4)
                n += 1
            if log and all(v["top_eigenvalue"] > 0 for v in values.values()):
                ax.set_yscale("log")
            if not log:
                ax.axhline(0.0, color="k", lw=0.6, alpha=0.5)
            ax.set_xlabel("initial gain g")
            ax.set_ylabel(label, fontsize=9)
            figstyle.set_title(ax, _title(items[0][0], fields, {"task", "model"}), fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    _suptitle(fig, runs, f"Curvature of the trained networks (power iteration, <= {max_iter} HVPs)", select=select)
    _save(fig, out)
    return n


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

