"""Integer weight grids (neuroinit.quantize): property tests that quantisers stay on the grid and saturate as a
chip's weight memory does, plus hand-computed two's-complement cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from neuroinit.profiles import WeightSpec
from neuroinit.quantize import (
    Grid,
    choose_grid,
    codes_to_values,
    fake_quantize,
    quantize,
    round_to_codes,
    saturate_int,
    stochastic_round,
    wrap_int,
)

# Fixed seed (derandomize) so a failure reproduces; no deadline: the first torch call of a process is slow.
PROPERTY = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
FLOAT_SPEC = WeightSpec(bits=0, scaling="none")


# ------------------------------------------------------------------------------------------------ strategies

SCALINGS = st.sampled_from(["pow2", "free"])


@st.composite
def weight_specs(draw, scaling=SCALINGS):
    """Any integer weight format the profile schema allows with 2..16 bits."""
    lo = draw(st.integers(-30, 10))
    hi = draw(st.integers(lo, 20))
    return WeightSpec(bits=draw(st.integers(2, 16)), sign=draw(st.sampled_from(["twos-complement", "sign-magnitude"])),
                      scaling=draw(scaling), exponent_min=lo, exponent_max=hi)


@st.composite
def grids(draw):
    """A grid of a random spec: scale 2^e (pow2, e in the spec's range) or any positive scale (free)."""
    spec = draw(weight_specs())
    if spec.scaling == "pow2":
        e = draw(st.integers(spec.exponent_min, spec.exponent_max))
        return Grid(2.0 ** e, spec.code_min, spec.code_max, e)
    scale = draw(st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False))
    return Grid(scale, spec.code_min, spec.code_max, None)


@st.composite
def grid_and_values(draw, dtype=torch.float64):
    """A grid and a finite 1-d tensor whose values mostly sit around the grid's range (in units of its step),
    including exact half steps and values far outside, plus arbitrary finite floats of the dtype."""
    grid = draw(grids())
    span = float(max(abs(grid.code_min), grid.code_max)) * 1.5 + 2
    width = 32 if dtype == torch.float32 else 64
    k = st.integers(-int(span), int(span))
    near = st.one_of(
        st.floats(-span, span).map(lambda c: c * grid.scale),
        k.map(lambda i: (i + 0.5) * grid.scale),  # exact ties
        k.map(lambda i: i * grid.scale),          # exactly on the grid
    )
    anything = st.floats(allow_nan=False, allow_infinity=False, width=width)
    values = draw(st.lists(st.one_of(near, near, near, anything), min_size=1, max_size=24))
    x = torch.tensor(values, dtype=dtype)
    assume(bool(torch.isfinite(x).all()))  # c * scale may overflow float32
    return grid, x


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _is_integer(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, torch.round(t)))


# ------------------------------------------------------------------------------------------- grid membership

@PROPERTY
@given(gx=grid_and_values(), rounding=st.sampled_from(["nearest", "stochastic"]))
def test_codes_are_integers_in_range_and_values_are_code_times_scale(gx, rounding):
    grid, x = gx
    codes = round_to_codes(x, grid, rounding=rounding, generator=_gen(1))
    assert codes.dtype == x.dtype and codes.shape == x.shape
    assert _is_integer(codes)
    assert codes.min() >= grid.code_min
    assert codes.max() <= grid.code_max
    q = quantize(x, grid, rounding=rounding, generator=_gen(1))  # same draws as above
    assert torch.equal(q, codes * grid.scale)
    assert torch.equal(codes_to_values(codes, grid), q)


@PROPERTY
@given(gx=grid_and_values(dtype=torch.float32))
def test_float32_codes_stay_on_grid(gx):
    grid, x = gx
    codes = round_to_codes(x, grid)
    assert codes.dtype == torch.float32
    assert _is_integer(codes)
    assert grid.code_min <= codes.min() <= codes.max() <= grid.code_max


@PROPERTY
@given(gx=grid_and_values())
def test_nearest_moves_representable_values_by_at_most_half_a_step(gx):
    grid, x = gx
    inside = (x >= grid.value_min) & (x <= grid.value_max)
    assume(bool(inside.any()))
    q = quantize(x, grid)
    err = (q - x)[inside].abs()
    # pow2 scales divide exactly; a free scale rounds x / scale once (relative error 2^-53)
    slack = 0.0 if grid.exponent is not None else 4 * np.finfo(np.float64).eps * float(x[inside].abs().max())
    assert float(err.max()) <= grid.scale / 2 + slack


def test_nearest_rounds_ties_to_even_codes():
    grid = Grid(0.25, -8, 7, -2)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 0.51], dtype=torch.float64) * grid.scale
    assert round_to_codes(x, grid).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0, 1.0]


