"""Sweep constants, errors, run ids and condition keys (comparable_config, run_id, ADDED_FIELDS, PlannedRun)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from neuroinit.experiments.run_identity import (  # noqa: F401  (re-exported: sweep's names for run identity)
    ADDED_FIELDS,
    _flosses,
    comparable_config,
    run_id,
)

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

def rule_label(config: dict) -> str:
    """``"eprop"``, or ``"eprop+flossing"`` when the run flosses (pre-flossing ``floss_iters > 0`` or
    inter-flossing ``floss_inter_every > 0``)."""
    rule = str(config.get("rule", "eprop"))
    return rule + FLOSS_SUFFIX if _flosses(config) else rule


def condition_key(config: dict) -> str:
    """Runs that differ only in seed and learning rate share a condition (this key)."""
    d = {k: v for k, v in comparable_config(config).items() if k not in _REPLICATE_FIELDS}
    return json.dumps(d, sort_keys=True)


def _effective_lr(config) -> float:
    """The learning rate ``config`` (a TrainConfig, already validated) trains with: its own or the default."""
    if config.lr is not None:
        return float(config.lr)
    from neuroinit.experiments.train import resolve_settings

    return float(resolve_settings(config)["lr"])


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
        return (f"{c.task} {c.model} {self.rule} gain {c.gain:g} seed {c.seed} lr {_effective_lr(c):.3g}"
                + ("" if c.profile == "ideal" else f" profile {c.profile}"))

