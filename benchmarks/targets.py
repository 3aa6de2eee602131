"""The project's performance targets, checked against stored bench results (``neuroinit bench --json``):
rendered by ``benchmarks/render.py``. The targets live here, with the results, not in the package."""

from __future__ import annotations


def _rows(results: list[dict]) -> list[dict]:
    return [r for res in results for r in res["results"] if r.get("us_per_step") is not None]


def _find(rows, variant, method, n, b, profile="ideal"):
    """The fastest row (by median) of a method and configuration: each method at its best thread count."""
    found = [r for r in rows
             if (r["variant"], r["method"], r["hidden"], r["batch"], r["profile"]) == (variant, method, n, b, profile)]
    return min(found, key=lambda r: r["us_per_step"]) if found else None


def evaluate_targets(results: list[dict]) -> list[dict]:
    """Each performance target against stored results (one or more ``run_bench`` outputs, e.g. the LIF and the
    rate runs): ``met`` is True / False, or None where the results hold no measurement for it."""
    rows = _rows(results)
    out = []

    def add(target, measured, met, note=""):
        out.append({"target": target, "measured": measured, "met": met, "note": note})

    fused = _find(rows, "lif", "neuroinit-fused", 256, 16)
    for peer, need in (("snntorch-bptt", 10), ("norse-bptt", 10), ("autograd-eprop", 5)):
        r = _find(rows, "lif", peer, 256, 16)
        if fused and r:
            x = r["us_per_step"] / fused["us_per_step"]
            x_min = r["us_per_step_min"] / fused["us_per_step_min"]
            at = (f" at {fused['threads']} vs {r['threads']} thread(s)"
                  if fused.get("threads") and r.get("threads") else "")
            add(f"LIF online e-prop >= {need}x {peer} (N=256, B=16)",
                f"{x:.1f}x ({fused['us_per_step']:.0f} vs {r['us_per_step']:.0f} us/step{at}); of the fastest "
                f"repeats {x_min:.1f}x", x >= need)
        else:
            add(f"LIF online e-prop >= {need}x {peer} (N=256, B=16)", "not measured", None)
    r = _find(rows, "lif", "neuroinit-fused", 256, 1)
    add("LIF online step <= 20 us (N=256, B=1, CPU)",
        f"{r['us_per_step']:.1f} us/step (min {r['us_per_step_min']:.1f})" if r else "not measured",
        (r["us_per_step"] <= 20) if r else None)
    for variant, label, need, cond in (
            ("rate-rflo", "RFLO traces larger than the cache (N >= 512, B >= 16)", 0.8,
             lambda r: r["hidden"] >= 512 and r["batch"] >= 16),
            ("lif", "LIF at N >= 512, B = 64", 0.5, lambda r: r["hidden"] >= 512 and r["batch"] == 64)):
        sel = [r for r in rows if r["variant"] == variant and r["method"] == "neuroinit-fused"
               and r["profile"] == "ideal" and r.get("roofline_fraction") is not None and cond(r)]
        if not sel:
            add(f">= {need:.0%} of the roofline for {label}", "not measured", None)
            continue
        for r in sel:
            rf = r["roofline"]
            own = ""
            if r.get("own_roofline_fraction") is not None:
                own = (f"; chunked update: {r['own_roofline_fraction']:.0%} of its own bound "
                       f"{rf['chunked']['bound_us']:.0f} us")
            add(f">= {need:.0%} of the roofline for {label}: N={r['hidden']} B={r['batch']}",
                f"{r['roofline_fraction']:.0%} ({r['us_per_step']:.0f} us vs per-step trace bound "
                f"{rf['bound_us']:.0f} us, {rf['bound_by']}, {rf['memory_level']}{own})",
                r["roofline_fraction"] >= need)
    mem = [m for res in results for m in res.get("memory_scaling", []) if m["method"] == "neuroinit-fused"]
    for m in mem:
        ks = sorted((k for k in m if k.startswith("peak_memory_mib_T")), key=lambda k: int(k.rsplit("T", 1)[1]))
        add(f"online memory flat in T (within 10%), LIF N={m['hidden']} B={m['batch']}",
            ", ".join(f"T={k.rsplit('T', 1)[1]}: {m[k]:.1f} MiB" for k in ks if m[k] is not None)
            + ("" if m["growth"] is None else f" ({100 * m['growth']:+.1f}%)"),
            None if m["growth"] is None else abs(m["growth"]) <= 0.10)
    if not mem:
        add("online memory flat in T (within 10%)", "not measured", None)
    add_chip_targets(rows, add)
    if not any(res.get("config", {}).get("device") == "cuda" for res in results):
        add("GPU: >= 60% of HBM roofline for RFLO at N=1024, B=64; <= 20 us per B=1 step",
            "not measured (no GPU in this run)", None)
    return out


def format_targets(targets: list[dict]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in targets:
        met = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines)


def add_chip_targets(rows: list[dict], add) -> None:
    """Learning at a chip's precision (the fused step's integer trace codes) at N = 256: within 3x of the float
    fused row of the same configuration, faster than every peer timed there, >= 50% of the chip path's own
    roofline (integer codes moved + random words drawn)."""
    chip_rows = [r for r in rows if r["method"] == "neuroinit-fused" and r["profile"] != "ideal"
                 and r["hidden"] == 256 and (r.get("roofline") or {}).get("chip")]
    if not chip_rows:
        add("chip-precision rows (N=256): within 3x of float, ahead of the peers, >= 50% of own roofline",
            "not measured", None)
    for r in chip_rows:
        where = f"{r['variant']} {r['profile']} N=256 B={r['batch']}"
        flt = _find(rows, r["variant"], "neuroinit-fused", 256, r["batch"])
        if flt:
            x = r["us_per_step"] / flt["us_per_step"]
            add(f"chip row within 3x of the float fused row: {where}",
                f"{x:.1f}x ({r['us_per_step']:.0f} vs {flt['us_per_step']:.0f} us/step)", x <= 3)
        peers = [p for p in (_find(rows, r["variant"], m, 256, r["batch"])
                             for m in ("autograd-eprop", "snntorch-bptt", "norse-bptt")) if p]
        if peers:
            fastest_peer = min(p["us_per_step"] for p in peers)
            add(f"chip row faster than every peer: {where}",
                f"{r['us_per_step']:.0f} us/step vs " + ", ".join(f"{p['method']} {p['us_per_step']:.0f}"
                                                                  for p in peers),
                r["us_per_step"] < fastest_peer)
        frac = r.get("own_roofline_fraction")
        add(f">= 50% of the chip path's own roofline: {where}",
            "not measured" if frac is None else f"{frac:.0%} (bound {r['roofline']['chip']['bound_us']:.0f} us)",
            None if frac is None else frac >= 0.5)
