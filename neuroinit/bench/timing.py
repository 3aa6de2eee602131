"""Timing: one method on one configuration, peak memory, and the whole bench run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from neuroinit.bench.chip import chip_code_bytes, chip_roofline
from neuroinit.bench.config import N_IN, N_OUT, SCHEMA_VERSION, BenchConfig
from neuroinit.bench.machine import _LoadMeter, _peak_memory, calibrate, environment, roofline
from neuroinit.bench.peers import (
    SyntheticTask,
    _peer_available,
    check_gradients,
    make_batch,
    make_bench_cell,
    method_applies,
    trial_fn,
)


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
        if rule.native_backend is not None:
            res.state_bytes = rule.native_backend.state_bytes()
            res.chunk_steps = rule.native_backend.chunk_capacity
    return res


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
            code_bytes = chip_code_bytes(variant, n, prof) if res.fast_path and res.chunk_steps is None else None
            chip = code_bytes and chip_roofline(n, b, N_IN, code_bytes, calib)
            if chip:  # chip-precision traces: the bound of the integer trace pass (bench/chip.py)
                res.roofline["chip"] = chip
                res.own_roofline_fraction = chip["bound_us"] / res.us_per_step
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
