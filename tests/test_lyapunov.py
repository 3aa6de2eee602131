"""Lyapunov spectra by the QR method against closed forms (science.md section 3), and the lyapunov CLI.

Closed forms (``h <- (1-a) h + a f(W h)``, ``W ~ N(0, g^2/N)``, no input):
* linear f (any g) and tanh with g < 1: the spectrum is ``log|eig((1-a) I + a W)|`` of the sampled W;
* a = 1, tanh, mean field: ``lambda = 0.5 ln(g^2 E[f'(sqrt(D) z)^2])``, ``D = g^2 E[f(sqrt(D) z)^2]``;
* a = 1, ReLU: ``lambda = 0.5 ln(g^2 / 2)``, critical at g = sqrt(2);
* LIF below threshold, no input: the surrogate Jacobian is ``alpha I`` (psi = 0), exponents ``log alpha``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import integrate, optimize

from neuroinit.cells import LIFRNN, RateRNN
from neuroinit.cli import main
from neuroinit.dynamics import lyapunov_spectrum, max_exponent, task_inputs, two_trajectory_exponent
from neuroinit.init import float_init
from neuroinit.tasks import RomoTask

F64 = torch.float64



def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rate_cell(n: int, gain: float, alpha: float, activation: str = "tanh", seed: int = 0, **kw) -> RateRNN:
    p = float_init(1, n, 2, gain, generator=gen(seed), dtype=F64)
    return RateRNN(p, alpha=alpha, activation=activation, **kw)


def exact_spectrum(cell: RateRNN, k: int) -> np.ndarray:
    a = float(cell.alpha)
    n = cell.n_hidden
    m = (1 - a) * torch.eye(n, dtype=F64) + a * cell.w_rec.detach()
    return torch.linalg.eigvals(m).abs().log().sort(descending=True).values[:k].numpy()


def mean_field_tanh(g: float) -> float:
    def gauss(f, d):
        return integrate.quad(lambda z: f(math.sqrt(d) * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
                              -12, 12, epsabs=1e-13)[0]

    d = optimize.brentq(lambda d: d - g * g * gauss(lambda x: math.tanh(x) ** 2, d), 1e-6, 100)
    return 0.5 * math.log(g * g * gauss(lambda x: (1 - math.tanh(x) ** 2) ** 2, d))


# ------------------------------------------------------------------------------------------ closed forms

@pytest.mark.parametrize("activation, gain, alpha", [
    ("linear", 1.5, 0.2),   # science.md: +0.0917 at N = 400
    ("linear", 3.0, 0.5),   # strongly unstable: the frame is re-orthonormalised before it overflows
    ("linear", 0.8, 1.0),
    ("tanh", 0.5, 1.0),     # science.md: -0.6414 at N = 400
    ("tanh", 0.5, 0.2),
    ("tanh", 0.9, 0.5),
])
def test_spectrum_equals_log_eigenvalues_for_linear_and_subcritical_nets(activation, gain, alpha):
    cell = rate_cell(60, gain, alpha, activation)
    k = 4
    res = lyapunov_spectrum(cell, k=k, batch=1, steps=600, warmup=100, generator=gen(1))
    exact = exact_spectrum(cell, k)
    assert abs(float(res.mean[0]) - exact[0]) < 0.005
    np.testing.assert_allclose(res.mean.numpy(), exact, atol=0.01)
    assert res.k == k and res.per_step.shape == (1, k)
    np.testing.assert_allclose(res.per_tau.numpy(), res.mean.numpy() / alpha)


@pytest.mark.slow
def test_spectrum_large_n_limit_of_the_top_exponent():
    """log(1 - a + a g) is the N -> infinity limit for a subcritical tanh net (science.md: -0.1084 vs -0.1079)."""
    cell = rate_cell(400, 0.5, 0.2)
    top = max_exponent(cell, batch=1, steps=300, warmup=100, generator=gen(2))
    assert abs(top - exact_spectrum(cell, 1)[0]) < 0.005
    assert abs(top - math.log(1 - 0.2 + 0.2 * 0.5)) < 0.01


@pytest.mark.parametrize("gain", [2.0, 3.0])
def test_top_exponent_matches_mean_field_for_chaotic_tanh(gain):
    """alpha = 1, N = 400: within 0.02 of the mean-field value (+0.155 at g = 2, +0.310 at g = 3)."""
    cell = rate_cell(400, gain, 1.0)
    res = lyapunov_spectrum(cell, k=1, batch=2, steps=200, warmup=50, generator=gen(3))
    assert abs(float(res.mean[0]) - mean_field_tanh(gain)) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("gain", [1.5, 2.0, 3.0])
def test_top_exponent_matches_mean_field_for_chaotic_tanh_several_seeds(gain):
    expected = mean_field_tanh(gain)
    values = [max_exponent(rate_cell(400, gain, 1.0, seed=s), batch=4, steps=500, warmup=100, generator=gen(s))
              for s in range(3)]
    assert abs(float(np.mean(values)) - expected) < 0.02


def test_mean_field_values_of_science_reference():
    assert mean_field_tanh(1.5) == pytest.approx(0.065, abs=0.002)
    assert mean_field_tanh(2.0) == pytest.approx(0.155, abs=0.002)
    assert mean_field_tanh(3.0) == pytest.approx(0.310, abs=0.002)  # science.md rounds to +0.305


def test_relu_critical_gain_is_near_sqrt2():
    """alpha = 1 ReLU: lambda = 0.5 ln(g^2 / 2). ReLU is positively homogeneous, so scaling W by g scales the
    trajectory by g^t and every Jacobian by g: lambda(g) = lambda(1) + ln g holds exactly, and each network's
    critical gain is g exp(-lambda(g))."""
    by_gain = {g: [] for g in (1.2, 1.7)}
    for seed in range(4):
        for g, values in by_gain.items():
            values.append(max_exponent(rate_cell(200, g, 1.0, "relu", seed=seed), batch=1, steps=200,
                                           warmup=50, generator=gen(seed)))
    lo, hi = np.array(by_gain[1.2]), np.array(by_gain[1.7])
    np.testing.assert_allclose(hi - lo, math.log(1.7 / 1.2), atol=1e-9)  # homogeneity
    assert lo.mean() < -0.05 and hi.mean() > 0.05                       # sub- and supercritical
    critical = float(np.mean(1.2 * np.exp(-lo)))
    assert abs(critical - math.sqrt(2)) < 0.1
    assert abs(lo.mean() - 0.5 * math.log(1.2 ** 2 / 2)) < 0.05


def test_relu_never_starts_at_zero_state():
    cell = rate_cell(50, 1.0, 1.0, "relu")
    res = lyapunov_spectrum(cell, k=3, batch=2, steps=50, warmup=10, generator=gen(0))
    assert bool(torch.isfinite(res.per_step).all())


# ------------------------------------------------------------------------------------------ method checks

def test_qr_every_5_steps_equals_every_step():
    task = RomoTask()
    cell = rate_cell(60, 2.0, 0.5)
    u = task_inputs(task, batch=2, length=250, generator=gen(4), dtype=F64)
    every = lyapunov_spectrum(cell, u, k=3, warmup=50, qr_every=1, generator=gen(5))
    fifth = lyapunov_spectrum(cell, u, k=3, warmup=50, qr_every=5, generator=gen(5))
    torch.testing.assert_close(fifth.per_step, every.per_step, atol=1e-9, rtol=0)


@pytest.mark.parametrize("alpha, driven", [(1.0, False), (0.5, True)])
def test_two_trajectory_estimate_agrees(alpha, driven):
    """Two nearby trajectories (no Jacobian) give the same top exponent as the QR method."""
    cell = rate_cell(100, 2.0, alpha)
    u = task_inputs(RomoTask(), batch=2, length=350, generator=gen(6), dtype=F64) if driven else None
    qr = lyapunov_spectrum(cell, u, k=1, batch=2, steps=300, warmup=50, generator=gen(7)).per_step[:, 0]
    two = two_trajectory_exponent(cell, u, batch=2, steps=300, warmup=50, generator=gen(7))
    torch.testing.assert_close(two, qr, atol=0.005, rtol=0)
    assert float(qr.mean()) > 0  # chaotic


def test_lif_surrogate_spectrum_below_threshold_is_the_leak():
    """No input, membrane far below threshold: psi = 0, the surrogate Jacobian is alpha I."""
    p = float_init(1, 40, 2, 1.0, generator=gen(0), dtype=F64)
    cell = LIFRNN(p, dt=1.0, tau_m=20.0)
    res = lyapunov_spectrum(cell, k=3, batch=2, steps=400, warmup=100, generator=gen(1))
    np.testing.assert_allclose(res.mean.numpy(), -1 / 20, atol=1e-3)
    np.testing.assert_allclose(res.per_tau.numpy(), res.mean.numpy() * 20)


def test_lif_driven_surrogate_spectrum_feels_the_spikes():
    """Driven near threshold, the pseudo-derivative enters the Jacobian and moves the exponents off the leak."""
    p = float_init(1, 40, 2, 3.0, generator=gen(0), dtype=F64)
    cell = LIFRNN(p, dt=1.0, tau_m=20.0)
    u = 0.1 * task_inputs(RomoTask(dt_tau=0.05), batch=2, length=400, generator=gen(2), dtype=F64)
    res = lyapunov_spectrum(cell, u, k=2, warmup=100, generator=gen(3))
    assert bool(torch.isfinite(res.per_step).all())
    assert float((res.mean - math.log(cell.alpha)).abs().max()) > 3e-3


def test_same_seed_same_result_and_batch_statistics():
    cell = rate_cell(30, 1.5, 0.5)
    a = lyapunov_spectrum(cell, k=2, batch=3, steps=100, warmup=20, generator=gen(8))
    b = lyapunov_spectrum(cell, k=2, batch=3, steps=100, warmup=20, generator=gen(8))
    torch.testing.assert_close(a.per_step, b.per_step, atol=0, rtol=0)
    torch.testing.assert_close(a.mean, a.per_step.mean(0))
    torch.testing.assert_close(a.std, a.per_step.std(0))
    one = lyapunov_spectrum(cell, k=2, batch=1, steps=100, warmup=20, generator=gen(8))
    assert float(one.std.abs().max()) == 0.0


def test_differentiable_spectrum_has_gradients_only_when_asked():
    cell = rate_cell(20, 0.8, 0.5)
    plain = lyapunov_spectrum(cell, k=2, batch=1, steps=30, warmup=5, generator=gen(0))
    assert not plain.mean.requires_grad
    diff = lyapunov_spectrum(cell, k=2, batch=1, steps=30, warmup=5, generator=gen(0), differentiable=True)
    (g,) = torch.autograd.grad(diff.mean.sum(), cell.w_rec)
    assert float(g.abs().sum()) > 0
    torch.testing.assert_close(diff.mean.detach(), plain.mean)


def test_task_inputs_concatenates_whole_trials():
    task = RomoTask()
    u = task_inputs(task, batch=2, length=130, generator=gen(3), dtype=F64)
    g = gen(3)
    first = task.batch(2, generator=g, dtype=F64).inputs
    second = task.batch(2, generator=g, dtype=F64).inputs
    assert u.shape == (130, 2, 1)
    torch.testing.assert_close(u[:56], first)
    torch.testing.assert_close(u[56:112], second)


@pytest.mark.parametrize("kwargs, needle", [
    ({"k": 0}, "Invalid k"),
    ({"k": 11}, "Invalid k"),
    ({"qr_every": 0}, "Invalid qr_every"),
    ({"warmup": -1}, "Invalid warmup"),
    ({"steps": 0}, "Invalid steps"),
    ({"detach_state": True, "eprop_detach": True}, "exclude"),
])
def test_invalid_settings_are_rejected(kwargs, needle):
    cell = rate_cell(10, 1.0, 0.5)
    with pytest.raises(ValueError, match=needle):
        lyapunov_spectrum(cell, generator=gen(0), **kwargs)


def test_invalid_inputs_are_rejected():
    cell = rate_cell(10, 1.0, 0.5)
    with pytest.raises(ValueError, match="need more than warmup"):
        lyapunov_spectrum(cell, torch.zeros(20, 2, 1, dtype=F64), warmup=50, generator=gen(0))
    with pytest.raises(ValueError, match="Invalid inputs"):
        lyapunov_spectrum(cell, torch.zeros(20, 2, 3, dtype=F64), warmup=5, generator=gen(0))
    with pytest.raises(ValueError, match="NaN"):
        lyapunov_spectrum(cell, torch.full((20, 2, 1), math.nan, dtype=F64), warmup=5, generator=gen(0))
    with pytest.raises(ValueError, match="Invalid steps"):
        lyapunov_spectrum(cell, torch.zeros(20, 2, 1, dtype=F64), warmup=5, steps=16, generator=gen(0))


# ------------------------------------------------------------------------------------------ CLI

def _lyap(*args: str):
    return CliRunner().invoke(main, ["lyapunov", *args])


def _one_error_line(result, *needles: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_fresh_init_orders_gains_as_theory_says():
    small = ("--hidden", "64", "--alpha", "0.5", "--batch", "3", "--steps", "150", "--warmup", "30", "--json")
    out = {}
    for g in ("0.5", "1.5"):
        result = _lyap("--model", "rate", "--gain", g, *small)
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        out[g] = json.loads(result.stdout)
    low = out["0.5"]["lyapunov"]
    assert low["k"] == 1 and len(low["per_sequence"]) == 3
    assert low["max"] < -0.2                       # ~ log(1 - a + a g) = log 0.75
    assert low["max"] < out["1.5"]["lyapunov"]["max"]
    assert low["max_per_tau"] == pytest.approx(low["max"] / 0.5)
    assert out["0.5"]["drive"]["task"] == "romo"


def test_cli_matches_the_library():
    result = _lyap("--model", "rate", "--hidden", "32", "--gain", "1.0", "--k", "2", "--batch", "2", "--steps",
                   "60", "--warmup", "10", "--seed", "3", "--json", "--dtype", "float64")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    p = float_init(1, 32, 2, 1.0, generator=gen(3), dtype=F64)
    cell = RateRNN(p, alpha=0.5)
    g = gen(4)
    u = task_inputs(RomoTask(), batch=2, length=70, generator=g, dtype=F64)
    res = lyapunov_spectrum(cell, u, k=2, warmup=10, generator=g)
    np.testing.assert_allclose(data["lyapunov"]["mean_per_step"], res.mean.numpy(), rtol=1e-12)


def test_cli_text_output_and_flossing():
    result = _lyap("--model", "rate", "--hidden", "24", "--gain", "0.5", "--batch", "2", "--steps", "60",
                   "--warmup", "10", "--floss-iters", "3", "--k", "2")
    assert result.exit_code == 0, result.output
    assert "max exponent" in result.stdout and "after 3 local flossing iterations" in result.stdout


@pytest.mark.parametrize("args, needles", [
    (("--hidden", "10", "--gain", "1"), ("--model",)),
    (("--model", "rate", "--hidden", "10", "--gain", "1", "--k", "11"), ("--k", "N = 10")),
    (("--model", "rate", "--hidden", "10", "--gain", "1", "--dt", "1"), ("--dt", "--model rate")),
    (("--model", "lif", "--hidden", "10", "--gain", "1", "--alpha", "0.5"), ("--alpha",)),
    (("--model", "rate", "--hidden", "10", "--gain", "1", "--which", "final"), ("--which",)),
    (("--model", "rate", "--hidden", "10", "--gain", "1", "--profile", "no-such-chip"), ("no-such-chip",)),
    (("--model", "rate", "--hidden", "10", "--gain", "-1"), ("gain",)),
    (("--model", "rnn", "--hidden", "10", "--gain", "1"), ("--model",)),
    (("--model", "rate", "--hidden", "0", "--gain", "1"), ("--hidden",)),
    (("no-such-run.h5",), ("no-such-run.h5",)),
    (("no-such-run.h5", "--model", "rate"), ("--model",)),
])
def test_cli_bad_input_is_one_line(args, needles):
    _one_error_line(_lyap(*args), *needles)


def test_cli_leaves_spectrum_and_flossing_defaults_to_the_library():
    """The CLI passes on only what was given; the defaults its help shows in brackets are the library's."""
    import dataclasses

    from neuroinit.cli.dynamics import lyapunov_command
    from neuroinit.experiments.lyapunov_report import FlossSettings, SpectrumSettings

    params = {p.name: p for p in lyapunov_command.params}
    options = [(f.name, getattr(SpectrumSettings(), f.name)) for f in dataclasses.fields(SpectrumSettings)]
    options += [(f"floss_{f.name}", getattr(FlossSettings(), f.name)) for f in dataclasses.fields(FlossSettings)]
    for name, default in options:
        assert params[name].default is None, name
        assert f"[{default}]" in params[name].help, (name, params[name].help)


