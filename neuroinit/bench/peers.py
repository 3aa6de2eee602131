"""The workload and the methods timed: synthetic task, cells, snntorch/norse/autograd peers, gradient checks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from neuroinit.bench.config import METHODS, MODEL_VARIANTS, N_IN, N_OUT
from neuroinit.bench.machine import _import_quietly
from neuroinit.cells import cell_class, make_cell
from neuroinit.cells.base import CellParams
from neuroinit.cells.lif import pseudo_derivative, spike
from neuroinit.init import hardware_init
from neuroinit.learning.autograd import BPTT, AutogradEprop
from neuroinit.learning.chip import make_trace_quantiser
from neuroinit.learning.online import OnlineEprop
from neuroinit.tasks.base import Batch, Task


# ------------------------------------------------------------------------------------------ networks and tasks
class SyntheticTask(Task):
    """Masked MSE on given targets: the loss every method differentiates (``Task.loss``, ``output_error``)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        self.name, self.n_in, self.n_out, self.loss_kind, self.dt_ms = "synthetic", n_in, n_out, "mse", 1.0

    def batch(self, batch_size, *, generator, dtype=torch.float32, device="cpu"):
        raise NotImplementedError("SyntheticTask batches come from make_batch")

    def accuracy(self, y, batch):
        return 0.0


def make_batch(variant: str, t_len: int, b: int, *, generator: torch.Generator, n_in: int = N_IN,
               n_out: int = N_OUT, dtype=torch.float32, device="cpu") -> Batch:
    """Inputs (spikes at 10% for spiking nets, N(0, 1) for rate nets), N(0, 0.25) targets, all steps masked in."""
    if cell_class(MODEL_VARIANTS[variant][0]).spiking:
        x = (torch.rand(t_len, b, n_in, generator=generator, dtype=torch.float64) < 0.1).to(torch.float64)
    else:
        x = torch.randn(t_len, b, n_in, generator=generator, dtype=torch.float64)
    y = 0.5 * torch.randn(t_len, b, n_out, generator=generator, dtype=torch.float64)
    mask = torch.ones(t_len, b, dtype=torch.float64)
    return Batch(*(t.to(dtype=dtype, device=device) for t in (x, y, mask)))


def make_bench_cell(variant: str, n: int, profile: str, *, seed: int, n_in: int = N_IN, n_out: int = N_OUT,
                    dtype=torch.float32, device="cpu", gain: float = 1.0):
    """The benchmark network: hardware-aware init at ``gain`` (clamped into the profile's interval)."""
    model, form = MODEL_VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    params, _ = hardware_init(model, n_in, n, n_out, gain, profile, generator=g, out_of_range="clamp",
                              dtype=dtype, device=device)
    kwargs = {"rate": {"form": form, "alpha": 0.2}, "alif": {"reset": "zero"}}.get(model, {})  # alif: as norse
    return make_cell(model, params, profile=profile, **kwargs)


def _online_rule(cell, *, fast, seed: int) -> OnlineEprop:
    quantiser = None
    g = torch.Generator().manual_seed(seed + 1)
    if cell.profile.learns_on_chip:
        quantiser = make_trace_quantiser(cell, generator=g)
    return OnlineEprop(cell, feedback="symmetric", generator=g, trace_quantiser=quantiser, fast=fast)


# ------------------------------------------------------------------------------------------ peers
class _TriangleSpike(torch.autograd.Function):
    """Heaviside of ``x = v - v_th`` with neuroinit's pseudo-derivative as gradient (snntorch ``spike_grad``)."""

    @staticmethod
    def forward(ctx, x, v_th, gamma):
        ctx.save_for_backward(x)
        ctx.v_th, ctx.gamma = v_th, gamma
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * pseudo_derivative(x + ctx.v_th, ctx.v_th, ctx.gamma), None, None


