"""Sweeps: a grid of training runs (task x model x rule x gain x seed x learning rate x profile) run in parallel,
locally or on a Dask cluster, resumable, with the best learning rate per condition chosen as the paper did.

A spec is a TOML file (``docs/experiments.md``; examples in ``examples/``)::

    name = "fig1-quick"
    description = "..."

    [base]                      # TrainConfig fields shared by every run (anything but the grid axes)
    hidden = 32
    iters = 300

    [flossing]                  # what a rule "X+flossing" adds: pre-flossing before training
    iters = 100                 # -> floss_iters (default 100, the paper's)
    mode = "local"              # -> floss_mode (default "local", the paper's)

    [grid]                      # every combination of the axes is one run ([[grid]] for several blocks)
    task = "romo"
    model = ["rate", "lif"]
    rule = ["bptt", "eprop", "eprop+flossing"]
    gain = [0.3, 1.0, 2.0]      # or {start = 0.0, stop = 3.0, step = 0.3} (stop included)
    seed = [0, 1]               # or {start = 0, count = 5}
    lr_scale = [0.5, 1.0, 2.0]  # multiples of the default rate (0.05 / N on Romo); or lr = [...] (absolute)
    profile = "ideal"
    base = {dt_ms = 5.0}        # optional, per block: overrides [base] for this block's runs
    match_eligibility = true    # optional, per block: LIF runs get tau_m = the rate net's tau in task units
                                # (their e-prop eligibility memory then equals the rate net's; comparison.py)

Every run is one :class:`~neuroinit.experiments.train.TrainConfig` with a single learning rate (the grid's
learning rates are separate runs, so they run in parallel), named by a hash of its content
(:func:`run_id`): the same config always maps to the same file ``DIR/runs/<label>_<id>.h5``, so runs shared by
two specs are trained once and a run's seed, not where it ran, fixes its result (one intra-op thread per run by
default: thread counts can change float reductions).

The whole spec is validated before any run starts (:class:`SpecError`, one line naming the file, the key and
what is allowed). ``DIR/sweep.json`` is the ledger (written atomically by the sweep process only): the text and
run ids of every spec run into ``DIR`` (by spec name: several specs may share a directory, and their common runs),
and per run its status (``complete``, ``diverged``, ``failed``, ``pending``), error and timings.
Whether a run is finished is decided from its run file's content (:func:`run_state`: the stored config equals
the planned one and the status is complete), never from the file's existence; a killed sweep loses no finished
run (run files are written atomically by :func:`~neuroinit.experiments.train.train`) and a rerun continues the
unfinished ones from their last checkpoint. A run that raises is recorded as ``failed`` with its error and
retried by the next invocation; one that diverges is a result (``diverged``; deterministic, not retried).

Executors: ``workers=0`` runs in this process; ``workers=N`` a local ``ProcessPoolExecutor`` (workers forked from
a fork server that imported torch once; they die with the sweep); ``scheduler="tcp://host:port"`` (or a ``distributed.Client``) an existing Dask
cluster. Workers that see ``DIR`` (a shared file system; checked with a token file) write their run files
there; others train into a temporary directory and send the file back to the sweep process, which writes it.
``ensemble=K`` makes up to K compatible runs one job, trained as one batched model
(:mod:`neuroinit.experiments.ensemble`), each into its own run file.

Best learning rate (the paper's choice, ``science.md`` 6.2): per condition (the config up to seed and learning
rate), the learning rate whose runs have the lowest mean over seeds of the final loss (the mean of the last 20
logged training losses); learning rates with fewer finished seeds (divergence, failure) rank after those with
more (:func:`select_best`). Other criteria for non-monotone curves (``select``, :data:`SELECT`): ``"min"`` the
lowest logged loss, ``"learning-time"`` the iteration from which the loss stays below 5% of its initial value
(:func:`learned_at`). A chosen rate at the lowest or highest rate of its condition's grid is flagged (the grid
may not contain the best rate): ``BestChoice.edge``, ``edge`` in the summary rows, marked in tables and figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
import time
import tomllib
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ADDED_FIELDS",
    "AXES",
    "FLOSS_SUFFIX",
    "MANIFEST",
    "RUNS_DIR",
    "SELECT",
    "STATUSES",
    "BestChoice",
    "PlannedRun",
    "RunSummary",
    "SpecError",
    "SweepError",
    "SweepEvent",
    "SweepReport",
    "SweepSpec",
    "comparable_config",
    "condition_key",
    "edge_mark",
    "execute_run",
    "format_summary",
    "learned_at",
    "load_spec",
    "parse_spec",
    "read_manifest",
    "rule_label",
    "run_id",
    "run_state",
    "run_sweep",
    "select_best",
    "summaries_from_dir",
    "summarize",
]

MANIFEST = "sweep.json"
RUNS_DIR = "runs"
TOKEN_FILE = ".sweep-token"
LOCK_FILE = ".sweep.lock"
MANIFEST_KIND = "neuroinit-sweep"
MANIFEST_VERSION = 1
FLOSS_SUFFIX = "+flossing"
STATUSES = ("pending", "complete", "diverged", "failed")
FINISHED = ("complete", "diverged")

SPEC_KEYS = ("name", "description", "base", "flossing", "grid")
AXES = ("task", "model", "rule", "gain", "seed", "profile", "lr", "lr_scale")
BLOCK_KEYS = AXES + ("base", "match_eligibility")
FLOSSING_KEYS = {"iters": "floss_iters", "mode": "floss_mode", "k": "floss_k", "lr": "floss_lr",
                 "inter_every": "floss_inter_every", "inter_iters": "floss_inter_iters"}
DEFAULT_FLOSSING = {"iters": 100, "mode": "local"}
# TrainConfig fields the grid (or [flossing]) sets; [base] may not.
_NOT_IN_BASE = {"task": "grid", "model": "grid", "rule": "grid", "gain": "grid", "seed": "grid",
                "profile": "grid", "lr": "grid", "lr_grid": "grid", "floss_iters": "flossing",
                "floss_mode": "flossing", "floss_k": "flossing", "floss_lr": "flossing",
                "floss_inter_every": "flossing", "floss_inter_iters": "flossing"}
# Config fields that do not change a run's result (train() lets them differ on resume): not in the run id.
_NOT_HASHED = ("checkpoint_every", "checkpoint_seconds")
# Run-id stability. TrainConfig fields added after the first sweeps (commit 6cbe674): left out of the run id (and
# of the comparison with a stored run file) while they hold their default, so runs made before a field existed
# keep their ids and files and are still found, resumed and summarised. One name per line (easy to merge).
ADDED_FIELDS = (
    "floss_inter_every",
    "floss_inter_iters",
    "io_init",
    "align_every",
    "chip_neuron",
    "tau_syn_ms",
)
# Fields whose default changed, with the default they had before: where the field has no effect on the run
# (floss_k when the run does not floss) the id uses that old value, so the ids of runs that never flossed do not
# change. (floss_k was 1 before "auto"; a flossing run that set k = 1 explicitly keeps its id, one that uses "auto"
# gets the id of its resolved k, e.g. k = 32 at N = 256.)
_FORMER_DEFAULTS = {"floss_k": 1}
# Fields that make two runs the same condition when they are all that differ.
_REPLICATE_FIELDS = ("seed", "lr", "lr_grid")
# How the learning rate of a condition is chosen (and what the summaries and figures report): the mean over seeds
# of each run's final loss (mean of the last 20 logged), of its lowest logged loss, or of its learning time.
SELECT = ("final", "min", "learning-time")
SELECT_TEXT = {"final": "mean of the last 20 logged losses", "min": "lowest logged loss",
               "learning-time": "learning time (first logged iteration from which the loss stays below 5% of "
                                "its initial value; never = the run's iterations)"}
_ATTEMPTS = 2          # a run whose worker process dies this often is recorded as failed
_LOCAL_STALE_S = 0.0   # temporary files older than this are removed at start (local executors)
_CLUSTER_STALE_S = 3600.0


class SpecError(ValueError):
    """A sweep spec that cannot be run: one line naming the file, the key and what is allowed."""


class SweepError(ValueError):
    """A sweep that cannot start (another sweep holds the directory, an unreachable scheduler, ...)."""


# ------------------------------------------------------------------------------------------ helpers

def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# TrainConfig fields added after run files and sweeps existed: left out of run ids, condition keys and stored-config
# comparisons while they hold their default, so existing runs keep their ids and stay complete.
def _canonical(config: dict) -> dict:
    """The config as stored in a run file (JSON round trip: tuples become lists)."""
    return json.loads(json.dumps(config, sort_keys=True))


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _flosses(config: dict) -> bool:
    return int(config.get("floss_iters", 0) or 0) > 0 or int(config.get("floss_inter_every", 0) or 0) > 0


def _field_default(name: str):
    from neuroinit.experiments.train import TrainConfig

    return TrainConfig.__dataclass_fields__[name].default


def comparable_config(config) -> dict:
    """``config`` (a TrainConfig or its dict, possibly from an older run file) as run ids and run-file checks
    compare it: JSON-canonical, without the fields that do not change the result (checkpoint frequency), without
    :data:`ADDED_FIELDS` that hold their default, and with ``floss_k`` at its former default 1 when the run does
    not floss (it has no effect there)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in _canonical(d).items() if k not in _NOT_HASHED}
    if d.get("floss_k") == "auto" and isinstance(d.get("hidden"), int):   # a raw dict: as TrainConfig stores it
        from neuroinit.dynamics.flossing import resolve_floss_k

        d["floss_k"] = resolve_floss_k("auto", d["hidden"])
    for name in ADDED_FIELDS:
        if name in d and d[name] == _field_default(name):
            del d[name]
    if not _flosses(d):
        for name, former in _FORMER_DEFAULTS.items():
            if name in d:
                d[name] = former
    return d


