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

``fixed`` (``xylo-like``, ``reckon-like`` and any integer profile with ``neuron.schedule = "same-step"``):
    the rules the profile's ``[neuron]`` section states (:class:`~neuroinit.profiles.NeuronSpec`), composed in
    :func:`chip_population_step`: a synaptic current or none, the decay's rounding (:func:`chip_decay`), ``>`` or
    ``>=``, the reset (at once, or the trained one on the next step), spikes per step (:func:`spike_counts`),
    saturation once or after every add (:func:`synaptic_adds`), graded inputs or spike counts with a cap
    (:func:`chip_inputs`), a host or an integer LIF readout. One v LSB is ``2^e_min / 2^threshold.shift``; weights
    are codes with per-matrix shifts; threshold ``theta = v_th / 2^e_min`` (an unsigned ``threshold.bits`` code)
    compared as ``theta << shift``. Decay codes by :func:`decay_code`. With xylo-like's rules this is Xylo's
    neuron as SynSense's xylosim computes it (verified in ``tests/test_xylo.py``).

The arithmetic is chosen from the profile's values (:func:`arithmetic_of`), never from its name.

The leaky readout ``y <- kappa y + W_out z + b_out`` runs on the host in float64 from the chip's spikes, with
``W_out`` on its grid, unless the profile's readout is ``chip-lif``. Refractoriness follows neuroinit (spike suppressed for ``n_refractory``
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
from neuroinit.profiles import HardwareProfile, NeuronSpec, load_profile
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
    "ChipState",
    "Deployment",
    "Emulation",
    "arithmetic_of",
    "check_saturation",
    "chip_decay",
    "chip_inputs",
    "chip_population_step",
    "compare_on_task",
    "decay_code",
    "deploy",
    "deployed_cell",
    "emulate",
    "fixed_lif_step",
    "lava_dense",
    "lava_lif_step",
    "run_cell",
    "spike_counts",
    "spike_mismatches",
    "synaptic_adds",
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
    rules: NeuronSpec = field(default_factory=NeuronSpec)  # the profile's neuron arithmetic (fixed)
    syn_decay: int = 0                     # decay code of the synaptic current (rules.synapse = "current")
    alpha_syn_chip: float = 0.0            # the current's factor that code realises
    readout: dict | None = None            # rules.readout = "chip-lif": the output neurons (see deploy)

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

    # fixed: the rules of the profile's [neuron] section
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
    syn_d, beta_chip = 0, 0.0
    if rules.synapse == "current":
        beta = float(getattr(dep_cell, "beta_syn", 0.0))
        if beta <= 0.0:
            beta = 0.5
            notes.append("the cell has no synaptic current; the chip's current uses its fastest decay "
                         "(alpha_syn = 0.5), which low-passes the input the float network saw directly")
        syn_d, beta_chip = decay_code(beta, kind, bits, minimum=1)
        if abs(beta_chip - beta) > 1e-3:
            notes.append(f"synaptic decay realised as {beta_chip:.6g} (trained {beta:.6g})")
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
    f_bits = input_frac_bits
    if rules.input == "counts" and f_bits > e_in - e_min:
        f_bits = max(e_in - e_min, 0)
        notes.append(f"input counts carry {f_bits} fractional bits (the input weight shift must stay >= 0)")
    lsb = unit / 2 ** shift
    b_code = np.rint(bias / lsb).astype(np.int64)
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
        readout = _chip_readout(dep_cell, profile, kappa, codes, notes)
    return Deployment(
        chip_reset=chip_reset, alpha_chip=alpha_chip, w_in=codes["w_in"].copy(), w_rec=codes["w_rec"].copy(),
        exp_in=e_in - e_min - f_bits, exp_rec=e_rec - e_min, threshold=theta_code, threshold_shift=shift,
        decay=d, decay_kind=kind, decay_bits=bits, bias=b_code.reshape(n), bias_exp=0,
        state_bits=profile.state.bits, overflow=profile.state.overflow, spike_compare=rules.threshold_compare,
        unit=unit, e_min=e_min, notes=tuple(notes), rules=rules, syn_decay=syn_d, alpha_syn_chip=beta_chip,
        readout=readout, **{**common, "input_frac_bits": f_bits})