class SnnTorchNet(torch.nn.Module):
    """snntorch ``RLeaky`` network equal to the neuroinit LIF cell (reset by subtraction; snntorch detaches the
    reset), input ``Linear`` with the bias, leaky readout ``y <- kappa y + W_out z + b_out``."""

    def __init__(self, p: CellParams, *, alpha: float, kappa: float, v_th: float, gamma: float) -> None:
        super().__init__()
        snn = _import_quietly("snntorch")
        n, n_in = p.w_in.shape
        self.fc_in = torch.nn.Linear(n_in, n).to(p.w_in.dtype)
        self.lif = snn.RLeaky(beta=alpha, linear_features=n, threshold=v_th, reset_mechanism="subtract",
                              spike_grad=lambda x: _TriangleSpike.apply(x, v_th, gamma))
        self.lif.to(p.w_in.dtype)
        self.fc_out = torch.nn.Linear(n, p.w_out.shape[0]).to(p.w_in.dtype)
        with torch.no_grad():
            self.fc_in.weight.copy_(p.w_in)
            self.fc_in.bias.copy_(p.bias)
            self.lif.recurrent.weight.copy_(p.w_rec)
            self.lif.recurrent.bias.zero_()
            self.fc_out.weight.copy_(p.w_out)
            self.fc_out.bias.copy_(p.b_out)
        self.kappa = kappa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[1], self.fc_in.out_features
        spk = x.new_zeros(b, n)
        mem = x.new_zeros(b, n)
        y = x.new_zeros(b, self.fc_out.out_features)
        ys = []
        for u in x:
            spk, mem = self.lif(self.fc_in(u), spk, mem)
            y = self.kappa * y + self.fc_out(spk)
            ys.append(y)
        return torch.stack(ys)

    def grads(self) -> dict[str, torch.Tensor]:
        w = self.lif.recurrent.weight.grad  # snntorch keeps autapses: compare off the diagonal, as neuroinit
        w = w * (1 - torch.eye(w.shape[0], dtype=w.dtype, device=w.device))
        return {"w_in": self.fc_in.weight.grad, "bias": self.fc_in.bias.grad,
                "w_rec": w, "w_out": self.fc_out.weight.grad,
                "b_out": self.fc_out.bias.grad}


