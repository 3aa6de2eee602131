"""The native backend of online e-prop / RFLO: one native call per step (or per trial) on the CPU, float32.

:class:`~neuroinit.learning.online.OnlineEprop` dispatches here (:func:`make_backend`) where ``fast`` asks for it
and the cell allows it, else it takes its own PyTorch step; both run behind the same methods (``start``,
``step``, ``backward``), as ``torch.optim.adam`` dispatches to its implementations. This module never imports
the rule: it receives the cell, parameters, gradient buffers, feedback, trace quantiser and generator.

The plain step costs ~15 eager PyTorch ops (2-3 us each) and passes over every ``B x N x N`` eligibility trace
three times (decay, add, gradient einsum). Here a C kernel (``native/fused_step.c``, built by
:class:`~neuroinit.learning.native.loader.NativeLibrary`) does the network step (the forward product in
registers, event-driven for spikes), the presynaptic and readout traces and the learning signal in one call per
step, and the weight gradient is summed in one of three ways:

* **chunked exact update** (float traces, whole trials: :meth:`FusedOnline.run`). The steps of a chunk record
  their learning signal ``L``, postsynaptic factor and presynaptic traces; at the chunk's end the gradient of
  every step of the chunk is one GEMM over the chunk's ``K B`` rows (``ni_chunk_prepare`` has the equations:
  the eligibility trace's decay is moved onto the learning signal, filtered backwards inside the chunk), and
  full traces are carried to the next chunk by a GEMM per batch element, only when the trial is longer than a
  chunk or the traces are asked for. The same gradient as the per-step rule up to float32 rounding (sums
  reordered), at the matmul rate instead of the memory bandwidth of a per-step trace pass; memory stays
  independent of T (the records hold :func:`chunk_steps` steps). The recorded steps need nothing from other batch
  elements, so with several threads ``ni_run`` gives each a slice of the batch for the whole chunk (one barrier
  per chunk, none per step; ``FusedOnline.batch_slices``).
* **per-step float traces** (single :meth:`FusedOnline.step` calls): each stored trace is updated and its
  gradient accumulated in one pass.
* **chip-precision traces** (a ``make_trace_quantiser`` quantiser: rounded at every step): the full traces are
  stored as integer codes of the profile's trace width (:func:`code_dtype`: int8 for <= 8 bits, int16 for
  <= 16), updated and accumulated into the gradient (dequantised on the fly) in one vectorised pass, with
  stochastic rounding from a counter-based generator that serves 4 (int8) or 2 (int16) elements per 32-bit
  draw: ``|E[code] - x| <= 2^-9`` (int8) or ``2^-17`` (int16) of a code, against ``2^-24`` for the PyTorch
  path (``chip_traces.c`` has the equations). With ``rounding="nearest"`` the sum ``x`` is the PyTorch path's
  float value bit for bit (two roundings), so the codes equal the PyTorch path's exactly; stochastic rounding
  forms it with one rounding (a fused multiply-add), within an ulp of it. Random draws are seeded from the
  rule's ``torch.Generator`` once per step and depend on the seed only (the AVX-512 and AVX2 kernels and the
  portable loop draw the same bits): the same distribution as the PyTorch path, not the same draws. Nothing in
  the forward pass reads these traces, so a whole trial (``ni_run``) defers them: each step records its
  factors, and every 32 steps each row's codes and gradient are taken through all of them while they stay in
  registers (``chip_chunk_flush``; the same codes as step by step).

Where no compiler is found, or for float64, CUDA tensors or cells it does not know, the rule takes the PyTorch
path (:func:`available`, :func:`supports`), which gives the same results (tests: ``tests/test_fused.py``,
``tests/test_fused_chip.py``). The fused state is updated in place: a state handed to a step is consumed by it,
and a new run reuses the previous run's buffers.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable

import torch

from neuroinit.learning.native import loader
from neuroinit.learning.native.fused_step import ACTS, LOSSES, MODELS, QUANT_NAMES, RunStruct, new_library

__all__ = ["LIBRARY", "FusedOnline", "available", "chunk_steps", "code_dtype", "kernel_runs", "library_path",
           "make_backend", "new_library", "supports", "trial_supported", "unavailable_reason"]

# below this many multiply-adds per loop a step stays on one thread: a parallel loop ends in a barrier, which costs
# ~1-5 us on a quiet machine but up to a scheduler time slice (ms) when the other core is busy (measured: LIF
# N=64, B=16 at 49 us/step on one thread, 2349 us on two threads next to other work)
PAR_WORK = 1 << 20

# below this many multiply-adds a chunk's GEMM runs on one thread: next to other work torch's threaded GEMM on small
# matrices waited for a descheduled thread (measured with a busy loop on the other core, 2 threads, us/step median:
# LIF N=64 B=16 (2^21.5 per chunk) 674 -> 17, rate N=64 B=16 (2^22) 338 -> 120; quiet: the same within noise)
GEMM_PAR_WORK = 1 << 23


@contextlib.contextmanager
def _gemm_threads(work: int):
    """torch ops inside run on one thread where ``work`` (multiply-adds) is below :data:`GEMM_PAR_WORK`."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1 if work < GEMM_PAR_WORK else saved)  # ~0.1 us
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# ------------------------------------------------------------------------------------------ the library
LIBRARY = new_library()  # tests swap it for a fresh one (``new_library()``)


