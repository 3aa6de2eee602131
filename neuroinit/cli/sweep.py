"""The ``sweep`` and ``plot`` commands: experiment sweeps and their figures."""

from __future__ import annotations

import sys

import click

from neuroinit.cli import OneLineErrorsCommand, _check_out_dir, echo_json, fail_cleanly, main
from neuroinit.cli.choices import ModelChoice


# --- experiments ---
def _gain_list(value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals:
        raise click.BadParameter(f"{value!r}: allowed a comma-separated list of numbers, e.g. 0.3,1.5,3",
                                 param_hint="--gains")
    return vals


@main.command("sweep", cls=OneLineErrorsCommand)
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Sweep directory (run files, ledger sweep.json) [sweeps/<spec name>].")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Local worker processes [the CPUs available / --threads]; 0 runs in this process.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch threads per run (1 keeps results independent of the machine).")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Run on an existing Dask distributed cluster instead (see docs/experiments.md).")
@click.option("--dry-run", is_flag=True, help="Validate the spec, list the runs and how many are finished; run none.")
@click.option("--select", type=click.Choice(["final", "min", "learning-time"]), default="final", show_default=True,
              help="Summary: choose each condition's learning rate by the mean of the last 20 logged losses, the "
                   "lowest logged loss, or the learning time (loss stays below 5% of the initial).")
@click.option("--ensemble", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Train up to K compatible runs (same config up to seed, gain, lr; rate networks) as one batched "
                   "model, each into its own run file; 0: every run alone (docs/experiments.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the report and summary as JSON; no progress bar.")
@fail_cleanly
def sweep_command(spec, out, workers, threads, scheduler, dry_run, select, ensemble, as_json) -> None:
    """Run the grid in SPEC (TOML: task x model x rule x gain x seed x learning rate x profile), one run file
    per run in OUT/runs; resumable (finished runs are skipped, checked by content); a summary table at the end
    with the best learning rate per condition."""
    from pathlib import Path

    from neuroinit.experiments import sweep as sw

    plan = sw.load_spec(spec)
    out_dir = Path(out) if out else Path("sweeps") / plan.name
    if dry_run:
        _print_plan(plan, out_dir, as_json)
        return
    from tqdm import tqdm

    bar = None

    def on_start(total, finished):
        nonlocal bar
        bar = tqdm(total=total, initial=finished, desc=plan.name, unit="run", file=sys.stderr, dynamic_ncols=True,
                   disable=True if as_json else None)

    def progress(ev):
        if bar is not None:
            bar.update(1)
            if ev.status != "complete":
                bar.write(f"{ev.status}: {ev.description}" + (f": {ev.error}" if ev.error else ""), file=sys.stderr)

    try:
        report = sw.run_sweep(plan, out_dir, workers=workers, scheduler=scheduler, threads=threads,
                              progress=progress, on_start=on_start, ensemble=ensemble)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        click.echo(f"interrupted; finished runs are kept in {out_dir}: rerun the same command to resume",
                   err=True)
        sys.exit(130)
    finally:
        if bar is not None:
            bar.close()
    rows = sw.summarize(sw.summaries_from_dir(out_dir, curves=False), select=select)
    if as_json:
        echo_json({"report": report.to_dict(), "summary": rows})
    else:
        click.echo(sw.format_summary(rows))
        _print_sweep_report(report)
    if report.failed:
        first = report.failed[0]
        raise click.ClickException(f"{len(report.failed)} run(s) failed (errors in the ledger "
                                   f"{Path(report.sweep_dir) / sw.MANIFEST}); first: {first['run']}: "
                                   f"{first['error']}; rerun the command to retry them")


def _print_plan(plan, out_dir, as_json: bool) -> None:
    """--dry-run: every planned run with the state of its file in ``out_dir``."""
    from neuroinit.experiments import sweep as sw

    states = [(r, sw.run_state(out_dir / r.file, r.config)[0]) for r in plan.runs]
    if as_json:
        echo_json({"name": plan.name, "sweep_dir": str(out_dir), "total": len(plan.runs),
                   "runs": [{"id": r.run_id, "file": r.file, "run": r.describe(), "state": s} for r, s in states]})
        return
    for r, s in states:
        click.echo(f"{r.run_id}  {s:<9} {r.describe()}")
    done = sum(s in sw.FINISHED for _, s in states)
    click.echo(f"{len(plan.runs)} runs in {plan.name!r}, {done} finished in {out_dir}")


def _print_sweep_report(report) -> None:
    from pathlib import Path

    from neuroinit.experiments.sweep import MANIFEST

    c = report.counts
    click.echo(f"{report.total} runs ({report.skipped} already finished, {report.ran} run now on "
               f"{report.executor}): {c.get('complete', 0)} complete, {c.get('diverged', 0)} diverged, "
               f"{c.get('failed', 0)} failed, {c.get('pending', 0)} pending; {report.wall_time:.1f} s; "
               f"ledger {Path(report.sweep_dir) / MANIFEST}")


@main.command("plot", cls=OneLineErrorsCommand)
@click.argument("sweep_dir", type=click.Path())
@click.option("--figure", type=click.Choice(["learning-curves", "lyapunov", "flossing", "rate-vs-spiking",
                                             "curvature", "alignment"]), required=True,
              help="alignment: SWEEP_DIR is a 'neuroinit alignment --out' JSON file.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Image file (.png/.pdf/.svg).")
@click.option("--task", default=None, help="Only this task.")
@click.option("--model", type=ModelChoice(), default=None, help="Only this model.")
@click.option("--gains", default=None, help="Only these gains, comma-separated.")
@click.option("--spec", "spec_name", default=None, help="Only the runs of this spec (by name) [every spec run in "
              "SWEEP_DIR].")
@click.option("--max-iter", type=click.IntRange(min=1), default=100, show_default=True,
              help="curvature: Hessian-vector products per network (power iteration).")
@click.option("--smooth", type=click.IntRange(min=1), default=1, show_default=True,
              help="Learning curves as a trailing mean over this many logged losses (1: raw).")
@click.option("--select", type=click.Choice(["final", "min", "learning-time"]), default="final", show_default=True,
              help="Choose each condition's learning rate by the mean of the last 20 logged losses, the lowest "
                   "logged loss, or the learning time (stated on the figure).")
@click.option("--json", "as_json", is_flag=True, help="Print {figure, out, curves} as JSON.")
@fail_cleanly
def plot_command(sweep_dir, figure, out, task, model, gains, spec_name, max_iter, smooth, select, as_json) -> None:
    """Draw a figure from the runs of a sweep: learning curves by gain (Fig. 1/2), max Lyapunov exponent vs
    gain before/after training (Fig. 3), flossing vs none (Fig. 4), rate vs spiking, curvature vs rule; or the
    gradient alignment vs gain from an alignment JSON file (--figure alignment)."""
    from neuroinit.experiments.plots import plot_figure

    _check_out_dir(out)
    bar = None
    if figure == "curvature" and not as_json:
        from tqdm import tqdm

        bar = tqdm(desc="curvature", unit="run", file=sys.stderr, leave=False, disable=None)

    def progress(i, total):
        if bar is not None:
            bar.total = total
            bar.update(i - bar.n)

    try:
        n = plot_figure(sweep_dir, figure, out, task=task, model=model, gains=_gain_list(gains), spec=spec_name,
                        max_iter=max_iter, smooth=smooth, progress=progress, select=select)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        echo_json({"figure": figure, "out": out, "curves": n})
    else:
        click.echo(f"{figure}: {n} curves -> {out}")


# --- end experiments ---
