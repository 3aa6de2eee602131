"""Recurrent LIF network in the e-prop convention (Bellec et al. 2020, Nat. Commun. 11:3625).

The pseudo-derivative is defined once, in :func:`pseudo_derivative`; the autograd spike function and the
online e-prop rule both call it.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch

from neuroinit.cells.base import CellParams, LocalDerivatives, LocalFactors, RecurrentCell, TraceSpec, readout
from neuroinit.cells.registry import register
from neuroinit.profiles import HardwareProfile

__all__ = ["COMPARES", "LIFRNN", "RESETS", "LIFState", "LIFSynState", "lif_step", "pseudo_derivative", "spike"]

RESETS = ("subtract", "zero")
COMPARES = (">", ">=")


class LIFState(NamedTuple):
    """``v`` membrane (B, N); ``z`` spikes of the last step (B, N); ``ref`` refractory steps left (B, N);
    ``y`` leaky readout (B, O)."""

    v: torch.Tensor
    z: torch.Tensor
    ref: torch.Tensor
    y: torch.Tensor


class LIFSynState(NamedTuple):
    """:class:`LIFState` of a cell with a synaptic current (``tau_syn``), plus the synaptically filtered input
    ``su`` (B, I) and spikes ``sz`` (B, N): the current is ``I = W_in su + W_rec sz``."""

    v: torch.Tensor
    z: torch.Tensor
    ref: torch.Tensor
    y: torch.Tensor
    su: torch.Tensor
    sz: torch.Tensor


def pseudo_derivative(v: torch.Tensor, v_th: torch.Tensor | float, gamma: torch.Tensor | float
                      ) -> torch.Tensor:
    """``psi = (gamma / v_th) * max(0, 1 - |v - v_th| / v_th)`` (Bellec et al. 2020, Methods; gamma = 0.3)."""
    return (gamma / v_th) * torch.clamp(1.0 - torch.abs(v - v_th) / v_th, min=0.0)


class _Spike(torch.autograd.Function):
    """Heaviside forward (``v > v_th``, or ``v >= v_th`` with ``at_threshold``; with ``max_spikes > 1`` the
    spike count of :func:`spike`), :func:`pseudo_derivative` backward."""

    @staticmethod
    def forward(ctx, v, v_th, gamma, at_threshold=False, max_spikes=1):
        ctx.save_for_backward(v, v_th, gamma)
        if max_spikes == 1:
            return (v >= v_th if at_threshold else v > v_th).to(v.dtype)
        n = torch.floor(v / v_th) if at_threshold else torch.ceil(v / v_th) - 1
        return torch.clamp(n, min=0, max=max_spikes)

    @staticmethod
    def backward(ctx, grad):
        v, v_th, gamma = ctx.saved_tensors
        return grad * pseudo_derivative(v, v_th, gamma), None, None, None, None


def spike(v: torch.Tensor, v_th: torch.Tensor | float, gamma: torch.Tensor | float, compare: str = ">",
          max_spikes: int = 1) -> torch.Tensor:
    """``z = H(v - v_th)`` (``compare = ">"``; ``">="`` spikes at ``v = v_th`` too, as Xylo) with the
    pseudo-derivative as its gradient. ``max_spikes > 1``: the spike count of a chip that emits several spikes
    per step, ``min(floor(v / v_th), max_spikes)`` (``>=``; ``ceil(v / v_th) - 1`` for ``>``), 0 below the
    threshold (xylosim: 31). ``v_th`` and ``gamma`` may be floats (as :func:`lif_step`'s other constants may):
    autograd can only save tensors, so they are made tensors here."""
    v_th = torch.as_tensor(v_th, dtype=v.dtype, device=v.device)
    gamma = torch.as_tensor(gamma, dtype=v.dtype, device=v.device)
    if compare == ">" and max_spikes == 1:
        return _Spike.apply(v, v_th, gamma)
    return _Spike.apply(v, v_th, gamma, compare == ">=", max_spikes)


def lif_step(p: CellParams, s: LIFState | LIFSynState, u: torch.Tensor, *, alpha, kappa, v_th, gamma,
             reset: str = "subtract", n_refractory: int = 0, eprop_detach: bool = False,
             feedback: torch.Tensor | None = None, beta_syn=None, compare: str = ">", max_spikes: int = 1,
             reset_leaks: bool = False) -> tuple[torch.Tensor, LIFState | LIFSynState]:
    """One step of the e-prop LIF network, ``alpha = exp(-dt/tau_m)``, ``kappa = exp(-dt/tau_out)``::

        v_t = alpha v_{t-1} + W_rec z_{t-1} + W_in u_t + b - z_{t-1} v_th        (reset by subtraction)
        v_t = alpha v_{t-1} (1 - z_{t-1}) + W_rec z_{t-1} + W_in u_t + b         (reset to zero)
        z_t = H(v_t - v_th), forced to 0 while refractory (n_refractory steps after a spike)
        y_t = kappa y_{t-1} + W_out z_t + b_out

    With a synaptic current (``beta_syn = exp(-dt/tau_syn)``, Xylo's ``I += in; I -= I >> dash_syn``) the
    input reaches v through ``I_t = beta (I_{t-1} + W_in u_t + W_rec z_{t-1})``, kept as the filtered
    presynaptic signals ``su_t = beta (su_{t-1} + u_t)``, ``sz_t = beta (sz_{t-1} + z_{t-1})``::

        v_t = alpha v_{t-1} - reset + W_rec sz_t + W_in su_t + b

    ``compare = ">="`` spikes at ``v_t >= v_th`` (Xylo). ``max_spikes > 1``: ``z_t`` is a spike count
    (:func:`spike`), subtracted as ``z_{t-1} v_th`` and sent through ``W_rec`` and ``W_out`` multiplied (Xylo).
    ``reset_leaks``: the subtracted threshold leaks with the membrane, ``alpha (v_{t-1} - z_{t-1} v_th)``, as on
    a chip that subtracts at once after spiking (Xylo). With ``eprop_detach`` the spikes entering ``W_rec``
    (and ``sz``) and the reset are detached (autograd e-prop, as in Bellec et al.'s code), leaving the leak path
    ``alpha`` as the only temporal gradient path.
    """
    z_prev = s.z.detach() if eprop_detach else s.z
    if reset == "subtract":
        reset_term = z_prev * v_th if not reset_leaks else alpha * (z_prev * v_th)
    elif reset == "zero":
        # alpha v (1 - z) written as a subtraction, so that e-prop's detach leaves the leak path at alpha
        kept = (alpha * s.v).detach() if eprop_detach else alpha * s.v
        reset_term = (z_prev if max_spikes == 1 else torch.clamp(z_prev, max=1.0)) * kept
    else:
        raise ValueError(f"Invalid reset {reset!r}: allowed {', '.join(RESETS)}")
    # leak and reset first: alpha v - alpha v is exactly 0, so a reset membrane restarts from exactly 0 (as chips
    # and NIR importers do) and a sum of grid weights that lands on v_th compares exactly (no rounding residue)
    su = sz = None
    if beta_syn is None:
        v = (alpha * s.v - reset_term) + z_prev @ p.w_rec.T + u @ p.w_in.T + p.bias
    else:
        su = beta_syn * (s.su + u)
        sz = beta_syn * (s.sz + z_prev)
        v = (alpha * s.v - reset_term) + sz @ p.w_rec.T + su @ p.w_in.T + p.bias
    if n_refractory > 0:
        free = (s.ref <= 0).to(v.dtype)
        z = spike(v, v_th, gamma, compare, max_spikes) * free
        ref = torch.where(z > 0, torch.full_like(s.ref, n_refractory), torch.clamp(s.ref - 1, min=0))
    else:
        z = spike(v, v_th, gamma, compare, max_spikes)
        ref = s.ref
    y = kappa * s.y + readout(z, p.w_out, p.b_out, feedback)
    if beta_syn is None:
        return y, LIFState(v, z, ref, y)
    return y, LIFSynState(v, z, ref, y, su, sz)


class LIFRNN(RecurrentCell):
    """Recurrent LIF network with a leaky readout; constants are buffers.

    ``dt``, ``tau_m`` and ``tau_out`` are in ms; ``alpha = exp(-dt/tau_m)``, ``kappa = exp(-dt/tau_out)``.
    Chip neuron options (:func:`lif_step`; defaults: the float LIF): ``tau_syn`` (ms) adds a synaptic current
    with ``beta_syn = exp(-dt/tau_syn)`` (Xylo; ``tau_syn = dt / ln 2`` is Xylo's fastest, dash_syn = 1), and
    ``threshold_compare = ">="`` spikes at the threshold (Xylo), ``max_spikes`` emits spike counts up to that
    many per step and ``reset_leaks`` lets the subtracted threshold leak (Xylo: 31 and True).
    :meth:`neuron_options` reads them from a profile's ``[neuron]`` section.
    """

    model = "lif"
    spiking = True
    state_type = LIFState
    kernel_id = "lif"
    export_mapping = "lif"
    # Romo: the task's tau = 20 ms, dt = 5 ms = 0.25 tau, membrane tau_m = 100 ms = 5 tau, readout tau_out = 20 ms,
    #   inputs x 2. With tau_m = tau the LIF net (no adaptation) cannot hold f1 through the gap and e-prop's
    #   eligibility trace (which decays with tau_m) cannot bridge it: it learned nothing but the mean output (N = 64,
    #   200 iterations, accuracy 0.49); tau_m = 5 tau learned (0.96 e-prop, 0.99 BPTT). docs/training.md.
    # neurogym: dt = 20 ms (neurogym's periods are multiples of dt), tau_m = tau_out = 100 ms.
    task_defaults: ClassVar[dict[str, dict]] = {"romo": {"dt_ms": 5.0, "tau_ms": 20.0, "tau_m_ms": 100.0, "tau_out_ms": 20.0,
                              "input_scale": 2.0},
                     "neurogym": {"dt_ms": 20.0, "tau_ms": None, "tau_m_ms": 100.0, "tau_out_ms": 100.0,
                                  "input_scale": 2.0}}

    def __init__(self, params: CellParams, *, dt: float = 1.0, tau_m: float = 20.0, tau_out: float = 20.0,
                 v_th: float = 1.0, gamma: float = 0.3, reset: str = "subtract", n_refractory: int = 0,
                 profile: HardwareProfile | str | None = None, quantised_forward: bool = True,
                 remove_autapses: bool = True, tau_syn: float | None = None, threshold_compare: str = ">",
                 max_spikes: int = 1, reset_leaks: bool = False) -> None:
        for name, val in (("dt", dt), ("tau_m", tau_m), ("tau_out", tau_out), ("v_th", v_th)):
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise ValueError(f"Invalid {name} {val!r}: must be a positive finite number")
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"Invalid gamma {gamma!r}: must be a finite number >= 0 (Bellec et al.: 0.3)")
        if reset not in RESETS:
            raise ValueError(f"Invalid reset {reset!r}: allowed {', '.join(RESETS)}")
        if not (isinstance(n_refractory, int) and n_refractory >= 0):
            raise ValueError(f"Invalid n_refractory {n_refractory!r}: allowed integers >= 0")
        if tau_syn is not None and not (isinstance(tau_syn, (int, float)) and math.isfinite(tau_syn) and tau_syn > 0):
            raise ValueError(f"Invalid tau_syn {tau_syn!r}: must be a positive finite number (ms) or None (no "
                             "synaptic current)")
        if threshold_compare not in COMPARES:
            raise ValueError(f"Invalid threshold_compare {threshold_compare!r}: allowed {', '.join(COMPARES)}")
        if not (isinstance(max_spikes, int) and not isinstance(max_spikes, bool) and 1 <= max_spikes <= 255):
            raise ValueError(f"Invalid max_spikes {max_spikes!r}: allowed integers 1..255 (1: binary spikes)")
        if reset_leaks is not True and reset_leaks is not False:
            raise ValueError(f"Invalid reset_leaks {reset_leaks!r}: allowed true or false")
        super().__init__(params, profile=profile, quantised_forward=quantised_forward,
                         remove_autapses=remove_autapses, threshold=v_th)
        dtype = params.w_rec.dtype
        self.register_buffer("alpha", torch.tensor(math.exp(-dt / tau_m), dtype=dtype))
        self.register_buffer("kappa", torch.tensor(math.exp(-dt / tau_out), dtype=dtype))
        self.register_buffer("v_th", torch.tensor(float(v_th), dtype=dtype))
        self.register_buffer("gamma", torch.tensor(float(gamma), dtype=dtype))
        self.dt, self.tau_m, self.tau_out = float(dt), float(tau_m), float(tau_out)
        self.reset = reset
        self.n_refractory = n_refractory
        self.tau_syn = None if tau_syn is None else float(tau_syn)
        self.threshold_compare = threshold_compare
        self.max_spikes = max_spikes
        self.reset_leaks = reset_leaks
        if tau_syn is not None:   # registered only when used: the default cell's buffers are unchanged
            self.register_buffer("beta_syn", torch.tensor(math.exp(-dt / tau_syn), dtype=dtype))

    @staticmethod
    def neuron_options(profile: HardwareProfile | str, dt: float, tau_syn: float | None = None, *,
                       tau_m: float | None = None, tau_out: float | None = None) -> dict:
        """The cell options a profile's ``[neuron]`` section asks for, so that what is trained is what deploys:
        ``threshold_compare``, ``max_spikes``, the chip's ``reset`` (with ``reset_leaks`` for a subtraction at
        once); for ``synapse = "current"`` ``tau_syn`` (default ``dt / ln 2``: beta = 0.5, the
        chip's fastest current, exactly dash_syn = 1); with a bit-shift decay, ``tau_m`` / ``tau_out`` (when
        given) and ``tau_syn`` moved to the nearest factor the chip realises, ``1 - 2^-dash``."""
        from neuroinit.profiles import load_profile

        prof = load_profile(profile)
        rules = prof.neuron
        out: dict = {"threshold_compare": rules.threshold_compare}
        if rules.max_spikes > 1:
            out["max_spikes"] = rules.max_spikes
        if rules.reset != "as-trained":   # the chip's reset, at once: a subtracted threshold then leaks
            out["reset"] = rules.reset
            if rules.reset == "subtract":
                out["reset_leaks"] = True
        if rules.synapse == "current":
            out["tau_syn"] = float(tau_syn) if tau_syn is not None else dt / math.log(2.0)
        if prof.decay.kind == "shift":
            top = 2 ** prof.decay.bits - 1
            for name, tau in (("tau_m", tau_m), ("tau_out", tau_out), ("tau_syn", out.get("tau_syn"))):
                if tau is None:
                    continue
                dash = min(max(round(math.log2(1.0 / (1.0 - math.exp(-dt / tau)))), 1), top)
                out[name] = -dt / math.log(1.0 - 2.0 ** -dash)
        return out

    def extra_repr(self) -> str:
        return (f"n_in={self.n_in}, n_hidden={self.n_hidden}, n_out={self.n_out}, dt={self.dt:g}, "
                f"tau_m={self.tau_m:g}, tau_out={self.tau_out:g}, reset={self.reset}, "
                f"n_refractory={self.n_refractory}, profile={self.profile.name}"
                + (f", tau_syn={self.tau_syn:g}" if self.tau_syn is not None else "")
                + (f", threshold_compare={self.threshold_compare}" if self.threshold_compare != ">" else "")
                + (f", max_spikes={self.max_spikes}" if self.max_spikes != 1 else "")
                + (", reset_leaks=True" if self.reset_leaks else ""))

    def config(self) -> dict:
        """Constructor keyword arguments (JSON-able) that rebuild this cell from its params."""
        out = {"dt": self.dt, "tau_m": self.tau_m, "tau_out": self.tau_out, "v_th": float(self.v_th),
                "gamma": float(self.gamma), "reset": self.reset, "n_refractory": self.n_refractory,
                "profile": self.profile.name, "quantised_forward": self.quantised_forward,
                "remove_autapses": self.remove_autapses}
        # the chip neuron options only when set: default cells keep the config they always had
        if self.tau_syn is not None:
            out["tau_syn"] = self.tau_syn
        if self.threshold_compare != ">":
            out["threshold_compare"] = self.threshold_compare
        if self.max_spikes != 1:
            out["max_spikes"] = self.max_spikes
        if self.reset_leaks:
            out["reset_leaks"] = True
        return out

    def init_state(self, batch_size: int) -> LIFState:
        z = self.w_rec.new_zeros(batch_size, self.n_hidden)
        y = self.w_out.new_zeros(batch_size, self.n_out)
        if self.tau_syn is None:
            return LIFState(v=z, z=z.clone(), ref=z.clone(), y=y)
        return LIFSynState(v=z, z=z.clone(), ref=z.clone(), y=y, su=self.w_in.new_zeros(batch_size, self.n_in),
                           sz=z.clone())

    def step(self, params, state, u, *, eprop_detach=False, feedback=None):
        return lif_step(params, state, u, alpha=self.alpha, kappa=self.kappa, v_th=self.v_th,
                        gamma=self.gamma, reset=self.reset, n_refractory=self.n_refractory,
                        eprop_detach=eprop_detach, feedback=feedback,
                        beta_syn=self.beta_syn if self.tau_syn is not None else None,
                        compare=self.threshold_compare, max_spikes=self.max_spikes, reset_leaks=self.reset_leaks)

    @classmethod
    def train_kwargs(cls, settings, config, profile):
        out = {"dt": settings["dt_ms"], "tau_m": settings["tau_m_ms"], "tau_out": settings["tau_out_ms"],
               "v_th": config.v_th, "reset": config.reset, "n_refractory": config.n_refractory}
        if config.chip_neuron:   # what is trained is what deploys: the profile's neuron options
            out.update(cls.neuron_options(profile, settings["dt_ms"], config.tau_syn_ms,
                                          tau_m=settings["tau_m_ms"], tau_out=settings["tau_out_ms"]))
        return {**out, **config.cell_options}

    def observable(self, state: LIFState) -> torch.Tensor:
        return state.v

    def dt_over_tau(self) -> float:
        return self.dt / self.tau_m

    def _post(self, v: torch.Tensor, ref_before: torch.Tensor) -> torch.Tensor:
        psi = pseudo_derivative(v, self.v_th, self.gamma)
        if self.n_refractory > 0:
            psi = psi * (ref_before <= 0).to(psi.dtype)
        return psi

    def local_derivatives(self, params, state, u):
        """Surrogate derivatives of :func:`lif_step` taken from ``state``: ``spike = psi(v_{t-1})`` (the
        pseudo-derivative replaces the Heaviside's zero derivative: the "surrogate" spectrum, not the true one;
        refractoriness is ignored), ``decay = alpha``; the reset: ``-v_th psi`` by subtraction (``-alpha v_th psi``
        with ``reset_leaks``), ``-alpha z_{t-1} - alpha v_{t-1} psi`` to zero (the true derivative of
        ``alpha v (1 - z)``). So the Jacobian is ``alpha I + (W_rec - v_th I) diag(psi)`` (subtract) or
        ``diag(alpha (1 - z) - alpha v psi) + W_rec diag(psi)`` (zero), and e-prop's leak is ``alpha`` in both
        modes (its choice: the reset is dropped, as in Bellec et al.'s code). With a synaptic current this is the
        membrane block of the (v, I) Jacobian: a spike reaches v through one step of the current (``current =
        beta_syn``); the current's own memory is left out."""
        psi = pseudo_derivative(state.v, self.v_th, self.gamma)
        if self.reset == "subtract":
            reset = -(self.alpha if self.reset_leaks else 1.0) * self.v_th * psi
        else:
            z = state.z if self.max_spikes == 1 else torch.clamp(state.z, max=1.0)
            reset = -self.alpha * z - self.alpha * state.v * psi
        current = 1.0 if self.tau_syn is None else self.beta_syn
        return LocalDerivatives(decay=((self.alpha,),), spike=(psi,), spike_to=(0.0,), reset=((reset,),),
                                current=(current,))

    def trace_bounds(self) -> dict[str, float]:
        return {"post": float(self.gamma / self.v_th), "pre_rec": 1.0}

    def trace_spec(self) -> TraceSpec:
        a, k = float(self.alpha), float(self.kappa)
        # zbar <- alpha zbar + z_{t-1};  e <- kappa e + psi_t zbar  (kappa-filtered for the leaky readout)
        return TraceSpec(pre_decay=a, pre_gain=1.0, elig_decay=k, readout_decay=k)

    def local_factors(self, params, prev, new, u):
        if self.tau_syn is not None:   # v sees the synaptically filtered spikes and inputs
            return LocalFactors(pre_rec=new.sz, pre_in=new.su, post=self._post(new.v, prev.ref), readout_in=new.z)
        return LocalFactors(pre_rec=prev.z, pre_in=u, post=self._post(new.v, prev.ref), readout_in=new.z)


register(LIFRNN)
