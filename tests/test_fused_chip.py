"""Chip-precision traces in the fused step: integer codes, the same arithmetic as the PyTorch chip path (exactly,
with nearest rounding) and the same rounding distribution (stochastic rounding, statistically)."""

from __future__ import annotations

import math

import pytest
import torch

from neuroinit.cells import PARAM_NAMES, make_cell
from neuroinit.cells.base import LocalFactors
from neuroinit.init import hardware_init
from neuroinit.learning import fused
from neuroinit.learning.chip import make_trace_quantiser
from neuroinit.learning.online import Traces, accumulate_step
from neuroinit.quantize import Grid

pytestmark = pytest.mark.skipif(not fused.available(), reason=f"fused step unavailable: "
                                f"{fused.unavailable_reason()}")

FULL = ("elig_rec", "elig_in", "elig_bias")


def _cell(profile: str, n: int, *, model: str = "rate", n_in: int = 3):
    g = torch.Generator().manual_seed(0)
    p, _ = hardware_init(model, n_in, n, 2, 1.3, profile, generator=g, out_of_range="clamp")
    kw = {"form": "rate", "alpha": 0.3} if model == "rate" else {"v_th": 0.5}
    return make_cell(model, p, profile=profile, **kw)


class _Kernel:
    """One fused run whose eligibility-trace update is driven with chosen factors (``FusedOnline.update``)."""

    def __init__(self, cell, b: int, rounding: str, *, portable: bool = False) -> None:
        self.cell, self.b = cell, b
        self.q = make_trace_quantiser(cell, generator=torch.Generator().manual_seed(9), rounding=rounding)
        self.grads = {k: torch.zeros_like(getattr(cell, k)) for k in PARAM_NAMES}
        self.fz = fused.FusedOnline(cell, cell.params(), b, self.grads, quantiser=self.q)
        self.fz.run_struct.portable = int(portable)
        self.fz.traces()  # writes the zero traces

    def factors(self, gen: torch.Generator):
        """Random traces on their grids (saturated codes included), postsynaptic factors and output errors."""
        cell, b, n, i = self.cell, self.b, self.cell.n_hidden, self.cell.n_in

        def on_grid(name, *shape):
            gr = self.q.grids[name]
            return torch.randint(gr.code_min, gr.code_max + 1, shape, generator=gen).float() * gr.scale

        tr = Traces(on_grid("pre_rec", b, n), on_grid("pre_in", b, i), on_grid("pre_bias", b, 1),
                    on_grid("elig_rec", b, n, n), on_grid("elig_in", b, n, i), on_grid("elig_bias", b, n),
                    on_grid("readout", b, n), on_grid("readout_bias", b, 1))
        post = torch.rand(b, n, generator=gen) * 0.4
        post[:, ::5] = 0.0  # rows without an increment: pure decay, or skipped where all their codes are zero
        post[:, 1::5] = 0.0
        tr.elig_rec[:, ::10] = 0.0  # rows 0, 10, ...: zero codes; 5, 15, ...: decay of codes of any size
        s = self.q.grids["elig_rec"].scale  # rows 1, 6, ...: decay of small codes (int8: |c| < 32)
        tr.elig_rec[:, 1::5] = torch.trunc(tr.elig_rec[:, 1::5] / (4 * s)) * s
        tr.elig_in[:, ::10] = 0.0
        tr.elig_bias[:, ::10] = 0.0  # rows 5, 15, ...: zero recurrent codes, non-zero input / bias codes
        err = torch.randn(b, cell.n_out, generator=gen)
        return tr, post, err

    def load(self, tr: Traces, post: torch.Tensor) -> None:
        bf = self.fz.buf
        for name in ("pre_rec", "pre_in", "pre_bias"):
            bf[name].copy_(getattr(tr, name))
        bf["ro"].copy_(tr.readout)
        bf["ro_bias"].copy_(tr.readout_bias)
        bf["post"].copy_(post)
        for name in FULL:
            bf[name].copy_(torch.round(getattr(tr, name) / self.q.grids[name].scale).to(bf[name].dtype))

    def codes(self) -> dict[str, torch.Tensor]:
        return {name: self.fz.buf[name].to(torch.int64) for name in FULL}


