"""The machine: host description (CPU, caches), load and memory meters, calibration and the roofline."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from neuroinit._util import available_cpus, cache_dir, cpu_fields, cpu_model, utc_now

# ------------------------------------------------------------------------------------------ environment
# Where the host is read (tests point these at a faked host; nothing else in this module reads the machine's
# description): the CPU model, the cache sizes, and os.cpu_count() for the logical CPUs.
CPUINFO = Path("/proc/cpuinfo")
SYS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


def _cpu_model() -> str:
    return cpu_model(CPUINFO)   # read at call time: tests point CPUINFO at a faked host


def _cpu_identity() -> dict[str, str]:
    """Vendor, family / model / stepping and the vector extensions that decide kernel speed, from the first CPU
    in /proc/cpuinfo: under a hypervisor the model name is often generic ("Intel(R) Xeon(R) Processor")."""
    fields = cpu_fields(CPUINFO)
    if fields is None:
        return {}
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile") if f in flags]
    out = {"vendor": fields.get("vendor_id", "?"),
           "family_model_stepping": "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping")),
           "isa": " ".join(isa) or "none of avx2/avx512/amx"}
    if "hypervisor" in flags:
        out["hypervisor"] = "yes"
    return out


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


def _import_quietly(name: str):
    """Import a peer package; norse's import calls the deprecated ``torch.jit.script`` (a FutureWarning)."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(name)



def environment(device: str = "cpu") -> dict:
    """Machine, threads, OpenMP wait policy and versions, recorded with every result."""
    import numpy

    env = {
        "cpu_model": _cpu_model(), "cpu": _cpu_identity(), "logical_cpus": os.cpu_count(),
        "available_cpus": available_cpus(), "machine": platform.machine(),
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


LOAD_MIN_WALL_S = 0.25


class _LoadMeter:
    """CPU time spent by everything else on the machine while a block runs, in cores (busy jiffies of all CPUs
    minus this process's CPU time, over wall time). The kernel counts in clock ticks (10 ms), so a block
    shorter than ``LOAD_MIN_WALL_S`` gets ``load = None``: its count would be off by more than 0.1 core."""

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
        if self.b0 is not None and b1 is not None and self.wall >= LOAD_MIN_WALL_S:
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


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig`` or a compiler each call); None
    on another C library or where it cannot be loaded."""
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def _release_free_memory() -> None:
    """Give the pages of freed heap memory back (glibc ``malloc_trim``), so that memory a trial reuses counts
    again in its resident set: without it, memory freed by earlier runs is reused unseen."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)



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
    """What a cached calibration must match. Besides the model name (generic under a hypervisor: "Intel(R) Xeon(R)
    Processor" on hosts of different generations sharing one home directory) the vector extensions and the cache
    sizes, which set the matmul rate and the levels the roofline places working sets in, and whether the fused
    library takes its GEMMs itself (its own GEMM's rate then counts)."""
    from neuroinit.learning import fused

    caches = ",".join(f"{k}={v}" for k, v in sorted(_cache_sizes().items()))
    return "|".join([_cpu_model(), str(torch.get_num_threads()), torch.__version__, device,
                     os.environ.get("OMP_WAIT_POLICY", ""), _cpu_identity().get("isa", ""), caches,
                     "own-gemm" if device == "cpu" and fused.own_gemm() else ""])


def _calib_path() -> Path:
    return cache_dir("bench_calibration.json")


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


# A calibration is checked before it is used or cached: a level nearer the core streams at least as fast as the one
# behind it (L2 >= L3 >= DRAM, within CALIB_TOLERANCE: timer noise), and the matmul rate lies in a plausible range
# (below 1 GFLOP/s no x86 core with SSE; above 100 TFLOP/s a timer error). A contradicting one was measured while
# something else held the core: it is measured again (CALIB_ATTEMPTS in all, each level's fastest kept, since a
# busy machine only slows a run down) and, if it still contradicts, returned marked ``suspect`` and never cached.
CALIB_ATTEMPTS = 3
CALIB_TOLERANCE = 0.15
MATMUL_GFLOPS_RANGE = (1.0, 1e5)
_LEVELS = ("L2", "L3", "DRAM")


def calibration_problems(calib: dict, tolerance: float = CALIB_TOLERANCE) -> list[str]:
    """What in ``calib`` contradicts the memory hierarchy or is no plausible matmul rate; empty when it is sane."""
    bw = calib.get("bandwidth_gbs") or {}
    problems = []
    good = {}
    for level in _LEVELS:
        v = bw.get(level)
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            good[level] = float(v)
        else:
            problems.append(f"{level} bandwidth {v!r} GB/s is not a positive number")
    order = [lv for lv in _LEVELS if lv in good]
    for near, far in itertools.pairwise(order):
        if good[near] < (1 - tolerance) * good[far]:
            problems.append(f"{near} bandwidth {good[near]:.1f} GB/s is below {far} {good[far]:.1f} GB/s")
    g, (lo, hi) = calib.get("matmul_gflops"), MATMUL_GFLOPS_RANGE
    if not (isinstance(g, (int, float)) and math.isfinite(g) and lo <= g <= hi):
        problems.append(f"matmul rate {g!r} GFLOP/s is outside the plausible {lo:g}..{hi:g}")
    return problems


