"""Rate and LIF cells against closed forms (float64), their pure step functions, Jacobians, surrogate gradient,
dtype / device handling and constructor validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from neuroinit.cells import (
    ACTIVATIONS,
    LIFRNN,
    PARAM_NAMES,
    CellParams,
    LIFState,
    RateRNN,
    RateState,
    lif_step,
    make_cell,
    pseudo_derivative,
    rate_step,
    spike,
)
from neuroinit.cells.base import QUANTISED_PARAMS
from neuroinit.init import float_init, hardware_init

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(n_in=2, n=6, n_out=3, gain=0.9, seed=0, dtype=F64, bias=True) -> CellParams:
    p = float_init(n_in, n, n_out, gain, generator=_gen(seed), dtype=dtype)
    if bias:
        g = _gen(seed + 100)
        p = p._replace(bias=0.1 * torch.randn(n, generator=g, dtype=F64).to(dtype),
                       b_out=0.1 * torch.randn(n_out, generator=g, dtype=F64).to(dtype))
    return p


def _zero_rec(n_in: int, n: int, n_out: int, *, w_in: torch.Tensor | None = None, seed: int = 0) -> CellParams:
    g = _gen(seed)
    return CellParams(w_in=torch.randn(n, n_in, generator=g, dtype=F64) if w_in is None else w_in,
                      w_rec=torch.zeros(n, n, dtype=F64), bias=torch.zeros(n, dtype=F64),
                      w_out=torch.randn(n_out, n, generator=g, dtype=F64),
                      b_out=torch.randn(n_out, generator=g, dtype=F64))


# ----------------------------------------------------------------------------------------- rate: closed forms

@pytest.mark.parametrize("form", ["voltage", "rate"])
def test_linear_rate_impulse_response(form):
    """W_rec = 0, input u at t = 1 only: x_t = a (1-a)^(t-1) W_in u and y_t = W_out x_t + b_out."""
    a, T = 0.2, 30
    p = _zero_rec(2, 5, 3)
    cell = RateRNN(p, alpha=a, activation="linear", form=form)
    u = torch.tensor([[0.7, -1.3]], dtype=F64)
    inputs = torch.zeros(T, 1, 2, dtype=F64)
    inputs[0] = u
    ys, state = cell(inputs)
    drive = (u @ p.w_in.T)[0]
    expected_x = torch.stack([a * (1 - a) ** (t - 1) * drive for t in range(1, T + 1)])
    torch.testing.assert_close(ys[:, 0], expected_x @ p.w_out.T + p.b_out, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(state.x[0], expected_x[-1], rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("form", ["voltage", "rate"])
def test_linear_rate_matrix_power_response(form):
    """x_t = M^(t-1) a W_in u with M = (1-a) I + a W_rec; and the step response to a constant drive c = W_in u + b
    is x_t = (I - M^t) (I - W_rec)^(-1) c."""
    a, T, n = 0.3, 25, 8
    p = _params(2, n, 2, gain=0.6, seed=3)
    cell = RateRNN(p, alpha=a, activation="linear", form=form, remove_autapses=False)
    eye = torch.eye(n, dtype=F64)
    m = (1 - a) * eye + a * p.w_rec
    u = torch.tensor([0.4, -0.9], dtype=F64)
    no_bias = RateRNN(p._replace(bias=torch.zeros(n, dtype=F64)), alpha=a, activation="linear", form=form,
                      remove_autapses=False)
    state = no_bias.init_state(1)
    for t in range(1, T + 1):
        _, state = no_bias.step(no_bias.params(), state, (u if t == 1 else 0 * u)[None])
        expected = torch.linalg.matrix_power(m, t - 1) @ (a * p.w_in @ u)
        torch.testing.assert_close(state.x[0], expected, rtol=1e-10, atol=1e-14)
    c = p.w_in @ u + p.bias
    _, state = cell(u.expand(T, 1, 2))
    step_response = (eye - torch.linalg.matrix_power(m, T)) @ torch.linalg.solve(eye - p.w_rec, c)
    torch.testing.assert_close(state.x[0], step_response, rtol=1e-10, atol=1e-13)


def test_linear_activation_is_listed_and_exact():
    f = ACTIVATIONS["linear"]
    x = torch.linspace(-3, 3, 7, dtype=F64)
    assert torch.equal(f.f(x), x)
    assert torch.equal(f.df(x), torch.ones_like(x))


# ------------------------------------------------------------------------------------------ LIF: closed forms

def _lif_drive(currents: list[float], **kwargs) -> LIFRNN:
    """Decoupled LIF neurons (W_rec = 0) with input weights diag(I_j): input ones gives currents I_j."""
    n = len(currents)
    p = _zero_rec(n, n, 1, w_in=torch.diag(torch.tensor(currents, dtype=F64)))
    return LIFRNN(p, **kwargs)


@torch.no_grad()
def _run(cell: LIFRNN, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    state = cell.init_state(1)
    vs, zs = [], []
    params = cell.params()
    for _ in range(T):
        _, state = cell.step(params, state, torch.ones(1, cell.n_in, dtype=F64))
        vs.append(state.v[0])
        zs.append(state.z[0])
    return torch.stack(vs), torch.stack(zs)


def _first_spike_time(current: float, alpha: float, v_th: float) -> int:
    """Smallest t >= 1 with v_t = I (1 - alpha^t) / (1 - alpha) > v_th, from the logarithm."""
    s = math.log(1 - v_th * (1 - alpha) / current) / math.log(alpha)
    assert abs(s - round(s)) > 1e-6  # not on a boundary where rounding could decide
    return math.floor(s) + 1


def test_lif_first_spike_time_and_voltage_trace():
    currents = [0.06, 0.1, 0.3, 0.75, 1.5]
    cell = _lif_drive(currents, dt=1.0, tau_m=20.0)
    alpha = math.exp(-1 / 20)
    assert float(cell.alpha) == alpha
    vs, zs = _run(cell, 120)
    for j, current in enumerate(currents):
        assert current > 1.0 * (1 - alpha)  # can reach the threshold
        t_star = _first_spike_time(current, alpha, 1.0)
        first = int(torch.nonzero(zs[:, j])[0]) + 1
        assert first == t_star
        ts = torch.arange(1, t_star + 1, dtype=F64)
        expected = current * (1 - alpha ** ts) / (1 - alpha)  # up to and including the spike step
        torch.testing.assert_close(vs[:t_star, j], expected, rtol=1e-12, atol=0)
    assert _first_spike_time(1.5, alpha, 1.0) == 1
    assert _first_spike_time(0.06, alpha, 1.0) == 34


def test_lif_below_rheobase_never_spikes():
    alpha = math.exp(-1 / 20)
    current = 0.9 * (1 - alpha)  # v_inf = 0.9 v_th
    vs, zs = _run(_lif_drive([current]), 400)
    assert not zs.any()
    assert float(vs[-1, 0]) == pytest.approx(0.9 * (1 - alpha ** 400), rel=1e-12)


@pytest.mark.parametrize("v_th", [1.0, 0.5])
def test_reset_by_subtraction_and_to_zero(v_th):
    current = 0.3 * v_th
    alpha = math.exp(-1 / 20)
    t_star = _first_spike_time(current, alpha, v_th)
    sub_v, sub_z = _run(_lif_drive([current], v_th=v_th, reset="subtract"), 3 * t_star + 2)
    zero_v, zero_z = _run(_lif_drive([current], v_th=v_th, reset="zero"), 3 * t_star + 2)
    assert torch.equal(sub_v[:t_star], zero_v[:t_star])  # identical until the first spike
    v_spike = float(sub_v[t_star - 1, 0])
    assert v_spike > v_th
    # the step after a spike
    assert float(sub_v[t_star, 0]) == pytest.approx(alpha * v_spike + current - v_th, rel=1e-13)
    assert float(zero_v[t_star, 0]) == pytest.approx(current, rel=1e-12)
    # reset to zero restarts the same trajectory: spikes every t_star steps
    assert (torch.nonzero(zero_z[:, 0])[:, 0] + 1).tolist() == [t_star, 2 * t_star, 3 * t_star]
    # subtraction after the leak leaves alpha v - v_th < 0 here, so the next spike comes no earlier;
    # the whole spike train agrees with a scalar re-computation of v_t = alpha v + I - v_th z_{t-1}
    v, z, expected = 0.0, 0.0, []
    for t in range(1, 3 * t_star + 3):
        v = alpha * v + current - v_th * z
        z = 1.0 if v > v_th else 0.0
        if z:
            expected.append(t)
    spikes = (torch.nonzero(sub_z[:, 0])[:, 0] + 1).tolist()
    assert spikes == expected
    assert spikes[1] >= 2 * t_star


@pytest.mark.parametrize("n_ref", [1, 3])
def test_refractory_period_suppresses_spikes(n_ref):
    _, free_z = _run(_lif_drive([1.5]), 20)
    assert bool(free_z.all())  # without refractoriness this drive spikes every step
    _, z = _run(_lif_drive([1.5], n_refractory=n_ref), 20)
    spikes = (torch.nonzero(z[:, 0])[:, 0] + 1).tolist()
    assert spikes == list(range(1, 21, n_ref + 1))


def test_refractory_neurons_pass_no_surrogate_gradient():
    cell = _lif_drive([1.5, 1.5], n_refractory=2)
    params = cell.params()
    state = cell.init_state(1)._replace(ref=torch.tensor([[2.0, 0.0]], dtype=F64))
    u = torch.ones(1, 2, dtype=F64, requires_grad=True)
    _, new = cell.step(params, state, u)
    assert new.z.tolist() == [[0.0, 1.0]]
    (grad,) = torch.autograd.grad(new.z.sum(), u)
    psi = float(pseudo_derivative(new.v[0, 1].detach(), 1.0, 0.3))
    assert psi > 0
    assert grad.tolist() == [[0.0, 1.5 * psi]]
    assert new.ref.tolist() == [[1.0, 2.0]]


# ------------------------------------------------------------------------------ module == pure step functions

@pytest.mark.parametrize("form", ["voltage", "rate"])
@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu"])
def test_rate_module_forward_equals_loop_over_rate_step(form, activation):
    p = _params(2, 7, 3, gain=1.5, seed=4)
    cell = RateRNN(p, alpha=0.3, activation=activation, form=form)
    inputs = torch.randn(12, 4, 2, generator=_gen(5), dtype=F64)
    x0 = RateState(0.5 * torch.randn(4, 7, generator=_gen(6), dtype=F64))
    ys, final = cell(inputs, x0)
    params = cell.params()
    assert not params.w_rec.diagonal().any()
    state = x0
    for t in range(12):
        y, state = rate_step(params, state, inputs[t], alpha=0.3, activation=ACTIVATIONS[activation], form=form)
        assert torch.equal(ys[t], y)
    assert torch.equal(final.x, state.x)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("n_ref", [0, 2])
def test_lif_module_forward_equals_loop_over_lif_step(reset, n_ref):
    p = _params(2, 10, 3, gain=1.5, seed=7)
    p = p._replace(w_in=p.w_in * 0.8)
    cell = LIFRNN(p, dt=1.0, tau_m=10.0, tau_out=15.0, v_th=0.7, reset=reset, n_refractory=n_ref)
    inputs = torch.rand(40, 3, 2, generator=_gen(8), dtype=F64)
    ys, final = cell(inputs)
    params = cell.params()
    state = cell.init_state(3)
    n_spikes = 0
    for t in range(40):
        y, state = lif_step(params, state, inputs[t], alpha=math.exp(-1 / 10), kappa=math.exp(-1 / 15),
                            v_th=0.7, gamma=0.3, reset=reset, n_refractory=n_ref)
        assert torch.equal(ys[t], y)
        n_spikes += int(state.z.sum())
    for a, b in zip(final, state):
        assert torch.equal(a, b)
    assert final.z.dtype == F64
    assert n_spikes > 0  # not a silent network: the comparison covers spikes, resets and the recurrence


def test_lif_readout_is_a_leaky_integrator_of_spikes():
    p = _params(2, 6, 2, gain=1.5, seed=9)
    cell = LIFRNN(p, tau_out=5.0)
    kappa = math.exp(-1 / 5)
    state = cell.init_state(2)
    u = torch.full((2, 2), 0.6, dtype=F64)
    for _ in range(15):
        prev_y = state.y
        y, state = cell.step(cell.params(), state, u)
        torch.testing.assert_close(y, kappa * prev_y + state.z @ p.w_out.T + p.b_out, rtol=1e-14, atol=1e-15)
        assert torch.equal(y, state.y)


# ------------------------------------------------------------------------------------ surrogate derivative

def test_pseudo_derivative_formula():
    v = torch.tensor([-1.0, 0.0, 0.25, 0.5, 1.0, 1.5, 1.75, 2.0, 3.0], dtype=F64)
    expected = [0.0, 0.0, 0.075, 0.15, 0.3, 0.15, 0.075, 0.0, 0.0]  # (0.3 / 1) max(0, 1 - |v - 1|)
    torch.testing.assert_close(pseudo_derivative(v, 1.0, 0.3), torch.tensor(expected, dtype=F64),
                               rtol=1e-15, atol=1e-16)
    # v_th = 2: psi = (0.3 / 2) max(0, 1 - |v - 2| / 2)
    torch.testing.assert_close(pseudo_derivative(torch.tensor([2.0, 1.0, 4.0], dtype=F64), 2.0, 0.3),
                               torch.tensor([0.15, 0.075, 0.0], dtype=F64), rtol=1e-15, atol=1e-16)


def test_spike_is_heaviside_with_the_pseudo_derivative_as_gradient():
    v = torch.linspace(-0.5, 2.5, 61, dtype=F64).requires_grad_(True)
    v_th, gamma = torch.tensor(1.0, dtype=F64), torch.tensor(0.3, dtype=F64)
    z = spike(v, v_th, gamma)
    assert torch.equal(z, (v.detach() > 1.0).to(F64))
    assert float(spike(torch.tensor(1.0, dtype=F64), v_th, gamma)) == 0.0  # strictly above the threshold
    upstream = torch.linspace(1.0, 2.0, 61, dtype=F64)
    (grad,) = torch.autograd.grad(z, v, upstream)
    assert torch.equal(grad, upstream * pseudo_derivative(v.detach(), v_th, gamma))


# ------------------------------------------------------------------------------------------------ Jacobians

def _autograd_step_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """(B, N, N) per-sample Jacobian of a batched step x -> fn(x)."""
    full = torch.autograd.functional.jacobian(fn, x)  # (B, N, B, N)
    return torch.stack([full[b, :, b, :] for b in range(x.shape[0])])


@pytest.mark.parametrize("form", ["voltage", "rate"])
@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_rate_jacobian_equals_autograd(form, activation):
    p = _params(2, 9, 2, gain=1.8, seed=10)
    cell = RateRNN(p, alpha=0.25, activation=activation, form=form)
    params = cell.params()
    x = torch.randn(3, 9, generator=_gen(11), dtype=F64)
    u = torch.randn(3, 2, generator=_gen(12), dtype=F64)
    expected = _autograd_step_jacobian(lambda x_: cell.step(params, RateState(x_), u)[1].x, x)
    torch.testing.assert_close(cell.jacobian(params, RateState(x), u), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_lif_jacobian_is_the_surrogate_derivative(reset):
    """The true derivative of a spiking step is 0 almost everywhere; jacobian() is the surrogate one:
    the formula, and autograd through the step with z_{t-1} = spike(v_{t-1}) (pseudo-derivative backward)."""
    n = 8
    p = _params(2, n, 2, gain=1.5, seed=13)
    cell = LIFRNN(p, v_th=0.8, reset=reset)
    params = cell.params()
    v = 0.8 + 0.5 * torch.randn(4, n, generator=_gen(14), dtype=F64)  # straddles the threshold
    u = torch.rand(4, 2, generator=_gen(15), dtype=F64)
    z = (v > 0.8).to(F64)
    ref, y = torch.zeros_like(v), torch.zeros(4, 2, dtype=F64)
    jac = cell.jacobian(params, LIFState(v, z, ref, y), u)
    alpha = math.exp(-1 / 20)
    psi = pseudo_derivative(v, 0.8, 0.3)
    assert bool((psi > 0).any())
    assert bool(((psi > 0) & (z > 0)).any())
    eye = torch.eye(n, dtype=F64)
    if reset == "subtract":
        formula = alpha * eye + (params.w_rec - 0.8 * eye) * psi[:, None, :]
    else:
        formula = torch.diag_embed(alpha * (1 - z) - alpha * v * psi) + params.w_rec * psi[:, None, :]
    torch.testing.assert_close(jac, formula, rtol=1e-13, atol=1e-15)

    def step_v(v_prev):
        z_prev = spike(v_prev, cell.v_th, cell.gamma)
        return cell.step(params, LIFState(v_prev, z_prev, ref, y), u)[1].v

    torch.testing.assert_close(jac, _autograd_step_jacobian(step_v, v), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------- dtype, device, state

@pytest.mark.parametrize("model", ["rate", "lif"])
def test_double_and_to_convert_parameters_and_buffers(model):
    cell = make_cell(model, _params(2, 5, 2, dtype=torch.float32))
    assert cell.w_rec.dtype == torch.float32
    assert all(b.dtype == torch.float32 for b in cell.buffers())
    y32, _ = cell(torch.rand(3, 2, 2, generator=_gen()))
    assert y32.dtype == torch.float32
    cell.double()
    assert all(t.dtype == F64 for t in (*cell.parameters(), *cell.buffers()))
    assert all(t.dtype == F64 for t in cell.init_state(2))
    y64, state = cell(torch.rand(3, 2, 2, generator=_gen(), dtype=F64))
    assert y64.dtype == F64
    assert all(t.dtype == F64 for t in state)
    cell.to(torch.float32)
    assert all(t.dtype == torch.float32 for t in (*cell.parameters(), *cell.buffers()))


@pytest.mark.parametrize("model", ["rate", "lif"])
def test_buffers_move_with_the_module(model):
    cell = make_cell(model, _params(2, 5, 2))
    names = {n for n, _ in cell.named_buffers()}
    assert names == ({"alpha"} if model == "rate" else {"alpha", "kappa", "v_th", "gamma"})
    meta = copy.deepcopy(cell).to("meta")  # shape-only device: shows .to() reaches every tensor, no GPU needed
    assert all(t.device.type == "meta" for t in (*meta.parameters(), *meta.buffers()))
    assert all(t.device.type == "meta" for t in meta.init_state(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["rate", "lif"])
def test_cuda_forward_matches_cpu(model):
    cell = make_cell(model, _params(2, 5, 2))
    inputs = torch.rand(6, 2, 2, generator=_gen(), dtype=F64)
    y_cpu, _ = cell(inputs)
    gpu = copy.deepcopy(cell).to("cuda")
    assert all(t.device.type == "cuda" for t in (*gpu.parameters(), *gpu.buffers()))
    y_gpu, state = gpu(inputs.cuda())
    assert all(t.device.type == "cuda" for t in state)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model", ["rate", "lif"])
def test_state_dict_round_trip(model):
    kwargs = {"alpha": 0.3} if model == "rate" else {"tau_m": 12.0, "v_th": 0.6, "gamma": 0.5}
    a = make_cell(model, _params(2, 6, 2, seed=20), **kwargs)
    b = make_cell(model, _params(2, 6, 2, seed=21), **kwargs)
    inputs = torch.rand(10, 3, 2, generator=_gen(22), dtype=F64)
    assert not torch.equal(a(inputs)[0], b(inputs)[0])
    sd = a.state_dict()
    assert set(PARAM_NAMES) <= set(sd)
    b.load_state_dict(sd)
    assert torch.equal(a(inputs)[0], b(inputs)[0])
    rebuilt = make_cell(model, a.float_params(), **a.config())
    assert torch.equal(a(inputs)[0], rebuilt(inputs)[0])


@pytest.mark.parametrize("model", ["rate", "lif"])
def test_constructor_keeps_the_callers_tensors_and_removes_autapses(model):
    p = _params(2, 5, 2, seed=30)
    assert p.w_rec.diagonal().abs().min() > 0
    before = p.w_rec.clone()
    cell = make_cell(model, p)
    assert not cell.w_rec.diagonal().any()
    assert torch.equal(p.w_rec, before)  # the caller's params are copied, not zeroed in place
    off = ~torch.eye(5, dtype=torch.bool)
    assert torch.equal(cell.w_rec[off], p.w_rec[off])
    kept = make_cell(model, p, remove_autapses=False)
    assert torch.equal(kept.w_rec, p.w_rec)
    assert kept.recurrent_mask() is None
    assert torch.equal(cell.recurrent_mask(), off.to(F64))


@pytest.mark.parametrize(("model", "kwargs", "match"), [
    ("rate", {"alpha": 0.0}, "Invalid alpha"), ("rate", {"alpha": 1.5}, "Invalid alpha"),
    ("rate", {"alpha": math.nan}, "Invalid alpha"), ("rate", {"activation": "sigmoid"}, "Invalid activation"),
    ("rate", {"form": "current"}, "Invalid form"),
    ("lif", {"dt": 0.0}, "Invalid dt"), ("lif", {"tau_m": -20.0}, "Invalid tau_m"),
    ("lif", {"tau_out": math.inf}, "Invalid tau_out"), ("lif", {"v_th": 0.0}, "Invalid v_th"),
    ("lif", {"gamma": -0.3}, "Invalid gamma"), ("lif", {"gamma": math.nan}, "Invalid gamma"),
    ("lif", {"reset": "hard"}, "Invalid reset"), ("lif", {"n_refractory": -1}, "Invalid n_refractory"),
    ("lif", {"n_refractory": 1.5}, "Invalid n_refractory"),
])
def test_invalid_constructor_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_cell(model, _params(), **kwargs)


@pytest.mark.parametrize("model", ["rate", "lif"])
def test_invalid_shapes_and_inputs(model):
    p = _params(2, 5, 2)
    with pytest.raises(ValueError, match="Invalid shape of w_rec"):
        make_cell(model, p._replace(w_rec=torch.zeros(5, 4, dtype=F64)))
    with pytest.raises(ValueError, match="Invalid shape of b_out"):
        make_cell(model, p._replace(b_out=torch.zeros(3, dtype=F64)))
    cell = make_cell(model, p)
    with pytest.raises(ValueError, match="Invalid input shape"):
        cell(torch.zeros(4, 2, 3, dtype=F64))
    with pytest.raises(ValueError, match="Invalid model"):
        make_cell("hodgkin-huxley", p)


def test_unknown_form_in_the_pure_step_is_rejected():
    p = _params()
    with pytest.raises(ValueError, match="Invalid form"):
        rate_step(p, RateState(torch.zeros(1, 6, dtype=F64)), torch.zeros(1, 2, dtype=F64), alpha=0.5,
                  activation=ACTIVATIONS["tanh"], form="current")


# ------------------------------------------------------------------------------------------- quantised cells

@pytest.mark.parametrize("model", ["rate", "lif"])
def test_quantised_forward_uses_grid_values_with_straight_through_gradients(model):
    p = _params(1, 32, 2, gain=1.5, seed=40)
    cell = make_cell(model, p, profile="loihi-like")
    q = cell.params()
    for name in QUANTISED_PARAMS:
        grid = cell.grids[name]
        assert grid is not None
        codes = q[PARAM_NAMES.index(name)].detach() / grid.scale
        assert torch.equal(codes, codes.round())
        assert grid.code_min <= float(codes.min()) <= float(codes.max()) <= grid.code_max
        assert not torch.equal(q[PARAM_NAMES.index(name)], getattr(cell, name))  # really moved onto the grid
        assert float((q[PARAM_NAMES.index(name)] - getattr(cell, name)).detach().abs().max()) <= grid.scale / 2
    assert q.bias is cell.bias  # biases are not chip matrices here
    # the loss sees grid values, the float weights receive the gradient unchanged (straight-through)
    inputs = torch.rand(8, 2, 1, generator=_gen(41), dtype=F64)
    ys, _ = cell(inputs)
    ys.pow(2).sum().backward()
    grads = {n: getattr(cell, n).grad.clone() for n in PARAM_NAMES}
    ref = make_cell(model, q._replace(**{n: t.detach() for n, t in zip(PARAM_NAMES, q)}), profile="ideal")
    ys_ref, _ = ref(inputs)
    assert torch.equal(ys.detach(), ys_ref.detach())
    ys_ref.pow(2).sum().backward()
    for n in PARAM_NAMES:
        assert torch.equal(grads[n], getattr(ref, n).grad), n
    # with quantised_forward=False the float weights are used as they are
    plain = make_cell(model, p, profile="loihi-like", quantised_forward=False)
    assert all(a is b for a, b in zip(plain.params(), plain.float_params()))


@pytest.mark.parametrize("model", ["rate", "lif"])
def test_cell_keeps_hardware_init_weights_on_their_grid(model):
    p, report = hardware_init(model, 1, 64, 2, 1.5, "loihi-like", generator=_gen(42), dtype=F64)
    cell = make_cell(model, p, profile="loihi-like")
    for name in QUANTISED_PARAMS:
        assert torch.equal(getattr(cell.params(), name), getattr(p, name))
        assert cell.grids[name].scale <= report.scale[name]


def test_ideal_profile_params_are_the_float_parameters():
    cell = RateRNN(_params(), profile="ideal")
    assert all(a is b for a, b in zip(cell.params(), cell.float_params()))
    assert all(g is None for g in cell.grids.values())


def test_grids_ignore_the_removed_diagonal():
    """Regression: grids were chosen from the caller's W_rec, diagonal included, although the cell zeroes it."""
    p = _params(1, 16, 2, gain=1.0, seed=43)
    big = p.w_rec.clone()
    big.fill_diagonal_(50.0)  # an autapse that is removed must not coarsen the recurrent grid
    a = RateRNN(p, profile="loihi-like")
    b = RateRNN(p._replace(w_rec=big), profile="loihi-like")
    assert b.grids["w_rec"] == a.grids["w_rec"]
    kept = RateRNN(p._replace(w_rec=big), profile="loihi-like", remove_autapses=False)
    assert kept.grids["w_rec"].scale > a.grids["w_rec"].scale


@pytest.mark.parametrize("form", ["voltage", "rate"])
def test_rate_jacobian_apply_equals_the_formed_jacobian(form):
    g = torch.Generator().manual_seed(3)
    params, _ = hardware_init("rate", 2, 12, 1, 1.4, "ideal", generator=g, dtype=torch.float64)
    cell = make_cell("rate", params, alpha=0.3, form=form)
    p = cell.params()
    state = RateState(torch.randn(4, 12, generator=g, dtype=torch.float64))
    u = torch.randn(4, 2, generator=g, dtype=torch.float64)
    q = torch.randn(4, 12, 3, generator=g, dtype=torch.float64)
    expected = cell.jacobian(p, state, u) @ q
    assert torch.allclose(cell.jacobian_apply(p, state, u, q), expected, rtol=0, atol=1e-13)
