"""Timing: one method on one configuration, peak memory, and the whole bench run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from neuroinit._util import utc_now
from neuroinit.bench.chip import chip_code_bytes, chip_roofline
from neuroinit.bench.config import N_IN, N_OUT, SCHEMA_VERSION, BenchConfig
from neuroinit.bench.machine import (
    _LoadMeter,
    _peak_memory,
    available_cpus,
    calibrate,
    environment,
    roofline,
    using_threads,
)
from neuroinit.bench.peers import (
    SyntheticTask,
    _peer_available,
    check_gradients,
    has_kernel,
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
    threads: int | None = None                  # the thread count the row's numbers were measured at
    threads_tried: dict | None = None           # "best" mode: per count tried, median and min us/step
    background_load_window: float | None = None  # background cores busy over all of the row's timed repeats


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


WARM_UP_OTHER_COUNTS_S = 1.0


@dataclass
class _Entry:
    """One row being timed: its trial, the thread counts it runs at, its repeats and what they measured."""

    res: Result
    fn: Callable[[], None]
    counts: tuple[int, ...]
    repeats: int = 0
    times: dict[int, list[float]] = field(default_factory=dict)
    loads: dict[int, list[float | None]] = field(default_factory=dict)


def _warm_up(entry: _Entry, sync: Callable[[], None], cfg: BenchConfig) -> None:
    """First trial at the first count (builds the fused library and buffers; its peak memory is the row's:
    a freshly built network's first trial), a warm-up at each other count where that took under
    ``WARM_UP_OTHER_COUNTS_S`` (the thread pool's start; a longer trial amortises it), and the row's number of
    repeats: ``cfg.repeats``, fewer where they would take longer than ``cfg.max_seconds_per_method``."""
    counts = entry.counts
    with using_threads(counts[0]):
        t0 = time.perf_counter()
        entry.res.peak_memory_mib = _peak_memory(entry.fn, cfg.device)
        sync()
        first = time.perf_counter() - t0
    if first < WARM_UP_OTHER_COUNTS_S:
        for t in counts[1:]:
            with using_threads(t):
                entry.fn()
                sync()
    entry.repeats = cfg.repeats
    if first * cfg.repeats * len(counts) > cfg.max_seconds_per_method:
        entry.repeats = max(1, min(cfg.repeats, int(cfg.max_seconds_per_method / max(first * len(counts), 1e-9))))
    entry.times = {t: [] for t in counts}
    entry.loads = {t: [] for t in counts}


def _measure(entries: list[_Entry], sync: Callable[[], None], cfg: BenchConfig) -> float | None:
    """Times whole trials of every entry at each of its thread counts, interleaved: repeat r runs every entry
    (that has an r-th repeat) at every count before repeat r + 1 starts, so load that comes and goes hits all
    methods and counts of a configuration alike. Each timed trial follows an untimed one of the same entry at the
    same count, so that it finds its own data in the caches and its thread pool awake, as in a training loop
    (without it, a fast method timed right after another one pays for refilling the caches: LIF N = 256, B = 1
    read 8.5 instead of 5.3 us/step). Returns the background load over all of it."""
    for entry in entries:
        _warm_up(entry, sync, cfg)
    with _LoadMeter() as window:
        for r in range(max((e.repeats for e in entries), default=0)):
            for entry in entries:
                if r >= entry.repeats:
                    continue
                for t in entry.counts:
                    with using_threads(t):
                        entry.fn()   # untimed: caches and threads as a running loop has them
                        sync()
                        with _LoadMeter() as lm:
                            entry.fn()
                            sync()
                    entry.times[t].append(lm.wall / cfg.steps * 1e6)
                    entry.loads[t].append(lm.load)
    return window.load


def _summarise(entry: _Entry, window_load: float | None) -> Result:
    """The row from its repeats: the count with the lowest median (every count's median and min kept in
    ``threads_tried`` where there were several), its median, quartiles and extremes, the rates, the fused path's
    facts."""
    res, b, n = entry.res, entry.res.batch, entry.res.hidden
    best = min(entry.counts, key=lambda t: statistics.median(entry.times[t]))
    if len(entry.counts) > 1:
        res.threads_tried = {str(t): {"us_per_step": statistics.median(v), "us_per_step_min": min(v)}
                             for t, v in entry.times.items()}
    times = entry.times[best]
    res.threads, res.repeats_us, res.background_load = best, times, entry.loads[best]
    res.background_load_window = window_load
    res.us_per_step = statistics.median(times)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) >= 2 else [times[0]] * 3
    res.us_per_step_q1, res.us_per_step_q3 = q[0], q[2]
    res.us_per_step_min, res.us_per_step_max = min(times), max(times)
    res.sample_steps_per_s = b / (res.us_per_step * 1e-6)
    res.synaptic_updates_per_s = b * n * (n + N_IN + N_OUT) / (res.us_per_step * 1e-6)
    rule = getattr(entry.fn, "rule", None)
    if rule is not None:
        res.fast_path = rule.uses_fast_path
        if res.method == "neuroinit-fused" and not rule.uses_fast_path:  # the row names the path that ran
            res.method = "neuroinit-recorded" if rule.step_path == "recorded" else "neuroinit-torch"
        if rule.native_backend is not None:
            res.state_bytes = rule.native_backend.state_bytes()
            res.chunk_steps = rule.native_backend.chunk_capacity
    return res


def time_configuration(variant: str, n: int, b: int, rows: list[tuple[str, str, tuple[int, ...]]],
                       cfg: BenchConfig, failed: frozenset = frozenset()) -> list[Result]:
    """The rows (method, profile, thread counts) of one configuration, timed together (:func:`_measure`); a
    method that cannot run here, or whose gradient check failed, gets a skipped row."""
    results, entries = [], []
    batch = make_batch(variant, cfg.steps, b, generator=torch.Generator().manual_seed(cfg.seed + 7),
                       device=cfg.device)
    for method, profile, counts in rows:
        res = Result(variant, n, b, cfg.steps, method, profile)
        results.append(res)
        res.skipped = ("gradient check failed" if (variant, method) in failed else _peer_available(method))
        if res.skipped is None:
            cell = make_bench_cell(variant, n, profile, seed=cfg.seed, device=cfg.device)
            entries.append(_Entry(res, trial_fn(method, cell, batch, SyntheticTask(N_IN, N_OUT), seed=cfg.seed),
                                  counts))
    window_load = _measure(entries, _sync(cfg.device), cfg)
    for entry in entries:
        _summarise(entry, window_load)
    return results


def time_method(method: str, variant: str, n: int, b: int, cfg: BenchConfig, profile: str,
                threads: tuple[int, ...] = (1,)) -> Result:
    """One row on its own: ``method`` on one configuration at each of ``threads`` (the lowest median reported)."""
    return time_configuration(variant, n, b, [(method, profile, threads)], cfg)[0]


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


def planned_rows(cfg: BenchConfig, cpus: int | None = None) -> list[tuple[str, int, int, str, str, tuple[int, ...]]]:
    """(variant, N, B, method, profile, thread counts) of every row: in "best" mode one row per configuration
    timed at every count, else one row per count."""
    counts = cfg.thread_counts(available_cpus() if cpus is None else cpus)
    per_row = [counts] if cfg.threads == "best" else [(t,) for t in counts]
    jobs = []
    for variant in cfg.variants():
        for n in cfg.hidden:
            for b in cfg.batch:
                for method in cfg.methods:
                    if not method_applies(method, variant):
                        continue
                    chip = method == "neuroinit-fused" and has_kernel(variant)  # chip-precision traces: native
                    profiles = [cfg.profile, "ideal"] if chip else ["ideal"]
                    for prof in dict.fromkeys(profiles):
                        for row_counts in per_row:
                            jobs.append((variant, n, b, method, prof, row_counts))
    return jobs


def _add_ratios(results: list[Result]) -> None:
    """``ratio_to_fused``: time over neuroinit-fused (ideal) of the same configuration (in "best" mode: best over
    best; else at the same thread count)."""
    def key(r: Result):
        return r.variant, r.hidden, r.batch, "best" if r.threads_tried else r.threads

    base = {key(r): r.us_per_step for r in results
            if r.method == "neuroinit-fused" and r.profile == "ideal" and r.us_per_step}
    for r in results:
        ref = base.get(key(r))
        if ref and r.us_per_step:
            r.ratio_to_fused = r.us_per_step / ref


def _calibration_at(threads: int, calibs: dict[int, dict], cfg: BenchConfig, progress) -> dict:
    """The calibration at ``threads``, measured (or read from the cache) the first time a row needs it."""
    if threads not in calibs:
        if progress:
            progress(f"calibrating at {threads} thread(s) (memory bandwidth, matmul rate)")
        calibs[threads] = calibrate(cfg.device, quick=cfg.quick, use_cache=not cfg.recalibrate, threads=threads)
    return calibs[threads]


def _reuse_key(cfg: BenchConfig, variant: str, n: int, b: int, method: str, profile: str, threads) -> tuple:
    """What identifies a row of a configuration: in "best" mode (one row per method and profile) not its count."""
    return variant, n, b, method, profile, None if cfg.threads == "best" else threads


def _reused(cfg: BenchConfig, variant: str, n: int, b: int, rows, reuse: dict[tuple, dict]) -> list[Result] | None:
    """The rows of a configuration an interrupted run already timed (every one of them), else None."""
    keys = [_reuse_key(cfg, variant, n, b, m, p, counts[0]) for m, p, counts in rows]
    if not keys or not all(k in reuse for k in keys):
        return None
    return [Result(**reuse[k]) for k in keys]


def _time_rows(cfg: BenchConfig, calibs: dict[int, dict], failed: set, progress, on_result,
               reuse: list[dict] | None = None) -> list[Result]:
    """Every row of :func:`planned_rows`, configuration by configuration (its methods interleaved), with the roofline of
    neuroinit's rows at the calibration of their thread count (``calibs``, completed as rows need them).
    ``reuse``: rows of an interrupted run of the same configuration; a configuration all of whose rows are there is
    not timed again (its rows are taken as they are, and not passed to ``on_result``)."""
    groups: dict[tuple[str, int, int], list] = {}
    for variant, n, b, method, prof, row_counts in planned_rows(cfg):
        groups.setdefault((variant, n, b), []).append((method, prof, row_counts))
    done = {_reuse_key(cfg, r["variant"], r["hidden"], r["batch"], r["method"], r["profile"], r.get("threads")): r
            for r in reuse or []}
    results: list[Result] = []
    for (variant, n, b), rows in groups.items():
        kept = _reused(cfg, variant, n, b, rows, done)
        if kept is not None:
            results.extend(kept)
            continue
        if progress:
            progress(f"{variant} N={n} B={b}: {len(rows)} rows interleaved")
        for res in time_configuration(variant, n, b, rows, cfg, frozenset(failed)):
            if res.method == "neuroinit-fused" and res.us_per_step is not None:
                calib = _calibration_at(res.threads, calibs, cfg, progress)
                res.roofline = roofline(variant, n, b, N_IN, N_OUT, calib, cfg.device, steps=cfg.steps,
                                        chunk=res.chunk_steps)
                res.roofline_fraction = res.roofline["bound_us"] / res.us_per_step
                if "chunked" in res.roofline:
                    res.own_roofline_fraction = res.roofline["chunked"]["bound_us"] / res.us_per_step
                code_bytes = chip_code_bytes(variant, n, res.profile) if res.fast_path and res.chunk_steps is None \
                    else None
                chip = code_bytes and chip_roofline(n, b, N_IN, code_bytes, calib)
                if chip:  # chip-precision traces: the bound of the integer trace pass (bench/chip.py)
                    res.roofline["chip"] = chip
                    res.own_roofline_fraction = chip["bound_us"] / res.us_per_step
            results.append(res)
            if on_result:
                on_result(res)
    return results


def run_bench(cfg: BenchConfig, *, progress: Callable[[str], None] | None = None,
              on_result: Callable[[Result], None] | None = None, reuse: list[dict] | None = None) -> dict:
    """Run the benchmark; returns the JSON-able result (schema ``SCHEMA_VERSION``). ``reuse``: the rows of an
    interrupted run of the same configuration (:mod:`neuroinit.bench.partial`): whole configurations found there
    are kept instead of timed again."""
    cfg.validate()
    t_start = time.perf_counter()
    env = environment(cfg.device)
    top = max(cfg.thread_counts(available_cpus()))
    calibs: dict[int, dict] = {}
    _calibration_at(top, calibs, cfg, progress)  # the machine at all its threads; other counts where rows need them
    if progress:
        progress("checking gradients of every method on a small case")
    checks = check_gradients(cfg.variants(), cfg.methods)
    failed = {(c["variant"], c["method"]) for c in checks if not c["ok"]}
    with _LoadMeter() as run_meter:
        results = _time_rows(cfg, calibs, failed, progress, on_result, reuse)
    _add_ratios(results)
    mem = []
    if cfg.memory_scaling and "lif" in cfg.variants():
        if progress:
            progress("memory vs sequence length")
        n_mem, b_mem = (64, 4) if cfg.quick else (256, 16)
        mem = memory_scaling(cfg, "lif", n_mem, b_mem, (cfg.steps, 10 * cfg.steps))
    cfg_d = asdict(cfg)
    cfg_d["hidden"], cfg_d["batch"], cfg_d["methods"] = list(cfg.hidden), list(cfg.batch), list(cfg.methods)
    if cfg.threads != "best":
        cfg_d["threads"] = list(cfg.threads)
    return {"schema_version": SCHEMA_VERSION, "config": cfg_d, "environment": env,
            "calibration": calibs[top], "calibrations": {str(t): calibs[t] for t in sorted(calibs)},
            "gradient_checks": checks, "results": [asdict(r) for r in results], "memory_scaling": mem,
            "background_load_run": run_meter.load,
            "wall_seconds": time.perf_counter() - t_start, "finished_at": utc_now()}
