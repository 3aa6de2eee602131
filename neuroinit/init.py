"""Hardware-aware, gain-scaled initialisation shared by rate and LIF networks.

Float initialisation (Schuessler et al. 2020, §Methods)::

    W_rec = g * N(0, 1/N)                    (scaled by the threshold v_th for LIF networks)
    W_in[:, k]  = v_k * sqrt(N) / |v_k|,     v_k ~ N(0, I_N)         entries O(1)
    W_out[k, :] = w_k * sqrt(N) / |w_k| / N, w_k ~ N(0, I_N)         entries O(1/N)

``io_init = "pytorch"`` draws the input and readout weights as PyTorch's ``nn.Linear`` default does
(``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), which the paper (Liu et al. 2024)
says it used::

    W_in  ~ U(-1/sqrt(n_in), 1/sqrt(n_in))   (fan_in = n_in)     entries O(1) for few inputs
    W_out ~ U(-1/sqrt(N), 1/sqrt(N))         (fan_in = N)        entries O(1/sqrt N): a larger readout

``W_rec`` is drawn first and identically in both, so the same seed gives the same recurrent weights; the biases
stay zero in both (ours: the network's bias is not a Linear layer's). ``"schuessler"`` is the default.

Then every chip-resident matrix is moved onto the profile's integer grid (:mod:`neuroinit.quantize`) with one
scale per matrix and, for LIF, a threshold that fits the same membrane unit. :func:`gain_interval` gives the
gains a profile can realise at a given N: below it the finest grid step is too coarse (most weights round to
zero), above it the largest code saturates. With the ``ideal`` profile the result equals the float
initialisation exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from neuroinit.cells import cell_class
from neuroinit.cells.base import QUANTISED_PARAMS, CellParams, chip_grids
from neuroinit.profiles import HardwareProfile, load_profile
from neuroinit.quantize import Grid, choose_grid, quantize

IO_INITS = ("schuessler", "pytorch")   # input / readout initialisation (module docstring)

__all__ = ["IO_INITS", "InitReport", "check_fits", "float_init", "gain_interval", "hardware_init",
           "realised_gain_ratio"]


def float_init(n_in: int, n_hidden: int, n_out: int, gain: float, *, generator: torch.Generator,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               scale: float = 1.0, io_init: str = "schuessler") -> CellParams:
    """Schuessler et al.'s gain-scaled initialisation (module docstring); ``scale`` multiplies the input and
    recurrent weights (the threshold for LIF networks). ``io_init``: ``"schuessler"`` (normalised columns) or
    ``"pytorch"`` (``nn.Linear``'s uniform default) for ``W_in`` and ``W_out``. Draws happen in float64 on the CPU,
    then are cast, so the same generator gives the same network for every dtype and device."""
    if io_init not in IO_INITS:
        raise ValueError(f"Invalid io_init {io_init!r}: allowed {', '.join(IO_INITS)}")
    for name, val in (("n_in", n_in), ("n_hidden", n_hidden), ("n_out", n_out)):
        if not (isinstance(val, int) and val >= 1):
            raise ValueError(f"Invalid {name} {val!r}: must be an integer >= 1")
    if not (math.isfinite(gain) and gain >= 0):
        raise ValueError(f"Invalid gain {gain!r}: must be a finite number >= 0")
    n = n_hidden
    f64 = torch.float64
    w_rec = gain * torch.randn(n, n, generator=generator, dtype=f64) / math.sqrt(n)
    if io_init == "schuessler":
        v = torch.randn(n, n_in, generator=generator, dtype=f64)
        w_in = v * math.sqrt(n) / v.norm(dim=0, keepdim=True)
        w = torch.randn(n_out, n, generator=generator, dtype=f64)
        w_out = w * math.sqrt(n) / w.norm(dim=1, keepdim=True) / n
    else:  # PyTorch nn.Linear: U(-b, b), b = 1 / sqrt(fan_in)
        w_in = (2 * torch.rand(n, n_in, generator=generator, dtype=f64) - 1) / math.sqrt(n_in)
        w_out = (2 * torch.rand(n_out, n, generator=generator, dtype=f64) - 1) / math.sqrt(n)
    p = CellParams(w_in * scale, w_rec * scale, torch.zeros(n, dtype=f64), w_out, torch.zeros(n_out, dtype=f64))
    return CellParams(*(t.to(dtype=dtype, device=device) for t in p))


# ------------------------------------------------------------------------------------------ gain interval

def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _upper_tail(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2))


def realised_gain_ratio(step: float, code_max: int, sigma: float) -> float:
    """Expected ``std(quantised) / std(float)`` of ``N(0, sigma^2)`` weights rounded to nearest on a grid of
    ``step`` with codes saturating at ``+-code_max``: ``sqrt(sum_k (k step)^2 P(code = k)) / sigma``."""
    if sigma <= 0:
        return 1.0
    second = 0.0
    for k in range(1, code_max + 1):
        lo = (k - 0.5) * step / sigma
        p = _upper_tail(lo) - (_upper_tail((k + 0.5) * step / sigma) if k < code_max else 0.0)
        second += 2 * (k * step) ** 2 * p
        if lo > 40:
            break
    return math.sqrt(second) / sigma


def _expected_max_abs(n_entries: int) -> float:
    """Approximate expected max of |N(0, 1)| over ``n_entries`` draws."""
    return math.sqrt(2 * math.log(2 * max(n_entries, 2)))


def _step_for(sigma: float, n: int, profile: HardwareProfile, min_scale: float) -> float:
    grid = choose_grid(sigma * _expected_max_abs(n * n), profile.weights, min_scale=min_scale)
    return grid.scale


def gain_interval(profile: HardwareProfile | str, n_hidden: int, *, tol: float = 0.02,
                  threshold: float | None = None, scale: float = 1.0) -> tuple[float, float]:
    """Interval ``[g_min, g_max]`` of gains whose quantised ``W_rec`` has an expected realised gain
    (std * sqrt(N)) within ``tol`` of the requested one on ``profile`` at size ``n_hidden``.

    The grid is chosen as :func:`neuroinit.quantize.choose_grid` does (from the expected largest weight);
    ``threshold`` adds the LIF constraint that the threshold fits the threshold mantissa. ``(0, inf)`` for
    float profiles. Found by scanning gains on a log grid (40 points per decade) and bisecting
    both edges. The scan spans the gains the profile's exponent range (and threshold) can reach, two decades past
    either end; its ends read as 0 or inf only where free scaling has no such end.
    """
    profile = load_profile(profile)
    if profile.weights.is_float:
        return 0.0, math.inf
    min_scale = 0.0
    if threshold is not None and profile.threshold.bits > 0:
        min_scale = threshold / (2 ** profile.threshold.bits - 1)
    code_max = profile.weights.code_max

    def ok(g: float) -> bool:
        sigma = g * scale / math.sqrt(n_hidden)
        step = _step_for(sigma, n_hidden, profile, min_scale)
        return abs(realised_gain_ratio(step, code_max, sigma) - 1.0) <= tol

    gains = [10 ** (k / 40) for k in range(*_scan_decades(profile, n_hidden, scale, min_scale))]
    good = [ok(g) for g in gains]
    if not any(good):
        return math.nan, math.nan
    # The longest run of good gains. Not "first good .. last good": the ratio is not monotonic below the finest
    # step (it crosses 1 near sigma = 0.28 step, overshoots by up to 15% and comes back within 2% only near
    # sigma = 1.45 step), and that hole must stay outside the interval.
    first, last, k = 0, -1, 0
    while k < len(good):
        if good[k]:
            end = k
            while end + 1 < len(good) and good[end + 1]:
                end += 1
            if end - k > last - first:
                first, last = k, end
            k = end
        k += 1

    def edge(bad: float, fine: float) -> float:
        for _ in range(50):
            mid = math.sqrt(bad * fine)
            if ok(mid):
                fine = mid
            else:
                bad = mid
        return fine

    g_min = edge(gains[first - 1], gains[first]) if first > 0 else 0.0
    g_max = edge(gains[last + 1], gains[last]) if last < len(gains) - 1 else math.inf
    return g_min, g_max


def _scan_decades(profile: HardwareProfile, n_hidden: int, scale: float, min_scale: float) -> tuple[int, int]:
    """``range`` bounds (in 1/40 decades of gain) that reach past both edges of the realisable gains.

    Below the finest grid step (``2^exponent_min`` or the threshold's ``min_scale``) every weight rounds to
    zero, above the coarsest grid's largest value every weight saturates: two decades beyond either is
    unrealisable. A free-scaling grid has no finest (without ``min_scale``) and no coarsest step; it is
    scale-invariant there, and the scan spans 8 decades on that side, so a good end reads as 0 or inf.
    """
    w = profile.weights
    to_gain = math.sqrt(n_hidden) / scale  # g = sigma * sqrt(N) / scale
    finest = max(2.0 ** w.exponent_min if w.scaling == "pow2" else 0.0, min_scale)
    lo = math.floor(math.log10(finest * to_gain)) - 2 if finest > 0 else None
    hi = None
    if w.scaling == "pow2":
        coarsest = w.code_max * 2.0 ** w.exponent_max / _expected_max_abs(n_hidden * n_hidden)
        hi = math.ceil(math.log10(coarsest * to_gain)) + 2
    if lo is None:
        lo = (hi - 8) if hi is not None else -4
    if hi is None:
        hi = lo + 8
    return 40 * lo, 40 * hi + 1


def check_fits(profile: HardwareProfile, n_in: int, n_hidden: int, n_out: int) -> None:
    """Raise ValueError when a dense network of this size does not fit the profile's limits."""
    lim = profile.limits
    checks = [("hidden neurons", n_hidden, lim.max_neurons), ("inputs", n_in, lim.max_inputs),
              ("outputs", n_out, lim.max_outputs), ("fan-in (inputs + recurrent)", n_in + n_hidden,
                                                      lim.max_fan_in)]
    for what, have, limit in checks:
        if limit and have > limit:
            raise ValueError(f"Invalid network for profile '{profile.name}': {have} {what} exceed the "
                             f"limit {limit}; allowed: at most {limit}")


# ------------------------------------------------------------------------------------------ the report

@dataclass(frozen=True)
class InitReport:
    """What the hardware-aware initialisation did to the requested network."""

    profile: str
    model: str
    n_hidden: int
    requested_gain: float
    used_gain: float                     # after clamping into the interval (== requested unless clamped)
    gain_interval: tuple[float, float]
    realised_gain_std: float             # std(W_rec) * sqrt(N) / scale
    float_spectral_radius: float
    realised_spectral_radius: float
    frac_zero: float                     # fraction of off-diagonal W_rec entries that are exactly zero
    n_saturated: int                     # entries at the largest code in any chip matrix
    rmse: dict[str, float] = field(default_factory=dict)       # per matrix, float vs quantised
    scale: dict[str, float | None] = field(default_factory=dict)
    exponent: dict[str, int | None] = field(default_factory=dict)
    threshold_code: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gain_interval"] = list(self.gain_interval)
        return d


def hardware_init(model: str, n_in: int, n_hidden: int, n_out: int, gain: float,
                  profile: HardwareProfile | str = "ideal", *, generator: torch.Generator,
                  rounding: str = "nearest", out_of_range: str = "error", v_th: float = 1.0,
                  remove_autapses: bool = True, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", io_init: str = "schuessler") -> tuple[CellParams, InitReport]:
    """Float init (:func:`float_init`), autapses removed, moved onto ``profile``'s grid; returns the params
    (float tensors holding grid values) and an :class:`InitReport`.

    ``out_of_range``: ``"error"`` refuses a gain outside :func:`gain_interval`, ``"clamp"`` clamps it.
    ``rounding``: ``"nearest"`` or ``"stochastic"`` (the latter draws from ``generator``).
    ``io_init``: how ``W_in`` and ``W_out`` are drawn (:data:`IO_INITS`, module docstring).
    """
    spiking = cell_class(model).spiking  # ValueError naming the registered models

    if out_of_range not in ("error", "clamp"):
        raise ValueError(f"Invalid out_of_range {out_of_range!r}: allowed 'error', 'clamp'")
    if rounding not in ("nearest", "stochastic"):  # checked here too: float profiles never reach the rounding
        raise ValueError(f"Invalid rounding {rounding!r}: allowed 'nearest', 'stochastic'")
    profile = load_profile(profile)
    check_fits(profile, n_in, n_hidden, n_out)
    scale = v_th if spiking else 1.0        # spiking cells: weights in units of the threshold
    threshold = v_th if spiking else None
    interval = gain_interval(profile, n_hidden, threshold=threshold, scale=scale)
    used = gain
    if not profile.weights.is_float:
        lo, hi = interval
        if math.isnan(lo):
            raise ValueError(f"Invalid profile '{profile.name}' for N={n_hidden}: no gain is realisable within "
                             "2% on its weight grid")
        if not lo <= gain <= hi:
            if out_of_range == "error":
                raise ValueError(f"Invalid gain {gain:g} for profile '{profile.name}' at N={n_hidden}: "
                                 f"realisable gains are [{lo:.4g}, {hi:.4g}] (realised within 2%); "
                                 "choose one inside or clamp it (--clamp-gain)")
            used = min(max(gain, lo), hi)
    p = float_init(n_in, n_hidden, n_out, used, generator=generator, dtype=torch.float64, scale=scale,
                   io_init=io_init)
    if remove_autapses:
        p.w_rec.fill_diagonal_(0.0)
    grids = chip_grids(p, profile, threshold=threshold)
    q = p._replace(**{name: quantize(getattr(p, name), grids[name], rounding=rounding, generator=generator)
                      for name in QUANTISED_PARAMS})
    report = _report(model, profile, gain, used, interval, p, q, grids, scale, threshold)
    return CellParams(*(t.to(dtype=dtype, device=device) for t in q)), report


def _report(model, profile, requested, used, interval, p: CellParams, q: CellParams,
            grids: dict[str, Grid | None], scale: float, threshold: float | None) -> InitReport:
    n = p.w_rec.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    w_off = q.w_rec[off]
    saturated = 0
    for name, grid in grids.items():
        if grid is not None:
            wanted = torch.round(getattr(p, name) / grid.scale)
            saturated += int(((wanted > grid.code_max) | (wanted < grid.code_min)).sum())
    thr_code = None
    finest = [g for k, g in grids.items() if g is not None and k != "w_out"]
    if threshold is not None and finest:
        thr_code = round(float(threshold) / min(g.scale for g in finest))
    return InitReport(
        profile=profile.name, model=model, n_hidden=n, requested_gain=float(requested), used_gain=float(used),
        gain_interval=(float(interval[0]), float(interval[1])),
        realised_gain_std=float(w_off.std() * math.sqrt(n) / scale),
        float_spectral_radius=float(torch.linalg.eigvals(p.w_rec).abs().max() / scale),
        realised_spectral_radius=float(torch.linalg.eigvals(q.w_rec).abs().max() / scale),
        frac_zero=float((w_off == 0).double().mean()),
        n_saturated=saturated,
        rmse={k: float((getattr(q, k) - getattr(p, k)).pow(2).mean().sqrt()) for k in QUANTISED_PARAMS},
        scale={k: (g.scale if g is not None else None) for k, g in grids.items()},
        exponent={k: (g.exponent if g is not None else None) for k, g in grids.items()},
        threshold_code=thr_code,
    )
