"""Fused BPTT: backpropagation through time without autograd's tape, for the rate and the plain LIF cells.

Autograd BPTT (:class:`neuroinit.learning.autograd.BPTT`) records ~10 graph nodes per step and replays them one
by one. Here one trial is three passes over explicit records (all tensors ``(T, B, N)``, time-major):

1. **forward with records**: the network run step by step (one ``(B, N) x (N, N)`` product per step; the input
   drive ``W_in u_t + b`` of all steps is one GEMM before the loop), keeping what the backward needs: the
   presynaptic signal of every step and the local derivative of its nonlinearity;
2. **backward recursion**, one step at a time from ``T - 1`` down to 0: the error ``e_t = d loss / d drive_t``
   of every neuron (one ``(B, N) x (N, N)`` product per step; the readout's share ``g_t W_out`` of all steps is
   one GEMM before the loop);
3. **weight gradients as GEMMs over all steps at once**: ``dW_rec = E^T P`` with ``E``, ``P`` the ``(T B, N)``
   errors and presynaptic records, ``dW_in = E^T U``, ``db = sum E``, ``dW_out = G^T R``, ``db_out = sum G``
   with ``G = d loss / d y`` (from ``task.loss`` by autograd on the outputs alone) and ``R`` what the readout
   sees.

The recursions (``g_t``: the loss gradient reaching step t's output, ``a = alpha``, ``f`` the activation; a
term with ``t + 1`` is 0 at ``t = T - 1``):

voltage form  ``x_t = (1-a) x_{t-1} + a d_t``, ``d_t = W_rec f(x_{t-1}) + W_in u_t + b``, ``y_t = W_out f(x_t) + b_out``::

    dx_t = f'(x_t) (g_t W_out + e_{t+1} W_rec) + (1-a) dx_{t+1},   e_t = a dx_t,   P_t = f(x_{t-1})

rate form  ``h_t = (1-a) h_{t-1} + a f(d_t)``, ``d_t = W_rec h_{t-1} + W_in u_t + b``, ``y_t = W_out h_t + b_out``::

    dh_t = g_t W_out + e_{t+1} W_rec + (1-a) dh_{t+1},   e_t = a f'(d_t) dh_t,   P_t = h_{t-1}

LIF (:func:`neuroinit.cells.lif.lif_step`: ``v_t = alpha v_{t-1} + W_rec z_{t-1} + W_in u_t + b - reset``,
``z_t = H(v_t - v_th)`` with pseudo-derivative ``psi_t`` (0 while refractory), ``y_t = kappa y_{t-1} + W_out z_t
+ b_out``; here ``e_t = dv_t``)::

    gy_t = g_t + kappa gy_{t+1}                                  (the leaky readout, backwards)
    dz_t = gy_t W_out + e_{t+1} W_rec - v_th e_{t+1}              (reset by subtraction)
    dz_t = gy_t W_out + e_{t+1} W_rec - alpha v_t e_{t+1}         (reset to zero)
    e_t  = psi_t dz_t + alpha e_{t+1}             (subtraction)   or   + alpha (1 - z_t) e_{t+1}   (to zero)
    P_t  = z_{t-1};  dW_out = GY^T Z,  db_out = sum GY

These are the chain rule through :func:`~neuroinit.cells.rate.rate_step` / ``lif_step`` exactly as autograd
applies it (the straight-through chip grid passes gradients unchanged), so the gradients equal autograd BPTT's
up to float rounding (sums in another order; ``tests/test_fused_bptt.py``). Memory: ``O(T B N)`` records, as
autograd's tape. Only untruncated BPTT (``truncation=None``) is fused.

The two loops run as PyTorch ops (any dtype; a few eager ops per step around the product) or in C
(:mod:`neuroinit.learning.fused_bptt_native`, float32: one call per loop, dense products through torch's own
BLAS or an AVX-512 kernel, products with spikes over the spikes only); :func:`_native` picks the faster one
(``benchmarks/experiment_speed.md``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from neuroinit.cells.base import CellParams, RecurrentCell
from neuroinit.learning import fused

__all__ = ["Records", "Workspace", "backward", "backward_records", "forward_records", "supports"]


def supports(cell: RecurrentCell, *, truncation: int | None = None) -> str | None:
    """None when the fused BPTT runs ``cell``; otherwise the reason it does not."""
    if truncation is not None:
        return f"truncation {truncation} (the fused BPTT is untruncated)"
    if cell.kernel_id == "lif":
        if cell.tau_syn is not None or cell.threshold_compare != ">" or cell.max_spikes != 1 or cell.reset_leaks:
            return "LIF with chip neuron options (synaptic current, '>=', spike counts, leaking reset)"
    elif cell.kernel_id != "rate":
        return f"no fused kernel for model {cell.model!r} (kernel_id {cell.kernel_id!r})"
    tensors = [getattr(cell, n) for n in ("w_in", "w_rec", "bias", "w_out", "b_out")]
    if any(t.dtype != torch.float32 for t in tensors):
        return "not float32 (the fused BPTT is single precision; float64 uses autograd)"
    if any(t.device.type != "cpu" for t in tensors):
        return "not on the CPU"
    return None


class Records(NamedTuple):
    """What the forward pass keeps for the backward, all ``(T, B, N)`` unless said otherwise.

    ``states`` (T + 1, B, N): the signal each step sends on (``f(x_t)``, ``h_t``, ``z_t``), row 0 the zero
    state's; ``deriv``: the local derivative (``f'(x_t)``; ``a f'(d_t)``; ``psi_t``); ``extra``: LIF with reset
    to zero: ``alpha v_t`` (else None)."""

    states: torch.Tensor
    deriv: torch.Tensor
    extra: torch.Tensor | None

    @property
    def pre(self) -> torch.Tensor:
        """Presynaptic signal of each step's recurrent product (``f(x_{t-1})``, ``h_{t-1}``, ``z_{t-1}``)."""
        return self.states[:-1]

    @property
    def seen(self) -> torch.Tensor:
        """What the readout sees at each step (``f(x_t)``, ``h_t``, ``z_t``)."""
        return self.states[1:]


