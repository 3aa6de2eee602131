"""Throughput of online learning (e-prop, RFLO) next to autograd e-prop, BPTT, snntorch and norse.

For every configuration (model x hidden size N x batch B, T steps) each method runs whole trials of the same
network, input and loss; the time per trial over T is the time per step. Reported per method: median and spread
(quartiles, min, max) of the time per step over ``repeats`` trials, sample-steps/s (B / step time), synaptic
updates/s (B N (N + I + O) / step time: every weight's gradient advances once per sample-step), peak memory of
one trial, the background CPU load during each repeat, and, for neuroinit's online rules, the fraction of the
machine's roofline reached.

Methods (``METHODS``):
    neuroinit-fused  online e-prop / RFLO, one native call per trial (:mod:`neuroinit.learning.fused`), under the
                     chosen profile (chip-precision traces where it learns on chip) and under ``ideal``
    neuroinit-torch  the same rule through the plain PyTorch step (the fallback), ``ideal``
    autograd-eprop   the paper's method (detach where the state enters W_rec), autograd
    bptt             backpropagation through time, autograd
    snntorch-bptt    snntorch ``RLeaky`` (all-to-all recurrent, reset by subtraction) + leaky readout, BPTT
    norse-bptt       norse ``LIFRecurrent`` (its recurrent LIF cell, reset to zero) + leaky readout, BPTT
Peers run the same sizes, input and T; ``ratio`` is a method's time over neuroinit-fused (ideal) of the same
configuration. Before timing, :func:`check_gradients` verifies on a small case that every method timed computes
the gradient it should (so the bench never times a wrong kernel).

Roofline (``roofline``): per step, an online rule with stored eligibility traces (RFLO, LIF) reads and writes
every trace once, ``8 B N (N + I)`` bytes; a factorised one (voltage form) reads and writes the gradient,
``8 N (N + I)``. FLOPs: the network step ``2 B N (N + I + O)``, trace update ``3 B N (N + I)`` (stored traces),
gradient ``2 B N (N + I)``. The lower bound is ``max(bytes / bandwidth, flops / matmul rate)`` with the
bandwidth of the memory level the bytes live in (L2, L3 or DRAM, by working set), all measured at start-up
(:func:`calibrate`, cached per machine).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from neuroinit.cells import make_cell
from neuroinit.cells.base import CellParams
from neuroinit.cells.lif import pseudo_derivative, spike
from neuroinit.init import hardware_init
from neuroinit.learning.autograd import BPTT, AutogradEprop
from neuroinit.learning.chip import make_trace_quantiser
from neuroinit.learning.online import OnlineEprop
from neuroinit.profiles import load_profile
from neuroinit.tasks.base import Batch, Task

__all__ = ["BenchConfig", "METHODS", "MODEL_VARIANTS", "SCHEMA_VERSION", "run_bench", "calibrate",
           "environment", "check_gradients", "format_table", "roofline", "SyntheticTask"]

SCHEMA_VERSION = 2  # 2: chunk_steps, own_roofline_fraction, roofline.chunked
METHODS = ("neuroinit-fused", "neuroinit-torch", "autograd-eprop", "bptt", "snntorch-bptt", "norse-bptt")
# model variants: rate voltage form (factorised e-prop), rate form (RFLO, N x N traces), LIF (e-prop)
MODEL_VARIANTS = {"rate-voltage": ("rate", "voltage"), "rate-rflo": ("rate", "rate"), "lif": ("lif", None)}
N_IN, N_OUT = 8, 2


# ------------------------------------------------------------------------------------------ configuration
@dataclass
class BenchConfig:
    """What to run. ``models``: 'rate' (voltage and RFLO forms), 'lif' or 'both'."""

    profile: str = "ideal"
    models: str = "both"
    hidden: tuple[int, ...] = (128, 256, 512, 1024)
    batch: tuple[int, ...] = (1, 16, 64)
    steps: int = 100
    device: str = "cpu"
    repeats: int = 5
    quick: bool = False
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    memory_scaling: bool = True       # peak memory of online vs BPTT at T and 10 T (one configuration)
    recalibrate: bool = False
    max_seconds_per_method: float = 30.0  # fewer repeats for a method whose first trial is slower than this / 3

    def validate(self) -> None:
        if self.models not in ("rate", "lif", "both"):
            raise ValueError(f"Invalid model {self.models!r}: allowed rate, lif, both")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"Invalid device {self.device!r}: allowed cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("Invalid device 'cuda': no CUDA device is available here; allowed: cpu")
        for name, vals in (("hidden", self.hidden), ("batch", self.batch)):
            if not vals or any(not isinstance(v, int) or v < 1 for v in vals):
                raise ValueError(f"Invalid {name} {vals!r}: allowed a comma-separated list of integers >= 1")
        if not (isinstance(self.steps, int) and self.steps >= 2):
            raise ValueError(f"Invalid steps {self.steps!r}: allowed integers >= 2")
        if not (isinstance(self.repeats, int) and self.repeats >= 1):
            raise ValueError(f"Invalid repeats {self.repeats!r}: allowed integers >= 1")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"Invalid method {bad[0]!r}: allowed {', '.join(METHODS)}")
        load_profile(self.profile)

    def variants(self) -> list[str]:
        return {"rate": ["rate-voltage", "rate-rflo"], "lif": ["lif"],
                "both": ["rate-voltage", "rate-rflo", "lif"]}[self.models]


def quick_config(profile: str = "ideal", **overrides) -> BenchConfig:
    """The ``--quick`` configuration: N = 64, B = 1 and 16, T = 40, 3 repeats (well under 2 minutes)."""
    cfg = dict(profile=profile, hidden=(64,), batch=(1, 16), steps=40, repeats=3, quick=True,
               max_seconds_per_method=5.0)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(**cfg)


# ------------------------------------------------------------------------------------------ environment
# Where the host is read (tests point these at a faked host; nothing else in this module reads the machine's
# description): the CPU model, the cache sizes, and os.cpu_count() for the logical CPUs.
CPUINFO = Path("/proc/cpuinfo")
SYS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


def _cpu_model() -> str:
    try:
        with open(CPUINFO) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_sizes() -> dict[str, int]:
    """Cache sizes in bytes per level from sysfs (per core for L1/L2, shared L3): read by :func:`calibrate`
    and :func:`environment` only; :func:`roofline` takes them from the calibration it is given."""
    out: dict[str, int] = {}
    base = SYS_CACHE
    for idx in sorted(base.glob("index*")) if base.exists() else []:
        try:
            level = int((idx / "level").read_text())
            kind = (idx / "type").read_text().strip()
            size = (idx / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        mult = {"K": 1024, "M": 1024 ** 2}.get(size[-1], 1)
        out[f"L{level}"] = int(size.rstrip("KM")) * mult
    return out


def environment(device: str = "cpu") -> dict:
    """Machine, threads, OpenMP wait policy and versions, recorded with every result."""
    import numpy

    env = {
        "cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(), "machine": platform.machine(),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "numpy": numpy.__version__, "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default: spin, then sleep)"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "caches": _cache_sizes(), "device": device,
        "loadavg_at_start": _loadavg(),
    }
    for pkg in ("snntorch", "norse"):
        try:
            _import_quietly(pkg)
            from importlib.metadata import version

            env[pkg] = version(pkg)
        except Exception as e:  # noqa: BLE001  any import failure (ImportError, a torch ABI error) is recorded
            env[pkg] = f"unavailable: {type(e).__name__}"
    from neuroinit.learning import fused

    env["fused"] = "available" if fused.available() else f"unavailable: {fused.unavailable_reason()}"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


class _LoadMeter:
    """CPU time spent by everything else on the machine while a block runs, in cores (busy jiffies of all CPUs
    minus this process's CPU time, over wall time)."""

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        vals = [int(v) for v in fields]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self.b0, self.p0, self.t0 = self._busy(), _proc_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        b1, p1 = self._busy(), _proc_cpu()
        self.load = None
        if self.b0 is not None and b1 is not None and self.wall > 0:
            self.load = max((b1 - self.b0) - (p1 - self.p0), 0.0) / self.wall
        return False


def _proc_cpu() -> float:
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------------------------------ memory
def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_memory(fn: Callable[[], None], device: str) -> float | None:
    """Peak memory (MiB) ``fn`` adds on top of what was allocated before it: CUDA allocator peak, or the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs) on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    _release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    base = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if base is None or peak is None:
        return None
    return max(peak - base, 0) / 1024


# ------------------------------------------------------------------------------------------ calibration
def _calib_key(device: str) -> str:
    return "|".join([_cpu_model(), str(torch.get_num_threads()), torch.__version__, device,
                     os.environ.get("OMP_WAIT_POLICY", "")])


def _calib_path() -> Path:
    root = os.environ.get("NEUROINIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                             or os.path.expanduser("~/.cache"), "neuroinit")
    return Path(root) / "bench_calibration.json"


def _best_time(fn: Callable[[], None], repeats: int, sync: Callable[[], None]) -> float:
    """Fastest of ``repeats`` runs: what the machine can do (a shared machine only ever slows a run down)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def calibrate(device: str = "cpu", *, quick: bool = False, use_cache: bool = True) -> dict:
    """Measured memory bandwidth (GB/s, per level: L2-, L3- and DRAM-sized working sets) and float32 matmul
    rate (GFLOP/s) of this machine, read from the cache when it matches the CPU, thread count, torch version,
    device and OpenMP wait policy."""
    key = _calib_key(device)
    path = _calib_path()
    if use_cache and path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key and (device == "cuda" or "caches" in cached):
                return {**cached, "cached": True}
        except (OSError, ValueError):
            pass
    with _LoadMeter() as lm:
        out = _measure_device(device, quick)
    out.update(key=key, load=lm.load, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"), quick=quick)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass
    return {**out, "cached": False}


def _measure_device(device: str, quick: bool) -> dict:
    if device == "cuda":
        sync = torch.cuda.synchronize
        a = torch.zeros(2 ** 28, device="cuda")  # 1 GiB
        t = _best_time(lambda: a.mul_(0.999).add_(0.001), 5, sync)
        bw = 2 * 2 * a.numel() * 4 / t / 1e9  # two in-place passes, read + write each
        m = torch.randn(8192, 8192, device="cuda")
        t = _best_time(lambda: m @ m, 5, sync)
        gflops = 2 * 8192 ** 3 / t / 1e9
        return {"bandwidth_gbs": {"L2": bw, "L3": bw, "DRAM": bw}, "matmul_gflops": gflops,
                "method": "torch in-place scale-add over 1 GiB; 8192^2 matmul"}
    caches = _cache_sizes()
    sizes = working_sets(caches, quick=quick)
    bw = _stream_bandwidth(sizes, quick)
    n = 1024 if quick else 2048
    m = torch.randn(n, n)
    t = _best_time(lambda: m @ m, 3 if quick else 5, lambda: None)
    return {"bandwidth_gbs": bw, "matmul_gflops": 2 * n ** 3 / t / 1e9,
            "working_set_bytes": sizes, "caches": caches,
            "method": ("fused stream kernel a <- c a + d in place (read + write) per working set; "
                       f"{n}^2 float32 torch matmul")}


def _stream_bandwidth(sizes: dict[str, int], quick: bool) -> dict[str, float]:
    """GB/s streaming each working set (read + write in place): the fused stream kernel, else torch."""
    from neuroinit.learning import fused

    bw = {}
    lib = fused._load()
    for level, nbytes in sizes.items():
        n = nbytes // 4
        a = torch.zeros(n)
        reps = max(1, int((2 ** 30 if not quick else 2 ** 28) // nbytes))
        if lib is not None:
            t = _best_time(lambda a=a, n=n, reps=reps: lib.ni_stream(a.data_ptr(), n, reps), 3 if quick else 5,
                           lambda: None)
            bw[level] = 8 * n * reps / t / 1e9
        else:
            t = _best_time(lambda a=a: a.mul_(0.999).add_(0.001), 3 if quick else 5, lambda: None)
            bw[level] = 16 * n / t / 1e9
    return bw


def working_sets(caches: dict[str, int], *, quick: bool = False) -> dict[str, int]:
    """Bytes streamed to measure each level's bandwidth: half of L2, a quarter of L3 (at least L2), and for
    DRAM twice L3 but at least 256 MiB (128 MiB quick), so a machine with a huge L3 (hundreds of MiB) still
    measures DRAM without allocating gigabytes."""
    l2, l3 = caches.get("L2", 512 * 1024), caches.get("L3", 8 * 2 ** 20)
    floor = 128 * 2 ** 20 if quick else 256 * 2 ** 20
    return {"L2": l2 // 2, "L3": max(l3 // 4, l2), "DRAM": max(2 * l3, floor)}


def roofline(variant: str, n: int, b: int, n_in: int, n_out: int, calib: dict, device: str = "cpu", *,
             steps: int | None = None, chunk: int | None = None) -> dict:
    """Lower bounds on the time of one online step (module docstring) and what bounds them.

    The top-level keys are the bound of a rule that keeps its traces and updates them at every step (the
    per-step trace roofline). With ``chunk`` (steps per chunk of the chunked exact update, :mod:`neuroinit.
    learning.fused`) and ``steps`` (T), ``"chunked"`` holds the bound of the work that update does: the forward
    product, one gradient GEMM over every step's records and, for stored traces in trials longer than a chunk,
    the GEMMs carrying the traces across the ``ceil(T / K) - 1`` chunk boundaries (plus one read + write of the
    traces there), at the matmul rate and bandwidth.

    ``calib`` (from :func:`calibrate`) carries everything about the machine: ``bandwidth_gbs`` per level,
    ``matmul_gflops`` and ``caches`` (bytes of L2 and L3, which decide the level the working set streams
    from; without them, DRAM). Nothing here reads the host."""
    full = variant != "rate-voltage"
    syn = n * (n + n_in)
    bytes_ = 8 * b * syn if full else 8 * syn
    flops = 2 * b * n * (n + n_in + n_out) + (3 * b * syn if full else 0) + 2 * b * syn
    working_set = 4 * (b * syn if full else syn) + 4 * 2 * syn  # traces (or gradient) + weights + gradient
    caches = calib.get("caches") or {}
    if device == "cuda":
        level = "DRAM"
    elif working_set <= caches.get("L2", 0):
        level = "L2"
    elif working_set <= caches.get("L3", 0):
        level = "L3"
    else:
        level = "DRAM"
    bw = calib["bandwidth_gbs"][level] * 1e9
    rate = calib["matmul_gflops"] * 1e9
    t_mem, t_flop = bytes_ / bw, flops / rate
    out = {"bytes_per_step": bytes_, "flops_per_step": flops, "working_set_bytes": working_set,
           "memory_level": level, "memory_bound_us": t_mem * 1e6, "flop_bound_us": t_flop * 1e6,
           "bound_us": max(t_mem, t_flop) * 1e6, "bound_by": "memory" if t_mem >= t_flop else "compute"}
    if chunk and steps:
        syn_b = n * (n + n_in + 1)  # weights + bias, the gradient GEMM's output
        boundaries = (math.ceil(steps / chunk) - 1) if full else 0
        c_flops = 2 * b * n * (n + n_in + n_out) + 2 * b * syn_b + 2 * b * syn_b * chunk * boundaries / steps
        c_bytes = 12 * b * syn_b * boundaries / steps
        c_mem, c_flop = c_bytes / bw, c_flops / rate
        out["chunked"] = {"chunk_steps": chunk, "boundaries": boundaries, "flops_per_step": c_flops,
                          "bytes_per_step": c_bytes, "bound_us": max(c_mem, c_flop) * 1e6,
                          "bound_by": "memory" if c_mem > c_flop else "compute"}
    return out


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
    """Inputs (spikes at 10% for LIF, N(0, 1) for rate nets), N(0, 0.25) targets, all steps masked in."""
    if variant == "lif":
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
    kwargs = {"form": form, "alpha": 0.2} if model == "rate" else {}
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


class NorseNet(torch.nn.Module):
    """norse ``LIFRecurrent`` network equal to the neuroinit LIF cell with reset to zero: norse's current-based
    cell with ``dt * tau_syn_inv = 1`` (the current lasts one step), ``dt * tau_mem_inv = 1 - alpha`` and
    weights divided by ``1 - alpha``; triangle surrogate ``gamma relu(1 - |v - v_th|)`` (= neuroinit's for
    ``v_th = 1``); norse detaches the reset. No bias (norse has none); leaky readout as in neuroinit."""

    def __init__(self, p: CellParams, *, alpha: float, kappa: float, v_th: float, gamma: float,
                 dt: float = 1.0) -> None:
        super().__init__()
        norse_torch = _import_quietly("norse.torch")
        LIFParameters, LIFRecurrent = norse_torch.LIFParameters, norse_torch.LIFRecurrent
        beta = 1.0 - alpha
        n, n_in = p.w_in.shape
        params = LIFParameters(tau_syn_inv=torch.as_tensor(1.0 / dt), tau_mem_inv=torch.as_tensor(beta / dt),
                               v_leak=torch.as_tensor(0.0), v_th=torch.as_tensor(v_th),
                               v_reset=torch.as_tensor(0.0), method="triangle", alpha=gamma)
        self.beta = beta
        self.w_in = torch.nn.Parameter(p.w_in.detach() / beta)
        self.w_rec = torch.nn.Parameter(p.w_rec.detach() / beta)
        self.lif = LIFRecurrent(n_in, n, p=params, dt=dt, input_weights=self.w_in, recurrent_weights=self.w_rec,
                                autapses=False)
        self.fc_out = torch.nn.Linear(n, p.w_out.shape[0]).to(p.w_in.dtype)
        with torch.no_grad():
            self.fc_out.weight.copy_(p.w_out)
            self.fc_out.bias.copy_(p.b_out)
        self.kappa = kappa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = self.lif(x)
        y = x.new_zeros(x.shape[1], self.fc_out.out_features)
        ys = []
        for zt in z:
            y = self.kappa * y + self.fc_out(zt)
            ys.append(y)
        return torch.stack(ys)

    def grads(self) -> dict[str, torch.Tensor]:
        # W = beta * W_norse, so dL/dW = dL/dW_norse / beta
        return {"w_in": self.w_in.grad / self.beta, "w_rec": self.w_rec.grad / self.beta,
                "w_out": self.fc_out.weight.grad, "b_out": self.fc_out.bias.grad}


def _peer_net(method: str, cell) -> torch.nn.Module:
    p = cell.params()
    kw = dict(alpha=float(cell.alpha), kappa=float(cell.kappa), v_th=float(cell.v_th), gamma=float(cell.gamma))
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
    if method in ("autograd-eprop", "bptt"):
        rule = AutogradEprop(cell) if method == "autograd-eprop" else BPTT(cell)

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
    return variant == "lif" or method not in ("snntorch-bptt", "norse-bptt")


def _import_quietly(name: str):
    """Import a peer package; norse's import calls the deprecated ``torch.jit.script`` (a FutureWarning)."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(name)


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


def check_gradients(variants=("rate-voltage", "rate-rflo", "lif"), methods=METHODS, *, n: int = 12, b: int = 2,
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
                if dtype == torch.float64 and method in ("neuroinit-fused", "snntorch-bptt", "norse-bptt"):
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
                elif method == "bptt" and variant == "lif":
                    ref = reference_lif_grads(p, batch, task, reset="subtract", detach_reset=False, **kw)
                    tol, what = 1e-9, "written-out LIF BPTT"
                elif method == "snntorch-bptt":
                    ref = reference_lif_grads(p, batch, task, reset="subtract", detach_reset=True, **kw)
                    tol, what = 1e-4, "written-out LIF BPTT, reset subtract (detached)"
                elif method == "norse-bptt":
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


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Result:
    variant: str
    hidden: int
    batch: int
    steps: int
    method: str
    profile: str
    us_per_step: float | None = None
    us_per_step_q1: float | None = None
    us_per_step_q3: float | None = None
    us_per_step_min: float | None = None
    us_per_step_max: float | None = None
    repeats_us: list[float] = field(default_factory=list)
    background_load: list[float | None] = field(default_factory=list)
    sample_steps_per_s: float | None = None
    synaptic_updates_per_s: float | None = None
    peak_memory_mib: float | None = None
    state_bytes: int | None = None
    ratio_to_fused: float | None = None
    roofline: dict | None = None
    roofline_fraction: float | None = None      # per-step trace bound / measured (may exceed 1 when chunked)
    own_roofline_fraction: float | None = None  # bound of the chunked update's own work / measured
    fast_path: bool | None = None
    chunk_steps: int | None = None              # steps per chunk where the chunked exact update ran
    skipped: str | None = None


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def time_method(method: str, variant: str, n: int, b: int, cfg: BenchConfig, profile: str) -> Result:
    res = Result(variant, n, b, cfg.steps, method, profile)
    why = _peer_available(method)
    if why is not None:
        res.skipped = why
        return res
    cell = make_bench_cell(variant, n, profile, seed=cfg.seed, device=cfg.device)
    batch = make_batch(variant, cfg.steps, b, generator=torch.Generator().manual_seed(cfg.seed + 7),
                       device=cfg.device)
    task = SyntheticTask(N_IN, N_OUT)
    fn = trial_fn(method, cell, batch, task, seed=cfg.seed)
    sync = _sync(cfg.device)
    t0 = time.perf_counter()
    fn()  # warm-up (builds the fused library on first use, allocator, caches)
    sync()
    first = time.perf_counter() - t0
    repeats = cfg.repeats
    if first * repeats > cfg.max_seconds_per_method:
        repeats = max(1, min(repeats, int(cfg.max_seconds_per_method / max(first, 1e-9))))
    times, loads = [], []
    for _ in range(repeats):
        with _LoadMeter() as lm:
            fn()
            sync()
        times.append(lm.wall / cfg.steps * 1e6)
        loads.append(lm.load)
    res.repeats_us, res.background_load = times, loads
    res.us_per_step = statistics.median(times)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) >= 2 else [times[0]] * 3
    res.us_per_step_q1, res.us_per_step_q3 = q[0], q[2]
    res.us_per_step_min, res.us_per_step_max = min(times), max(times)
    timed_rule = fn
    res.sample_steps_per_s = b / (res.us_per_step * 1e-6)
    res.synaptic_updates_per_s = b * n * (n + N_IN + N_OUT) / (res.us_per_step * 1e-6)
    res.peak_memory_mib = trial_memory(method, variant, n, b, cfg.steps, profile, cfg)
    rule = getattr(timed_rule, "rule", None)
    if rule is not None:
        res.fast_path = rule.uses_fast_path
        if method == "neuroinit-fused" and not rule.uses_fast_path:
            res.method = "neuroinit-torch"  # the row names the path that ran (the fused step declined the cell)
        if rule._fused is not None:
            res.state_bytes = rule._fused.state_bytes()
            res.chunk_steps = rule._fused.chunk_capacity
    return res


def _release_free_memory() -> None:
    """Give the pages of freed heap memory back (glibc ``malloc_trim``), so that memory a trial reuses counts
    again in its resident set: without it, memory freed by earlier runs is reused unseen."""
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def trial_memory(method: str, variant: str, n: int, b: int, t_len: int, profile: str, cfg: BenchConfig
                 ) -> float | None:
    """Peak memory (MiB) of one trial of a freshly built network and input (the building not counted)."""
    cell = make_bench_cell(variant, n, profile, seed=cfg.seed, device=cfg.device)
    batch = make_batch(variant, t_len, b, generator=torch.Generator().manual_seed(1), device=cfg.device)
    fn = trial_fn(method, cell, batch, SyntheticTask(N_IN, N_OUT), seed=cfg.seed)
    return _peak_memory(fn, cfg.device)


def memory_scaling(cfg: BenchConfig, variant: str = "lif", n: int = 256, b: int = 16,
                   lengths: tuple[int, int] = (100, 1000)) -> list[dict]:
    """Peak memory of one trial at two sequence lengths: online rules stay flat, BPTT grows with T."""
    out = []
    for method in ("neuroinit-fused", "neuroinit-torch", "bptt"):
        row = {"variant": variant, "hidden": n, "batch": b, "method": method, "profile": "ideal"}
        for t_len in lengths:
            row[f"peak_memory_mib_T{t_len}"] = trial_memory(method, variant, n, b, t_len, "ideal", cfg)
        m0, m1 = row[f"peak_memory_mib_T{lengths[0]}"], row[f"peak_memory_mib_T{lengths[1]}"]
        row["growth"] = (m1 / m0 - 1.0) if m0 and m1 is not None else None
        out.append(row)
    return out


def _jobs(cfg: BenchConfig) -> list[tuple[str, int, int, str, str]]:
    jobs = []
    for variant in cfg.variants():
        for n in cfg.hidden:
            for b in cfg.batch:
                for method in cfg.methods:
                    if not method_applies(method, variant):
                        continue
                    profiles = [cfg.profile, "ideal"] if method == "neuroinit-fused" else ["ideal"]
                    for prof in dict.fromkeys(profiles):
                        jobs.append((variant, n, b, method, prof))
    return jobs


def run_bench(cfg: BenchConfig, *, progress: Callable[[str], None] | None = None,
              on_result: Callable[[Result], None] | None = None) -> dict:
    """Run the benchmark; returns the JSON-able result (schema ``SCHEMA_VERSION``)."""
    cfg.validate()
    t_start = time.perf_counter()
    env = environment(cfg.device)
    if progress:
        progress("calibrating (memory bandwidth, matmul rate)")
    calib = calibrate(cfg.device, quick=cfg.quick, use_cache=not cfg.recalibrate)
    if progress:
        progress("checking gradients of every method on a small case")
    checks = check_gradients(cfg.variants(), cfg.methods)
    failed = {(c["variant"], c["method"]) for c in checks if not c["ok"]}
    results: list[Result] = []
    for variant, n, b, method, prof in _jobs(cfg):
        if progress:
            progress(f"{variant} N={n} B={b} {method} [{prof}]")
        if (variant, method) in failed:
            res = Result(variant, n, b, cfg.steps, method, prof, skipped="gradient check failed")
        else:
            res = time_method(method, variant, n, b, cfg, prof)
        if method == "neuroinit-fused" and res.us_per_step is not None:
            res.roofline = roofline(variant, n, b, N_IN, N_OUT, calib, cfg.device, steps=cfg.steps,
                                    chunk=res.chunk_steps)
            res.roofline_fraction = res.roofline["bound_us"] / res.us_per_step
            if "chunked" in res.roofline:
                res.own_roofline_fraction = res.roofline["chunked"]["bound_us"] / res.us_per_step
        results.append(res)
        if on_result:
            on_result(res)
    # ratios to neuroinit-fused (ideal) of the same configuration
    base = {(r.variant, r.hidden, r.batch): r.us_per_step for r in results
            if r.method == "neuroinit-fused" and r.profile == "ideal" and r.us_per_step}
    for r in results:
        ref = base.get((r.variant, r.hidden, r.batch))
        if ref and r.us_per_step:
            r.ratio_to_fused = r.us_per_step / ref
    mem = []
    if cfg.memory_scaling and "lif" in cfg.variants():
        if progress:
            progress("memory vs sequence length")
        n_mem, b_mem = (64, 4) if cfg.quick else (256, 16)
        mem = memory_scaling(cfg, "lif", n_mem, b_mem, (cfg.steps, 10 * cfg.steps))
    cfg_d = asdict(cfg)
    cfg_d["hidden"], cfg_d["batch"], cfg_d["methods"] = list(cfg.hidden), list(cfg.batch), list(cfg.methods)
    return {"schema_version": SCHEMA_VERSION, "config": cfg_d, "environment": env, "calibration": calib,
            "gradient_checks": checks, "results": [asdict(r) for r in results], "memory_scaling": mem,
            "wall_seconds": time.perf_counter() - t_start, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


# ------------------------------------------------------------------------------------------ rendering
def _fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _si(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.3g}{unit}"
    return f"{v:.3g}"


TABLE_HEADER = ("model", "N", "B", "method", "profile", "us/step", "IQR", "samp-steps/s", "syn-upd/s",
                "peak MiB", "x fused", "roofline", "own roofline", "load")


def table_row(r: dict) -> tuple[str, ...]:
    if r.get("skipped"):
        return (r["variant"], str(r["hidden"]), str(r["batch"]), r["method"], r["profile"], "skipped: "
                + r["skipped"][:40], "", "", "", "", "", "", "", "")
    loads = [v for v in r["background_load"] if v is not None]
    iqr = f"{_fmt(r['us_per_step_q1'])}-{_fmt(r['us_per_step_q3'])}"
    roof = own = "-"
    if r.get("roofline_fraction") is not None:
        rf = r["roofline"]
        roof = f"{100 * r['roofline_fraction']:.0f}% {rf['memory_level'] if rf['bound_by'] == 'memory' else 'flop'}"
    if r.get("own_roofline_fraction") is not None:
        c = r["roofline"]["chunked"]
        own = f"{100 * r['own_roofline_fraction']:.0f}% {'flop' if c['bound_by'] == 'compute' else 'mem'}"
    return (r["variant"], str(r["hidden"]), str(r["batch"]), r["method"], r["profile"], _fmt(r["us_per_step"]),
            iqr, _si(r["sample_steps_per_s"]), _si(r["synaptic_updates_per_s"]), _fmt(r["peak_memory_mib"], ".1f"),
            _fmt(r["ratio_to_fused"], ".2f"), roof, own, _fmt(statistics.median(loads), ".2f") if loads else "-")


def format_table(result: dict, *, markdown: bool = False) -> str:
    """The results as an aligned text table (or a markdown table), followed by checks, memory and environment."""
    rows = [table_row(r) for r in result["results"]]
    lines = []
    if markdown:
        lines.append("| " + " | ".join(TABLE_HEADER) + " |")
        lines.append("|" + "|".join("---" for _ in TABLE_HEADER) + "|")
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    else:
        widths = [max(len(c[i]) for c in [TABLE_HEADER, *rows]) for i in range(len(TABLE_HEADER))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(TABLE_HEADER, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    env, cal = result["environment"], result["calibration"]
    bw = ", ".join(f"{k} {v:.1f}" for k, v in cal["bandwidth_gbs"].items())
    lines += ["",
              ("us/step: median over repeats (IQR: quartiles); x fused: time / neuroinit-fused (ideal); "
               "roofline: bound of a rule that updates every trace at every step / measured (memory level or "
               "flop; over 100% where the chunked update moves less); own roofline: bound of the chunked "
               "update's own work / measured; load: background CPU cores busy"),
              (f"calibration{' (cached)' if cal.get('cached') else ''}: bandwidth GB/s {bw}; matmul "
               f"{cal['matmul_gflops']:.1f} GFLOP/s"),
              (f"environment: {env['cpu_model']}, {env['logical_cpus']} CPUs, torch {env['torch']} "
               f"({env['torch_threads']} threads), OMP_WAIT_POLICY {env['omp_wait_policy']}, device "
               f"{env['device']}, fused {env['fused']}")]
    bad = [c for c in result["gradient_checks"] if not c["ok"]]
    lines.append(f"gradient checks: {len(result['gradient_checks']) - len(bad)}/{len(result['gradient_checks'])}"
                 " ok" + ("" if not bad else " FAILED: " + ", ".join(f"{c['variant']}/{c['method']}" for c in bad)))
    for m in result.get("memory_scaling", []):
        ks = sorted(k for k in m if k.startswith("peak_memory_mib_T"))
        vals = ", ".join(f"T={k.rsplit('T', 1)[1]}: {_fmt(m[k], '.1f')} MiB" for k in ks)
        growth = "-" if m["growth"] is None else f"{100 * m['growth']:+.0f}%"
        lines.append(f"memory {m['variant']} N={m['hidden']} B={m['batch']} {m['method']}: {vals} ({growth})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ targets (issue 7)
def _rows(results: list[dict]) -> list[dict]:
    return [r for res in results for r in res["results"] if r.get("us_per_step") is not None]


def _find(rows, variant, method, n, b, profile="ideal"):
    for r in rows:
        if (r["variant"], r["method"], r["hidden"], r["batch"], r["profile"]) == (variant, method, n, b, profile):
            return r
    return None


def evaluate_targets(results: list[dict]) -> list[dict]:
    """Each performance target of issue 7 against stored results (one or more ``run_bench`` outputs, e.g. the
    LIF and the rate runs): ``met`` is True / False, or None where the results hold no measurement for it."""
    rows = _rows(results)
    out = []

    def add(target, measured, met, note=""):
        out.append({"target": target, "measured": measured, "met": met, "note": note})

    fused = _find(rows, "lif", "neuroinit-fused", 256, 16)
    for peer, need in (("snntorch-bptt", 10), ("norse-bptt", 10), ("autograd-eprop", 5)):
        r = _find(rows, "lif", peer, 256, 16)
        if fused and r:
            x = r["us_per_step"] / fused["us_per_step"]
            add(f"LIF online e-prop >= {need}x {peer} (N=256, B=16)",
                f"{x:.1f}x ({fused['us_per_step']:.0f} vs {r['us_per_step']:.0f} us/step)", x >= need)
        else:
            add(f"LIF online e-prop >= {need}x {peer} (N=256, B=16)", "not measured", None)
    r = _find(rows, "lif", "neuroinit-fused", 256, 1)
    add("LIF online step <= 20 us (N=256, B=1, CPU)",
        f"{r['us_per_step']:.1f} us/step (min {r['us_per_step_min']:.1f})" if r else "not measured",
        (r["us_per_step"] <= 20) if r else None)
    for variant, label, need, cond in (
            ("rate-rflo", "RFLO traces larger than the cache (N >= 512, B >= 16)", 0.8,
             lambda r: r["hidden"] >= 512 and r["batch"] >= 16),
            ("lif", "LIF at N >= 512, B = 64", 0.5, lambda r: r["hidden"] >= 512 and r["batch"] == 64)):
        sel = [r for r in rows if r["variant"] == variant and r["method"] == "neuroinit-fused"
               and r["profile"] == "ideal" and r.get("roofline_fraction") is not None and cond(r)]
        if not sel:
            add(f">= {need:.0%} of the roofline for {label}", "not measured", None)
            continue
        for r in sel:
            rf = r["roofline"]
            own = ""
            if r.get("own_roofline_fraction") is not None:
                own = (f"; chunked update: {r['own_roofline_fraction']:.0%} of its own bound "
                       f"{rf['chunked']['bound_us']:.0f} us")
            add(f">= {need:.0%} of the roofline for {label}: N={r['hidden']} B={r['batch']}",
                f"{r['roofline_fraction']:.0%} ({r['us_per_step']:.0f} us vs per-step trace bound "
                f"{rf['bound_us']:.0f} us, {rf['bound_by']}, {rf['memory_level']}{own})",
                r["roofline_fraction"] >= need)
    mem = [m for res in results for m in res.get("memory_scaling", []) if m["method"] == "neuroinit-fused"]
    for m in mem:
        ks = sorted((k for k in m if k.startswith("peak_memory_mib_T")), key=lambda k: int(k.rsplit("T", 1)[1]))
        add(f"online memory flat in T (within 10%), LIF N={m['hidden']} B={m['batch']}",
            ", ".join(f"T={k.rsplit('T', 1)[1]}: {m[k]:.1f} MiB" for k in ks if m[k] is not None)
            + ("" if m["growth"] is None else f" ({100 * m['growth']:+.1f}%)"),
            None if m["growth"] is None else abs(m["growth"]) <= 0.10)
    if not mem:
        add("online memory flat in T (within 10%)", "not measured", None)
    gpu = [r for r in rows if any(res["config"]["device"] == "cuda" for res in results)]
    if not gpu:
        add("GPU: >= 60% of HBM roofline for RFLO at N=1024, B=64; <= 20 us per B=1 step",
            "not measured (no GPU in this run)", None)
    return out


def format_targets(targets: list[dict]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in targets:
        met = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines)
