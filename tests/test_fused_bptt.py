"""Fused BPTT (neuroinit.learning.fused_bptt) equals autograd BPTT, and falls back to it where it does not apply."""

from __future__ import annotations

import pytest
import torch
from _synthetic import random_trials

from neuroinit.cells import PARAM_NAMES, make_cell
from neuroinit.cells.base import CellParams
from neuroinit.init import hardware_init
from neuroinit.learning import BPTT, fused_bptt, fused_bptt_native

CELLS = {  # name: (model, cell options)
    "voltage-tanh": ("rate", {"form": "voltage"}),
    "voltage-softplus": ("rate", {"form": "voltage", "activation": "softplus"}),
    "rate-tanh": ("rate", {"form": "rate"}),
    "rate-relu": ("rate", {"form": "rate", "activation": "relu"}),
    "lif-subtract": ("lif", {"reset": "subtract"}),
    "lif-zero": ("lif", {"reset": "zero"}),
    "lif-zero-refractory": ("lif", {"reset": "zero", "n_refractory": 2}),
    "lif-subtract-refractory": ("lif", {"reset": "subtract", "n_refractory": 3}),
}


def _setup(name: str, *, kind: str = "mse", n: int = 20, b: int = 3, t_len: int = 25, dtype=torch.float32,
           profile: str = "ideal", seed: int = 0, **extra):
    model, kw = CELLS[name]
    g = torch.Generator().manual_seed(seed)
    p, _ = hardware_init(model, 3, n, 2, 1.3, profile, generator=g, out_of_range="clamp", dtype=dtype)
    p = p._replace(bias=0.2 * torch.randn(n, generator=g, dtype=dtype))
    kw = {"alpha": 0.3, **kw} if model == "rate" else {"v_th": 0.5, "tau_out": 5.0, **kw}
    cell = make_cell(model, p, profile=profile, **kw, **extra)
    batch, task = random_trials(t_len, b, kind, g, dtype=dtype, drive=3.0 if model == "lif" else 1.0)
    return cell, batch, task


def _run(cell, rule, batch, task):
    for n in PARAM_NAMES:
        getattr(cell, n).grad = None
    trial = rule.backward(batch, task)
    return trial, {n: getattr(cell, n).grad.clone() for n in PARAM_NAMES}


def _assert_close(a: dict, b: dict, rtol: float) -> None:
    for n in PARAM_NAMES:
        scale = float(b[n].abs().max())
        assert float((a[n] - b[n]).abs().max()) <= rtol * max(scale, 1e-30), n


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("t_len,b", [(1, 1), (7, 3), (50, 1), (50, 4)])
def test_fused_bptt_equals_autograd_bptt(name, t_len, b):
    cell, batch, task = _setup(name, t_len=t_len, b=b, kind="ce" if t_len == 7 else "mse")
    ref_trial, ref = _run(cell, BPTT(cell), batch, task)
    rule = BPTT(cell, fast=True)
    trial, got = _run(cell, rule, batch, task)
    assert rule.uses_fast_path and rule.fast_path_reason is None
    assert float((trial.outputs - ref_trial.outputs).abs().max()) <= 1e-5 * float(ref_trial.outputs.abs().max())
    assert abs(float(trial.loss) - float(ref_trial.loss)) <= 1e-5 * abs(float(ref_trial.loss))
    _assert_close(got, ref, rtol=1e-4)
    if t_len > 1:  # the comparison is not between two zeros
        assert all(float(ref[n].abs().max()) > 0 for n in PARAM_NAMES)
    if t_len == 50 and CELLS[name][0] == "lif":  # spikes happened and the recurrent path carried gradient
        assert float(trial.outputs.abs().max()) > 0 and float(ref["w_rec"].abs().max()) > 1e-4


