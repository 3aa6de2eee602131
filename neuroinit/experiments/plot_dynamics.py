"""The lyapunov (Fig. 3) and curvature figures, and the curvature measure of a trained run (cached)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from neuroinit.experiments import figstyle
from neuroinit.experiments.plot_draw import _RULE_COLORS, _figure, _save, _suptitle
from neuroinit.experiments.plot_select import (
    _RULE_ORDER,
    _best_runs,
    _panels_by_network,
    _stat,
    _title,
    rule_of,
)
from neuroinit.experiments.sweep import FLOSS_SUFFIX, RunSummary

_CURVATURE_CACHE = "analysis/curvature.json"


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
