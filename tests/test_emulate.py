"""Integer emulation of deployed LIF networks: Lava's bit-accurate update by hand, the Dense delay, the generic
fixed-point arithmetic, the ideal profile == float, refusals and the float-vs-chip task report."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuroinit.cells import LIFRNN, CellParams
from neuroinit.emulate.integer import (
    arithmetic_of,
    compare_on_task,
    deploy,
    emulate,
    fixed_lif_step,
    lava_dense,
    lava_lif_step,
    run_cell,
    spike_mismatches,
)
from neuroinit.init import hardware_init
from neuroinit.profiles import load_profile, profile_from_dict, profile_to_dict
from neuroinit.tasks import make_task


def _cell(profile: str, *, n_in=2, n=16, n_out=2, gain=1.5, seed=0, reset="zero", bias=0.0, **kw) -> LIFRNN:
    g = torch.Generator().manual_seed(seed)
    p, _ = hardware_init("lif", n_in, n, n_out, gain, profile, generator=g, out_of_range="clamp")
    if bias:
        p = p._replace(bias=bias * torch.randn(n, generator=g))
    return LIFRNN(p, reset=reset, profile=profile, **kw)


def _spikes(n_steps, trials, n_in, rate=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n_steps, trials, n_in, generator=g, dtype=torch.float64) < rate).double()


# ------------------------------------------------------------------------------------ Lava, by hand

def test_lava_lif_step_reproduces_hand_computed_trace():
    """Lava PyLifModelBitAcc, worked by hand (du = 1024, dv = 512, bias 3 << 6 = 192, vth 10 << 6 = 640):

    t  a_in  u = trunc0(u * 3071 / 4096) + (a_in << 6)      v = trunc0(v * 3584 / 4096) + u + 192     spike
    1   5    0 + 320 = 320                                  0 + 320 + 192 = 512                        no
    2   2    trunc(239.92) + 128 = 367                      448 + 367 + 192 = 1007 > 640 -> v = 0      yes
    3  -3    trunc(275.16) - 192 = 83                       0 + 83 + 192 = 275                         no
    4  -20   trunc(62.23) - 1280 = -1218                    trunc(240.63) - 1218 + 192 = -786          no
    5   0    -trunc(913.21) = -913 (toward zero)            -trunc(687.75) - 913 + 192 = -1408         no
    """
    u = np.zeros(1, np.int64)
    v = np.zeros(1, np.int64)
    got = []
    for a in (5, 2, -3, -20, 0):
        u, v, s = lava_lif_step(u, v, np.array([a]), du=1024, dv=512, bias_mant=3, bias_exp=6, vth=10)
        got.append((int(u[0]), int(v[0]), bool(s[0])))
    assert got == [(320, 512, False), (367, 0, True), (83, 275, False), (-1218, -786, False), (-913, -1408, False)]


def test_lava_current_wraps_and_voltage_saturates_at_24_bits():
    # u: (2^17 + 1) << 6 = 2^23 + 64 > 2^23 wraps to 2^23 + 64 - 2^24 (du = 4095: no decayed current)
    u, v, s = lava_lif_step(np.array([0]), np.array([0]), np.array([2 ** 17 + 1]), du=4095, dv=0, bias_mant=0,
                            bias_exp=0, vth=2 ** 17 - 1)
    assert int(u[0]) == 2 ** 23 + 64 - 2 ** 24
    # v: clipped at -(2^23 - 1) (and +(2^23 - 1))
    u, v, s = lava_lif_step(np.array([-(2 ** 22)]), np.array([-(2 ** 23 - 1)]), np.array([-(2 ** 16)]), du=0,
                            dv=0, bias_mant=0, bias_exp=0, vth=1)
    assert int(v[0]) == -(2 ** 23 - 1) and not s[0]


def test_lava_dense_shifts_like_lava():
    w = np.array([[3, -5]], np.int64)
    s = np.array([[1, 1]], np.int64)
    assert lava_dense(w, s, 2).tolist() == [[-8]]      # (3 - 5) << 2
    assert lava_dense(w, s, -1).tolist() == [[-1]]     # -2 >> 1 (arithmetic)
    assert lava_dense(w, np.array([[1, 0]]), -1).tolist() == [[1]]  # 3 >> 1


@settings(max_examples=60, deadline=None)
@given(u=st.integers(-(2 ** 23) + 1, 2 ** 23 - 1), v=st.integers(-(2 ** 23) + 1, 2 ** 23 - 1),
       a=st.integers(-(2 ** 15), 2 ** 15 - 1), du=st.integers(0, 4095), dv=st.integers(0, 4095),
       vth=st.integers(0, 2 ** 17 - 1))
def test_lava_state_stays_in_24_bits(u, v, a, du, dv, vth):
    u2, v2, s = lava_lif_step(np.array([u]), np.array([v]), np.array([a]), du=du, dv=dv, bias_mant=0, bias_exp=0,
                              vth=vth)
    assert -(2 ** 23) < int(v2[0]) < 2 ** 23
    assert -(2 ** 23) <= int(u2[0]) <= 2 ** 23
    assert bool(s[0]) == (int(v2[0]) == 0 and s[0]) or not s[0]


def test_lava_emulator_follows_hand_trace_and_dense_delay():
    """One neuron, one input: the emulator's integers are Lava's, and the chip's first spike lands on the
    neuroinit step of the input that caused it (Dense's delay absorbed by the priming step)."""
    p = CellParams(w_in=torch.tensor([[1.5]], dtype=torch.float64), w_rec=torch.zeros(1, 1, dtype=torch.float64),
                   bias=torch.tensor([0.1], dtype=torch.float64), w_out=torch.ones(1, 1, dtype=torch.float64),
                   b_out=torch.zeros(1, dtype=torch.float64))
    cell = LIFRNN(p, reset="zero", profile="loihi-like", tau_m=20.0)
    dep = deploy(cell)
    assert dep.arithmetic == "lava"
    e = dep.grids["w_in"].exponent
    assert dep.unit == 2.0 ** (e - 1) and dep.threshold == round(1.0 / dep.unit)
    assert dep.decay == round(4096 * (1 - math.exp(-1 / 20)))
    x = torch.zeros(12, 1, 1, dtype=torch.float64)
    x[3] = 1.0
    x[4] = 0.5
    em = emulate(dep, x)
    assert em.chip_steps == 13
    # by hand with Lava's step: input enters the Dense at chip step c and the LIF at c + 1; bias from step 1
    k = np.rint(x.numpy() * 2 ** dep.input_frac_bits).astype(np.int64)
    u = v = np.zeros((1, 1), np.int64)
    buf = np.zeros((1, 1), np.int64)
    want_v, want_s = [], []
    for c in range(13):
        u, v, s = lava_lif_step(u, v, buf, du=4095, dv=dep.decay, bias_mant=dep.bias if c else 0, bias_exp=dep.bias_exp,
                                vth=dep.threshold, reset=False)
        if c:
            want_v.append(int(v[0, 0]))
            want_s.append(bool(s[0, 0]))
        v = np.where(s, 0, v)
        buf = lava_dense(dep.w_in, k[c], dep.exp_in) if c < 12 else np.zeros_like(buf)
    assert em.v[:, 0, 0].tolist() == want_v
    assert [bool(b) for b in em.spikes[:, 0, 0]] == want_s
    z, _, _ = run_cell(dep.cell, x)
    assert z[:, 0, 0].tolist() == em.spikes[:, 0, 0].tolist()   # first spike at step 3 in both
    assert int(z[:, 0, 0].argmax()) == 3


def test_loihi_emulation_is_close_to_float_and_reports_events():
    cell = _cell("loihi-like", gain=0.5, bias=0.02)
    x = _spikes(60, 3, 2)
    dep = deploy(cell)
    em = emulate(dep, x)
    z, _, _ = run_cell(dep.cell, x)
    assert z.sum() > 20
    assert spike_mismatches(z[:10], em.spikes[:10]) == 0   # truncation errors need steps to reach a threshold
    assert spike_mismatches(z, em.spikes) < 0.05 * z.numel()
    assert set(em.events) == {"v_saturated", "u_wrapped", "a_in_over_16bit"}


# ------------------------------------------------------------------------------------ other arithmetics

def test_arithmetic_per_profile():
    assert [arithmetic_of(p) for p in ("ideal", "loihi-like", "loihi2-like", "xylo-like", "reckon-like",
                                       "spinnaker2-like", "brainscales2-like")] == [
        "float", "lava", "lava", "fixed", "fixed", "float", "float"]


@pytest.mark.parametrize("profile", ["ideal", "spinnaker2-like"])
def test_float_profiles_emulate_the_float_network_exactly(profile):
    cell = _cell(profile, bias=0.05)
    x = _spikes(80, 3, 2)
    em = emulate(deploy(cell), x)
    z, y, v = run_cell(cell.double(), x)
    assert torch.equal(em.spikes, z) and torch.equal(em.outputs, y) and torch.equal(em.v, v)
    assert z.sum() > 0


def _generic(name: str):
    """The profile with an empty [neuron] section: the generic integer LIF (input into v, floor shift decay,
    v > theta, the trained reset on the next step, one spike, one clip per step)."""
    base = profile_to_dict(load_profile(name))
    base["neuron"] = {}
    return profile_from_dict(base, where=f"<generic {name}>")


def test_fixed_step_shift_decay_saturation_and_compare():
    xylo = deploy(_cell(_generic("xylo-like"), n=8, gain=0.5))
    assert xylo.decay_kind == "shift" and xylo.decay == round(math.log2(1 / (1 - math.exp(-1 / 20))))
    d = xylo.decay
    v = np.array([[1000, -1000, 3]], np.int64)
    z = np.zeros_like(v, bool)
    vb = xylo.bias
    drive = np.zeros((1, 3), np.int64)
    dep = dataclasses.replace(xylo, bias=np.zeros(3, np.int64))
    new, s = fixed_lif_step(v, z, drive, dep)
    assert new.tolist() == [[1000 - (1000 >> d), -1000 - (-1000 >> d), 3 - (3 >> d)]]
    # saturation at 16 bits, spike on v > theta; reset to zero acts on the next step
    big = np.array([[2 ** 15 - 10]], np.int64)
    dep1 = dataclasses.replace(xylo, bias=np.zeros(1, np.int64))
    new, s = fixed_lif_step(big, np.zeros_like(big, bool), np.array([[3000]]), dep1)  # 30711 + 3000 > 2^15 - 1
    assert new.tolist() == [[2 ** 15 - 1]] and s.all()
    new, _ = fixed_lif_step(new, s, np.array([[0]]), dep1)
    assert new.tolist() == [[0]]
    assert vb.shape == (8,)
    reckon = deploy(_cell("reckon-like", n=8, gain=0.5))
    assert reckon.spike_compare == ">=" and reckon.decay_kind == "linear"
    at = np.array([[reckon.threshold]], np.int64)
    dep2 = dataclasses.replace(reckon, bias=np.zeros(1, np.int64), decay=0)
    _, s = fixed_lif_step(at, np.zeros_like(at, bool), np.array([[0]]), dep2)
    assert s.all()   # ReckOn fires at v >= theta
    # Xylo's own rules (xylo-like's [neuron]): a small positive v still decays by 1, v >= theta fires
    # floor(v / theta) spikes at once and subtracts them
    xy = deploy(_cell("xylo-like", n=8, gain=0.5, reset="subtract"))
    xy1 = dataclasses.replace(xy, bias=np.zeros(1, np.int64))
    th = xy.threshold
    new, n = fixed_lif_step(np.array([[3]], np.int64), np.zeros((1, 1), bool), np.array([[0]]), xy1)
    assert new.tolist() == [[2]] and n.tolist() == [[0]]
    assert xy.syn_decay == 1   # the untrained cell has no current: the chip's fastest, I halves every step
    new, n = fixed_lif_step(np.array([[0]], np.int64), np.zeros((1, 1), bool), np.array([[6 * th]]), xy1)
    assert n.tolist() == [[3]] and new.tolist() == [[0]]


@pytest.mark.parametrize("profile", ["reckon-like", "xylo-like"])
def test_fixed_integer_inputs_are_exact_for_any_input_frac_bits(profile):
    """Spike counts (0/1 here) reach the chip exactly whatever the graded-input precision: the summed input is
    shifted, not each weight (a right-shifted int8 weight would vanish)."""
    cell = _cell(profile, n_in=2, n=16, gain=1.0, bias=0.02, reset="subtract")
    x = _spikes(60, 3, 2, rate=0.5)
    ref = emulate(deploy(cell, input_frac_bits=0), x)
    for f in (3, 8):
        em = emulate(deploy(cell, input_frac_bits=f), x)
        assert torch.equal(em.spikes, ref.spikes) and torch.equal(em.v, ref.v)
    assert ref.spikes.sum() > 20


def test_fixed_emulation_runs_and_wraps_when_asked():
    base = profile_to_dict(load_profile("xylo-like"))
    base["state"] = {"bits": 8, "overflow": "wrap"}
    base["limits"]["max_fan_in"] = 0
    prof = profile_from_dict(base, where="<test>")
    cell = _cell(prof, n=8, gain=0.5)
    em = emulate(deploy(cell), _spikes(40, 2, 2, rate=0.8))
    assert em.v.abs().max() <= 2 ** 7
    assert em.spikes.shape == (40, 2, 8)


# ------------------------------------------------------------------------------------ refusals

def test_deploy_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="fan-in"):
        deploy(_cell("ideal", n_in=2, n=64), "xylo-like")
    with pytest.raises(ValueError, match="hidden neurons"):
        deploy(_cell("ideal", n_in=2, n=300), "reckon-like")
    big = _cell("loihi-like", n=8)
    with torch.no_grad():
        big.w_rec.mul_(1e4)
    with pytest.raises(ValueError, match="saturate"):
        deploy(big)
    from neuroinit.cells import RateRNN
    g = torch.Generator().manual_seed(0)
    p, _ = hardware_init("rate", 2, 8, 2, 1.0, "ideal", generator=g)
    with pytest.raises(ValueError, match="rate"):
        deploy(RateRNN(p))


# ------------------------------------------------------------------------------------ task report

def test_compare_on_task_reports_float_and_chip_accuracy():
    task = make_task("romo", dt_tau=0.5, variant="test")
    cell = _cell("loihi-like", n_in=1, n=16, gain=1.0)
    rep = compare_on_task(cell, task, generator=torch.Generator().manual_seed(0), batch_size=30)
    for key in ("float_accuracy", "chip_accuracy", "float_loss", "chip_loss", "spike_mismatches"):
        assert key in rep
    assert 0.0 <= rep["float_accuracy"] <= 1.0 and 0.0 <= rep["chip_accuracy"] <= 1.0
    assert rep["accuracy_change"] == rep["chip_accuracy"] - rep["float_accuracy"]
    assert rep["arithmetic"] == "lava" and rep["steps"] == task.n_steps
    ideal = compare_on_task(_cell("ideal", n_in=1, n=16, gain=1.0), task, generator=torch.Generator(),
                            batch_size=30)
    assert ideal["spike_mismatches"] == 0 and ideal["accuracy_change"] == 0.0 and ideal["loss_change"] == 0.0
