"""A controlled rate-vs-spiking comparison: what differs between the rate and the LIF runs of a sweep.

:func:`compare_models` takes run configs (``TrainConfig`` dicts, from a spec's planned runs or from run files) and
reports, per quantity, the values each model uses:

* ``iterations`` (``iters``), ``seeds`` (the set of seeds), ``batch``;
* ``timing``: the task's time step in the task's own time unit (Romo: ``dt / tau`` of the task, i.e. steps per
  task tau; neurogym: ``dt`` in ms), which fixes every trial's layout in steps;
* ``lr grid``: the learning rates of each model (absolute; on Romo both models' default is 0.05 / N);
* ``eligibility memory``: the time constant of the decay of e-prop's eligibility trace, in the task's time unit.
  Rate net (voltage form): the presynaptic trace decays with ``1 - alpha = 1 - dt / tau``: memory tau = one task
  tau on Romo. LIF: ``zbar`` decays with ``exp(-dt / tau_m)``: memory ``tau_m`` (training's default on Romo is
  5 task taus). Matched when the LIF net's ``tau_m`` equals the task tau (spec block key
  ``match_eligibility = true``).

A comparison is controlled when iterations, seeds, batch, timing and learning-rate grid agree
(:func:`check_controlled` raises otherwise); the eligibility memory is reported (stated on the figure) and may
differ on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["CONTROLLED", "Mismatch", "check_controlled", "compare_models", "eligibility_memory", "task_timing"]

CONTROLLED = ("iterations", "seeds", "batch", "timing", "lr grid")   # must agree in a controlled comparison


class Mismatch(NamedTuple):
    """One quantity that differs between the models: ``values`` maps a model (``rate``, ``lif`` or a LIF variant
    such as ``lif (tau_m 1 task tau)``) to the sorted values its runs use."""

    what: str
    values: dict[str, tuple]

    def text(self) -> str:
        return f"{self.what}: " + ", ".join(f"{m} {'/'.join(_fmt(v) for v in vals)}"
                                           for m, vals in self.values.items())


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _settings(config: dict) -> dict:
    from neuroinit.experiments.train import TrainConfig, resolve_settings

    return resolve_settings(TrainConfig.from_dict(config))


def task_timing(config: dict) -> float:
    """The task's time step in its own time unit: ``dt / tau`` on Romo (fraction of a task tau), ``dt`` in ms on
    neurogym tasks."""
    s = _settings(config)
    return round(s["dt_tau"], 9) if str(config.get("task", "romo")).lower() == "romo" else s["dt_ms"]


def eligibility_memory(config: dict) -> float:
    """Decay time constant of e-prop's eligibility trace in the task's time unit (task taus on Romo, ms on
    neurogym): the rate net's ``tau``, the LIF net's ``tau_m`` (module docstring)."""
    s = _settings(config)
    romo = str(config.get("task", "romo")).lower() == "romo"
    if config.get("model", "rate") == "rate":
        return 1.0 if romo else s["tau_ms"]
    return round(s["tau_m_ms"] / s["tau_ms"], 9) if romo else s["tau_m_ms"]


def _variant(config: dict) -> str:
    return "rate" if config.get("model", "rate") == "rate" else "lif"


def compare_models(configs: Iterable[dict]) -> list[Mismatch]:
    """The quantities (:data:`CONTROLLED` and ``eligibility memory``) whose values differ between the models of
    ``configs`` (runs of one task; several gains and rules allowed). Empty when everything matches."""
    configs = [c for c in configs if c]
    models = sorted({_variant(c) for c in configs})
    if len(models) < 2:
        raise ValueError(f"Invalid comparison: needs runs of both the rate and the LIF network; found {models}")
    tasks = sorted({str(c.get("task")) for c in configs})
    if len(tasks) > 1:
        raise ValueError(f"Invalid comparison: runs of several tasks {tasks}; compare one task at a time")
    getters = {
        "iterations": lambda c: int(c.get("iters", 0)),
        "seeds": lambda c: int(c.get("seed", 0)),
        "batch": lambda c: int(c.get("batch", 0)),
        "timing": task_timing,
        "lr grid": lambda c: float(f"{_lr(c):.6g}"),
        "eligibility memory": eligibility_memory,
    }
    out = []
    for what, get in getters.items():
        values = {m: tuple(sorted({get(c) for c in configs if _variant(c) == m})) for m in models}
        if len(set(values.values())) > 1:
            out.append(Mismatch(what, values))
    return out


def _lr(config: dict) -> float:
    if config.get("lr") is not None:
        return float(config["lr"])
    return float(_settings(config)["lr"])


def check_controlled(configs: Iterable[dict]) -> list[Mismatch]:
    """Raise ValueError naming every :data:`CONTROLLED` quantity that differs between the models; return the
    other mismatches (the eligibility memory) to be stated."""
    found = compare_models(configs)
    bad = [m for m in found if m.what in CONTROLLED]
    if bad:
        raise ValueError("Invalid rate-vs-spiking comparison: not controlled: " + "; ".join(m.text() for m in bad))
    return [m for m in found if m.what not in CONTROLLED]
