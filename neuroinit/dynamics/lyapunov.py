"""Lyapunov spectra of recurrent cells by the QR (Benettin) method (science.md section 3).

For any :class:`~neuroinit.cells.base.RecurrentCell`, through the cell contract only: ``cell.step`` advances the
state and ``cell.jacobian`` gives the step Jacobian ``D_t = d obs_t / d obs_{t-1}`` of the observable
(``cell.observable``, K N numbers: the K state variables of each of the N neurons; K = 1 for rate and LIF
cells, 2 for adaptive LIF). An orthonormal ``K N x k`` frame ``Q`` is carried along the trajectory::

    Q <- D_t Q                         every step
    Q, R = qr(Q)                       every ``qr_every`` steps (and after the last step)
    lambda_i += log|R_ii|              (natural log; R's diagonal may be negative)

and ``lambda_i / (number of steps)`` is the i-th exponent **per step**; per tau it is divided by ``dt / tau``
(``alpha`` for rate cells, ``dt / tau_m`` for LIF cells). A warm-up of ``warmup`` steps runs first with the same
propagation and re-orthonormalisation (so the frame aligns with the leading Lyapunov vectors without
overflowing) and its ``log|R_ii|`` are discarded.

Which Jacobian:

* rate cells: the exact Jacobian (voltage form ``(1-alpha) I + alpha W_rec diag(f'(x_{t-1}))``; rate form
  ``(1-alpha) I + alpha diag(f'(a_t)) W_rec``);
* LIF cells: the **surrogate** (pseudo-derivative) Jacobian of :meth:`~neuroinit.cells.lif.LIFRNN.jacobian`.
  The Heaviside spike has zero derivative almost everywhere, so the true Jacobian of a LIF network only holds the
  leak and the reset; the spectrum reported for LIF networks replaces it by the pseudo-derivative, as
  surrogate-gradient flossing does. It is the spectrum of the linearisation that gradients see, not the
  exponent of the discontinuous spiking dynamics (which a two-trajectory estimate would measure).

Inputs (ours, documented):

* ``inputs`` ``(T, B, I)`` given: the network is driven by them, the first ``warmup`` steps warm up and the
  remaining ``T - warmup`` (or the first ``steps`` of them) are accumulated. Task trials are short (Romo: 56
  steps), so :func:`task_inputs` concatenates whole trials back to back into longer sequences (a network that
  runs continuously from one trial into the next).
* ``inputs=None``: autonomous (zero input) for ``warmup + steps`` steps (``steps`` default 500).
* The initial state is the cell's ``init_state`` with a small random observable (standard deviation
  ``init_scale = 0.1``, drawn from ``generator``), never exactly zero: a ReLU network at zero state with zero
  input has a zero Jacobian (``log 0``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from neuroinit.cells.base import RecurrentCell

__all__ = [
    "DEFAULT_STEPS",
    "INIT_SCALE",
    "LyapunovResult",
    "dt_over_tau",
    "lyapunov_spectrum",
    "max_exponent",
    "task_inputs",
    "two_trajectory_exponent",
    "with_observable",
]

DEFAULT_STEPS = 500  # autonomous runs: accumulated steps when ``steps`` is not given
INIT_SCALE = 0.1     # standard deviation of the random initial observable


class LyapunovResult(NamedTuple):
    """Top-``k`` Lyapunov exponents, natural log, in the order of the frame's columns (decreasing up to
    finite-time noise).

    ``per_step`` (B, k): per sequence, per step; ``mean`` / ``std`` (k,): over the batch (``std`` is the
    unbiased spread, 0 for a batch of one); ``per_tau`` (k,): ``mean / (dt / tau)``; ``k``: how many.
    """

    per_step: Tensor
    mean: Tensor
    std: Tensor
    per_tau: Tensor
    k: int

    def summary(self) -> dict:
        """Plain Python values (JSON, run files): ``k``, ``max`` and ``max_per_tau`` (the top exponent),
        ``mean_per_step``, ``std_per_step``, ``per_tau`` (k each) and ``per_sequence`` (B lists of k)."""
        mean, std, per_tau = self.mean.detach(), self.std.detach(), self.per_tau.detach()
        return {"k": int(self.k), "max": float(mean[0]), "max_per_tau": float(per_tau[0]),
                "mean_per_step": [float(v) for v in mean], "std_per_step": [float(v) for v in std],
                "per_tau": [float(v) for v in per_tau],
                "per_sequence": [[float(v) for v in row] for row in self.per_step.detach()]}


def dt_over_tau(cell: RecurrentCell) -> float:
    """The cell's time step in units of its time constant (:meth:`RecurrentCell.dt_over_tau`: ``alpha`` for
    rate cells, ``dt / tau_m`` for LIF cells, whose ``alpha`` is ``exp(-dt / tau_m)``)."""
    return float(cell.dt_over_tau())


def with_observable(cell: RecurrentCell, state: Any, obs: Tensor) -> Any:
    """``state`` with its observable replaced by ``obs`` (:meth:`RecurrentCell.with_observable`)."""
    return cell.with_observable(state, obs)


def _random_state(cell: RecurrentCell, batch: int, generator: torch.Generator, dtype, device,
                  init_scale: float) -> Any:
    state = cell.init_state(batch)
    obs = cell.observable(state)
    noise = init_scale * torch.randn(obs.shape, generator=generator, dtype=torch.float64)
    return with_observable(cell, state, obs + noise.to(dtype=dtype, device=device))


def _random_frame(n: int, k: int, batch: int, generator: torch.Generator, dtype, device) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(batch, n, k, generator=generator, dtype=torch.float64))
    return q.to(dtype=dtype, device=device)


def _detach_state(state: Any) -> Any:
    return type(state)(*(s.detach() for s in state))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name} {value!r}: must be an integer >= {minimum}")
    return value


def task_inputs(task, *, batch: int, length: int, generator: torch.Generator,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Tensor:
    """``(length, batch, n_in)`` task inputs: whole trials of ``task`` drawn with ``generator`` and concatenated
    back to back along time (each of the ``batch`` sequences gets its own trials), cut at ``length``."""
    _check_int("length", length, 1)
    _check_int("batch", batch, 1)
    chunks, total = [], 0
    while total < length:
        u = task.batch(batch, generator=generator, dtype=dtype, device=device).inputs
        chunks.append(u)
        total += u.shape[0]
    return torch.cat(chunks)[:length]


def lyapunov_spectrum(cell: RecurrentCell, inputs: Tensor | None = None, *, k: int = 1, steps: int | None = None,
                      batch: int = 10, warmup: int = 50, qr_every: int = 1, generator: torch.Generator,
                      differentiable: bool = False, detach_state: bool = False, eprop_detach: bool = False,
                      init_scale: float = INIT_SCALE) -> LyapunovResult:
    """Top-``k`` Lyapunov exponents of ``cell`` by the QR method (module docstring).

    Args:
        inputs: ``(T, B, I)`` driving inputs (``batch`` is then ``B``), or ``None`` for autonomous dynamics.
        k: how many exponents (1 = the maximum, up to ``N``).
        steps: accumulated steps; default ``T - warmup`` with inputs, :data:`DEFAULT_STEPS` autonomous.
        batch: sequences (autonomous only; with inputs it is their batch size).
        warmup: re-orthonormalised warm-up steps whose growth is discarded.
        qr_every: re-orthonormalise every this many steps (1 = every step). Keep ``qr_every * |lambda_1|``
            well below the dtype's exponent range (float32: ~80) or the frame overflows.
        generator: draws the initial state and the initial frame.
        differentiable: keep the autograd graph of the accumulated steps (flossing). The warm-up always runs
            without a graph: the accumulation starts from a detached state and frame.
        detach_state: with ``differentiable``, detach the state trajectory: each ``D_t`` is evaluated at a
            detached state, so gradients reach the parameters only through their explicit appearance in ``D_t``
            (and through the frame ``Q`` that carries earlier ``D``'s), never through the states. This is the
            flossing mode ``"detached"`` (see :mod:`neuroinit.dynamics.flossing`).
        eprop_detach: with ``differentiable``, advance the state with the cell's e-prop detach
            (``cell.step(..., eprop_detach=True)``: the state is cut where it enters the recurrent weights and
            the reset, the leak path keeps its gradient), and evaluate each ``D_t`` at that state. This is the
            local flossing gradient (mode ``"local"``). Excludes ``detach_state``.
        init_scale: standard deviation of the random initial observable.
    """
    if not isinstance(cell, RecurrentCell):
        raise ValueError(f"Invalid cell {type(cell).__name__}: expected a RecurrentCell")
    n = cell.observable_size
    _check_int("k", k, 1)
    if k > n:
        raise ValueError(f"Invalid k {k}: must be between 1 and the size of the state K N = {n}")
    _check_int("warmup", warmup, 0)
    _check_int("qr_every", qr_every, 1)
    if detach_state and eprop_detach:
        raise ValueError("Invalid options: detach_state and eprop_detach exclude each other")
    if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"Invalid init_scale {init_scale!r}: must be a positive finite number")
    dtype, device = cell.w_rec.dtype, cell.w_rec.device
    inputs, steps, batch = _driving_inputs(cell, inputs, steps=steps, batch=batch, warmup=warmup)

    with torch.no_grad():
        state = _random_state(cell, batch, generator, dtype, device, float(init_scale))
        q = _random_frame(n, k, batch, generator, dtype, device)
        state, q, _ = _run(cell, cell.params(), state, q, inputs[:warmup], qr_every, track_state=False)
    with torch.set_grad_enabled(differentiable):
        params = cell.params()
        _, _, log_sum = _run(cell, params, state, q, inputs[warmup:], qr_every,
                             track_state=differentiable and not detach_state, eprop_detach=eprop_detach)
    per_step = log_sum / steps
    mean = per_step.mean(0)
    std = per_step.std(0) if batch > 1 else torch.zeros_like(mean)
    return LyapunovResult(per_step=per_step, mean=mean, std=std, per_tau=mean / dt_over_tau(cell), k=k)


def _driving_inputs(cell: RecurrentCell, inputs: Tensor | None, *, steps: int | None, batch: int,
                    warmup: int) -> tuple[Tensor, int, int]:
    """The ``(warmup + steps, B, I)`` inputs that drive an exponent estimate, on the cell's dtype and device:
    zeros for ``batch`` autonomous sequences of ``steps`` (default :data:`DEFAULT_STEPS`) when ``inputs`` is
    None, else the first ``warmup + steps`` steps of ``inputs`` (default: all of them). Returns
    ``(inputs, steps, batch)``."""
    dtype, device = cell.w_rec.dtype, cell.w_rec.device
    if inputs is None:
        _check_int("batch", batch, 1)
        steps = DEFAULT_STEPS if steps is None else _check_int("steps", steps, 1)
        return torch.zeros(warmup + steps, batch, cell.n_in, dtype=dtype, device=device), steps, batch
    if not isinstance(inputs, Tensor) or inputs.dim() != 3 or inputs.shape[-1] != cell.n_in:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"Invalid inputs {shape}: expected a (T, B, {cell.n_in}) tensor")
    if not bool(torch.isfinite(inputs).all()):
        raise ValueError("Invalid inputs: they contain NaN or infinite values")
    avail = inputs.shape[0] - warmup
    if avail < 1:
        raise ValueError(f"Invalid inputs of {inputs.shape[0]} steps: need more than warmup = {warmup} "
                         "(use task_inputs to concatenate trials)")
    steps = avail if steps is None else _check_int("steps", steps, 1)
    if steps > avail:
        raise ValueError(f"Invalid steps {steps}: the inputs hold only {avail} steps after the warm-up")
    return inputs[:warmup + steps].to(dtype=dtype, device=device), steps, inputs.shape[1]


def _run(cell: RecurrentCell, params, state: Any, q: Tensor, inputs: Tensor, qr_every: int, *,
         track_state: bool, eprop_detach: bool = False) -> tuple[Any, Tensor, Tensor]:
    """Carry the frame ``q`` (B, N, k) along the trajectory driven by ``inputs``; returns the final state, the
    final (orthonormal) frame and ``sum log|R_ii|`` (B, k). ``track_state=False`` advances the state without an
    autograd graph (each ``D_t`` is then evaluated at a detached state); ``eprop_detach`` steps the cell with
    its e-prop detach (the state keeps only its leak path to the parameters)."""
    log_sum = q.new_zeros(q.shape[0], q.shape[2])
    pending = 0
    for u in inputs:
        q = cell.jacobian_apply(params, state, u, q)  # D_t q, D_t taken at the state the step starts from
        if track_state:
            state = cell.step(params, state, u, eprop_detach=eprop_detach)[1]
        else:
            with torch.no_grad():
                state = _detach_state(cell.step(params, state, u)[1])
        pending += 1
        if pending == qr_every:
            q, log_r = _orthonormalise(q)
            log_sum = log_sum + log_r
            pending = 0
    if pending:
        q, log_r = _orthonormalise(q)
        log_sum = log_sum + log_r
    return state, q, log_sum


def _orthonormalise(q: Tensor) -> tuple[Tensor, Tensor]:
    """``Q, R = qr(q)``; returns ``Q`` and ``log|diag R|`` (B, k)."""
    q, r = torch.linalg.qr(q)
    return q, torch.log(torch.abs(torch.diagonal(r, dim1=-2, dim2=-1)))


def max_exponent(cell: RecurrentCell, inputs: Tensor | None = None, **kw) -> float:
    """The largest Lyapunov exponent per step, batch mean (:func:`lyapunov_spectrum` with ``k = 1``)."""
    kw.pop("k", None)
    return float(lyapunov_spectrum(cell, inputs, k=1, **kw).mean[0].detach())


def two_trajectory_exponent(cell: RecurrentCell, inputs: Tensor | None = None, *, steps: int | None = None,
                            batch: int = 10, warmup: int = 50, eps: float = 1e-7, renorm_every: int = 1,
                            generator: torch.Generator, init_scale: float = INIT_SCALE) -> Tensor:
    """The largest exponent per step, per sequence (B,), from two nearby trajectories (no Jacobian).

    A reference and a perturbed copy (observable offset by ``eps`` in a random direction) run side by side on the
    same inputs; every ``renorm_every`` steps the growth ``log(|d| / eps)`` of their distance ``d`` in the
    observable is accumulated and the copy is pulled back to distance ``eps`` along ``d``. An independent check
    of the QR method for cells whose whole state is the observable (rate cells); for LIF cells it measures the
    exponent of the discontinuous spiking dynamics, not the surrogate one. Same input and step conventions as
    :func:`lyapunov_spectrum`."""
    _check_int("warmup", warmup, 0)
    _check_int("renorm_every", renorm_every, 1)
    dtype, device = cell.w_rec.dtype, cell.w_rec.device
    inputs, steps, batch = _driving_inputs(cell, inputs, steps=steps, batch=batch, warmup=warmup)
    with torch.no_grad():
        params = cell.params()
        ref = _random_state(cell, batch, generator, dtype, device, float(init_scale))
        for u in inputs[:warmup]:
            ref = cell.step(params, ref, u)[1]
        direction = torch.randn(batch, cell.observable_size, generator=generator, dtype=torch.float64)
        direction = (direction / direction.norm(dim=1, keepdim=True)).to(dtype=dtype, device=device)
        pert = with_observable(cell, ref, cell.observable(ref) + eps * direction)
        log_sum = torch.zeros(batch, dtype=dtype, device=device)
        for t, u in enumerate(inputs[warmup:], start=1):
            ref = cell.step(params, ref, u)[1]
            pert = cell.step(params, pert, u)[1]
            if t % renorm_every == 0 or t == steps:
                d = cell.observable(pert) - cell.observable(ref)
                dist = d.norm(dim=1)
                log_sum += torch.log(dist / eps)
                pert = with_observable(cell, pert, cell.observable(ref) + eps * d / dist[:, None])
    return log_sum / steps
