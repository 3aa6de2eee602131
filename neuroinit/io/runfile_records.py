"""Run-file records: format constants and the dataclasses a run file reads into and writes from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 1
RUN_KIND = "neuroinit-run"
WEIGHT_NAMES = ("w_in", "w_rec", "bias", "w_out", "b_out")
_NO_EXPONENT = -(2**31)
_CURVE_KEYS = ("iteration", "loss", "accuracy", "lr")
# what h5py raises on damaged files and objects (it maps HDF5 errors onto these)
_H5_ERRORS = (OSError, RuntimeError, ValueError, TypeError, KeyError)
STATUSES = ("running", "complete", "diverged", "interrupted")


# ------------------------------------------------------------------------------------------ data classes

@dataclass
class WeightSet:
    """One network's parameters: float arrays, and for quantised profiles integer codes plus their grids
    (``grids[name] = {"scale", "exponent", "code_min", "code_max"}``, exponent None for free scaling)."""

    params: dict[str, np.ndarray]
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    grids: dict[str, dict] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """Everything needed to continue a run bit for bit: ``iteration`` is the next iteration to run."""

    iteration: int
    wall_time: float
    weights: dict[str, np.ndarray]
    optimizer: dict            # {"param_groups": [...], "state": {int: {key: np.ndarray | number}}}
    generators: dict[str, np.ndarray]


@dataclass
class RunRecord:
    """One training run at one learning rate."""

    lr: float
    status: str = "running"
    message: str = ""
    iteration: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    lr_curve: list[float] = field(default_factory=list)
    loss_per_iteration: list[float] = field(default_factory=list)
    final_loss: float = math.nan
    learning_time: int | None = None
    wall_time: float = 0.0
    final: WeightSet | None = None
    checkpoint: Checkpoint | None = None
    alignment: dict[str, list] = field(default_factory=dict)   # "iteration", "cosine_<p>", "rel_error_<p>"

    @property
    def iterations_done(self) -> int:
        return len(self.loss_per_iteration)

    @property
    def initial_loss(self) -> float:
        return self.loss_per_iteration[0] if self.loss_per_iteration else math.nan

    @property
    def curve(self) -> dict[str, np.ndarray]:
        return {"iteration": np.asarray(self.iteration, dtype=np.int64),
                "loss": np.asarray(self.loss, dtype=np.float64),
                "accuracy": np.asarray(self.accuracy, dtype=np.float64),
                "lr": np.asarray(self.lr_curve, dtype=np.float64)}


@dataclass
class RunFile:
    """A run file's content as plain Python / numpy values (see the module docstring for the layout)."""

    path: str
    format_version: int
    status: str
    message: str
    seed: int
    model: str
    config: dict
    profile_text: str
    cell_config: dict
    init_report: dict
    versions: dict[str, str]
    weights: dict[str, WeightSet]
    runs: list[RunRecord]
    selected_run: int | None = None
    settings: dict = field(default_factory=dict)
    lyapunov: dict[str, dict] = field(default_factory=dict)
    floss: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    updated: str = ""

    @property
    def curves(self) -> list[dict[str, np.ndarray]]:
        """The learning curve of every run (one per learning rate)."""
        return [r.curve for r in self.runs]

    @property
    def selected(self) -> RunRecord | None:
        return None if self.selected_run is None else self.runs[self.selected_run]

    @property
    def input_scale(self) -> float:
        """The factor training applied to the task's inputs (``/settings``; 1 for rate networks by default)."""
        return float(self.settings.get("input_scale", 1.0))

    def make_task(self):
        """The task as this run trained on it (same time step); multiply its inputs by :attr:`input_scale`
        to drive the network as training did."""
        from neuroinit.tasks import task_from_settings

        return task_from_settings(str(self.config.get("task", "romo")), self.settings)

