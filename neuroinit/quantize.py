"""Integer weight grids: choosing a scale, rounding (nearest / stochastic), saturation and fake-quantisation.

A weight matrix on a chip is an integer code per synapse times one scale shared by the matrix (and, for LIF
networks, by the threshold, so spikes happen at the same place in float and in integers)::

    value = code * scale,   code in [code_min, code_max]

``pow2`` profiles restrict ``scale = 2^e`` with ``e`` in the profile's exponent range (Loihi's weight exponent,
Xylo's and ReckOn's bit shifts); ``free`` profiles take any positive scale (SpiNNaker 2: 127 / max|W|).
Out-of-range codes saturate, as the chips' weight memories do. Float profiles (``bits = 0``) have no grid:
every function here is then the identity and returns its input unchanged, so the ideal path equals the float
path bit for bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from neuroinit.profiles import WeightSpec

__all__ = [
    "Grid", "choose_grid", "stochastic_round", "round_to_codes", "codes_to_values", "quantize",
    "fake_quantize", "saturate_int", "wrap_int",
]


class Grid(NamedTuple):
    """An integer grid ``value = code * scale`` with codes in [code_min, code_max]."""

    scale: float
    code_min: int
    code_max: int
    exponent: int | None = None  # e with scale = 2^e for pow2 grids, else None

    @property
    def value_max(self) -> float:
        return self.code_max * self.scale

    @property
    def value_min(self) -> float:
        return self.code_min * self.scale


def choose_grid(max_abs: float, spec: WeightSpec, *, min_scale: float = 0.0) -> Grid | None:
    """The grid a chip toolchain would pick for a matrix whose largest magnitude is ``max_abs``.

    pow2: the smallest ``e`` in [exponent_min, exponent_max] with ``max_abs <= code_max * 2^e`` (as Lava's
    ``optimize_weight_bits`` and nengo-loihi do); weights beyond ``code_max * 2^exponent_max`` saturate, and
    below ``2^exponent_min`` they round to zero. free: ``scale = max_abs / code_max`` (SpiNNaker 2's
    127 / max|W|). ``min_scale`` forces a coarser grid (used so that a LIF threshold fits its mantissa).
    Returns None for float weights.
    """
    if spec.is_float:
        return None
    if not math.isfinite(max_abs) or max_abs < 0:
        raise ValueError(f"Invalid max_abs {max_abs!r}: must be a finite, non-negative number")
    qmax = spec.code_max
    if spec.scaling == "free":
        scale = max(max_abs / qmax, min_scale)
        return Grid(scale if scale > 0 else 1.0, spec.code_min, qmax, None)
    e = _pow2_exponent(max_abs, qmax, min_scale, spec.exponent_min, spec.exponent_max)
    return Grid(2.0 ** e, spec.code_min, qmax, e)


def _pow2_exponent(max_abs: float, qmax: int, min_scale: float, e_min: int, e_max: int) -> int:
    """The smallest e in [e_min, e_max] with ``max_abs <= qmax * 2^e`` and ``2^e >= min_scale``
    (e_max when none fits), decided by exact comparisons (``qmax * 2^e`` and ``2^e`` are exact floats).
    ``ceil(log2(max_abs / qmax))`` alone is off by one when the division or the logarithm rounds onto a power
    of two, e.g. for max_abs one ulp above ``qmax * 2^e``."""

    def fits(k: int) -> bool:
        return max_abs <= math.ldexp(qmax, k) and math.ldexp(1.0, k) >= min_scale

    need = max(max_abs / qmax, min_scale)
    e = min(max(math.frexp(need)[1] if need > 0 else e_min, e_min), e_max)  # need < 2^e: within one
    while e > e_min and fits(e - 1):
        e -= 1
    while e < e_max and not fits(e):
        e += 1
    return e


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round to floor(x) or floor(x)+1 with probability 1 - frac(x) and frac(x): unbiased, E[round(x)] = x."""
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    # Compare u with the exact fraction (x - floor(x) is exact in floating point) instead of floor(x + u):
    # x + u rounds once more, which shifts P(up) by up to ulp(x)/2 (float32: 0.31 instead of 0.25 at
    # x = 2^20 + 0.25) and can even move an integer x (1000 + 0.99999994 rounds to 1001 in float32).
    low = torch.floor(x)
    return low + (u >= 1 - (x - low)).to(x.dtype)


def round_to_codes(x: torch.Tensor, grid: Grid, *, rounding: str = "nearest",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer-valued codes (same float dtype as ``x``) of ``x`` on ``grid``, saturated to the code range.

    Nearest rounding is round-half-to-even (``torch.round``). Stochastic rounding needs a generator for
    reproducibility.
    """
    scaled = x / grid.scale
    if rounding == "nearest":
        codes = torch.round(scaled)
    elif rounding == "stochastic":
        codes = stochastic_round(scaled, generator)
    else:
        raise ValueError(f"Invalid rounding {rounding!r}: allowed 'nearest', 'stochastic'")
    return codes.clamp(grid.code_min, grid.code_max)


def codes_to_values(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    return codes * grid.scale


def quantize(x: torch.Tensor, grid: Grid | None, *, rounding: str = "nearest",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Values of ``x`` moved onto ``grid`` (identity, the same tensor, when ``grid`` is None)."""
    if grid is None:
        return x
    return codes_to_values(round_to_codes(x, grid, rounding=rounding, generator=generator), grid)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q):
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize(x: torch.Tensor, grid: Grid | None) -> torch.Tensor:
    """Forward: ``x`` on the grid (nearest). Backward: straight-through (gradient passed unchanged)."""
    if grid is None:
        return x
    return _StraightThrough.apply(x, quantize(x.detach(), grid))


def saturate_int(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Clamp integer values to the signed ``bits``-bit range (two's complement)."""
    if bits == 0:
        return x
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return x.clamp(lo, hi)


def wrap_int(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Wrap integer values into the signed ``bits``-bit range, as two's-complement overflow does."""
    if bits == 0:
        return x
    if not x.is_floating_point() and bits >= torch.iinfo(x.dtype).bits:
        return x  # the integer dtype already wraps at (or inside) this width; 1 << 64 would not even convert
    m, half = 1 << bits, 1 << (bits - 1)
    if x.is_floating_point():  # Python ints >= 2^63 do not convert to a tensor scalar; floats hold 2^k exactly
        m, half = float(m), float(half)
    return torch.remainder(x + half, m) - half
