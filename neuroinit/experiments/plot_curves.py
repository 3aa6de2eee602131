"""The learning-curves (Fig. 1/2) and flossing (Fig. 4) figures."""

from __future__ import annotations

from neuroinit.experiments import figstyle
from neuroinit.experiments.plot_draw import (
    _RULE_COLORS,
    _band,
    _figure,
    _gain_colors,
    _loss_axes,
    _save,
    _suptitle,
)
from neuroinit.experiments.plot_select import (
    _IGNORE,
    _STAT_LABEL,
    _best_runs,
    _curve,
    _extras,
    _lr_text,
    _panel_key,
    _panel_order,
    _stat,
    _stat_of,
    _title,
    rule_of,
)
from neuroinit.experiments.sweep import FLOSS_SUFFIX, RunSummary


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