@pytest.mark.parametrize("name", list(CELLS))
def test_the_equations_are_the_chain_rule_exactly_in_float64(name):
    """The records and recursions in float64 give autograd's gradients to 1e-10: the equations, not just
    float32 closeness."""
    cell, batch, task = _setup(name, t_len=30, b=2, dtype=torch.float64)
    _, ref = _run(cell, BPTT(cell), batch, task)
    params = CellParams(*(t.detach() for t in cell.params()))
    outputs, rec = fused_bptt.forward_records(cell, params, batch.inputs)
    y = outputs.clone().requires_grad_(True)
    (out_grad,) = torch.autograd.grad(task.loss(y, batch), y)
    got = fused_bptt.backward_records(cell, params, batch.inputs, rec, out_grad)
    got["w_rec"].diagonal().zero_()  # removed autapses (accumulate_grads does this for the rule)
    _assert_close(got, ref, rtol=1e-10)


def test_quantised_profile_straight_through_and_repeated_trials_of_other_lengths():
    """A chip profile's fake-quantised weights (straight-through gradients), gradients accumulated over trials
    of different lengths (the records' buffers are reused), as autograd does."""
    cell, batch, task = _setup("lif-subtract", profile="loihi-like", t_len=40, b=3)
    _, short, _ = _setup("lif-subtract", profile="loihi-like", t_len=9, b=3, seed=1)
    expected = {}
    for rule in (BPTT(cell), BPTT(cell, fast=True)):
        for n in PARAM_NAMES:
            getattr(cell, n).grad = None
        rule.backward(batch, task)
        rule.backward(short, task)
        rule.backward(batch, task)
        expected[rule.fast] = {n: getattr(cell, n).grad.clone() for n in PARAM_NAMES}
    _assert_close(expected[True], expected[False], rtol=1e-4)


@pytest.mark.parametrize("case,reason", [
    ("float64", "float32"),
    ("truncation", "truncation 5"),
    ("synaptic current", "chip neuron options"),
    ("threshold >=", "chip neuron options"),
    ("not fast", "fast=False"),
])
def test_falls_back_to_autograd_with_the_reason(case, reason):
    name = "voltage-tanh" if case in ("float64", "truncation", "not fast") else "lif-subtract"
    extra = {"synaptic current": {"tau_syn": 2.0}, "threshold >=": {"threshold_compare": ">="}}.get(case, {})
    cell, batch, task = _setup(name, t_len=12, dtype=torch.float64 if case == "float64" else torch.float32,
                               **extra)
    kw = {"truncation": 5} if case == "truncation" else {}
    _, ref = _run(cell, BPTT(cell, **kw), batch, task)
    rule = BPTT(cell, fast=case != "not fast", **kw)
    _, got = _run(cell, rule, batch, task)
    assert not rule.uses_fast_path and reason in rule.fast_path_reason
    _assert_close(got, ref, rtol=0.0)  # the same autograd computation


def test_supports_names_the_reason_and_fast_is_validated():
    cell, _, _ = _setup("lif-subtract", t_len=2)
    assert fused_bptt.supports(cell) is None
    assert "truncation" in fused_bptt.supports(cell, truncation=1)
    with pytest.raises(ValueError, match="Invalid fast"):
        BPTT(cell, fast="yes")


@pytest.mark.parametrize("fast,path", [(True, "fused-bptt"), (False, "torch")])
def test_train_uses_the_fused_bptt_and_records_it(tmp_path, fast, path):
    from neuroinit.experiments.train import TrainConfig, train
    from neuroinit.io.runfile import read_run

    cfg = TrainConfig(rule="bptt", hidden=16, batch=8, eval_batch=8, lyapunov=False, iters=3, seed=1, fast=fast)
    train(cfg, tmp_path / "run.h5")
    assert read_run(tmp_path / "run.h5").summary["step_path"] == path


_native_missing = not fused_bptt_native.available()


@pytest.mark.skipif(_native_missing, reason=f"native loops unavailable: {fused_bptt_native.unavailable_reason()}")
@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("t_len,b,dense", [(1, 1, "blas"), (30, 4, "blas"), (30, 4, "portable"), (1, 1, "avx512"),
                                           (30, 11, "avx512")])
