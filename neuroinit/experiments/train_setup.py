"""A training run's pieces: results, the run context (generators, optimizer), checkpoint state and run-file helpers."""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

import numpy as np
import torch

from neuroinit.cells import cell_class, make_cell
from neuroinit.cells.base import PARAM_NAMES, RecurrentCell
from neuroinit.experiments.train_config import (
    _STREAMS,
    LAST_LOGGED,
    LEARNED_FRACTION,
    RESUMABLE_CHANGES,
    TrainConfig,
    resolve_settings,
)
from neuroinit.io.runfile import (
    FORMAT_VERSION,
    RunFile,
    RunRecord,
    package_versions,
)
from neuroinit.learning import make_rule
from neuroinit.profiles import load_profile

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
        from neuroinit.tasks import task_from_settings

        self.config = config
        self.settings = resolve_settings(config)
        self.device = torch.device(config.device)
        self.dtype = _dtype(config.dtype)
        self.profile = load_profile(config.profile)
        s = self.settings
        self.task = task_from_settings(config.task, s)
        self.cell_kwargs = cell_class(config.model).train_kwargs(s, config, self.profile)
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
                             v_th=c.v_th if cell_class(c.model).spiking else 1.0, dtype=self.dtype, device=self.device,
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
            # the fused native steps where the cell and device allow them (float32, CPU): online e-prop / RFLO
            # (neuroinit.learning.fused: the PyTorch step's results to float32 rounding; chip-precision traces as
            # integer codes with the same rounding distribution, their own random draws) and BPTT
            # (neuroinit.learning.fused_bptt); the PyTorch step otherwise
            rule.fast = bool(self.config.fast)
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
        # torch's fused (single-kernel) update: the same rule in one kernel instead of a loop over the tensors
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
    :func:`neuroinit.experiments.run_identity.comparable_config`, so a file written before a field was added, or
    with a setting that has no effect, still resumes)."""
    from neuroinit.experiments.run_identity import comparable_config

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