class _NorsePeer(torch.nn.Module):
    """What norse's recurrent cells share here: ``w_in`` and ``w_rec`` as parameters divided by ``1 - alpha``
    (norse's Euler step multiplies its current by ``dt * tau_mem_inv = 1 - alpha``), the leaky readout
    ``y <- kappa y + W_out z + b_out`` over the spikes of :meth:`spikes`, and the gradients mapped back."""

    def __init__(self, p: CellParams, *, alpha: float, kappa: float) -> None:
        super().__init__()
        self.scale = 1.0 - alpha
        self.w_in = torch.nn.Parameter(p.w_in.detach() / self.scale)
        self.w_rec = torch.nn.Parameter(p.w_rec.detach() / self.scale)
        self.fc_out = torch.nn.Linear(p.w_in.shape[0], p.w_out.shape[0]).to(p.w_in.dtype)
        with torch.no_grad():
            self.fc_out.weight.copy_(p.w_out)
            self.fc_out.bias.copy_(p.b_out)
        self.kappa = kappa

    def spikes(self, x: torch.Tensor) -> torch.Tensor:
        """(T, B, N) spikes for neuroinit's inputs ``x`` (T, B, I)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(x.shape[1], self.fc_out.out_features)
        ys = []
        for zt in self.spikes(x):
            y = self.kappa * y + self.fc_out(zt)
            ys.append(y)
        return torch.stack(ys)

    def grads(self) -> dict[str, torch.Tensor]:
        # W = (1 - alpha) W_norse, so dL/dW = dL/dW_norse / (1 - alpha)
        return {"w_in": self.w_in.grad / self.scale, "w_rec": self.w_rec.grad / self.scale,
                "w_out": self.fc_out.weight.grad, "b_out": self.fc_out.bias.grad}


class NorseNet(_NorsePeer):
    """norse ``LIFRecurrent`` network equal to the neuroinit LIF cell with reset to zero: norse's current-based
    cell with ``dt * tau_syn_inv = 1`` (the current lasts one step), ``dt * tau_mem_inv = 1 - alpha`` and
    weights divided by ``1 - alpha``; triangle surrogate ``gamma relu(1 - |v - v_th|)`` (= neuroinit's for
    ``v_th = 1``); norse detaches the reset. No bias (norse has none); leaky readout as in neuroinit."""

    def __init__(self, p: CellParams, *, alpha: float, kappa: float, v_th: float, gamma: float,
                 dt: float = 1.0) -> None:
        super().__init__(p, alpha=alpha, kappa=kappa)
        norse_torch = _import_quietly("norse.torch")
        LIFParameters, LIFRecurrent = norse_torch.LIFParameters, norse_torch.LIFRecurrent
        n, n_in = p.w_in.shape
        params = LIFParameters(tau_syn_inv=torch.as_tensor(1.0 / dt), tau_mem_inv=torch.as_tensor(self.scale / dt),
                               v_leak=torch.as_tensor(0.0), v_th=torch.as_tensor(v_th),
                               v_reset=torch.as_tensor(0.0), method="triangle", alpha=gamma)
        self.lif = LIFRecurrent(n_in, n, p=params, dt=dt, input_weights=self.w_in, recurrent_weights=self.w_rec,
                                autapses=False)

    def spikes(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = self.lif(x)
        return z


class NorseLSNNNet(_NorsePeer):
    """norse ``LSNNRecurrent`` (norse's ALIF) mapped onto neuroinit's ALIF with reset to zero
    (:mod:`neuroinit.cells.alif`). norse is current-based Euler; the mapping (checked by
    ``tests/test_alif.py::test_norse_lsnn_equals_alif_without_recurrence``): ``dt * tau_syn_inv = 1`` (the current
    holds one step's input), ``dt * tau_mem_inv = 1 - alpha`` and ``dt * tau_adapt_inv = 1 - rho`` (norse's Euler
    factors equal neuroinit's), weights divided by ``1 - alpha``, ``beta_norse = beta / rho`` (norse raises the
    threshold before its decay), ``v_reset = v_leak = 0``, norse's threshold ``b`` = ``v_th + beta a``; inputs
    reach norse's membrane one step later, so norse reads ``u_{t+1}`` at step t (its initial current holds
    ``W_in u_0``). Recurrent spikes reach norse's membrane one step later than neuroinit's (``z_{t-2}``): the two
    networks are equal without recurrence only; with it, norse is the same neuron model timed at the same size.
    Triangle surrogate as :class:`NorseNet`; no bias (norse has none); leaky readout as in neuroinit."""

    def __init__(self, p: CellParams, *, alpha: float, rho: float, kappa: float, v_th: float, beta: float,
                 gamma: float, dt: float = 1.0) -> None:
        super().__init__(p, alpha=alpha, kappa=kappa)
        norse_torch = _import_quietly("norse.torch")
        dtype = p.w_in.dtype
        t = lambda x: torch.as_tensor(x, dtype=dtype)
        params = norse_torch.LSNNParameters(
            tau_syn_inv=t(1.0 / dt), tau_mem_inv=t(self.scale / dt), tau_adapt_inv=t((1.0 - rho) / dt),
            v_leak=t(0.0), v_th=t(v_th), v_reset=t(0.0), beta=t(beta / rho), method="triangle", alpha=gamma)
        n, n_in = p.w_in.shape
        self.lsnn = norse_torch.LSNNRecurrent(n_in, n, p=params, dt=dt, input_weights=self.w_in,
                                              recurrent_weights=self.w_rec, autapses=False)
        self.state_type, self.v_th = norse_torch.LSNNState, v_th

    def spikes(self, x: torch.Tensor) -> torch.Tensor:
        """(T, B, N) spikes for neuroinit's inputs ``x`` (T, B, I)."""
        b, n = x.shape[1], self.w_rec.shape[0]
        zero = x.new_zeros(b, n)
        state = self.state_type(z=zero, v=zero, i=x[0] @ self.w_in.T, b=torch.full_like(zero, self.v_th))
        z, _ = self.lsnn(torch.cat([x[1:], torch.zeros_like(x[:1])]), state)
        return z


def _peer_net(method: str, cell) -> torch.nn.Module:
    p = cell.params()
    kw = dict(alpha=float(cell.alpha), kappa=float(cell.kappa), v_th=float(cell.v_th), gamma=float(cell.gamma))
    if cell.model == "alif":
        return NorseLSNNNet(p, rho=float(cell.rho), beta=float(cell.beta), **kw).to(p.w_in.device)
    if method == "snntorch-bptt":
        return SnnTorchNet(p, **kw).to(p.w_in.device)
    return NorseNet(p, **kw).to(p.w_in.device)


