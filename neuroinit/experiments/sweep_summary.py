"""Sweep results: run summaries, best learning-rate selection and summary tables (RunSummary, BestChoice)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neuroinit.experiments.sweep_ids import (
    RUNS_DIR,
    SELECT,
    SELECT_TEXT,
    _flosses,
    comparable_config,
    condition_key,
    rule_label,
    run_id,
)
from neuroinit.experiments.sweep_run import read_manifest

# ------------------------------------------------------------------------------------------ results

@dataclass
class RunSummary:
    """What the summary and the figures need of one run (from a run file, or the ledger)."""

    run_id: str
    path: str
    config: dict
    status: str
    lr: float
    final_loss: float | None = None
    learning_time: int | None = None      # Schuessler's: first iteration with loss < 5% of the initial (run file)
    min_loss: float | None = None         # lowest logged loss
    learned_at: int | None = None         # first logged iteration from which the loss stays < 5% of the initial
    lyapunov: dict[str, dict] = field(default_factory=dict)   # which -> {"max_per_step", "max_per_tau"}
    iteration: np.ndarray | None = None
    loss: np.ndarray | None = None
    accuracy: np.ndarray | None = None    # logged training-batch accuracy (with the curves)
    eval_accuracy: float | None = None
    wall_time: float | None = None
    error: str = ""

    @property
    def rule(self) -> str:
        return rule_label(self.config)

    @property
    def condition(self) -> str:
        return condition_key(self.config)


def summaries_from_dir(sweep_dir: str | os.PathLike, *, curves: bool = True, all_files: bool = False,
                       spec: str | None = None) -> list[RunSummary]:
    """Every run of the sweeps in ``sweep_dir`` (the runs of every spec the ledger lists, or of the spec named
    ``spec``; every ``*.h5`` there and in ``runs/`` when there is no ledger or ``all_files``), read from the run
    files; runs without a finished file come from the ledger (status pending / failed). A single ``.h5`` path
    works too."""
    from neuroinit.io.runfile import read_run

    root = Path(sweep_dir)
    if root.is_file():
        files, ledger = [root], {}
    elif not root.is_dir():
        raise ValueError(f"{root}: no such sweep directory")
    else:
        manifest = read_manifest(root)
        ledger = manifest.get("runs", {}) if not all_files else {}
        if manifest and not all_files:
            specs = manifest.get("specs", {})
            if spec is not None and spec not in specs:
                raise ValueError(f"{root}: no spec named {spec!r} was run here; have: {', '.join(sorted(specs))}")
            ids = dict.fromkeys(i for name, entry in specs.items() if spec is None or name == spec
                                for i in entry.get("runs", []))
            files = [root / ledger[i]["file"] for i in ids if i in ledger]
        else:
            files = sorted(set(root.glob("*.h5")) | set((root / RUNS_DIR).glob("*.h5")))
            ledger = {}
    out: list[RunSummary] = []
    by_file = {str(root / r["file"]): (i, r) for i, r in ledger.items()}
    for f in files:
        entry = by_file.get(str(f))
        if not f.exists():
            if entry is not None:
                rid, rec = entry
                out.append(RunSummary(rid, str(f), {}, rec.get("status", "pending"), float(rec.get("lr", math.nan)),
                                      error=rec.get("error", "")))
            continue
        try:
            rf = read_run(f)
        except ValueError as e:
            rid = entry[0] if entry else f.stem
            out.append(RunSummary(rid, str(f), {}, "failed", math.nan, error=str(e).splitlines()[0]))
            continue
        sel = rf.selected
        s = rf.summary
        lr = float(s.get("selected_lr", math.nan)) if s.get("selected_lr") is not None else math.nan
        if not math.isfinite(lr):
            lr = float(rf.runs[0].lr) if rf.runs else math.nan
        status = rf.status
        if status not in ("complete", "diverged"):
            status = entry[1].get("status", "pending") if entry and entry[1].get("status") == "failed" else "pending"
        lyap = {w: {"max_per_step": float(v.get("max_per_step", math.nan)),
                    "max_per_tau": float(v.get("max_per_tau", math.nan))} for w, v in rf.lyapunov.items()}
        rs = RunSummary(run_id=entry[0] if entry else run_id(rf.config), path=str(f), config=rf.config,
                        status=status, lr=lr, lyapunov=lyap, wall_time=s.get("wall_time"),
                        error=rf.message if status != "complete" else "")
        if status == "complete" and sel is not None:
            rs.final_loss = float(sel.final_loss)
            rs.learning_time = sel.learning_time
            rs.eval_accuracy = s.get("eval_accuracy")
            if sel.loss:
                rs.min_loss = float(np.min(sel.loss))
                rs.learned_at = learned_at(sel.iteration, sel.loss)
            if curves:
                rs.iteration = np.asarray(sel.iteration, dtype=np.int64)
                rs.loss = np.asarray(sel.loss, dtype=np.float64)
                rs.accuracy = np.asarray(sel.accuracy, dtype=np.float64)
        out.append(rs)
    return out


def learned_at(iteration, loss, fraction: float = 0.05) -> int | None:
    """Learning time for non-monotone curves: the first logged iteration from which every later logged loss stays
    below ``fraction`` of the first logged loss (iteration 0's, before any update); None if the last logged loss
    is not below it (the run never settled). Unlike Schuessler's learning time (the first iteration below the
    threshold, :func:`neuroinit.experiments.train.learning_time`) a curve that dips and comes back up does not
    count as learned at the dip."""
    its = np.asarray(iteration, dtype=np.int64)
    ys = np.asarray(loss, dtype=np.float64)
    if len(ys) == 0 or len(its) != len(ys):
        return None
    below = ys < fraction * ys[0]
    if not below[-1]:
        return None
    above = np.flatnonzero(~below)
    return int(its[above[-1] + 1]) if len(above) else int(its[0])


def _score(r: RunSummary, select: str) -> float | None:
    """The number a run contributes to its learning rate's rank (lower is better) under ``select``."""
    if select == "final":
        return r.final_loss
    if select == "min":
        return r.min_loss
    if r.learned_at is not None:
        return float(r.learned_at)
    return float(r.config.get("iters", math.inf))   # never settled: censored at the end of training


