"""Learning rules: the exact equalities of science.md §2.2, schedules, random feedback, chip precision, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuroinit.cells import LIFRNN, PARAM_NAMES, RateRNN
from neuroinit.init import float_init, hardware_init
from neuroinit.learning import (
    BPTT,
    AutogradEprop,
    OnlineEprop,
    attach_chip_constraints,
    learning_grids,
    make_rule,
)
from neuroinit.tasks.base import Batch, Task

F64 = torch.float64


class ToyTask(Task):
    """Random inputs, random targets, random mask: an adversarial little regression task."""

    name, n_in, n_out, loss_kind, dt_ms = "toy", 3, 2, "mse", 1.0

    def __init__(self, steps: int = 25, input_scale: float = 2.0) -> None:
        self.steps, self.input_scale = steps, input_scale

    def batch(self, batch_size, *, generator, dtype=F64, device="cpu"):
        t, g = self.steps, generator
        u = torch.rand(t, batch_size, self.n_in, generator=g, dtype=dtype) * self.input_scale
        y = 0.3 * torch.randn(t, batch_size, self.n_out, generator=g, dtype=dtype)
        m = (torch.rand(t, batch_size, generator=g, dtype=dtype) > 0.3).to(dtype)
        return Batch(u.to(device), y.to(device), m.to(device))

    def accuracy(self, y, batch):
        return 0.0


def _params(n=20, gain=1.5, seed=0):
    p = float_init(3, n, 2, gain, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return p._replace(bias=0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64))


def _cells():
    p = _params()
    yield "rate-voltage", RateRNN(p, alpha=0.3, form="voltage")
    yield "rate-rflo", RateRNN(p, alpha=0.3, form="rate")
    lif_p = p._replace(w_in=0.8 * p.w_in, w_rec=0.5 * p.w_rec)
    yield "lif", LIFRNN(lif_p, dt=1.0, tau_m=10.0, tau_out=5.0)
    yield "lif-zero-refractory", LIFRNN(lif_p, dt=1.0, tau_m=10.0, tau_out=5.0, reset="zero", n_refractory=2)


def _grads(cell, rule, batch, task):
    cell.zero_grad(set_to_none=True)
    trial = rule.backward(batch, task)
    return trial, {n: getattr(cell, n).grad.clone() for n in PARAM_NAMES}


def _max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in PARAM_NAMES)


def _assert_online_equals_autograd(cell, feedback):
    """Online e-prop's gradients equal autograd e-prop's to 1e-10 (float64) on a toy batch, and are not trivially
    zero; returns the batch and the reference gradients."""
    task = ToyTask()
    batch = task.batch(4, generator=torch.Generator().manual_seed(1))
    ref_trial, ref = _grads(cell, AutogradEprop(cell, feedback=feedback,
                                                generator=torch.Generator().manual_seed(7)), batch, task)
    trial, online = _grads(cell, OnlineEprop(cell, feedback=feedback,
                                             generator=torch.Generator().manual_seed(7)), batch, task)
    assert _max_diff(ref, online) < 1e-10
    assert float(ref_trial.loss) == float(trial.loss)
    assert all(float(ref[n].abs().max()) > 1e-4 for n in ("w_rec", "w_in", "w_out"))  # not trivially zero
    return batch, ref


@pytest.mark.parametrize("feedback", ["symmetric", "random"])
@pytest.mark.parametrize("name,cell", list(_cells()), ids=[n for n, _ in _cells()])
def test_online_eprop_equals_autograd_eprop(name, cell, feedback):
    batch, _ = _assert_online_equals_autograd(cell, feedback)
    assert float(cell.w_rec.grad.diagonal().abs().max()) == 0.0  # autapses stay removed
    if name.startswith("lif"):
        assert cell_spike_count(cell, batch) > 10, "the LIF network must spike for the equality to mean much"


def cell_spike_count(cell, batch) -> float:
    state, total = cell.init_state(batch.inputs.shape[1]), 0.0
    with torch.no_grad():
        for u in batch.inputs:
            _, state = cell.step(cell.params(), state, u)
            total += float(state.z.sum())
    return total


@pytest.mark.parametrize("form", ["voltage", "rate"])
def test_alpha_one_eprop_is_one_step_truncated_bptt(form):
    cell = RateRNN(_params(), alpha=1.0, form=form)
    task = ToyTask()
    batch = task.batch(3, generator=torch.Generator().manual_seed(2))
    _, eprop = _grads(cell, OnlineEprop(cell), batch, task)
    _, tbptt = _grads(cell, BPTT(cell, truncation=1), batch, task)
    _, full = _grads(cell, BPTT(cell), batch, task)
    assert _max_diff(eprop, tbptt) < 1e-12
    assert _max_diff(eprop, full) > 1e-4  # the truncation matters on this network


@pytest.mark.parametrize("form", ["voltage", "rate"])
def test_eprop_equals_bptt_without_recurrence(form):
    p = _params()
    cell = RateRNN(p._replace(w_rec=torch.zeros_like(p.w_rec)), alpha=0.3, form=form)
    task = ToyTask()
    batch = task.batch(3, generator=torch.Generator().manual_seed(3))
    _, eprop = _grads(cell, OnlineEprop(cell), batch, task)
    _, bptt = _grads(cell, BPTT(cell), batch, task)
    assert _max_diff(eprop, bptt) < 1e-12
    # and with recurrence they differ: e-prop is an approximation
    cell2 = RateRNN(p, alpha=0.3, form=form)
    _, eprop2 = _grads(cell2, OnlineEprop(cell2), batch, task)
    _, bptt2 = _grads(cell2, BPTT(cell2), batch, task)
    assert _max_diff(eprop2, bptt2) > 1e-5


@pytest.mark.parametrize("form", ["voltage", "rate"])
def test_bptt_matches_finite_differences(form):
    cell = RateRNN(_params(n=8), alpha=0.4, form=form)
    task = ToyTask(steps=12)
    batch = task.batch(2, generator=torch.Generator().manual_seed(4))
    _, grads = _grads(cell, BPTT(cell), batch, task)
    gen = torch.Generator().manual_seed(5)
    eps = 1e-6
    for name in PARAM_NAMES:
        param = getattr(cell, name)
        for _ in range(4):
            idx = tuple(int(torch.randint(s, (1,), generator=gen)) for s in param.shape)
            if name == "w_rec" and idx[0] == idx[1]:
                continue  # autapses are removed: no gradient by construction
            with torch.no_grad():
                old = param[idx].item()
                param[idx] = old + eps
                up = float(task.loss(cell(batch.inputs)[0], batch))
                param[idx] = old - eps
                down = float(task.loss(cell(batch.inputs)[0], batch))
                param[idx] = old
            fd = (up - down) / (2 * eps)
            assert abs(fd - float(grads[name][idx])) < 1e-8 * max(1.0, abs(fd)), (name, idx)


@pytest.mark.parametrize("model", ["rate", "lif"])
def test_per_step_application_with_small_lr_equals_per_trial(model):
    p = _params()
    cell = (RateRNN(p, alpha=0.3) if model == "rate"
            else LIFRNN(p._replace(w_in=0.8 * p.w_in, w_rec=0.5 * p.w_rec), dt=1.0, tau_m=10.0, tau_out=5.0))
    task = ToyTask()
    batch = task.batch(4, generator=torch.Generator().manual_seed(6))
    start = {n: getattr(cell, n).detach().clone() for n in PARAM_NAMES}
    _, per_trial = _grads(cell, OnlineEprop(cell), batch, task)
    lr = 1e-7
    opt = torch.optim.SGD(cell.parameters(), lr=lr)
    OnlineEprop(cell).backward(batch, task, optimizer=opt, apply_every=1)
    for n in PARAM_NAMES:
        applied = (start[n] - getattr(cell, n).detach()) / lr
        # O(lr) difference: later steps see slightly changed weights
        assert float((applied - per_trial[n]).abs().max()) < 1e-4 * max(1.0, float(per_trial[n].abs().max()))
    # every-K-steps (learning epochs) sits between the two and also agrees
    with torch.no_grad():
        for n in PARAM_NAMES:
            getattr(cell, n).copy_(start[n])
    opt = torch.optim.SGD(cell.parameters(), lr=lr)
    OnlineEprop(cell).backward(batch, task, optimizer=opt, apply_every=7)
    applied = (start["w_rec"] - cell.w_rec.detach()) / lr
    assert float((applied - per_trial["w_rec"]).abs().max()) < 1e-4 * max(1.0, float(per_trial["w_rec"].abs().max()))


def _train(cell, rule, task, iters, lr, seed=0):
    opt = torch.optim.Adam(cell.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(iters):
        batch = task.batch(8, generator=gen)
        opt.zero_grad()
        losses.append(float(rule.backward(batch, task).loss))
        opt.step()
    return losses


class SineTask(ToyTask):
    """A learnable toy: output a delayed, smoothed copy of the first input channel."""

    def batch(self, batch_size, *, generator, dtype=F64, device="cpu"):
        t = self.steps
        u = torch.rand(t, batch_size, self.n_in, generator=generator, dtype=dtype)
        y = torch.zeros(t, batch_size, self.n_out, dtype=dtype)
        y[2:, :, 0] = 0.5 * (u[1:-1, :, 0] + u[:-2, :, 0]) - 0.5
        y[2:, :, 1] = -y[2:, :, 0]
        return Batch(u, y, torch.ones(t, batch_size, dtype=dtype))


def test_random_feedback_differs_from_symmetric_and_still_learns():
    task = SineTask(steps=20)
    p = _params(n=24, gain=0.9)
    batch = task.batch(4, generator=torch.Generator().manual_seed(8))
    sym_cell, rnd_cell = RateRNN(p, alpha=0.5), RateRNN(p, alpha=0.5)
    _, sym = _grads(sym_cell, OnlineEprop(sym_cell), batch, task)
    _, rnd = _grads(rnd_cell, OnlineEprop(rnd_cell, feedback="random",
                                          generator=torch.Generator().manual_seed(9)), batch, task)
    assert float((sym["w_rec"] - rnd["w_rec"]).abs().max()) > 1e-5
    assert torch.equal(sym["w_out"], rnd["w_out"])  # the readout's own gradient is exact in both
    rule = OnlineEprop(rnd_cell, feedback="random", generator=torch.Generator().manual_seed(9))
    losses = _train(rnd_cell, rule, task, iters=60, lr=0.02)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_ideal_chip_path_equals_float_path_bit_for_bit():
    task = SineTask(steps=15)
    p, _ = hardware_init("lif", 3, 16, 2, 1.0, "ideal", generator=torch.Generator().manual_seed(0), dtype=F64)
    results = []
    for chip in (False, True):
        cell = LIFRNN(p, dt=1.0, tau_m=10.0, tau_out=5.0, profile="ideal")
        gen = torch.Generator().manual_seed(3)
        rule = make_rule("eprop", cell, generator=gen, chip_precision=chip)
        opt = torch.optim.Adam(cell.parameters(), lr=0.01)
        if chip:
            attach_chip_constraints(opt, cell, generator=gen)
        _train(cell, rule, task, iters=5, lr=0.01)
        results.append({n: getattr(cell, n).detach().clone() for n in PARAM_NAMES})
    assert all(torch.equal(results[0][n], results[1][n]) for n in PARAM_NAMES)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lr=st.floats(1e-4, 0.5), profile=st.sampled_from(
    ["reckon-like", "loihi-like", "spinnaker2-like"]))
def test_weights_stay_on_the_chip_grid_after_every_update(seed, lr, profile):
    gen = torch.Generator().manual_seed(seed)
    p, _ = hardware_init("lif", 3, 12, 2, 1.0, profile, generator=gen, dtype=F64)
    cell = LIFRNN(p, dt=1.0, tau_m=10.0, tau_out=5.0, profile=profile)
    grids = learning_grids(cell)
    opt = torch.optim.SGD(cell.parameters(), lr=lr)
    attach_chip_constraints(opt, cell, generator=gen)
    rule = make_rule("eprop", cell, generator=gen)
    task = ToyTask(steps=8)
    for _ in range(3):
        opt.zero_grad()
        rule.backward(task.batch(2, generator=gen), task)
        opt.step()
        for name, grid in grids.items():
            codes = getattr(cell, name).detach() / grid.scale
            # pow2 scales divide exactly; free scales (SpiNNaker 2) up to float64 rounding
            assert float((codes - torch.round(codes)).abs().max()) < 1e-9, name
            assert float(codes.min()) >= grid.code_min - 1e-9 and float(codes.max()) <= grid.code_max + 1e-9


def test_stochastic_weight_updates_are_unbiased():
    # many tiny SGD steps of a constant gradient: the expected drift on the grid equals the float drift
    p, _ = hardware_init("rate", 3, 8, 2, 1.0, "reckon-like", generator=torch.Generator().manual_seed(0),
                         dtype=F64)
    cell = RateRNN(p, profile="reckon-like")
    grid = learning_grids(cell)["w_rec"]
    start = cell.w_rec.detach().clone()
    opt = torch.optim.SGD(cell.parameters(), lr=1.0)
    attach_chip_constraints(opt, cell, generator=torch.Generator().manual_seed(1))
    steps, delta = 400, 0.1 * grid.scale  # each update is a tenth of a grid step
    for _ in range(steps):
        opt.zero_grad()
        for name in PARAM_NAMES:
            getattr(cell, name).grad = torch.zeros_like(getattr(cell, name))
        cell.w_rec.grad = -delta * torch.ones_like(cell.w_rec)
        opt.step()
    moved = (cell.w_rec.detach() - start)[~torch.eye(8, dtype=torch.bool)]
    # saturation aside, the mean drift is steps * delta within a few standard errors
    free = (start[~torch.eye(8, dtype=torch.bool)] + steps * delta) < grid.value_max
    expected = steps * delta
    sd = grid.scale * (steps * 0.09) ** 0.5
    assert abs(float(moved[free].mean()) - expected) < 4 * sd / float(free.sum()) ** 0.5 + 1e-12


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from neuroinit.cells import LIFRNN
    from neuroinit.init import float_init
    from neuroinit.learning import OnlineEprop, AutogradEprop
    from neuroinit.tasks.base import Batch, Task
    torch.set_num_threads(1)
    rule_name, steps = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():  # resident bytes now
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    class T(Task):
        name, n_in, n_out, loss_kind, dt_ms = "t", 4, 2, "mse", 1.0
        def batch(self, b, *, generator, dtype=torch.float32, device="cpu"): raise NotImplementedError
        def accuracy(self, y, b): return 0.0
        def output_error(self, y_t, batch, t):
            global peak
            peak = max(peak, rss())
            return super().output_error(y_t, batch, t)
    p = float_init(4, 128, 2, 1.0, generator=torch.Generator().manual_seed(0))
    cell = LIFRNN(p, dt=1.0, tau_m=20.0, tau_out=20.0)
    rule = OnlineEprop(cell) if rule_name == "online" else AutogradEprop(cell)
    out = {}
    for t in [20] + steps:  # the first, short run warms the allocator up
        g = torch.Generator().manual_seed(t)
        batch = Batch(torch.rand(t, 8, 4, generator=g), torch.zeros(t, 8, 2), torch.ones(t, 8))
        before = peak = rss()
        rule.backward(batch, T())
        out[t] = max(peak, rss()) - before
    print(json.dumps(out))
""")


