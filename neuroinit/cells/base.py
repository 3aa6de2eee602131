"""The recurrent-cell contract shared by every neuron model (rate, LIF, adaptive LIF, ...).

Everything that runs a network (learning rules, Lyapunov analysis, flossing, benchmarks, export, the CLI) goes
through :class:`RecurrentCell` and the registry (:mod:`neuroinit.cells.registry`) only, so a new neuron model is
one new file implementing it. A cell class declares what callers would otherwise guess: its registry name
(``model``), whether it spikes (``spiking``), its state type (``state_type``), its parameters and defaults (the
keyword arguments of its constructor, :meth:`RecurrentCell.config_section`, validated by the constructor), its run
settings per task (``task_defaults``, :meth:`RecurrentCell.train_kwargs`), its local derivatives
(:meth:`RecurrentCell.local_derivatives`, defined once and used by the Lyapunov Jacobian, flossing and e-prop),
its eligibility components (``eligibility_components``), the bounds of its traces for chip-precision learning
(:meth:`RecurrentCell.trace_bounds`), its fused-kernel id (``kernel_id``, or None) and its export mapping
(``export_mapping``, or None).

Conventions: sequences are time-major ``(T, B, features)``; weights are ``(out, in)`` like ``nn.Linear``;
a step is a pure function ``(params, state, u_t) -> (y_t, new_state)`` and always returns that pair.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from neuroinit.profiles import HardwareProfile, load_profile
from neuroinit.quantize import Grid, choose_grid, fake_quantize

__all__ = [
    "PARAM_NAMES",
    "QUANTISED_PARAMS",
    "CellParams",
    "LocalDerivatives",
    "LocalFactors",
    "RecurrentCell",
    "TraceSpec",
    "chip_grids",
    "readout",
]

PARAM_NAMES = ("w_in", "w_rec", "bias", "w_out", "b_out")
QUANTISED_PARAMS = ("w_in", "w_rec", "w_out")  # matrices that live in a chip's synapse memory


class _FeedbackReadout(torch.autograd.Function):
    """``r W^T + b`` whose gradient to ``r`` goes through a fixed feedback matrix ``B`` instead of ``W``."""

    @staticmethod
    def forward(ctx, r, w, b, feedback):
        ctx.save_for_backward(r, feedback)
        return r @ w.T + b

    @staticmethod
    def backward(ctx, grad):
        r, feedback = ctx.saved_tensors
        return grad @ feedback, grad.reshape(-1, grad.shape[-1]).T @ r.reshape(-1, r.shape[-1]), \
            grad.reshape(-1, grad.shape[-1]).sum(0), None


def readout(r: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
            feedback: torch.Tensor | None = None) -> torch.Tensor:
    """Linear readout ``r W_out^T + b_out``. With ``feedback`` (O, N), errors reach ``r`` through it instead
    of ``W_out`` (random feedback alignment, as in RFLO and random e-prop); the weights' own gradients are
    unchanged."""
    if feedback is None:
        return r @ w_out.mT + b_out
    return _FeedbackReadout.apply(r, w_out, b_out, feedback)


class CellParams(NamedTuple):
    """Parameters of every cell: input (N, I), recurrent (N, N), bias (N,), readout (O, N), readout bias (O,)."""

    w_in: torch.Tensor
    w_rec: torch.Tensor
    bias: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor


class TraceSpec(NamedTuple):
    """Constants of a cell's three-factor rule (see :mod:`neuroinit.learning.online`).

    presynaptic trace   ``pre <- pre_decay * pre + pre_gain * pre_input``
    eligibility trace   ``e <- elig_decay * e + post (x) pre``   (elig_decay = 0: e = post (x) pre, never stored)
    readout trace       ``r <- readout_decay * r + readout_input``
    """

    pre_decay: float
    pre_gain: float
    elig_decay: float
    readout_decay: float


class LocalFactors(NamedTuple):
    """What one step of a cell offers a local learning rule.

    ``pre_rec`` (B, N): presynaptic signal of the recurrent weights entering the trace at this step;
    ``pre_in`` (B, I): the same for the input weights; ``post`` (B, N): postsynaptic factor;
    ``readout_in`` (B, N): what the readout weights see at this step.

    Cells with more than one eligibility component (``eligibility_components = K > 1``, e.g. adaptive LIF) carry
    the K - 1 further components ``eps^k`` (k >= 1) per synapse, with the first component the factorised
    presynaptic trace ``eps^0 = pre`` (see :func:`neuroinit.learning.online.trace_step`)::

        eps^k_t = from_pre[k] * pre_{t-1} + sum_m decay[k][m] * eps^m_{t-1}      (k, m >= 1)
        e_t     = post * pre_t + sum_k hidden_post[k] * eps^k_t

    ``from_pre``, ``decay`` and ``hidden_post`` hold (B, N) tensors (or numbers), indexed from the component 1.
    """

    pre_rec: torch.Tensor
    pre_in: torch.Tensor
    post: torch.Tensor
    readout_in: torch.Tensor
    from_pre: tuple = ()
    decay: tuple = ()
    hidden_post: tuple = ()


class LocalDerivatives(NamedTuple):
    """Derivatives of one step ``h_{t-1} -> h_t`` of each neuron's own state ``h = (h^0, ..., h^{K-1})`` (the
    observable's K blocks, ``h^0`` the membrane or voltage), taken at the state the step starts from. Entries are
    (B, N) tensors or numbers; the nested ``decay[k][m]`` and ``reset[k][m]`` are K x K.

    ``decay[k][m]``  d h_t^k / d h_{t-1}^m through the neuron's own dynamics with its spike ``z_{t-1}`` held
                     (leak, adaptation decay), the reset excluded;
    ``spike[m]``     d z_{t-1} / d h_{t-1}^m: the pseudo-derivative (rate cells: the activation's slope);
    ``spike_to[k]``  d h_t^k / d z_{t-1} through the neuron's own dynamics other than the reset (adaptation);
    ``reset[k][m]``  d h_t^k / d h_{t-1}^m through the reset (via the spike and via the state it scales);
    ``current[k]``   d h_t^k / d I_t for the recurrent input ``I_t = W_rec z_{t-1}`` (how it enters h).

    The step Jacobian (:meth:`RecurrentCell.jacobian_apply`; Lyapunov analysis and flossing) is all of it::

        J^{km} = diag(decay[k][m] + spike_to[k] spike[m] + reset[k][m]) + diag(current[k]) W_rec diag(spike[m])

    e-prop's eligibility (Bellec et al. 2020, Methods) keeps only the neuron's own dynamics and drops the reset:
    ``D^{km} = decay[k][m] + spike_to[k] spike[m]`` (:meth:`RecurrentCell.eprop_transition`). That is an explicit
    choice of the rule, not a second Jacobian: autograd e-prop realises it by detaching the spikes where they
    enter ``W_rec`` and the reset (``eprop_detach``), so online and autograd e-prop agree to rounding.
    """

    decay: tuple
    spike: tuple
    spike_to: tuple
    reset: tuple
    current: tuple


def _col(x):
    """(B, N) -> (B, N, 1) so that it scales the rows of a (B, N, k) frame; numbers stay numbers."""
    return x[..., None] if isinstance(x, torch.Tensor) and x.dim() > 0 else x


class RecurrentCell(nn.Module, abc.ABC):
    """Abstract base of rate and spiking cells: parameters, chip weight grids and the step contract.

    Subclasses implement :meth:`step`, :meth:`init_state`, :meth:`observable`, :meth:`jacobian`,
    :meth:`trace_spec` and :meth:`local_factors`. ``params()`` returns the parameters the arithmetic uses:
    the float parameters, or (with a quantised profile and ``quantised_forward=True``) their fake-quantised
    values on the chip's grid with straight-through gradients.
    """

    model: ClassVar[str] = ""
    #: whether the neuron emits spikes (a threshold sets the weight scale at init, see :mod:`neuroinit.init`)
    spiking: ClassVar[bool] = False
    #: the NamedTuple type of :meth:`init_state`
    state_type: ClassVar[type] = tuple
    #: K, the state variables per neuron that the observable, the Jacobian and e-prop's traces follow
    eligibility_components: ClassVar[int] = 1
    #: id of the fused native kernel that runs this cell (:mod:`neuroinit.learning.fused`), or None
    kernel_id: ClassVar[str | None] = None
    #: the neuron model the exporters write (``"lif"``: NIR LIF / CubaLIF, netx, Xylo), or None: not exportable
    export_mapping: ClassVar[str | None] = None
    #: run settings by task kind (``"romo"``, ``"neurogym"``): ``dt_ms``, ``tau_ms`` (the task's time unit or
    #: the rate net's tau), ``input_scale`` and the model's own (e.g. ``tau_m_ms``); see :meth:`train_kwargs`
    task_defaults: ClassVar[dict[str, dict]] = {}

    def __init__(self, params: CellParams, *, profile: HardwareProfile | str | None = None,
                 quantised_forward: bool = True, remove_autapses: bool = True,
                 threshold: float | None = None) -> None:
        super().__init__()
        self._check_shapes(params)
        for name in PARAM_NAMES:
            setattr(self, name, nn.Parameter(getattr(params, name).detach().clone()))
        self.profile = load_profile(profile if profile is not None else "ideal")
        self.quantised_forward = quantised_forward
        self.remove_autapses = remove_autapses
        if remove_autapses:
            with torch.no_grad():
                self.w_rec.fill_diagonal_(0.0)
        # from the cell's own weights, removed autapses included, as hardware_init chooses them
        self.grids: dict[str, Grid | None] = chip_grids(self.float_params(), self.profile, threshold=threshold)

    @staticmethod
    def _check_shapes(p: CellParams) -> None:
        n = p.w_rec.shape[0]
        expect = {"w_rec": (n, n), "w_in": (n, p.w_in.shape[-1]), "bias": (n,),
                  "w_out": (p.w_out.shape[0], n), "b_out": (p.w_out.shape[0],)}
        for name, shape in expect.items():
            if tuple(getattr(p, name).shape) != shape:
                raise ValueError(f"Invalid shape of {name}: {tuple(getattr(p, name).shape)}, expected {shape}")

    @property
    def n_in(self) -> int:
        return self.w_in.shape[1]

    @property
    def n_hidden(self) -> int:
        return self.w_rec.shape[0]

    @property
    def n_out(self) -> int:
        return self.w_out.shape[0]

    def float_params(self) -> CellParams:
        return CellParams(*(getattr(self, n) for n in PARAM_NAMES))

    def params(self) -> CellParams:
        """Parameters as the forward arithmetic sees them (chip grid with straight-through gradients)."""
        p = self.float_params()
        if not self.quantised_forward or self.profile.weights.is_float:
            return p
        return p._replace(**{n: fake_quantize(getattr(p, n), self.grids[n]) for n in QUANTISED_PARAMS})

    def recurrent_mask(self) -> torch.Tensor | None:
        """Mask that keeps removed autapses at zero in gradients (None when autapses are allowed)."""
        if not self.remove_autapses:
            return None
        return 1.0 - torch.eye(self.n_hidden, dtype=self.w_rec.dtype, device=self.w_rec.device)

    # ------------------------------------------------------------------ declarations (class level)
    @classmethod
    def config_section(cls) -> dict:
        """The model's own parameters and their defaults: the keyword-only arguments of its constructor other
        than the ones every cell takes (profile, quantised_forward, remove_autapses)."""
        common = ("profile", "quantised_forward", "remove_autapses", "threshold")
        return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in common}

    @classmethod
    def derived_settings(cls, settings: dict, config: Any) -> dict:
        """Run settings computed from the picked ``task_defaults`` (e.g. a rate net's ``alpha = dt / tau``),
        stored with them in the run file."""
        return {}

    @classmethod
    def train_kwargs(cls, settings: dict, config: Any, profile: HardwareProfile) -> dict:
        """Constructor keyword arguments for a training run from its resolved ``settings``
        (:func:`neuroinit.experiments.train_config.resolve_settings`, which picks the keys of
        ``task_defaults``) and its ``config`` (``config.cell_options`` overrides them)."""
        return dict(config.cell_options)

    # ------------------------------------------------------------------ the contract
    @abc.abstractmethod
    def config(self) -> dict:
        """Constructor keyword arguments (JSON-able; the profile by name) that rebuild the cell with
        ``make_cell(cell.model, cell.float_params(), **cell.config())``."""

    @abc.abstractmethod
    def init_state(self, batch_size: int) -> Any:
        """Zero state for a batch, on the cell's dtype and device."""

    @abc.abstractmethod
    def step(self, params: CellParams, state: Any, u: torch.Tensor, *, eprop_detach: bool = False,
             feedback: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """One time step; returns ``(y_t, new_state)``. ``eprop_detach`` cuts the gradient where the state
        enters the recurrent weights (and the reset), keeping the leak path: autograd e-prop. ``feedback``
        (O, N) routes output errors to the hidden units through a fixed matrix (see :func:`readout`)."""

    @abc.abstractmethod
    def observable(self, state: Any) -> torch.Tensor:
        """The (B, K N) state whose Jacobian the Lyapunov analysis follows (K = ``eligibility_components``:
        the K state variables per neuron, blocks of N)."""

    def with_observable(self, state: Any, obs: torch.Tensor) -> Any:
        """``state`` with its observable replaced by ``obs``. This default serves states whose observable is one
        of their fields (rate: ``x``, LIF: ``v``); cells with K > 1 override it."""
        current = self.observable(state)
        for name in getattr(state, "_fields", ()):
            if getattr(state, name) is current:
                return state._replace(**{name: obs})
        raise ValueError(f"Invalid state {type(state).__name__}: its observable is not one of its fields")

    @property
    def observable_size(self) -> int:
        """K N, the size of :meth:`observable` per sequence."""
        return self.eligibility_components * self.n_hidden

    @abc.abstractmethod
    def dt_over_tau(self) -> float:
        """The time step in units of the time constant Lyapunov exponents are reported in (rate cells:
        ``alpha = dt / tau``; LIF cells: ``dt / tau_m``)."""

    @abc.abstractmethod
    def local_derivatives(self, params: CellParams, state: Any, u: torch.Tensor) -> LocalDerivatives:
        """Derivatives of the step taken from ``state`` driven by ``u`` (:class:`LocalDerivatives`)."""

    def eprop_transition(self, d: LocalDerivatives) -> tuple:
        """e-prop's K x K per-neuron transition ``D^{km} = decay[k][m] + spike_to[k] spike[m]`` (the reset
        and the recurrent weights dropped; :class:`LocalDerivatives`)."""
        k = self.eligibility_components
        return tuple(tuple(d.decay[i][m] + d.spike_to[i] * d.spike[m] for m in range(k)) for i in range(k))

    def jacobian_apply(self, params: CellParams, state: Any, u: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``J q`` for a (B, K N, k) frame ``q``, J the step Jacobian d observable_t / d observable_{t-1} taken
        from ``state`` (:class:`LocalDerivatives`), without forming J."""
        d = self.local_derivatives(params, state, u)
        k = self.eligibility_components
        blocks = q.split(self.n_hidden, dim=-2)
        through_spikes = sum(_col(d.spike[m]) * blocks[m] for m in range(k))
        recurrent = params.w_rec @ through_spikes
        out = []
        for i in range(k):
            own = sum(_col(d.decay[i][m] + d.spike_to[i] * d.spike[m] + d.reset[i][m]) * blocks[m]
                      for m in range(k))
            out.append(own + _col(d.current[i]) * recurrent)
        return torch.cat(out, dim=-2) if k > 1 else out[0]

    def jacobian(self, params: CellParams, state: Any, u: torch.Tensor) -> torch.Tensor:
        """(B, K N, K N) step Jacobian d observable_t / d observable_{t-1} (:meth:`jacobian_apply` applied to
        the identity)."""
        obs = self.observable(state)
        eye = torch.eye(obs.shape[-1], dtype=obs.dtype, device=obs.device).expand(obs.shape[0], -1, -1)
        return self.jacobian_apply(params, state, u, eye)

    def trace_bounds(self) -> dict[str, float]:
        """Bounds for traces held at chip precision (:func:`neuroinit.learning.chip.make_trace_quantiser`):
        ``post``, the largest postsynaptic factor, and ``pre_rec``, the largest presynaptic signal of the
        recurrent weights. This default: both 1 (tanh rates, spikes, slopes <= 1)."""
        return {"post": 1.0, "pre_rec": 1.0}

    @abc.abstractmethod
    def trace_spec(self) -> TraceSpec:
        """Constants of this cell's three-factor rule."""

    @abc.abstractmethod
    def local_factors(self, params: CellParams, prev: Any, new: Any, u: torch.Tensor) -> LocalFactors:
        """Local factors of the step ``prev -> new`` driven by ``u``."""

    # ------------------------------------------------------------------ running sequences
    def forward(self, inputs: torch.Tensor, state: Any = None, *, eprop_detach: bool = False,
                feedback: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """Run a time-major sequence ``(T, B, I)``; returns outputs ``(T, B, O)`` and the final state."""
        if inputs.dim() != 3 or inputs.shape[-1] != self.n_in:
            raise ValueError(f"Invalid input shape {tuple(inputs.shape)}: expected (T, B, {self.n_in})")
        state = self.init_state(inputs.shape[1]) if state is None else state
        params = self.params()
        ys = []
        for u in inputs:
            y, state = self.step(params, state, u, eprop_detach=eprop_detach, feedback=feedback)
            ys.append(y)
        return torch.stack(ys), state


def chip_grids(params: CellParams, profile: HardwareProfile, *, threshold: float | None = None
               ) -> dict[str, Grid | None]:
    """Grids of the chip-resident matrices, chosen from their largest magnitudes.

    For LIF networks (``threshold`` given) the input and recurrent grids are coarsened until the threshold
    fits the profile's threshold mantissa on the finer of them, so weights and threshold share one membrane
    unit (the smallest scale).
    """
    min_scale = 0.0
    if threshold is not None and profile.threshold.bits > 0:
        min_scale = threshold / (2 ** profile.threshold.bits - 1)
    grids: dict[str, Grid | None] = {}
    for name in QUANTISED_PARAMS:
        w = getattr(params, name)
        max_abs = float(w.detach().abs().max()) if w.numel() else 0.0
        ms = min_scale if name != "w_out" else 0.0
        grids[name] = choose_grid(max_abs, profile.weights, min_scale=ms)
    return grids
