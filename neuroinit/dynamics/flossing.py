"""Gradient flossing (Engelken 2023; science.md section 4): push the top Lyapunov exponents toward a target.

Loss per iteration: ``mean_i (lambda_i - target)^2`` over the top ``k`` exponents (an average, not a sum), with
``lambda_i`` the per-step exponents of :func:`~neuroinit.dynamics.lyapunov.lyapunov_spectrum` over a window of
``steps`` steps after a ``warmup`` transient, differentiated through the QR chain (``log|R_ii|`` of
``torch.linalg.qr``). Adam updates ``W_in``, ``W_rec`` and the bias only (never the readout), batch 1, with a
fresh input sequence each iteration.

Modes (how the paper's local flossing is done is not public; ours). Measured with ``neuroinit lyapunov --model rate
--hidden 256 --gain 0.5 --alpha 0.5 --floss-iters 100 --floss-mode MODE --floss-k 1 --seed S`` (Romo inputs,
k = 1, lr 1e-3; top exponent per step over 10 x 500 steps, before -0.28 .. -0.31):

* ``"full"``: autograd through everything, the state trajectory included: ``D_t`` depends on the parameters
  explicitly and through the states ``x_{t-1}`` it is evaluated at (which depend on ``W_in``, ``W_rec``, bias
  and all earlier states). Seed 0: -0.2787 -> +0.0002.
* ``"local"`` (**the paper-style default**: "the same detach as autograd e-prop"): the state is advanced with
  the cell's e-prop detach (``cell.step(..., eprop_detach=True)``): it is cut where it enters the recurrent
  weights (and the LIF reset) and keeps only its leak path to the parameters, so ``d x_i / d W_ij`` is the
  synapse's own eligibility trace (for the voltage-form rate cell ``e_ij <- (1-alpha) e_ij + alpha f(x_j)``).
  Each ``D_t`` is evaluated at that state, so a weight's gradient is made of (a) its explicit appearance in
  ``D_t`` and (b) its eligibility trace times ``f''`` of its own postsynaptic neuron, both multiplied by the
  learning signal that the QR chain (the frame ``Q``, which carries earlier ``D``'s) delivers. No gradient
  crosses from one neuron's state to another's. All three flossed parameters get a gradient (``W_in`` and the
  bias through their eligibility). Seeds 0-3: -0.0002, -0.0033, +0.0001, -0.0013 after 100 iterations. At
  N = 64 it reaches ~0 in 15-20 iterations but can drift back below later (-0.2 after 45 iterations for 2 of
  3 seeds): the window estimate is noisy and the edge is a knife edge (see below).
* ``"detached"``: the whole state trajectory is detached (run without a graph); gradients reach the weights
  only through their explicit appearance in each ``D_t`` (and the frame). Voltage form: only ``W_rec`` gets a
  gradient (``W_in`` and the bias enter ``D_t`` only through the state); rate form: all three, through
  ``f'(a_t)`` recomputed from the detached ``h``. Seeds 0-3: -0.0006, **-0.652**, +0.0014, **-0.689**.
  Why it can run away: Adam's steps are ~``lr`` per entry whatever the gradient's size, so it grows a rank-one
  outlier of ``W_rec`` by ~``lr * N`` in spectral size per step. Past the pitchfork at spectral radius ~1 the
  network settles on a saturated fixed point and the real exponent falls again (it is 0 only at the
  bifurcation); the detached gradient cannot see the saturation and keeps pushing the outlier up, to
  ``log(1 - alpha)``. The e-prop detach keeps each neuron's own saturation (``f''`` times its eligibility) in
  the gradient, which pulls it back.

Hardware profiles: the exponents are those of the network the chip runs (``cell.params()``: weights on the
profile's grid, straight-through gradients), the updates are applied to the **float** weights and stay float;
the training loop re-projects onto the grid. Small flossing steps may therefore leave the quantised network
unchanged until they add up to a grid step. Removed autapses stay at zero (their gradient is masked and the
diagonal is reset after each step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from neuroinit.cells.base import RecurrentCell
from neuroinit.dynamics.lyapunov import lyapunov_spectrum

__all__ = ["AUTO_K_FRACTION", "DEFAULT_STEPS", "DEFAULT_WARMUP", "FLOSSED_PARAMS", "FLOSS_MODES", "FlossResult",
           "floss", "resolve_floss_k"]

FLOSS_MODES = ("local", "full", "detached")
FLOSSED_PARAMS = ("w_in", "w_rec", "bias")
DEFAULT_WARMUP = 20  # transient before the window of ``steps`` steps (ours; "a short transient" in the paper)
DEFAULT_STEPS = 55   # window over which the exponents are estimated (Engelken's reference: Tp = 55)
# k = "auto" floss the top N // AUTO_K_FRACTION exponents (at least 1): 32 at N = 256. Why: flossing only the top
# exponent (k = 1) is pulled straight back by e-prop training; in a trial at N = 256 (Romo, 100 local flossing
# iterations, 2000 e-prop iterations, 3 seeds) k = 32 made e-prop learn at g = 0.5 and 1 where k = 1 did not.
# The measured k table (k in {1, 8, 32, 64} x gains x seeds at N = 256) is in docs/experiments.md ("k table").
AUTO_K_FRACTION = 8


def resolve_floss_k(k, n_hidden: int) -> int:
    """The number of exponents to floss: ``k`` itself (an integer in 1..N) or, for ``k = "auto"``,
    ``max(1, N // AUTO_K_FRACTION)``; anything else is a ValueError naming what is allowed."""
    if isinstance(n_hidden, bool) or not isinstance(n_hidden, int) or n_hidden < 1:
        raise ValueError(f"Invalid n_hidden {n_hidden!r}: must be an integer >= 1")
    if k == "auto":
        return max(1, n_hidden // AUTO_K_FRACTION)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_hidden:
        raise ValueError(f"Invalid k {k!r}: must be 'auto' (N // {AUTO_K_FRACTION}) or an integer between 1 and "
                         f"N = {n_hidden}")
    return k


class FlossResult(NamedTuple):
    """Per iteration: the flossing loss and the top-``k`` exponents (per step) it was computed from, both
    measured before that iteration's update."""

    losses: list[float]
    exponents: list[list[float]]


def floss(cell: RecurrentCell, *, iters: int, k: int | str = "auto", mode: str = "local", target: float = 0.0,
          lr: float = 1e-3, input_fn: Callable[[torch.Generator], Tensor] | None = None,
          steps: int = DEFAULT_STEPS,
          warmup: int = DEFAULT_WARMUP, generator: torch.Generator,
          optimizer: torch.optim.Optimizer | None = None,
          callback: Callable[[int, float, list[float]], None] | None = None) -> FlossResult:
    """Floss ``cell`` in place for ``iters`` Adam iterations (module docstring).

    Args:
        iters: flossing iterations (the paper's pre-flossing: 100).
        k: how many top exponents to push toward ``target``: an integer in 1..N, or ``"auto"``
            (:func:`resolve_floss_k`: ``max(1, N // 8)``).
        mode: ``"local"`` (e-prop detach, default), ``"full"`` (autograd through the trajectory) or
            ``"detached"`` (state trajectory detached; see the module docstring).
        target: the exponent (per step) to push toward; 0 = the edge of chaos.
        lr: Adam learning rate (reference: 1e-3, with N = 80). Adam's steps are about ``lr`` per entry whatever
            the gradient's size, so a coherent (low-rank) update moves ``W_rec``'s spectrum by about ``lr * N``
            per iteration (0.26 at N = 256).
        input_fn: ``input_fn(generator) -> (T, 1, I)`` a fresh input sequence each iteration, ``T >= warmup +
            steps`` (the first ``warmup + steps`` steps are used); typically task trials concatenated with
            :func:`~neuroinit.dynamics.lyapunov.task_inputs`. ``None``: autonomous (zero input) from a fresh
            random initial state each iteration.
        steps: window over which the exponents are estimated (reference: 55).
        warmup: transient before the window, re-orthonormalised, not differentiated.
        generator: draws the initial states and frames (and is passed to ``input_fn``).
        optimizer: continue with this optimizer over ``w_in, w_rec, bias`` (inter-flossing keeps one across
            calls); default a fresh ``Adam(lr=lr)``.
        callback: called after each iteration as ``callback(iteration, loss, exponents)`` (progress bars).
    """
    _check_settings(cell, iters, mode, lr, target, steps, warmup)
    k = resolve_floss_k(k, cell.n_hidden)
    params = [getattr(cell, n) for n in FLOSSED_PARAMS]
    opt = optimizer if optimizer is not None else torch.optim.Adam(params, lr=lr)
    mask = cell.recurrent_mask()
    losses: list[float] = []
    exponents: list[list[float]] = []
    for it in range(iters):
        inputs = None if input_fn is None else _checked_inputs(input_fn(generator), cell.n_in, warmup + steps)
        res = lyapunov_spectrum(cell, inputs, k=k, steps=steps, batch=1, warmup=warmup, generator=generator,
                                differentiable=True, detach_state=(mode == "detached"),
                                eprop_detach=(mode == "local"))
        loss = ((res.per_step[0] - target) ** 2).mean()
        if not bool(torch.isfinite(loss)):
            raise ValueError("Invalid flossing state: the exponents are not finite (a zero Jacobian gives log 0; "
                             "check the network and its inputs)")
        opt.zero_grad()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
        if mask is not None:
            cell.w_rec.grad.mul_(mask)
        opt.step()
        if mask is not None:
            with torch.no_grad():
                cell.w_rec.fill_diagonal_(0.0)
        losses.append(float(loss.detach()))
        exponents.append([float(v) for v in res.per_step[0].detach()])
        if callback is not None:
            callback(it, losses[-1], exponents[-1])
    opt.zero_grad()
    return FlossResult(losses, exponents)


def _check_settings(cell, iters, mode, lr, target, steps, warmup) -> None:
    """:func:`floss`'s arguments, each a ValueError naming what is allowed (k: :func:`resolve_floss_k`)."""
    if not isinstance(cell, RecurrentCell):
        raise ValueError(f"Invalid cell {type(cell).__name__}: expected a RecurrentCell")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"Invalid iters {iters!r}: must be an integer >= 0")
    if mode not in FLOSS_MODES:
        raise ValueError(f"Invalid floss mode {mode!r}: allowed {', '.join(FLOSS_MODES)}")
    for name, val in (("lr", lr), ("target", target)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise ValueError(f"Invalid {name} {val!r}: must be a finite number")
    if lr <= 0:
        raise ValueError(f"Invalid lr {lr!r}: must be > 0")
    for name, val, lo in (("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"Invalid {name} {val!r}: must be an integer >= {lo}")


def _checked_inputs(inputs, n_in: int, length: int) -> Tensor:
    """``input_fn``'s sequence, which must be ``(T, 1, n_in)`` with ``T >= length`` (warmup + steps)."""
    if not isinstance(inputs, Tensor) or inputs.dim() != 3 or inputs.shape[1] != 1 or inputs.shape[0] < length:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"Invalid flossing input {shape}: input_fn must return (T, 1, {n_in}) with T >= warmup + "
                         f"steps = {length}")
    return inputs
