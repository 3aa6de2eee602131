"""Online e-prop / RFLO with explicit eligibility traces, as a three-factor rule.

For every weight ``W_ji`` (post j, pre i) the gradient estimate is (Bellec et al. 2020, Eqs. 1-3;
Murray 2019 for RFLO)::

    dE/dW_ji ~= sum_t L_j^t e_ji^t,     L_j^t = sum_k B_jk err_k^t        (third factor: learning signal)
    pre_i^t  = pre_decay * pre_i^{t-1} + pre_gain * x_i^t                  (presynaptic trace)
    e_ji^t   = post_j^t pre_i^t                           if elig_decay = 0 (factorised, O(B N) memory)
    e_ji^t   = elig_decay * e_ji^{t-1} + post_j^t pre_i^t otherwise        (O(B N^2) memory)

with ``err^t = d loss / d y^t`` (the task's per-step output error), ``B = W_out^T`` (symmetric) or a fixed
random matrix. The cell supplies the constants (:class:`~neuroinit.cells.base.TraceSpec`) and per-step factors
(:class:`~neuroinit.cells.base.LocalFactors`): voltage-form rate cells give the presynaptic rate trace and
``f'(x)`` (factorised); rate-form cells give RFLO's ``N x N`` trace; LIF cells give filtered spikes and the
pseudo-derivative, with the eligibility trace low-pass filtered by the readout's ``kappa`` (Bellec's
``F_kappa``). The readout weights get their exact local gradient ``err^t (x) readout_trace^t``. Input weights
and the bias use the same rule with the input (or 1) as presynaptic signal.

Nothing is stored over time (the fused path, :mod:`neuroinit.learning.fused`, records at most
:func:`~neuroinit.learning.fused.chunk_steps` steps for its chunked exact update; cells without a fused kernel,
e.g. adaptive LIF, take the same kind of update in PyTorch, :meth:`OnlineEprop._backward_recorded`, at most
:func:`record_steps` steps at a time): memory is independent of the sequence length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from neuroinit.cells.base import PARAM_NAMES, LocalFactors, RecurrentCell, TraceSpec
from neuroinit.learning import fused
from neuroinit.learning.base import LearningRule, Trial, accumulate_grads, feedback_matrix
from neuroinit.tasks.base import Batch, Task

__all__ = ["ComponentTraces", "OnlineEprop", "OnlineState", "Traces", "accumulate_step", "init_traces", "record_steps",
           "trace_step"]


class Traces(NamedTuple):
    """Presynaptic traces (B, N) / (B, I) / (B, 1), optional full eligibility traces (B, N, N) / (B, N, I) /
    (B, N) (None when the rule is factorised) and the readout's traces (B, N) / (B, 1)."""

    pre_rec: torch.Tensor
    pre_in: torch.Tensor
    pre_bias: torch.Tensor
    elig_rec: torch.Tensor | None
    elig_in: torch.Tensor | None
    elig_bias: torch.Tensor | None
    readout: torch.Tensor
    readout_bias: torch.Tensor


class ComponentTraces(NamedTuple):
    """:class:`Traces` of a cell with ``eligibility_components = K > 1``, plus its K - 1 further eligibility
    components per synapse (tuples of (B, N, N) / (B, N, I) / (B, N); see
    :class:`~neuroinit.cells.base.LocalFactors`). The full eligibility traces are always held."""

    pre_rec: torch.Tensor
    pre_in: torch.Tensor
    pre_bias: torch.Tensor
    elig_rec: torch.Tensor
    elig_in: torch.Tensor
    elig_bias: torch.Tensor
    readout: torch.Tensor
    readout_bias: torch.Tensor
    hidden_rec: tuple[torch.Tensor, ...]
    hidden_in: tuple[torch.Tensor, ...]
    hidden_bias: tuple[torch.Tensor, ...]


