"""Learning at a chip's precision: weight updates that land on the weight grid, traces held in few bits.

Hardware constraints attach to the optimizer step, not to the rule (DESIGN.md §3): the rule writes an exact
(float) gradient, the optimizer computes its float update, and a post-step hook moves every chip-resident
matrix back onto its grid with the profile's rounding (stochastic for ReckOn's +-1 updates and Loihi's
learning engine), saturating at the largest code as the synapse memory does. Eligibility traces are held on a
``trace_bits`` fixed-point grid with stochastic rounding (Loihi: 7-bit traces with stochastic rounding;
ReckOn: 12/12/10-bit traces). With a float profile (``ideal``) both are the identity, so the chip path equals
the float path bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from neuroinit.cells.base import QUANTISED_PARAMS, RecurrentCell
from neuroinit.quantize import Grid, quantize

__all__ = ["attach_chip_constraints", "learning_grids", "make_trace_quantiser"]


def learning_grids(cell: RecurrentCell) -> dict[str, Grid | None]:
    """Grids weights live on while learning: the inference grids, refined to ``learning.weight_bits`` codes
    over the same value range when the chip learns in more bits than it infers with (Loihi: 9-bit learning
    weights, 8-bit synaptic weights), so the forward pass sees the top bits."""
    profile = cell.profile
    out: dict[str, Grid | None] = {}
    for name in QUANTISED_PARAMS:
        grid = cell.grids[name]
        extra = 0
        if grid is not None and profile.learning is not None and profile.learning.weight_bits:
            extra = max(profile.learning.weight_bits - profile.weights.bits, 0)
        if grid is None or extra == 0:
            out[name] = grid
        else:
            f = 2 ** extra
            exp = None if grid.exponent is None else grid.exponent - extra
            out[name] = Grid(grid.scale / f, grid.code_min * f, grid.code_max * f, exp)
    return out


def attach_chip_constraints(optimizer: torch.optim.Optimizer, cell: RecurrentCell, *,
                            generator: torch.Generator | None = None, rounding: str | None = None):
    """Register a post-step hook on ``optimizer`` that projects the cell's chip matrices onto their learning
    grids with ``rounding`` (default: the profile's ``learning.weight_update``, else nearest). Returns the hook
    handle (``handle.remove()`` detaches it). A no-op for float profiles."""
    grids = learning_grids(cell)
    if rounding is None:
        rounding = cell.profile.learning.weight_update if cell.profile.learning is not None else "nearest"
    if rounding == "stochastic" and generator is None and not cell.profile.weights.is_float:
        raise ValueError("Invalid chip constraints: stochastic weight updates need a generator "
                         "(pass generator=torch.Generator().manual_seed(...))")

    @torch.no_grad()
    def project(_opt, _args, _kwargs) -> None:
        for name in QUANTISED_PARAMS:
            grid = grids[name]
            if grid is not None:
                p = getattr(cell, name)
                p.copy_(quantize(p, grid, rounding=rounding, generator=generator))
        if cell.remove_autapses:  # removed autapses stay at zero (in place: no N x N mask per step)
            cell.w_rec.diagonal().zero_()

    return optimizer.register_step_post_hook(project)


def make_trace_quantiser(cell: RecurrentCell, *, generator: torch.Generator, input_bound: float = 2.0,
                         rounding: str = "stochastic") -> Callable[[str, torch.Tensor], torch.Tensor] | None:
    """A ``quantise(name, trace)`` callable for :func:`neuroinit.learning.online.trace_step` holding traces
    on signed ``trace_bits`` grids with stochastic rounding, or None when the profile has no on-chip learning
    or float traces.

    Each trace's grid is a power of two sized from the trace's bound (the cell's :meth:`trace_bounds`): a
    presynaptic trace of a signal bounded by ``b`` stays below ``b * pre_gain / (1 - pre_decay)``; spikes and
    tanh rates are bounded by ``pre_rec`` (1), inputs by ``input_bound``; eligibility traces add the factor
    ``post / (1 - elig_decay)``; further eligibility components (``hidden``: their bound relative to the
    presynaptic trace) scale the presynaptic bound. ``rounding="nearest"`` rounds deterministically (the chip
    rounds stochastically; nearest is for checking arithmetic exactly)."""
    if rounding not in ("stochastic", "nearest"):
        raise ValueError(f"Invalid rounding {rounding!r}: allowed 'stochastic', 'nearest'")
    profile = cell.profile
    if not profile.learns_on_chip or profile.learning.trace_bits == 0:
        return None
    bits = profile.learning.trace_bits
    qmax = 2 ** (bits - 1) - 1
    pd, pg, ed, rd = cell.trace_spec()
    cell_bounds = cell.trace_bounds()
    post_max = cell_bounds["post"]
    pre_bound = {"pre_rec": cell_bounds["pre_rec"], "pre_in": input_bound, "pre_bias": 1.0}
    pre_bound = {k: v * pg / (1 - pd) for k, v in pre_bound.items()}
    bounds = dict(pre_bound)
    for pre, elig in (("pre_rec", "elig_rec"), ("pre_in", "elig_in"), ("pre_bias", "elig_bias")):
        bounds[elig] = pre_bound[pre] * post_max / (1 - ed)
        for k, rel in enumerate(cell_bounds.get("hidden", ()), start=1):
            bounds[f"{pre.replace('pre', 'hidden')}{k}"] = pre_bound[pre] * rel
    bounds["readout"] = bounds["readout_bias"] = 1.0 / (1 - rd)
    grids = {k: Grid(2.0 ** math.ceil(math.log2(b / qmax)), -qmax - 1, qmax) for k, b in bounds.items()}

    def quantise(name: str, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, grids[name], rounding=rounding, generator=generator)

    quantise.grids, quantise.rounding = grids, rounding  # read by the fused step to round in its own loop
    return quantise
