"""A network's Lyapunov spectrum as ``neuroinit lyapunov`` reports it, before and after flossing.

The network is a run file's stored network (:func:`network_from_run`) or a fresh hardware-aware init
(:func:`fresh_network`); either way it is driven as training drives it: the task's trials at the run's time
step, times the run's input scale (:func:`~neuroinit.experiments.train_config.resolve_settings`; the fresh init takes
training's defaults for its task and model). :func:`analyse` measures the spectrum (:class:`SpectrumSettings`),
optionally flosses the network in place (:class:`FlossSettings`, defaults from
:mod:`~neuroinit.dynamics.flossing`) and measures it again, and returns a :class:`LyapunovReport`.

Seeds: the fresh init draws from ``seed``, inputs and initial states from ``seed + 1`` (the same for both
spectra), flossing from ``seed + 2``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from neuroinit.cells.base import RecurrentCell
from neuroinit.dynamics import flossing
from neuroinit.dynamics.lyapunov import DEFAULT_STEPS, LyapunovResult, lyapunov_spectrum, task_inputs
from neuroinit.experiments.train_config import TrainConfig, resolve_settings
from neuroinit.io.runfile import load_cell, read_run
from neuroinit.tasks import task_from_settings

__all__ = ["FlossSettings", "LyapunovReport", "Network", "SpectrumSettings", "analyse", "driven_spectrum",
           "fresh_network", "network_from_run"]

_RATE_OPTIONS = ("alpha", "activation", "form")
_LIF_OPTIONS = ("dt", "tau_m")


@dataclass(frozen=True)
class SpectrumSettings:
    """How the spectrum is measured: the top ``k`` exponents over ``batch`` sequences of ``steps`` accumulated
    steps after ``warmup`` re-orthonormalised warm-up steps, QR every ``qr_every`` steps."""

    k: int = 1
    batch: int = 10
    steps: int = DEFAULT_STEPS
    warmup: int = 50
    qr_every: int = 1


@dataclass(frozen=True)
class FlossSettings:
    """Flossing before the second spectrum (``iters = 0``: none): :func:`~neuroinit.dynamics.flossing.floss`'s
    settings, its defaults included (the window ``steps`` after ``warmup``, ``k = "auto"``)."""

    iters: int = 0
    mode: str = "local"
    k: int | str = "auto"
    lr: float = 1e-3
    steps: int = flossing.DEFAULT_STEPS
    warmup: int = flossing.DEFAULT_WARMUP


class Network(NamedTuple):
    """A network to analyse and what drives it: ``task`` None is autonomous (``task_name`` "none");
    ``settings`` holds training's ``dt_ms``, ``tau_ms`` and ``input_scale``; ``info`` describes the network
    for the report; ``title`` names it in one line."""

    cell: RecurrentCell
    task: Any
    task_name: str
    settings: dict
    info: dict
    title: str


@dataclass
class LyapunovReport:
    """What :func:`analyse` measured: the spectrum ``before`` flossing and, when it flossed, the flossing
    record ``floss`` and the spectrum ``after``."""

    network: Network
    drive: dict
    before: LyapunovResult
    floss: dict | None = None
    after: LyapunovResult | None = None

    def to_dict(self) -> dict:
        out = {"network": self.network.info, "drive": self.drive, "lyapunov": self.before.summary()}
        if self.floss is not None:
            out["floss"] = self.floss
            out["lyapunov_after_floss"] = self.after.summary()
        return out


def _task(name: str, settings: dict):
    return None if name.lower() == "none" else task_from_settings(name, settings)


def network_from_run(path, which: str = "final", *, task: str | None = None,
                     dtype: torch.dtype = torch.float32) -> Network:
    """The network ``which`` (initial, floss, final) stored in run file ``path``, driven by ``task`` (default
    the run's task; ``"none"``: autonomous) at the run's time step and input scale."""
    cell = load_cell(path, which, dtype=dtype)
    cfg = TrainConfig.from_dict(read_run(path).config)
    settings = resolve_settings(cfg)
    task_name = task or cfg.task
    info = {"run": str(path), "which": which, "model": cell.model, "n_hidden": cell.n_hidden, "gain": cfg.gain,
            "seed": cfg.seed, "config": cell.config()}
    return Network(cell, _task(task_name, settings), task_name, settings, info, f"{path} ({which})")


def fresh_network(model: str, hidden: int, gain: float, *, profile: str = "ideal", task: str = "romo",
                  seed: int = 0, dtype: torch.dtype = torch.float32, input_scale: float | None = None,
                  **options) -> Network:
    """A fresh hardware-aware init (:func:`neuroinit.init.hardware_init`, generator seeded with ``seed``) with
    training's time step, time constants and input scale for ``task`` and ``model`` (``task = "none"``: Romo's,
    autonomous), overridden by ``input_scale`` and the cell ``options``: rate ``alpha`` (dt / tau),
    ``activation`` [tanh], ``form`` [voltage]; LIF ``dt`` and ``tau_m`` in ms (default: the task's time unit
    tau)."""
    from neuroinit.cells import cell_class, make_cell
    from neuroinit.init import hardware_init

    section = cell_class(model).config_section()   # the options a fresh network takes: those its cell has
    allowed = [k for k in (*_RATE_OPTIONS, *_LIF_OPTIONS) if k in section]
    bad = sorted(k for k, v in options.items() if v is not None and k not in allowed)
    if bad:
        raise ValueError(f"Invalid options {', '.join(bad)} for model {model!r}: allowed {', '.join(allowed)}")
    settings = resolve_settings(TrainConfig(task="romo" if task.lower() == "none" else task, model=model,
                                            hidden=hidden, gain=gain, profile=profile, seed=seed))
    kwargs = _fresh_cell_options(model, settings, options)
    if input_scale is not None:
        settings["input_scale"] = input_scale
    task_obj = _task(task, settings)
    n_in, n_out = (1, 2) if task_obj is None else (task_obj.n_in, task_obj.n_out)
    params, report = hardware_init(model, n_in, hidden, n_out, gain, profile,
                                   generator=torch.Generator().manual_seed(seed), dtype=dtype)
    cell = make_cell(model, params, profile=profile, **kwargs)
    info = {"model": model, "n_hidden": hidden, "gain": gain, "used_gain": report.used_gain, "seed": seed,
            "config": cell.config()}
    title = f"fresh {model} network, N = {hidden}, gain {gain:g}, profile {profile}"
    return Network(cell, task_obj, task, settings, info, title)


def _fresh_cell_options(model: str, settings: dict, options: dict) -> dict:
    """The cell's keyword arguments from training's ``settings`` and the given ``options`` (None: default);
    updates ``settings``' dt_ms (and tau_ms for a spiking cell) to what the cell runs at."""
    from neuroinit.cells import cell_class

    if "alpha" in cell_class(model).config_section():   # a rate cell: its time step is alpha = dt / tau
        if options.get("alpha") is not None:
            settings["dt_ms"] = options["alpha"] * settings["tau_ms"]
        return {"alpha": settings["dt_ms"] / settings["tau_ms"], "activation": options.get("activation") or "tanh",
                "form": options.get("form") or "voltage"}
    if options.get("dt") is not None:
        settings["dt_ms"] = options["dt"]
    if options.get("tau_m") is not None:
        settings["tau_ms"] = options["tau_m"]
    return {"dt": settings["dt_ms"], "tau_m": settings["tau_ms"], "tau_out": settings["tau_out_ms"]}


