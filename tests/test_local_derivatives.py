"""Every registered cell's local derivatives (the one definition the Lyapunov Jacobian, flossing and e-prop use)
agree with finite differences of its step, in every reset mode (float64).

The spike is a Heaviside, so the step is differentiated with the spikes it reads held, and the path through the
spikes is ``(d step / d z_{t-1}) (d z_{t-1} / d h_{t-1})``: the first factor by finite differences too, the second
the pseudo-derivative (the surrogate: defined, not derived)."""

from __future__ import annotations

import pytest
import torch

from neuroinit.cells import cell_class, model_names
from neuroinit.init import float_init

F64 = torch.float64
EPS = 1e-6

# every registered model with each of its reset modes and neuron options
VARIANTS = {
    "rate": [{"alpha": 0.3, "form": "voltage"}, {"alpha": 0.3, "form": "rate"},
             {"alpha": 0.5, "form": "voltage", "activation": "softplus"}],
    "lif": [{"reset": "subtract"}, {"reset": "zero"}, {"reset": "subtract", "reset_leaks": True},
            {"reset": "subtract", "tau_syn": 3.0}, {"reset": "zero", "threshold_compare": ">="}],
    "alif": [{"beta": 0.0}, {"beta": 0.3, "tau_a": 30.0}, {"beta": 1.5, "tau_a": 5.0},
             {"beta": 0.3, "tau_a": 30.0, "reset": "zero"}],
}
SPIKING_TIME = {"dt": 1.0, "tau_m": 10.0, "tau_out": 5.0}


def test_every_registered_model_is_covered():
    assert set(model_names()) <= set(VARIANTS)


def _cases():
    for model, variants in VARIANTS.items():
        for kw in variants:
            yield pytest.param(model, kw, id=f"{model}-" + "-".join(f"{k}={v}" for k, v in kw.items()))


def _cell(model, kw, n=12):
    cls = cell_class(model)
    p = float_init(3, n, 2, 1.5, generator=torch.Generator().manual_seed(0), dtype=F64)
    p = p._replace(bias=0.1 * torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=F64))
    return cls(p, **({**SPIKING_TIME, **kw} if cls.spiking else kw))


def _state(cell, batch=3, seed=2):
    """A state near the threshold (the pseudo-derivative is not zero) with some spikes and adaptation."""
    g = torch.Generator().manual_seed(seed)
    state = cell.init_state(batch)
    obs = cell.observable(state)
    obs = 0.5 + 0.6 * torch.randn(obs.shape, generator=g, dtype=F64)
    if len(obs[0]) > cell.n_hidden:   # adaptation (spike counts, >= 0)
        obs[:, cell.n_hidden:] = obs[:, cell.n_hidden:].abs()
    state = cell.with_observable(state, obs)
    for name in ("z", "su", "sz"):
        if name in getattr(state, "_fields", ()):
            x = getattr(state, name)
            state = state._replace(**{name: (torch.rand(x.shape, generator=g, dtype=F64) > 0.6).to(F64)
                                      if name == "z" else torch.rand(x.shape, generator=g, dtype=F64)})
    return state


def _fd(f, x):
    """(B, out, in) finite-difference Jacobian of a batched function ``f(x)`` (B, in) -> (B, out)."""
    cols = []
    for i in range(x.shape[-1]):
        dx = torch.zeros_like(x)
        dx[:, i] = EPS
        cols.append((f(x + dx) - f(x - dx)) / (2 * EPS))
    return torch.stack(cols, dim=-1)


@pytest.mark.parametrize("model,kw", list(_cases()))
@torch.no_grad()
def test_jacobian_equals_finite_differences_of_the_step(model, kw):
    cell = _cell(model, kw)
    params, state = cell.params(), _state(cell)
    u = torch.rand(3, 3, generator=torch.Generator().manual_seed(3), dtype=F64)

    def after(st):
        return cell.observable(cell.step(params, st, u)[1])

    held = _fd(lambda obs: after(cell.with_observable(state, obs)), cell.observable(state))
    expected = held
    if cell.spiking:   # the path through the spikes z_{t-1} the step reads
        through_z = _fd(lambda z: after(state._replace(z=z)), state.z)            # (B, K N, N)
        d = cell.local_derivatives(params, state, u)
        dz = torch.cat([torch.diag_embed(torch.as_tensor(s, dtype=F64).expand_as(state.z)) for s in d.spike],
                       dim=-1)                                                    # (B, N, K N)
        expected = held + through_z @ dz
        assert float(dz.abs().max()) > 0.05, "the state must sit where the pseudo-derivative is not zero"
    jac = cell.jacobian(params, state, u)
    assert jac.shape == expected.shape
    assert float((jac - expected).abs().max()) < 1e-8
    q = torch.randn(3, jac.shape[-1], 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert float((cell.jacobian_apply(params, state, u, q) - jac @ q).abs().max()) < 1e-12


@pytest.mark.parametrize("model,kw", list(_cases()))
@torch.no_grad()
def test_eprop_uses_the_same_local_derivatives(model, kw):
    """e-prop's leak and postsynaptic factor are the local derivatives' (its transition drops the reset and
    W_rec): the factorised presynaptic trace decays with D^{00} (RFLO's full trace with it), and the
    postsynaptic factor is d z_t / d h_t^0 at the new state (RFLO: d h_t / d I_t)."""
    cell = _cell(model, kw)
    params, state = cell.params(), _state(cell)
    u = torch.rand(3, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    new = cell.step(params, state, u)[1]
    leak = cell.eprop_transition(cell.local_derivatives(params, state, u))[0][0]
    spec, f = cell.trace_spec(), cell.local_factors(params, state, new, u)
    if spec.pre_decay == 0.0:   # RFLO: the decay lives in the full trace, the slope in the postsynaptic factor
        assert float(leak) == pytest.approx(spec.elig_decay, abs=1e-15)
        expected_post = cell.local_derivatives(params, state, u).current[0]
    else:
        assert float(torch.as_tensor(leak).max()) == pytest.approx(spec.pre_decay, abs=1e-15)
        assert float(torch.as_tensor(leak).min()) == pytest.approx(spec.pre_decay, abs=1e-15)
        expected_post = cell.local_derivatives(params, new, u).spike[0]
    assert torch.equal(torch.as_tensor(f.post).expand_as(new.z if cell.spiking else new.x),
                       torch.as_tensor(expected_post).expand_as(new.z if cell.spiking else new.x))