def _torch_codes(k: _Kernel, tr: Traces, post: torch.Tensor, quantise=None) -> dict[str, torch.Tensor]:
    """The PyTorch chip path's update of the full traces (``trace_step``'s lines), as codes."""
    q = quantise or k.q
    ed = k.cell.trace_spec().elig_decay
    new = {"elig_rec": q("elig_rec", ed * tr.elig_rec + post[..., :, None] * tr.pre_rec[..., None, :]),
           "elig_in": q("elig_in", ed * tr.elig_in + post[..., :, None] * tr.pre_in[..., None, :]),
           "elig_bias": q("elig_bias", ed * tr.elig_bias + post * tr.pre_bias)}
    return {n: (v / k.q.grids[n].scale).round().to(torch.int64) for n, v in new.items()}


@pytest.mark.parametrize("profile,n,n_in", [("loihi-like", 70, 3), ("reckon-like", 70, 3), ("loihi-like", 5, 1100)])
@pytest.mark.parametrize("portable", [False, True])
def test_integer_traces_equal_the_pytorch_chip_path_with_nearest_rounding(profile, n, n_in, portable):
    # n = 70: whole vector blocks and masked tails; int8 codes (loihi, 7 bits) and int16 (reckon, 12 bits); the
    # input and bias traces of a block of rows go through the kernel together, input rows longer than a piece
    # (1100 inputs) one at a time
    cell = _cell(profile, n, n_in=n_in)
    k = _Kernel(cell, 3, "nearest", portable=portable)
    assert k.fz.buf["elig_rec"].dtype == (torch.int8 if profile == "loihi-like" else torch.int16)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        tr, post, err = k.factors(gen)
        k.load(tr, post)
        for g in k.grads.values():
            g.zero_()
        k.fz.update(err)
        want = _torch_codes(k, tr, post)
        got = k.codes()
        for name in FULL:
            assert torch.equal(got[name], want[name]), name
        # the gradient of the rounded traces (accumulate_step on the PyTorch path's values)
        values = {name: want[name].float() * k.q.grids[name].scale for name in FULL}
        ref = {name: torch.zeros_like(g) for name, g in k.grads.items()}
        f = LocalFactors(tr.pre_rec, tr.pre_in, post, tr.readout)
        accumulate_step(ref, err, cell.w_out.detach(), f, tr._replace(**values))
        for name in PARAM_NAMES:
            scale = max(1.0, float(ref[name].abs().max()))
            assert float((k.grads[name] - ref[name]).abs().max()) <= 1e-5 * scale, name


def test_vector_and_scalar_kernels_draw_the_same_random_bits():
    # the codes depend on the seed, not on the CPU the library was built for
    cell = _cell("loihi-like", 70)
    runs = []
    for portable in (False, True):
        k = _Kernel(cell, 3, "stochastic", portable=portable)
        tr, post, err = k.factors(torch.Generator().manual_seed(4))
        k.load(tr, post)
        k.fz.run_struct.seed = 12345
        k.fz.update(err)
        runs.append((k.codes(), {n: g.clone() for n, g in k.grads.items()}))
    for name in FULL:
        assert torch.equal(runs[0][0][name], runs[1][0][name]), name
    for n in PARAM_NAMES:
        assert float((runs[0][1][n] - runs[1][1][n]).abs().max()) <= 1e-5, n


@pytest.mark.parametrize("profile", ["loihi-like", "reckon-like"])
def test_rows_that_cannot_saturate_give_the_same_codes_without_the_clamp(profile):
    # a row whose sums fl(ed c) + fl(post pre) / s provably stay within the codes' range may skip the clamp (the
    # vector kernels do, chip_traces.c in_range): small increments on even rows (in range, saturated codes
    # included), the factors' large ones on odd rows (some saturate), decay-only rows; the portable loop always
    # clamps
    cell = _cell(profile, 70)
    runs = []
    for portable in (False, True):
        k = _Kernel(cell, 3, "stochastic", portable=portable)
        tr, post, err = k.factors(torch.Generator().manual_seed(8))
        post[:, ::2] *= 1e-3
        post[:, 1::2] *= 30.0
        k.load(tr, post)
        k.fz.run_struct.seed = 777
        k.fz.update(err)
        runs.append(k.codes())
    for name in FULL:
        assert torch.equal(runs[0][name], runs[1][name]), name
    gr = k.q.grids["elig_rec"]
    assert int((runs[1]["elig_rec"][:, 1::2] == gr.code_max).sum()) + int(
        (runs[1]["elig_rec"][:, 1::2] == gr.code_min).sum()) > 0  # the odd rows do saturate


