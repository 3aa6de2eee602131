"""Adaptive LIF (neuroinit.cells.alif): online e-prop == autograd e-prop, beta = 0 is LIF, fallbacks, analysis."""

from __future__ import annotations

import pytest
import torch

from neuroinit.cells import LIFRNN, PARAM_NAMES, cell_class, make_cell
from neuroinit.cells.alif import ALIFRNN
from neuroinit.dynamics.lyapunov import lyapunov_spectrum
from neuroinit.init import float_init
from neuroinit.learning import AutogradEprop, OnlineEprop
from neuroinit.learning.chip import make_trace_quantiser
from neuroinit.tasks.base import Batch, Task

F64 = torch.float64


class ToyTask(Task):
    """Random inputs, targets and mask: an adversarial little regression task."""

    name, n_in, n_out, loss_kind, dt_ms = "toy", 3, 2, "mse", 1.0

    def __init__(self, steps: int = 30) -> None:
        self.steps = steps

    def batch(self, batch_size, *, generator, dtype=F64, device="cpu"):
        t, g = self.steps, generator
        u = 2.0 * torch.rand(t, batch_size, self.n_in, generator=g, dtype=dtype)
        y = 0.3 * torch.randn(t, batch_size, self.n_out, generator=g, dtype=dtype)
        m = (torch.rand(t, batch_size, generator=g, dtype=dtype) > 0.3).to(dtype)
        return Batch(u.to(device), y.to(device), m.to(device))

    def accuracy(self, y, batch):
        return 0.0