def _load() -> ctypes.CDLL | None:
    return LIBRARY.load()


def library_path():
    """Where the compiled library for this source, compiler and CPU is (or will be) cached."""
    return LIBRARY.path()


def available() -> bool:
    """True when the fused library is (or can be) built and loaded on this machine."""
    return LIBRARY.available()


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True); ``LIBRARY.diagnostics``: the compiler's output."""
    return LIBRARY.unavailable_reason()


def own_gemm() -> bool:
    """Whether :func:`add_at_b` runs the library's AVX-512 kernel: where it was built with AVX-512 and torch's
    BLAS would not run AVX-512 code (:func:`~neuroinit.learning.native.loader.blas_runs_avx512`)."""
    lib = _load()
    return lib is not None and bool(lib.ni_wide()) and not loader.blas_runs_avx512()


def add_at_b(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``c += a^T b`` for ``a`` (R, M), ``b`` (R, N), ``c`` (M, N), contiguous float32 CPU tensors (a weight
    gradient summed over recorded rows): the library's ``ni_gemm_tn`` where :func:`own_gemm` (on torch's thread
    count; measured on a Zen 5 EPYC, Romo's chunk gradient, R = 1792, M = N = 256: ~240 GFLOP/s against MKL's
    ~105), else ``c.addmm_(a.T, b)``. Returns ``c``."""
    ts = (a, b, c)
    if (all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts)
            and own_gemm()):
        _load().ni_gemm_tn(a.data_ptr(), b.data_ptr(), a.shape[0], a.shape[1], b.shape[1], c.data_ptr(),
                           torch.get_num_threads())
        return c
    return c.addmm_(a.T, b)


# ------------------------------------------------------------------------------------------ what it supports
def _cell_code(cell) -> tuple[int, int] | None:
    """The kernel's model and activation codes for ``cell``, by its ``kernel_id`` (the cell contract)."""
    kernel = getattr(cell, "kernel_id", None)
    if kernel == "lif":  # the chip neuron options (synaptic current, >=): OnlineEprop's recorded path
        plain = cell.tau_syn is None and cell.threshold_compare == ">" and cell.max_spikes == 1 and not cell.reset_leaks
        return (MODELS["lif"], 0) if plain else None
    if kernel == "rate" and cell.activation_name in ACTS:
        return MODELS[cell.form], ACTS[cell.activation_name]
    return None


def kernel_runs(cell) -> bool:
    """Whether the fused kernel implements ``cell``'s dynamics (its ``kernel_id`` and options; e.g. not adaptive
    LIF, not LIF with a chip's neuron options)."""
    return _cell_code(cell) is not None


def supports(cell, *, feedback: torch.Tensor | None = None, quantiser=None) -> str | None:
    """None when the fused step can run ``cell`` (float32, CPU, a known cell, float traces or a quantiser
    that exposes its grids); otherwise the reason it cannot."""
    if _cell_code(cell) is None:
        return f"unsupported cell {type(cell).__name__}"
    tensors = [getattr(cell, n) for n in ("w_in", "w_rec", "bias", "w_out", "b_out")]
    if feedback is not None:
        tensors.append(feedback)
    if any(t.dtype != torch.float32 for t in tensors):
        return "not float32 (the fused step is single precision; float64 uses the PyTorch path)"
    if any(t.device.type != "cpu" for t in tensors):
        return "not on the CPU"
    if quantiser is not None:
        why = _quantiser_problem(quantiser)
        if why is not None:
            return why
    if not available():
        return f"fused library unavailable: {unavailable_reason()}"
    return None