def driven_spectrum(cell: RecurrentCell, task, spec: SpectrumSettings, *, seed: int,
                    input_scale: float = 1.0) -> LyapunovResult:
    """Lyapunov spectrum with inputs (``task``'s trials times ``input_scale``, as training feeds them; ``task``
    None: autonomous) and initial states drawn from ``seed`` (the same for every call)."""
    gen = torch.Generator().manual_seed(seed)
    if task is None:
        return lyapunov_spectrum(cell, None, k=spec.k, steps=spec.steps, batch=spec.batch, warmup=spec.warmup,
                                 qr_every=spec.qr_every, generator=gen)
    if task.n_in != cell.n_in:
        raise ValueError(f"Invalid task {task.name!r} for this network: it has {task.n_in} input channels, the "
                         f"network {cell.n_in}")
    inputs = input_scale * task_inputs(task, batch=spec.batch, length=spec.warmup + spec.steps, generator=gen,
                                       dtype=cell.w_rec.dtype)
    with torch.no_grad():
        return lyapunov_spectrum(cell, inputs, k=spec.k, warmup=spec.warmup, qr_every=spec.qr_every, generator=gen)


def analyse(net: Network, spec: SpectrumSettings = SpectrumSettings(), floss: FlossSettings = FlossSettings(), *,
            seed: int = 0, progress: Callable[[int, float, list[float]], None] | None = None) -> LyapunovReport:
    """The spectrum of ``net`` and, with ``floss.iters > 0``, the flossing record and the spectrum after
    flossing ``net.cell`` in place (module docstring); ``progress`` is flossing's per-iteration callback."""
    cell = net.cell
    if spec.k > cell.observable_size:   # before flossing; the spectrum has K N exponents (lyapunov_spectrum)
        raise ValueError(f"Invalid k {spec.k}: must be between 1 and the state size K N = {cell.observable_size}")
    floss_k = _floss_k(floss.k, cell.n_hidden) if floss.iters else None
    scale = float(net.settings["input_scale"])
    drive = {"task": net.task_name if net.task is not None else "none", "batch": spec.batch, "steps": spec.steps,
             "warmup": spec.warmup, "qr_every": spec.qr_every, "dtype": str(cell.w_rec.dtype).removeprefix("torch."),
             "input_scale": scale, "dt_ms": net.settings["dt_ms"]}
    report = LyapunovReport(net, drive, driven_spectrum(cell, net.task, spec, seed=seed + 1, input_scale=scale))
    if not floss.iters:
        return report
    input_fn = None
    if net.task is not None:
        def input_fn(g):
            return scale * task_inputs(net.task, batch=1, length=floss.warmup + floss.steps, generator=g,
                                       dtype=cell.w_rec.dtype)
    fr = flossing.floss(cell, iters=floss.iters, k=floss_k, mode=floss.mode, lr=floss.lr, input_fn=input_fn,
                        steps=floss.steps, warmup=floss.warmup, generator=torch.Generator().manual_seed(seed + 2),
                        callback=progress)
    report.floss = {**dataclasses.asdict(floss), "k": floss_k, "losses": fr.losses, "exponents": fr.exponents}
    report.after = driven_spectrum(cell, net.task, spec, seed=seed + 1, input_scale=scale)
    return report


def _floss_k(k, n_hidden: int) -> int:
    try:
        return flossing.resolve_floss_k(k, n_hidden)
    except ValueError:
        raise ValueError(f"Invalid floss k {k!r}: allowed auto (max(1, N // {flossing.AUTO_K_FRACTION})) or an "
                         f"integer between 1 and N = {n_hidden}") from None