def test_native_loops_equal_the_pytorch_loops(monkeypatch, name, t_len, b, dense):
    """Both loops in C equal the PyTorch loops to float32 rounding, with the dense products through torch's BLAS,
    the portable kernel (N = 37, not a multiple of its 16 columns) and the AVX-512 kernel (N = 64; B = 11: row
    blocks of 8, 2 and 1)."""
    if dense == "blas" and fused_bptt_native._sgemm() is None:
        pytest.skip("torch's BLAS is not reachable from the native loops here")
    if dense == "avx512" and not fused_bptt_native._load().nb_wide():
        pytest.skip("the native library was built without AVX-512 here")
    monkeypatch.setattr(fused_bptt_native, "dense_products", lambda n: dense)
    n = 64 if dense == "avx512" else 37
    cell, batch, task = _setup(name, t_len=t_len, b=b, n=n)
    params = CellParams(*(t.detach() for t in cell.params()))
    got = {}
    for native in (False, True):
        outputs, rec = fused_bptt.forward_records(cell, params, batch.inputs, native=native)
        y = outputs.clone().requires_grad_(True)
        (out_grad,) = torch.autograd.grad(task.loss(y, batch), y)
        got[native] = (outputs.clone(), fused_bptt.backward_records(cell, params, batch.inputs, rec, out_grad,
                                                                    native=native))
    assert float((got[True][0] - got[False][0]).abs().max()) <= 1e-5 * float(got[False][0].abs().max())
    _assert_close(got[True][1], got[False][1], rtol=1e-5)
    with pytest.raises(ValueError, match="Invalid native=True"):
        fused_bptt.forward_records(cell.double(), CellParams(*(t.double() for t in params)), batch.inputs.double(),
                                   native=True)


def test_the_native_loops_can_be_disabled(monkeypatch, reset_native):
    reset_native()
    monkeypatch.setenv("NEUROINIT_NO_FUSED", "1")
    assert not fused_bptt_native.available() and "NEUROINIT_NO_FUSED" in fused_bptt_native.unavailable_reason()


def test_without_the_native_library_the_pytorch_loops_run(monkeypatch, tmp_path, reset_native):
    cell, batch, task = _setup("lif-zero", t_len=20)
    _, ref = _run(cell, BPTT(cell), batch, task)
    reset_native(tmp_path)
    monkeypatch.setenv("CC", "/nonexistent")
    assert not fused_bptt_native.available()
    assert fused_bptt_native.unavailable_reason().startswith("CC='/nonexistent' is not an executable")
    rule = BPTT(cell, fast=True)
    _, got = _run(cell, rule, batch, task)
    assert rule.uses_fast_path and rule.step_path == "fused-bptt"
    _assert_close(got, ref, rtol=1e-4)


@pytest.mark.skipif(_native_missing, reason=f"native loops unavailable: {fused_bptt_native.unavailable_reason()}")
def test_native_tanh_is_accurate_over_the_whole_range():
    """The native loops' tanh (vecmath.h, shared with the fused step; no libm call) against torch's: a network
    that only applies tanh to its input (alpha = 1, no recurrence), over [-12, 12] with fine steps near 0."""
    from neuroinit.cells import RateRNN

    n = 64
    x = torch.cat([torch.linspace(-12, 12, 2001), torch.linspace(-0.31, 0.31, 2001), torch.logspace(-30, 0, 999),
                   torch.tensor([0.0])])
    x = x[: x.numel() // n * n].view(-1, 1, n)  # (T, 1, N): one value per neuron and step
    params = CellParams(w_in=torch.eye(n), w_rec=torch.zeros(n, n), bias=torch.zeros(n), w_out=torch.zeros(1, n),
                        b_out=torch.zeros(1))
    cell = RateRNN(params, alpha=1.0, form="voltage")
    _, rec = fused_bptt.forward_records(cell, cell.params(), x, native=True)
    expect = torch.tanh(x.double())
    assert float(((rec.seen.double() - expect).abs() / expect.abs().clamp_min(1e-300)).max()) < 4e-7  # measured 1.6e-7
    assert torch.equal(rec.seen.sign(), expect.sign().float())


def test_a_cell_without_the_kernel_falls_back_with_its_reason():
    # dispatch reads the cell's declared kernel id (the registry contract), not its class: ALIF has none
    gen = torch.Generator().manual_seed(0)
    params, _ = hardware_init("alif", 2, 8, 1, 1.0, "ideal", generator=gen)
    why = fused_bptt.supports(make_cell("alif", params))
    assert why is not None and "no fused kernel for model 'alif'" in why
