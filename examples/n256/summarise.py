"""Compact summary of an N = 256 evidence sweep: one row per condition and learning rate (mean +- s.e.m. over
seeds of the final loss, the minimum logged loss, eval accuracy, learning time and the max Lyapunov exponent
before/after training), the learning rate each condition selects (lowest mean final loss) and whether that
rate sits at an edge of its grid. Reads the run files of a sweep directory with plain h5py; writes CSV and
JSON (the committed evidence; the run files themselves are not committed).

    python examples/n256/summarise.py sweeps/n256 --csv docs/results/n256.csv --json docs/results/n256.json

"final loss" is the run's summary value: the mean of the last 20 logged training losses. "learning time" is
the run's own (the first logged iteration after which the loss stays below the task's threshold; missing when
it never does: counted as the run length in the mean, and the number of seeds that learned is given).
"""
import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import h5py

CONDITION_KEYS = ("task", "model", "rule", "gain", "floss", "hidden", "iters", "batch", "dt_ms", "tau_ms",
                  "tau_m_ms", "profile", "io_init")


def read(path: Path) -> dict | None:
    """One complete run file -> a flat record (None for unfinished or failed runs)."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("status") != "complete":
            return None
        config = json.loads(f["config"].asstr()[()])
        s = dict(f["summary"].attrs)
        loss = f["runs/0/curve/loss"][()]
    lt = s.get("learning_time")
    learned = not (isinstance(lt, (str, bytes)) or lt is None or (isinstance(lt, (int, float)) and lt < 0))
    floss = f"k{config['floss_k']}x{config['floss_iters']}" if config.get("floss_iters", 0) > 0 else "none"
    rec = {key: config.get(key) for key in CONDITION_KEYS if key != "floss"}
    rec["io_init"] = config.get("io_init", "schuessler")   # runs made before the option: Schuessler's
    rec.update(floss=floss, seed=config["seed"], lr=config["lr"],
               final_loss=float(s["final_loss"]), min_loss=float(loss.min()), accuracy=float(s["eval_accuracy"]),
               accuracy_initial=float(s["eval_accuracy_initial"]), learned=learned,
               learning_time=float(lt) if learned else float(config["iters"]),
               lyap_initial=float(s["lyapunov_initial"]), lyap_final=float(s["lyapunov_final"]),
               wall_time=float(s["wall_time"]))
    return rec


def mean_sem(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def summarise(records: list[dict]) -> list[dict]:
    by_lr: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        by_lr[tuple(r[k] for k in CONDITION_KEYS) + (r["lr"],)].append(r)
    rows = []
    for key, runs in sorted(by_lr.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        row = dict(zip(CONDITION_KEYS, key[:-1]), lr=key[-1], seeds=len(runs),
                   seeds_learned=sum(r["learned"] for r in runs))
        for metric in ("final_loss", "min_loss", "accuracy", "learning_time", "lyap_initial", "lyap_final",
                       "wall_time"):
            row[metric], row[metric + "_sem"] = mean_sem([r[metric] for r in runs])
        rows.append(row)
    # the selected learning rate per condition and whether it is at an edge of the grid
    conditions: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        conditions[tuple(row[k] for k in CONDITION_KEYS)].append(row)
    for group in conditions.values():
        lrs = sorted(r["lr"] for r in group)
        best = min(group, key=lambda r: (r["final_loss"] if math.isfinite(r["final_loss"]) else math.inf))
        for r in group:
            r["selected"] = r is best
            r["grid"] = "/".join(f"{x:.3g}" for x in lrs)
            r["edge"] = ("low" if r["lr"] == lrs[0] else "high" if r["lr"] == lrs[-1] else "") if len(lrs) > 1 else ""
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dirs", nargs="+", help="one or more sweep directories (their runs are pooled)")
    ap.add_argument("--csv", help="write all rows as CSV here")
    ap.add_argument("--json", help="write all rows as JSON here")
    args = ap.parse_args()
    records = [r for d in args.sweep_dirs for p in sorted(Path(d, "runs").glob("*.h5")) if (r := read(p))]
    rows = summarise(records)
    print("| task | model | rule | flossing | gain | lr (grid) | seeds | final loss | min loss | accuracy | learned | "
          "max LE before | after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["selected"]:
            continue
        edge = f" **{r['edge']} edge**" if r["edge"] else ""
        print(f"| {r['task']} | {r['model']} | {r['rule']} | {r['floss']} | {r['gain']:g} | {r['lr']:.3g} "
              f"({r['grid']}){edge} | {r['seeds']} | {r['final_loss']:.3g} ± {r['final_loss_sem']:.2g} | "
              f"{r['min_loss']:.3g} | {r['accuracy']:.3f} ± {r['accuracy_sem']:.3f} | {r['seeds_learned']}/{r['seeds']}"
              f" | {r['lyap_initial']:+.3f} | {r['lyap_final']:+.3f} |")
    for target, write in ((args.csv, _write_csv), (args.json, _write_json)):
        if target:
            tmp = Path(target).with_suffix(Path(target).suffix + ".tmp")
            write(tmp, rows)
            tmp.replace(target)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _write_json(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