class Workspace:
    """Record buffers kept from one trial to the next: allocating (and first touching) ``O(T B N)`` fresh
    memory at every trial cost as much as the arithmetic of a short one. Grows to the longest trial seen."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, n_steps: int, *shape: int, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised ``(n_steps, *shape)`` view of buffer ``name``."""
        t = self._bufs.get(name)
        if t is None or t.shape[0] < n_steps or tuple(t.shape[1:]) != shape or t.dtype != like.dtype:
            t = like.new_empty(n_steps, *shape)
            self._bufs[name] = t
        return t[:n_steps]


def _native(cell, native: bool | None, like: torch.Tensor, loop: str) -> bool:
    """Whether the native ``loop`` ("forward" or "backward"; :mod:`~neuroinit.learning.fused_bptt_native`,
    float32 CPU) runs: ``native`` when given, else where it is faster than the PyTorch loop (measured:
    benchmarks/experiment_speed.md): both loops when the native code's dense products are fast (torch's BLAS, MKL,
    or its AVX-512 kernel: ``fused_bptt_native.dense_products``), else only the LIF forward, whose product skips
    the zero spikes (~4% of the entries on Romo; the portable kernel's dense products run at about half MKL's
    rate)."""
    from neuroinit.learning import fused_bptt_native

    fits = like.dtype == torch.float32 and like.device.type == "cpu"
    if native and not fits:
        raise ValueError(f"Invalid native=True for {like.dtype} on {like.device}: the native loops are float32, CPU")
    if native is None:
        native = fits and (fused_bptt_native.fast_dense(cell.n_hidden) or (loop == "forward" and _model(cell) == "lif"))
    return bool(native) and fused_bptt_native.available()


def _model(cell) -> str:

    return "lif" if cell.kernel_id == "lif" else cell.form