def _moments(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = draws.double()
    return d.mean(0), d.var(0, unbiased=True)


@pytest.mark.parametrize("profile,bits", [("loihi-like", 8), ("reckon-like", 16)])
def test_stochastic_rounding_matches_the_pytorch_path_in_distribution(profile, bits):
    """Mean and variance of the rounded codes over many draws, element by element and summed, against the
    exact expectation (code floor(x) + Bernoulli(frac x)) and against the PyTorch path's own draws; bounds from
    the number of draws (6 standard deviations) plus the kernel's stated bias (2^-(bits+1) of a code)."""
    cell = _cell(profile, 24)
    k = _Kernel(cell, 2, "stochastic")
    tr, post, err = k.factors(torch.Generator().manual_seed(5))
    draws = 400
    fused_draws = {n: [] for n in FULL}
    grad_draws = []
    for d in range(draws):
        k.load(tr, post)
        for g in k.grads.values():
            g.zero_()
        k.fz.run_struct.seed = 1000 + d
        k.fz.update(err)
        for n, c in k.codes().items():
            fused_draws[n].append(c)
        grad_draws.append(k.grads["w_rec"].clone())
    gen = torch.Generator().manual_seed(6)
    stoch = make_trace_quantiser(cell, generator=gen)
    torch_draws = {n: [] for n in FULL}
    for _ in range(draws):
        for n, c in _torch_codes(k, tr, post, stoch).items():
            torch_draws[n].append(c)
    ed = cell.trace_spec().elig_decay
    exact = {"elig_rec": ed * tr.elig_rec.double() + post.double()[..., :, None] * tr.pre_rec.double()[..., None, :],
             "elig_in": ed * tr.elig_in.double() + post.double()[..., :, None] * tr.pre_in.double()[..., None, :],
             "elig_bias": ed * tr.elig_bias.double() + post.double() * tr.pre_bias.double()}
    bias = 2.0 ** -(bits + 1)
    for n in FULL:
        gr = k.q.grids[n]
        x = (exact[n] / gr.scale).clamp(gr.code_min, gr.code_max)
        frac = x - x.floor()
        var = frac * (1 - frac)
        mu4 = var * (1 - 3 * var)  # fourth central moment of a Bernoulli(frac)
        for name, samples in (("fused", fused_draws[n]), ("torch", torch_draws[n])):
            mean, svar = _moments(torch.stack(samples))
            slack = bias if name == "fused" else 2.0 ** -24
            # element by element (6 sd: no false alarm over a few thousand elements)
            assert bool(((mean - x).abs() <= slack + 6 * (var / draws).sqrt() + 1e-12).all()), (n, name)
            # summed over elements: the total deviation is a far stricter check of the bias
            assert abs(float((mean - x).sum())) <= slack * x.numel() + 6 * math.sqrt(float(var.sum()) / draws), \
                (n, name)
            assert abs(float((svar - var).sum())) <= slack * x.numel() + 6 * math.sqrt(
                float((mu4 - var ** 2).clamp_min(0).sum()) / draws + 1e-12) + 4 * float(var.sum()) / draws, (n, name)
        fm, _ = _moments(torch.stack(fused_draws[n]))
        tm, _ = _moments(torch.stack(torch_draws[n]))
        assert abs(float((fm - tm).sum())) <= bias * x.numel() + 6 * math.sqrt(2 * float(var.sum()) / draws), n
    # the gradient's mean: sum_b L_bj s x_bji (it is linear in the codes)
    gr = k.q.grids["elig_rec"]
    lsig = err.double() @ cell.w_out.detach().double()
    x = (exact["elig_rec"] / gr.scale).clamp(gr.code_min, gr.code_max)
    want = torch.einsum("bj,bji->ji", lsig * gr.scale, x)
    spread = torch.einsum("bj,bji->ji", (lsig * gr.scale) ** 2, x - x.floor() - (x - x.floor()) ** 2)
    mean = torch.stack(grad_draws).double().mean(0)
    tol = torch.einsum("bj->j", (lsig * gr.scale).abs())[:, None] * bias + 6 * (spread / draws).sqrt() + 1e-6
    assert bool(((mean - want).abs() <= tol).all())


@pytest.mark.parametrize("portable", [False, True])
def test_ties_round_half_to_even_from_the_same_float_sum(portable):
    # x = fl(ed c) + fl(post pre) / s lands exactly on m + 1/2 (m odd and even), by cancellation (ed c ~ 30, x
    # small): torch.round takes the even code. A fused multiply-add (ed c + post pre rounded once) keeps the
    # bits of ed c that fl(ed c) dropped, moves x off the tie and rounds the other way in about half the rows:
    # the kernel must round its products separately, as the PyTorch path does.
    cell = _cell("loihi-like", 32)
    k = _Kernel(cell, 1, "nearest", portable=portable)
    gen = torch.Generator().manual_seed(7)
    tr, post, err = k.factors(gen)
    ed = torch.tensor(cell.trace_spec().elig_decay, dtype=torch.float32)
    s_e, s_p = k.q.grids["elig_rec"].scale, k.q.grids["pre_rec"].scale
    pre = s_p * 2.0 ** int(math.log2(k.q.grids["pre_rec"].code_max))  # a power of two on the pre grid
    codes = torch.tensor([33.0, -35.0, 41.0, -47.0] * 8)  # one code per row
    t1 = ed * codes  # float32 products, as the PyTorch path forms them
    t2 = torch.tensor([-1.5, -0.5, 0.5, 1.5]).repeat_interleave(8) - t1  # exact: t1 + t2 = m + 1/2
    post = (t2 * s_e / pre).reshape(1, 32)
    tr = tr._replace(pre_rec=torch.full((1, 32), pre), elig_rec=(codes[:, None] * s_e).expand(32, 32)[None].clone())
    k.load(tr, post)
    k.fz.update(err)
    want = _torch_codes(k, tr, post)["elig_rec"]
    assert torch.equal((want % 2)[0], torch.zeros(32, 32, dtype=torch.int64))  # every x was a tie: even codes
    assert torch.equal(k.codes()["elig_rec"], want)


@pytest.mark.parametrize("profile,model,form", [("loihi-like", "lif", "voltage"), ("reckon-like", "rate", "rate")])
def test_batch_split_over_threads_draws_the_same_codes(monkeypatch, profile, model, form):
    # a chip-precision trial split over 3 threads (batch slices of 1, 2 and 2 elements, each running all steps;
    # ni_run) draws every random word by its whole-batch index: the same trace codes as on one thread, the
    # gradients up to the order their slices are added in
    from neuroinit.learning.online import OnlineEprop
    from tests.test_fused import _setup, _slices

    monkeypatch.setattr(fused, "PAR_WORK", 1)
    cell, batch, task = _setup(model, form=form, n=40, b=5, t_len=12, profile=profile)
    runs = []
    for threads in (1, 3):
        q = make_trace_quantiser(cell, generator=torch.Generator().manual_seed(9))
        rule = OnlineEprop(cell, fast=True, trace_quantiser=q, generator=torch.Generator().manual_seed(4))
        for name in PARAM_NAMES:
            getattr(cell, name).grad = None
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            trial = rule.backward(batch, task)
        finally:
            torch.set_num_threads(saved)
        assert rule.uses_fast_path and rule.native_backend.batch_slices == _slices(threads)
        codes = {n: rule.native_backend.buf[n].clone() for n in FULL}
        runs.append((trial.outputs.clone(), codes, {n: getattr(cell, n).grad.clone() for n in PARAM_NAMES}))
    (y1, c1, g1), (y3, c3, g3) = runs
    # LIF: bit for bit; the rate model's forward product blocks the rows of a slice differently (float rounding
    # of the drive: 1.5e-8 of the outputs here), and for this seed no code lands on the other side of a threshold
    assert torch.equal(y1, y3) if model == "lif" else float((y1 - y3).abs().max()) <= 1e-6
    for name in FULL:
        assert c1[name].dtype in (torch.int8, torch.int16) and torch.equal(c1[name], c3[name]), name
    assert any(bool(c1[name].ne(0).any()) for name in FULL)
    for name in PARAM_NAMES:
        scale = max(1.0, float(g1[name].abs().max()))
        assert float((g1[name] - g3[name]).abs().max()) <= 1e-5 * scale, name


@pytest.mark.parametrize("profile,model,form,rounding", [("loihi-like", "lif", "voltage", "stochastic"),
                                                          ("loihi-like", "lif", "voltage", "nearest"),
                                                          ("reckon-like", "rate", "rate", "stochastic"),
                                                          ("reckon-like", "lif", "voltage", "nearest")])
def test_a_trial_updates_the_recurrent_traces_a_chunk_of_steps_at_a_time(monkeypatch, profile, model, form,
                                                                         rounding):
    # ni_run defers the recurrent traces and updates each row over a chunk of steps (chip_chunk_flush, where the
    # library has AVX-512): 70 steps are two whole chunks of 32 and a partial one; a row of N = 200 codes is a
    # superblock of 128, one of 64 and a masked one of 8. The portable loop updates every step in turn: the same codes (random words
    # by step and element), the gradients up to the order the batch elements' terms are added in.
    from neuroinit.learning.online import OnlineEprop
    from tests.test_fused import _setup

    cell, batch, task = _setup(model, form=form, n=200, b=3, t_len=70, profile=profile, drive=6.0)
    init = fused.FusedOnline.__init__
    runs = []
    for portable in (False, True):
        def portable_init(self, *a, portable=portable, **kw):
            init(self, *a, **kw)
            self.run_struct.portable = int(portable)

        monkeypatch.setattr(fused.FusedOnline, "__init__", portable_init)
        q = make_trace_quantiser(cell, generator=torch.Generator().manual_seed(9), rounding=rounding)
        if model == "rate":  # a grid 16x finer than the traces' bound: rows that saturate (and take the clamp)
            gr = q.grids["elig_rec"]
            q.grids["elig_rec"] = Grid(gr.scale / 16, gr.code_min, gr.code_max)
        rule = OnlineEprop(cell, fast=True, trace_quantiser=q, generator=torch.Generator().manual_seed(4))
        for name in PARAM_NAMES:
            getattr(cell, name).grad = None
        trial = rule.backward(batch, task)
        assert rule.uses_fast_path
        codes = {n: rule.native_backend.buf[n].clone() for n in FULL}
        runs.append((trial.outputs.clone(), codes, {n: getattr(cell, n).grad.clone() for n in PARAM_NAMES}))
    (y1, c1, g1), (y2, c2, g2) = runs
    assert torch.equal(y1, y2)
    for name in FULL:
        assert torch.equal(c1[name], c2[name]), name
    rec = c1["elig_rec"]
    gr = q.grids["elig_rec"]
    assert int(rec.ne(0).sum()) > rec.numel() // 20  # the traces did move
    if model == "rate":
        assert int(rec.eq(gr.code_max).sum() + rec.eq(gr.code_min).sum()) > 0  # and some saturated
    for name in PARAM_NAMES:
        scale = max(1.0, float(g2[name].abs().max()))
        assert float((g1[name] - g2[name]).abs().max()) <= 1e-5 * scale, name


def test_runs_too_large_for_the_random_counters_take_the_pytorch_path():
    from neuroinit.learning.fused import _counters_fit

    assert _counters_fit(64, 4096, 3, torch.int8) and _counters_fit(64, 2048, 3, torch.int16)
    assert not _counters_fit(256, 8192, 3, torch.int8) and not _counters_fit(128, 8192, 3, torch.int16)
    assert _counters_fit(64, 256, 2 ** 15, torch.int8)
    assert not _counters_fit(64, 4096, 2 ** 16, torch.int8)  # the input trace's words (2^32 of them)


def test_training_on_a_chip_profile_runs_the_fused_step_reproducibly(tmp_path):
    # train learns at the chip's precision through the native step (integer trace codes): same seed, same file
    from neuroinit.experiments.train import TrainConfig, train
    from neuroinit.io.runfile import read_run

    cfg = TrainConfig(model="lif", profile="loihi-like", hidden=16, batch=4, eval_batch=4, lyapunov=False,
                      iters=3, seed=2, dt_ms=10.0)
    for i in range(2):
        train(cfg, tmp_path / f"run{i}.h5")
    runs = [read_run(tmp_path / f"run{i}.h5") for i in range(2)]
    assert runs[0].summary["step_path"] == "fused-native"
    first, second = runs[0].weights["final"], runs[1].weights["final"]
    assert first.codes and set(first.codes) == set(second.codes)
    for name in first.codes:
        assert torch.equal(torch.as_tensor(first.codes[name]), torch.as_tensor(second.codes[name]))
    assert not all(torch.equal(torch.as_tensor(first.codes[n]), torch.as_tensor(runs[0].weights["initial"].codes[n]))
                   for n in first.codes)   # it learnt: some code moved