def _run_memory(rule: str) -> dict:
    # big blocks are mmapped and returned on free, so resident memory tracks live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, rule, "100,1000"], capture_output=True,
                         text=True, check=True, timeout=300, env=env)
    return json.loads(res.stdout)


class _NoTargetTask(Task):
    name, n_in, n_out, loss_kind, dt_ms = "t", 4, 2, "mse", 1.0

    def batch(self, b, *, generator, dtype=torch.float32, device="cpu"):
        raise NotImplementedError

    def accuracy(self, y, b):
        return 0.0


def _saved_bytes(rule, t_len: int) -> int:
    """Bytes autograd keeps for a backward pass during one trial of length ``t_len`` (counted where tensors are
    saved, not read from the machine: the same on every host and allocator)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    g = torch.Generator().manual_seed(t_len)
    batch = Batch(torch.rand(t_len, 8, 4, generator=g), torch.zeros(t_len, 8, 2), torch.ones(t_len, 8))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rule.backward(batch, _NoTargetTask())
    return total


@pytest.mark.parametrize("fast", [False, "auto"])
def test_online_rule_keeps_nothing_that_grows_with_sequence_length(fast):
    """Machine-independent form of the memory check below: an online trial saves no tensors for a backward
    pass through time (so its memory cannot grow with T); autograd e-prop, which keeps the graph, saves bytes
    in proportion to T."""
    p = float_init(4, 32, 2, 1.0, generator=torch.Generator().manual_seed(0))
    cell = LIFRNN(p, dt=1.0, tau_m=20.0, tau_out=20.0)
    online = OnlineEprop(cell, fast=fast)
    assert _saved_bytes(online, 100) == _saved_bytes(online, 400) == 0
    ref = AutogradEprop(cell)
    short, long = _saved_bytes(ref, 100), _saved_bytes(ref, 400)
    assert short > 0 and long > 3.5 * short


@pytest.mark.bench
def test_online_memory_does_not_grow_with_sequence_length():
    """Peak resident memory of a whole online trial (traces: 8 x 128 x 128 floats, 0.5 MB each) is the
    same for T = 100 and T = 1000; autograd e-prop, which keeps the graph, grows in the same harness."""
    online = _run_memory("online")
    assert online["1000"] <= 1.1 * online["100"] + (1 << 20), online
    ref = _run_memory("autograd")
    assert ref["1000"] > 5 * ref["100"] and ref["1000"] > online["1000"] + (20 << 20), ref


@pytest.mark.parametrize("feedback", ["symmetric", "random"])
@pytest.mark.parametrize("reset,max_spikes", [("subtract", 1), ("zero", 1), ("subtract", 31), ("zero", 31)])
def test_online_eprop_equals_autograd_eprop_with_xylo_neuron_options(feedback, reset, max_spikes):
    """The chip neuron options (Xylo's synaptic current, v >= v_th, spike counts up to 31 per step, a
    subtracted threshold that leaks): online e-prop, whose presynaptic traces filter the synaptically filtered
    spike counts, equals autograd e-prop."""
    p = _params()
    lif_p = p._replace(w_in=1.6 * p.w_in, w_rec=1.0 * p.w_rec)
    cell = LIFRNN(lif_p, dt=1.0, tau_m=10.0, tau_out=5.0, reset=reset, tau_syn=3.0, threshold_compare=">=",
                  max_spikes=max_spikes, reset_leaks=reset == "subtract")
    batch, ref = _assert_online_equals_autograd(cell, feedback)
    assert cell_spike_count(cell, batch) > 10
    if max_spikes > 1:   # several spikes in one step must occur in this very batch for the test to mean much
        state, top = cell.init_state(batch.inputs.shape[1]), 0.0
        with torch.no_grad():
            for u in batch.inputs:
                _, state = cell.step(cell.params(), state, u)
                top = max(top, float(state.z.max()))
        assert top > 1
    # the option changes the network: the plain LIF on the same weights computes something else
    plain = LIFRNN(lif_p, dt=1.0, tau_m=10.0, tau_out=5.0, reset=reset)
    _, plain_grads = _grads(plain, AutogradEprop(plain, feedback=feedback,
                                                 generator=torch.Generator().manual_seed(7)), batch, ToyTask())
    assert _max_diff(ref, plain_grads) > 1e-6


@pytest.mark.parametrize("reset,max_spikes", [("subtract", 1), ("zero", 31)])
def test_fast_trials_with_xylo_neuron_options_run_the_recorded_path(monkeypatch, reset, max_spikes):
    """The fused kernel does not run a chip's neuron options, so whole trials take OnlineEprop's recorded path
    (per-step records, one GEMM per chunk; chunks of 7 steps over the toy task's carry the traces across chunk
    boundaries): the step-by-step path's gradient to float64 rounding; learning epochs run step by step."""
    from neuroinit.learning import fused, online

    monkeypatch.setattr(online, "record_steps", lambda cell: 7)
    p = _params()
    cell = LIFRNN(p._replace(w_in=1.6 * p.w_in), dt=1.0, tau_m=10.0, tau_out=5.0, reset=reset, tau_syn=3.0,
                  threshold_compare=">=", max_spikes=max_spikes, reset_leaks=reset == "subtract")
    assert not fused.kernel_runs(cell) and fused.kernel_runs(LIFRNN(p, dt=1.0))
    task = ToyTask()
    batch = task.batch(4, generator=torch.Generator().manual_seed(1))
    assert batch.inputs.shape[0] > 14 and cell_spike_count(cell, batch) > 10
    rule = OnlineEprop(cell, fast=True)
    _, got = _grads(cell, rule, batch, task)
    assert rule.step_path == "recorded" and "recorded" in rule.fast_path_reason
    _, want = _grads(cell, OnlineEprop(cell), batch, task)
    for n in PARAM_NAMES:
        assert float((got[n] - want[n]).abs().max()) <= 1e-12 * float(want[n].abs().max()), n
    rule.backward(batch, task, optimizer=torch.optim.SGD(cell.parameters(), lr=0.0), apply_every=5)
    assert rule.step_path == "torch"