@PROPERTY
@given(gx=grid_and_values(), rounding=st.sampled_from(["nearest", "stochastic"]))
def test_values_beyond_the_range_saturate_to_the_end_codes(gx, rounding):
    grid, x = gx
    codes = round_to_codes(x, grid, rounding=rounding, generator=_gen(2))
    # nearest: anything that rounds past the end code is clipped to it; stochastic: anything at or past it
    margin = 0.5 * grid.scale if rounding == "nearest" else 0.0
    above = x >= grid.value_max + margin
    below = x <= grid.value_min - margin
    assert bool((codes[above] == grid.code_max).all())
    assert bool((codes[below] == grid.code_min).all())


def test_saturation_hand_cases_twos_complement_and_sign_magnitude():
    x = torch.tensor([1e9, 127.4, 127.6, 200.0, -128.0, -128.6, -1e9], dtype=torch.float64)
    twos = choose_grid(127.0, WeightSpec(bits=8))
    assert twos.scale == 1.0
    assert round_to_codes(x, twos).tolist() == [127, 127, 127, 127, -128, -128, -128]
    sm = choose_grid(127.0, WeightSpec(bits=8, sign="sign-magnitude"))
    assert round_to_codes(x, sm).tolist() == [127, 127, 127, 127, -127, -127, -127]
    # a value too large for the float dtype once divided by the scale still saturates, in both directions
    huge = torch.tensor([3e38, -3e38], dtype=torch.float32)
    tiny_grid = Grid(2.0 ** -10, -128, 127, -10)
    for rounding in ("nearest", "stochastic"):
        assert round_to_codes(huge, tiny_grid, rounding=rounding, generator=_gen()).tolist() == [127, -128]


# ---------------------------------------------------------------------------------------- stochastic rounding

@PROPERTY
@given(gx=grid_and_values())
def test_stochastic_rounding_lands_on_one_of_the_two_neighbours(gx):
    grid, x = gx
    codes = round_to_codes(x, grid, rounding="stochastic", generator=_gen(3))
    scaled = x / grid.scale
    lo = torch.floor(scaled).clamp(grid.code_min, grid.code_max)
    hi = torch.ceil(scaled).clamp(grid.code_min, grid.code_max)
    assert bool(((codes == lo) | (codes == hi)).all())