@torch.no_grad()
def forward_records(cell: RecurrentCell, p: CellParams, inputs: torch.Tensor, ws: Workspace | None = None, *,
                    native: bool | None = None) -> tuple[torch.Tensor, Records]:
    """Run ``inputs`` (T, B, I) from the zero state; returns the outputs (T, B, O) (in ``ws``'s buffers: valid
    until its next use) and the :class:`Records`. ``native``: run the loop in C (None: where it is faster)."""
    ws = ws or Workspace()
    n_steps, batch, n_in = inputs.shape
    n, model = cell.n_hidden, _model(cell)
    drive_in = ws.get("drive_in", n_steps, batch, n, like=inputs)
    torch.addmm(p.bias, inputs.reshape(-1, n_in), p.w_in.T, out=drive_in.view(-1, n))  # W_in u_t + b
    # states[0]: the zero state's signal; states[t + 1]: step t's
    states = ws.get("states", n_steps + 1, batch, n, like=inputs)
    deriv = ws.get("deriv", n_steps, batch, n, like=inputs)
    extra = ws.get("extra", n_steps, batch, n, like=inputs) if model == "lif" and cell.reset == "zero" else None
    if _native(cell, native, inputs, "forward"):
        from neuroinit.learning import fused_bptt_native

        fused_bptt_native.forward(cell, p.w_rec, drive_in, states, deriv, extra)
    elif model == "lif":
        _forward_lif(cell, p.w_rec, drive_in, states, deriv, extra, ws)
    else:
        _forward_rate(cell, p.w_rec, drive_in, states, deriv)
    seen = states[1:]
    outputs = ws.get("outputs", n_steps, batch, cell.n_out, like=inputs)
    torch.addmm(p.b_out, seen.reshape(-1, n), p.w_out.T, out=outputs.view(-1, cell.n_out))
    if model == "lif":  # the leaky readout y_t = kappa y_{t-1} + W_out z_t + b_out
        for t in range(1, n_steps):
            outputs[t].add_(outputs[t - 1], alpha=float(cell.kappa))
    return outputs, Records(states, deriv, extra)


def _forward_rate(cell, w_rec: torch.Tensor, drive_in: torch.Tensor, states: torch.Tensor, deriv: torch.Tensor
                  ) -> None:
    n_steps, batch, n = drive_in.shape
    w_rec_t = w_rec.T.contiguous()  # MKL's product with a transposed view of W_rec ran ~2x slower
    a = float(cell.alpha)
    f = cell.activation.f
    tanh = cell.activation_name == "tanh"
    if cell.form == "voltage":
        volt = deriv  # the voltages x_t, replaced by f'(x_t) after the loop
        drive_in.mul_(a)
        states[0] = f(drive_in.new_zeros(batch, n))
        # per-step views made once (unbind): indexing in the loop costs ~1 us per view
        d_in, s, v = drive_in.unbind(0), states.unbind(0), volt.unbind(0)
        for t in range(n_steps):  # x_t = a (W_rec f(x_{t-1}) + W_in u_t + b) + (1 - a) x_{t-1}
            x = torch.addmm(d_in[t], s[t], w_rec_t, alpha=a, out=v[t])
            if t:
                x.add_(v[t - 1], alpha=1 - a)
            torch.tanh(x, out=s[t + 1]) if tanh else s[t + 1].copy_(f(x))
        if tanh:  # f'(x) = 1 - tanh(x)^2 from the recorded tanh(x)
            torch.mul(states[1:], states[1:], out=deriv).neg_().add_(1.0)
        else:
            deriv.copy_(cell.activation.df(volt))
    else:
        pre_act = deriv  # each step's pre-activation d_t, replaced by a f'(d_t) after the loop
        states[0] = 0.0
        act = drive_in.new_empty(batch, n)
        d_in, s, d = drive_in.unbind(0), states.unbind(0), pre_act.unbind(0)
        for t in range(n_steps):  # h_t = h_{t-1} + a (f(d_t) - h_{t-1})
            torch.addmm(d_in[t], s[t], w_rec_t, out=d[t])
            torch.tanh(d[t], out=act) if tanh else act.copy_(f(d[t]))
            torch.lerp(s[t], act, a, out=s[t + 1])
        deriv.copy_(cell.activation.df(pre_act)).mul_(a)


