"""Claim 4 during training at N = 256: e-prop on Romo with the alignment to BPTT logged every 100 iterations
(`--align-every 100`), with and without 100 iterations of local flossing (k = N/8 = 32), gains 0.5 / 1 / 2,
seed 0, learning rate 0.05 / N, 2000 iterations. Trains the runs that are missing into DIR (resumable: a run
file that exists is read, not retrained), then writes the cosines and relative errors per logged iteration.

    python examples/n256/alignment_training.py sweeps/align --json docs/results/alignment-training-n256.json
"""
import argparse
import json
import subprocess
from pathlib import Path

import h5py

GAINS = (0.5, 1.0, 2.0)
FLOSS_ITERS = (0, 100)


def run(directory: Path, gain: float, floss_iters: int) -> Path:
    out = directory / f"g{gain:g}_floss{floss_iters}.h5"
    if not out.exists():
        subprocess.run(["neuroinit", "train", "--task", "romo", "--model", "rate", "--rule", "eprop", "--gain", str(gain),
                        "--hidden", "256", "--batch", "32", "--iters", "2000", "--lr", str(0.05 / 256), "--seed", "0",
                        "--align-every", "100", "--floss-iters", str(floss_iters), "--no-lyapunov", "--out", str(out),
                        "--json"], check=True, stdout=subprocess.DEVNULL)
    return out


def read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        a = f["runs/0/alignment"]
        config = json.loads(f["config"].asstr()[()])
        row = {"gain": config["gain"], "floss_iters": config["floss_iters"],
               "floss_k": config["floss_k"] if config["floss_iters"] else 0,
               "final_loss": float(f["summary"].attrs["final_loss"]),
               "eval_accuracy": float(f["summary"].attrs["eval_accuracy"]),
               "iteration": a["iteration"][()].tolist()}
        for name in ("w_in", "w_rec"):
            row[f"cosine_{name}"] = a[f"cosine_{name}"][()].round(4).tolist()
            row[f"rel_error_{name}"] = a[f"rel_error_{name}"][()].round(4).tolist()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    directory = Path(args.directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [read(run(directory, g, fl)) for g in GAINS for fl in FLOSS_ITERS]
    print("| gain | flossing | cos W_rec at it 0 | mean over training | at 1000 | final loss | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["cosine_w_rec"]
        print(f"| {r['gain']:g} | {'k ' + str(r['floss_k']) if r['floss_iters'] else 'none'} | {c[0]:.2f} | "
              f"{sum(c) / len(c):.2f} | {c[r['iteration'].index(1000)]:.2f} | {r['final_loss']:.3g} | "
              f"{r['eval_accuracy']:.3f} |")
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
