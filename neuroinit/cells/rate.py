"""Leaky rate RNN in two forms: voltage form (Schuessler et al. 2020, default) and rate form (Murray 2019, RFLO).

Pure step functions over :class:`~neuroinit.cells.base.CellParams` and :class:`RateState`, and the thin module
:class:`RateRNN` that holds parameters and the constant ``alpha = dt / tau`` as a buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from neuroinit.cells.base import CellParams, LocalDerivatives, LocalFactors, RecurrentCell, TraceSpec, readout
from neuroinit.cells.registry import register
from neuroinit.profiles import HardwareProfile

__all__ = ["RateState", "Activation", "ACTIVATIONS", "rate_step", "RateRNN"]


class RateState(NamedTuple):
    """``x``: (B, N) voltages (voltage form) or rates ``h`` (rate form)."""

    x: torch.Tensor


class Activation(NamedTuple):
    f: Callable[[torch.Tensor], torch.Tensor]
    df: Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# "linear" (f(x) = x) is for closed-form checks: a linear network's impulse response is a matrix power and its
# Lyapunov spectrum is log|eig((1-alpha) I + alpha W_rec)| for any gain (science.md section 3).
ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation(torch.tanh, lambda x: 1.0 - torch.tanh(x) ** 2),
    "linear": Activation(_identity, torch.ones_like),
    "relu": Activation(torch.relu, lambda x: (x > 0).to(x.dtype)),
    "softplus": Activation(F.softplus, torch.sigmoid),
}
FORMS = ("voltage", "rate")


def rate_step(p: CellParams, s: RateState, u: torch.Tensor, *, alpha: torch.Tensor | float,
              activation: Activation, form: str = "voltage", eprop_detach: bool = False,
              feedback: torch.Tensor | None = None) -> tuple[torch.Tensor, RateState]:
    """One Euler step of a leaky rate network, ``alpha = dt / tau``.

    voltage form: ``x_t = (1-alpha) x_{t-1} + alpha (W_rec f(x_{t-1}) + W_in u_t + b)``, ``y_t = W_out f(x_t) + b_out``
    rate form:    ``h_t = (1-alpha) h_{t-1} + alpha f(W_rec h_{t-1} + W_in u_t + b)``, ``y_t = W_out h_t + b_out``

    Sources: Schuessler et al. 2020 (voltage form), Murray 2019 eLife (rate form, RFLO). With
    ``eprop_detach`` the presynaptic state entering ``W_rec`` is detached (autograd e-prop); the leak path keeps
    its gradient; ``feedback`` is passed to :func:`~neuroinit.cells.base.readout`. Leading member dimensions
    work too (an ensemble of K networks: weights (K, out, in), vectors (K, 1, n), state and input (K, B, n)).
    """
    if form == "voltage":
        r = activation.f(s.x)
        r_rec = r.detach() if eprop_detach else r
        x = (1 - alpha) * s.x + alpha * (r_rec @ p.w_rec.mT + u @ p.w_in.mT + p.bias)
        y = readout(activation.f(x), p.w_out, p.b_out, feedback)
    elif form == "rate":
        h_rec = s.x.detach() if eprop_detach else s.x
        x = (1 - alpha) * s.x + alpha * activation.f(h_rec @ p.w_rec.mT + u @ p.w_in.mT + p.bias)
        y = readout(x, p.w_out, p.b_out, feedback)
    else:
        raise ValueError(f"Invalid form {form!r}: allowed {', '.join(FORMS)}")
    return y, RateState(x)


class RateRNN(RecurrentCell):
    """Leaky rate RNN (``form='voltage'`` or ``'rate'``) with a linear readout.

    ``alpha`` is a buffer, so ``.to()``, ``.double()`` and ``state_dict()`` carry it.
    """

    model = "rate"
    spiking = False
    state_type = RateState
    kernel_id = "rate"
    # rate:     tau = 100 ms (ours; Romo is defined in units of tau), dt = 0.5 tau (Schuessler et al. 2020).
    # neurogym: dt = 20 ms, tau = 100 ms (alpha = 0.2 < 1, so e-prop is not one-step BPTT; science.md 6.2).
    task_defaults: ClassVar[dict[str, dict]] = {"romo": {"dt_ms": 50.0, "tau_ms": 100.0, "input_scale": 1.0},
                     "neurogym": {"dt_ms": 20.0, "tau_ms": 100.0, "input_scale": 1.0}}

    def __init__(self, params: CellParams, *, alpha: float = 0.5, activation: str = "tanh",
                 form: str = "voltage", profile: HardwareProfile | str | None = None,
                 quantised_forward: bool = True, remove_autapses: bool = True) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Invalid alpha {alpha!r}: allowed 0 < alpha <= 1 (alpha = dt / tau)")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Invalid activation {activation!r}: allowed {', '.join(ACTIVATIONS)}")
        if form not in FORMS:
            raise ValueError(f"Invalid form {form!r}: allowed {', '.join(FORMS)}")
        super().__init__(params, profile=profile, quantised_forward=quantised_forward,
                         remove_autapses=remove_autapses)
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=params.w_rec.dtype))
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.form = form

    def extra_repr(self) -> str:
        return (f"n_in={self.n_in}, n_hidden={self.n_hidden}, n_out={self.n_out}, form={self.form}, "
                f"activation={self.activation_name}, alpha={float(self.alpha):g}, profile={self.profile.name}")

    def config(self) -> dict:
        """Constructor keyword arguments (JSON-able) that rebuild this cell from its params."""
        return {"alpha": float(self.alpha), "activation": self.activation_name, "form": self.form,
                "profile": self.profile.name, "quantised_forward": self.quantised_forward,
                "remove_autapses": self.remove_autapses}

    def init_state(self, batch_size: int) -> RateState:
        return RateState(self.w_rec.new_zeros(batch_size, self.n_hidden))

    def step(self, params, state, u, *, eprop_detach=False, feedback=None):
        return rate_step(params, state, u, alpha=self.alpha, activation=self.activation, form=self.form,
                         eprop_detach=eprop_detach, feedback=feedback)

    @classmethod
    def derived_settings(cls, settings, config):
        return {"alpha": settings["dt_ms"] / settings["tau_ms"],
                "form": config.form or ("rate" if config.rule == "rflo" else "voltage")}

    @classmethod
    def train_kwargs(cls, settings, config, profile):
        return {"alpha": settings["alpha"], "activation": config.activation, "form": settings["form"],
                **config.cell_options}

    def observable(self, state: RateState) -> torch.Tensor:
        return state.x

    def dt_over_tau(self) -> float:
        return float(self.alpha)

    def _pre_activation(self, p: CellParams, prev: RateState, u: torch.Tensor) -> torch.Tensor:
        return prev.x @ p.w_rec.mT + u @ p.w_in.mT + p.bias

    def local_derivatives(self, params, state, u):
        """Exact derivatives (no spikes; the "spike" is the rate that enters ``W_rec``). voltage form: ``r =
        f(x_{t-1})``, so ``spike = f'(x_{t-1})``, ``current = alpha``; rate form: ``r = h_{t-1}`` (``spike = 1``)
        and ``current = alpha f'(a_t)``, ``a_t`` the pre-activation. Both: ``decay = 1 - alpha``. The Jacobian
        is ``(1-alpha) I + alpha W_rec diag(f'(x_{t-1}))`` (voltage) or ``(1-alpha) I + alpha diag(f'(a_t))
        W_rec`` (rate)."""
        a = self.alpha
        if self.form == "voltage":
            return LocalDerivatives(decay=((1 - a,),), spike=(self.activation.df(state.x),), spike_to=(0.0,),
                                    reset=((0.0,),), current=(a,))
        slope = self.activation.df(self._pre_activation(params, state, u))
        return LocalDerivatives(decay=((1 - a,),), spike=(1.0,), spike_to=(0.0,), reset=((0.0,),),
                                current=(a * slope,))

    def trace_spec(self) -> TraceSpec:
        a = float(self.alpha)
        if self.form == "voltage":
            # rbar <- (1-a) rbar + a f(x_{t-1});  e = f'(x_t) rbar   (factorised, O(B N))
            return TraceSpec(pre_decay=1 - a, pre_gain=a, elig_decay=0.0, readout_decay=0.0)
        # P <- (1-a) P + a f'(a_t) h_{t-1}   (RFLO, O(B N^2))
        return TraceSpec(pre_decay=0.0, pre_gain=1.0, elig_decay=1 - a, readout_decay=0.0)

    def local_factors(self, params, prev, new, u):
        f = self.activation
        if self.form == "voltage":
            return LocalFactors(pre_rec=f.f(prev.x), pre_in=u, post=f.df(new.x), readout_in=f.f(new.x))
        post = self.alpha * f.df(self._pre_activation(params, prev, u))
        return LocalFactors(pre_rec=prev.x, pre_in=u, post=post, readout_in=new.x)


register(RateRNN)
