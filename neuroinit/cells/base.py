"""The recurrent-cell contract shared by rate and LIF networks.

Everything that runs a network (learning rules, Lyapunov analysis, flossing, benchmarks, export) goes through
:class:`RecurrentCell` only, so a new neuron model is one new file implementing it.

Conventions: sequences are time-major ``(T, B, features)``; weights are ``(out, in)`` like ``nn.Linear``;
a step is a pure function ``(params, state, u_t) -> (y_t, new_state)`` and always returns that pair.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import torch
from torch import nn

from neuroinit.profiles import HardwareProfile, load_profile
from neuroinit.quantize import Grid, choose_grid, fake_quantize

__all__ = ["CellParams", "TraceSpec", "LocalFactors", "RecurrentCell", "PARAM_NAMES", "QUANTISED_PARAMS",
           "readout", "chip_grids"]

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
    """

    pre_rec: torch.Tensor
    pre_in: torch.Tensor
    post: torch.Tensor
    readout_in: torch.Tensor


class RecurrentCell(nn.Module, abc.ABC):
    """Abstract base of rate and spiking cells: parameters, chip weight grids and the step contract.

    Subclasses implement :meth:`step`, :meth:`init_state`, :meth:`observable`, :meth:`jacobian`,
    :meth:`trace_spec` and :meth:`local_factors`. ``params()`` returns the parameters the arithmetic uses:
    the float parameters, or (with a quantised profile and ``quantised_forward=True``) their fake-quantised
    values on the chip's grid with straight-through gradients.
    """

    model: str = ""

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
        """The (B, N) state variable whose Jacobian the Lyapunov analysis follows."""

    @abc.abstractmethod
    def jacobian(self, params: CellParams, state: Any, u: torch.Tensor) -> torch.Tensor:
        """(B, N, N) Jacobian d observable_{t} / d observable_{t-1} of the step taken from ``state``."""

    def jacobian_apply(self, params: CellParams, state: Any, u: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``jacobian(params, state, u) @ q`` for (B, N, k) vectors ``q``; cells override it to skip forming the
        (B, N, N) matrix."""
        return self.jacobian(params, state, u) @ q

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