def run_id(config) -> str:
    """A 16-hex-digit id from the content of ``config`` (a TrainConfig or its dict): the hash of
    :func:`comparable_config` (stable across versions: see :data:`ADDED_FIELDS`)."""
    return hashlib.sha256(json.dumps(comparable_config(config), sort_keys=True).encode()).hexdigest()[:16]


def rule_label(config: dict) -> str:
    """``"eprop"``, or ``"eprop+flossing"`` when the run flosses (pre-flossing ``floss_iters > 0`` or
    inter-flossing ``floss_inter_every > 0``)."""
    rule = str(config.get("rule", "eprop"))
    return rule + FLOSS_SUFFIX if _flosses(config) else rule


def condition_key(config: dict) -> str:
    """Runs that differ only in seed and learning rate share a condition (this key)."""
    d = {k: v for k, v in comparable_config(config).items() if k not in _REPLICATE_FIELDS}
    return json.dumps(d, sort_keys=True)


def _effective_lr(config: dict) -> float:
    if config.get("lr") is not None:
        return float(config["lr"])
    from neuroinit.experiments.train import TrainConfig, resolve_settings

    return float(resolve_settings(TrainConfig.from_dict(config))["lr"])


def _matched_tau_m(config: dict) -> float:
    """The LIF membrane time constant (ms) whose eligibility memory equals the rate net's on the same task: the
    task's tau on Romo (the rate net's tau is Romo's time unit), the rate net's default tau on neurogym tasks."""
    from neuroinit.experiments.train import TrainConfig, resolve_settings

    s = resolve_settings(TrainConfig.from_dict(config))
    if str(config.get("task", "romo")).lower() == "romo":
        return float(s["tau_ms"])
    rate = {k: v for k, v in config.items() if k not in ("tau_m_ms", "tau_out_ms", "v_th", "reset", "n_refractory")}
    return float(resolve_settings(TrainConfig.from_dict({**rate, "model": "rate"}))["tau_ms"])


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._+-" else "-" for c in text)


