"""Speed of the paper's Romo experiment on this machine (issue 8's target; results in experiment_speed.md).

Times one training run the way a sweep runs it -- ``neuroinit.experiments.train.train`` on one intra-op thread,
Romo, rate network, N = 256, B = 32, Adam -- for BPTT, e-prop and e-prop + 100 iterations of local pre-flossing:
the setup (init, Lyapunov exponents before, flossing), the seconds per training iteration (measured over
``--iters`` iterations after a warm-up, from the train loop's own progress events, checkpoints and logging
included) and the end (evaluation, Lyapunov exponents after). From these it extrapolates a 6000-iteration run
and the Romo grid (11 gains x {bptt, eprop, eprop+floss} x 5 seeds x 3 learning rates = 495 runs) on
``--workers`` processes.

BPTT runs twice: as ``train`` runs it (the fused BPTT, ``neuroinit.learning.fused_bptt``: no autograd tape; the
run file's ``step_path`` says ``fused-bptt``) and through autograd (``--no-fast``'s path), for the ratio. It also
times the bare loops of the fused e-prop step (``OnlineEprop(fast=True)``) and of the fused BPTT
(``BPTT(fast=True)``), without the train loop around them.

    python benchmarks/experiment_speed.py                 # ~2-4 minutes
    python benchmarks/experiment_speed.py --iters 50 --json out.json
    python benchmarks/experiment_speed.py --iters 300 --rules eprop,bptt   # the BPTT / e-prop ratio only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from neuroinit._util import available_cpus, cpu_model

GAINS, SEEDS, LRS = 11, 5, 3
FULL_ITERS = 6000


def time_run(rule: str, floss: int, iters: int, warmup: int, hidden: int, batch: int, tmp: Path, *,
             fast: bool = True) -> dict:
    """Phase timings of one train() call, from its progress events."""
    from neuroinit.experiments.train import TrainConfig, train
    from neuroinit.io.runfile import read_run

    cfg = TrainConfig(task="romo", model="rate", rule=rule, gain=1.0, hidden=hidden, batch=batch,
                      iters=warmup + iters, floss_iters=floss, floss_mode="local", seed=0, fast=fast)
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
    out = tmp / f"{rule}-{floss}-{fast}.h5"
    train(cfg, out, overwrite=True, progress=progress)
    t_end = time.perf_counter()
    per_iter = (it_times[warmup + iters] - it_times[warmup]) / iters
    cpu_per_iter = (cpu_times[warmup + iters] - cpu_times[warmup]) / iters
    setup = it_times[1] - t0 - per_iter  # everything before the first iteration
    tail = t_end - marks["eval_start"]
    name = rule + ("+floss" if floss else "") + ("" if fast else " (--no-fast)")
    return {"rule": name, "step_path": read_run(out).summary["step_path"], "per_iter_s": per_iter,
            "cpu_per_iter_s": cpu_per_iter,
            "setup_s": setup, "end_s": tail, "run_6000_s": setup + FULL_ITERS * per_iter + tail,
            "run_6000_cpu_s": setup + FULL_ITERS * cpu_per_iter + tail}


def time_bare(rule_name: str, iters: int, warmup: int, hidden: int, batch: int) -> dict:
    """Per-iteration time of a rule's fused path in a bare loop (same network, task, optimizer; no train loop):
    ``eprop`` through the fused native step, ``bptt`` through the fused BPTT."""
    from neuroinit.cells import make_cell
    from neuroinit.cells.base import PARAM_NAMES
    from neuroinit.init import hardware_init
    from neuroinit.learning import BPTT, OnlineEprop, fused
    from neuroinit.tasks import make_task

    if rule_name == "eprop" and not fused.available():
        return {"available": False, "reason": fused.unavailable_reason()}
    task = make_task("romo", dt_tau=0.5)
    params, _ = hardware_init("rate", 1, hidden, 2, 1.0, "ideal", generator=torch.Generator().manual_seed(0))
    cell = make_cell("rate", params, alpha=0.5)
    rule = OnlineEprop(cell, fast=True) if rule_name == "eprop" else BPTT(cell, fast=True)
    opt = torch.optim.Adam([getattr(cell, n) for n in PARAM_NAMES], lr=0.05 / hidden, fused=True)
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


RUNS = {  # --rules name: (rule, flossing iterations, fast)
    "eprop": ("eprop", 0, True), "bptt": ("bptt", 0, True), "bptt-autograd": ("bptt", 0, False),
    "eprop+floss": ("eprop", 100, True)}
GRID_RUNS = ("eprop", "bptt", "eprop+floss")  # the grid's three rule settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100, help="timed iterations per rule")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None, help="processes for the grid estimate [CPUs]")
    ap.add_argument("--rules", default=",".join(RUNS), help=f"train runs to time, of {', '.join(RUNS)} [all]")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not names or any(r not in RUNS for r in names):
        ap.error(f"Invalid --rules {args.rules!r}: allowed a comma-separated list of {', '.join(RUNS)}")
    torch.set_num_threads(args.threads)
    workers = args.workers or available_cpus()
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="neuroinit-speed-"))
    rows = {r: time_run(*RUNS[r][:2], args.iters, args.warmup, args.hidden, args.batch, tmp, fast=RUNS[r][2])
            for r in names}
    bare = {r: time_bare(r, args.iters, args.warmup, args.hidden, args.batch) for r in ("eprop", "bptt")
            if r in names}
    result = {
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "affinity": available_cpus(),
                    "loadavg_before": load, "torch": torch.__version__, "threads": args.threads,
                    "python": platform.python_version()},
        "config": {"hidden": args.hidden, "batch": args.batch, "timed_iters": args.iters, "warmup": args.warmup,
                   "command": " ".join(["python", *sys.argv])},
        "runs": list(rows.values()), "bare_loops": bare,
    }
    print(f"{result['machine']['cpu']}; load {load[0]:.1f} -> {os.getloadavg()[0]:.1f}; {args.threads} thread(s)")
    for r in rows.values():
        print(f"{r['rule']:<20} {1e3 * r['per_iter_s']:8.1f} ms/iter wall ({1e3 * r['cpu_per_iter_s']:.1f} CPU)  "
              f"setup {r['setup_s']:5.1f} s  end {r['end_s']:4.1f} s  -> 6000 iterations: {r['run_6000_s']:6.1f} s "
              f"wall ({r['run_6000_cpu_s']:.1f} s at the CPU time); step_path {r['step_path']}")
    for name, row in bare.items():
        if row.get("available"):
            print(f"{name + ' bare loop':<20} {1e3 * row['per_iter_s']:8.1f} ms/iter wall "
                  f"({1e3 * row['cpu_per_iter_s']:.1f} CPU; fast path used: {row['uses_fast_path']})")
        else:
            print(f"{name} bare loop: not available ({row.get('reason')})")
    if "eprop" in rows and "bptt" in rows:
        result["bptt_over_eprop"] = rows["bptt"]["run_6000_s"] / rows["eprop"]["run_6000_s"]
        result["bptt_over_eprop_cpu"] = rows["bptt"]["run_6000_cpu_s"] / rows["eprop"]["run_6000_cpu_s"]
        print(f"BPTT / e-prop, 6000-iteration runs: {result['bptt_over_eprop']:.2f}x wall, "
              f"{result['bptt_over_eprop_cpu']:.2f}x at the CPU times (target <= 2x)")
    if all(r in rows for r in GRID_RUNS):
        grid = sum(rows[r]["run_6000_s"] for r in GRID_RUNS) * GAINS * SEEDS * LRS
        grid_cpu = sum(rows[r]["run_6000_cpu_s"] for r in GRID_RUNS) * GAINS * SEEDS * LRS
        result["grid"] = {"runs": GAINS * SEEDS * LRS * 3, "run_seconds_s": grid, "workers": workers,
                          "wall_s": grid / workers, "wall_if_unloaded_s": grid_cpu / workers}
        print(f"Romo grid, {result['grid']['runs']} runs on {workers} workers: {grid / workers / 3600:.2f} h "
              f"({grid_cpu / workers / 3600:.2f} h at the CPU times)")
    result["machine"]["loadavg_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