def _fastest_of(a: dict, b: dict) -> dict:
    """Two measurements of the same machine combined: each level's bandwidth and the matmul rate at their best."""
    out = dict(b)
    out["bandwidth_gbs"] = {k: max(a["bandwidth_gbs"].get(k, 0.0), v) for k, v in b["bandwidth_gbs"].items()}
    out["matmul_gflops"] = max(a["matmul_gflops"], b["matmul_gflops"])
    return out


@contextlib.contextmanager
def using_threads(threads: int | None):
    """``with using_threads(t):`` torch (and the OpenMP runtime the fused step shares) at ``t`` threads inside the
    block, the previous count restored after; ``t=None`` leaves the count alone."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _read_cache(path: Path) -> dict[str, dict]:
    """The cached calibrations by key (a file of the previous format held one calibration with its key)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(data, dict) and "key" in data:
        return {data["key"]: data}
    return data.get("calibrations", {}) if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: dict[str, dict]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"calibrations": entries}, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass


def calibrate(device: str = "cpu", *, quick: bool = False, use_cache: bool = True, threads: int | None = None,
              attempts: int = CALIB_ATTEMPTS) -> dict:
    """Measured memory bandwidth (GB/s, per level: L2-, L3- and DRAM-sized working sets) and float32 matmul
    rate (GFLOP/s) of this machine at ``threads`` (default: torch's current count), read from the cache when it
    matches the CPU, thread count, torch version, device and OpenMP wait policy and is sane
    (:func:`calibration_problems`). A measurement that is not sane is repeated, up to ``attempts`` in all; one
    that stays contradicting comes back with ``suspect: True`` and its ``problems``, and is not cached."""
    with using_threads(threads):
        key = _calib_key(device)
        path = _calib_path()
        entries = _read_cache(path)
        cached = entries.get(key)
        if (use_cache and cached is not None and (device == "cuda" or "caches" in cached)
                and not calibration_problems(cached)):
            return {**cached, "cached": True}
        out, problems = None, []
        with _LoadMeter() as lm:
            for attempt in range(1, max(1, attempts) + 1):
                measured = _measure_device(device, quick)
                out = measured if out is None else _fastest_of(out, measured)
                problems = calibration_problems(out)
                if not problems:
                    break
        out.update(key=key, load=lm.load, measured_at=utc_now(), quick=quick,
                   threads=torch.get_num_threads(), attempts=attempt, suspect=bool(problems), problems=problems)
    if not problems:  # a suspect one is reported (the table's WARNING line, the CLI's note), never cached
        _write_cache(path, {**{k: v for k, v in entries.items() if k != key}, key: out})
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
    gflops, how = 2 * n ** 3 / t / 1e9, f"{n}^2 float32 torch matmul"
    own = _own_gemm_gflops(n, 3 if quick else 5)
    if own is not None and own > gflops:  # the rate the fused kernels' own GEMMs reach is the machine's
        gflops, how = own, f"{n}^2 float32 GEMM of the fused library (ni_gemm_tn; torch's matmul: {gflops:.0f})"
    return {"bandwidth_gbs": bw, "matmul_gflops": gflops, "working_set_bytes": sizes, "caches": caches,
            "method": f"fused stream kernel a <- c a + d in place (read + write) per working set; {how}"}


def _own_gemm_gflops(n: int, repeats: int) -> float | None:
    """GFLOP/s of the fused library's own AVX-512 GEMM on ``n x n`` matrices (at torch's thread count), where the
    library takes its GEMMs itself (``fused.own_gemm``: torch's BLAS runs no AVX-512 code here); else None."""
    from neuroinit.learning import fused

    if not fused.own_gemm():
        return None
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.zeros(n, n)
    t = _best_time(lambda: fused.add_at_b(c, a, b), repeats, lambda: None)
    return 2 * n ** 3 / t / 1e9


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


def memory_level(working_set: int, caches: dict[str, int]) -> str:
    """The memory level a working set of ``working_set`` bytes streams from: L2 or L3 where it fits
    (``caches``: bytes per level, as a calibration holds them), else DRAM."""
    if working_set <= caches.get("L2", 0):
        return "L2"
    return "L3" if working_set <= caches.get("L3", 0) else "DRAM"


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
    level = "DRAM" if device == "cuda" else memory_level(working_set, calib.get("caches") or {})
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