# ------------------------------------------------------------------------------------------ the spec

@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its config, content id and file name (relative to the sweep directory)."""

    run_id: str
    config: Any                 # TrainConfig
    file: str                   # "runs/<label>_<id>.h5"
    lr_scale: float | None = None

    @property
    def rule(self) -> str:
        return rule_label(self.config.to_dict())

    def describe(self) -> str:
        c = self.config
        return (f"{c.task} {c.model} {self.rule} gain {c.gain:g} seed {c.seed} lr {_effective_lr(c.to_dict()):.3g}"
                + ("" if c.profile == "ideal" else f" profile {c.profile}"))


@dataclass(frozen=True)
class SweepSpec:
    name: str
    description: str
    path: str
    text: str
    runs: tuple[PlannedRun, ...]


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a spec file; every run's TrainConfig is built (and validated) here, so a bad spec
    fails before any run starts."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such spec file")
    try:
        text = p.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise SpecError(f"{p}: not a text file") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{p}: not valid TOML ({e})") from None
    return parse_spec(data, where=str(p), text=text, base_dir=p.parent)


def _fail(where: str, msg: str) -> SpecError:
    return SpecError(f"{where}: {msg}")


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _as_list(where: str, key: str, value, kind: str) -> list:
    vals = value if isinstance(value, list) else [value]
    if not vals:
        raise _fail(where, f"{key} is an empty list; give at least one value")
    for v in vals:
        ok = {"str": isinstance(v, str) and v != "", "num": _is_num(v),
              "int": isinstance(v, int) and not isinstance(v, bool)}[kind]
        if not ok:
            what = {"str": "non-empty strings", "num": "finite numbers", "int": "integers"}[kind]
            raise _fail(where, f"invalid {key} value {v!r}: allowed {what} (a value or a list)")
    if len(set(vals)) != len(vals):
        dup = sorted({v for v in vals if vals.count(v) > 1}, key=str)
        raise _fail(where, f"{key} repeats {dup}; give each value once")
    return vals


def _gains(where: str, value) -> list[float]:
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"start", "stop", "step"})
        missing = sorted({"start", "stop", "step"} - set(value))
        if unknown or missing:
            raise _fail(where, f"gain range {value!r}: needs exactly start, stop, step (stop included)")
        start, stop, step = value["start"], value["stop"], value["step"]
        if not all(_is_num(x) for x in (start, stop, step)) or step <= 0 or stop < start:
            raise _fail(where, f"gain range {value!r}: numbers with step > 0 and stop >= start")
        vals = [round(float(x), 10) for x in np.arange(start, stop + step / 2, step)]
        if len(vals) > 10000:
            raise _fail(where, f"gain range {value!r} has {len(vals)} values; at most 10000")
        return vals
    return [float(v) for v in _as_list(where, "gain", value, "num")]


def _seeds(where: str, value) -> list[int]:
    if isinstance(value, dict):
        if set(value) != {"start", "count"}:
            raise _fail(where, f"seed range {value!r}: needs exactly start and count")
        start, count = value["start"], value["count"]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, count)) or count < 1 or start < 0:
            raise _fail(where, f"seed range {value!r}: integers with start >= 0 and count >= 1")
        return list(range(start, start + count))
    return _as_list(where, "seed", value, "int")


def _resolve_profile(name: str, base_dir: Path | None) -> str:
    """A relative .toml profile path is taken relative to the spec file."""
    if base_dir is not None and name.endswith(".toml") and not os.path.isabs(name):
        cand = base_dir / name
        if cand.is_file():
            return str(cand.resolve())
    return name


def parse_spec(data: dict, *, where: str = "<spec>", text: str = "", base_dir: Path | None = None) -> SweepSpec:
    """Validate a parsed spec (see the module docstring) and expand it into planned runs."""
    from neuroinit.experiments.train import TrainConfig, resolve_settings
    from neuroinit.learning import RULES

    if not isinstance(data, dict):
        raise _fail(where, "a spec is a TOML table")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed top-level keys: {', '.join(SPEC_KEYS)}")
    name = data.get("name", Path(where).stem if where != "<spec>" else "sweep")
    if not isinstance(name, str) or not name:
        raise _fail(where, f"invalid name {name!r}: a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail(where, "invalid description: a string")
    fields = set(TrainConfig.__dataclass_fields__)

    def check_base(base, at: str) -> dict:
        if not isinstance(base, dict):
            raise _fail(where, f"{at} must be a table of TrainConfig fields")
        for key in base:
            if key in _NOT_IN_BASE:
                target = "[grid] (a value or a list)" if _NOT_IN_BASE[key] == "grid" else \
                    "[flossing] (rule 'X+flossing' turns it on)"
                raise _fail(where, f"{at}.{key}: {key!r} is set by {target}, not in {at}")
            if key not in fields:
                allowed = ", ".join(sorted(fields - set(_NOT_IN_BASE)))
                raise _fail(where, f"unknown key {at}.{key}; allowed TrainConfig fields: {allowed}")
        return dict(base)

    base = check_base(data.get("base", {}), "[base]")
    floss_raw = data.get("flossing", {})
    if not isinstance(floss_raw, dict):
        raise _fail(where, "[flossing] must be a table")
    unknown = sorted(set(floss_raw) - set(FLOSSING_KEYS))
    if unknown:
        raise _fail(where, f"unknown key(s) {['flossing.' + k for k in unknown]}; allowed: "
                           f"{', '.join('flossing.' + k for k in FLOSSING_KEYS)}")
    flossing = {FLOSSING_KEYS[k]: v for k, v in {**DEFAULT_FLOSSING, **floss_raw}.items()}
    if not isinstance(flossing["floss_iters"], int) or isinstance(flossing["floss_iters"], bool) \
            or flossing["floss_iters"] < 0:
        raise _fail(where, f"invalid flossing.iters {flossing['floss_iters']!r}: an integer >= 0")
    if flossing["floss_iters"] == 0 and not flossing.get("floss_inter_every"):
        raise _fail(where, "flossing.iters = 0 without inter-flossing (flossing.inter_every, inter_iters): "
                           "rule 'X+flossing' would not floss")

    grid = data.get("grid")
    if grid is None:
        raise _fail(where, "missing [grid]: at least one block of axes (" + ", ".join(AXES) + ")")
    blocks = grid if isinstance(grid, list) else [grid]
    if not blocks or not all(isinstance(b, dict) for b in blocks):
        raise _fail(where, "[grid] must be a table or an array of tables ([[grid]])")

    runs: dict[str, PlannedRun] = {}
    for bi, block in enumerate(blocks):
        at = "[grid]" if len(blocks) == 1 else f"[[grid]] #{bi + 1}"
        bwhere = f"{where}: {at}"
        unknown = sorted(set(block) - set(BLOCK_KEYS))
        if unknown:
            raise _fail(where, f"unknown key(s) {unknown} in {at}; allowed: {', '.join(BLOCK_KEYS)}")
        if "lr" in block and "lr_scale" in block:
            raise _fail(where, f"{at}: give lr or lr_scale, not both")
        bbase = {**base, **check_base(block.get("base", {}), f"{at}.base")}
        match = block.get("match_eligibility", False)
        if not isinstance(match, bool):
            raise _fail(where, f"{at}: invalid match_eligibility {match!r}: true or false")
        if match and "tau_m_ms" in bbase:
            raise _fail(where, f"{at}: match_eligibility sets tau_m_ms; do not set it in base too")
        tasks = _as_list(bwhere, "task", block.get("task", "romo"), "str")
        models = _as_list(bwhere, "model", block.get("model", "rate"), "str")
        rules = _as_list(bwhere, "rule", block.get("rule", "eprop"), "str")
        for r in rules:
            plain = r.removesuffix(FLOSS_SUFFIX)
            if plain not in RULES:
                allowed = ", ".join(list(RULES) + [x + FLOSS_SUFFIX for x in RULES])
                raise _fail(where, f"{at}: invalid rule {r!r}; allowed: {allowed}")
        profiles = [_resolve_profile(p, base_dir) for p in _as_list(bwhere, "profile",
                                                                    block.get("profile", "ideal"), "str")]
        gains = _gains(bwhere, block.get("gain", 1.0))
        seeds = _seeds(bwhere, block.get("seed", 0))
        lrs: list[float | None]
        scales: list[float | None]
        if "lr" in block:
            lrs, scales = [float(x) for x in _as_list(bwhere, "lr", block["lr"], "num")], [None]
        elif "lr_scale" in block:
            lrs, scales = [None], [float(x) for x in _as_list(bwhere, "lr_scale", block["lr_scale"], "num")]
        else:
            lrs, scales = [None], [None]
        for x in [v for v in lrs + scales if v is not None]:
            if x <= 0:
                raise _fail(where, f"{at}: invalid learning rate {x!r}: must be > 0")
        for task, model, rule, profile, gain, lr, scale, seed in product(tasks, models, rules, profiles, gains,
                                                                         lrs, scales, seeds):
            plain = rule.removesuffix(FLOSS_SUFFIX)
            d = {**bbase, "task": task, "model": model, "rule": plain, "profile": profile, "gain": gain,
                 "seed": seed}
            if rule.endswith(FLOSS_SUFFIX):
                d.update(flossing)
            label = f"{task} {model} {rule} gain {gain:g} seed {seed}"
            try:
                if match and model == "lif":
                    d["tau_m_ms"] = _matched_tau_m(d)
                if scale is not None:
                    default = resolve_settings(TrainConfig.from_dict(d))["lr"]
                    d["lr"] = float(f"{scale * default:.12g}")
                elif lr is not None:
                    d["lr"] = lr
                config = TrainConfig.from_dict(d)
            except (ValueError, TypeError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise _fail(where, f"{at}: run ({label}): {msg}") from None
            rid = run_id(config)
            if rid in runs:
                continue
            fname = _safe(f"{config.task}_{model}_{rule}_g{gain:g}_lr{_effective_lr(config.to_dict()):.3g}_s{seed}")
            runs[rid] = PlannedRun(rid, config, f"{RUNS_DIR}/{fname}_{rid}.h5", scale)
    return SweepSpec(name=name, description=description, path=where, text=text, runs=tuple(runs.values()))


# ------------------------------------------------------------------------------------------ run state

def run_state(path: str | os.PathLike, config) -> tuple[str, str]:
    """Whether the run file at ``path`` finished ``config``, judged from its content:
    ``("missing" | "complete" | "diverged" | "partial" | "mismatch" | "corrupt", detail)``.

    ``complete``: the stored config equals ``config`` (up to the checkpoint frequency) and the file says
    complete with final weights; ``diverged``: it stopped on a NaN/Inf loss (a result: rerunning gives the same);
    ``partial``: started, resumable from its checkpoint; ``mismatch``: another config; ``corrupt``: unreadable.
    """
    from neuroinit.io.runfile import read_run

    p = Path(path)
    if not p.exists():
        return "missing", ""
    try:
        rf = read_run(p)
    except ValueError as e:
        return "corrupt", str(e).splitlines()[0]
    want = comparable_config(config)
    have = comparable_config(rf.config)
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        return "mismatch", f"stored config differs in {diff}"
    if rf.status == "complete":
        if "final" not in rf.weights or rf.selected is None or rf.selected.status != "complete":
            return "partial", "marked complete without final weights"
        return "complete", ""
    if rf.status == "diverged":
        return "diverged", rf.message.splitlines()[0] if rf.message else "diverged"
    return "partial", rf.status


def _file_summary(path: Path) -> dict:
    from neuroinit.io.runfile import read_run

    rf = read_run(path)
    s = rf.summary
    out = {k: s.get(k) for k in ("final_loss", "initial_loss", "eval_loss", "eval_accuracy", "learning_time",
                                 "wall_time", "lyapunov_initial", "lyapunov_final")}
    if rf.status == "diverged":
        out["final_loss"] = None
    return out


# ------------------------------------------------------------------------------------------ one run (worker side)

def _is_shared(sweep_dir: Path, token: str) -> bool:
    try:
        return (sweep_dir / TOKEN_FILE).read_text().strip() == token
    except OSError:
        return False


def execute_run(payload: dict) -> dict:
    """Train one planned run (the function local and Dask workers call). ``payload``: ``config`` (dict),
    ``path`` (absolute run-file path in the sweep directory), ``token`` (the directory's token), ``threads``.

    Returns ``{"run_id", "status", "error", "traceback", "summary", "wall_time", "host", "file_bytes"}``;
    never raises for a failing run (the error is in the result). ``file_bytes`` carries the run file back when
    this worker does not see the sweep directory.
    """
    import platform

    if "ensemble" in payload:  # several runs trained as one batched model (neuroinit.experiments.ensemble)
        from neuroinit.experiments.ensemble import execute_ensemble

        return execute_ensemble(payload)
    t0 = time.monotonic()
    path = Path(payload["path"])
    result = {"run_id": payload.get("run_id", ""), "status": "failed", "error": "", "traceback": "",
              "summary": {}, "wall_time": 0.0, "host": platform.node(), "file_bytes": None}
    tmpdir = None
    try:
        import torch

        from neuroinit.experiments.train import TrainConfig, TrainingDiverged, train

        if payload.get("threads"):
            torch.set_num_threads(int(payload["threads"]))
        config = TrainConfig.from_dict(payload["config"])
        shared = _is_shared(path.parent.parent, payload.get("token", ""))
        if shared:
            target = path
        else:
            tmpdir = Path(tempfile.mkdtemp(prefix="neuroinit-run-"))
            target = tmpdir / path.name
        state, detail = run_state(target, config)
        if state in ("corrupt", "mismatch"):
            target.unlink()
        if state not in FINISHED:
            try:
                train(config, target, resume=True, start_if_missing=True)
                state = "complete"
            except TrainingDiverged as e:
                state, detail = "diverged", str(e).splitlines()[0]
        result["status"] = state
        result["error"] = detail if state == "diverged" else ""
        result["summary"] = _file_summary(target)
        if not shared:
            result["file_bytes"] = target.read_bytes()
    except Exception as e:  # noqa: BLE001  a failing run is recorded with its error; the others go on
        result["status"] = "failed"
        result["error"] = _one_line(e)
        result["traceback"] = "".join(traceback.format_exception(e)[-6:])[-4000:]
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        result["wall_time"] = time.monotonic() - t0
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process that nobody reaped yet is a zombie: gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _exit_with(pid: int) -> None:
    """End this worker process as soon as the sweep process ``pid`` is gone (killed with SIGKILL, say), so no
    worker trains on, orphaned, next to a resumed sweep. A daemon thread waits on a pidfd (Linux >= 5.3) or
    polls once a second."""
    import threading

    def watch() -> None:
        fd = None
        with contextlib.suppress(AttributeError, OSError):
            fd = os.pidfd_open(pid)
        if fd is not None:
            import select

            select.select([fd], [], [])
            os._exit(1)
        while _pid_alive(pid):
            time.sleep(1.0)
        os._exit(1)

    if not _pid_alive(pid):
        os._exit(1)
    threading.Thread(target=watch, name="neuroinit-sweep-watchdog", daemon=True).start()


def _init_worker(threads: int, sweep_pid: int) -> None:
    """Local pool workers: a thread budget each, and they end when the sweep process does."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _exit_with(sweep_pid)
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ the ledger

def read_manifest(sweep_dir: str | os.PathLike) -> dict:
    """The ledger ``DIR/sweep.json`` (``{}`` when there is none); ``ValueError`` when it is unreadable."""
    p = Path(sweep_dir) / MANIFEST
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a readable sweep ledger ({_one_line(e)})") from None
    if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND:
        raise ValueError(f"{p}: not a neuroinit sweep ledger (kind {data.get('kind') if isinstance(data, dict) else None!r})")
    return data


def _write_manifest(sweep_dir: Path, data: dict) -> None:
    from neuroinit.io.atomic import atomic_write_path

    data["updated"] = _now()
    with atomic_write_path(sweep_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=float), encoding="utf-8")


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a batch system's stop, ``kill``) stops the sweep as Ctrl-C does: running runs checkpoint, the
    ledger is written, ``KeyboardInterrupt`` propagates."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _lock(sweep_dir: Path):
    import fcntl

    with open(sweep_dir / LOCK_FILE, "a+") as fh:  # the lock goes with the file's closing (or the process)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"Another sweep is running in {sweep_dir} (it holds {sweep_dir / LOCK_FILE}); wait "
                             "for it or use another --out") from None
        yield