def reference_lif_grads(p: CellParams, batch: Batch, task: Task, *, alpha: float, kappa: float, v_th: float,
                        gamma: float, reset: str, detach_reset: bool) -> dict[str, torch.Tensor]:
    """BPTT gradient of the e-prop LIF network written out (neuroinit's spike and pseudo-derivative), with the
    reset's spike detached or not: with ``detach_reset=False`` and ``reset='subtract'`` it is neuroinit's BPTT;
    with the reset detached it is what snntorch (subtract) and norse (zero) differentiate."""
    leaves = {k: getattr(p, k).detach().clone().requires_grad_() for k in ("w_in", "w_rec", "bias", "w_out",
                                                                          "b_out")}
    x = batch.inputs
    b, n = x.shape[1], p.w_rec.shape[0]
    v, z = x.new_zeros(b, n), x.new_zeros(b, n)
    y = x.new_zeros(b, p.w_out.shape[0])
    vt = torch.as_tensor(v_th, dtype=x.dtype)
    gm = torch.as_tensor(gamma, dtype=x.dtype)
    ys = []
    for u in x:
        zr = z.detach() if detach_reset else z
        reset_term = zr * vt if reset == "subtract" else zr * (alpha * v)
        v = alpha * v + z @ leaves["w_rec"].T + u @ leaves["w_in"].T + leaves["bias"] - reset_term
        z = spike(v, vt, gm)
        y = kappa * y + z @ leaves["w_out"].T + leaves["b_out"]
        ys.append(y)
    loss = task.loss(torch.stack(ys), batch)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    out = dict(zip(leaves, grads))
    out["w_rec"] = out["w_rec"] * (1 - torch.eye(n, dtype=x.dtype, device=x.device))
    return out


# ------------------------------------------------------------------------------------------ one trial per method
def _grads_of(cell) -> dict[str, torch.Tensor]:
    return {n: getattr(cell, n).grad for n in ("w_in", "w_rec", "bias", "w_out", "b_out")}


def _zero_grads(module: torch.nn.Module) -> None:
    for q in module.parameters():
        q.grad = None


def trial_fn(method: str, cell, batch: Batch, task: Task, *, seed: int = 0) -> Callable[[], None]:
    """A callable that runs one whole trial of ``method`` (forward and gradient) on ``cell``'s network."""
    if method in ("neuroinit-fused", "neuroinit-torch"):
        rule = _online_rule(cell, fast=method == "neuroinit-fused", seed=seed)

        def run():
            _zero_grads(cell)
            rule.backward(batch, task)
        run.rule = rule
        return run
    if method in ("autograd-eprop", "bptt", "neuroinit-bptt"):
        rule = {"autograd-eprop": AutogradEprop(cell), "bptt": BPTT(cell), "neuroinit-bptt": BPTT(cell, fast=True)
                }[method]

        def run():
            _zero_grads(cell)
            rule.backward(batch, task)
        return run
    net = _peer_net(method, cell)

    def run():
        _zero_grads(net)
        loss = task.loss(net(batch.inputs), batch)
        loss.backward()
    run.net = net
    return run


def method_applies(method: str, variant: str) -> bool:
    """snntorch: LIF; norse: LIF and ALIF (``LSNNRecurrent``); the fused BPTT: cells with a kernel. The online
    rule's fast path (``neuroinit-fused``) runs every variant: the native kernel, or for cells without one
    (ALIF) the recorded path, whose row says ``neuroinit-recorded``."""
    if method == "snntorch-bptt":
        return variant == "lif"
    if method == "norse-bptt":
        return variant in ("lif", "alif")
    if method == "neuroinit-bptt":
        return has_kernel(variant)
    return True


def has_kernel(variant: str) -> bool:
    """Whether the fused native step runs ``variant``'s cell."""
    return cell_class(MODEL_VARIANTS[variant][0]).kernel_id is not None


def _peer_available(method: str) -> str | None:
    """None when ``method`` can run here, else why not (a peer that does not import, no fused native step)."""
    if method == "neuroinit-fused":
        from neuroinit.learning import fused

        return None if fused.available() else f"fused step unavailable: {fused.unavailable_reason()}"
    if method not in ("snntorch-bptt", "norse-bptt"):
        return None
    try:
        _import_quietly("snntorch" if method == "snntorch-bptt" else "norse.torch")
    except Exception as e:  # noqa: BLE001  any import failure is recorded in the result, the method skipped
        return f"{type(e).__name__}: {e}"
    return None