@dataclass(frozen=True)
class BestChoice:
    """The learning rate chosen for one condition, and its runs (one per seed)."""

    condition: str
    lr: float
    runs: tuple[RunSummary, ...]
    n_seeds: int                       # runs planned at that learning rate
    mean_final_loss: float
    per_lr: dict[float, tuple[int, int, float]]   # lr -> (finished, planned, mean score under ``select``)
    select: str = "final"
    edge: str | None = None            # "lowest" / "highest": the chosen rate is at that end of a grid of >= 2

    @property
    def mean_score(self) -> float:
        return self.per_lr[self.lr][2]


def _check_select(select: str) -> None:
    if select not in SELECT:
        raise ValueError(f"Invalid select {select!r}: allowed {', '.join(SELECT)}")


def select_best(runs: Iterable[RunSummary], select: str = "final") -> dict[str, BestChoice]:
    """Per condition, the learning rate with the lowest mean over seeds of the ``select`` score (:data:`SELECT`;
    default the final loss, the mean of the last 20 logged losses of each run); learning rates with more
    unfinished (diverged / failed / pending) seeds rank after those with fewer; ties go to the lower final loss.
    Conditions with no finished run are left out. ``edge`` flags a choice at the lowest or highest rate of the
    condition's grid."""
    _check_select(select)
    groups: dict[str, dict[float, list[RunSummary]]] = {}
    for r in runs:
        if not r.config:
            continue
        groups.setdefault(r.condition, {}).setdefault(float(r.lr), []).append(r)
    out = {}
    for cond, by_lr in groups.items():
        per_lr, final = {}, {}
        for lr, rs in by_lr.items():
            done = [r for r in rs if r.status == "complete" and r.final_loss is not None
                    and math.isfinite(r.final_loss)]
            scores = [v for v in (_score(r, select) for r in done) if v is not None and math.isfinite(v)]
            per_lr[lr] = (len(done), len(rs), float(np.mean(scores)) if scores else math.inf)
            final[lr] = float(np.mean([r.final_loss for r in done])) if done else math.inf
        ranked = sorted(per_lr, key=lambda lr: (per_lr[lr][1] - per_lr[lr][0], per_lr[lr][2], final[lr], lr))
        best = ranked[0]
        if per_lr[best][0] == 0:
            continue
        chosen = tuple(sorted((r for r in by_lr[best] if r.status == "complete" and r.final_loss is not None),
                              key=lambda r: r.config.get("seed", 0)))
        edge = None
        if len(per_lr) >= 2:
            edge = "lowest" if best == min(per_lr) else "highest" if best == max(per_lr) else None
        out[cond] = BestChoice(cond, best, chosen, per_lr[best][1], final[best], per_lr, select, edge)
    return out