def _params(n=20, seed=0, dtype=F64):
    p = float_init(3, n, 2, 1.5, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    bias = 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    return p._replace(w_in=0.8 * p.w_in, w_rec=0.5 * p.w_rec, bias=bias)


def _alif(dtype=F64, **kw):
    return ALIFRNN(_params(dtype=dtype), **{"dt": 1.0, "tau_m": 10.0, "tau_out": 5.0, "tau_a": 30.0, "beta": 0.3,
                                            **kw})


def _grads(cell, rule, batch, task):
    cell.zero_grad(set_to_none=True)
    trial = rule.backward(batch, task)
    return trial, {n: getattr(cell, n).grad.clone() for n in PARAM_NAMES}


def _max_diffs(a, b):
    return {n: float((a[n] - b[n]).abs().max()) for n in PARAM_NAMES}


def _spikes(cell, inputs):
    with torch.no_grad():
        state, total = cell.init_state(inputs.shape[1]), 0.0
        for u in inputs:
            state = cell.step(cell.params(), state, u)[1]
            total += float(state.z.sum())
    return total


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("feedback", ["symmetric", "random"])
def test_online_eprop_equals_autograd_eprop(feedback, reset):
    cell, task = _alif(reset=reset), ToyTask()
    batch = task.batch(4, generator=torch.Generator().manual_seed(1))
    ref_trial, ref = _grads(cell, AutogradEprop(cell, feedback=feedback,
                                                generator=torch.Generator().manual_seed(7)), batch, task)
    trial, online = _grads(cell, OnlineEprop(cell, feedback=feedback,
                                             generator=torch.Generator().manual_seed(7)), batch, task)
    diffs = _max_diffs(ref, online)
    assert max(diffs.values()) < 1e-10, diffs
    assert float(ref_trial.loss) == float(trial.loss)
    assert all(float(ref[n].abs().max()) > 1e-4 for n in ("w_rec", "w_in", "bias", "w_out"))
    assert _spikes(cell, batch.inputs) > 20, "the network must spike for the equality to mean much"
    # the adaptation component matters: dropping it (LIF's traces on the same cell) changes the gradient
    adapted = float((ref["w_rec"] - _lif_like_grads(cell, batch, task)["w_rec"]).abs().max())
    assert adapted > 1e-6


def _lif_like_grads(cell, batch, task):
    """The same run with the second eligibility component zeroed (what LIF's one-component rule would give)."""
    rule = OnlineEprop(cell)
    original = cell.local_factors
    cell.local_factors = lambda *a: original(*a)._replace(hidden_post=(0.0 * original(*a).hidden_post[0],))
    try:
        return _grads(cell, rule, batch, task)[1]
    finally:
        del cell.local_factors


def test_online_eprop_equals_bptt_direction_check_is_not_trivial():
    """e-prop is an approximation: with recurrence it differs from BPTT (else the equality above says nothing
    about the eligibility traces beyond BPTT)."""
    from neuroinit.learning import BPTT

    cell, task = _alif(), ToyTask()
    batch = task.batch(4, generator=torch.Generator().manual_seed(1))
    _, bptt = _grads(cell, BPTT(cell), batch, task)
    _, online = _grads(cell, OnlineEprop(cell), batch, task)
    assert float((bptt["w_rec"] - online["w_rec"]).abs().max()) > 1e-6


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_beta_zero_is_lif_exactly(reset):
    p, task = _params(), ToyTask()
    batch = task.batch(3, generator=torch.Generator().manual_seed(2))
    alif = ALIFRNN(p, dt=1.0, tau_m=10.0, tau_out=5.0, tau_a=30.0, beta=0.0, reset=reset)
    lif = LIFRNN(p, dt=1.0, tau_m=10.0, tau_out=5.0, reset=reset)
    ya, _ = alif(batch.inputs)
    yl, _ = lif(batch.inputs)
    assert torch.equal(ya, yl)
    for rule in (OnlineEprop, AutogradEprop):
        _, ga = _grads(alif, rule(alif), batch, task)
        _, gl = _grads(lif, rule(lif), batch, task)
        assert max(_max_diffs(ga, gl).values()) < 1e-12


def test_registry_and_contract():
    assert cell_class("alif") is ALIFRNN
    assert ALIFRNN.spiking and ALIFRNN.kernel_id is None and ALIFRNN.export_mapping is None
    assert ALIFRNN.eligibility_components == 2 and ALIFRNN.state_type.__name__ == "ALIFState"
    assert ALIFRNN.config_section()["tau_a"] == 200.0
    cell = _alif()
    again = make_cell("alif", cell.float_params(), **cell.config())
    assert again.config() == cell.config()


@pytest.mark.parametrize("bad,match", [({"tau_a": 0.0}, "Invalid tau_a"), ({"beta": -1.0}, "Invalid beta"),
                                       ({"reset": "hold"}, "Invalid reset 'hold' for model 'alif'"),
                                       ({"n_refractory": 2}, "Invalid n_refractory 2 for model 'alif'")])
def test_bad_options_are_one_line_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        _alif(**bad)


@pytest.mark.parametrize("fast", [True, "auto"])
@pytest.mark.parametrize("reset,kind,feedback", [("subtract", "mse", "symmetric"), ("zero", "ce", "random"),
                                                 ("subtract", "ce", "random")])
def test_fast_trials_run_the_recorded_path_with_the_step_by_step_gradient(monkeypatch, fast, reset, kind, feedback):
    # no fused kernel for ALIF: whole trials take OnlineEprop's recorded path (per-step records, one GEMM per
    # chunk); chunks of 7 steps over 30 carry both full traces (ebar, eps) across four chunk boundaries
    from _synthetic import random_trials

    from neuroinit.init import hardware_init
    from neuroinit.learning import fused, online

    monkeypatch.setattr(online, "record_steps", lambda cell: 7)
    g = torch.Generator().manual_seed(0)
    p, _ = hardware_init("alif", 3, 20, 2, 1.3, "ideal", generator=g, out_of_range="clamp", dtype=F64)
    cell = make_cell("alif", p, v_th=0.5, tau_out=5.0, reset=reset)
    batch, task = random_trials(30, 4, kind, g, dtype=F64, drive=3.0)
    assert _spikes(cell, batch.inputs) > 0
    rule = OnlineEprop(cell, fast=fast, feedback=feedback, generator=torch.Generator().manual_seed(1))
    trial, got = _grads(cell, rule, batch, task)
    assert not rule.uses_fast_path and rule.step_path == "recorded" and "ALIFRNN" in fused.supports(cell)
    assert "recorded" in rule.fast_path_reason
    slow_rule = OnlineEprop(cell, feedback="symmetric" if rule.feedback is None else rule.feedback)
    slow_trial, want = _grads(cell, slow_rule, batch, task)
    assert slow_rule.step_path == "torch" and torch.equal(trial.outputs, slow_trial.outputs)
    for n in PARAM_NAMES:
        assert float((got[n] - want[n]).abs().max()) <= 1e-12 * float(want[n].abs().max()), n
    # learning epochs and chip-precision traces run step by step
    rule.backward(batch, task, optimizer=torch.optim.SGD(cell.parameters(), lr=0.0), apply_every=10)
    assert rule.step_path == "torch"


def test_recorded_chunks_bound_memory_by_the_traces(monkeypatch):
    # records of a chunk stay within twice the full traces they stand for (at least 32 steps)
    from neuroinit.learning import online
    from neuroinit.learning.online import record_steps

    for n in (16, 64, 256):
        cell = ALIFRNN(float_init(3, n, 2, 1.0, generator=torch.Generator().manual_seed(0), dtype=F64), dt=1.0)
        k = record_steps(cell)
        assert k >= 32 and (k == 32 or k * (8 * n + 4) <= 2 * 2 * n * (n + 4))
    # and a trial never holds more steps of records than that: 30 steps in chunks of 7 stack 7, 7, 7, 7, 2 steps
    stacked = []
    real = online._stacked
    monkeypatch.setattr(online, "_stacked", lambda values, shape, like: stacked.append(len(values))
                        or real(values, shape, like))
    monkeypatch.setattr(online, "record_steps", lambda cell: 7)
    cell, task = _alif(), ToyTask()
    rule = OnlineEprop(cell, fast=True)
    rule.backward(task.batch(2, generator=torch.Generator().manual_seed(3)), task)
    assert rule.step_path == "recorded" and sorted(set(stacked)) == [2, 7] and stacked.count(2) == stacked.count(7) / 4


def test_chip_precision_traces_cover_the_adaptation_component():
    cell = ALIFRNN(_params(dtype=torch.float32), dt=1.0, tau_m=10.0, tau_out=5.0, profile="loihi-like")
    quantise = make_trace_quantiser(cell, generator=torch.Generator().manual_seed(0))
    assert quantise is not None and {"hidden_rec1", "hidden_in1", "hidden_bias1"} <= set(quantise.grids)
    task = ToyTask()
    batch = task.batch(2, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    rule = OnlineEprop(cell, trace_quantiser=quantise)
    trial, grads = _grads(cell, rule, batch, task)
    assert torch.isfinite(trial.loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_lyapunov_spectrum_runs_and_jacobian_is_2n():
    cell = _alif()
    res = lyapunov_spectrum(cell, k=4, steps=60, batch=2, warmup=10, generator=torch.Generator().manual_seed(0))
    assert res.per_step.shape == (2, 4) and bool(torch.isfinite(res.per_step).all())
    state = cell.init_state(2)
    assert cell.jacobian(cell.params(), state, torch.zeros(2, 3, dtype=F64)).shape == (2, 40, 40)
    # the adaptation's own decay rho is an exponent of the non-spiking network (psi = 0 far below threshold)
    quiet = ALIFRNN(_params()._replace(bias=-5.0 * torch.ones(20, dtype=F64)), dt=1.0, tau_m=10.0,
                    tau_out=5.0, tau_a=30.0, beta=0.3)
    res = lyapunov_spectrum(quiet, k=1, steps=100, batch=1, warmup=300, generator=torch.Generator().manual_seed(0))
    assert abs(float(res.mean[0]) - (-1.0 / 30.0)) < 1e-9   # log rho = -dt / tau_a, above log alpha = -dt / tau_m


@pytest.fixture(scope="module")
def alif_run(tmp_path_factory):
    from neuroinit.experiments.train import TrainConfig, train

    out = tmp_path_factory.mktemp("alif") / "alif.h5"
    train(TrainConfig(model="alif", hidden=8, batch=4, iters=2, eval_batch=8, lyapunov=False), out)
    return out


@pytest.mark.parametrize("fmt", ["nir", "netx", "xylo"])
def test_export_refuses_alif_in_one_line(alif_run, tmp_path, fmt):
    from click.testing import CliRunner

    from neuroinit.cli import main

    profile = {"nir": "ideal", "netx": "loihi-like", "xylo": "xylo-like"}[fmt]
    r = CliRunner().invoke(main, ["export", str(alif_run), "--format", fmt, "--profile", profile,
                                  "--out", str(tmp_path / f"x.{fmt}")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Invalid model 'alif' for chip emulation and export" in lines[0], r.output
    assert "allowed lif" in lines[0] and "--format h5" in lines[0]


def test_export_h5_takes_alif_weights(alif_run, tmp_path):
    from click.testing import CliRunner

    from neuroinit.cli import main

    r = CliRunner().invoke(main, ["export", str(alif_run), "--format", "h5", "--out", str(tmp_path / "w.h5")])
    assert r.exit_code == 0, r.output


def test_norse_lsnn_equals_alif_without_recurrence():
    """The bench's norse peer (norse's LSNNRecurrent, current-based Euler) is neuroinit's ALIF with reset to zero
    under the mapping of :class:`neuroinit.bench.peers.NorseLSNNNet`: same spikes, same outputs, checked without
    recurrence (norse's recurrent spikes arrive one step later) and with strong adaptation."""
    from neuroinit.bench.peers import NorseLSNNNet

    p = _params(n=16)
    p = p._replace(w_rec=torch.zeros_like(p.w_rec), bias=torch.zeros_like(p.bias), w_in=3.0 * p.w_in)
    cell = ALIFRNN(p, dt=1.0, tau_m=10.0, tau_out=5.0, tau_a=20.0, beta=0.8, reset="zero")
    # norse's Euler factors are 1 - dt / tau: choose neuroinit's exp(-dt / tau) equal (tau = -dt / log(1 - dt/tau'))
    net = NorseLSNNNet(cell.params(), alpha=float(cell.alpha), rho=float(cell.rho), kappa=float(cell.kappa),
                       v_th=float(cell.v_th), beta=float(cell.beta), gamma=float(cell.gamma))
    inputs = 2.0 * torch.rand(60, 4, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    with torch.no_grad():
        state, zs = cell.init_state(4), []
        for u in inputs:
            state = cell.step(cell.params(), state, u)[1]
            zs.append(state.z)
        ours = torch.stack(zs)
        theirs = net.spikes(inputs)
        assert float(ours.sum()) > 100 and float(state.a.max()) > 1.0   # it spikes and adapts
        assert torch.equal(ours, theirs)
        assert float((cell(inputs)[0] - net(inputs)).abs().max()) < 1e-12


def test_bench_times_alif_next_to_norse():
    from neuroinit.bench.peers import (
        SyntheticTask,
        check_gradients,
        make_batch,
        make_bench_cell,
        method_applies,
        trial_fn,
    )

    assert method_applies("norse-bptt", "alif") and not method_applies("snntorch-bptt", "alif")
    assert not method_applies("neuroinit-bptt", "alif")   # no kernel
    assert method_applies("neuroinit-fused", "alif")      # its fast path: the recorded one
    cell = make_bench_cell("alif", 16, "ideal", seed=0)
    assert cell.model == "alif" and cell.reset == "zero"
    batch = make_batch("alif", 10, 2, generator=torch.Generator().manual_seed(0))
    run = trial_fn("norse-bptt", cell, batch, SyntheticTask(batch.inputs.shape[-1], batch.targets.shape[-1]))
    run()
    assert all(torch.isfinite(g).all() for g in run.net.grads().values())
    checks = check_gradients(("alif",), ("neuroinit-torch", "autograd-eprop"))
    assert checks and all(c["ok"] for c in checks)


def test_bench_times_alifs_recorded_path():
    # the fast row names the path that ran, under ideal only (chip-precision traces have no recorded path), and
    # its gradient is checked against the plain step first. (The bench offers neuroinit-fused only where the
    # fused library is there.)
    from neuroinit import bench
    from neuroinit.bench.peers import check_gradients
    from neuroinit.learning import fused

    if not fused.available():
        pytest.skip(f"fused step unavailable: {fused.unavailable_reason()}")
    checks = check_gradients(("alif",), ("neuroinit-fused", "neuroinit-torch"))
    assert checks and all(c["ok"] for c in checks) and any(c["method"] == "neuroinit-fused" for c in checks)
    cfg = bench.BenchConfig(models="alif", hidden=(8,), batch=(2,), steps=5, repeats=1, profile="loihi-like",
                            methods=("neuroinit-fused",), memory_scaling=False)
    rows = bench.run_bench(cfg)["results"]
    assert [(r["method"], r["profile"]) for r in rows] == [("neuroinit-recorded", "ideal")]


@pytest.mark.parametrize("mode", ["local", "full"])
def test_flossing_updates_alif_weights(mode):
    from neuroinit.dynamics.flossing import floss

    cell = _alif()
    before = cell.w_rec.detach().clone()
    res = floss(cell, iters=2, k=2, mode=mode, steps=20, warmup=5, lr=1e-2,
                generator=torch.Generator().manual_seed(0))
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    assert float((cell.w_rec.detach() - before).abs().max()) > 0
    assert float(cell.w_rec.detach().diagonal().abs().max()) == 0.0
