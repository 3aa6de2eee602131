"""Deploying a trained LIF network onto a profile: weight, threshold, decay and bias codes, and checks."""

from __future__ import annotations

import math

import numpy as np
import torch

from neuroinit.cells.base import QUANTISED_PARAMS, CellParams, RecurrentCell
from neuroinit.emulate.deployed import Deployment
from neuroinit.emulate.steps import (
    LAVA_ACT_SHIFT,
    LAVA_BIAS_BITS,
    LAVA_DECAY_SHIFT,
    LAVA_UV_BITS,
    LAVA_VTH_MAX,
    LAVA_VTH_SHIFT,
    decay_code,
)
from neuroinit.init import check_fits
from neuroinit.profiles import HardwareProfile, load_profile

__all__ = [
    "ARITHMETICS",
    "Deployment",
    "arithmetic_of",
    "check_saturation",
    "deploy",
    "deployed_cell",
    "weight_codes",
]

ARITHMETICS = ("float", "lava", "fixed")


def arithmetic_of(profile: HardwareProfile | str) -> str:
    """``"float"`` for float state (``state.bits = 0``), ``"lava"`` for ``neuron.schedule = "dense-delay"``
    (Lava's LIF with Dense's one-step delay; the profile loader checks its 12-bit linear decay and threshold
    shift 6), else ``"fixed"`` (the rules of the profile's ``[neuron]`` section). Never the profile's name."""
    profile = load_profile(profile)
    if profile.state.bits == 0:
        return "float"
    if profile.neuron.schedule == "dense-delay":
        return "lava"
    return "fixed"


# ============================================================================================ deployment

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
    if getattr(cell, "export_mapping", None) != "lif":   # the one neuron model the chip arithmetic emulates
        from neuroinit.cells import cell_class, model_names

        allowed = [m for m in model_names() if cell_class(m).export_mapping == "lif"]
        raise ValueError(f"Invalid model {getattr(cell, 'model', type(cell).__name__)!r} for chip emulation and "
                         f"export: NIR, netx and Xylo cannot express it (no export mapping); allowed "
                         f"{', '.join(allowed)}; export its weights with --format h5")
    if not (isinstance(input_frac_bits, int) and 0 <= input_frac_bits <= 24):
        raise ValueError(f"Invalid input_frac_bits {input_frac_bits!r}: allowed integers 0..24")
    profile = load_profile(profile if profile is not None else cell.profile)
    check_fits(profile, cell.n_in, cell.n_hidden, cell.n_out)
    dep_cell = deployed_cell(cell, profile)
    check_saturation(dep_cell, profile)
    arith = arithmetic_of(profile)
    alpha = float(dep_cell.alpha)
    notes: list[str] = []
    if not cell.quantised_forward and not profile.weights.is_float:
        notes.append("the cell was trained with float weights; the deployed network rounds them onto the grid")
    if profile != cell.profile:
        notes.append(f"weight grids chosen for '{profile.name}' from the trained weights (trained under "
                     f"'{cell.profile.name}')")
    common = {"profile": profile, "arithmetic": arith, "cell": dep_cell, "codes": weight_codes(dep_cell),
              "grids": dep_cell.grids, "reset": dep_cell.reset, "n_refractory": dep_cell.n_refractory,
              "alpha": alpha, "kappa": float(dep_cell.kappa), "input_frac_bits": input_frac_bits}
    if arith == "float":
        return Deployment(chip_reset=dep_cell.reset, alpha_chip=alpha, notes=tuple(notes), **common)
    if arith == "lava":
        return _deploy_lava(dep_cell, profile, common, notes, bias_exp)
    return _deploy_fixed(dep_cell, profile, common, notes)


