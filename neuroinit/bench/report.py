"""Rendering results as tables and checking them against the performance targets."""

from __future__ import annotations

import math
import statistics


# ------------------------------------------------------------------------------------------ rendering
def _fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _si(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.3g}{unit}"
    return f"{v:.3g}"


TABLE_HEADER = ("model", "N", "B", "method", "profile", "us/step", "IQR", "samp-steps/s", "syn-upd/s",
                "peak MiB", "x fused", "roofline", "own roofline", "load")


def table_row(r: dict) -> tuple[str, ...]:
    if r.get("skipped"):
        return (r["variant"], str(r["hidden"]), str(r["batch"]), r["method"], r["profile"], "skipped: "
                + r["skipped"][:40], "", "", "", "", "", "", "", "")
    loads = [v for v in r["background_load"] if v is not None]
    iqr = f"{_fmt(r['us_per_step_q1'])}-{_fmt(r['us_per_step_q3'])}"
    roof = own = "-"
    if r.get("roofline_fraction") is not None:
        rf = r["roofline"]
        roof = f"{100 * r['roofline_fraction']:.0f}% {rf['memory_level'] if rf['bound_by'] == 'memory' else 'flop'}"
    if r.get("own_roofline_fraction") is not None:
        c = r["roofline"].get("chip") or r["roofline"]["chunked"]
        by = {"compute": "flop", "memory": "mem", "random": "rng"}[c["bound_by"]]
        own = f"{100 * r['own_roofline_fraction']:.0f}% {by}"
    return (r["variant"], str(r["hidden"]), str(r["batch"]), r["method"], r["profile"], _fmt(r["us_per_step"]),
            iqr, _si(r["sample_steps_per_s"]), _si(r["synaptic_updates_per_s"]), _fmt(r["peak_memory_mib"], ".1f"),
            _fmt(r["ratio_to_fused"], ".2f"), roof, own, _fmt(statistics.median(loads), ".2f") if loads else "-")


def format_table(result: dict, *, markdown: bool = False) -> str:
    """The results as an aligned text table (or a markdown table), followed by checks, memory and environment."""
    rows = [table_row(r) for r in result["results"]]
    lines = []
    if markdown:
        lines.append("| " + " | ".join(TABLE_HEADER) + " |")
        lines.append("|" + "|".join("---" for _ in TABLE_HEADER) + "|")
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    else:
        widths = [max(len(c[i]) for c in [TABLE_HEADER, *rows]) for i in range(len(TABLE_HEADER))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(TABLE_HEADER, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    env, cal = result["environment"], result["calibration"]
    bw = ", ".join(f"{k} {v:.1f}" for k, v in cal["bandwidth_gbs"].items())
    lines += ["",
              ("us/step: median over repeats (IQR: quartiles); x fused: time / neuroinit-fused (ideal); "
               "roofline: bound of a rule that updates every trace at every step / measured (memory level or "
               "flop; over 100% where the chunked update moves less); own roofline: bound of the chunked "
               "update's own work / measured (chip-precision rows: of the integer trace codes moved and random "
               "bits drawn, rng: bound by the generator's word rate); load: background CPU cores busy"),
              (f"calibration{' (cached)' if cal.get('cached') else ''}: bandwidth GB/s {bw}; matmul "
               f"{cal['matmul_gflops']:.1f} GFLOP/s"),
              (f"environment: {env['cpu_model']}, {env['logical_cpus']} CPUs, torch {env['torch']} "
               f"({env['torch_threads']} threads), OMP_WAIT_POLICY {env['omp_wait_policy']}, device "
               f"{env['device']}, fused {env['fused']}")]
    bad = [c for c in result["gradient_checks"] if not c["ok"]]
    lines.append(f"gradient checks: {len(result['gradient_checks']) - len(bad)}/{len(result['gradient_checks'])}"
                 " ok" + ("" if not bad else " FAILED: " + ", ".join(f"{c['variant']}/{c['method']}" for c in bad)))
    for m in result.get("memory_scaling", []):
        ks = sorted(k for k in m if k.startswith("peak_memory_mib_T"))
        vals = ", ".join(f"T={k.rsplit('T', 1)[1]}: {_fmt(m[k], '.1f')} MiB" for k in ks)
        growth = "-" if m["growth"] is None else f"{100 * m['growth']:+.0f}%"
        lines.append(f"memory {m['variant']} N={m['hidden']} B={m['batch']} {m['method']}: {vals} ({growth})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ targets (issue 7)
def _rows(results: list[dict]) -> list[dict]:
    return [r for res in results for r in res["results"] if r.get("us_per_step") is not None]


def _find(rows, variant, method, n, b, profile="ideal"):
    for r in rows:
        if (r["variant"], r["method"], r["hidden"], r["batch"], r["profile"]) == (variant, method, n, b, profile):
            return r
    return None


def evaluate_targets(results: list[dict]) -> list[dict]:
    """Each performance target of issue 7 against stored results (one or more ``run_bench`` outputs, e.g. the
    LIF and the rate runs): ``met`` is True / False, or None where the results hold no measurement for it."""
    rows = _rows(results)
    out = []

    def add(target, measured, met, note=""):
        out.append({"target": target, "measured": measured, "met": met, "note": note})

    fused = _find(rows, "lif", "neuroinit-fused", 256, 16)
    for peer, need in (("snntorch-bptt", 10), ("norse-bptt", 10), ("autograd-eprop", 5)):
        r = _find(rows, "lif", peer, 256, 16)
        if fused and r:
            x = r["us_per_step"] / fused["us_per_step"]
            add(f"LIF online e-prop >= {need}x {peer} (N=256, B=16)",
                f"{x:.1f}x ({fused['us_per_step']:.0f} vs {r['us_per_step']:.0f} us/step)", x >= need)
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
    gpu = [r for r in rows if any(res["config"]["device"] == "cuda" for res in results)]
    if not gpu:
        add("GPU: >= 60% of HBM roofline for RFLO at N=1024, B=64; <= 20 us per B=1 step",
            "not measured (no GPU in this run)", None)
    return out


def format_targets(targets: list[dict]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in targets:
        met = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines)