def _forward_lif(cell, w_rec: torch.Tensor, drive_in: torch.Tensor, spikes: torch.Tensor, deriv: torch.Tensor,
                 extra: torch.Tensor | None, ws: Workspace) -> None:
    from neuroinit.cells.lif import pseudo_derivative

    n_steps, batch, n = drive_in.shape
    w_rec_t = w_rec.T.contiguous()
    alpha, v_th = float(cell.alpha), float(cell.v_th)
    n_ref = cell.n_refractory
    volts = deriv  # replaced by psi after the loop
    free = ws.get("free", n_steps, batch, n, like=drive_in) if n_ref > 0 else None
    ref = drive_in.new_zeros(batch, n)
    v = drive_in.new_zeros(batch, n)
    spikes[0] = 0.0
    d_in, zs, vs = drive_in.unbind(0), spikes.unbind(0), volts.unbind(0)
    for t in range(n_steps):
        z = zs[t]
        av = v * alpha
        # leak and reset first, as lif_step does (alpha v - alpha v is exactly 0)
        v = torch.addcmul(av, z, av, value=-1.0, out=vs[t]) if extra is not None else \
            torch.add(av, z, alpha=-v_th, out=vs[t])
        v.add_(torch.addmm(d_in[t], z, w_rec_t))
        torch.gt(v, v_th, out=zs[t + 1])
        if n_ref > 0:
            torch.le(ref, 0.0, out=free[t])
            zs[t + 1].mul_(free[t])
            ref = torch.where(zs[t + 1] > 0, float(n_ref), (ref - 1).clamp_(min=0))
    if extra is not None:
        torch.mul(volts, alpha, out=extra)
    psi = pseudo_derivative(volts, v_th, float(cell.gamma))
    if free is not None:
        psi.mul_(free)
    volts.copy_(psi)


@torch.no_grad()
def backward_records(cell: RecurrentCell, p: CellParams, inputs: torch.Tensor, rec: Records,
                     out_grad: torch.Tensor, ws: Workspace | None = None, *, native: bool | None = None
                     ) -> dict[str, torch.Tensor]:
    """The five gradients from the records and ``out_grad = d loss / d y`` (T, B, O) (module docstring).
    ``native``: run the recursion in C (None: where it is faster)."""
    ws = ws or Workspace()
    n_steps, batch, n = rec.seen.shape
    lif = _model(cell) == "lif"
    if lif:  # the leaky readout: the gradient reaching y_t from every later output
        out_grad = out_grad.clone()
        kappa = float(cell.kappa)
        for t in range(n_steps - 2, -1, -1):
            out_grad[t].add_(out_grad[t + 1], alpha=kappa)
    flat_g = out_grad.reshape(-1, out_grad.shape[-1])
    direct = ws.get("direct", n_steps, batch, n, like=inputs)  # d loss / d (what the readout sees), directly
    torch.mm(flat_g, p.w_out, out=direct.view(-1, n))
    err = ws.get("err", n_steps, batch, n, like=inputs)
    w_rec = p.w_rec.contiguous()
    if _native(cell, native, inputs, "backward"):
        from neuroinit.learning import fused_bptt_native

        fused_bptt_native.backward(cell, w_rec, rec.states, rec.deriv, rec.extra, direct, err)
    elif lif:
        _recursion_lif(cell, rec, direct, w_rec, err)
    else:
        a = float(cell.alpha)
        voltage = cell.form == "voltage"
        dirs, errs, derivs = direct.unbind(0), err.unbind(0), rec.deriv.unbind(0)
        for t in range(n_steps - 1, -1, -1):
            dr = dirs[t]  # voltage form: err holds dx_t (e_t = a dx_t: the factor a goes into the products)
            if t < n_steps - 1:
                dr.addmm_(errs[t + 1], w_rec, alpha=a if voltage else 1.0)
                if not voltage:
                    dr.add_(dirs[t + 1], alpha=1 - a)  # dh_t
            torch.mul(dr, derivs[t], out=errs[t])
            if voltage and t < n_steps - 1:
                errs[t].add_(errs[t + 1], alpha=1 - a)
    flat_e = err.view(-1, n)
    # inputs and a column of ones: the input weights' and the bias's gradients in one product, oriented
    # (I + 1, N) (MKL ran E^T U ~8x slower than U^T E at these shapes: fused.py)
    ones = ws.get("inputs1", n_steps, batch, inputs.shape[-1] + 1, like=inputs)
    ones[..., :-1] = inputs
    ones[..., -1] = 1.0
    g_in_bias = ones.view(-1, ones.shape[-1]).T @ flat_e
    if lif and _native(cell, native, inputs, "backward"):  # the spikes are sparse: only their entries are summed
        from neuroinit.learning import fused_bptt_native

        g_rec = fused_bptt_native.grad_events(flat_e, rec.pre.reshape(-1, n))
    else:
        g_rec = fused.add_at_b(flat_e.new_zeros(n, n), flat_e, rec.pre.reshape(-1, n))
    if not lif and cell.form == "voltage":
        g_in_bias.mul_(float(cell.alpha))
        g_rec.mul_(float(cell.alpha))
    return {"w_rec": g_rec, "w_in": g_in_bias[:-1].T, "bias": g_in_bias[-1],
            "w_out": flat_g.T @ rec.seen.reshape(-1, n), "b_out": flat_g.sum(0)}