def _exponents(dep_cell, profile: HardwareProfile, codes: dict) -> tuple[int, int, int]:
    """The input and recurrent weight exponents and the finest one in use (the accumulator's unit)."""
    g_in, g_rec = dep_cell.grids["w_in"], dep_cell.grids["w_rec"]
    if g_in is None or g_rec is None or g_in.exponent is None or g_rec.exponent is None:
        raise ValueError(f"Invalid profile '{profile.name}' for integer emulation: integer state needs pow2 "
                         f"weight scaling (weights.scaling = 'pow2'), got {profile.weights.scaling!r}")
    e_in, e_rec = g_in.exponent, g_rec.exponent
    # an all-zero matrix (no recurrence, say) sits on the finest grid; it must not set the accumulator unit
    used = [e for e, c in ((e_in, codes["w_in"]), (e_rec, codes["w_rec"])) if np.any(c)]
    return e_in, e_rec, (min(used) if used else e_rec)


def _deploy_lava(dep_cell, profile: HardwareProfile, common: dict, notes: list[str],
                 bias_exp: int | None) -> Deployment:
    """Loihi's arithmetic (Lava's fixed-point LIF): 12-bit decay, 17-bit threshold, 13-bit bias mantissa."""
    codes, alpha, v_th = common["codes"], common["alpha"], float(dep_cell.v_th)
    e_in, e_rec, e_min = _exponents(dep_cell, profile, codes)
    bias = dep_cell.bias.detach().double().numpy()
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
        w_in=2 * codes["w_in"], w_rec=2 * codes["w_rec"], exp_in=e_in - e_min - half - common["input_frac_bits"],
        exp_rec=e_rec - e_min - half, threshold=vth_code, threshold_shift=LAVA_VTH_SHIFT, decay=dv,
        decay_kind="linear", decay_bits=LAVA_DECAY_SHIFT, bias=b_code, bias_exp=bias_exp,
        state_bits=LAVA_UV_BITS, overflow="saturate", spike_compare=">", unit=unit, e_min=e_min,
        notes=tuple(notes),
        **common)


def _deploy_fixed(dep_cell, profile: HardwareProfile, common: dict, notes: list[str]) -> Deployment:
    """Fixed-point arithmetic by the rules of the profile's [neuron] section (threshold, decay, state bits)."""
    codes, alpha, v_th = common["codes"], common["alpha"], float(dep_cell.v_th)
    e_in, e_rec, e_min = _exponents(dep_cell, profile, codes)
    rules = profile.neuron
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
    d, alpha_chip = decay_code(alpha, kind, bits)
    syn_d, beta_chip = _synaptic_decay(dep_cell, profile, notes)
    chip_reset = _neuron_rule_notes(dep_cell, rules, notes)
    f_bits = common["input_frac_bits"]
    if rules.input == "counts" and f_bits > e_in - e_min:
        f_bits = max(e_in - e_min, 0)
        notes.append(f"input counts carry {f_bits} fractional bits (the input weight shift must stay >= 0)")
    b_code = np.rint(dep_cell.bias.detach().double().numpy() / (unit / 2 ** shift)).astype(np.int64)
    lim = 2 ** (profile.state.bits - 1)
    n_sat = int(((b_code > lim - 1) | (b_code < -lim)).sum())
    if n_sat:
        notes.append(f"{n_sat} biases saturate the {profile.state.bits}-bit state")
    b_code = np.clip(b_code, -lim, lim - 1)
    if abs(alpha_chip - alpha) > 1e-3:
        notes.append(f"decay realised as alpha = {alpha_chip:.6g} (trained alpha = {alpha:.6g})")
    if dep_cell.n_refractory and rules.reset != "as-trained":
        notes.append("the chip has no refractory period: refractoriness emulated as neuroinit defines it")
    readout = None
    if rules.readout == "chip-lif":
        readout = _chip_readout(dep_cell, profile, common["kappa"], codes, notes)
    return Deployment(
        chip_reset=chip_reset, alpha_chip=alpha_chip, w_in=codes["w_in"].copy(), w_rec=codes["w_rec"].copy(),
        exp_in=e_in - e_min - f_bits, exp_rec=e_rec - e_min, threshold=theta_code, threshold_shift=shift,
        decay=d, decay_kind=kind, decay_bits=bits, bias=b_code.reshape(dep_cell.n_hidden), bias_exp=0,
        state_bits=profile.state.bits, overflow=profile.state.overflow, spike_compare=rules.threshold_compare,
        unit=unit, e_min=e_min, notes=tuple(notes), rules=rules, syn_decay=syn_d, alpha_syn_chip=beta_chip,
        readout=readout, **{**common, "input_frac_bits": f_bits})