def init_traces(spec: TraceSpec, batch_size: int | tuple[int, ...], n_in: int, n_hidden: int, *,
                like: torch.Tensor, components: int = 1) -> Traces | ComponentTraces:
    """Zero traces for a cell with ``components`` eligibility components (its ``eligibility_components``:
    :class:`ComponentTraces` when > 1); ``batch_size`` may be a tuple of leading dimensions (an ensemble's
    ``(K, B)``)."""
    lead = tuple(batch_size) if isinstance(batch_size, tuple) else (batch_size,)
    z = lambda *shape: like.new_zeros((*lead, *shape))
    full = spec.elig_decay != 0.0 or components > 1
    traces = Traces(
        pre_rec=z(n_hidden), pre_in=z(n_in), pre_bias=z(1),
        elig_rec=z(n_hidden, n_hidden) if full else None,
        elig_in=z(n_hidden, n_in) if full else None,
        elig_bias=z(n_hidden) if full else None,
        readout=z(n_hidden), readout_bias=z(1),
    )
    if components == 1:
        return traces
    extra = range(components - 1)
    return ComponentTraces(*traces, hidden_rec=tuple(z(n_hidden, n_hidden) for _ in extra),
                           hidden_in=tuple(z(n_hidden, n_in) for _ in extra), hidden_bias=tuple(z(n_hidden) for _ in extra))


def _hidden_step(old: tuple, pre: torch.Tensor, f: LocalFactors) -> tuple:
    """``eps^k_t = from_pre[k] pre_{t-1} + sum_m decay[k][m] eps^m_{t-1}`` for the components k >= 1 (per
    synapse, ``pre`` the presynaptic trace of the previous step: (B, P), or (B, 1) for the bias)."""
    per_synapse = old[0].dim() == pre.dim() + 1
    lift = lambda x: x[..., :, None] if per_synapse and isinstance(x, torch.Tensor) and x.dim() > 0 else x
    pre_row = pre[..., None, :] if per_synapse else pre
    return tuple(lift(f.from_pre[k]) * pre_row + sum(lift(f.decay[k][m]) * old[m] for m in range(len(old)))
                 for k in range(len(old)))


