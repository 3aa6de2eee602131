"""Loading and selecting a sweep's runs for figures: filters, best learning rates, panels, titles, statistics."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np

from neuroinit.experiments.sweep import (
    FLOSS_SUFFIX,
    RunSummary,
    edge_mark,
    select_best,
    summaries_from_dir,
)

_RULE_ORDER = {"bptt": 0, "eprop": 1, "eprop+flossing": 2, "eprop-autograd": 3, "rflo": 4}
_IGNORE = {"seed", "lr", "lr_grid", "checkpoint_every", "checkpoint_seconds", "gain", "rule", "floss_iters",
           "floss_mode", "floss_k", "floss_lr", "floss_inter_every", "floss_inter_iters", "_rule"}
_MODEL_FIELDS = {"model", "dt_ms", "tau_ms", "tau_m_ms", "tau_out_ms",
                 "v_th", "reset", "n_refractory", "input_scale", "form",
                 "activation", "iters", "log_every"}


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
