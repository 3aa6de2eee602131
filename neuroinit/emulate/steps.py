"""The chip's integer neuron arithmetic: Lava's LIF/Dense and the fixed decay, threshold, reset, saturation."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from neuroinit.emulate.deployed import Deployment

__all__ = [
    "LAVA_ACT_SHIFT",
    "LAVA_BIAS_BITS",
    "LAVA_BIAS_EXP",
    "LAVA_DECAY_SHIFT",
    "LAVA_UV_BITS",
    "LAVA_VTH_MAX",
    "LAVA_VTH_SHIFT",
    "ChipState",
    "chip_decay",
    "chip_population_step",
    "decay_code",
    "fixed_lif_step",
    "lava_dense",
    "lava_lif_step",
    "spike_counts",
    "synaptic_adds",
]

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


def _refractory(s: np.ndarray, ref: np.ndarray, n_ref: int) -> tuple[np.ndarray, np.ndarray]:
    if n_ref <= 0:
        return s, ref
    s = s & (ref <= 0)
    ref = np.where(s, n_ref, np.maximum(ref - 1, 0))
    return s, ref

