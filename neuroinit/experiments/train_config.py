"""Training configuration: TrainConfig, its validation, defaults by task and model, resolve_settings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from neuroinit.cells import cell_class
from neuroinit.cells.base import CellParams
from neuroinit.cells.lif import RESETS
from neuroinit.cells.rate import ACTIVATIONS, FORMS
from neuroinit.dynamics.flossing import FLOSS_MODES
from neuroinit.learning import RULES
from neuroinit.profiles import load_profile

OPTIMIZERS = ("adam", "sgd")
DTYPES = ("float32", "float64")
LAST_LOGGED = 20           # lr-grid choice and final_loss: mean of the last 20 logged losses (science.md 6.2)
LEARNED_FRACTION = 0.05    # Schuessler's learning time: first iteration with loss < 5% of the initial loss
# Generator streams, numbered for numpy.random.SeedSequence([seed, stream]) (the init uses the seed itself).
_STREAMS = {"batch": 1, "rule": 2, "round": 3, "lyapunov": 4, "floss": 5, "eval": 6, "inter_floss": 7}
# Fields that may change when a run is resumed (they do not change the result).
RESUMABLE_CHANGES = ("checkpoint_every", "checkpoint_seconds")

# Run-setting defaults by task kind are declared by each cell class (``task_defaults``; docs/training.md says why).
# Settings every model has; the others (e.g. tau_m_ms) are the model's own.
_COMMON_SETTINGS = ("dt_ms", "tau_ms", "input_scale")


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
    or Romo's time unit) / ``tau_m_ms`` and ``tau_out_ms`` (LIF) / ``input_scale`` from the cell class's
    ``task_defaults``. ``cell_options``: the model's own constructor arguments (its config section,
    :meth:`~neuroinit.cells.base.RecurrentCell.config_section`, e.g. ``{"tau_a": 500.0, "beta": 0.2}`` for ALIF),
    validated by its constructor. ``lr_grid`` trains once per rate (same seed) and keeps
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
    cell_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.lr_grid, list):
            object.__setattr__(self, "lr_grid", tuple(self.lr_grid))
        self._validate()

    def __hash__(self) -> int:   # cell_options is a dict: hash its items
        return hash(tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                          for k, v in dataclasses.asdict(self).items()))

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
        d["cell_options"] = dict(self.cell_options)
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
        cell_class(self.model)  # ValueError naming the registered models
        if self.rule not in RULES:
            raise ValueError(f"Invalid rule {self.rule!r}: allowed {', '.join(RULES)}")
        if not _is_number(self.gain) or self.gain < 0:
            raise ValueError(f"Invalid gain {self.gain!r}: must be a finite number >= 0")
        if not isinstance(self.profile, str) or not self.profile:
            raise ValueError(f"Invalid profile {self.profile!r}: a bundled profile name or a .toml path")
        profile = load_profile(self.profile)  # ProfileError (a ValueError) naming the problem
        for name in ("hidden", "batch", "iters", "log_every", "checkpoint_every", "eval_batch", "lyapunov_k"):
            val = getattr(self, name)
            if not _is_int(val) or val < 1:
                raise ValueError(f"Invalid {name} {val!r}: must be an integer >= 1")
        if self.lyapunov_k > self.hidden:
            raise ValueError(f"Invalid lyapunov_k {self.lyapunov_k}: at most hidden = {self.hidden}")
        self._validate_flossing()
        self._validate_learning()
        self._validate_device()
        self._validate_flags()
        self._validate_cell()
        s = resolve_settings(self)
        if "alpha" in s and not 0 < s["alpha"] <= 1:
            raise ValueError(f"Invalid dt_ms / tau_ms = {s['dt_ms']:g} / {s['tau_ms']:g}: the {self.model} network "
                             "needs 0 < alpha = dt / tau <= 1")
        _check_cell_kwargs(self, s, profile)
        if _task_kind(self.task) == "romo" and not 0 < s["dt_tau"] <= 1:
            raise ValueError(f"Invalid dt_ms / tau_ms = {s['dt_ms']:g} / {s['tau_ms']:g} for Romo: the task's "
                             "step dt / tau must be in (0, 1]")

    def _validate_flossing(self) -> None:
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
        if not _is_int(self.floss_iters) or self.floss_iters < 0:
            raise ValueError(f"Invalid floss_iters {self.floss_iters!r}: must be an integer >= 0")
        if self.floss_mode not in FLOSS_MODES:
            raise ValueError(f"Invalid floss_mode {self.floss_mode!r}: allowed {', '.join(FLOSS_MODES)}")
        if not _is_number(self.floss_lr) or self.floss_lr <= 0:
            raise ValueError(f"Invalid floss_lr {self.floss_lr!r}: must be a finite number > 0")

    def _validate_learning(self) -> None:
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

    def _validate_device(self) -> None:
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

    def _validate_flags(self) -> None:
        for name in ("clamp_gain", "lyapunov", "fast", "chip_neuron"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Invalid {name} {getattr(self, name)!r}: must be true or false")
        if not _is_int(self.align_every) or self.align_every < 0:
            raise ValueError(f"Invalid align_every {self.align_every!r}: must be an integer >= 0 (0 = off)")
        if self.align_every and self.rule == "bptt":
            raise ValueError("Invalid align_every with rule 'bptt': it compares a local rule's gradient with "
                             "BPTT's; use eprop, eprop-autograd or rflo")

    def _validate_cell(self) -> None:
        section = cell_class(self.model).config_section()
        if self.form is not None:
            if "form" not in section:
                raise ValueError(f"Invalid form {self.form!r} for model {self.model!r}: form is for rate networks")
            if self.form not in FORMS:
                raise ValueError(f"Invalid form {self.form!r}: allowed {', '.join(FORMS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Invalid activation {self.activation!r}: allowed {', '.join(ACTIVATIONS)}")
        for name in ("dt_ms", "tau_ms", "tau_m_ms", "tau_out_ms", "input_scale"):
            val = getattr(self, name)
            if val is not None and (not _is_number(val) or val <= 0):
                raise ValueError(f"Invalid {name} {val!r}: must be a finite number > 0")
        defaults = _task_defaults(self)
        for name in ("tau_m_ms", "tau_out_ms"):
            if getattr(self, name) is not None and name not in defaults:
                raise ValueError(f"Invalid {name} for a {self.model} network: it sets a LIF time constant (the "
                                 f"{self.model} network's settings: {', '.join(defaults)})")
        if "tau_m_ms" in defaults and _task_kind(self.task) != "romo" and self.tau_ms is not None:
            raise ValueError(f"Invalid tau_ms for a {self.model} network on a neurogym task: it is the Romo task's "
                             "time unit; set the membrane with tau_m_ms")
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
        if (self.chip_neuron is True or self.tau_syn_ms is not None) and "tau_syn" not in section:
            raise ValueError(f"Invalid chip_neuron / tau_syn_ms for a {self.model} network: they set LIF neuron "
                             "options")
        self._validate_cell_options(section)

    def _validate_cell_options(self, section: dict) -> None:
        if not isinstance(self.cell_options, dict):
            raise ValueError(  # noqa: TRY004  (the project's one error type for bad input)
                f"Invalid cell_options {self.cell_options!r}: a mapping of {self.model} options")
        unknown = sorted(set(self.cell_options) - set(section))
        if unknown:
            raise ValueError(f"Invalid cell_options {unknown} for model {self.model!r}: allowed "
                             f"{', '.join(section)}")


def _task_defaults(config: TrainConfig) -> dict:
    """The cell class's run-setting defaults for the config's task kind."""
    cls = cell_class(config.model)
    kind = _task_kind(config.task)
    if kind not in cls.task_defaults:
        raise ValueError(f"Invalid model {config.model!r} for task kind {kind!r}: its class declares run settings "
                         f"for {', '.join(cls.task_defaults) or 'no task'} (task_defaults)")
    return cls.task_defaults[kind]


def _check_cell_kwargs(config: TrainConfig, settings: dict, profile) -> None:
    """Build the model's cell once on a 1-neuron network: its constructor validates the run's options
    (``profile``: the config's, already loaded)."""
    cls = cell_class(config.model)
    one = torch.zeros(1, 1, dtype=torch.float64)
    tiny = CellParams(one, one.clone(), one[0].clone(), one.clone(), one[0].clone())
    try:
        cls(tiny, profile=profile, **cls.train_kwargs(settings, config, profile))
    except TypeError as e:   # an option the constructor does not take
        raise ValueError(f"Invalid options for model {config.model!r}: {e}") from None


def resolve_settings(config: TrainConfig) -> dict[str, Any]:
    """The concrete values behind every ``None`` in ``config`` (stored in the run file as ``/settings``): the
    cell class's ``task_defaults`` for the task kind, then its ``derived_settings`` (a rate net's ``alpha`` and
    ``form``)."""
    d = _task_defaults(config)

    def pick(name):
        val = getattr(config, name, None)
        val = d.get(name) if val is None else val
        return None if val is None else float(val)

    dt, tau = pick("dt_ms"), pick("tau_ms")
    out: dict[str, Any] = {"dt_ms": dt, "tau_ms": tau}
    for name in d:
        if name not in _COMMON_SETTINGS:
            out[name] = pick(name)
    out.update(cell_class(config.model).derived_settings(out, config))
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
