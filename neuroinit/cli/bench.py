"""The ``neuroinit bench`` command: online-update throughput."""

from __future__ import annotations

import json
import sys

import click

from neuroinit.cli import _check_out_dir, _note_missing_fused, echo_json, fail_cleanly, main


# --- bench ---
def _int_list(value: str, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: allowed a comma-separated list of integers >= 1",
                                 param_hint=f"--{name}") from None
    if not vals or any(v < 1 for v in vals):
        raise click.BadParameter(f"{value!r}: allowed a comma-separated list of integers >= 1",
                                 param_hint=f"--{name}")
    return vals


@main.command("bench")
@click.option("--profile", default="ideal", show_default=True,
              help="Hardware profile (bundled name or TOML path) the online rule learns under.")
@click.option("--model", "models", type=click.Choice(["rate", "lif", "alif", "both"]), default="both",
              show_default=True, help="rate: voltage form (e-prop) and rate form (RFLO); lif: spiking e-prop; alif: "
              "adaptive LIF (two eligibility components; peer: norse's LSNNRecurrent).")
@click.option("--hidden", default=None, help="Hidden sizes, comma-separated [128,256,512,1024; quick: 64].")
@click.option("--batch", default=None, help="Batch sizes, comma-separated [1,16,64; quick: 1,16].")
@click.option("--steps", type=int, default=None, help="Time steps T per trial [100; quick: 40].")
@click.option("--repeats", type=int, default=None, help="Timed trials per method [5; quick: 3].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", default="best", show_default=True,
              help="'best': every method timed at one thread and at all available CPUs, the faster reported "
              "with its count; or a comma-separated list of counts: every method at each, side by side.")
# the bench's METHODS, written out so that --help does not import torch (tests/test_bench.py keeps them equal)
@click.option("--methods", default=None, help="Comma-separated subset of: neuroinit-fused, neuroinit-torch, "
              "autograd-eprop, neuroinit-bptt, bptt, snntorch-bptt, norse-bptt.")
@click.option("--quick", is_flag=True, help="A small configuration that finishes in under 2 minutes.")
@click.option("--recalibrate", is_flag=True, help="Measure bandwidth and matmul rate again (else cached).")
@click.option("--memory-scaling/--no-memory-scaling", default=True, show_default=True,
              help="Peak memory of online rules vs BPTT at T and 10 T (LIF; one configuration).")
@click.option("--json", "json_out", default=None, metavar="OUT",
              help="Write the results as JSON to OUT ('-': stdout, and no table); each result also lands in "
              "OUT.partial.jsonl as it is measured, until OUT is written.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT.partial.jsonl (same options "
              "and --json OUT): configurations already timed are kept, the rest are timed.")
@fail_cleanly
def bench_command(profile, models, hidden, batch, steps, repeats, device, threads, methods, quick, recalibrate,
                  memory_scaling, json_out, resume) -> None:
    """Online-update throughput of rate and LIF networks under a profile, next to autograd e-prop, BPTT,
    snntorch and norse, with the fraction of the machine's roofline reached."""
    from neuroinit import bench

    overrides = dict(profile=profile, models=models, device=device, recalibrate=recalibrate,
                     memory_scaling=memory_scaling,
                     threads="best" if threads.strip() == "best" else _int_list(threads, "threads"),
                     hidden=_int_list(hidden, "hidden") if hidden else None,
                     batch=_int_list(batch, "batch") if batch else None, steps=steps, repeats=repeats,
                     methods=tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None)
    if quick:
        cfg = bench.quick_config(**overrides)
    else:
        cfg = bench.BenchConfig(**{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    partial, reuse = _partial_results(cfg, json_out, resume)
    if cfg.device == "cpu" and "neuroinit-fused" in cfg.methods:
        from neuroinit.learning import fused

        if not fused.available():
            _note_missing_fused(fused.unavailable_reason())
    quiet = json_out == "-"
    jobs = len(bench.planned_rows(cfg))
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=jobs, initial=min(len(reuse), jobs), desc="bench", unit="run", file=sys.stderr,
                   leave=False, disable=None)

    def progress(msg: str) -> None:
        if bar is not None:
            bar.set_postfix_str(msg, refresh=True)

    def on_result(res) -> None:
        if bar is not None:
            bar.update(1)
        if partial is not None:
            partial.append(res)

    result = bench.run_bench(cfg, progress=progress, on_result=on_result, reuse=reuse)
    if bar is not None:
        bar.close()
    for t, cal in result["calibrations"].items():
        if cal.get("suspect"):
            click.echo(f"warning: the calibration at {t} thread(s) contradicts the memory hierarchy after "
                       f"{cal['attempts']} measurements ({'; '.join(cal['problems'])}); not cached, its rooflines "
                       "are unreliable (a busy machine? try --recalibrate later)", err=True)
    if json_out == "-":
        echo_json(result)
        return
    if json_out:
        from neuroinit._util import json_safe
        from neuroinit.io.atomic import atomic_write_path

        with atomic_write_path(json_out) as tmp:  # strict JSON: NaN / inf as null
            tmp.write_text(json.dumps(json_safe(result), indent=2, sort_keys=True, default=float))
        partial.remove()
    click.echo(bench.format_table(result))
    bad = [c for c in result["gradient_checks"] if not c["ok"]]
    if bad:
        raise click.ClickException("gradient check failed for " + ", ".join(
            f"{c['variant']}/{c['method']}" for c in bad) + " (those methods were not timed)")


def _partial_results(cfg, json_out, resume):
    """The partial-results file of ``--json OUT`` (None for none or stdout) and the rows to reuse (``--resume``)."""
    if json_out is None or json_out == "-":
        if resume:
            raise click.BadParameter("needs --json OUT (the file whose OUT.partial.jsonl to continue)",
                                     param_hint="--resume")
        return None, []
    from neuroinit.bench.partial import PartialResults

    _check_out_dir(json_out, "--json")
    partial = PartialResults(json_out)
    return partial, partial.begin(cfg, resume=resume)  # its ValueError: one line (fail_cleanly)
# --- end bench ---