def trace_step(spec: TraceSpec, tr: Traces | ComponentTraces, f: LocalFactors,
               quantise: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Traces | ComponentTraces:
    """Advance all traces by one step (module docstring; cells with several eligibility components:
    :class:`~neuroinit.cells.base.LocalFactors`). ``quantise(name, tensor)`` holds each stored trace at a
    chip's precision (identity when None). Leading member dimensions (an ensemble's K) work too."""
    q = quantise or (lambda _name, x: x)
    pd, pg, ed, rd = spec
    if len(f.from_pre) != len(getattr(tr, "hidden_rec", ())):
        raise ValueError(f"Invalid traces: the cell has {len(f.from_pre) + 1} eligibility components, the traces "
                         f"{len(getattr(tr, 'hidden_rec', ())) + 1} (init_traces(..., "
                         "components=cell.eligibility_components))")
    hidden = [tuple(q(f"{name}{k + 1}", h) for k, h in enumerate(_hidden_step(old, pre, f)))
              for name, old, pre in (("hidden_rec", tr.hidden_rec, tr.pre_rec), ("hidden_in", tr.hidden_in, tr.pre_in),
                                     ("hidden_bias", tr.hidden_bias, tr.pre_bias))] if f.from_pre else [(), (), ()]
    pre_rec = q("pre_rec", pd * tr.pre_rec + pg * f.pre_rec)
    pre_in = q("pre_in", pd * tr.pre_in + pg * f.pre_in)
    pre_bias = q("pre_bias", pd * tr.pre_bias + pg)
    elig_rec = elig_in = elig_bias = None
    if tr.elig_rec is not None:
        post = f.post
        e_rec = post[..., :, None] * pre_rec[..., None, :]
        e_in = post[..., :, None] * pre_in[..., None, :]
        e_bias = post * pre_bias
        for hp, h_rec, h_in, h_bias in zip(f.hidden_post, *hidden):
            e_rec = e_rec + hp[..., :, None] * h_rec
            e_in = e_in + hp[..., :, None] * h_in
            e_bias = e_bias + hp * h_bias
        elig_rec = q("elig_rec", ed * tr.elig_rec + e_rec)
        elig_in = q("elig_in", ed * tr.elig_in + e_in)
        elig_bias = q("elig_bias", ed * tr.elig_bias + e_bias)
    readout = q("readout", rd * tr.readout + f.readout_in)
    readout_bias = q("readout_bias", rd * tr.readout_bias + 1.0)
    traces = Traces(pre_rec, pre_in, pre_bias, elig_rec, elig_in, elig_bias, readout, readout_bias)
    return ComponentTraces(*traces, *hidden) if f.from_pre else traces


def accumulate_step(g: dict[str, torch.Tensor], err: torch.Tensor, feedback: torch.Tensor, f: LocalFactors,
                    tr: Traces | ComponentTraces) -> None:
    """Add one step's gradient (module docstring) to ``g`` in place: learning signal ``L = err B``
    (``feedback`` is ``B``, (O, N): ``W_out`` for symmetric feedback), ``sum_b L_j post_j pre_i`` for the
    factorised rule or ``sum_b L_j e_ji`` with full traces, and the readout's ``sum_b err_k readout_i``.
    Works with leading member dimensions too (an ensemble: ``err`` (K, B, O), ``feedback`` (K, O, N), ``g``
    (K, ...))."""
    learning_signal = err @ feedback
    if tr.elig_rec is None:
        lp = learning_signal * f.post
        g["w_rec"].add_(lp.mT @ tr.pre_rec)
        g["w_in"].add_(lp.mT @ tr.pre_in)
        g["bias"].add_((lp * tr.pre_bias).sum(-2))
    else:
        g["w_rec"].add_(torch.einsum("...bj,...bji->...ji", learning_signal, tr.elig_rec))
        g["w_in"].add_(torch.einsum("...bj,...bji->...ji", learning_signal, tr.elig_in))
        g["bias"].add_((learning_signal * tr.elig_bias).sum(-2))
    g["w_out"].add_(err.mT @ tr.readout)
    g["b_out"].add_((err * tr.readout_bias).sum(-2))


def record_steps(cell: RecurrentCell) -> int:
    """Steps per chunk of :meth:`OnlineEprop._backward_recorded`: records (~``8 N + I`` numbers per step and
    sequence) up to twice the size of the full traces they stand for (``K N (N + I + 1)`` per sequence, K
    eligibility components), at least 32: memory independent of the trial's length."""
    n, n_in = cell.n_hidden, cell.n_in
    traces = cell.eligibility_components * n * (n + n_in + 1)
    return max(32, 2 * traces // (8 * n + n_in + 1))


def _recorded_coefficients(rec: dict, weights: torch.Tensor, ed: float, hidden: bool):
    """For ``sum_t w_t ebar_t`` over a chunk's K steps (``w``: (K, B, N), the learning signal, or a weight per
    step): ``coef`` (K + 1, B, N), the factor on the presynaptic traces before step k (module of
    :meth:`OnlineEprop._backward_recorded`); ``lf``, ``w`` filtered backwards by ``ed``; ``gh``, the further
    component's backward sums ``G`` (None without one)."""
    k, b, n = weights.shape
    lf = weights.clone()
    if ed != 0.0:
        for t in range(k - 2, -1, -1):
            lf[t].add_(lf[t + 1], alpha=ed)
    coef = weights.new_zeros(k + 1, b, n)
    torch.mul(lf, rec["post"], out=coef[1:])
    gh = None
    if hidden:
        gh = lf * rec["hidden_post"]
        for t in range(k - 2, -1, -1):
            gh[t].addcmul_(rec["decay"][t + 1], gh[t + 1])
        coef[:-1].addcmul_(rec["from_pre"], gh)
    return coef, lf, gh


def _stacked(values: list, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """A chunk's per-step factors (tensors broadcastable to ``shape``, or numbers) as one (K, *shape) tensor."""
    return torch.stack([v.expand(shape) if isinstance(v, torch.Tensor) else like.new_full(shape, v) for v in values])


def _carried_traces(rec: dict, pres: torch.Tensor, ebar: torch.Tensor | None, eps: torch.Tensor | None,
                    ed: float, hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full traces at the end of a recorded chunk of K steps (:meth:`OnlineEprop._backward_recorded`), from
    those at its start (``ebar``, ``eps``: (B, N, M), or None for zero) and its records: ``ebar_end = sum_t
    ed^(K-1-t) e_t + ed^K ebar`` is the chunk's gradient sum with the learning signal replaced by ``ed^(K-1-t)``
    per sequence, and ``eps_end = sum_r (d_{r+1} ... d_{K-1}) from_pre_r (x) pre_{r-1} + (d_0 ... d_{K-1}) eps``;
    one batched GEMM each."""
    k, b, n = rec["post"].shape
    last = (ed ** torch.arange(k - 1, -1, -1, dtype=pres.dtype, device=pres.device))[:, None, None]
    coef, _, gh = _recorded_coefficients(rec, last.expand(k, b, n), 0.0, hidden)
    new_ebar = torch.einsum("kbj,kbm->bjm", coef, pres)
    if ebar is not None:
        new_ebar += ed ** k * ebar
        if hidden:
            new_ebar += (rec["decay"][0] * gh[0])[..., None] * eps
    if not hidden:
        return new_ebar, None
    after = torch.ones_like(rec["decay"])  # after[r] = d_{r+1} ... d_{K-1}
    for r in range(k - 2, -1, -1):
        torch.mul(after[r + 1], rec["decay"][r + 1], out=after[r])
    ecoef = pres.new_zeros(k + 1, b, n)
    torch.mul(after, rec["from_pre"], out=ecoef[:-1])
    new_eps = torch.einsum("kbj,kbm->bjm", ecoef, pres)
    if eps is not None:
        new_eps += (after[0] * rec["decay"][0])[..., None] * eps
    return new_ebar, new_eps


class OnlineState(NamedTuple):
    """Everything an online run carries from one step to the next."""

    cell: NamedTuple
    traces: Traces


class OnlineEprop(LearningRule):
    """Online e-prop (or RFLO on a rate-form cell) with explicit traces; accumulates gradients step by step.

    Use :meth:`backward` for a whole trial (gradients written once, or applied every ``apply_every`` steps
    through an optimizer), or drive it yourself::

        st = rule.start(batch_size)
        for t, u in enumerate(inputs):
            y, st = rule.step(st, u, lambda y: task.output_error(y, batch, t))
        rule.flush()          # adds the accumulated gradient to .grad
        optimizer.step()

    ``trace_quantiser`` (see :mod:`neuroinit.learning.chip`) holds traces at a chip's precision.

    ``fast`` selects the backend: ``True`` runs each step (and :meth:`backward` each trial) through the native
    backend (:mod:`neuroinit.learning.fused`, one call per step or learning epoch) where the cell allows it
    (float32, CPU), with the same results (chip-precision traces: integer codes, the same arithmetic and rounding
    distribution, other random draws); ``"auto"`` does so only where the results are the same (float traces:
    equal to float32 rounding, ~1e-7 relative, not bit for bit); ``False`` (default) always runs the PyTorch
    step of this module. For cells the fused kernel does not run (adaptive LIF, LIF with a chip's neuron
    options) ``True`` and ``"auto"`` run whole trials (:meth:`backward` without learning epochs, float traces)
    through :meth:`_backward_recorded`: the same gradient up to float rounding from per-step records, ~20x
    faster than the step by step path at N = 256 (which updates ``O(B N^2)`` traces every step; Romo,
    ``docs/training.md``). Both backends sit behind the same methods. The native backend updates the state in
    place: a state passed to :meth:`step` is consumed. ``uses_fast_path`` says which backend the last
    :meth:`start` took, ``native_backend`` gives it.
    """

    name = "eprop"

    def __init__(self, cell: RecurrentCell, *, feedback: str | torch.Tensor = "symmetric",
                 generator: torch.Generator | None = None,
                 trace_quantiser: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                 fast: bool | str = False) -> None:
        super().__init__(cell)
        self.feedback = feedback_matrix(cell, feedback, generator=generator)
        self.spec = cell.trace_spec()
        self.trace_quantiser = trace_quantiser
        self._grads: dict[str, torch.Tensor] = {}
        self._params = None
        # --- backend: the native one (neuroinit.learning.fused) where ``fast`` asks for it and it applies ---
        if fast not in (True, False, "auto"):
            raise ValueError(f"Invalid fast {fast!r}: allowed True, False, 'auto'")
        self.fast = fast
        self.generator = generator
        self._native: fused.FusedOnline | None = None
        self._recorded = False  # whether the last trial ran _backward_recorded

    # ------------------------------------------------------------------ step by step
    def start(self, batch_size: int) -> OnlineState:
        """Begin a run of ``batch_size`` sequences: zero state, traces and accumulated gradient. (The fast path
        reuses the previous run's buffers: a state returned by an earlier ``start`` is reset too.)"""
        self._begin(batch_size)
        if self._native is not None:  # --- native backend ---
            return self._native_state()
        cell = self.cell
        return OnlineState(cell.init_state(batch_size),
                           init_traces(self.spec, batch_size, cell.n_in, cell.n_hidden, like=cell.w_rec.detach(),
                                       components=cell.eligibility_components))

    def _begin(self, batch_size: int) -> None:
        """Everything :meth:`start` does except building the state to hand out."""
        cell = self.cell
        self._params = cell.params()
        self._grads = {n: torch.zeros_like(getattr(cell, n)) for n in PARAM_NAMES}
        # --- backend: native where it applies (its buffers reused from the previous run), else this module's ---
        previous, self._native = self._native, None
        if self.fast:
            self._native = fused.make_backend(
                cell, batch_size, self._params, self._grads, feedback=self.feedback, quantiser=self.trace_quantiser,
                generator=self.generator, same_results_only=self.fast == "auto", reuse=previous)

    def _native_state(self) -> OnlineState:
        return OnlineState(self._native.cell_state(), Traces(*self._native.traces()))

    @property
    def uses_fast_path(self) -> bool:
        """Whether the run begun by the last :meth:`start` steps through the fused native step."""
        return self._native is not None

    @property
    def native_backend(self) -> fused.FusedOnline | None:
        """The native backend of the run begun by the last :meth:`start` (None: the PyTorch step runs); e.g.
        ``state_bytes()``, ``chunk_capacity``, ``code_bytes``."""
        return self._native

    @property
    def fast_path_reason(self) -> str | None:
        """Why a rule asked for the fast path runs the PyTorch step (None when ``fast=False`` or the last
        :meth:`start` took the fused step): e.g. a cell without a fused kernel (``kernel_id = None``)."""
        if not self.fast or self._native is not None:
            return None
        if not fused.kernel_runs(self.cell):
            what = (f"no fused kernel for model {self.cell.model!r}" if self.cell.kernel_id is None
                    else f"the fused kernel does not run this {self.cell.model!r} cell's options")
            how = ("whole trials run the recorded PyTorch path, single steps (and learning epochs) the PyTorch step"
                   if self._records_apply() else "the PyTorch step runs")
            return f"{what}: {how}"
        why = fused.supports(self.cell, feedback=self.feedback, quantiser=self.trace_quantiser)
        return why or ("chip-precision traces with fast='auto'" if self.trace_quantiser is not None else None)

    @torch.no_grad()
    def step(self, st: OnlineState, u: torch.Tensor, error: Callable[[torch.Tensor], torch.Tensor]
             ) -> tuple[torch.Tensor, OnlineState]:
        """Advance the network and its traces by one step and accumulate this step's gradient.

        ``error(y_t)`` returns ``d loss / d y_t`` (B, O)."""
        if self._native is not None:  # --- native backend: state updated in place ---
            return self._native.step(u, error), self._native_state()
        p = self._params
        y, new = self.cell.step(p, st.cell, u)
        f = self.cell.local_factors(p, st.cell, new, u)
        tr = trace_step(self.spec, st.traces, f, self.trace_quantiser)
        err = error(y)
        accumulate_step(self._grads, err, p.w_out if self.feedback is None else self.feedback, f, tr)
        return y, OnlineState(new, tr)

    def flush(self) -> None:
        """Add the gradient accumulated since the last flush to ``.grad`` and restart the accumulation."""
        accumulate_grads(self.cell, self._grads)
        for g in self._grads.values():
            g.zero_()

    def refresh_params(self) -> None:
        """Re-read the cell's (possibly updated, possibly quantised) parameters for the next steps."""
        self._params = self.cell.params()
        if self._native is not None:  # --- native backend ---
            self._native.set_params(self._params)

    # ------------------------------------------------------------------ whole trials
    def backward(self, batch: Batch, task: Task, *, optimizer: torch.optim.Optimizer | None = None,
                 apply_every: int | None = None) -> Trial:
        """One trial. Without ``apply_every`` the trial's gradient is added to ``.grad`` at the end (the
        caller steps the optimizer). With ``apply_every=K`` and an ``optimizer`` the gradient of every K steps
        is applied at once (``zero_grad``, write, ``step``), as a chip's learning epoch; ``K = 1`` is fully
        online."""
        if apply_every is not None and (optimizer is None
                                        or not (isinstance(apply_every, int) and apply_every >= 1)):
            raise ValueError(f"Invalid apply_every {apply_every!r}: needs an integer >= 1 and an optimizer")
        n_steps, batch_size = batch.inputs.shape[:2]
        epoch_end = None if apply_every is None else lambda: self._apply(optimizer)
        outputs = None
        self._recorded = False
        if self.fast and apply_every is None and self._records_apply():
            self._begin(batch_size)  # --- a cell the kernel does not run: the trial's gradient from its records ---
            outputs, self._recorded = self._backward_recorded(batch, task), True
        elif self.fast and fused.trial_supported(batch, task):  # --- native backend: a call per learning epoch ---
            self._begin(batch_size)
            if self._native is not None:
                outputs = self._native.run_trial(batch, task, apply_every=apply_every, on_epoch_end=epoch_end)
        if outputs is None:  # the PyTorch step
            st = self.start(batch_size)
            # preallocated: the outputs are the only thing kept per step (T * B * O numbers, no per-step objects)
            outputs = self.cell.w_out.new_empty(n_steps, batch_size, self.cell.n_out)
            for t in range(n_steps):
                y, st = self.step(st, batch.inputs[t], lambda y_t, t=t: task.output_error(y_t, batch, t))
                outputs[t] = y
                if epoch_end is not None and ((t + 1) % apply_every == 0 or t + 1 == n_steps):
                    epoch_end()
        if apply_every is None:
            self.flush()
        with torch.no_grad():
            loss = task.loss(outputs, batch)
        return Trial(loss.detach(), outputs.detach())

    @property
    def step_path(self) -> str:
        """What a run file records (``/summary/step_path``) for the last trial: ``fused-native`` (the native
        backend), ``recorded`` (:meth:`_backward_recorded`) or ``torch`` (the step by step PyTorch path)."""
        if self._native is not None:
            return "fused-native"
        return "recorded" if self._recorded else "torch"

    def _records_apply(self) -> bool:
        """Whether trials take :meth:`_backward_recorded`: a cell whose dynamics the fused kernel does not
        implement (:func:`~neuroinit.learning.fused.kernel_runs`: adaptive LIF, LIF with a chip's neuron
        options), float traces, at most one further eligibility component (with one decay factor,
        ``decay[0][0]``)."""
        cell = self.cell
        return (not fused.kernel_runs(cell) and self.trace_quantiser is None
                and cell.eligibility_components <= 2)

    @torch.no_grad()
    def _backward_recorded(self, batch: Batch, task: Task) -> torch.Tensor:
        """One trial's gradient (the step by step path's, up to float rounding) from per-step records of
        ``O(B N)`` numbers instead of ``O(B N^2)`` traces updated at every step, in chunks of
        :func:`record_steps` steps. Within a chunk, with ``Lf_t = L_t + elig_decay Lf_{t+1}`` (the eligibility
        trace's decay moved onto the learning signal) and, for a further component ``eps_t = from_pre_t pre_{t-1}
        + d_t eps_{t-1}``, ``G_t = Lf_t hidden_post_t + d_{t+1} G_{t+1}`` (its recursion moved the same way; per
        postsynaptic neuron, so per row)::

            sum_t L_t ebar_t = sum_t (Lf_t post_t) (x) pre_t + sum_t (from_pre_t G_t) (x) pre_{t-1}
                               + elig_decay Lf_0 ebar_start + d_0 G_0 eps_start

        -- one GEMM over the chunk's ``K B`` rows (recurrent, input and bias weights together). The full traces
        at a chunk's end (``ebar``, ``eps``: needed only where another chunk follows) come from the same sums
        with ``L`` replaced by ``elig_decay^(K - 1 - t)`` per sequence (one batched GEMM each). The readout's
        gradient is exact and local (its traces recorded too). Adds to the accumulated gradient; returns the
        outputs (T, B, O)."""
        cell, p, (pd, pg, ed, rd) = self.cell, self._params, self.spec
        fb = p.w_out if self.feedback is None else self.feedback
        n_steps, b = batch.inputs.shape[:2]
        n, n_in = cell.n_hidden, cell.n_in
        m = n + n_in + 1  # presynaptic traces side by side: recurrent, input, bias (the constant 1)
        like = cell.w_rec.detach()
        hidden = cell.eligibility_components == 2
        names = ("post", "from_pre", "decay", "hidden_post") if hidden else ("post",)
        chunk = record_steps(cell)
        outputs = like.new_empty(n_steps, b, cell.n_out)
        state, g = cell.init_state(b), self._grads
        readout, readout_bias = like.new_zeros(b, n), 0.0
        pre_start, ebar, eps = like.new_zeros(b, m), None, None  # ebar, eps: full traces (None: zero)
        for t0 in range(0, n_steps, chunk):
            k = min(chunk, n_steps - t0)
            # the steps collect their factors (tensors each step makes anew: kept, stacked once per chunk)
            got = {name: [] for name in ("pre_rec", "pre_in", "readout_in", "err", *names)}
            for s in range(k):
                u = batch.inputs[t0 + s]
                y, new = cell.step(p, state, u)
                f = cell.local_factors(p, state, new, u)
                outputs[t0 + s] = y
                got["err"].append(task.output_error(y, batch, t0 + s))
                for name, v in (("pre_rec", f.pre_rec), ("pre_in", f.pre_in), ("readout_in", f.readout_in),
                                ("post", f.post)):
                    got[name].append(v)
                if hidden:
                    got["from_pre"].append(f.from_pre[0])
                    got["decay"].append(f.decay[0][0])
                    got["hidden_post"].append(f.hidden_post[0])
                state = new
            rec = {name: _stacked(got[name], (b, n), like) for name in names}
            errs = torch.stack(got["err"])
            # the traces' recursions, all sequences and presynaptic signals at once: pres[s] before step s
            pres = like.new_empty(k + 1, b, m)
            pres[0] = pre_start
            pres[1:, :, :n] = _stacked(got["pre_rec"], (b, n), like)
            pres[1:, :, n:-1] = _stacked(got["pre_in"], (b, n_in), like)
            pres[1:, :, -1] = 1.0
            ro, biases = _stacked(got["readout_in"], (b, n), like), []
            for s in range(k):
                if pg != 1.0:
                    pres[s + 1].mul_(pg)
                pres[s + 1].add_(pres[s], alpha=pd)
                readout = ro[s].add_(readout, alpha=rd)
                readout_bias = rd * readout_bias + 1.0
                biases.append(readout_bias)
            ro_bias = like.new_tensor(biases).view(k, 1, 1)
            pre_start = pres[k].clone()
            rec["L"] = errs @ fb  # the learning signals; the readout's exact local gradient
            g["w_out"].add_(errs.view(-1, cell.n_out).T @ ro.view(-1, n))
            g["b_out"].add_((errs * ro_bias).sum((0, 1)))
            coef, lf, gh = _recorded_coefficients(rec, rec["L"], ed, hidden)
            grad = coef.view(-1, n).T @ pres.view(-1, m)  # (N, N + I + 1)
            if ebar is not None:  # the chunk's starting traces, carried through its steps
                grad += torch.einsum("bj,bjm->jm", ed * lf[0], ebar)
                if hidden:
                    grad += torch.einsum("bj,bjm->jm", rec["decay"][0] * gh[0], eps)
            g["w_rec"].add_(grad[:, :n])
            g["w_in"].add_(grad[:, n:-1])
            g["bias"].add_(grad[:, -1])
            if t0 + k < n_steps and (ed != 0.0 or hidden):  # another chunk follows: it starts from these
                ebar, eps = _carried_traces(rec, pres, ebar, eps, ed, hidden)
        return outputs

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        """End of a learning epoch: the accumulated gradient becomes ``.grad``, the optimizer steps, and the
        next steps read the updated parameters."""
        optimizer.zero_grad()
        self.flush()
        optimizer.step()
        self.refresh_params()
