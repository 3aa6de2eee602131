"""Speed of the paper's Romo experiment on this machine (issue 8's target; results in experiment_speed.md).

Times one training run the way a sweep runs it -- ``neuroinit.experiments.train.train`` on one intra-op thread,
Romo, rate network, N = 256, B = 32, Adam -- for BPTT, e-prop and e-prop + 100 iterations of local pre-flossing:
the setup (init, Lyapunov exponents before, flossing), the seconds per training iteration (measured over
``--iters`` iterations after a warm-up, from the train loop's own progress events, checkpoints and logging
included) and the end (evaluation, Lyapunov exponents after). From these it extrapolates a 6000-iteration run
and the Romo grid (11 gains x {bptt, eprop, eprop+floss} x 5 seeds x 3 learning rates = 495 runs) on
``--workers`` processes.

It also times the fused native e-prop step (``OnlineEprop(fast=True)``, ``neuroinit.learning.fused``) in the
same loop by hand, where it is available, since ``train`` may not use it yet.

    python benchmarks/experiment_speed.py                 # ~2-4 minutes
    python benchmarks/experiment_speed.py --iters 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GAINS, SEEDS, LRS = 11, 5, 3
FULL_ITERS = 6000


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def time_run(rule: str, floss: int, iters: int, warmup: int, hidden: int, batch: int, tmp: Path) -> dict:
    """Phase timings of one train() call, from its progress events."""
    from neuroinit.experiments.train import TrainConfig, train

    cfg = TrainConfig(task="romo", model="rate", rule=rule, gain=1.0, hidden=hidden, batch=batch,
                      iters=warmup + iters, floss_iters=floss, floss_mode="local", seed=0)
    marks: dict[str, float] = {}
    it_times: dict[int, float] = {}

    cpu_times: dict[int, float] = {}

    def progress(ev) -> None:
        now = time.perf_counter()
        if ev.phase == "train":
            it_times[ev.iteration] = now
            cpu_times[ev.iteration] = time.process_time()
            marks.setdefault("train_start", now)
        else:
            marks.setdefault(ev.phase + "_start", now)
            if ev.phase == "eval":
                marks["eval_start"] = now

    t0 = time.perf_counter()
    train(cfg, tmp / f"{rule}-{floss}.h5", overwrite=True, progress=progress)
    t_end = time.perf_counter()
    per_iter = (it_times[warmup + iters] - it_times[warmup]) / iters
    cpu_per_iter = (cpu_times[warmup + iters] - cpu_times[warmup]) / iters
    setup = it_times[1] - t0 - per_iter  # everything before the first iteration
    tail = t_end - marks["eval_start"]
    return {"rule": rule + ("+floss" if floss else ""), "per_iter_s": per_iter, "cpu_per_iter_s": cpu_per_iter,
            "setup_s": setup, "end_s": tail, "run_6000_s": setup + FULL_ITERS * per_iter + tail,
            "run_6000_cpu_s": setup + FULL_ITERS * cpu_per_iter + tail}


def time_fused(iters: int, warmup: int, hidden: int, batch: int) -> dict | None:
    """Per-iteration time of e-prop through the fused native step (same network, task, optimizer)."""
    from neuroinit.cells import make_cell
    from neuroinit.init import hardware_init
    from neuroinit.learning import OnlineEprop, fused
    from neuroinit.tasks import make_task

    if not fused.available():
        return {"available": False, "reason": fused.unavailable_reason()}
    task = make_task("romo", dt_tau=0.5)
    params, _ = hardware_init("rate", 1, hidden, 2, 1.0, "ideal", generator=torch.Generator().manual_seed(0))
    cell = make_cell("rate", params, alpha=0.5)
    rule = OnlineEprop(cell, fast=True)
    from neuroinit.cells.base import PARAM_NAMES

    opt = torch.optim.Adam([getattr(cell, n) for n in PARAM_NAMES], lr=0.05 / hidden)
    gen = torch.Generator().manual_seed(1)
    t = c = None
    for i in range(warmup + iters):
        if i == warmup:
            t, c = time.perf_counter(), time.process_time()
        b = task.batch(batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        rule.backward(b, task)
        opt.step()
    per_iter = (time.perf_counter() - t) / iters
    return {"available": True, "uses_fast_path": bool(rule.uses_fast_path), "per_iter_s": per_iter,
            "cpu_per_iter_s": (time.process_time() - c) / iters}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100, help="timed iterations per rule")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None, help="processes for the grid estimate [CPUs]")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    workers = args.workers or len(os.sched_getaffinity(0))
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="neuroinit-speed-"))
    rows = [time_run("eprop", 0, args.iters, args.warmup, args.hidden, args.batch, tmp),
            time_run("bptt", 0, args.iters, args.warmup, args.hidden, args.batch, tmp),
            time_run("eprop", 100, args.iters, args.warmup, args.hidden, args.batch, tmp)]
    fused_row = time_fused(args.iters, args.warmup, args.hidden, args.batch)
    grid_cpu = sum(r["run_6000_s"] for r in rows) * GAINS * SEEDS * LRS
    grid_cpu_only = sum(r["run_6000_cpu_s"] for r in rows) * GAINS * SEEDS * LRS
    result = {
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "loadavg_before": load, "loadavg_after": os.getloadavg(), "torch": torch.__version__,
                    "threads": args.threads, "python": platform.python_version()},
        "config": {"hidden": args.hidden, "batch": args.batch, "timed_iters": args.iters, "warmup": args.warmup},
        "runs": rows, "fused_eprop": fused_row,
        "grid": {"runs": GAINS * SEEDS * LRS * 3, "run_seconds_s": grid_cpu, "workers": workers,
                 "wall_s": grid_cpu / workers, "wall_if_unloaded_s": grid_cpu_only / workers},
    }
    print(f"{result['machine']['cpu']}; load {load[0]:.1f} -> {os.getloadavg()[0]:.1f}; {args.threads} thread(s)")
    for r in rows:
        print(f"{r['rule']:<12} {1e3 * r['per_iter_s']:8.1f} ms/iter wall ({1e3 * r['cpu_per_iter_s']:.1f} CPU)  "
              f"setup {r['setup_s']:5.1f} s  end {r['end_s']:4.1f} s  -> 6000 iterations: {r['run_6000_s']:6.1f} s "
              f"wall ({r['run_6000_cpu_s']:.1f} s at the CPU time)")
    if fused_row and fused_row.get("available"):
        print(f"fused eprop  {1e3 * fused_row['per_iter_s']:8.1f} ms/iter wall "
              f"({1e3 * fused_row['cpu_per_iter_s']:.1f} CPU; fast path used: {fused_row['uses_fast_path']}), "
              "bare loop")
    elif fused_row:
        print(f"fused eprop: not available ({fused_row.get('reason')})")
    print(f"Romo grid, {result['grid']['runs']} runs on {workers} workers: {grid_cpu / workers / 3600:.2f} h "
          f"({grid_cpu_only / workers / 3600:.2f} h at the CPU times)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
