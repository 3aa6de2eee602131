"""Adaptive LIF (ALIF) network: LIF neurons whose threshold rises with each spike and relaxes with its own time
constant (Bellec et al. 2018, "Long short-term memory and learning-to-learn in networks of spiking neurons" (LSNN);
Bellec et al. 2020, Nat. Commun. 11:3625, Methods "ALIF"), trained by e-prop with two eligibility components.

Everything about the model is in this file: the step, its local derivatives (used by the Lyapunov Jacobian and by
e-prop), the e-prop factors and the registration.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch

from neuroinit.cells.base import CellParams, LocalDerivatives, LocalFactors, RecurrentCell, TraceSpec, readout
from neuroinit.cells.lif import LIFRNN, RESETS, pseudo_derivative, spike
from neuroinit.cells.registry import register
from neuroinit.profiles import HardwareProfile

__all__ = ["ALIFRNN", "ALIFState", "alif_step"]


class ALIFState(NamedTuple):
    """``v`` membrane (B, N); ``z`` spikes of the last step (B, N); ``a`` threshold adaptation (B, N), in spikes;
    ``y`` leaky readout (B, O)."""

    v: torch.Tensor
    z: torch.Tensor
    a: torch.Tensor
    y: torch.Tensor


def alif_step(p: CellParams, s: ALIFState, u: torch.Tensor, *, alpha, rho, kappa, v_th, beta, gamma,
              reset: str = "subtract", eprop_detach: bool = False, feedback: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, ALIFState]:
    """One step of the ALIF network, ``alpha = exp(-dt/tau_m)``, ``rho = exp(-dt/tau_a)``, ``kappa =
    exp(-dt/tau_out)`` (Bellec et al. 2020, Methods, with the reset by subtraction of their code)::

        a_t = rho a_{t-1} + z_{t-1}                                        (adaptation)
        v_t = alpha v_{t-1} + W_rec z_{t-1} + W_in u_t + b - z_{t-1} v_th  (reset by subtraction)
        v_t = alpha v_{t-1} (1 - z_{t-1}) + W_rec z_{t-1} + W_in u_t + b   (reset to zero, as norse's LSNN)
        A_t = v_th + beta a_t                                              (adaptive threshold)
        z_t = H(v_t - A_t),  pseudo-derivative psi_t = gamma / v_th max(0, 1 - |v_t - A_t| / v_th)
        y_t = kappa y_{t-1} + W_out z_t + b_out

    ``z_t = spike(v_t - beta a_t, v_th, gamma)``, so the pseudo-derivative is LIF's (one definition,
    :func:`~neuroinit.cells.lif.pseudo_derivative`) at ``v - beta a``. With ``eprop_detach`` the spikes entering
    ``W_rec`` and the reset are detached (autograd e-prop); the neuron's own paths (leak, and the spike entering
    its adaptation) keep their gradient: they are e-prop's two eligibility components.
    """
    z_prev = s.z.detach() if eprop_detach else s.z
    a = rho * s.a + s.z
    if reset == "subtract":
        reset_term = z_prev * v_th
    elif reset == "zero":   # alpha v (1 - z) as a subtraction: e-prop's detach leaves the leak at alpha (as LIF)
        reset_term = z_prev * ((alpha * s.v).detach() if eprop_detach else alpha * s.v)
    else:
        raise ValueError(f"Invalid reset {reset!r}: allowed {', '.join(RESETS)}")
    v = (alpha * s.v - reset_term) + z_prev @ p.w_rec.T + u @ p.w_in.T + p.bias
    z = spike(v - beta * a, v_th, gamma)
    y = kappa * s.y + readout(z, p.w_out, p.b_out, feedback)
    return y, ALIFState(v, z, a, y)


def _positive(name: str, val) -> None:
    if isinstance(val, bool) or not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
        raise ValueError(f"Invalid {name} {val!r}: must be a positive finite number")


@register
class ALIFRNN(RecurrentCell):
    """Recurrent ALIF network with a leaky readout; constants are buffers.

    ``dt``, ``tau_m``, ``tau_out`` and ``tau_a`` are in ms; ``beta`` (>= 0, in units of the membrane) is the
    threshold increase per spike before it relaxes with ``tau_a`` (defaults ours: 0.1 v_th per spike, tau_a =
    200 ms). ``beta = 0`` is :class:`~neuroinit.cells.lif.LIFRNN` with the same reset exactly. Refractoriness is
    not implemented (``n_refractory`` is accepted so that a run's LIF option is checked, not ignored). No fused
    kernel (the fast path falls back to PyTorch) and no
    export mapping (NIR, netx and Xylo have no adaptive threshold).
    """

    model = "alif"
    spiking = True
    state_type = ALIFState
    eligibility_components = 2
    task_defaults: ClassVar[dict[str, dict]] = LIFRNN.task_defaults   # LIF's run settings (beta = 0 is LIF)

    def __init__(self, params: CellParams, *, dt: float = 1.0, tau_m: float = 20.0, tau_out: float = 20.0,
                 tau_a: float = 200.0, beta: float = 0.1, v_th: float = 1.0, gamma: float = 0.3,
                 reset: str = "subtract", n_refractory: int = 0, profile: HardwareProfile | str | None = None,
                 quantised_forward: bool = True, remove_autapses: bool = True) -> None:
        for name, val in (("dt", dt), ("tau_m", tau_m), ("tau_out", tau_out), ("tau_a", tau_a), ("v_th", v_th)):
            _positive(name, val)
        for name, val in (("beta", beta), ("gamma", gamma)):
            if isinstance(val, bool) or not (isinstance(val, (int, float)) and math.isfinite(val) and val >= 0):
                raise ValueError(f"Invalid {name} {val!r}: must be a finite number >= 0")
        if reset not in RESETS:
            raise ValueError(f"Invalid reset {reset!r} for model 'alif': allowed {', '.join(RESETS)}")
        if n_refractory != 0 or isinstance(n_refractory, bool):
            raise ValueError(f"Invalid n_refractory {n_refractory!r} for model 'alif': allowed 0")
        super().__init__(params, profile=profile, quantised_forward=quantised_forward,
                         remove_autapses=remove_autapses, threshold=v_th)
        dtype = params.w_rec.dtype
        for name, val in (("alpha", math.exp(-dt / tau_m)), ("rho", math.exp(-dt / tau_a)),
                          ("kappa", math.exp(-dt / tau_out)), ("v_th", v_th), ("beta", beta), ("gamma", gamma)):
            self.register_buffer(name, torch.tensor(float(val), dtype=dtype))
        self.dt, self.tau_m, self.tau_out, self.tau_a = float(dt), float(tau_m), float(tau_out), float(tau_a)
        self.reset = reset

    @classmethod
    def train_kwargs(cls, settings, config, profile):
        return {"dt": settings["dt_ms"], "tau_m": settings["tau_m_ms"], "tau_out": settings["tau_out_ms"],
                "v_th": config.v_th, "reset": config.reset, "n_refractory": config.n_refractory,
                **config.cell_options}

    def extra_repr(self) -> str:
        return (f"n_in={self.n_in}, n_hidden={self.n_hidden}, n_out={self.n_out}, dt={self.dt:g}, "
                f"tau_m={self.tau_m:g}, tau_out={self.tau_out:g}, tau_a={self.tau_a:g}, "
                f"beta={float(self.beta):g}, reset={self.reset}, profile={self.profile.name}")

    def config(self) -> dict:
        return {"dt": self.dt, "tau_m": self.tau_m, "tau_out": self.tau_out, "tau_a": self.tau_a,
                "beta": float(self.beta), "v_th": float(self.v_th), "gamma": float(self.gamma), "reset": self.reset,
                "profile": self.profile.name, "quantised_forward": self.quantised_forward,
                "remove_autapses": self.remove_autapses}

    def init_state(self, batch_size: int) -> ALIFState:
        z = self.w_rec.new_zeros(batch_size, self.n_hidden)
        return ALIFState(v=z, z=z.clone(), a=z.clone(), y=self.w_out.new_zeros(batch_size, self.n_out))

    def step(self, params, state, u, *, eprop_detach=False, feedback=None):
        return alif_step(params, state, u, alpha=self.alpha, rho=self.rho, kappa=self.kappa, v_th=self.v_th,
                         beta=self.beta, gamma=self.gamma, reset=self.reset, eprop_detach=eprop_detach,
                         feedback=feedback)

    # ------------------------------------------------------------------ analysis: the state is (v, a)
    def observable(self, state: ALIFState) -> torch.Tensor:
        return torch.cat([state.v, state.a], dim=-1)

    def with_observable(self, state: ALIFState, obs: torch.Tensor) -> ALIFState:
        v, a = obs.split(self.n_hidden, dim=-1)
        return state._replace(v=v, a=a)

    def dt_over_tau(self) -> float:
        return self.dt / self.tau_m

    def local_derivatives(self, params, state, u):
        """Surrogate derivatives of :func:`alif_step` taken from ``state`` (h = (v, a); ``psi`` of the step
        that emitted ``z_{t-1}``, at ``v_{t-1} - beta a_{t-1}``)::

            d z / d(v, a) = (psi, -beta psi)        decay = [[alpha, 0], [0, rho]]   spike_to = (0, 1)
            reset         = [[-v_th psi, v_th beta psi], [0, 0]]                      current  = (1, 0)

        (reset to zero: ``reset = [[-alpha z - alpha v psi, alpha v beta psi], [0, 0]]``, the derivative of
        ``-alpha v z``). e-prop's transition is ``[[alpha, 0], [psi, rho - beta psi]]`` in both modes (Bellec et
        al. 2020, Methods: the reset is dropped)."""
        psi = pseudo_derivative(state.v - self.beta * state.a, self.v_th, self.gamma)
        spike_a = -self.beta * psi
        if self.reset == "subtract":   # -z v_th
            reset = ((-self.v_th * psi, -self.v_th * spike_a), (0.0, 0.0))
        else:                          # -alpha v z
            kept = self.alpha * state.v
            reset = ((-self.alpha * state.z - kept * psi, -kept * spike_a), (0.0, 0.0))
        return LocalDerivatives(decay=((self.alpha, 0.0), (0.0, self.rho)), spike=(psi, spike_a),
                                spike_to=(0.0, 1.0), reset=reset, current=(1.0, 0.0))

    # ------------------------------------------------------------------ e-prop
    def trace_spec(self) -> TraceSpec:
        a, k = float(self.alpha), float(self.kappa)
        # eps_v <- alpha eps_v + z_{t-1} (factorised), e filtered by kappa for the leaky readout (as LIF)
        return TraceSpec(pre_decay=a, pre_gain=1.0, elig_decay=k, readout_decay=k)

    def local_factors(self, params, prev, new, u):
        """Two components (Bellec et al. 2020, Methods, e-prop for ALIF)::

            eps_v_t = alpha eps_v_{t-1} + z_{t-1}                               (presynaptic, factorised)
            eps_a_t = psi_{t-1} eps_v_{t-1} + (rho - beta psi_{t-1}) eps_a_{t-1}
            e_t     = psi_t (eps_v_t - beta eps_a_t)

        from e-prop's transition (:meth:`eprop_transition`) at the previous state and ``d z_t / d(v_t, a_t)``
        at the new one."""
        d = self.eprop_transition(self.local_derivatives(params, prev, u))
        psi, spike_a = self.local_derivatives(params, new, u).spike
        return LocalFactors(pre_rec=prev.z, pre_in=u, post=psi, readout_in=new.z, from_pre=(d[1][0],),
                            decay=((d[1][1],),), hidden_post=(spike_a,))

    def trace_bounds(self) -> dict:
        psi_max = float(self.gamma / self.v_th)
        hidden = psi_max / (1.0 - float(self.rho))   # |eps_a| <= psi_max |eps_v| / (1 - rho) when rho >= beta psi
        return {"post": psi_max * (1.0 + float(self.beta) * hidden), "pre_rec": 1.0, "hidden": (hidden,)}