def test_the_library_report_is_what_the_cli_prints():
    from neuroinit.cli import json_safe
    from neuroinit.dynamics.flossing import DEFAULT_STEPS, DEFAULT_WARMUP
    from neuroinit.experiments.lyapunov_report import FlossSettings, SpectrumSettings, analyse, fresh_network

    result = _lyap("--model", "rate", "--hidden", "12", "--gain", "0.9", "--batch", "2", "--steps", "30",
                   "--warmup", "5", "--k", "2", "--floss-iters", "2", "--json")
    assert result.exit_code == 0, result.output
    net = fresh_network("rate", 12, 0.9, seed=0)
    report = analyse(net, SpectrumSettings(k=2, batch=2, steps=30, warmup=5), FlossSettings(iters=2), seed=0)
    assert json.loads(json.dumps(json_safe(report.to_dict()), default=float)) == json.loads(result.stdout)
    assert (report.floss["k"], report.floss["steps"], report.floss["warmup"]) == (1, DEFAULT_STEPS, DEFAULT_WARMUP)
    plain = analyse(net, SpectrumSettings(k=1, batch=1, steps=10, warmup=2), seed=0)
    assert plain.floss is None and plain.after is None and set(plain.to_dict()) == {"network", "drive", "lyapunov"}


def test_fresh_network_refuses_the_other_models_options():
    from neuroinit.experiments.lyapunov_report import fresh_network

    with pytest.raises(ValueError, match="Invalid options alpha for model 'lif'"):
        fresh_network("lif", 8, 1.0, alpha=0.5)
    with pytest.raises(ValueError, match="Invalid options dt, tau_m for model 'rate'"):
        fresh_network("rate", 8, 1.0, dt=1.0, tau_m=20.0)


