"""What makes two runs the same run: the comparable form of a training config and the run id hashed from it.

Run ids name run files and sweep entries, and a run file resumes only under a config that compares equal, so
this form must stay stable across versions: fields added later drop out while they hold their default
(:data:`ADDED_FIELDS`), and fields whose default changed keep their former value where they have no effect
(:data:`_FORMER_DEFAULTS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

__all__ = ["ADDED_FIELDS", "comparable_config", "run_id"]

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


def _canonical(config: dict) -> dict:
    """The config as stored in a run file (JSON round trip: tuples become lists)."""
    return json.loads(json.dumps(config, sort_keys=True))


def _flosses(config: dict) -> bool:
    return int(config.get("floss_iters", 0) or 0) > 0 or int(config.get("floss_inter_every", 0) or 0) > 0


def _field_default(name: str):
    from neuroinit.experiments.train_config import TrainConfig

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
