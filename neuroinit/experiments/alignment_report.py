"""Alignment reports: the gradient alignment of :mod:`neuroinit.dynamics.alignment` measured on networks built
exactly as ``neuroinit train`` builds them (fresh or from run files), averaged over seeds, written as a JSON
document (docs/alignment.md) and printed as a table (``neuroinit alignment``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from neuroinit.cells.base import PARAM_NAMES, RecurrentCell
from neuroinit.dynamics.alignment import ALIGN_RULES, NetworkAlignment, network_alignment

__all__ = [
    "FORMAT_VERSION",
    "KIND",
    "condition_summary",
    "format_table",
    "fresh_alignment",
    "fresh_report",
    "read_report",
    "run_alignment",
    "runs_report",
    "summarise",
    "write_report",
]

KIND = "neuroinit-alignment"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ networks from training

def _context(config):
    """Training's own setup (task, init, cell, generators, rule) for ``config``: the network and batches
    ``neuroinit train`` would start from."""
    from neuroinit.experiments.train_setup import _Context

    return _Context(config)


def _align_with_context(ctx, cell: RecurrentCell, batches: int, truncation: int | None) -> NetworkAlignment:
    from neuroinit.experiments.train_setup import _generator

    gens = ctx.generators()
    rule = ctx.make_rule(cell, gens)
    gen = _generator(ctx.config.seed, "batch")
    data = [ctx.batch(ctx.config.batch, gen) for _ in range(batches)]
    return network_alignment(cell, rule, ctx.task, data, truncation=truncation)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name} {value!r}: must be an integer >= 1")
    return value


def fresh_alignment(*, model: str, rule: str, gain: float, seed: int = 0, batches: int = 4,
                    truncation: int | None = None, dtype: str = "float64", **config) -> dict:
    """Alignment of a freshly initialised network, built exactly as ``neuroinit train`` builds it
    (:class:`~neuroinit.experiments.train.TrainConfig` fields in ``config``: task, hidden, batch, profile, form,
    alpha via dt_ms / tau_ms, ...); batches from training's batch stream of ``seed``, the rule's random feedback
    from its rule stream. Returns ``{"seed", "used_gain", "cell", "settings", **NetworkAlignment.to_dict()}``."""
    from neuroinit.experiments.train import TrainConfig

    if rule not in ALIGN_RULES:
        raise ValueError(f"Invalid rule {rule!r}: allowed {', '.join(ALIGN_RULES)} (local rules compared with bptt)")
    _check_count("batches", batches)
    cfg = TrainConfig(model=model, rule=rule, gain=gain, seed=seed, dtype=dtype, fast=False, lyapunov=False,
                      lyapunov_k=1, **config)
    ctx = _context(cfg)
    params, report = ctx.init_params()
    cell = ctx.make_cell(params)
    res = _align_with_context(ctx, cell, batches, truncation)
    return {"seed": seed, "used_gain": float(report.used_gain), "cell": cell.config(),
            "settings": dict(ctx.settings), **res.to_dict()}


def run_alignment(path, *, which: str = "final", rule: str | None = None, batches: int = 4,
                  truncation: int | None = None, dtype: str = "float64") -> dict:
    """Alignment of the network stored in run file ``path`` (``which``: initial | floss | final), on the run's
    task and batch size, with the run's rule (or ``rule``: a local rule, required when the run used BPTT).
    Returns what :func:`fresh_alignment` returns plus ``run``, ``which``, ``model``, ``rule``, ``gain``."""
    from neuroinit.experiments.train import TrainConfig
    from neuroinit.io.runfile import load_cell, read_run

    rf = read_run(path)
    cfg = TrainConfig.from_dict(rf.config)
    rule = rule or cfg.rule
    if rule not in ALIGN_RULES:
        raise ValueError(f"Invalid rule {rule!r} for {path}: the run used {cfg.rule!r}; give a local rule to "
                         f"compare with bptt ({', '.join(ALIGN_RULES)})")
    _check_count("batches", batches)
    # the stored cell keeps its own form; the config's form is pinned so that changing the rule changes nothing else
    # (only cells with a form, e.g. rate, have it in their settings: RecurrentCell.derived_settings)
    form = rf.settings.get("form")
    cfg = dataclasses.replace(cfg, rule=rule, dtype=dtype, fast=False, lyapunov=False, lr_grid=(),
                              lr=None, form=form)
    ctx = _context(cfg)
    cell = load_cell(path, which, dtype=ctx.dtype, device=ctx.device)
    res = _align_with_context(ctx, cell, batches, truncation)
    return {"run": str(path), "which": which, "model": cfg.model, "rule": rule, "gain": float(cfg.gain),
            "seed": cfg.seed, "used_gain": float(rf.init_report.get("used_gain", cfg.gain)),
            "cell": cell.config(), "settings": dict(ctx.settings), **res.to_dict()}


# ------------------------------------------------------------------------------------------ summaries

def _finite(xs: Sequence[float]) -> np.ndarray:
    a = np.asarray(xs, dtype=np.float64)
    return a[np.isfinite(a)]


def _mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    a = _finite(xs)
    if a.size == 0:
        return None, None
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarise(per_seed: Sequence[dict], key: str) -> dict[str, dict]:
    """Per parameter: ``mean`` (over seeds of each seed's mean over batches), ``std_seeds`` (std over seeds of
    those means, ddof 1; 0 with one seed), ``std_batches`` (mean over seeds of each seed's std over batches),
    ``n_seeds``, ``n_batches`` (finite values only)."""
    out = {}
    for n in PARAM_NAMES:
        means, stds, counts = [], [], []
        for s in per_seed:
            m, sd = _mean_std(s[key][n])
            if m is not None:
                means.append(m)
                stds.append(sd)
                counts.append(_finite(s[key][n]).size)
        mean, std_seeds = _mean_std(means)
        out[n] = {"mean": mean, "std_seeds": std_seeds,
                  "std_batches": float(np.mean(stds)) if stds else None,
                  "n_seeds": len(means), "n_batches": int(sum(counts))}
    return out


def condition_summary(per_seed: Sequence[dict]) -> dict:
    """``{"cosine": summarise(..., "cosine"), "rel_error": summarise(..., "rel_error")}``."""
    return {"cosine": summarise(per_seed, "cosine"), "rel_error": summarise(per_seed, "rel_error")}


# ------------------------------------------------------------------------------------------ reports (docs/alignment.md)

def _condition(key: dict, per_seed: list[dict]) -> dict:
    return {**key, "per_seed": per_seed, "summary": condition_summary(per_seed)}


def _header(source: str, setup: dict) -> dict:
    from datetime import UTC, datetime

    from neuroinit.io.runfile import package_versions

    return {"kind": KIND, "format_version": FORMAT_VERSION, "source": source, "setup": setup,
            "created": datetime.now(UTC).isoformat(timespec="seconds"), "versions": package_versions()}


def fresh_report(pairs: Sequence[tuple[str, str]], gains: Sequence[float], seeds: Sequence[int], *,
                 batches: int = 4, truncation: int | None = None, dtype: str = "float64", progress=None,
                 **config) -> dict:
    """The alignment document (schema: ``docs/alignment.md``) of fresh networks: every ``(model, rule)`` pair
    x gain x seed, ``batches`` batches each; ``config``: further TrainConfig fields (task, hidden, batch,
    profile, dt_ms, ...). ``progress(done, total)`` after each network."""
    if not pairs or not gains or not seeds:
        raise ValueError("Invalid alignment request: give at least one (model, rule) pair, gain and seed")
    total, done = len(pairs) * len(gains) * len(seeds), 0
    conditions = []
    for model, rule in pairs:
        for gain in gains:
            per_seed = []
            for seed in seeds:
                per_seed.append(fresh_alignment(model=model, rule=rule, gain=gain, seed=seed, batches=batches,
                                                truncation=truncation, dtype=dtype, **config))
                done += 1
                if progress is not None:
                    progress(done, total)
            s = per_seed[0]["settings"]
            conditions.append(_condition({"model": model, "rule": rule, "gain": float(gain), "form": s.get("form"),
                                          "settings": s, "cell": per_seed[0]["cell"]}, per_seed))
    from neuroinit.experiments.train import TrainConfig

    base = TrainConfig(lyapunov_k=1, **config)
    setup = {"task": base.task, "hidden": base.hidden, "batch": base.batch, "profile": base.profile,
             "batches": batches, "seeds": list(seeds), "gains": [float(g) for g in gains],
             "pairs": [list(p) for p in pairs], "dtype": dtype, "reference": "bptt", "truncation": truncation,
             "config": {k: v for k, v in config.items()}}
    return {**_header("fresh", setup), "conditions": conditions}


def runs_report(paths: Sequence, *, which: str = "final", rule: str | None = None, batches: int = 4,
                truncation: int | None = None, dtype: str = "float64", progress=None) -> dict:
    """The alignment document of stored networks; run files with the same model, rule, gain (and ``which``)
    form one condition, their seeds its replicates."""
    from neuroinit.io.runfile import read_run

    if not paths:
        raise ValueError("Invalid alignment request: give at least one run file")
    groups: dict[tuple, list[dict]] = {}
    tasks, hidden, batch_sizes = set(), set(), set()
    for i, p in enumerate(paths):
        r = run_alignment(p, which=which, rule=rule, batches=batches, truncation=truncation, dtype=dtype)
        groups.setdefault((r["model"], r["rule"], r["gain"]), []).append(r)
        c = read_run(p).config
        tasks.add(c.get("task"))
        hidden.add(c.get("hidden"))
        batch_sizes.add(c.get("batch"))
        if progress is not None:
            progress(i + 1, len(paths))
    conditions = [_condition({"model": m, "rule": ru, "gain": g, "form": rs[0]["settings"].get("form"),
                              "which": which, "settings": rs[0]["settings"], "cell": rs[0]["cell"]}, rs)
                  for (m, ru, g), rs in sorted(groups.items())]

    def one(xs):
        return next(iter(xs)) if len(xs) == 1 else sorted(xs, key=str)

    setup = {"task": one(tasks), "hidden": one(hidden), "batch": one(batch_sizes), "batches": batches,
             "which": which, "runs": [str(p) for p in paths], "dtype": dtype, "reference": "bptt",
             "truncation": truncation, "seeds": sorted({r["seed"] for rs in groups.values() for r in rs})}
    return {**_header("runs", setup), "conditions": conditions}


def write_report(path, doc: dict) -> None:
    """Write the document as JSON (non-finite numbers as null), atomically."""
    import json

    from neuroinit._util import json_safe
    from neuroinit.io.atomic import atomic_write_path

    with atomic_write_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(doc), indent=1, sort_keys=True) + "\n")


def read_report(path) -> dict:
    """Read an alignment document; ``ValueError`` naming the file when it is not one."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such alignment file (write one with 'neuroinit alignment ... --out FILE.json')")
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not an alignment file: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ValueError(f"{p}: not an alignment file: kind is not {KIND!r} (write one with 'neuroinit alignment')")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p}: alignment format_version {doc.get('format_version')!r}; this neuroinit reads "
                         f"{FORMAT_VERSION}")
    return doc


def format_table(doc: dict, params: Sequence[str] = ("w_in", "w_rec", "bias", "w_out")) -> str:
    """One row per condition: cosine per parameter (mean +- std over seeds) and the relative error of W_rec."""
    def cell(s):
        if s["mean"] is None:
            return "-"
        return f"{s['mean']:.3f}±{s['std_seeds']:.3f}"

    head = ["model", "rule", "gain"] + [f"cos {p}" for p in params] + ["relerr w_rec", "seeds"]
    rows = []
    for c in doc["conditions"]:
        s = c["summary"]
        rows.append([c["model"], c["rule"], f"{c['gain']:g}"] + [cell(s["cosine"][p]) for p in params]
                    + [cell(s["rel_error"]["w_rec"]), str(s["cosine"]["w_rec"]["n_seeds"])])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [head, *rows]]
    st = doc["setup"]
    lines.append(f"task {st['task']}, N = {st['hidden']}, batch {st['batch']}, {st['batches']} batches per network, "
                 f"{len(st['seeds'])} seed(s); mean ± std over seeds; reference: BPTT"
                 + (f" truncated every {st['truncation']} steps" if st.get("truncation") else ""))
    return "\n".join(lines)