def _synaptic_decay(dep_cell, profile: HardwareProfile, notes: list[str]) -> tuple[int, float]:
    """The synaptic current's decay code and realised decay (0, 0.0 without a synaptic current)."""
    if profile.neuron.synapse != "current":
        return 0, 0.0
    beta = float(getattr(dep_cell, "beta_syn", 0.0))
    if beta <= 0.0:
        beta = 0.5
        notes.append("the cell has no synaptic current; the chip's current uses its fastest decay "
                     "(alpha_syn = 0.5), which low-passes the input the float network saw directly")
    syn_d, beta_chip = decay_code(beta, profile.decay.kind, profile.decay.bits, minimum=1)
    if abs(beta_chip - beta) > 1e-3:
        notes.append(f"synaptic decay realised as {beta_chip:.6g} (trained {beta:.6g})")
    return syn_d, beta_chip


def _neuron_rule_notes(dep_cell, rules, notes: list[str]) -> str:
    """Notes where the chip's neuron rules differ from the trained cell's; returns the chip's reset."""
    if rules.threshold_compare != getattr(dep_cell, "threshold_compare", ">"):
        notes.append(f"the chip spikes at v {rules.threshold_compare} theta, the cell was trained with "
                     f"v {getattr(dep_cell, 'threshold_compare', '>')} v_th")
    chip_reset = dep_cell.reset if rules.reset == "as-trained" else rules.reset
    if chip_reset != dep_cell.reset:
        notes.append(f"the chip resets by {chip_reset}, the network was trained with reset by {dep_cell.reset}")
    if rules.max_spikes != getattr(dep_cell, "max_spikes", 1):
        notes.append(f"the chip emits up to {rules.max_spikes} spikes per step (the float network up to "
                     f"{getattr(dep_cell, 'max_spikes', 1)})")
    if chip_reset == "subtract" and rules.reset == "subtract" and not getattr(dep_cell, "reset_leaks", False):
        notes.append("the chip subtracts the threshold at once, before the next leak (the float network after it)")
    return chip_reset


def _chip_readout(dep_cell, profile: HardwareProfile, kappa: float, codes: dict, notes: list) -> dict:
    """Integer output neurons for ``readout = "chip-lif"``: the hidden neurons' rules, weights ``W_out`` (codes
    on the w_out grid, unit ``2^e_out``), membrane decay from kappa, the fastest synaptic decay (dash 1: the
    current halves every step), bias ``round(b_out / 2^e_out)``, threshold at the state's maximum (the output is
    the membrane, read as ``V_out 2^e_out``), one output spike per step at most (xylosim MAX_NUM_OUT_SPIKES)."""
    g_out = dep_cell.grids["w_out"]
    if g_out is None or g_out.exponent is None:
        raise ValueError(f"Invalid profile '{profile.name}' for readout 'chip-lif': the readout weights need "
                         "pow2 scaling (weights.scaling = 'pow2')")
    lim = 2 ** (profile.state.bits - 1)
    out_unit = 2.0 ** g_out.exponent
    b_out = dep_cell.b_out.detach().double().numpy()
    b_code = np.rint(b_out / out_unit).astype(np.int64)
    if np.any(np.abs(b_code) >= lim):
        notes.append("readout biases saturate the state")
    d, kappa_chip = decay_code(kappa, profile.decay.kind, profile.decay.bits)
    syn_d, beta = decay_code(0.5, profile.decay.kind, profile.decay.bits, minimum=1)
    notes.append(f"chip readout: integer output neurons, membrane decay {kappa_chip:.6g} (kappa {kappa:.6g}), "
                 f"synaptic decay {beta:g}, one step behind the hidden spikes")
    return {"w_out": codes["w_out"].copy(), "exp_out": 0, "unit": out_unit, "decay": d, "syn_decay": syn_d,
            "bias": np.clip(b_code, -lim, lim - 1), "threshold": lim - 1, "max_spikes": 1}