def test_cli_refuses_options_the_chosen_cell_does_not_take():
    # the cell's own config section decides (the registry), for every registered model
    _one_error_line(_lyap("--model", "lif", "--hidden", "8", "--gain", "1", "--alpha", "0.5"),
                    "Invalid options --alpha for --model lif: allowed --dt, --tau-m")
    _one_error_line(_lyap("--model", "alif", "--hidden", "8", "--gain", "1", "--form", "rate"),
                    "Invalid options --form for --model alif")
    _one_error_line(_lyap("--model", "rate", "--hidden", "8", "--gain", "1", "--tau-m", "20"),
                    "allowed --alpha, --activation, --form")


def test_report_and_cli_allow_the_whole_state_of_a_two_component_cell():
    """ALIF's state is (v, a): K N = 2 N exponents, as lyapunov_spectrum allows; more is refused."""
    from neuroinit.experiments.lyapunov_report import SpectrumSettings, analyse, fresh_network

    net = fresh_network("alif", 8, 1.0, seed=0)
    report = analyse(net, SpectrumSettings(k=10, batch=1, steps=5, warmup=1), seed=0)
    assert report.before.k == 10 and report.before.mean.shape == (10,)
    with pytest.raises(ValueError, match="Invalid k 17: must be between 1 and the state size K N = 16"):
        analyse(net, SpectrumSettings(k=17, batch=1, steps=5, warmup=1), seed=0)
    _one_error_line(_lyap("--model", "alif", "--hidden", "8", "--gain", "1", "--k", "17"),
                    "Invalid --k 17: must be between 1 and the state size K N = 16")