# ------------------------------------------------------------------------------------------ gradient checks
def _max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for k, ref in b.items():
        if a.get(k) is None or ref is None:
            continue
        scale = max(float(ref.abs().max()), 1e-12)
        worst = max(worst, float((a[k] - ref).abs().max()) / scale)
    return worst


def check_gradients(variants=tuple(MODEL_VARIANTS), methods=METHODS, *, n: int = 12, b: int = 2,
                    t_len: int = 12, seed: int = 3) -> list[dict]:
    """Every method on a small case against its reference gradient; returns one record per check with the
    worst relative error and ``ok``. References: neuroinit-fused vs neuroinit-torch (float32, tolerance 1e-5);
    neuroinit-torch vs autograd-eprop (float64, 1e-9: online e-prop == autograd e-prop); bptt vs the written-out
    LIF BPTT (float64, 1e-9, LIF) ; snntorch / norse vs the written-out BPTT with detached reset (float32, 1e-4)."""
    out = []
    for variant in variants:
        g = torch.Generator().manual_seed(seed)
        for dtype in (torch.float32, torch.float64):
            cell = make_bench_cell(variant, n, "ideal", seed=seed, dtype=dtype)
            if variant == "lif":
                with torch.no_grad():  # denser spiking so that every path is exercised
                    cell.w_in.mul_(2.0)
            task = SyntheticTask(N_IN, N_OUT)
            batch = make_batch(variant, t_len, b, generator=g, dtype=dtype)
            got = {}
            for method in methods:
                if not method_applies(method, variant) or _peer_available(method) is not None:
                    continue
                if dtype == torch.float64 and method in ("neuroinit-fused", "neuroinit-bptt", "snntorch-bptt",
                                                         "norse-bptt"):
                    continue
                if dtype == torch.float32 and method in ("autograd-eprop", "bptt"):
                    continue
                fn = trial_fn(method, cell, batch, task, seed=seed)
                fn()
                got[method] = fn.net.grads() if hasattr(fn, "net") else {k: v.clone() for k, v in
                                                                          _grads_of(cell).items()}
            kw = {}
            if variant == "lif":
                kw = dict(alpha=float(cell.alpha), kappa=float(cell.kappa), v_th=float(cell.v_th),
                          gamma=float(cell.gamma))
            p = cell.params()
            for method, grads in got.items():
                if method == "neuroinit-fused":
                    ref, tol, what = got.get("neuroinit-torch"), 1e-5, "neuroinit-torch (plain PyTorch step)"
                elif method == "neuroinit-torch" and dtype == torch.float64:
                    ref, tol, what = got.get("autograd-eprop"), 1e-9, "autograd-eprop"
                elif method == "neuroinit-bptt":   # float32 only: against autograd BPTT on the same network
                    _zero_grads(cell)
                    BPTT(cell).backward(batch, task)
                    ref, tol, what = {k: v.clone() for k, v in _grads_of(cell).items()}, 1e-4, "autograd BPTT (float32)"
                elif method == "bptt" and variant == "lif":
                    ref = reference_lif_grads(p, batch, task, reset="subtract", detach_reset=False, **kw)
                    tol, what = 1e-9, "written-out LIF BPTT"
                elif method == "snntorch-bptt":
                    ref = reference_lif_grads(p, batch, task, reset="subtract", detach_reset=True, **kw)
                    tol, what = 1e-4, "written-out LIF BPTT, reset subtract (detached)"
                elif method == "norse-bptt" and variant == "lif":   # ALIF: norse detaches its adaptation
                    ref = reference_lif_grads(p._replace(bias=torch.zeros_like(p.bias)), batch, task,
                                              reset="zero", detach_reset=True, **kw)
                    tol, what = 1e-4, "written-out LIF BPTT, reset to zero (detached)"
                else:
                    continue
                if ref is None:
                    continue
                err = _max_rel(grads, ref)
                out.append({"variant": variant, "method": method, "dtype": str(dtype).replace("torch.", ""),
                            "reference": what, "max_rel_error": err, "tolerance": tol, "ok": err <= tol})
    return out
