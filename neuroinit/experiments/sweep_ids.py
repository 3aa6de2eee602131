"""Sweep constants, errors, run ids and condition keys (comparable_config, run_id, ADDED_FIELDS, PlannedRun)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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
    "cell_options",
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

    field = TrainConfig.__dataclass_fields__[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


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

