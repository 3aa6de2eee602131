"""Rendering results as tables and checking them against the performance targets."""

from __future__ import annotations

import statistics

from neuroinit._util import fmt


# ------------------------------------------------------------------------------------------ rendering
def _si(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.3g}{unit}"
    return f"{v:.3g}"


TABLE_HEADER = ("model", "N", "B", "method", "profile", "threads", "us/step", "IQR", "samp-steps/s", "syn-upd/s",
                "peak MiB", "x fused", "roofline", "own roofline", "load")


def _threads_cell(r: dict) -> str:
    """The thread count of the row; in "best" mode followed by the other counts' medians (us/step)."""
    t = r.get("threads")
    if t is None:
        return "-"
    tried = r.get("threads_tried") or {}
    others = [f"{k}: {fmt(v['us_per_step'], '.3g')}" for k, v in tried.items() if k != str(t)]
    return f"{t} (" + ", ".join(others) + ")" if others else str(t)


def _load_cell(r: dict) -> str:
    """Background cores busy over the row's timed repeats ('-' where they took under 0.25 s: too short for the
    kernel's 10 ms CPU clock); results of schema < 3 have only the per-repeat values."""
    if "background_load_window" in r:
        return fmt(r["background_load_window"], ".2f")
    loads = [v for v in r.get("background_load", []) if v is not None]
    return fmt(statistics.median(loads), ".2f") if loads else "-"


THREADS_NOTE = ("threads: every method timed at one thread and at all available CPUs, repeats interleaved; the "
                "row holds the count with the lower median, the other count's median in brackets (us/step)")


def table_row(r: dict) -> tuple[str, ...]:
    if r.get("skipped"):
        return (r["variant"], str(r["hidden"]), str(r["batch"]), r["method"], r["profile"], "", "skipped: "
                + r["skipped"][:40], "", "", "", "", "", "", "", "")
    iqr = f"{fmt(r['us_per_step_q1'], '.3g')}-{fmt(r['us_per_step_q3'], '.3g')}"
    roof = own = "-"
    if r.get("roofline_fraction") is not None:
        rf = r["roofline"]
        roof = f"{100 * r['roofline_fraction']:.0f}% {rf['memory_level'] if rf['bound_by'] == 'memory' else 'flop'}"
    if r.get("own_roofline_fraction") is not None:
        c = r["roofline"].get("chip") or r["roofline"]["chunked"]
        by = {"compute": "flop", "memory": "mem", "random": "rng"}[c["bound_by"]]
        own = f"{100 * r['own_roofline_fraction']:.0f}% {by}"
    return (r["variant"], str(r["hidden"]), str(r["batch"]), r["method"], r["profile"], _threads_cell(r),
            fmt(r["us_per_step"], ".3g"), iqr, _si(r["sample_steps_per_s"]), _si(r["synaptic_updates_per_s"]),
            fmt(r["peak_memory_mib"], ".1f"), fmt(r["ratio_to_fused"], ".2f"), roof, own, _load_cell(r))


def _calibration_lines(result: dict) -> list[str]:
    """One line per thread count calibrated at; a suspect calibration (not cached) says what contradicts."""
    cal = result["calibration"]
    calibs = result.get("calibrations") or {str(cal.get("threads", result["environment"].get("torch_threads"))): cal}
    lines = []
    for t, cal in calibs.items():
        bw = ", ".join(f"{k} {cal['bandwidth_gbs'][k]:.1f}" for k in ("L2", "L3", "DRAM") if k in cal["bandwidth_gbs"])
        how = " (cached)" if cal.get("cached") else ""
        lines.append(f"calibration at {t} thread(s){how}: bandwidth GB/s {bw}; matmul {cal['matmul_gflops']:.1f} "
                     "GFLOP/s")
        if cal.get("suspect"):
            lines.append(f"WARNING: calibration at {t} thread(s) is suspect after {cal.get('attempts')} "
                         f"measurements (not cached; its rooflines are unreliable): {'; '.join(cal['problems'])}")
    return lines


def _environment_line(env: dict) -> str:
    cpu = env.get("cpu") or {}
    ident = ", ".join(f"{k} {v}" for k, v in cpu.items())
    caches = ", ".join(f"{k} {v // 1024} KiB" if v < 2 ** 20 else f"{k} {v / 2 ** 20:g} MiB"
                       for k, v in (env.get("caches") or {}).items())
    return (f"environment: {env['cpu_model']}{f' ({ident})' if ident else ''}; caches {caches or 'unknown'}; "
            f"{env.get('available_cpus', env['logical_cpus'])} CPUs available; torch {env['torch']} (default "
            f"{env['torch_threads']} threads), OMP_WAIT_POLICY {env['omp_wait_policy']}, device {env['device']}, "
            f"fused {env['fused']}")


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
    threads = result["config"].get("threads")
    lines += ["", THREADS_NOTE if threads == "best" else
              "threads: every method timed at each listed count (one row per count)" if threads else
              "threads: one count for every row (torch's; results of schema < 3)",
              ("us/step: median over repeats (IQR: quartiles); x fused: time / neuroinit-fused (ideal) of the "
               "same configuration; roofline: bound of a rule that updates every trace at every step / measured "
               "(memory level or flop; over 100% where the chunked update moves less); own roofline: bound of the "
               "chunked update's own work / measured (chip-precision rows: of the integer trace codes moved and "
               "random bits drawn, rng: bound by the generator's word rate); load: background CPU cores busy during "
               "the row's repeats "
               "('-': under 0.25 s in all)" + (f"; over the whole run {result['background_load_run']:.2f}"
                                              if result.get("background_load_run") is not None else "")),
              *_calibration_lines(result), _environment_line(result["environment"])]
    bad = [c for c in result["gradient_checks"] if not c["ok"]]
    lines.append(f"gradient checks: {len(result['gradient_checks']) - len(bad)}/{len(result['gradient_checks'])}"
                 " ok" + ("" if not bad else " FAILED: " + ", ".join(f"{c['variant']}/{c['method']}" for c in bad)))
    for m in result.get("memory_scaling", []):
        ks = sorted(k for k in m if k.startswith("peak_memory_mib_T"))
        vals = ", ".join(f"T={k.rsplit('T', 1)[1]}: {fmt(m[k], '.1f')} MiB" for k in ks)
        growth = "-" if m["growth"] is None else f"{100 * m['growth']:+.0f}%"
        lines.append(f"memory {m['variant']} N={m['hidden']} B={m['batch']} {m['method']}: {vals} ({growth})")
    return "\n".join(lines)
