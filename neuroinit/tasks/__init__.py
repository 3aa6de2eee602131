"""Tasks: seeded, time-major batches with masks (science.md section 6).

* :class:`RomoTask` (``"romo"``): two-interval discrimination, MSE on two outputs.
* :class:`NeurogymTask`: any neurogym trial environment (``"PerceptualDecisionMaking-v0"`` alias ``"2af"``,
  ``"DelayMatchSample-v0"`` alias ``"dms"``, ...), cross-entropy over class labels.

Use :func:`make_task` to build one by name; every batch draws only from the ``torch.Generator`` it is given.
"""

from __future__ import annotations

from typing import Any

from neuroinit.tasks.base import Batch, Task, masked_cross_entropy, masked_mse
from neuroinit.tasks.neurogym import TASK_ALIASES, NeurogymTask, neurogym_ids, unknown_task_error
from neuroinit.tasks.romo import RomoTask

__all__ = [
    "TASK_ALIASES",
    "Batch",
    "NeurogymTask",
    "RomoTask",
    "Task",
    "available_tasks",
    "make_task",
    "masked_cross_entropy",
    "masked_mse",
    "task_from_settings",
    "unknown_task_error",
]


def available_tasks() -> list[str]:
    """Every name :func:`make_task` accepts: ``"romo"``, the aliases, then the neurogym ids (sorted)."""
    return ["romo", *TASK_ALIASES, *neurogym_ids()]


def make_task(name: str, *, dt_ms: float | None = None, **kwargs: Any) -> Task:
    """Build a task by name.

    ``"romo"`` (any case) -> :class:`RomoTask`; ``dt_ms`` there sets ``dt_tau = dt_ms / tau_ms`` (``tau_ms`` from
    ``kwargs``, default 100), and giving both ``dt_ms`` and ``dt_tau`` is an error. Anything else is a neurogym id
    or alias -> :class:`NeurogymTask` with ``dt_ms`` (default 100) and ``kwargs`` (``seq_len``, ``mask``, env
    settings). An unknown name raises ``ValueError`` saying how to list valid names, with a did-you-mean.
    """
    if not isinstance(name, str):
        raise TypeError(f"Invalid task name {name!r}: must be a string")
    if name.lower() == "romo":
        unknown = sorted(set(kwargs) - {"dt_tau", "tau_ms", "variant"})
        if unknown:
            raise ValueError(
                f"Invalid settings {unknown} for 'romo': allowed dt_tau, tau_ms, variant (and dt_ms)"
            )
        if dt_ms is not None:
            if "dt_tau" in kwargs:
                raise ValueError("Invalid task settings: give dt_ms or dt_tau for 'romo', not both")
            tau_ms = kwargs.get("tau_ms", 100.0)
            if (
                isinstance(dt_ms, bool)
                or not isinstance(dt_ms, int | float)
                or not isinstance(tau_ms, int | float)
            ):
                raise ValueError(f"Invalid dt_ms {dt_ms!r} / tau_ms {tau_ms!r}: must be numbers")
            if not tau_ms > 0:
                raise ValueError(f"Invalid tau_ms {tau_ms!r}: must be > 0")
            kwargs["dt_tau"] = dt_ms / tau_ms
        return RomoTask(**kwargs)
    return NeurogymTask(name, dt_ms=100 if dt_ms is None else dt_ms, **kwargs)


def task_from_settings(name: str, settings: dict, **kwargs: Any) -> Task:
    """The task ``name`` at a run's time step: ``settings`` are a run's resolved settings
    (:func:`neuroinit.experiments.train.resolve_settings`, a run file's ``/settings``) with ``dt_ms`` and, for
    Romo, its time unit ``tau_ms`` (default 100 ms); ``kwargs`` go to :func:`make_task` (Romo's ``variant``).
    Every place that rebuilds a run's task (training, run files, export, the dynamics commands) goes through
    here, so they all see the task training saw."""
    if name.lower() == "romo":
        return make_task("romo", dt_ms=settings["dt_ms"], tau_ms=settings.get("tau_ms", 100.0), **kwargs)
    return make_task(name, dt_ms=settings["dt_ms"], **kwargs)
