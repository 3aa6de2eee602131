"""The N = 256 evidence figures (docs/figures/n256-*.png) from the sweep directories of examples/n256/*.toml.

Several specs share one sweep directory (their common runs are trained once), so each figure takes the runs it
shows by their config (for example only k = 32 for the flossing rule of the learning-curve figure, every k for
the k figure), links them into a scratch directory and draws it with :func:`neuroinit.experiments.plots.plot_figure`
(what ``neuroinit plot`` runs).

    python examples/n256/figures.py sweeps/n256 --neurogym sweeps/ng --out docs/figures
"""
import argparse
import json
import os
import tempfile
from pathlib import Path

import h5py

from neuroinit.experiments.plots import plot_figure

DEFAULT_K = 32   # the default k at N = 256 ("auto" = N // 8)


def _config(path: Path) -> dict | None:
    with h5py.File(path, "r") as f:
        if f.attrs.get("status") != "complete":
            return None
        return json.loads(f["config"].asstr()[()])


def _romo_rate(c: dict) -> bool:
    return c["task"] == "romo" and c["model"] == "rate" and c["hidden"] == 256 and c["iters"] == 2000


def _floss_k(c: dict) -> int:
    return c["floss_k"] if c.get("floss_iters", 0) > 0 else 0


FIGURES = {   # name -> (sweep, figure, run filter, plot options)
    "n256-learning-curves": ("romo", "learning-curves",
                             lambda c: _romo_rate(c) and _floss_k(c) in (0, DEFAULT_K), {"smooth": 5}),
    "n256-lyapunov": ("romo", "lyapunov", lambda c: _romo_rate(c) and _floss_k(c) in (0, DEFAULT_K), {}),
    "n256-flossing": ("romo", "flossing", lambda c: _romo_rate(c) and c["rule"] == "eprop"
                      and _floss_k(c) in (0, DEFAULT_K), {"smooth": 5}),
    # the k table as a figure: one learning rate (0.05 / N), as in the table
    "n256-floss-k": ("romo", "flossing", lambda c: _romo_rate(c) and c["rule"] == "eprop"
                     and abs(c["lr"] * 256 / 0.05 - 1) < 1e-6 and c["gain"] in (0.5, 1.0, 2.0), {"smooth": 5}),
    "n256-rate-vs-spiking": ("romo", "rate-vs-spiking",
                             lambda c: c["task"] == "romo" and c["hidden"] == 256 and c["iters"] == 1000, {"smooth": 5}),
    "n128-neurogym-learning-curves": ("neurogym", "learning-curves", lambda c: c["task"] != "romo", {"smooth": 5}),
}


def draw(sweep_dir: Path, figure: str, keep, out: Path, options: dict) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp, "runs")
        runs.mkdir()
        for path in sorted(Path(sweep_dir, "runs").glob("*.h5")):
            c = _config(path)
            if c is not None and keep(c):
                os.link(path, runs / path.name)
        if not any(runs.iterdir()):
            return 0
        return plot_figure(tmp, figure, out, **options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", help="the Romo sweep directory (romo, romo-floss, floss-k*, romo-lr-ext, rate-vs-spiking)")
    ap.add_argument("--neurogym", help="the 2AF / DMS sweep directory (neurogym.toml)")
    ap.add_argument("--out", default="docs/figures")
    ap.add_argument("--only", help="comma-separated figure names")
    args = ap.parse_args()
    dirs = {"romo": args.sweep_dir, "neurogym": args.neurogym}
    only = set(args.only.split(",")) if args.only else set(FIGURES)
    for name, (which, figure, keep, options) in FIGURES.items():
        if name not in only or not dirs[which]:
            continue
        n = draw(Path(dirs[which]), figure, keep, Path(args.out, name + ".png"), options)
        print(f"{name}: {n} curves" if n else f"{name}: no runs yet")


if __name__ == "__main__":
    main()
