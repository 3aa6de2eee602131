"""Training runs: hardware-aware init, optional pre-flossing, training with BPTT / e-prop / RFLO, run files.

``train(TrainConfig(...), "run.h5")`` builds the task, initialises a rate or LIF network with
:func:`neuroinit.init.hardware_init`, optionally pre-flosses it, trains it at one learning rate (or at each rate of
a grid, keeping the best) and writes everything to an HDF5 run file (:mod:`neuroinit.io.runfile`,
``docs/runfile.md``). The method and every default are documented in ``docs/training.md``.

Reproducibility: every random draw comes from an explicit generator derived from ``config.seed`` (init:
``torch.Generator().manual_seed(seed)``, the same network ``neuroinit init --seed`` reports; batches, the rule's
feedback matrix and trace rounding, the weight grid's stochastic rounding, Lyapunov frames, flossing and the
evaluation batch each from their own generator, seeded from ``numpy.random.SeedSequence([seed, stream])``).
Checkpoints hold the weights, the optimizer's ``state_dict``, every generator state that training advances and
the curve so far, so a run resumed from a checkpoint finishes with the same weights, bit for bit, as one that
never stopped (on the CPU).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Self

import numpy as np
import torch

from neuroinit.cells import MODELS, make_cell
from neuroinit.cells.base import PARAM_NAMES, RecurrentCell
from neuroinit.cells.lif import RESETS
from neuroinit.cells.rate import ACTIVATIONS, FORMS
from neuroinit.io.runfile import (
    FORMAT_VERSION,
    Checkpoint,
    RunFile,
    RunRecord,
    package_versions,
    read_run,
    remove_stale_temps,
    run_file_lock,
    weights_from_cell,
    write_run,
)
from neuroinit.learning import RULES, make_rule
from neuroinit.profiles import load_profile

__all__ = [
    "DTYPES",
    "FLOSS_MODES",
    "LAST_LOGGED",
    "OPTIMIZERS",
    "ProgressEvent",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "learning_time",
    "resolve_settings",
    "train",
]

OPTIMIZERS = ("adam", "sgd")
DTYPES = ("float32", "float64")
FLOSS_MODES = ("local", "full", "detached")
LAST_LOGGED = 20           # lr-grid choice and final_loss: mean of the last 20 logged losses (science.md 6.2)
LEARNED_FRACTION = 0.05    # Schuessler's learning time: first iteration with loss < 5% of the initial loss
# Generator streams, numbered for numpy.random.SeedSequence([seed, stream]) (the init uses the seed itself).
_STREAMS = {"batch": 1, "rule": 2, "round": 3, "lyapunov": 4, "floss": 5, "eval": 6, "inter_floss": 7}
# Fields that may change when a run is resumed (they do not change the result).
RESUMABLE_CHANGES = ("checkpoint_every", "checkpoint_seconds")

# Defaults by (task kind, model); docs/training.md says why.
#   rate, Romo: tau = 100 ms (ours; the task is defined in units of tau), dt = 0.5 tau (Schuessler et al. 2020).
#   LIF, Romo: the task's tau = 20 ms, dt = 5 ms = 0.25 tau (finer than the rate net's 0.5 tau), membrane
#       tau_m = 100 ms = 5 tau, readout tau_out = tau = 20 ms, inputs x 2. With tau_m = tau the LIF net (no
#       adaptation) cannot hold f1 through the gap and e-prop's eligibility trace (which decays with tau_m) cannot
#       bridge it: it learned nothing but the mean output (N = 64, 200 iterations, accuracy 0.49); tau_m = 5 tau
#       learned (accuracy 0.96 e-prop, 0.99 BPTT). Measurements in docs/training.md.
#   rate, neurogym: dt = 20 ms, tau = 100 ms (alpha = 0.2 < 1 so e-prop is not one-step BPTT; science.md 6.2).
#   LIF, neurogym: dt = 20 ms (as the rate net: neurogym's periods are multiples of dt), tau_m = tau_out = 100 ms.
_DEFAULTS = {
    ("romo", "rate"): {"dt_ms": 50.0, "tau_ms": 100.0, "input_scale": 1.0},
    ("romo", "lif"): {"dt_ms": 5.0, "tau_ms": 20.0, "tau_m_ms": 100.0, "tau_out_ms": 20.0, "input_scale": 2.0},
    ("neurogym", "rate"): {"dt_ms": 20.0, "tau_ms": 100.0, "input_scale": 1.0},
    ("neurogym", "lif"): {"dt_ms": 20.0, "tau_ms": None, "tau_m_ms": 100.0, "tau_out_ms": 100.0,
                          "input_scale": 2.0},
}


class TrainingDiverged(RuntimeError):
    """The loss (or the weights) became NaN or infinite; the run file keeps the last good checkpoint."""


# ------------------------------------------------------------------------------------------ configuration

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _task_kind(task: str) -> str:
    return "romo" if task.lower() == "romo" else "neurogym"


def _check_task(name: str) -> str:
    """'romo', an alias or a registered neurogym id; otherwise the tasks module's one-line error."""
    from neuroinit.tasks import TASK_ALIASES, unknown_task_error

    if name.lower() == "romo":
        return "romo"
    if name.lower() in TASK_ALIASES:
        return TASK_ALIASES[name.lower()]
    from neuroinit.tasks.neurogym import neurogym_ids

    if name not in neurogym_ids():
        raise unknown_task_error(name)
    return name


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; validated at construction (``ValueError("Invalid ...")``).

    ``None`` means "the default for this task and model" (see :func:`resolve_settings` and
    ``docs/training.md``): ``lr`` 0.05 / N on Romo (Schuessler et al.) and 3e-3 on neurogym tasks;
    ``form`` "rate" for RFLO (Murray's rate form), "voltage" otherwise; ``dt_ms`` / ``tau_ms`` (the rate net's tau,
    or Romo's time unit) / ``tau_m_ms`` and ``tau_out_ms`` (LIF) / ``input_scale`` from the per-(task, model)
    table. ``lr_grid`` trains once per rate (same seed) and keeps
    the one with the lowest mean of the last 20 logged losses. ``align_every = K > 0`` (local rules only) compares
    the rule's gradient with BPTT's on the current batch every K iterations (iteration 0 included) and stores the
    cosine and relative error per parameter in the run file (:mod:`neuroinit.dynamics.alignment`); it does not
    change the training (0: off).

    Flossing: ``floss_k = "auto"`` is resolved at construction to ``max(1, hidden // 8)``
    (:func:`neuroinit.dynamics.flossing.resolve_floss_k`), so the config (and the run file) holds the integer.
    ``floss_inter_every = E > 0`` adds inter-flossing: before training iterations E, 2E, ... the network is flossed
    for ``floss_inter_iters`` iterations (same k, mode and lr as pre-flossing). ``io_init``: how the input and
    readout weights are drawn (:data:`neuroinit.init.IO_INITS`).
    """

    task: str = "romo"
    model: str = "rate"
    rule: str = "eprop"
    gain: float = 1.0
    profile: str = "ideal"
    hidden: int = 256
    batch: int = 32
    iters: int = 6000
    lr: float | None = None
    lr_grid: tuple[float, ...] = ()
    optimizer: str = "adam"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    form: str | None = None
    activation: str = "tanh"
    dt_ms: float | None = None
    tau_ms: float | None = None
    tau_m_ms: float | None = None
    tau_out_ms: float | None = None
    v_th: float = 1.0
    reset: str = "subtract"
    n_refractory: int = 0
    chip_neuron: bool = False         # LIF: train the profile's [neuron] model (synaptic current, >=), as deployed
    tau_syn_ms: float | None = None   # LIF with chip_neuron and a synaptic current: its tau (default dt / ln 2)
    input_scale: float | None = None
    clamp_gain: bool = False
    log_every: int = 10
    checkpoint_every: int = 100
    checkpoint_seconds: float = 60.0
    eval_batch: int = 256
    lyapunov: bool = True
    lyapunov_k: int = 8
    floss_iters: int = 0
    floss_k: int | str = "auto"
    floss_mode: str = "local"
    floss_lr: float = 1e-3
    fast: bool = True
    align_every: int = 0
    floss_inter_every: int = 0
    floss_inter_iters: int = 0
    io_init: str = "schuessler"

    def __post_init__(self) -> None:
        if isinstance(self.lr_grid, list):
            object.__setattr__(self, "lr_grid", tuple(self.lr_grid))
        self._validate()

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"Invalid config keys {unknown}; allowed: {', '.join(names)}")
        return cls(**data)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_grid"] = list(self.lr_grid)
        return d

    @property
    def lrs(self) -> tuple[float, ...]:
        """The learning rates to train at (one unless ``lr_grid``)."""
        if self.lr_grid:
            return tuple(float(x) for x in self.lr_grid)
        return (float(resolve_settings(self)["lr"]),)

    def _validate(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"Invalid task {self.task!r}: must be a non-empty string")
        object.__setattr__(self, "task", _check_task(self.task))
        if self.model not in MODELS:
            raise ValueError(f"Invalid model {self.model!r}: allowed {', '.join(MODELS)}")
        if self.rule not in RULES:
            raise ValueError(f"Invalid rule {self.rule!r}: allowed {', '.join(RULES)}")
        if not _is_number(self.gain) or self.gain < 0:
            raise ValueError(f"Invalid gain {self.gain!r}: must be a finite number >= 0")
        if not isinstance(self.profile, str) or not self.profile:
            raise ValueError(f"Invalid profile {self.profile!r}: a bundled profile name or a .toml path")
        load_profile(self.profile)  # ProfileError (a ValueError) naming the problem
        for name in ("hidden", "batch", "iters", "log_every", "checkpoint_every", "eval_batch", "lyapunov_k"):
            val = getattr(self, name)
            if not _is_int(val) or val < 1:
                raise ValueError(f"Invalid {name} {val!r}: must be an integer >= 1")
        if self.lyapunov_k > self.hidden:
            raise ValueError(f"Invalid lyapunov_k {self.lyapunov_k}: at most hidden = {self.hidden}")
        from neuroinit.dynamics.flossing import resolve_floss_k

        try:
            object.__setattr__(self, "floss_k", resolve_floss_k(self.floss_k, self.hidden))
        except ValueError as e:
            raise ValueError(str(e).replace("Invalid k", "Invalid floss_k", 1)) from None
        for name in ("floss_inter_every", "floss_inter_iters"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"Invalid {name} {getattr(self, name)!r}: must be an integer >= 0")
        if (self.floss_inter_every > 0) != (self.floss_inter_iters > 0):
            raise ValueError(f"Invalid inter-flossing floss_inter_every = {self.floss_inter_every}, "
                             f"floss_inter_iters = {self.floss_inter_iters}: give both > 0 (on) or both 0 (off)")
        from neuroinit.init import IO_INITS

        if self.io_init not in IO_INITS:
            raise ValueError(f"Invalid io_init {self.io_init!r}: allowed {', '.join(IO_INITS)}")
        if self.lr is not None and (not _is_number(self.lr) or self.lr <= 0):
            raise ValueError(f"Invalid lr {self.lr!r}: must be a finite number > 0")
        if not isinstance(self.lr_grid, tuple) or any(not _is_number(x) or x <= 0 for x in self.lr_grid):
            raise ValueError(f"Invalid lr_grid {self.lr_grid!r}: must be finite numbers > 0")
        if len(set(self.lr_grid)) != len(self.lr_grid):
            raise ValueError(f"Invalid lr_grid {self.lr_grid!r}: repeated learning rates")
        if self.lr is not None and self.lr_grid:
            raise ValueError("Invalid learning rate: give lr or lr_grid, not both")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer {self.optimizer!r}: allowed {', '.join(OPTIMIZERS)}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"Invalid seed {self.seed!r}: must be an integer in 0..2^63-1")
        if not isinstance(self.device, str):
            raise ValueError(f"Invalid device {self.device!r}: e.g. 'cpu' or 'cuda'")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"Invalid device {self.device!r}: e.g. 'cpu', 'cuda' or 'cuda:0'") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Invalid device {self.device!r}: CUDA is not available on this machine; use 'cpu'")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"Invalid device {self.device!r}: allowed 'cpu' or 'cuda[:N]'")
        if self.dtype not in DTYPES:
            raise ValueError(f"Invalid dtype {self.dtype!r}: allowed {', '.join(DTYPES)}")
        if self.form is not None:
            if self.model != "rate":
                raise ValueError(f"Invalid form {self.form!r} for model {self.model!r}: form is for rate networks")
            if self.form not in FORMS:
                raise ValueError(f"Invalid form {self.form!r}: allowed {', '.join(FORMS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Invalid activation {self.activation!r}: allowed {', '.join(ACTIVATIONS)}")
        for name in ("dt_ms", "tau_ms", "tau_m_ms", "tau_out_ms", "input_scale"):
            val = getattr(self, name)
            if val is not None and (not _is_number(val) or val <= 0):
                raise ValueError(f"Invalid {name} {val!r}: must be a finite number > 0")
        if self.model != "lif":
            for name in ("tau_m_ms", "tau_out_ms"):
                if getattr(self, name) is not None:
                    raise ValueError(f"Invalid {name} for a rate network: it sets a LIF time constant (the rate "
                                     "network's is tau_ms)")
        elif _task_kind(self.task) != "romo" and self.tau_ms is not None:
            raise ValueError("Invalid tau_ms for a LIF network on a neurogym task: it is the Romo task's time unit; "
                             "set the membrane with tau_m_ms")
        if not _is_number(self.v_th) or self.v_th <= 0:
            raise ValueError(f"Invalid v_th {self.v_th!r}: must be a finite number > 0")
        if self.reset not in RESETS:
            raise ValueError(f"Invalid reset {self.reset!r}: allowed {', '.join(RESETS)}")
        if not _is_int(self.n_refractory) or self.n_refractory < 0:
            raise ValueError(f"Invalid n_refractory {self.n_refractory!r}: must be an integer >= 0")
        if not _is_number(self.checkpoint_seconds) or self.checkpoint_seconds < 0:
            raise ValueError(f"Invalid checkpoint_seconds {self.checkpoint_seconds!r}: a number >= 0 (0 = off)")
        if self.tau_syn_ms is not None and (not _is_number(self.tau_syn_ms) or self.tau_syn_ms <= 0):
            raise ValueError(f"Invalid tau_syn_ms {self.tau_syn_ms!r}: must be a finite number > 0")
        if (self.chip_neuron is True or self.tau_syn_ms is not None) and self.model != "lif":
            raise ValueError("Invalid chip_neuron / tau_syn_ms for a rate network: they set LIF neuron options")
        for name in ("clamp_gain", "lyapunov", "fast", "chip_neuron"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Invalid {name} {getattr(self, name)!r}: must be true or false")
        if not _is_int(self.align_every) or self.align_every < 0:
            raise ValueError(f"Invalid align_every {self.align_every!r}: must be an integer >= 0 (0 = off)")
        if self.align_every and self.rule == "bptt":
            raise ValueError("Invalid align_every with rule 'bptt': it compares a local rule's gradient with "
                             "BPTT's; use eprop, eprop-autograd or rflo")
        if not _is_int(self.floss_iters) or self.floss_iters < 0:
            raise ValueError(f"Invalid floss_iters {self.floss_iters!r}: must be an integer >= 0")
        if self.floss_mode not in FLOSS_MODES:
            raise ValueError(f"Invalid floss_mode {self.floss_mode!r}: allowed {', '.join(FLOSS_MODES)}")
        if not _is_number(self.floss_lr) or self.floss_lr <= 0:
            raise ValueError(f"Invalid floss_lr {self.floss_lr!r}: must be a finite number > 0")
        s = resolve_settings(self)
        if self.model == "rate" and not 0 < s["alpha"] <= 1:
            raise ValueError(f"Invalid dt_ms / tau_ms = {s['dt_ms']:g} / {s['tau_ms']:g}: the rate network needs "
                             "0 < alpha = dt / tau <= 1")
        if _task_kind(self.task) == "romo" and not 0 < s["dt_tau"] <= 1:
            raise ValueError(f"Invalid dt_ms / tau_ms = {s['dt_ms']:g} / {s['tau_ms']:g} for Romo: the task's "
                             "step dt / tau must be in (0, 1]")


def resolve_settings(config: TrainConfig) -> dict[str, Any]:
    """The concrete values behind every ``None`` in ``config`` (stored in the run file as ``/settings``)."""
    d = _DEFAULTS[(_task_kind(config.task), config.model)]

    def pick(name):
        val = getattr(config, name)
        val = d.get(name) if val is None else val
        return None if val is None else float(val)

    dt, tau = pick("dt_ms"), pick("tau_ms")
    out: dict[str, Any] = {"dt_ms": dt, "tau_ms": tau}
    if config.model == "rate":
        out["alpha"] = dt / tau
        out["form"] = config.form or ("rate" if config.rule == "rflo" else "voltage")
    else:
        out["tau_m_ms"] = pick("tau_m_ms")
        out["tau_out_ms"] = pick("tau_out_ms")
    # the step in units of the time constant the task and the analysis windows are measured in: the rate net's
    # tau, Romo's tau for a LIF net, tau_m for a LIF net on a neurogym task
    out["dt_tau"] = dt / (tau if tau is not None else out["tau_m_ms"])
    out["input_scale"] = float(config.input_scale if config.input_scale is not None else d["input_scale"])
    if config.lr is not None:
        out["lr"] = float(config.lr)
    elif _task_kind(config.task) == "romo":
        out["lr"] = 0.05 / config.hidden        # Schuessler et al. 2020: Adam, lr 0.05 / N
    else:
        out["lr"] = 3e-3                        # middle of the neurogym grid {1e-3, 3e-3, 1e-2} (science.md 6.2)
    return out


# ------------------------------------------------------------------------------------------ results

class ProgressEvent(NamedTuple):
    """Reported to ``progress`` after every training iteration (``phase`` "train") and at phase changes
    ("init", "floss", "lyapunov", "eval"; ``loss`` None). ``done`` counts iterations over all learning rates."""

    phase: str
    run: int
    n_runs: int
    lr: float
    iteration: int
    iters: int
    done: int
    total: int
    loss: float | None


@dataclass(frozen=True)
class TrainResult:
    """Summary of a finished run (also in the run file's ``/summary``)."""

    out_path: str
    status: str
    initial_loss: float
    final_loss: float            # mean of the last 20 logged training losses (selected learning rate)
    eval_loss: float             # on a fresh evaluation batch of config.eval_batch trials
    eval_accuracy: float
    chance_accuracy: float
    learning_time: int | None    # first iteration with loss < 5% of the initial loss (None: never)
    wall_time: float             # seconds spent in train() for this file, resumed parts included
    lr: float                    # the selected learning rate
    lrs: tuple[float, ...]
    iterations: int
    lyapunov_initial: float | None   # max exponent per step, before training (after flossing if any)
    lyapunov_final: float | None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lrs"] = list(self.lrs)
        return d


def learning_time(losses, fraction: float = LEARNED_FRACTION) -> int | None:
    """Schuessler et al.'s learning time: the first iteration whose loss is below ``fraction`` of the initial
    loss (iteration 0's, measured before any update); None if it never is."""
    if len(losses) == 0:
        return None
    threshold = fraction * float(losses[0])
    for i, v in enumerate(losses):
        if float(v) < threshold:
            return i
    return None


def _last_logged_mean(losses: list[float]) -> float:
    if not losses:
        return math.nan
    tail = losses[-LAST_LOGGED:]
    return float(sum(tail) / len(tail))


# ------------------------------------------------------------------------------------------ setup

def _seed_for(seed: int, stream: str) -> int:
    return int(np.random.SeedSequence([seed, _STREAMS[stream]]).generate_state(1, np.uint64)[0])


def _generator(seed: int, stream: str, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed_for(seed, stream))


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


class _Context:
    """Objects a run needs, built deterministically from the config (and the stored initial weights)."""

    def __init__(self, config: TrainConfig) -> None:
        from neuroinit.tasks import make_task

        self.config = config
        self.settings = resolve_settings(config)
        self.device = torch.device(config.device)
        self.dtype = _dtype(config.dtype)
        self.profile = load_profile(config.profile)
        s = self.settings
        if _task_kind(config.task) == "romo":
            self.task = make_task("romo", dt_ms=s["dt_ms"], tau_ms=s["tau_ms"])
        else:
            self.task = make_task(config.task, dt_ms=s["dt_ms"])
        if config.model == "rate":
            self.cell_kwargs = {"alpha": s["alpha"], "activation": config.activation, "form": s["form"]}
        else:
            self.cell_kwargs = {"dt": s["dt_ms"], "tau_m": s["tau_m_ms"], "tau_out": s["tau_out_ms"],
                                "v_th": config.v_th, "reset": config.reset, "n_refractory": config.n_refractory}
            if config.chip_neuron:   # what is trained is what deploys: the profile's neuron options
                from neuroinit.cells.lif import LIFRNN
                self.cell_kwargs.update(LIFRNN.neuron_options(self.profile, s["dt_ms"], config.tau_syn_ms,
                                                              tau_m=s["tau_m_ms"], tau_out=s["tau_out_ms"]))
        # Quantised profiles: weights go back onto the grid after each optimizer step. Chips that learn on chip
        # use their own update rounding (stochastic on Loihi / ReckOn); the others round to nearest (off-chip
        # training with a projected forward pass).
        self.rounding = None if self.profile.learns_on_chip else "nearest"

    # -- the network
    def init_params(self):
        from neuroinit.init import hardware_init

        c = self.config
        gen = torch.Generator().manual_seed(c.seed)
        return hardware_init(c.model, self.task.n_in, c.hidden, self.task.n_out, c.gain, self.profile,
                             generator=gen, out_of_range="clamp" if c.clamp_gain else "error",
                             v_th=c.v_th if c.model == "lif" else 1.0, dtype=self.dtype, device=self.device,
                             io_init=c.io_init)

    def make_cell(self, params) -> RecurrentCell:
        return make_cell(self.config.model, params, profile=self.profile, **self.cell_kwargs)

    def batch(self, batch_size: int, generator: torch.Generator):
        b = self.task.batch(batch_size, generator=generator, dtype=self.dtype, device=self.device)
        scale = self.settings["input_scale"]
        return b if scale == 1.0 else b._replace(inputs=b.inputs * scale)

    def inputs(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        from neuroinit.dynamics.lyapunov import task_inputs

        u = task_inputs(self.task, batch=batch, length=length, generator=generator, dtype=self.dtype,
                        device=self.device)
        return u * self.settings["input_scale"]

    def steps_per_tau(self) -> float:
        return 1.0 / self.settings["dt_tau"]

    # -- learning
    def generators(self) -> dict[str, torch.Generator]:
        """The generators training advances, freshly seeded (the same for every learning rate)."""
        dev = "cpu" if self.device.type == "cpu" else str(self.device)
        return {"batch": _generator(self.config.seed, "batch"),
                "rule": _generator(self.config.seed, "rule"),
                "rule_device": _generator(self.config.seed, "rule", dev),
                "round": _generator(self.config.seed, "round", dev)}

    def make_rule(self, cell: RecurrentCell, gens: dict[str, torch.Generator]):
        rule = self._make_rule(cell, gens)
        if hasattr(rule, "fast"):
            # the fused native step (neuroinit.learning.fused) where it gives the PyTorch step's results (float
            # traces, float32, CPU); the PyTorch step otherwise
            rule.fast = "auto" if self.config.fast else False
        return rule

    def _make_rule(self, cell: RecurrentCell, gens: dict[str, torch.Generator]):
        name = self.config.rule
        if self.device.type == "cpu" or name not in ("eprop", "rflo"):
            return make_rule(name, cell, generator=gens["rule"])
        # On a GPU the random feedback is drawn on the CPU (as on a CPU run) and chip-precision traces round
        # with a generator on the device.
        from neuroinit.learning import OnlineEprop, feedback_matrix, make_trace_quantiser

        fb = feedback_matrix(cell, "symmetric" if name == "eprop" else "random", generator=gens["rule"])
        quant = make_trace_quantiser(cell, generator=gens["rule_device"]) if cell.profile.learns_on_chip else None
        return OnlineEprop(cell, feedback=fb if fb is not None else "symmetric", trace_quantiser=quant)

    def make_optimizer(self, cell: RecurrentCell, lr: float, gens):
        from neuroinit.learning import attach_chip_constraints

        params = [getattr(cell, n) for n in PARAM_NAMES]
        # torch's fused (single-kernel) update: the same rule, ~3x less time than the per-tensor loop at 5 tensors
        fused = self.device.type in ("cpu", "cuda")
        if self.config.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr, fused=fused)
        else:
            opt = torch.optim.SGD(params, lr=lr, fused=fused)
        attach_chip_constraints(opt, cell, generator=gens["round"], rounding=self.rounding)
        return opt


# ------------------------------------------------------------------------------------------ state <-> arrays

def _weights_np(cell: RecurrentCell) -> dict[str, np.ndarray]:
    return {n: getattr(cell, n).detach().cpu().numpy().copy() for n in PARAM_NAMES}


@torch.no_grad()
def _set_weights(cell: RecurrentCell, arrays: dict[str, np.ndarray]) -> None:
    for n in PARAM_NAMES:
        p = getattr(cell, n)
        p.copy_(torch.from_numpy(np.asarray(arrays[n])).to(dtype=p.dtype, device=p.device))


def _optimizer_np(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    state = {}
    for idx, entry in sd["state"].items():
        state[int(idx)] = {k: (v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else v)
                           for k, v in entry.items() if v is not None}
    return {"param_groups": sd["param_groups"], "state": state}


def _optimizer_from_np(data: dict) -> dict:
    state = {}
    for idx, entry in data["state"].items():
        state[int(idx)] = {k: (torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v)
                           for k, v in entry.items()}
    return {"param_groups": data["param_groups"], "state": state}


def _gen_states(gens: dict[str, torch.Generator]) -> dict[str, np.ndarray]:
    return {k: g.get_state().numpy().copy() for k, g in gens.items()}


def _set_gen_states(gens: dict[str, torch.Generator], states: dict[str, np.ndarray], where: str) -> None:
    missing = sorted(set(gens) - set(states))
    if missing:
        raise ValueError(f"{where}: not a readable neuroinit run file: the checkpoint lacks generator states "
                         f"{missing}")
    for k, g in gens.items():
        g.set_state(torch.from_numpy(np.array(states[k], dtype=np.uint8)))


# ------------------------------------------------------------------------------------------ interruption

class _StopFlag:
    """Ctrl-C (SIGINT) and SIGTERM set a flag the loop checks between iterations, so the run stops at an
    iteration boundary with a checkpoint; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, _frame) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------ the run

def _config_diff(stored: dict, config: TrainConfig) -> list[str]:
    """Fields whose stored and current values differ in what they do (compared as run ids compare them:
    :func:`neuroinit.experiments.sweep.comparable_config`, so a file written before a field was added, or
    with a setting that has no effect, still resumes)."""
    from neuroinit.experiments.sweep import comparable_config

    stored = comparable_config(stored)
    now = comparable_config(config.to_dict())
    keys = sorted(set(stored) | set(now))
    return [k for k in keys if k not in RESUMABLE_CHANGES and stored.get(k) != now.get(k)]


def _lyapunov(ctx: _Context, cell: RecurrentCell) -> dict:
    """Top-k exponents driven by task inputs (10 sequences of concatenated trials; warm-up 25 tau, window
    100 tau), with the same inputs, initial states and frames for every network of the run."""
    from neuroinit.dynamics.lyapunov import lyapunov_spectrum

    per_tau_steps = ctx.steps_per_tau()
    warmup = math.ceil(25 * per_tau_steps)
    steps = math.ceil(100 * per_tau_steps)
    gen = _generator(ctx.config.seed, "lyapunov")
    inputs = ctx.inputs(10, warmup + steps, gen)
    res = lyapunov_spectrum(cell, inputs, k=ctx.config.lyapunov_k, warmup=warmup, generator=gen)
    return {"max_per_step": float(res.mean[0]), "max_per_tau": float(res.per_tau[0]), "k": int(res.k),
            "warmup": warmup, "steps": steps, "batch": 10,
            "mean": res.mean.detach().cpu().double().numpy(), "std": res.std.detach().cpu().double().numpy(),
            "per_tau": res.per_tau.detach().cpu().double().numpy(),
            "per_step": res.per_step.detach().cpu().double().numpy()}


def _floss(ctx: _Context, cell: RecurrentCell, iters: int | None = None,
           generator: torch.Generator | None = None) -> dict:
    """Floss ``cell`` in place (``iters``: pre-flossing's ``floss_iters`` unless given; a fresh Adam each call) and
    put it back onto the chip's learning grid; returns the per-iteration losses and exponents."""
    from neuroinit.dynamics.flossing import DEFAULT_STEPS, DEFAULT_WARMUP, floss
    from neuroinit.learning import learning_grids
    from neuroinit.quantize import quantize

    c = ctx.config
    length = DEFAULT_WARMUP + DEFAULT_STEPS
    res = floss(cell, iters=c.floss_iters if iters is None else iters, k=c.floss_k, mode=c.floss_mode,
                lr=c.floss_lr, input_fn=lambda g: ctx.inputs(1, length, g),
                generator=generator if generator is not None else _generator(c.seed, "floss"))
    with torch.no_grad():  # back onto the chip's learning grid (identity for float profiles)
        for name, grid in learning_grids(cell).items():
            if grid is not None:
                p = getattr(cell, name)
                p.copy_(quantize(p, grid, rounding="nearest"))
        if cell.remove_autapses:
            cell.w_rec.diagonal().zero_()
    return {"losses": np.asarray(res.losses, dtype=np.float64),
            "exponents": np.asarray(res.exponents, dtype=np.float64)}


def _inter_floss_generator(seed: int, iteration: int) -> torch.Generator:
    """The generator of the inter-flossing episode before training iteration ``iteration``: a function of the
    seed and the iteration only, so a resumed run repeats it exactly without storing generator states."""
    state = np.random.SeedSequence([seed, _STREAMS["inter_floss"], iteration]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@torch.no_grad()
def _evaluate(ctx: _Context, cell: RecurrentCell) -> tuple[float, float]:
    b = ctx.batch(ctx.config.eval_batch, _generator(ctx.config.seed, "eval"))
    y, _ = cell(b.inputs)
    return float(ctx.task.loss(y, b)), float(ctx.task.accuracy(y, b))


def _chance(task) -> float:
    if task.loss_kind == "ce":
        return 1.0 / max(task.n_out - 1, 1)   # class 0 is "fixate", never a decision
    return 0.5


def _new_run_file(ctx: _Context, report) -> RunFile:
    import json

    c = ctx.config
    return RunFile(
        path="", format_version=FORMAT_VERSION, status="running", message="", seed=c.seed, model=c.model,
        config=json.loads(json.dumps(c.to_dict())), profile_text=ctx.profile.text or _profile_text(ctx.profile),
        cell_config={}, init_report=report.to_dict() if report is not None else {}, versions=package_versions(),
        weights={}, runs=[RunRecord(lr=lr) for lr in c.lrs], settings=dict(ctx.settings),
    )


def _profile_text(profile) -> str:
    """TOML text of a profile that was not read from a file (never the case for load_profile)."""
    from neuroinit.profiles import profile_to_dict

    lines = [f"name = {json_str(profile.name)}", f"description = {json_str(profile.description)}"]
    for section, values in profile_to_dict(profile).items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {json_str(v) if isinstance(v, str) else str(v).lower()}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def json_str(s: str) -> str:
    import json

    return json.dumps(s)


def train(config: TrainConfig, out_path, *, resume: bool = False, overwrite: bool = False,
          start_if_missing: bool = False, progress: Callable[[ProgressEvent], None] | None = None) -> TrainResult:
    """Train as ``config`` says and write the run file ``out_path`` (see the module docstring).

    ``resume``: continue the run in ``out_path`` from its last checkpoint (it must have been made with the same
    config, up to ``checkpoint_every`` / ``checkpoint_seconds``); a complete run is returned as it is; a missing
    file is an error unless ``start_if_missing`` (then a new run starts: what sweeps use). Without ``resume``
    an existing file is an error unless ``overwrite``.
    ``progress`` is called with a :class:`ProgressEvent` after every iteration (and with phase "resume", the
    iteration it continues from, when a run resumes from a checkpoint).

    One process writes a run file at a time (:func:`~neuroinit.io.runfile.run_file_lock`: a second one gets a
    :class:`~neuroinit.io.runfile.RunFileLocked` error); temporary files a killed writer left are removed.

    Raises :class:`TrainingDiverged` when the loss or the weights become NaN / infinite (with a single learning
    rate; in a grid that rate is marked diverged and the others go on), ``KeyboardInterrupt`` after Ctrl-C /
    SIGTERM (a checkpoint is written first, the file reads "interrupted"), ``ValueError`` for bad input.
    """
    out = _check_out(config, out_path, resume=resume, start_if_missing=start_if_missing)
    # SIGINT / SIGTERM stop at an iteration boundary from here on (setup included), with the file written
    with run_file_lock(out), _StopFlag() as stop:
        remove_stale_temps(out)
        job = _open_run(config, out, resume=resume, overwrite=overwrite, progress=progress)
        if isinstance(job, TrainResult):
            return job
        for k, lr in enumerate(config.lrs):
            if job.run.runs[k].status in ("complete", "diverged"):  # a diverged rate would diverge again
                continue
            _train_one(job, k, lr, stop)
        return _close_run(job)


def _check_out(config: TrainConfig, out_path, *, resume: bool, start_if_missing: bool) -> Path:
    """The run file's path, checked (see :func:`train`)."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"Invalid config {type(config).__name__}: expected a TrainConfig")
    out = Path(out_path)
    if out.suffix == "" or out.is_dir():
        raise ValueError(f"Invalid out path {str(out)!r}: give a file name such as run.h5")
    if not out.parent.exists():
        raise ValueError(f"Invalid out path {str(out)!r}: directory {str(out.parent)!r} does not exist")
    if resume and not start_if_missing and not out.exists():
        raise ValueError(f"Cannot resume {str(out)!r}: the file does not exist (check the path; "
                         "--resume-or-start starts a new run when it is missing)")
    return out


@dataclass
class _Job:
    """A run between its setup (:func:`_open_run`) and its end (:func:`_close_run`): what training needs."""

    ctx: _Context
    run: RunFile
    cell: RecurrentCell
    start_weights: dict
    out: Path
    notify: Callable[[ProgressEvent], None]
    started: float

    @property
    def total(self) -> int:
        return self.ctx.config.iters * len(self.run.runs)

    def done(self) -> int:
        return sum(min(r.iterations_done, self.ctx.config.iters) for r in self.run.runs)

    def phase(self, name: str) -> None:
        lrs = self.ctx.config.lrs
        self.notify(ProgressEvent(name, 0, len(lrs), lrs[0], 0, self.ctx.config.iters, self.done(), self.total,
                                  None))


def _open_run(config: TrainConfig, out: Path, *, resume: bool, overwrite: bool,
              progress: Callable[[ProgressEvent], None] | None) -> _Job | TrainResult:
    """Set the run in ``out`` (checked by :func:`_check_out`, locked by the caller) up: new: init, evaluation,
    Lyapunov, pre-flossing, first write; resumed: the stored initial weights. A complete stored run is returned
    as its :class:`TrainResult`."""
    started = time.monotonic()
    existing: RunFile | None = None
    if out.exists():
        if resume:
            existing = read_run(out)
            diff = _config_diff(existing.config, config)
            if diff:
                parts = ", ".join(f"{k}: stored {existing.config.get(k)!r} vs {getattr(config, k, None)!r}"
                                  for k in diff)
                raise ValueError(f"Invalid resume of {out}: the config differs ({parts}); resume with the "
                                 "stored config or train into a new file")
        elif not overwrite:
            raise ValueError(f"Invalid out path {str(out)!r}: the file exists; resume it (--resume) or "
                             "overwrite it (--overwrite)")
    if existing is not None and existing.status == "complete":
        return _result(existing, out)
    notify = progress or (lambda _e: None)
    ctx = _Context(config)
    if existing is None:
        lrs = config.lrs
        notify(ProgressEvent("init", 0, len(lrs), lrs[0], 0, config.iters, 0, config.iters * len(lrs), None))
        params, report = ctx.init_params()
        cell = ctx.make_cell(params)
        run = _new_run_file(ctx, report)
        job = _Job(ctx, run, cell, {}, out, notify, started)
        run.cell_config = cell.config()
        run.weights["initial"] = weights_from_cell(cell)
        run.summary["eval_loss_initial"], run.summary["eval_accuracy_initial"] = _evaluate(ctx, cell)
        if config.lyapunov:
            job.phase("lyapunov")
            run.lyapunov["initial"] = _lyapunov(ctx, cell)
        if config.floss_iters:
            job.phase("floss")
            run.floss = _floss(ctx, cell)
            run.weights["floss"] = weights_from_cell(cell)
            if config.lyapunov:
                run.lyapunov["floss"] = _lyapunov(ctx, cell)
        run.summary["wall_time_setup"] = time.monotonic() - started
        write_run(out, run)
    else:
        run = existing
        from neuroinit.cells.base import CellParams

        init = run.weights["initial"].params
        params = CellParams(*(torch.from_numpy(np.array(init[n])).to(dtype=ctx.dtype, device=ctx.device)
                              for n in PARAM_NAMES))
        cell = ctx.make_cell(params)  # the same grids as the original run: chosen from the same weights
        if run.status in ("diverged", "interrupted"):
            run.status, run.message = "running", ""
        job = _Job(ctx, run, cell, {}, out, notify, started)
    job.start_weights = run.weights.get("floss", run.weights["initial"]).params
    return job


def _close_run(job: _Job) -> TrainResult:
    """Select the best learning rate, evaluate, run the final Lyapunov analysis and write the complete run
    file; raises :class:`TrainingDiverged` (after writing) when no learning rate completed."""
    ctx, run, cell, out, config = job.ctx, job.run, job.cell, job.out, job.ctx.config
    complete = [k for k, r in enumerate(run.runs) if r.status == "complete"]
    if not complete:
        msgs = "; ".join(r.message for r in run.runs)
        run.status, run.message = "diverged", msgs
        write_run(out, run)
        raise TrainingDiverged(msgs)
    finishing = time.monotonic()
    best = min(complete, key=lambda k: (run.runs[k].final_loss, k))
    run.selected_run = best
    sel = run.runs[best]
    _set_weights(cell, sel.final.params)
    run.weights["final"] = sel.final
    job.phase("eval")
    eval_loss, eval_acc = _evaluate(ctx, cell)
    if config.lyapunov:
        job.phase("lyapunov")
        run.lyapunov["final"] = _lyapunov(ctx, cell)
    wall = sum(r.wall_time for r in run.runs) + float(run.summary.get("wall_time_setup", 0.0)) \
        + time.monotonic() - finishing
    lyap_before = run.lyapunov.get("floss", run.lyapunov.get("initial"))
    run.summary.update({
        "initial_loss": sel.initial_loss, "final_loss": sel.final_loss, "eval_loss": eval_loss,
        "eval_accuracy": eval_acc, "chance_accuracy": _chance(ctx.task), "learning_time": sel.learning_time,
        "wall_time": wall, "selected_lr": sel.lr, "iterations": config.iters,
        "lyapunov_initial": None if lyap_before is None else lyap_before["max_per_step"],
        "lyapunov_final": run.lyapunov["final"]["max_per_step"] if "final" in run.lyapunov else None,
    })
    run.status, run.message = "complete", ""
    write_run(out, run)
    return _result(run, out)


class _LrRun:
    """Training one learning rate ``k`` of a job: the rule, the optimizer and the generators (fresh, or from the
    record's checkpoint), and what every iteration does around the gradient (stop, inter-flossing, the update,
    divergence, logging, checkpoints). :func:`_train_one` drives one; ensembles drive several
    (:mod:`neuroinit.experiments.ensemble`)."""

    def __init__(self, job: _Job, k: int, lr: float) -> None:
        ctx, run, cell = job.ctx, job.run, job.cell
        self.job, self.k, self.lr = job, k, lr
        self.rec = rec = run.runs[k]
        _set_weights(cell, job.start_weights)
        self.gens = ctx.generators()
        self.rule = ctx.make_rule(cell, self.gens)
        self.opt = ctx.make_optimizer(cell, lr, self.gens)
        self.start, self.wall_before = 0, 0.0
        if rec.checkpoint is not None:
            ck = rec.checkpoint
            _set_weights(cell, ck.weights)
            self.opt.load_state_dict(_optimizer_from_np(ck.optimizer))
            _set_gen_states(self.gens, ck.generators, str(job.out))
            self.start, self.wall_before = ck.iteration, ck.wall_time
            job.notify(ProgressEvent("resume", k, len(run.runs), lr, self.start, ctx.config.iters, job.done(),
                                     job.total, None))
        self.step_path: str | None = None   # what /summary/step_path says (None: the rule's path)
        start = self.start
        # Drop whatever was logged after the checkpoint (a kill or a divergence after it).
        rec.loss_per_iteration = rec.loss_per_iteration[:start]
        keep = sum(1 for it in rec.iteration if it < start)
        rec.iteration, rec.loss = rec.iteration[:keep], rec.loss[:keep]
        rec.accuracy, rec.lr_curve = rec.accuracy[:keep], rec.lr_curve[:keep]
        if rec.alignment:
            keep_a = sum(1 for it in rec.alignment["iteration"] if it < start)
            rec.alignment = {k: v[:keep_a] for k, v in rec.alignment.items()}
        rec.status, rec.message = "running", ""
        # inter-flossing (every floss_inter_every iterations, floss_inter_iters flossing iterations; fresh Adam and
        # generator per episode): /floss/inter_<k>_iteration (E,) and /floss/inter_<k>_losses (E, floss_inter_iters)
        self.inter_key = f"inter_{k}"
        self.inter_its = [int(x) for x in run.floss.get(self.inter_key + "_iteration", []) if int(x) < start]
        self.inter_losses = [list(x) for x in run.floss.get(self.inter_key + "_losses", [])][:len(self.inter_its)]
        self.t0 = self.last_ck = time.monotonic()

    def checkpoint(self, iteration: int) -> None:
        rec = self.rec
        rec.checkpoint = Checkpoint(iteration=iteration, wall_time=self.wall_before + time.monotonic() - self.t0,
                                    weights=_weights_np(self.job.cell), optimizer=_optimizer_np(self.opt),
                                    generators=_gen_states(self.gens))
        rec.wall_time = rec.checkpoint.wall_time
        write_run(self.job.out, self.job.run)

    def interrupt(self, i: int) -> str:
        """Checkpoint at iteration ``i`` and mark the run interrupted; returns the message."""
        run = self.job.run
        run.status = self.rec.status = "interrupted"
        run.message = self.rec.message = f"interrupted at iteration {i} (lr {self.lr:g}); resume with --resume"
        self.checkpoint(i)
        return run.message

    def before(self, i: int) -> None:
        """Inter-flossing before iteration ``i`` where the config asks for it."""
        c, run = self.job.ctx.config, self.job.run
        if c.floss_inter_every and i > 0 and i % c.floss_inter_every == 0:
            fl = _floss(self.job.ctx, self.job.cell, c.floss_inter_iters, _inter_floss_generator(c.seed, i))
            self.inter_its.append(i)
            self.inter_losses.append([float(x) for x in fl["losses"]])
            run.floss[self.inter_key + "_iteration"] = np.asarray(self.inter_its, dtype=np.float64)
            run.floss[self.inter_key + "_losses"] = np.asarray(self.inter_losses, dtype=np.float64)

    def after(self, i: int, trial, batch) -> bool:
        """The rest of iteration ``i`` once the rule wrote ``.grad`` for ``trial`` on ``batch``: the optimizer
        step, the divergence check, logging, progress and checkpoints. False when the run diverged (the file
        is written; with a single learning rate the whole run is marked diverged)."""
        job, rec, c, cell, opt = self.job, self.rec, self.job.ctx.config, self.job.cell, self.opt
        run, lr = job.run, self.lr
        loss = float(trial.loss)
        if c.align_every and i % c.align_every == 0 and math.isfinite(loss):
            _log_alignment(rec, i, cell, batch, job.ctx.task)
        run.summary["step_path"] = self.step_path or (
            "fused-native" if getattr(self.rule, "uses_fast_path", False) else "torch")
        bad = None
        if not math.isfinite(loss):
            bad = f"the loss is {loss} at iteration {i}"
        else:
            opt.step()
            # a tensor's sum is finite iff its entries are (weights far below float overflow); 20x cheaper than
            # isfinite().all() here (10 vs 216 us at 67k weights), checked every iteration
            if not all(math.isfinite(float(getattr(cell, n).detach().sum())) for n in PARAM_NAMES):
                bad = f"the weights became NaN/Inf in the update of iteration {i}"
        if bad is not None:
            last = rec.checkpoint.iteration if rec.checkpoint is not None else 0
            rec.status = "diverged"
            rec.message = (f"Training diverged: {bad} (lr {lr:g}); stopped. The run file keeps the last good "
                           f"checkpoint (iteration {last}); try a smaller learning rate")
            if len(run.runs) == 1:
                run.status, run.message = "diverged", rec.message
            write_run(job.out, run)
            return False
        rec.loss_per_iteration.append(loss)
        if i % c.log_every == 0 or i == c.iters - 1:
            rec.iteration.append(i)
            rec.loss.append(loss)
            rec.accuracy.append(float(job.ctx.task.accuracy(trial.outputs, batch)))
            rec.lr_curve.append(float(opt.param_groups[0]["lr"]))
        job.notify(ProgressEvent("train", self.k, len(run.runs), lr, i + 1, c.iters, job.done(), job.total, loss))
        now = time.monotonic()
        if i + 1 < c.iters and ((i + 1) % c.checkpoint_every == 0
                                or (c.checkpoint_seconds and now - self.last_ck >= c.checkpoint_seconds)):
            self.checkpoint(i + 1)
            self.last_ck = time.monotonic()
        return True

    def complete(self) -> None:
        rec = self.rec
        rec.wall_time = self.wall_before + time.monotonic() - self.t0
        rec.status = "complete"
        rec.final = weights_from_cell(self.job.cell)
        rec.checkpoint = None
        rec.final_loss = _last_logged_mean(rec.loss)
        rec.learning_time = learning_time(rec.loss_per_iteration)
        write_run(self.job.out, self.job.run)


def _train_one(job: _Job, k: int, lr: float, stop: _StopFlag) -> None:
    c = job.ctx.config
    lrun = _LrRun(job, k, lr)
    for i in range(lrun.start, c.iters):
        if stop.event.is_set():
            raise KeyboardInterrupt(lrun.interrupt(i))
        lrun.before(i)
        batch = job.ctx.batch(c.batch, lrun.gens["batch"])
        lrun.opt.zero_grad(set_to_none=True)
        trial = lrun.rule.backward(batch, job.ctx.task)
        if not lrun.after(i, trial, batch):
            if len(job.run.runs) == 1:
                raise TrainingDiverged(lrun.rec.message)
            return
    lrun.complete()


def _log_alignment(rec, iteration: int, cell: RecurrentCell, batch, task) -> None:
    """Cosine and relative error of the gradient the rule just wrote (``.grad``) vs BPTT's on the same batch,
    appended to ``rec.alignment`` (``iteration``, ``cosine_<param>``, ``rel_error_<param>``)."""
    from neuroinit.dynamics.alignment import alignment_with_bptt

    local = {n: getattr(cell, n).grad.detach().clone() if getattr(cell, n).grad is not None
             else torch.zeros_like(getattr(cell, n)) for n in PARAM_NAMES}
    a = alignment_with_bptt(cell, local, batch, task)
    log = rec.alignment
    if not log:
        log.update({"iteration": []} | {f"{k}_{n}": [] for k in ("cosine", "rel_error") for n in PARAM_NAMES})
    log["iteration"].append(iteration)
    for n in PARAM_NAMES:
        log[f"cosine_{n}"].append(a.cosine[n])
        log[f"rel_error_{n}"].append(a.rel_error[n])


def _result(run: RunFile, out: Path) -> TrainResult:
    s = run.summary
    lt = s.get("learning_time")
    return TrainResult(
        out_path=str(out), status=run.status, initial_loss=float(s.get("initial_loss", math.nan)),
        final_loss=float(s.get("final_loss", math.nan)), eval_loss=float(s.get("eval_loss", math.nan)),
        eval_accuracy=float(s.get("eval_accuracy", math.nan)),
        chance_accuracy=float(s.get("chance_accuracy", math.nan)),
        learning_time=None if lt is None or lt == -1 else int(lt), wall_time=float(s.get("wall_time", math.nan)),
        lr=float(s.get("selected_lr", math.nan)), lrs=tuple(r.lr for r in run.runs),
        iterations=int(s.get("iterations", 0)),
        lyapunov_initial=s.get("lyapunov_initial"), lyapunov_final=s.get("lyapunov_final"),
    )
