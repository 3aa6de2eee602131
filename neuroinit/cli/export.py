"""The ``neuroinit export`` command: a trained run to a chip format."""

from __future__ import annotations

import sys

import click

from neuroinit.cli import OneLineErrorsCommand, echo_json, fail_cleanly, main

_VERIFY_FAILED = {"netx": "verification failed: Lava differs from the integer emulation",
                  "xylo": "verification failed: xylosim differs from the package's emulation",
                  "nir": "verification failed: an importer's spikes differ from neuroinit's"}


# --- export ---
def _print_export(report) -> None:
    d, fmt = report.to_dict(), report.format
    click.echo(f"wrote {report.out} ({fmt}, profile {report.profile}, {report.model} network)")
    if "conformance" in d:
        click.echo(f"conformance vectors: {d['conformance']} ({d['conformance_trials']} trials x "
                   f"{d['conformance_steps']} steps, {d['conformance_spikes']} spikes; "
                   f"{d['conformance_dropped_trials']} near-tie trials dropped)")
    for w in d.get("warnings", []) + d.get("notes", []):
        click.echo(f"warning: {w}")
    acc = report.accuracy
    if acc:
        click.echo(f"task accuracy: float {acc['float_accuracy']:.3f} -> chip {acc['chip_accuracy']:.3f} "
                   f"({acc['accuracy_change']:+.3f}); loss {acc['float_loss']:.4g} -> {acc['chip_loss']:.4g} "
                   f"({acc['arithmetic']} arithmetic, {acc['spike_mismatches']} spike mismatches of "
                   f"{acc['spikes_float']} float spikes)")
    if report.verify is not None:
        _print_verify(report.verify, fmt)


def _print_verify(v: dict, fmt: str) -> None:
    if "skipped" in v:
        click.echo(f"verify in Lava skipped: {v['skipped']}")
    elif fmt == "xylo":
        for name, b in v.items():   # a 0/1 raster and the task input, as Xylo's input counts
            click.echo(f"verify xylosim, {name} input ({b['trials']} trials x {b['steps']} steps, "
                       f"{b['spikes']} spikes): {b['spike_mismatches']} spike, {b['i_mismatches']} current, "
                       f"{b['v_mismatches']} membrane, {b['v_out_mismatches']} readout mismatches")
    elif fmt == "netx":
        click.echo(f"verify in Lava ({v['trials']} trials x {v['steps']} steps, {v['spikes_lava']} spikes): "
                   f"{v['spike_mismatches']} spike, {v['v_mismatches']} voltage, {v['readout_v_mismatches']} "
                   f"readout mismatches vs the integer emulation"
                   + (f"; accuracy Lava {v['lava_accuracy']:.3f}, emulation {v['emulation_accuracy']:.3f}"
                      if "lava_accuracy" in v else ""))
    else:
        for name, b in v["by_input"].items():   # the conformance (task) input and a 0/1 raster
            click.echo(f"verify {name} ({b['trials']} trials x {b['steps']} steps, {b['spikes_float']} spikes): "
                       + ", ".join(f"{k} {n} mismatches" for k, n in b["mismatches"].items()))


@main.command("export", cls=OneLineErrorsCommand)
@click.argument("run_file", type=click.Path(dir_okay=False))
@click.option("--profile", default=None, help="Profile to deploy on (bundled name or .toml path) [the run's].")
@click.option("--format", "fmt", type=click.Choice(["nir", "netx", "h5", "xylo"]), required=True,
              help="nir: NIR graph + conformance vectors; netx: lava-dl netx HDF5 (Loihi profiles); "
                   "h5: neuroinit weights schema (any model; the export for rate networks); "
                   "xylo: Xylo's integer specification (xylo-like profile; --verify runs xylosim).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file (written atomically).")
@click.option("--verify", is_flag=True, help="NIR: re-simulate the file in snntorch, norse, rockpool (if "
                                             "installed) and the profile's integer emulation on the task input "
                                             "and a 0/1 raster; netx: run it in Lava (fixed point) when lava-dl or "
                                             "$NEUROINIT_LAVA_PYTHON is there, else say skipped; exit 1 on any "
                                             "mismatch.")
@click.option("--nir-target", type=click.Choice(["generic", "stock"]), default="generic", show_default=True,
              help="NIR only: generic (LI readout, r = tau/dt) or stock (the shape snntorch's import_from_nir "
                   "and norse's from_nir read as they are; docs/export.md).")
@click.option("--which", type=click.Choice(["final", "initial", "floss"]), default="final", show_default=True,
              help="Which stored weights to export.")
@click.option("--trials", type=click.IntRange(min=1), default=30, show_default=True,
              help="Task trials for the conformance vectors and the float-vs-chip accuracy.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the task batch.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
@fail_cleanly
def export_command(run_file: str, profile: str | None, fmt: str, out: str, verify: bool, nir_target: str,
                   which: str, trials: int, seed: int, as_json: bool) -> None:
    """Quantise RUN_FILE's trained network onto a chip profile and write it as NIR, lava-dl netx or neuroinit
    HDF5; report the float-vs-chip task accuracy (integer emulation) and, with --verify, spike mismatches of
    snntorch, norse and the emulation against neuroinit's float simulation."""
    from tqdm import tqdm

    from neuroinit.io.export import export_run

    bar = tqdm(total=4 if verify else 3, desc="export", unit="stage", file=sys.stderr, leave=False,
               disable=True if as_json else None)

    def progress(stage: str) -> None:
        if stage != "load":
            bar.update(1)
        bar.set_postfix_str(stage)

    try:
        report = export_run(run_file, fmt, out, profile=profile, which=which, verify=verify, nir_target=nir_target,
                            trials=trials, seed=seed, progress=progress)
    finally:
        bar.close()
    if as_json:
        echo_json(report.to_dict())
    else:
        _print_export(report)
    if not report.ok:
        raise click.ClickException(_VERIFY_FAILED[fmt])
# --- end export ---