def _remove_stale_temps(runs_dir: Path, older_than: float) -> int:
    """Temporary files of atomic writes (run files, the ledger) that a killed process left behind."""
    now = time.time()
    n = 0
    for p in [*runs_dir.glob(".*.h5.*.tmp"), *runs_dir.parent.glob(f".{MANIFEST}.*.tmp")]:
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime >= older_than:
                p.unlink()
                n += 1
    return n


# ------------------------------------------------------------------------------------------ running a sweep

@dataclass(frozen=True)
class SweepEvent:
    """Reported after each run finishes (or is found finished): ``done`` of ``total``."""

    run_id: str
    status: str
    done: int
    total: int
    description: str
    error: str = ""


@dataclass
class SweepReport:
    sweep_dir: str
    name: str
    total: int
    skipped: int                # finished before this invocation (checked by content)
    ran: int
    counts: dict[str, int]
    wall_time: float
    executor: str
    failed: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"sweep_dir": self.sweep_dir, "name": self.name, "total": self.total, "skipped": self.skipped,
                "ran": self.ran, "counts": dict(self.counts), "wall_time": self.wall_time,
                "executor": self.executor, "failed": list(self.failed)}


def _record(run: PlannedRun) -> dict:
    c = run.config
    return {"id": run.run_id, "file": run.file, "task": c.task, "model": c.model, "rule": run.rule,
            "gain": c.gain, "seed": c.seed, "lr": _effective_lr(c.to_dict()), "lr_scale": run.lr_scale,
            "profile": c.profile, "condition": condition_key(c.to_dict()), "status": "pending", "error": "",
            "traceback": "", "attempts": 0, "wall_time": None, "host": "", "finished": "", "summary": {}}