def _recursion_lif(cell, rec: Records, direct: torch.Tensor, w_rec: torch.Tensor, err: torch.Tensor) -> None:
    n_steps = direct.shape[0]
    alpha, v_th = float(cell.alpha), float(cell.v_th)
    zero_reset = rec.extra is not None
    dirs, errs, psi = direct.unbind(0), err.unbind(0), rec.deriv.unbind(0)
    if zero_reset:  # the leak factor alpha (1 - z_t) of every step, and alpha v_t
        leak, extra = torch.sub(1.0, rec.seen).mul_(alpha).unbind(0), rec.extra.unbind(0)
    for t in range(n_steps - 1, -1, -1):
        if t == n_steps - 1:
            torch.mul(dirs[t], psi[t], out=errs[t])
            continue
        nxt = errs[t + 1]
        dz = dirs[t].addmm_(nxt, w_rec)
        if zero_reset:
            dz.addcmul_(extra[t], nxt, value=-1.0)
            torch.mul(dz, psi[t], out=errs[t]).addcmul_(nxt, leak[t])
        else:
            dz.add_(nxt, alpha=-v_th)
            torch.mul(dz, psi[t], out=errs[t]).add_(nxt, alpha=alpha)


def backward(rule, batch, task):
    """``BPTT.backward`` through the fused passes, for a rule whose cell they run (:func:`supports` is None; the
    caller checks). Accumulates ``.grad`` like autograd BPTT; returns the :class:`~neuroinit.learning.base.Trial`."""
    from neuroinit.learning.base import Trial, accumulate_grads

    cell = rule.cell
    params = CellParams(*(t.detach() for t in cell.params()))
    inputs = batch.inputs.detach().to(params.w_rec.dtype)
    if rule.workspace is None:
        rule.workspace = Workspace()
    ws = rule.workspace
    outputs, rec = forward_records(cell, params, inputs, ws)
    y = outputs.to(batch.inputs.dtype, copy=True).requires_grad_(True)  # a copy: the buffers are reused
    with torch.enable_grad():
        loss = task.loss(y, batch)
        (out_grad,) = torch.autograd.grad(loss, y)
    grads = backward_records(cell, params, inputs, rec, out_grad.to(params.w_rec.dtype), ws)
    accumulate_grads(cell, grads)
    return Trial(loss.detach(), y.detach())