def decay_code(alpha: float, kind: str, bits: int, *, minimum: int = 0) -> tuple[int, float]:
    """The decay code of a leak factor ``alpha`` and the factor it realises: ``linear`` ``d = round(2^B (1 -
    alpha))``, alpha_chip = (2^B - d) / 2^B; ``shift`` ``dash = round(log2(1 / (1 - alpha)))`` (at least
    ``minimum``; Xylo's current needs dash >= 1: dash 0 empties it every step), alpha_chip = 1 - 2^-dash;
    ``float`` alpha itself."""
    if kind == "linear":
        d = int(min(max(round(2 ** bits * (1.0 - alpha)), 0), 2 ** bits - 1))
        return d, (2 ** bits - d) / 2 ** bits
    if kind == "shift":
        d = int(min(max(round(math.log2(1.0 / (1.0 - alpha))), minimum), 2 ** bits - 1)) if alpha < 1 \
            else 2 ** bits - 1
        return d, 1.0 - 2.0 ** -d
    return 0, alpha


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


def chip_decay(x: np.ndarray, code: int, dep: Deployment) -> np.ndarray:
    """What one step's leak removes from the integer state ``x`` (the new state is ``x - chip_decay(x)``), by the
    profile's ``decay.kind`` and ``neuron.decay_rounding``:

    ``shift``  ``x >> dash`` (``floor``; ``toward-zero``: ``sign(x) (|x| >> dash)``);
    ``linear`` ``x - round(x (2^B - d) / 2^B)`` with the kept value rounded by ``floor`` or ``toward-zero``;
    ``float``  ``x - round(alpha x)`` likewise.
    ``floor-min-one`` is ``floor`` but removes at least 1 toward zero from any nonzero state (xylosim's
    ``decay``: a small positive membrane still decays; ``x >> dash`` is never 0 for negative x anyway).
    """
    x = x.astype(np.int64)
    rounding = dep.rules.decay_rounding
    if dep.decay_kind == "shift":
        dx = np.sign(x) * np.right_shift(np.abs(x), code) if rounding == "toward-zero" else np.right_shift(x, code)
    else:
        if dep.decay_kind == "linear":
            prod, div = x * (2 ** dep.decay_bits - code), 2 ** dep.decay_bits
        else:
            prod, div = x * float(dep.alpha_chip), 1   # float decay: the membrane's alpha (no current)
        if rounding == "toward-zero":
            kept = np.sign(prod) * (np.abs(prod) // div)
        else:
            kept = np.floor_divide(prod, div)
        dx = x - np.asarray(kept).astype(np.int64)
    if rounding == "floor-min-one":
        dx = np.where((dx == 0) & (x != 0), np.sign(x), dx)
    return dx


def _overflow(x: np.ndarray, bits: int, mode: str) -> np.ndarray:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if mode == "saturate":
        return np.clip(x, lo, hi)
    return np.remainder(x - lo, 1 << bits) + lo


def synaptic_adds(acc: np.ndarray, counts: np.ndarray, weights: np.ndarray, *, every_add: bool, bits: int,
                  mode: str) -> np.ndarray:
    """``acc + counts @ weights`` for (B, N) ``acc``, (B, P) spike ``counts`` and (P, N) per-synapse ``weights``
    (already shifted). With ``every_add`` the state saturates after every single add, presynaptic neuron by
    neuron in index order (xylosim ``deliver_spikes`` / ``safe_add``); ``count`` adds of one weight clip as one
    add of ``count * w`` (the running sum is monotone). Where no partial sum can leave the state's range the
    result is the plain sum, so the sequential loop only runs for states near saturation."""
    contrib = counts.astype(np.int64)[:, :, None] * weights.astype(np.int64)[None, :, :]   # (B, P, N)
    total = acc + contrib.sum(1)
    if not every_add:
        return total
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    pos, neg = np.clip(contrib, 0, None).sum(1), np.clip(contrib, None, 0).sum(1)
    if bool(np.all((acc + pos <= hi) & (acc + neg >= lo))):
        return total
    out = acc.astype(np.int64).copy()
    for p in range(contrib.shape[1]):
        out = _overflow(out + contrib[:, p, :], bits, mode)
    return out


def spike_counts(v: np.ndarray, theta: int, compare: str, max_spikes: int) -> np.ndarray:
    """Spikes per step: ``n = min(floor(v / theta), max_spikes)`` where ``v >= theta`` (``>=``; xylosim's
    ``while (v_mem >= v_th && n < max) {n++; v_mem -= v_th}``), ``n = min(ceil(v / theta) - 1, max_spikes)``
    where ``v > theta`` (``>``); with ``max_spikes = 1`` a single spike on the comparison."""
    if compare == ">=":
        n = np.where(v >= theta, np.floor_divide(v, theta), 0)
    else:
        n = np.where(v > theta, np.floor_divide(v - 1, theta), 0)
    return np.minimum(n, max_spikes).astype(np.int64)


class ChipState(NamedTuple):
    """Integer state of the ``fixed`` arithmetic: membrane ``v``, synaptic current ``i`` (zeros without one),
    last step's spike counts ``n``, refractory steps ``ref`` (all (B, N) int64)."""

    v: np.ndarray
    i: np.ndarray
    n: np.ndarray
    ref: np.ndarray
    clipped: int = 0   # entries of this step whose synaptic sum saturated (differs from the unclipped sum)


def chip_population_step(s: ChipState, counts: np.ndarray, weights: np.ndarray, *, bias: np.ndarray,
                         decay: int, syn_decay: int, threshold: int, max_spikes: int, reset: str,
                         n_refractory: int, dep: Deployment) -> ChipState:
    """One step of a population of integer LIF neurons under the profile's ``[neuron]`` rules::

        acc = I + counts @ W                          (saturating per add with saturation = "every-add")
        I   = acc - decay(acc)                        (synapse = "current"; else I = 0 and acc is the drive)
        V   = V - decay(V) + acc + b                  (every-add: dV = sat(sat(-decay(V) + acc) + b), V = sat(V + dV);
                                                       state: V = clip_or_wrap(V - decay(V) + acc + b - reset))
        n   = spike_counts(V)                         (threshold_compare, max_spikes)
        V  -= n theta  or  V = 0 where n > 0           (reset "subtract" / "zero", at once, as the chip does)

    ``counts`` (B, P) are the presynaptic spike counts in order (inputs, then last step's hidden spikes), and
    ``weights`` (P, N) the matching per-synapse weights in state units. With ``reset = "as-trained"`` the
    trained cell's reset acts on the next step instead (neuroinit's convention: ``V = 0`` where a spike was
    emitted, or ``- theta`` after the leak). ``decay`` via :func:`chip_decay`.
    """
    rules, bits, mode = dep.rules, dep.state_bits, dep.overflow
    every = rules.saturation == "every-add"
    v = s.v
    trained = dep.reset if reset == "as-trained" else None
    if trained == "zero":
        v = np.where(s.n > 0, 0, v)
    acc0 = s.i if rules.synapse == "current" else np.zeros_like(v)
    acc = synaptic_adds(acc0, counts, weights, every_add=every, bits=bits, mode=mode)
    clipped = int((acc != synaptic_adds(acc0, counts, weights, every_add=False, bits=bits, mode=mode)).sum()) \
        if every else 0
    if rules.synapse == "current":
        acc = acc - chip_decay(acc, syn_decay, dep)
        i_new = acc
    else:
        i_new = np.zeros_like(v)
    sub = s.n * threshold if trained == "subtract" else 0
    if every:
        dv = _overflow(-chip_decay(v, decay, dep) + acc, bits, mode)
        dv = _overflow(dv + bias, bits, mode)
        if trained == "subtract":
            dv = _overflow(dv - sub, bits, mode)
        v = _overflow(v + dv, bits, mode)
    else:
        v = _overflow(v - chip_decay(v, decay, dep) + acc + bias - sub, bits, mode)
    n = spike_counts(v, threshold, dep.spike_compare, max_spikes)
    ref = s.ref
    if n_refractory > 0:
        free, ref = _refractory(n > 0, ref, n_refractory)
        n = n * free
    if reset == "subtract":
        v = v - n * threshold
    elif reset == "zero":
        v = np.where(n > 0, 0, v)
    return ChipState(v, i_new, n, ref, clipped)


def fixed_lif_step(v: np.ndarray, z_prev: np.ndarray, drive: np.ndarray, dep: Deployment
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One hidden step of the ``fixed`` arithmetic from a membrane ``v``, last step's spikes ``z_prev`` and an
    already summed ``drive`` (weight units; it enters a fresh synaptic current when the profile has one): returns
    the new membrane and the spike counts (:func:`chip_population_step`, one presynaptic input per neuron)."""
    b = v.shape[0]
    s = ChipState(v.astype(np.int64), np.zeros_like(v, np.int64), z_prev.astype(np.int64), np.zeros_like(v, np.int64))
    w = np.eye(v.shape[1], dtype=np.int64)
    out = chip_population_step(s, np.left_shift(drive.reshape(b, -1), dep.threshold_shift), w, bias=dep.bias,
                               decay=dep.decay, syn_decay=dep.syn_decay, threshold=dep.threshold << dep.threshold_shift,
                               max_spikes=dep.rules.max_spikes, reset=dep.rules.reset, n_refractory=0, dep=dep)
    return out.v, out.n


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
    i: torch.Tensor | None = None          # fixed: the synaptic current (T, B, N), chip units
    v_out: torch.Tensor | None = None      # readout "chip-lif": output membranes (T, B, O), chip units
    i_out: torch.Tensor | None = None      # readout "chip-lif": output currents (T, B, O)


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


def chip_inputs(dep: Deployment, inputs: np.ndarray) -> np.ndarray:
    """The integers the chip receives for real inputs ``u``: ``k = round(u 2^f)`` (``f = input_frac_bits``);
    with ``neuron.input = "counts"`` clipped to spike counts ``0..input_cap`` (Xylo: 15 per step)."""
    k = np.rint(inputs * 2.0 ** dep.input_frac_bits).astype(np.int64)
    if dep.arithmetic == "fixed" and dep.rules.input == "counts":
        k = np.clip(k, 0, dep.rules.input_cap if dep.rules.input_cap else None)
    return k


@torch.no_grad()
def emulate(dep: Deployment, inputs: torch.Tensor) -> Emulation:
    """Run the deployed network on time-major ``inputs`` (T, B, I) with the profile's arithmetic."""
    if inputs.dim() != 3 or inputs.shape[-1] != dep.cell.n_in:
        raise ValueError(f"Invalid input shape {tuple(inputs.shape)}: expected (T, B, {dep.cell.n_in})")
    if dep.arithmetic == "float":
        z, y, v = run_cell(dep.cell, inputs.detach().to(device="cpu", dtype=torch.float64))
        return Emulation(z, y, v, {}, inputs.shape[0])
    x = inputs.detach().to(device="cpu", dtype=torch.float64).numpy()
    k = chip_inputs(dep, x)
    if dep.arithmetic == "lava":
        spikes, v_trace, events = _run_lava(dep, k)
        y = _host_readout(dep, spikes)
        return Emulation(torch.from_numpy(spikes.astype(np.float64)), y, torch.from_numpy(v_trace), events,
                         x.shape[0] + 1)
    tr = _run_fixed(dep, k)
    as_t = lambda a: None if a is None else torch.from_numpy(a)
    if dep.readout is not None:
        y = torch.from_numpy(tr["v_out"].astype(np.float64) * dep.readout["unit"])
    else:
        y = _host_readout(dep, tr["spikes"])
    return Emulation(torch.from_numpy(tr["spikes"].astype(np.float64)), y, torch.from_numpy(tr["v"]),
                     tr["events"], x.shape[0], as_t(tr["i"]), as_t(tr.get("v_out")), as_t(tr.get("i_out")))


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


def _shifted(w: np.ndarray, shift: int) -> np.ndarray:
    return np.left_shift(w.astype(np.int64), shift) if shift >= 0 else np.right_shift(w.astype(np.int64), -shift)


def _run_fixed(dep: Deployment, k: np.ndarray) -> dict:
    """The ``fixed`` schedule (xylosim ``XyloLayer::evolve``): per step the input counts and last step's hidden
    spike counts reach the hidden neurons, last step's hidden counts reach the output neurons, then both
    populations step (:func:`chip_population_step`). Returns spike counts, membranes and currents per step."""
    n_steps, batch, _ = k.shape
    n = dep.cell.n_hidden
    ts = dep.threshold_shift
    # per-synapse weights in state units; a negative input shift (graded inputs with more fractional bits than
    # the weight exponents leave) shifts the summed input instead, which then enters as one input per neuron
    sum_in = dep.exp_in < 0
    w_first = np.eye(n, dtype=np.int64) if sum_in else _shifted(dep.w_in, dep.exp_in).T
    w_hidden = np.concatenate([w_first, _shifted(dep.w_rec, dep.exp_rec).T], 0) << ts
    zeros = np.zeros((batch, n), np.int64)
    s = ChipState(zeros, zeros, zeros, zeros)
    lim = (1 << (dep.state_bits - 1))
    events = {"v_saturated": 0, "multi_spikes": 0, "synaptic_sum_saturated": 0}
    out = {"spikes": np.zeros((n_steps, batch, n), np.int64), "v": np.zeros((n_steps, batch, n), np.int64),
           "i": np.zeros((n_steps, batch, n), np.int64) if dep.rules.synapse == "current" else None}
    ro = dep.readout
    if ro is not None:
        n_out = ro["w_out"].shape[0]
        w_out = _shifted(ro["w_out"], ro["exp_out"]).T << ts
        zo = np.zeros((batch, n_out), np.int64)
        so = ChipState(zo, zo, zo, zo)
        out["v_out"] = np.zeros((n_steps, batch, n_out), np.int64)
        out["i_out"] = np.zeros((n_steps, batch, n_out), np.int64)
    theta = dep.threshold << ts
    for t in range(n_steps):
        prev = s.n
        first = lava_dense(dep.w_in, k[t], dep.exp_in) if sum_in else k[t]
        s = chip_population_step(s, np.concatenate([first, prev], 1), w_hidden, bias=dep.bias, decay=dep.decay,
                                 syn_decay=dep.syn_decay, threshold=theta, max_spikes=dep.rules.max_spikes,
                                 reset=dep.rules.reset, n_refractory=dep.n_refractory, dep=dep)
        events["v_saturated"] += int(((s.v == lim - 1) | (s.v == -lim)).sum())
        events["multi_spikes"] += int((s.n > 1).sum())
        events["synaptic_sum_saturated"] += s.clipped
        out["spikes"][t], out["v"][t] = s.n, s.v
        if out["i"] is not None:
            out["i"][t] = s.i
        if ro is not None:
            so = chip_population_step(so, prev, w_out, bias=ro["bias"], decay=ro["decay"],
                                      syn_decay=ro["syn_decay"], threshold=ro["threshold"],
                                      max_spikes=ro["max_spikes"], reset=dep.rules.reset, n_refractory=0, dep=dep)
            out["v_out"][t], out["i_out"][t] = so.v, so.i
    out["events"] = events
    return out


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