def code_dtype(quantiser) -> torch.dtype:
    """The integer type the fused step stores a quantiser's eligibility-trace codes in: int8 where every code
    fits 8 bits (Loihi's 7-bit traces), else int16 (ReckOn's 12-bit traces)."""
    grids = [quantiser.grids[n] for n in ("elig_rec", "elig_in", "elig_bias")]
    return torch.int8 if all(-128 <= g.code_min and g.code_max <= 127 for g in grids) else torch.int16


def _counters_fit(batch_size: int, n_hidden: int, n_in: int, code: torch.dtype) -> bool:
    """Whether every random word of a step has its own 32-bit counter (``chip_traces.c``): the recurrent trace's
    B N rows of ceil(N / G) blocks of 16 words (G = 64 int8 or 32 int16 codes per block), and the input trace's
    B N rows of ceil(I / P) words (P = 4 int8 or 2 int16 codes per word), below 2^32 (e.g. B = 64 up to
    N = 4096)."""
    per_block, per_word = (64, 4) if code == torch.int8 else (32, 2)
    recurrent = batch_size * n_hidden * -(-n_hidden // per_block) * 16
    inputs = batch_size * n_hidden * -(-max(n_in, 1) // per_word)
    return max(recurrent, inputs) < 2 ** 32


def _quantiser_problem(quantiser) -> str | None:
    grids = getattr(quantiser, "grids", None)
    if grids is None:
        return "trace quantiser without grids"
    if any(not (-2 ** 15 <= g.code_min < g.code_max < 2 ** 15) for g in grids.values()):
        return "trace grids wider than 16 bits"
    if getattr(quantiser, "rounding", "stochastic") not in ("stochastic", "nearest"):
        return f"trace rounding {quantiser.rounding!r}"
    return None


# ------------------------------------------------------------------------------------------ the fused run
def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedOnline:
    """Buffers of one online run (state, traces, gradient accumulators) and the native step over them.

    ``grads`` maps parameter names to contiguous float32 accumulators (``OnlineEprop``'s); the fused step adds
    to them in place. ``params`` are the parameters the arithmetic uses (``cell.params()``)."""

    def __init__(self, cell, params, batch_size: int, grads: dict[str, torch.Tensor], *,
                 feedback: torch.Tensor | None = None, quantiser=None,
                 generator: torch.Generator | None = None) -> None:
        why = supports(cell, feedback=feedback, quantiser=quantiser)
        if why is not None:
            raise ValueError(f"Invalid fused step: {why}")
        self.lib = _load()
        self.cell = cell
        self.generator = generator
        model, actfn = _cell_code(cell)
        spec = cell.trace_spec()
        b, n, i, o = batch_size, cell.n_hidden, cell.n_in, cell.n_out
        empty = lambda *s: torch.empty(*s, dtype=torch.float32)
        self.full = spec.elig_decay != 0.0
        self.model = model
        # chip precision: the full traces as integer codes (int8 / int16, :func:`code_dtype`)
        code = torch.float32 if quantiser is None else code_dtype(quantiser)
        codes = lambda *s: torch.empty(*s, dtype=code)
        self.buf = {
            "x": empty(b, n), "z": empty(b, n), "ref": empty(b, n), "y": empty(b, o),
            "post": empty(b, n), "act": empty(b, n), "L": empty(b, n),
            "err": empty(b, o), "yout": empty(b, o), "drive": empty(b, n),
            "pre_rec": empty(b, n), "pre_in": empty(b, i), "pre_bias": empty(b, 1),
            "elig_rec": codes(b, n, n) if self.full else None, "elig_in": codes(b, n, i) if self.full else None,
            "elig_bias": codes(b, n) if self.full else None, "ro": empty(b, n), "ro_bias": empty(b, 1),
        }
        r = RunStruct()
        r.model, r.actfn, r.B, r.N, r.I, r.O = model, actfn, b, n, i, o
        r.full, r.par_work = int(self.full), PAR_WORK
        r.pd, r.pg, r.ed, r.rd = (float(v) for v in spec)
        if model == MODELS["lif"]:
            r.alpha, r.kappa = float(cell.alpha), float(cell.kappa)
            r.v_th, r.gamma = float(cell.v_th), float(cell.gamma)
            r.reset_zero, r.n_ref = int(cell.reset == "zero"), int(cell.n_refractory)
        else:
            r.alpha = float(cell.alpha)
        if quantiser is not None:
            r.quant, r.code_bytes = 1, code.itemsize
            r.q_nearest = int(getattr(quantiser, "rounding", "stochastic") == "nearest")
            for k, name in enumerate(QUANT_NAMES):
                g = quantiser.grids[name]
                r.q_scale[k], r.q_min[k], r.q_max[k] = g.scale, g.code_min, g.code_max
        self.quantised = quantiser is not None
        self.run_struct = r
        for name, t in self.buf.items():
            setattr(r, name, _ptr(t))
        self._events = torch.empty(b, n + 1, dtype=torch.int64)  # scratch: a step's spike indices, their count
        r.events = self._events.data_ptr()
        self._feedback = feedback
        self._layouts: dict[str, torch.Tensor] = {}
        self._ref = ctypes.byref(r)
        # what a later run may reuse these buffers for (:meth:`matches`); references, not ids: a freed object's
        # id can come back for another one
        self._quantiser, self._config = quantiser, _cell_constants(cell)
        # chunked exact update (float traces, whole runs): records, the chunk waiting to enter the full traces
        self._rec: dict[str, torch.Tensor] | None = None
        # threads the last native run split the batch over (``ni_run``: whole chunks of enough work; 1: none)
        self.batch_slices = 1
        self.reset(params, grads)
        self._write_zero_traces()  # touched once: the memory a run holds does not depend on its length

    def matches(self, cell, batch_size: int, *, feedback=None, quantiser=None) -> bool:
        """Whether a new run of ``cell`` can reuse these buffers: the same cell (constants unchanged), batch
        size, feedback and quantiser."""
        return (cell is self.cell and batch_size == self.run_struct.B and feedback is self._feedback
                and quantiser is self._quantiser and _cell_constants(cell) == self._config)

    def reset(self, params, grads: dict[str, torch.Tensor]) -> None:
        """Start a new run: zero state and traces, accumulate into ``grads``, compute with ``params``.
        Buffers are reused (allocating and first touching them costs more than a short trial's arithmetic)."""
        for name in ("w_in", "w_rec", "bias", "w_out", "b_out"):
            g = grads[name]
            if g.dtype != torch.float32 or not g.is_contiguous():
                raise ValueError(f"Invalid gradient buffer {name}: needs a contiguous float32 tensor")
        self.grads = grads
        for name, pname in (("g_in", "w_in"), ("g_rec", "w_rec"), ("g_bias", "bias"), ("g_out", "w_out"),
                            ("g_bout", "b_out")):
            setattr(self.run_struct, name, grads[pname].data_ptr())
        for name, t in self.buf.items():
            if t is not None and not name.startswith("elig"):
                t.zero_()
        if self.model == MODELS["voltage"]:  # the kernel keeps act = f(x) between steps
            self.buf["act"].copy_(self.cell.activation.f(self.buf["x"]))
        self._elig_zero = True  # the full traces are zero; their buffers are written when first needed
        self._pending = 0
        self.run_struct.rec_pos = 0
        self.set_params(params)

    def _write_zero_traces(self) -> None:
        if self._elig_zero and self.full:
            for name in ("elig_rec", "elig_in", "elig_bias"):
                self.buf[name].zero_()
        self._elig_zero = False

    # -------------------------------------------------------------- parameters and state
    def set_params(self, params) -> None:
        """Point the step at (new) parameters, e.g. after an optimizer step."""
        self._params = {n: getattr(params, n).detach().contiguous() for n in ("w_in", "w_rec", "bias", "w_out",
                                                                               "b_out")}
        self._params["fb"] = (self._params["w_out"] if self._feedback is None
                              else self._feedback.detach().contiguous())
        # the forward product reads the transposed matrices (row k: what presynaptic k sends to every neuron),
        # also packed by 16-column blocks (``ni_pack``)
        for name in ("rec", "in"):
            w = self._params["w_" + name]
            n, k = w.shape
            if ("wt_" + name) not in self._layouts:  # allocated once, rewritten at every call
                self._layouts["wt_" + name] = w.new_empty(k, n)
                self._layouts["wp_" + name] = w.new_empty(n // 16, k, 16)
            wt, wp = self._layouts["wt_" + name], self._layouts["wp_" + name]
            self.lib.ni_pack(w.data_ptr(), n, k, wt.data_ptr(), wp.data_ptr())
            self._params["wt_" + name], self._params["wp_" + name] = wt, wp
        for name, t in self._params.items():
            setattr(self.run_struct, name, t.data_ptr())

    def cell_state(self):
        """The cell state as the cell's own NamedTuple, viewing the fused buffers (updated in place)."""
        from neuroinit.cells.lif import LIFState
        from neuroinit.cells.rate import RateState

        bf = self.buf
        if self.model == MODELS["lif"]:
            return LIFState(v=bf["x"], z=bf["z"], ref=bf["ref"], y=bf["y"])
        return RateState(bf["x"])

    def traces(self) -> tuple[torch.Tensor | None, ...]:
        """The traces in the order of :class:`~neuroinit.learning.online.Traces`, viewing the fused buffers
        (integer codes: their values, a copy)."""
        self._materialise()
        self._write_zero_traces()
        bf = self.buf
        full = [bf[n] for n in ("elig_rec", "elig_in", "elig_bias")]
        if self.quantised and self.full:  # integer codes: their values, a copy
            full = [c.to(torch.float32) * self._quantiser.grids[n].scale
                    for c, n in zip(full, ("elig_rec", "elig_in", "elig_bias"))]
        return (bf["pre_rec"], bf["pre_in"], bf["pre_bias"], *full, bf["ro"], bf["ro_bias"])

    @property
    def code_bytes(self) -> int:
        """Bytes per stored eligibility-trace code at chip precision (1: int8, 2: int16); 0 for float traces."""
        return int(self.run_struct.code_bytes)

    def state_bytes(self) -> int:
        """Bytes held across steps (state, traces, scratch, gradient accumulators): independent of T."""
        return sum(t.numel() * t.element_size() for t in self.buf.values() if t is not None) + \
            sum(g.numel() * 4 for g in self.grads.values()) + \
            sum(t.numel() * 4 for t in (self._rec or {}).values())

    def _reseed(self) -> None:
        if self.quantised:
            self.run_struct.seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator))

    # -------------------------------------------------------------- stepping
    def step(self, u: torch.Tensor, error: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One step driven by ``u`` (B, I); ``error(y)`` gives d loss / d y (B, O). Returns y (a new tensor)."""
        y = self.forward(u)
        self.update(error(y))
        return y

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """The first half of :meth:`step`: the network step, presynaptic and readout traces and the
        postsynaptic factor (``buf["post"]``). Returns y (a new tensor)."""
        u = u.detach().to(torch.float32).contiguous()
        self._materialise()
        self._write_zero_traces()
        self._reseed()
        self.lib.ni_forward(self._ref, u.data_ptr())
        return self.buf["yout"].clone()

    def update(self, err: torch.Tensor) -> None:
        """The second half of :meth:`step`: learning signal, eligibility traces and gradients from the output
        error ``err`` (B, O) and the factors in the buffers (``post``, the presynaptic and readout traces)."""
        self.buf["err"].copy_(err)
        self.lib.ni_update(self._ref)

    def run(self, inputs: torch.Tensor, scale: torch.Tensor, outputs: torch.Tensor, *, loss: str,
            targets: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            t0: int = 0, t1: int | None = None) -> None:
        """Steps ``t0 <= t < t1`` of ``inputs`` (T, B, I) in one native call, with the output error of loss
        ``"mse"`` (``scale[t, b] * (y - targets[t, b])``) or ``"ce"`` (``scale * (softmax(y) - onehot(label))``),
        ``scale = mask / sum(mask)``; outputs go to ``outputs`` (T, B, O) (float32, contiguous)."""
        if loss not in LOSSES:
            raise ValueError(f"Invalid loss {loss!r}: the fused run supports {', '.join(LOSSES)}")
        r = self.run_struct
        t_len = inputs.shape[0]
        t1 = t_len if t1 is None else t1
        keep = [inputs, scale, outputs, targets, labels]
        for t in keep[:3] + ([targets] if loss == "mse" else [labels]):
            if t is None or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("Invalid fused run buffers: contiguous CPU tensors needed")
        r.loss, r.T = LOSSES[loss], t_len
        r.inputs, r.scale, r.outputs = inputs.data_ptr(), scale.data_ptr(), outputs.data_ptr()
        r.targets, r.labels = _ptr(targets), _ptr(labels)
        self._keep = keep  # keep the buffers alive while the struct points at them
        if self.quantised:  # chip precision: every trace rounded at every step, by the per-step kernel
            self._write_zero_traces()
            self._reseed()
            self.batch_slices = self.lib.ni_run(self._ref, t0, t1)
            return
        cap = self._records()
        self._set_records(True)
        try:
            for a in range(t0, t1, cap):
                self._materialise()
                self.batch_slices = self.lib.ni_run(self._ref, a, min(a + cap, t1))
                self._flush_chunk()
        finally:
            self._set_records(False)  # single steps update the traces themselves

    def run_trial(self, batch, task, *, apply_every: int | None = None,
                  on_epoch_end: Callable[[], None] | None = None) -> torch.Tensor:
        """A whole trial of ``batch`` (``trial_supported``): one native call per learning epoch of
        ``apply_every`` steps (default: the whole trial), ``on_epoch_end()`` after each (e.g. an optimizer step
        and :meth:`set_params`); the gradient accumulates into ``grads``. Returns the outputs (T, B, O) in the
        batch's dtype."""
        from neuroinit.tasks.base import _mask_total

        n_steps, batch_size = batch.inputs.shape[:2]
        f32 = torch.float32
        inputs = batch.inputs.detach().to(f32).contiguous()
        scale = (batch.mask / _mask_total(batch.mask)).to(f32).contiguous()
        outputs = torch.empty(n_steps, batch_size, self.cell.n_out, dtype=f32)
        kw = {"targets": batch.targets.to(f32).contiguous()} if task.loss_kind == "mse" else \
            {"labels": batch.targets.to(torch.int64).contiguous()}
        every = apply_every or n_steps
        for t0 in range(0, n_steps, every):
            self.run(inputs, scale, outputs, loss=task.loss_kind, t0=t0, t1=min(t0 + every, n_steps), **kw)
            if on_epoch_end is not None:
                on_epoch_end()
        return outputs.to(batch.inputs.dtype)

    # -------------------------------------------------------------- chunked exact update (float traces)
    @property
    def chunk_capacity(self) -> int | None:
        """Steps per chunk where the last run used the chunked exact update (None: per-step traces)."""
        return None if self._rec is None else self._rec["rec_L"].shape[0]

    def _records(self) -> int:
        """Allocates the chunk records once; returns their capacity in steps."""
        if self._rec is None:
            b, n, i = (int(getattr(self.run_struct, k)) for k in ("B", "N", "I"))
            cap = chunk_steps(n, i, self.full)
            # zeroed once (buffers are reused across runs): every page is touched, so the memory a run holds
            # does not depend on how many of the rows its length fills
            self._rec = {"rec_L": torch.zeros(cap, b, n), "rec_post": torch.zeros(cap, b, n),
                         "rec_pre": torch.zeros(cap, b, n), "rec_pre_in": torch.zeros(cap, b, i + 1),
                         "c": torch.zeros(b, n)}
        return self._rec["rec_L"].shape[0]

    def _set_records(self, on: bool) -> None:
        for name in ("rec_L", "rec_post", "rec_pre", "rec_pre_in"):
            setattr(self.run_struct, name, self._rec[name].data_ptr() if on else None)

    def _flush_chunk(self) -> None:
        """Adds the gradient of the recorded chunk (``ni_chunk_prepare``'s equations) by two GEMMs; full
        traces are brought to the chunk's end lazily (:meth:`_materialise`), only if anything needs them."""
        k = int(self.run_struct.rec_pos)
        if k == 0:
            return
        rec, g = self._rec, self.grads
        rows = self.lib.ni_chunk_prepare(self._ref, rec["c"].data_ptr())
        n = rec["rec_L"].shape[2]
        a = rec["rec_L"].view(-1, n)[:rows]  # (rows, N): Lf * post (factorised: rows without a learning signal dropped)
        with _gemm_threads(rows * n * n):
            add_at_b(g["w_rec"], a, rec["rec_pre"].view(-1, n)[:rows])
            # (I + 1, N): one pass over a. Oriented so: MKL's path for a.T @ (K B, I + 1) ran 8x slower (1.2 ms
            # vs 0.16 ms at K B = 1600, N = 256, I + 1 = 9)
            g_in_bias = rec["rec_pre_in"].view(-1, rec["rec_pre_in"].shape[2])[:rows].T @ a
            g["w_in"].add_(g_in_bias[:-1].T)
            g["bias"].add_(g_in_bias[-1])
        if not self.full:
            self.run_struct.rec_pos = 0
            return
        if not self._elig_zero:  # the chunk's first trace, decayed into every step of the chunk
            self.lib.ni_chunk_carry(self._ref, rec["c"].data_ptr())
        self._pending = k

    def _materialise(self) -> None:
        """Brings the full eligibility traces to the end of the last flushed chunk: ``e <- ed^K e + sum_s
        ed^(K - 1 - s) post_s (x) pre_s`` (a GEMM per batch element)."""
        k = self._pending
        if not k:
            return
        rec, bf = self._rec, self.buf
        beta = 0.0 if self._elig_zero else float(self.run_struct.ed) ** k  # beta 0: the old buffer is ignored
        # one GEMM per batch element on strided views of the records: a batched GEMM over the permuted records
        # made contiguous copies of them (memory growing with the number of chunk boundaries)
        n = bf["elig_rec"].shape[1]
        with _gemm_threads(k * n * n):
            for b in range(bf["elig_rec"].shape[0]):
                post = rec["rec_post"][:k, b].T  # (N, K), already weighted by ed^(K - 1 - s)
                bf["elig_rec"][b].addmm_(post, rec["rec_pre"][:k, b], beta=beta)
                in_bias = post @ rec["rec_pre_in"][:k, b]  # (N, I + 1)
                if self._elig_zero:
                    bf["elig_in"][b].copy_(in_bias[:, :-1])
                    bf["elig_bias"][b].copy_(in_bias[:, -1])
                else:
                    bf["elig_in"][b].mul_(beta).add_(in_bias[:, :-1])
                    bf["elig_bias"][b].mul_(beta).add_(in_bias[:, -1])
        self._pending = 0
        self._elig_zero = False
        self.run_struct.rec_pos = 0


def _cell_constants(cell) -> tuple:
    """What the fused run copies from a cell when it is built: its rule's constants and configuration."""
    return tuple(cell.trace_spec()), repr(sorted(cell.config().items()))


def chunk_steps(n_hidden: int, n_in: int, full: bool) -> int:
    """Steps per chunk of the chunked exact update. Factorised rules: 64 (GEMMs over 64 B rows run near the
    matmul rate). Full traces: records up to twice the size of the traces themselves (~2 N / 3 steps, 32..512),
    so that most trials fit one chunk and their traces are never materialised, while memory stays independent
    of T."""
    if not full:
        return 64
    return max(32, min(512, 2 * n_hidden * (n_hidden + n_in + 1) // (3 * n_hidden + n_in + 1)))


def make_backend(cell, batch_size: int, params, grads: dict[str, torch.Tensor], *, feedback=None,
                 quantiser=None, generator: torch.Generator | None = None, same_results_only: bool = False,
                 reuse: FusedOnline | None = None) -> FusedOnline | None:
    """The native backend of one online run (:class:`~neuroinit.learning.online.OnlineEprop`), or None where it
    does not apply (the rule then takes its PyTorch step): ``cell`` with ``params``, accumulating into ``grads``.
    ``same_results_only`` (``fast="auto"``) also declines chip-precision traces (their random draws differ from
    the PyTorch path's). ``reuse``: the rule's previous backend, reset and returned where it fits."""
    if same_results_only and quantiser is not None:
        return None
    if supports(cell, feedback=feedback, quantiser=quantiser) is not None:
        return None
    if any(g.dtype != torch.float32 or not g.is_contiguous() for g in grads.values()):
        return None
    if quantiser is not None and not _counters_fit(batch_size, cell.n_hidden, cell.n_in, code_dtype(quantiser)):
        return None
    if reuse is not None and reuse.matches(cell, batch_size, feedback=feedback, quantiser=quantiser):
        reuse.reset(params, grads)
        return reuse
    return FusedOnline(cell, params, batch_size, grads, feedback=feedback, quantiser=quantiser, generator=generator)


def trial_supported(batch, task) -> bool:
    """Whether :meth:`FusedOnline.run_trial` runs ``task``'s loss on ``batch`` (else the per-step path runs)."""
    return task.loss_kind in LOSSES and batch.inputs.device.type == "cpu"