def _mean_sem(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    m = float(np.mean(xs))
    return m, float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0


def summarize(runs: list[RunSummary], select: str = "final") -> list[dict]:
    """One row per condition: the learning rate chosen by ``select`` (:data:`SELECT`; ``edge`` says whether it is
    the lowest or highest of its grid) and, over its seeds, the final loss and the lowest logged loss (mean and
    s.e.m.), Schuessler's learning time (median over the seeds that learned; how many never did), the settled
    learning time of :func:`learned_at` (median; how many never settled) and the max Lyapunov exponent per step
    before and after training (mean)."""
    best = select_best(runs, select)
    status: dict[str, Counter] = {}
    for r in runs:
        if r.config:
            status.setdefault(r.condition, Counter())[r.status] += 1
    rows = []
    for cond, b in best.items():
        c = b.runs[0].config
        m, sem = _mean_sem([r.final_loss for r in b.runs])
        lts = [r.learning_time for r in b.runs if r.learning_time is not None]
        settled = [r.learned_at for r in b.runs if r.learned_at is not None]
        mn, mn_sem = _mean_sem([r.min_loss for r in b.runs])
        rows.append({
            "task": c.get("task"), "model": c.get("model"), "rule": rule_label(c), "gain": c.get("gain"),
            "profile": c.get("profile"), "best_lr": b.lr, "edge": b.edge, "select": select,
            "seeds": f"{len(b.runs)}/{b.n_seeds}", "iters": c.get("iters"), "hidden": c.get("hidden"),
            "floss_k": c.get("floss_k") if _flosses(c) else None,
            "final_loss": m, "final_loss_sem": sem, "min_loss": mn, "min_loss_sem": mn_sem,
            "learning_time_median": float(np.median(lts)) if lts else None, "never_learned": len(b.runs) - len(lts),
            "learned_at_median": float(np.median(settled)) if settled else None,
            "never_settled": len(b.runs) - len(settled),
            "lyapunov_before": _mean_sem([r.lyapunov.get("initial", {}).get("max_per_step") for r in b.runs])[0],
            "lyapunov_after": _mean_sem([r.lyapunov.get("final", {}).get("max_per_step") for r in b.runs])[0],
            "per_lr": {f"{lr:.4g}": {"finished": k, "planned": n, f"mean_{select.replace('-', '_')}": v}
                       for lr, (k, n, v) in sorted(b.per_lr.items())},
            "status": dict(status.get(cond, {})),
            "_config": comparable_config(c),
        })
    # conditions that share task, model, rule, gain and profile: name the settings that tell them apart
    shown = ("task", "model", "rule", "gain", "profile")
    groups: dict[tuple, list[dict]] = {}
    for (cond, b), row in zip(best.items(), rows):
        groups.setdefault(tuple(str(row[k]) for k in shown), []).append(json.loads(cond))
    for row in rows:
        configs = groups[tuple(str(row[k]) for k in shown)]
        varying = sorted(k for k in set().union(*configs) if k not in shown and len(
            {json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1)
        row["variant"] = ", ".join(f"{k}={_fmt_value(row['_config'].get(k))}" for k in varying)
    for row in rows:
        del row["_config"]
    order = {"bptt": 0, "eprop": 1, "eprop+flossing": 2}
    rows.sort(key=lambda r: (str(r["task"]), str(r["model"]), str(r["profile"]), order.get(r["rule"], 9), r["rule"],
                             r["gain"]))
    return rows


def _fmt_value(v) -> str:
    return "default" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def edge_mark(edge: str | None) -> str:
    """The mark a chosen learning rate at an end of its grid gets in tables and legends."""
    return {"lowest": ", grid edge: lowest", "highest": ", grid edge: highest"}.get(edge or "", "")


def format_summary(rows: list[dict]) -> str:
    """The summary rows as a plain-text table, with a line saying how the learning rate was chosen; a rate at
    an edge of its grid is marked ``<`` (lowest) or ``>`` (highest)."""
    if not rows:
        return "no finished runs"
    select = rows[0].get("select", "final")
    header = ("task", "model", "rule", "gain", "best lr", "seeds", "final loss", "min loss", "learn time",
              "settled at", "lyap before", "lyap after")

    def f(x, spec=".3g"):
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

    cells = []
    for r in rows:
        lt = f(r["learning_time_median"], ".0f") + (f" ({r['never_learned']} never)" if r["never_learned"] else "")
        st = f(r.get("learned_at_median"), ".0f") + (f" ({r['never_settled']} never)"
                                                     if r.get("never_settled") else "")
        mark = {"lowest": " <", "highest": " >"}.get(r.get("edge") or "", "")
        cells.append((str(r["task"]), str(r["model"]) + ("" if r["profile"] == "ideal" else f"/{r['profile']}")
                      + (f" ({r['variant']})" if r.get("variant") else ""),
                      r["rule"], f(r["gain"], "g"), f(r["best_lr"], ".3g") + mark, r["seeds"],
                      f"{f(r['final_loss'], '.3g')} ± {f(r['final_loss_sem'], '.2g')}",
                      f"{f(r.get('min_loss'), '.3g')} ± {f(r.get('min_loss_sem'), '.2g')}", lt, st,
                      f(r["lyapunov_before"], "+.3f"), f(r["lyapunov_after"], "+.3f")))
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(c, widths)).rstrip() for c in [header, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"best lr per condition by {SELECT_TEXT.get(select, select)} over seeds (mean ± s.e.m.)"]
    if any(r.get("edge") for r in rows):
        notes.append("< / >: the chosen rate is the lowest / highest of its grid (widen the grid)")
    notes.append("learn time: first iteration with loss < 5% of the initial (median); settled at: first logged "
                 "iteration from which it stays below (median)")
    return "\n".join(lines + notes)