@settings(max_examples=25, deadline=None, derandomize=True)
@given(k=st.integers(-100, 100), frac=st.floats(0.0, 1.0, exclude_max=True),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_stochastic_rounding_is_unbiased(k, frac, dtype):
    n = 20_000
    x = torch.full((n,), k + frac, dtype=dtype)
    target = float(x[0])  # the value actually stored in this dtype
    r = stochastic_round(x, _gen(4))
    assert bool(((r == math.floor(target)) | (r == math.floor(target) + 1)).all())
    p = target - math.floor(target)
    # mean of n Bernoulli(p) draws: standard error sqrt(p(1-p)/n) <= 0.0036; 5 sigma plus a floor for p ~ 0
    bound = 5 * math.sqrt(max(p * (1 - p), 1e-4) / n)
    assert abs(float(r.double().mean()) - target) <= bound


@pytest.mark.parametrize("value", [2.0 ** 20 + 0.25, 2.0 ** 22 + 0.5, 2.0 ** 22 + 0.5 - 2 ** 21])
def test_stochastic_rounding_unbiased_where_float32_spacing_is_coarse(value):
    """Regression: floor(x + u) rounds x + u once more and gave P(up) = 0.31 for x = 2^20 + 0.25 and 0.75 for
    x = 2^22 + 0.5 in float32; comparing u with the exact fraction keeps P(up) = frac(x)."""
    n = 40_000
    x = torch.full((n,), value, dtype=torch.float32)
    assert float(x[0]) == value
    r = stochastic_round(x, _gen(5)).double()
    p = value - math.floor(value)
    assert abs(float((r - math.floor(value)).mean()) - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_stochastic_rounding_is_reproducible_with_a_seeded_generator():
    x = torch.linspace(-3, 3, 101, dtype=torch.float64) * 0.37
    grid = Grid(0.125, -128, 127, -3)
    a = round_to_codes(x, grid, rounding="stochastic", generator=_gen(7))
    b = round_to_codes(x, grid, rounding="stochastic", generator=_gen(7))
    c = round_to_codes(x, grid, rounding="stochastic", generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unknown_rounding_is_rejected():
    with pytest.raises(ValueError, match="Invalid rounding 'up'"):
        round_to_codes(torch.zeros(3), Grid(1.0, -8, 7, 0), rounding="up")


# ------------------------------------------------------------------------------------------- fake quantisation

@PROPERTY
@given(gx=grid_and_values())
def test_fake_quantize_forward_is_quantize_and_gradient_is_identity(gx):
    grid, x = gx
    x = x.clone().requires_grad_(True)
    y = fake_quantize(x, grid)
    assert torch.equal(y.detach(), quantize(x.detach(), grid))
    upstream = torch.linspace(-2.0, 3.0, x.numel(), dtype=x.dtype).reshape(x.shape)
    (y * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)


def test_float_spec_has_no_grid_and_every_quantiser_is_the_identity():
    assert choose_grid(3.7, FLOAT_SPEC) is None
    assert choose_grid(3.7, FLOAT_SPEC, min_scale=0.5) is None
    x = torch.randn(4, 5, generator=_gen(), dtype=torch.float64, requires_grad=True)
    assert quantize(x, None) is x
    assert quantize(x, None, rounding="stochastic", generator=_gen()) is x
    assert fake_quantize(x, None) is x
    with pytest.raises(ValueError, match="Invalid use of code_max"):
        _ = FLOAT_SPEC.code_max


# ------------------------------------------------------------------------------------------------ choose_grid

@PROPERTY
@given(spec=weight_specs(scaling=st.just("pow2")),
       mantissa=st.floats(0.0, 4.0), power=st.integers(-40, 30), nudge=st.sampled_from([-1, 0, 1]))
def test_choose_grid_pow2_picks_the_smallest_exponent_that_fits(spec, mantissa, power, nudge):
    max_abs = mantissa * spec.code_max * 2.0 ** power
    for _ in range(abs(nudge)):  # one ulp either side of an exact grid edge is where log2 goes wrong
        max_abs = math.nextafter(max_abs, math.inf if nudge > 0 else 0.0)
    grid = choose_grid(max_abs, spec)
    e = grid.exponent
    assert grid.scale == 2.0 ** e
    assert grid.code_min == spec.code_min
    assert grid.code_max == spec.code_max
    assert spec.exponent_min <= e <= spec.exponent_max
    fits = max_abs <= spec.code_max * 2.0 ** e
    if max_abs <= spec.code_max * 2.0 ** spec.exponent_max:
        assert fits
        assert e == spec.exponent_min or max_abs > spec.code_max * 2.0 ** (e - 1)  # one finer would not fit
    else:
        assert e == spec.exponent_max  # too large for any exponent: the coarsest grid, values saturate


@PROPERTY
@given(spec=weight_specs(scaling=st.just("pow2")), max_abs=st.floats(0.0, 1e3), min_scale=st.floats(0.0, 1.0))
def test_choose_grid_pow2_respects_min_scale(spec, max_abs, min_scale):
    grid = choose_grid(max_abs, spec, min_scale=min_scale)
    e = grid.exponent
    candidates = [k for k in range(spec.exponent_min, spec.exponent_max + 1)
                  if max_abs <= spec.code_max * 2.0 ** k and 2.0 ** k >= min_scale]
    expected = candidates[0] if candidates else spec.exponent_max
    assert e == expected


@pytest.mark.parametrize("bits", [2, 3, 8, 16])
@pytest.mark.parametrize("e", [-20, -3, 0, 5])
def test_choose_grid_exact_edges(bits, e):
    spec = WeightSpec(bits=bits, exponent_min=-30, exponent_max=30)
    edge = spec.code_max * 2.0 ** e
    assert choose_grid(edge, spec).exponent == e
    assert choose_grid(math.nextafter(edge, 0.0), spec).exponent == e
    # regression: with bits = 2 (code_max = 1) ceil(log2(edge(1 + ulp))) was e, and the edge value saturated
    assert choose_grid(math.nextafter(edge, math.inf), spec).exponent == e + 1


def test_choose_grid_clamps_to_the_exponent_range():
    spec = WeightSpec(bits=8, exponent_min=-4, exponent_max=2)
    assert choose_grid(0.0, spec).exponent == -4
    assert choose_grid(1e-9, spec).exponent == -4  # everything that small rounds to zero on the finest grid
    assert choose_grid(127 * 4.0, spec).exponent == 2
    assert choose_grid(1e9, spec).exponent == 2    # saturates on the coarsest grid
    assert choose_grid(1.0, spec).exponent == -4   # 1 / 127 -> 2^-7, clamped up to 2^-4
    assert choose_grid(1.0, spec, min_scale=0.3).exponent == -1
    wide = WeightSpec(bits=2, exponent_min=-64, exponent_max=64)  # 2^1024 * code_max would overflow a float
    assert choose_grid(1.7e308, wide).exponent == 64
    assert choose_grid(5e-324, wide).exponent == -64


@PROPERTY
@given(spec=weight_specs(scaling=st.just("free")), max_abs=st.floats(1e-6, 1e6), min_scale=st.floats(0.0, 1.0))
def test_choose_grid_free_scale(spec, max_abs, min_scale):
    grid = choose_grid(max_abs, spec, min_scale=min_scale)
    assert grid.exponent is None
    assert grid.scale == max(max_abs / spec.code_max, min_scale)
    # the largest weight maps onto (one rounding of) the largest code, never past it
    assert max_abs / grid.scale <= spec.code_max * (1 + 1e-12)
    codes = round_to_codes(torch.tensor([max_abs, -max_abs], dtype=torch.float64), grid)
    if min_scale <= max_abs / spec.code_max:
        assert codes.tolist() == [spec.code_max, -spec.code_max]


def test_choose_grid_free_scale_of_an_all_zero_matrix_is_one():
    assert choose_grid(0.0, WeightSpec(bits=8, scaling="free")).scale == 1.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_choose_grid_rejects_bad_max_abs(bad):
    with pytest.raises(ValueError, match="Invalid max_abs"):
        choose_grid(bad, WeightSpec(bits=8))


def test_grid_value_range():
    g = Grid(0.5, -128, 127, -1)
    assert g.value_max == 63.5
    assert g.value_min == -64.0


# ------------------------------------------------------------------------------------ integer overflow helpers

def test_saturate_and_wrap_hand_computed_twos_complement():
    x = torch.tensor([0, 1, -1, 127, 128, 255, 256, -128, -129, 1000, -1000], dtype=torch.int64)
    # 8 bits: 128 = 0x80 -> -128, 255 = 0xFF -> -1, 1000 = 0x3E8 -> 0xE8 = -24, -1000 -> 0x18 = 24
    assert wrap_int(x, 8).tolist() == [0, 1, -1, 127, -128, -1, 0, -128, 127, -24, 24]
    assert saturate_int(x, 8).tolist() == [0, 1, -1, 127, 127, 127, 127, -128, -128, 127, -128]
    y = torch.tensor([7, 8, 15, 16, -8, -9, -16, -17], dtype=torch.int64)
    assert wrap_int(y, 4).tolist() == [7, -8, -1, 0, -8, 7, 0, -1]
    assert saturate_int(y, 4).tolist() == [7, 7, 7, 7, -8, -8, -8, -8]
    z = torch.tensor([2 ** 23 - 1, 2 ** 23, 2 ** 24 + 5, -(2 ** 23) - 1], dtype=torch.int64)  # Loihi's 24-bit v
    assert wrap_int(z, 24).tolist() == [2 ** 23 - 1, -(2 ** 23), 5, 2 ** 23 - 1]
    assert saturate_int(z, 24).tolist() == [2 ** 23 - 1, 2 ** 23 - 1, 2 ** 23 - 1, -(2 ** 23)]


def test_wrap_and_saturate_work_on_float_tensors_and_bits_zero_is_identity():
    x = torch.tensor([128.0, -129.0, 300.0, 5.0], dtype=torch.float64)
    assert wrap_int(x, 8).tolist() == [-128.0, 127.0, 44.0, 5.0]
    assert saturate_int(x, 8).tolist() == [127.0, -128.0, 127.0, 5.0]
    assert wrap_int(x, 0) is x
    assert saturate_int(x, 0) is x


def test_wrap_at_the_dtype_width_is_the_identity():
    """Regression: 1 << 64 did not convert to int64 and wrap_int(x, 64) raised OverflowError."""
    x = torch.tensor([2 ** 62, -(2 ** 63), 2 ** 63 - 1, -5], dtype=torch.int64)
    assert torch.equal(wrap_int(x, 64), x)
    assert torch.equal(saturate_int(x, 64), x)
    assert wrap_int(torch.tensor([3.0 * 2 ** 63], dtype=torch.float64), 64).tolist() == [-(2.0 ** 63)]


@PROPERTY
@given(values=st.lists(st.integers(-(2 ** 40), 2 ** 40), min_size=1, max_size=20),
       bits=st.sampled_from([8, 16, 32]))
def test_wrap_and_saturate_match_numpy_integer_casts(values, bits):
    x = np.array(values, dtype=np.int64)
    narrow = {8: np.int8, 16: np.int16, 32: np.int32}[bits]
    assert wrap_int(torch.from_numpy(x), bits).tolist() == x.astype(narrow).astype(np.int64).tolist()
    info = np.iinfo(narrow)
    assert saturate_int(torch.from_numpy(x), bits).tolist() == np.clip(x, info.min, info.max).tolist()


@PROPERTY
@given(values=st.lists(st.integers(-(2 ** 40), 2 ** 40), min_size=1, max_size=20), bits=st.integers(2, 32))
def test_wrap_is_congruent_modulo_two_to_the_bits(values, bits):
    w = wrap_int(torch.tensor(values, dtype=torch.int64), bits).tolist()
    for v, r in zip(values, w):
        assert -(2 ** (bits - 1)) <= r < 2 ** (bits - 1)
        assert (v - r) % (2 ** bits) == 0
