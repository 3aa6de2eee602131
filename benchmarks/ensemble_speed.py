"""Speed-up of ensemble training on this machine (issue 17; results in ensemble_speed.md / ensemble_speed.json).

Trains the same small sweep twice on one intra-op thread -- ``--runs`` rate networks (seeds x gains x learning
rates), Romo, N = ``--hidden``, B = 32, ``--iters`` iterations, float32, Adam, no Lyapunov analysis -- once run by
run as a sweep does (``neuroinit.experiments.train.train``, the fused native online step where it applies), once
as one ensemble (``neuroinit.experiments.ensemble.train_ensemble``), per rule, and reports the wall time of each,
the speed-up, and how far the ensemble's members are from the solo runs (largest relative weight difference:
float32 rounding; the fused solo step and the batched PyTorch step round differently). For the online rules it also
times the solo runs through the plain PyTorch step (``fast = false``), the step the ensemble batches.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/ensemble_speed.py          # ~3-5 CPU-minutes
    python benchmarks/ensemble_speed.py --iters 30 --rules eprop --json /tmp/e.json  # quick look
    python benchmarks/ensemble_speed.py --device cuda --runs 64 --hidden 256 --json benchmarks/results/gpu-ensemble.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def configs(rule: str, runs: int, hidden: int, iters: int, device: str = "cpu", dtype: str = "float32") -> list:
    from neuroinit.experiments.train import TrainConfig

    base = 0.05 / hidden
    grid = [(seed, gain, lr) for lr in (base, 2 * base) for gain in (0.5, 1.0, 1.5, 2.0) for seed in range(8)]
    return [TrainConfig(task="romo", model="rate", rule=rule, hidden=hidden, batch=32, iters=iters, gain=g, lr=lr,
                        seed=s, dtype=dtype, device=device, lyapunov=False, checkpoint_every=max(iters, 1))
            for s, g, lr in grid[:runs]]


def max_rel_diff(a_path: Path, b_path: Path) -> float:
    from neuroinit.io.runfile import read_run

    a, b = read_run(a_path).weights["final"].params, read_run(b_path).weights["final"].params
    return max(float(np.abs(a[n] - b[n]).max() / max(np.abs(b[n]).max(), 1e-30)) for n in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--rules", default="eprop,bptt")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU measurement issue 17 still needs)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--json", default=None, help="write the results here (default: print only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from neuroinit.experiments.ensemble import train_ensemble
    from neuroinit.experiments.train import train

    out = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "runs": args.runs, "hidden": args.hidden, "batch": 32, "iters": args.iters, "dtype": args.dtype,
           "task": "romo", "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": []}
    for rule in [r.strip() for r in args.rules.split(",") if r.strip()]:
        cs = configs(rule, args.runs, args.hidden, args.iters, args.device, args.dtype)
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            # warm-up (lazy imports, the fused library's load, first-call allocations), not timed
            warm = [dataclasses.replace(c, iters=2, eval_batch=8) for c in cs[:2]]
            train(warm[0], d / "warm.h5")
            train_ensemble(warm, [d / "warm0.h5", d / "warm1.h5"])
            t0 = time.perf_counter()
            for j, c in enumerate(cs):
                train(c, d / f"solo{j}.h5")
            solo = time.perf_counter() - t0
            t0 = time.perf_counter()
            train_ensemble(cs, [d / f"ens{j}.h5" for j in range(len(cs))])
            ens = time.perf_counter() - t0
            diff = max(max_rel_diff(d / f"ens{j}.h5", d / f"solo{j}.h5") for j in range(len(cs)))
            solo_torch = None
            if rule in ("eprop", "rflo"):   # the same solo runs through the PyTorch step (fast = false)
                t0 = time.perf_counter()
                for j, c in enumerate(cs):
                    train(dataclasses.replace(c, fast=False), d / f"torch{j}.h5")
                solo_torch = time.perf_counter() - t0
        row = {"rule": rule, "solo_s": round(solo, 2), "ensemble_s": round(ens, 2), "speedup": round(solo / ens, 2),
               "max_rel_weight_diff": diff}
        if solo_torch is not None:
            row.update(solo_pytorch_step_s=round(solo_torch, 2), speedup_vs_pytorch_step=round(solo_torch / ens, 2))
        out["results"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({k: v for k, v in out.items() if k != "results"}))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
