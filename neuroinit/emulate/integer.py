"""Integer (fixed-point) emulation of a deployed LIF network, one arithmetic per hardware profile.

:func:`deploy` moves a trained :class:`~neuroinit.cells.lif.LIFRNN` onto a profile (weight codes, threshold,
decay and bias codes, size and saturation checks); :func:`emulate` runs the result with the chip's arithmetic;
:func:`compare_on_task` reports the accuracy and loss change from the float network to the chip.

Three arithmetics (:func:`arithmetic_of`):

``float`` (``ideal``, ``spinnaker2-like``, ``brainscales2-like``: float state and decay)
    neuroinit's own LIF step on the deployed (grid) weights. With ``ideal`` this *is* the float network, bit
    for bit.

``lava`` (``loihi-like``, ``loihi2-like``): Lava's bit-accurate ``PyLifModelBitAcc`` and ``PyDenseModelBitAcc``
    (``lava/proc/lif/models.py``, ``lava/proc/dense/models.py``; hardware.md section 1). Bit widths::

        a_in   synaptic input from Dense, integer, declared 16-bit in Lava (not clipped there; we count overflows)
        u      24-bit signed current, wraps:  u <- sign(u) ((|u| (4096 - du - 1)) >> 12) + (a_in << 6)
        v      24-bit signed voltage, saturates at +-(2^23 - 1):
               v <- sign(v) ((|v| (4096 - dv)) >> 12) + u + (bias_mant << bias_exp)
        du, dv 12-bit unsigned decays; du = 4095 (lava-dl netx iDecay 4096 - 1) makes u the current input only,
               dv = round(4096 (1 - alpha))
        vth    17-bit unsigned mantissa; spike when v > vth << 6, then v = 0 (reset to zero only)
        bias   13-bit signed mantissa, 3-bit bias_exp: the smallest exponent that holds every bias (the finest
               bias; lava-dl netx fixes bias_exp = 6, i.e. the bias in a_in units)
        weights  8-bit mixed sign stored on step 2 (w = 2c, c the profile's code), per-Dense weight_exp:
               a = (W s) << weight_exp, or >> -weight_exp (arithmetic) when negative

    Units: one a_in unit is worth ``2^(e_min - 1)`` in neuroinit's units (threshold ``v_th``), with ``e_min`` the
    finer of the input and recurrent exponents (of nonzero matrices); the coarser matrix gets
    ``weight_exp = e - e_min``. Where ``v_th / 2^(e_min - 1)`` overflows the 17-bit vth (the finest
    exponents), the unit doubles and every weight_exp drops by one (exact: the weights are even). Real-valued
    inputs are sent as graded spikes ``k = round(u 2^f)`` (``f = input_frac_bits``) and the input Dense shifts
    by ``e_in - e_min - f`` (a right shift truncates toward -inf, as Lava's Dense does); integer inputs (spike
    counts) are exact for any ``f``.

    **Dense's one-step delay.** Lava's Dense sends at step t what it accumulated at step t-1, for the input and
    for the recurrent connection alike. neuroinit's step uses ``W_rec z_{t-1}`` (delayed, as Dense) but
    ``W_in u_t`` (not delayed). The emulator runs the chip's own schedule explicitly: chip step 0 is a priming
    step in which the input Dense takes ``u_0`` while the LIF sees no input and its bias is held at 0 (the
    deployment sets ``bias_mant`` after the first step); chip step ``k >= 1`` then computes exactly neuroinit
    step ``k - 1`` (input ``u_{k-1}`` from the input Dense, spikes ``z_{k-2}`` from the recurrent Dense).
    Spikes are returned on neuroinit's time axis (chip steps 1..T); ``chip_steps = T + 1``.

``fixed`` (``xylo-like``, ``reckon-like`` and any profile with integer state): a generic integer LIF with the
    profile's widths. v is ``state.bits`` signed, saturating or wrapping per ``state.overflow``; one v LSB is
    ``2^e_min / 2^threshold.shift``; weights as Lava's (codes, per-matrix shift) but without the step-2 storage;
    threshold ``theta = v_th / 2^e_min`` (an unsigned ``threshold.bits`` code) compared as ``theta << shift``.
    Decay per ``decay.kind``: ``linear`` ``v <- sign(v) ((|v| (2^B - d)) >> B)`` with ``d = round(2^B (1 - alpha))``
    (truncation toward zero, as Lava; ReckOn's exact rounding is not documented), ``shift``
    ``v <- v - (v >> dash)`` with ``dash = round(log2(1 / (1 - alpha)))`` (Xylo's bit-shift decay, arithmetic
    shift), ``float`` ``v <- trunc(alpha v)``. No input delay (the step is neuroinit's); reset to zero or by
    subtraction as trained; spike when ``v > theta`` (ReckOn: ``v >= theta``, srnn.v).

In all three the leaky readout ``y <- kappa y + W_out z + b_out`` runs on the host in float64 from the chip's
spikes, with ``W_out`` on its grid. Refractoriness follows neuroinit (spike suppressed for ``n_refractory``
steps, the membrane keeps integrating); Lava's LIF has none, so a refractory network is noted as not
bit-exact there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from neuroinit.cells.base import QUANTISED_PARAMS, CellParams, RecurrentCell
from neuroinit.init import check_fits
from neuroinit.profiles import HardwareProfile, load_profile
from neuroinit.quantize import Grid

__all__ = [
    "ARITHMETICS",
    "LAVA_ACT_SHIFT",
    "LAVA_BIAS_BITS",
    "LAVA_BIAS_EXP",
    "LAVA_DECAY_SHIFT",
    "LAVA_UV_BITS",
    "LAVA_VTH_MAX",
    "LAVA_VTH_SHIFT",
    "Deployment",
    "Emulation",
    "arithmetic_of",
    "check_saturation",
    "compare_on_task",
    "deploy",
    "deployed_cell",
    "emulate",
    "fixed_lif_step",
    "lava_dense",
    "lava_lif_step",
    "run_cell",
    "spike_mismatches",
    "weight_codes",
]

ARITHMETICS = ("float", "lava", "fixed")

# Lava PyLifModelBitAcc / AbstractPyLifModelFixed constants (lava/proc/lif/models.py)
LAVA_UV_BITS = 24          # u, v are 24-bit signed
LAVA_DECAY_SHIFT = 12      # decays are 12-bit: x (4096 - d) >> 12
LAVA_ACT_SHIFT = 6         # synaptic input MSB-aligned: a_in << 6
LAVA_VTH_SHIFT = 6         # threshold MSB-aligned: vth << 6
LAVA_VTH_MAX = 2 ** 17 - 1  # vth: unsigned 17-bit
LAVA_BIAS_BITS = 13        # bias_mant: signed 13-bit
LAVA_BIAS_EXP = 6          # bias exponent used by lava-dl netx (bias in units of a_in)
LAVA_A_IN_BITS = 16        # a_in declared precision (Dense a_out, LIF a_in LavaPyType precision=16)
_LAVA_MAX_UV = 2 ** (LAVA_UV_BITS - 1)


def arithmetic_of(profile: HardwareProfile | str) -> str:
    """``"float"`` for float state and decay, ``"lava"`` for the Loihi profiles (name ``loihi*`` with Lava's
    12-bit linear decay and threshold shift 6), else ``"fixed"``."""
    profile = load_profile(profile)
    if profile.state.bits == 0:
        return "float"
    if (profile.name.startswith("loihi") and profile.decay.kind == "linear" and profile.decay.bits == 12
            and profile.threshold.shift == LAVA_VTH_SHIFT):
        return "lava"
    return "fixed"


# ============================================================================================ deployment

@dataclass(frozen=True, eq=False)
class Deployment:
    """A LIF network as a profile's chip holds it. Integer fields are numpy ``int64`` (None for ``float``).

    ``unit``: value (in neuroinit's units, threshold = ``v_th``) of one accumulator unit: Lava's ``a_in`` unit
    or the fixed arithmetic's weight unit ``2^e_min``. ``w_in``/``w_rec`` are the chip's stored weights
    (Lava: ``2c``; fixed: ``c``), ``exp_in``/``exp_rec`` the shifts applied to their accumulated sums.
    """

    profile: HardwareProfile
    arithmetic: str
    cell: RecurrentCell                    # the deployed float network (weights on the grid, float64)
    codes: dict[str, np.ndarray | None]    # integer weight codes per chip matrix (None: float weights)
    grids: dict[str, Grid | None]
    reset: str                             # as trained
    chip_reset: str                        # as the chip does it
    n_refractory: int
    alpha: float
    kappa: float
    alpha_chip: float                      # leak factor the decay code realises
    input_frac_bits: int = 0
    w_in: np.ndarray | None = None
    w_rec: np.ndarray | None = None
    exp_in: int = 0
    exp_rec: int = 0
    threshold: int = 0
    threshold_shift: int = 0
    decay: int = 0
    decay_kind: str = "float"
    decay_bits: int = 0
    bias: np.ndarray | None = None
    bias_exp: int = 0
    state_bits: int = 0
    overflow: str = "saturate"
    spike_compare: str = ">"
    unit: float = 1.0
    e_min: int = 0                         # the finer weight exponent (of nonzero matrices) setting the unit
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def params(self) -> CellParams:
        """The deployed float parameters (grid values)."""
        return self.cell.params()


def deployed_cell(cell: RecurrentCell, profile: HardwareProfile | str | None = None) -> RecurrentCell:
    """A float64 copy of ``cell`` whose forward uses ``profile``'s weight grids (the deployed network).

    With the cell's own profile the cell's own grids are kept (the network that was trained is the network
    deployed); with another profile the grids are chosen from the trained weights, as ``hardware_init`` does.
    """
    from neuroinit.cells import make_cell

    profile = load_profile(profile if profile is not None else cell.profile)
    cfg = dict(cell.config())
    cfg["profile"] = profile
    cfg["quantised_forward"] = True
    fp = CellParams(*(t.detach().to(device="cpu", dtype=torch.float64).clone() for t in cell.float_params()))
    out = make_cell(cell.model, fp, **cfg).double()
    with torch.no_grad():  # the constants exactly as the trained cell holds them (alpha of a float32 cell, ...)
        theirs = dict(cell.named_buffers())
        for name, buf in out.named_buffers():
            if name in theirs and theirs[name].shape == buf.shape:
                buf.copy_(theirs[name].detach().to(device="cpu", dtype=torch.float64))
    if profile == cell.profile and all(cell.grids.get(n) is not None for n in QUANTISED_PARAMS):
        out.grids = dict(cell.grids)
    return out


def check_saturation(cell: RecurrentCell, profile: HardwareProfile) -> None:
    for name in QUANTISED_PARAMS:
        grid = cell.grids[name]
        if grid is None:
            continue
        w = getattr(cell, name).detach().double()
        wanted = torch.round(w / grid.scale)
        bad = (wanted > grid.code_max) | (wanted < grid.code_min)
        if bool(bad.any()):
            raise ValueError(
                f"Invalid network for profile '{profile.name}': {int(bad.sum())} weights of {name} saturate "
                f"(max |{name}| = {float(w.abs().max()):.4g}, the grid holds {grid.value_min:.4g}.."
                f"{grid.value_max:.4g} = codes {grid.code_min}..{grid.code_max} x {grid.scale:g}); "
                "allowed: weights within the grid's range (lower the gain, train with the profile's chip "
                "constraints, or export to a profile with a larger exponent range)")


def weight_codes(cell: RecurrentCell) -> dict[str, np.ndarray | None]:
    out: dict[str, np.ndarray | None] = {}
    for name in QUANTISED_PARAMS:
        grid = cell.grids[name]
        if grid is None:
            out[name] = None
            continue
        w = getattr(cell, name).detach().double()
        out[name] = torch.round(w / grid.scale).clamp(grid.code_min, grid.code_max).to(torch.int64).numpy()
    return out


def deploy(cell: RecurrentCell, profile: HardwareProfile | str | None = None, *,
           input_frac_bits: int = 8, bias_exp: int | None = None) -> Deployment:
    """Move a trained LIF ``cell`` onto ``profile`` (default: the cell's own) as its chip would hold it.

    Raises ``ValueError`` with one line naming what is wrong when the network does not fit the profile's size
    limits, a weight saturates the grid, the threshold does not fit its mantissa, or the cell is not a LIF
    network. ``input_frac_bits`` sets the graded-input precision used for real-valued inputs (module docstring).
    ``bias_exp`` (Lava only): the bias exponent, 0..7; default the smallest whose 13-bit mantissa holds every
    bias (the finest bias the chip can hold); lava-dl netx fixes 6 (bias in a_in units).
    """
    if getattr(cell, "model", None) != "lif":
        raise ValueError(f"Invalid model {getattr(cell, 'model', type(cell).__name__)!r} for chip emulation: "
                         "allowed 'lif' (rate networks have no spiking chip arithmetic; export their weights "
                         "with --format h5)")
    if not (isinstance(input_frac_bits, int) and 0 <= input_frac_bits <= 24):
        raise ValueError(f"Invalid input_frac_bits {input_frac_bits!r}: allowed integers 0..24")
    profile = load_profile(profile if profile is not None else cell.profile)
    check_fits(profile, cell.n_in, cell.n_hidden, cell.n_out)
    dep_cell = deployed_cell(cell, profile)
    check_saturation(dep_cell, profile)
    arith = arithmetic_of(profile)
    alpha, kappa = float(dep_cell.alpha), float(dep_cell.kappa)
    v_th = float(dep_cell.v_th)
    notes: list[str] = []
    if not cell.quantised_forward and not profile.weights.is_float:
        notes.append("the cell was trained with float weights; the deployed network rounds them onto the grid")
    if profile != cell.profile:
        notes.append(f"weight grids chosen for '{profile.name}' from the trained weights (trained under "
                     f"'{cell.profile.name}')")
    common = {"profile": profile, "arithmetic": arith, "cell": dep_cell, "codes": weight_codes(dep_cell),
              "grids": dep_cell.grids, "reset": dep_cell.reset, "n_refractory": dep_cell.n_refractory,
              "alpha": alpha, "kappa": kappa, "input_frac_bits": input_frac_bits}
    if arith == "float":
        return Deployment(chip_reset=dep_cell.reset, alpha_chip=alpha, notes=tuple(notes), **common)

    g_in, g_rec = dep_cell.grids["w_in"], dep_cell.grids["w_rec"]
    if g_in is None or g_rec is None or g_in.exponent is None or g_rec.exponent is None:
        raise ValueError(f"Invalid profile '{profile.name}' for integer emulation: integer state needs pow2 "
                         f"weight scaling (weights.scaling = 'pow2'), got {profile.weights.scaling!r}")
    e_in, e_rec = g_in.exponent, g_rec.exponent
    codes = common["codes"]
    # an all-zero matrix (no recurrence, say) sits on the finest grid; it must not set the accumulator unit
    used = [e for e, c in ((e_in, codes["w_in"]), (e_rec, codes["w_rec"])) if np.any(c)]
    e_min = min(used) if used else e_rec
    n = dep_cell.n_hidden
    bias = dep_cell.bias.detach().double().numpy()

    if arith == "lava":
        # a_in unit 2^(e_min - 1): weights 2c on step 2 (Loihi's mixed-sign storage), vth = v_th / unit. When
        # that vth overflows its 17 bits (the finest exponents), the Dense shifts one bit less (weight_exp - 1:
        # the sum of even weights halves exactly) and the unit doubles.
        half = 1 if round(v_th / 2.0 ** (e_min - 1)) > LAVA_VTH_MAX else 0
        unit = 2.0 ** (e_min - 1 + half)
        vth = v_th / unit
        vth_code = round(vth)
        if vth_code > LAVA_VTH_MAX or vth_code < 1:
            raise ValueError(f"Invalid network for profile '{profile.name}': threshold {v_th:g} is {vth_code} "
                             f"a_in units of {unit:g} (finest weight exponent {e_min}); allowed: vth mantissa "
                             f"1..{LAVA_VTH_MAX} (weights too small for the 17-bit threshold)")
        if vth_code != vth:
            notes.append(f"threshold {v_th:g} rounded to vth = {vth_code} x {unit:g}")
        dv = int(min(max(round(4096 * (1.0 - alpha)), 0), 4095))
        bmax = 2 ** (LAVA_BIAS_BITS - 1)
        v_lsb = unit / 2 ** LAVA_ACT_SHIFT            # one v unit: a_in << 6
        if bias_exp is None:
            need = float(np.abs(bias).max(initial=0.0)) / v_lsb / (bmax - 1)
            bias_exp = min(max(math.ceil(math.log2(need)), 0), 7) if need > 0 else 0
        if not (isinstance(bias_exp, int) and 0 <= bias_exp <= 7):
            raise ValueError(f"Invalid bias_exp {bias_exp!r}: allowed integers 0..7 (Loihi's 3-bit bias exponent)")
        b_code = np.rint(bias / (v_lsb * 2 ** bias_exp)).astype(np.int64)
        n_sat = int(((b_code > bmax - 1) | (b_code < -bmax)).sum())
        if n_sat:
            notes.append(f"{n_sat} biases saturate the {LAVA_BIAS_BITS}-bit bias mantissa")
        b_code = np.clip(b_code, -bmax, bmax - 1)
        if dep_cell.reset != "zero":
            notes.append("Lava's LIF resets to zero: the network was trained with reset by subtraction")
        if dep_cell.n_refractory:
            notes.append("Lava's LIF has no refractory period: refractoriness emulated as neuroinit defines it "
                         "(not bit-exact to Lava)")
        return Deployment(
            chip_reset="zero", alpha_chip=(4096 - dv) / 4096,
            w_in=2 * codes["w_in"], w_rec=2 * codes["w_rec"], exp_in=e_in - e_min - half - input_frac_bits,
            exp_rec=e_rec - e_min - half, threshold=vth_code, threshold_shift=LAVA_VTH_SHIFT, decay=dv,
            decay_kind="linear", decay_bits=LAVA_DECAY_SHIFT, bias=b_code, bias_exp=bias_exp,
            state_bits=LAVA_UV_BITS, overflow="saturate", spike_compare=">", unit=unit, e_min=e_min,
            notes=tuple(notes),
            **common)

    # fixed
    unit = 2.0 ** e_min
    shift = profile.threshold.shift
    theta = v_th / unit
    theta_code = round(theta)
    t_bits = profile.threshold.bits
    if t_bits and (theta_code > 2 ** t_bits - 1 or theta_code < 1):
        raise ValueError(f"Invalid network for profile '{profile.name}': threshold {v_th:g} is {theta_code} "
                         f"weight units of {unit:g}; allowed: 1..{2 ** t_bits - 1} ({t_bits}-bit threshold)")
    if theta_code != theta:
        notes.append(f"threshold {v_th:g} rounded to {theta_code} x {unit:g}")
    kind, bits = profile.decay.kind, profile.decay.bits
    if kind == "linear":
        d = int(min(max(round(2 ** bits * (1.0 - alpha)), 0), 2 ** bits - 1))
        alpha_chip = (2 ** bits - d) / 2 ** bits
    elif kind == "shift":
        d = int(min(max(round(math.log2(1.0 / (1.0 - alpha))), 0), 2 ** bits - 1)) if alpha < 1 else 2 ** bits - 1
        alpha_chip = 1.0 - 2.0 ** -d
    else:
        d, alpha_chip = 0, alpha
    lsb = unit / 2 ** shift
    b_code = np.rint(bias / lsb).astype(np.int64)
    lim = 2 ** (profile.state.bits - 1)
    n_sat = int(((b_code > lim - 1) | (b_code < -lim)).sum())
    if n_sat:
        notes.append(f"{n_sat} biases saturate the {profile.state.bits}-bit state")
    b_code = np.clip(b_code, -lim, lim - 1)
    if abs(alpha_chip - alpha) > 1e-3:
        notes.append(f"decay realised as alpha = {alpha_chip:.6g} (trained alpha = {alpha:.6g})")
    compare = ">=" if profile.name.startswith("reckon") else ">"
    return Deployment(
        chip_reset=dep_cell.reset, alpha_chip=alpha_chip, w_in=codes["w_in"].copy(), w_rec=codes["w_rec"].copy(),
        exp_in=e_in - e_min - input_frac_bits, exp_rec=e_rec - e_min, threshold=theta_code, threshold_shift=shift,
        decay=d, decay_kind=kind, decay_bits=bits, bias=b_code.reshape(n), bias_exp=0,
        state_bits=profile.state.bits, overflow=profile.state.overflow, spike_compare=compare, unit=unit,
        e_min=e_min, notes=tuple(notes), **common)


# ============================================================================================ integer steps

def lava_dense(weights: np.ndarray, s_in: np.ndarray, weight_exp: int) -> np.ndarray:
    """Lava ``PyDenseModelBitAcc`` accumulation for a batch: ``(s_in @ W^T) << weight_exp`` (arithmetic right
    shift for a negative exponent). ``weights`` (out, in) int64, ``s_in`` (B, in) int64."""
    a = s_in.astype(np.int64) @ weights.astype(np.int64).T
    return np.left_shift(a, weight_exp) if weight_exp > 0 else np.right_shift(a, -weight_exp)


def _decay_toward_zero(x: np.ndarray, factor: int, shift: int) -> np.ndarray:
    """``sign(x) ((|x| factor) >> shift)``: Lava's decay (rounds toward zero)."""
    prod = x.astype(np.int64) * factor
    return np.sign(prod) * np.right_shift(np.abs(prod), shift)


def lava_lif_step(u: np.ndarray, v: np.ndarray, a_in: np.ndarray, *, du: int, dv: int, bias_mant: np.ndarray | int,
                  bias_exp: int, vth: int, reset: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of Lava's ``PyLifModelBitAcc`` (``lava/proc/lif/models.py``); returns ``(u, v, s)``.

    ``u <- wrap24(sign(u) ((|u| (4096 - du - 1)) >> 12) + (a_in << 6))``,
    ``v <- clip(sign(v) ((|v| (4096 - dv)) >> 12) + u + (bias_mant << bias_exp), -(2^23 - 1), 2^23 - 1)``,
    ``s = v > vth << 6``, then ``v = 0`` where ``s`` (``reset=False`` leaves that to the caller). All int64.
    """
    decayed = _decay_toward_zero(u, 2 ** LAVA_DECAY_SHIFT - (du + 1), LAVA_DECAY_SHIFT)
    decayed = decayed + np.left_shift(np.asarray(a_in, dtype=np.int64), LAVA_ACT_SHIFT)
    # Lava's wrap: > 2^23 -> minus 2^24; <= -2^23 -> plus 2^24 (computed from the unwrapped value)
    wrapped = np.where(decayed > _LAVA_MAX_UV, decayed - 2 * _LAVA_MAX_UV, decayed)
    wrapped = np.where(wrapped <= -_LAVA_MAX_UV, decayed + 2 * _LAVA_MAX_UV, wrapped)
    u_new = wrapped
    bias_mant = np.asarray(bias_mant, dtype=np.int64)
    eff_bias = np.left_shift(bias_mant, bias_exp) if bias_exp >= 0 else np.right_shift(bias_mant, -bias_exp)
    v_new = _decay_toward_zero(v, 2 ** LAVA_DECAY_SHIFT - dv, LAVA_DECAY_SHIFT) + u_new + eff_bias
    v_new = np.clip(v_new, -_LAVA_MAX_UV + 1, _LAVA_MAX_UV - 1)
    s = v_new > (int(vth) << LAVA_VTH_SHIFT)
    if reset:
        v_new = np.where(s, 0, v_new)
    return u_new, v_new, s


def _overflow(x: np.ndarray, bits: int, mode: str) -> np.ndarray:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if mode == "saturate":
        return np.clip(x, lo, hi)
    return np.remainder(x - lo, 1 << bits) + lo


def fixed_lif_step(v: np.ndarray, z_prev: np.ndarray, drive: np.ndarray, dep: Deployment
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One step of the generic integer LIF (module docstring, ``fixed``); returns the new membrane (before its
    reset, which acts on the next step as in neuroinit) and the spike condition (before refractoriness)."""
    if dep.chip_reset == "zero":
        v = np.where(z_prev, 0, v)
    if dep.decay_kind == "linear":
        vd = _decay_toward_zero(v, 2 ** dep.decay_bits - dep.decay, dep.decay_bits)
    elif dep.decay_kind == "shift":
        vd = v - np.right_shift(v, dep.decay)
    else:
        vd = np.trunc(v * dep.alpha_chip).astype(np.int64)
    theta = dep.threshold << dep.threshold_shift
    new = vd + np.left_shift(drive, dep.threshold_shift) + dep.bias
    if dep.chip_reset == "subtract":
        new = new - z_prev.astype(np.int64) * theta
    new = _overflow(new, dep.state_bits, dep.overflow)
    s = new >= theta if dep.spike_compare == ">=" else new > theta
    return new, s


# ============================================================================================ running

class Emulation(NamedTuple):
    """Result of :func:`emulate`: ``spikes`` (T, B, N) and ``outputs`` (T, B, O) float64 tensors on neuroinit's
    time axis; ``v`` (T, B, N) the membrane in chip units (int64; float for ``float``); ``events``: counts of
    overflow events (``v_saturated``, ``u_wrapped``, ``a_in_over_16bit``); ``chip_steps``: steps the chip ran."""

    spikes: torch.Tensor
    outputs: torch.Tensor
    v: torch.Tensor
    events: dict
    chip_steps: int


@torch.no_grad()
def run_cell(cell: RecurrentCell, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """neuroinit's float simulation of a LIF ``cell``: ``(spikes, outputs, v)`` over a time-major input."""
    params = cell.params()
    state = cell.init_state(inputs.shape[1])
    zs, ys, vs = [], [], []
    for u in inputs.to(dtype=cell.w_rec.dtype):
        y, state = cell.step(params, state, u)
        zs.append(state.z)
        ys.append(y)
        vs.append(state.v)
    return torch.stack(zs), torch.stack(ys), torch.stack(vs)


def _host_readout(dep: Deployment, spikes: np.ndarray) -> torch.Tensor:
    p = dep.params
    w_out = p.w_out.detach().double()
    b_out = p.b_out.detach().double()
    kappa = torch.tensor(dep.kappa, dtype=torch.float64)
    z = torch.from_numpy(spikes.astype(np.float64))
    y = torch.zeros(z.shape[1], w_out.shape[0], dtype=torch.float64)
    ys = []
    for t in range(z.shape[0]):
        y = kappa * y + (z[t] @ w_out.T + b_out)
        ys.append(y)
    return torch.stack(ys)


def _graded_inputs(dep: Deployment, inputs: np.ndarray) -> np.ndarray:
    return np.rint(inputs * 2.0 ** dep.input_frac_bits).astype(np.int64)


@torch.no_grad()
def emulate(dep: Deployment, inputs: torch.Tensor) -> Emulation:
    """Run the deployed network on time-major ``inputs`` (T, B, I) with the profile's arithmetic."""
    if inputs.dim() != 3 or inputs.shape[-1] != dep.cell.n_in:
        raise ValueError(f"Invalid input shape {tuple(inputs.shape)}: expected (T, B, {dep.cell.n_in})")
    if dep.arithmetic == "float":
        z, y, v = run_cell(dep.cell, inputs.detach().to(device="cpu", dtype=torch.float64))
        return Emulation(z, y, v, {}, inputs.shape[0])
    x = inputs.detach().to(device="cpu", dtype=torch.float64).numpy()
    k = _graded_inputs(dep, x)
    if dep.arithmetic == "lava":
        spikes, v_trace, events = _run_lava(dep, k)
        steps = x.shape[0] + 1
    else:
        spikes, v_trace, events = _run_fixed(dep, k)
        steps = x.shape[0]
    y = _host_readout(dep, spikes)
    return Emulation(torch.from_numpy(spikes.astype(np.float64)), y, torch.from_numpy(v_trace), events, steps)


def _refractory(s: np.ndarray, ref: np.ndarray, n_ref: int) -> tuple[np.ndarray, np.ndarray]:
    if n_ref <= 0:
        return s, ref
    s = s & (ref <= 0)
    ref = np.where(s, n_ref, np.maximum(ref - 1, 0))
    return s, ref


def _run_lava(dep: Deployment, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Lava's schedule with Dense's one-step delay made explicit (module docstring)."""
    n_steps, batch, _ = k.shape
    n = dep.cell.n_hidden
    u = np.zeros((batch, n), np.int64)
    v = np.zeros((batch, n), np.int64)
    ref = np.zeros((batch, n), np.int64)
    buf_in = np.zeros((batch, n), np.int64)    # input Dense: accumulated at chip step c-1, sent at c
    buf_rec = np.zeros((batch, n), np.int64)   # recurrent Dense: the same
    zero_bias = np.zeros(n, np.int64)
    spikes = np.zeros((n_steps, batch, n), bool)
    v_trace = np.zeros((n_steps, batch, n), np.int64)
    events = {"v_saturated": 0, "u_wrapped": 0, "a_in_over_16bit": 0}
    a_lim = 2 ** (LAVA_A_IN_BITS - 1)
    for c in range(n_steps + 1):
        a_in = buf_in + buf_rec
        events["a_in_over_16bit"] += int(((a_in >= a_lim) | (a_in < -a_lim)).sum())
        bias = dep.bias if c >= 1 else zero_bias   # priming step: bias held at 0 while u_0 is in flight
        raw_u = a_in << LAVA_ACT_SHIFT   # du = 4095: the decayed current is 0, u is this step's input
        u, v, s = lava_lif_step(u, v, a_in, du=4095, dv=dep.decay, bias_mant=bias, bias_exp=dep.bias_exp,
                                vth=dep.threshold, reset=False)
        events["u_wrapped"] += int((u != raw_u).sum())
        events["v_saturated"] += int((np.abs(v) == _LAVA_MAX_UV - 1).sum())
        s, ref = _refractory(s, ref, dep.n_refractory)   # a no-op without refractoriness (Lava's case)
        v_rec = v
        v = np.where(s, 0, v)                            # Lava: v = 0 where the neuron spiked
        buf_rec = lava_dense(dep.w_rec, s.astype(np.int64), dep.exp_rec)
        buf_in = lava_dense(dep.w_in, k[c], dep.exp_in) if c < n_steps else np.zeros_like(buf_in)
        if c >= 1:
            spikes[c - 1] = s
            v_trace[c - 1] = v_rec
    return spikes, v_trace, events


def _run_fixed(dep: Deployment, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    n_steps, batch, _ = k.shape
    n = dep.cell.n_hidden
    v = np.zeros((batch, n), np.int64)
    z = np.zeros((batch, n), bool)
    ref = np.zeros((batch, n), np.int64)
    spikes = np.zeros((n_steps, batch, n), bool)
    v_trace = np.zeros((n_steps, batch, n), np.int64)
    lim = (1 << (dep.state_bits - 1))
    events = {"v_saturated": 0}
    for t in range(n_steps):
        drive = lava_dense(dep.w_in, k[t], dep.exp_in) + lava_dense(dep.w_rec, z.astype(np.int64), dep.exp_rec)
        v, s = fixed_lif_step(v, z, drive, dep)
        events["v_saturated"] += int(((v == lim - 1) | (v == -lim)).sum())
        s, ref = _refractory(s, ref, dep.n_refractory)
        z = s
        spikes[t] = s
        v_trace[t] = v
    return spikes, v_trace, events


def spike_mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of (step, trial, neuron) entries where two spike trains differ."""
    if a.shape != b.shape:
        raise ValueError(f"Invalid spike shapes {tuple(a.shape)} vs {tuple(b.shape)}: must be equal")
    return int((a.detach().cpu().double() != b.detach().cpu().double()).sum())


def compare_on_task(cell: RecurrentCell, task, profile: HardwareProfile | str | None = None, *,
                    generator: torch.Generator, batch_size: int = 64, input_frac_bits: int = 8,
                    bias_exp: int | None = None, batch=None) -> dict:
    """Float network vs chip emulation on one batch of ``task``: accuracy, loss and spike mismatches.

    Returns a JSON-able dict: ``profile``, ``arithmetic``, ``float_accuracy``, ``chip_accuracy``,
    ``accuracy_change``, ``float_loss``, ``chip_loss``, ``loss_change``, ``spike_mismatches``, ``spikes_float``,
    ``spikes_chip``, ``events`` and ``notes``. The float network is the deployed one (weights on the grid,
    float64 arithmetic), so the change is what the chip's integer arithmetic costs. ``input_frac_bits`` and
    ``bias_exp`` as in :func:`deploy`.
    """
    dep = deploy(cell, profile, input_frac_bits=input_frac_bits, bias_exp=bias_exp)
    if batch is None:
        batch = task.batch(batch_size, generator=generator, dtype=torch.float64)
    inputs = batch.inputs.detach().to(device="cpu", dtype=torch.float64)
    batch = type(batch)(inputs, batch.targets.detach().cpu(), batch.mask.detach().cpu().to(torch.float64))
    z_f, y_f, _ = run_cell(dep.cell, inputs)
    em = emulate(dep, inputs)
    acc_f, acc_c = task.accuracy(y_f, batch), task.accuracy(em.outputs, batch)
    loss_f, loss_c = float(task.loss(y_f, batch)), float(task.loss(em.outputs, batch))
    return {
        "profile": dep.profile.name, "arithmetic": dep.arithmetic, "steps": int(inputs.shape[0]),
        "trials": int(inputs.shape[1]), "float_accuracy": acc_f, "chip_accuracy": acc_c,
        "accuracy_change": acc_c - acc_f, "float_loss": loss_f, "chip_loss": loss_c, "loss_change": loss_c - loss_f,
        "spike_mismatches": spike_mismatches(z_f, em.spikes), "spikes_float": int(z_f.sum()),
        "spikes_chip": int(em.spikes.sum()), "events": dict(em.events), "notes": list(dep.notes),
    }