def run_sweep(spec: SweepSpec | str | os.PathLike, sweep_dir: str | os.PathLike, *, workers: int | None = None,
              scheduler=None, threads: int = 1, progress: Callable[[SweepEvent], None] | None = None,
              on_start: Callable[[int, int], None] | None = None, connect_timeout: float = 30.0,
              ensemble: int = 0) -> SweepReport:
    """Run every planned run of ``spec`` not yet finished in ``sweep_dir`` (see the module docstring).

    ``workers``: local processes (default: the CPUs this process may use, divided by ``threads``; 0 runs in
    this process). ``scheduler``: a Dask scheduler address (``"tcp://host:port"``) or a ``distributed.Client``;
    then ``workers`` is ignored. ``threads``: torch intra-op threads per run. ``on_start(total, finished)`` is
    called once the finished runs are known; ``progress`` after each run. ``connect_timeout``: seconds to
    wait for the Dask scheduler. ``ensemble = K > 1``: compatible runs (same config up to seed, gain and learning
    rate; rate networks, see :mod:`neuroinit.experiments.ensemble`) train K at a time as one batched model, each
    into its own run file with the content it has when trained alone; the others train alone.
    """
    t0 = time.monotonic()
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise SweepError(f"Invalid threads {threads!r}: an integer >= 1")
    if not isinstance(ensemble, int) or isinstance(ensemble, bool) or ensemble < 0:
        raise SweepError(f"Invalid ensemble {ensemble!r}: an integer >= 0 (runs per batched model; 0 or 1: alone)")
    if workers is None:
        try:
            ncpu = len(os.sched_getaffinity(0))
        except AttributeError:
            ncpu = os.cpu_count() or 1
        workers = max(1, ncpu // threads)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise SweepError(f"Invalid workers {workers!r}: an integer >= 0 (0 runs in this process)")
    root = Path(sweep_dir).resolve()
    if root.exists() and not root.is_dir():
        raise SweepError(f"Invalid sweep directory {str(root)!r}: it is a file")
    (root / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    notify = progress or (lambda _e: None)
    with _lock(root), _sigterm_interrupts():
        token_path = root / TOKEN_FILE
        if not token_path.exists():
            with contextlib.suppress(FileExistsError), open(token_path, "x") as fh:
                fh.write(secrets.token_hex(16) + "\n")
        token = token_path.read_text().strip()
        _remove_stale_temps(root / RUNS_DIR, _CLUSTER_STALE_S if scheduler is not None else _LOCAL_STALE_S)
        try:
            manifest = read_manifest(root)
        except ValueError:
            manifest = {}  # rebuilt from the run files below
        old = manifest.get("runs", {}) if isinstance(manifest.get("runs"), dict) else {}
        records: dict[str, dict] = dict(old)
        pending: list[PlannedRun] = []
        skipped = 0
        for run in spec.runs:
            rec = {**_record(run), **{k: v for k, v in old.get(run.run_id, {}).items()
                                      if k in ("attempts", "host", "finished", "wall_time")}}
            state, detail = run_state(root / run.file, run.config)
            if state in FINISHED:
                rec["status"], rec["error"] = state, detail if state == "diverged" else ""
                rec["summary"] = _file_summary(root / run.file)
                skipped += 1
            else:
                prev = old.get(run.run_id, {})
                if prev.get("status") == "failed":  # keep the last error until the retry reports
                    rec["status"], rec["error"], rec["traceback"] = "failed", prev.get("error", ""), \
                        prev.get("traceback", "")
                pending.append(run)
            records[run.run_id] = rec
        specs = manifest.get("specs", {}) if isinstance(manifest.get("specs"), dict) else {}
        specs[spec.name] = {"path": spec.path, "description": spec.description, "text": spec.text,
                            "runs": [r.run_id for r in spec.runs], "updated": _now()}
        manifest = {"kind": MANIFEST_KIND, "format_version": MANIFEST_VERSION,
                    "created": manifest.get("created") or _now(), "specs": specs, "runs": records}
        _write_manifest(root, manifest)
        total = len(spec.runs)
        if on_start is not None:
            on_start(total, skipped)
        done = skipped
        counts: Counter = Counter()
        by_id = {r.run_id: r for r in spec.runs}

        from neuroinit.experiments.ensemble import ensemble_groups

        groups = {g[0].run_id: g for g in ensemble_groups(pending, ensemble)}
        heads = [by_id[h] for h in groups]

        def finish(run: PlannedRun, res: dict) -> None:
            """Record a job's result: one run's, or an ensemble's (per member; an executor's failure of the
            whole job applies to every member)."""
            members = groups.get(run.run_id, [run])
            for j, member in enumerate(members):
                one = res["ensemble"][j] if "ensemble" in res else {**res, "run_id": member.run_id}
                finish_one(member, one)

        def finish_one(run: PlannedRun, res: dict) -> None:
            nonlocal done
            rec = records[run.run_id]
            if res.get("file_bytes") is not None:
                from neuroinit.io.atomic import atomic_write_path

                try:
                    with atomic_write_path(root / run.file) as tmp:
                        tmp.write_bytes(res["file_bytes"])
                except OSError as e:
                    res = {**res, "status": "failed", "error": f"cannot write the returned run file: {_one_line(e)}"}
            rec.update(status=res["status"], error=res.get("error", ""), traceback=res.get("traceback", ""),
                       wall_time=res.get("wall_time"), host=res.get("host", ""), finished=_now(),
                       summary=res.get("summary", {}), attempts=int(rec.get("attempts", 0)) + 1)
            counts[res["status"]] += 1
            done += 1
            _write_manifest(root, manifest)
            notify(SweepEvent(run.run_id, res["status"], done, total, run.describe(), res.get("error", "")))

        executor = "in-process" if workers == 0 and scheduler is None else (
            "dask" if scheduler is not None else f"local pool ({workers} workers)")
        payload = {r.run_id: {"run_id": r.run_id, "config": r.config.to_dict(), "path": str(root / r.file),
                              "token": token, "threads": threads} for r in pending}
        for head, group in groups.items():
            if len(group) > 1:
                payload[head] = {"run_id": head, "threads": threads, "ensemble": [payload[r.run_id] for r in group]}
        try:
            if not heads:
                pass
            elif scheduler is not None:
                executor = _run_dask(heads, payload, scheduler, finish, connect_timeout)
            elif workers == 0:
                import torch

                old_threads = torch.get_num_threads()
                try:
                    for run in heads:
                        finish(run, execute_run({**payload[run.run_id], "threads": threads}))
                finally:
                    torch.set_num_threads(old_threads)
            else:
                _run_local(heads, payload, workers, threads, finish)
        finally:
            _write_manifest(root, manifest)
    failed = [{"id": r, "run": by_id[r].describe(), "error": records[r]["error"]} for r in by_id
              if records[r]["status"] == "failed"]
    final_counts = Counter(records[r]["status"] for r in by_id)
    return SweepReport(sweep_dir=str(root), name=spec.name, total=total, skipped=skipped, ran=sum(counts.values()),
                       counts=dict(final_counts), wall_time=time.monotonic() - t0, executor=executor, failed=failed)


def _pool_context():
    """Workers fork from a clean server process that imported torch and the training code once (fast worker
    start, no threads inherited from this process); where there is no fork server, spawn."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["neuroinit.experiments.sweep", "neuroinit.experiments.train"])
        return ctx
    return multiprocessing.get_context("spawn")


def _stop_workers(pool, timeout: float = 30.0) -> None:
    """SIGTERM every worker process (a training run writes a checkpoint at its next iteration and stops) and
    wait for them; the pool is broken afterwards."""
    import signal

    procs = list((getattr(pool, "_processes", None) or {}).values())  # no public handle on the pool's processes
    pool.shutdown(wait=False, cancel_futures=True)  # each worker exits after its current run
    for p in procs:
        with contextlib.suppress(Exception):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()


def _run_local(pending: list[PlannedRun], payload: dict, workers: int, threads: int, finish) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = _pool_context()
    queue = deque(pending)
    deaths: Counter = Counter()
    while queue:
        pool = ProcessPoolExecutor(max_workers=min(workers, len(queue)), mp_context=ctx, initializer=_init_worker,
                                   initargs=(threads, os.getpid()))
        inflight: dict = {}
        lost: list[PlannedRun] = []
        try:
            while queue or inflight:
                while queue and len(inflight) < workers:
                    run = queue.popleft()
                    inflight[pool.submit(execute_run, payload[run.run_id])] = run
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    run = inflight.pop(fut)
                    try:
                        res = fut.result()
                    except BrokenProcessPool:
                        lost.append(run)
                        continue
                    except Exception as e:  # noqa: BLE001  recorded as a failed run, the sweep goes on
                        res = {"run_id": run.run_id, "status": "failed", "error": _one_line(e), "traceback": "",
                               "summary": {}, "wall_time": None, "host": "", "file_bytes": None}
                    finish(run, res)
                if lost:
                    lost += list(inflight.values())
                    inflight.clear()
                    break
        except BaseException:  # Ctrl-C / SIGTERM: let the running runs checkpoint, then stop
            _stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=not lost, cancel_futures=True)
        for run in reversed(lost):
            deaths[run.run_id] += 1
            if deaths[run.run_id] >= _ATTEMPTS:
                finish(run, {"run_id": run.run_id, "status": "failed", "traceback": "", "summary": {},
                             "error": f"the worker process died {deaths[run.run_id]} times while this run was "
                                      "in flight (killed or out of memory?)", "wall_time": None, "host": "",
                             "file_bytes": None})
            else:
                queue.appendleft(run)


def _run_dask(pending: list[PlannedRun], payload: dict, scheduler, finish, connect_timeout: float) -> str:
    try:
        from distributed import Client, as_completed
    except ImportError:  # pragma: no cover - distributed is a dependency
        raise SweepError("--scheduler needs the 'distributed' package (pip install 'dask[distributed]')") from None
    own = not isinstance(scheduler, Client)
    if own:
        if not isinstance(scheduler, str) or not scheduler:
            raise SweepError(f"Invalid scheduler {scheduler!r}: an address such as tcp://127.0.0.1:8786")
        try:
            client = Client(scheduler, timeout=f"{connect_timeout}s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            raise SweepError(f"Cannot reach the Dask scheduler at {scheduler}: {_one_line(e)}") from None
    else:
        client = scheduler
    where = f"dask ({client.scheduler.address})"
    tag = secrets.token_hex(4)
    by_key = {}
    futures = []
    try:
        for run in pending:
            key = f"neuroinit-run-{run.run_id}-{tag}"
            fut = client.submit(execute_run, payload[run.run_id], key=key, pure=False)
            by_key[fut.key] = run
            futures.append(fut)
        for fut in as_completed(futures, loop=client.loop):
            run = by_key[fut.key]
            if fut.status == "error":
                exc = fut.exception()
                res = {"run_id": run.run_id, "status": "failed", "error": f"on the cluster: {_one_line(exc)}",
                       "traceback": "", "summary": {}, "wall_time": None, "host": "", "file_bytes": None}
            elif fut.status == "cancelled":
                res = {"run_id": run.run_id, "status": "failed", "error": "cancelled on the cluster",
                       "traceback": "", "summary": {}, "wall_time": None, "host": "", "file_bytes": None}
            else:
                res = fut.result()
            fut.release()
            finish(run, res)
    finally:
        for fut in futures:
            with contextlib.suppress(Exception):
                fut.cancel()
        if own:
            client.close()
    return where


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
