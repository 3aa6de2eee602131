"""The flossing-k table: e-prop on Romo at N = 256 after 100 local flossing iterations of the top k exponents,
against e-prop without flossing, per gain (final loss, eval accuracy, max Lyapunov exponent; mean +- s.e.m. over
seeds). Reads the run files of a sweep directory with plain h5py.

    python examples/n256/floss_k_table.py sweeps/n256 --json docs/results/floss-k-n256.json
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

from summarise import mean_sem, read  # the same reader and statistics as the full summary (this folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--gains", default="0.5,1,2")
    ap.add_argument("--lr-scale", type=float, default=1.0)
    ap.add_argument("--json", help="write the table as JSON here")
    args = ap.parse_args()
    gains = [float(g) for g in args.gains.split(",")]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for path in sorted(Path(args.sweep_dir, "runs").glob("romo_rate_eprop*.h5")):
        r = read(path)
        if not r or r["hidden"] != 256 or r["iters"] != 2000 or r["gain"] not in gains:
            continue
        if abs(r["lr"] * r["hidden"] / 0.05 - args.lr_scale) > 1e-6:
            continue
        k = int(r["floss"][1:].split("x")[0]) if r["floss"] != "none" else 0
        groups[(k, r["gain"])].append(r)
    rows = []
    for (k, g), runs in sorted(groups.items()):
        row = {"k": k, "gain": g, "seeds": len(runs)}
        for key in ("final_loss", "accuracy", "lyap_initial", "lyap_final"):
            row[key], row[key + "_sem"] = mean_sem([r[key] for r in runs])
        base = groups.get((0, g))
        if base and k:
            row["loss_ratio_vs_no_flossing"] = mean_sem([r["final_loss"] for r in base])[0] / row["final_loss"]
        rows.append(row)
    print("| k | gain | seeds | final loss | eval accuracy | max LE before training | max LE after | loss ratio (no floss / floss) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k'] or 'no flossing'} | {r['gain']:g} | {r['seeds']} | {r['final_loss']:.4f} ± "
              f"{r['final_loss_sem']:.4f} | {r['accuracy']:.3f} ± {r['accuracy_sem']:.3f} | "
              f"{r['lyap_initial']:+.3f} | {r['lyap_final']:+.3f} | {r.get('loss_ratio_vs_no_flossing', float('nan')):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
