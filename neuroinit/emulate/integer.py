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

from typing import NamedTuple

import numpy as np
import torch

from neuroinit.cells.base import RecurrentCell
from neuroinit.emulate.deployment import (  # noqa: F401  (re-exported: the public names live at this path)
    ARITHMETICS,
    Deployment,
    _chip_readout,
    arithmetic_of,
    check_saturation,
    deploy,
    deployed_cell,
    weight_codes,
)
from neuroinit.emulate.steps import (  # noqa: F401  (re-exported: the public names live at this path)
    _LAVA_MAX_UV,
    LAVA_A_IN_BITS,
    LAVA_ACT_SHIFT,
    LAVA_BIAS_BITS,
    LAVA_BIAS_EXP,
    LAVA_DECAY_SHIFT,
    LAVA_UV_BITS,
    LAVA_VTH_MAX,
    LAVA_VTH_SHIFT,
    ChipState,
    _decay_toward_zero,
    _overflow,
    _refractory,
    chip_decay,
    chip_population_step,
    decay_code,
    fixed_lif_step,
    lava_dense,
    lava_lif_step,
    spike_counts,
    synaptic_adds,
)
from neuroinit.profiles import HardwareProfile

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
