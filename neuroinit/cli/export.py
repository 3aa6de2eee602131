"""The ``neuroinit export`` command: a trained run to a chip format."""

from __future__ import annotations

import sys

import click

from neuroinit.cli import OneLineErrorsCommand, echo_json, fail_cleanly, main


# --- export ---
def _export_task(run, seed: int, trials: int):
    """The run's task (Romo: its deterministic test variant), one float64 batch scaled as in training, or
    ``(None, None)`` when the task cannot be rebuilt."""
    import torch

    from neuroinit.tasks import task_from_settings

    name = str(run.config.get("task", "romo"))
    s = run.settings or {}
    if "dt_ms" not in s:
        return None, None
    task = task_from_settings(name, s, **({"variant": "test"} if name.lower() == "romo" else {}))
    batch = task.batch(trials, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scale = float(s.get("input_scale", 1.0))
    return task, batch._replace(inputs=batch.inputs * scale)


def _export_cell(path: str, which: str):
    """The stored network with the weight grids it was trained on (the run file's codes and scales)."""
    try:
        from neuroinit.io.runfile import load_cell, read_run
    except ImportError as e:  # pragma: no cover - run files ship with neuroinit
        raise click.ClickException(f"cannot read run files: {e}") from None
    from neuroinit.quantize import Grid

    run = read_run(path)
    cell = load_cell(path, which)
    ws = run.weights[which]
    for name, g in (ws.grids or {}).items():
        if name in cell.grids and g is not None:
            cell.grids[name] = Grid(float(g["scale"]), int(g["code_min"]), int(g["code_max"]),
                                    None if g.get("exponent") is None else int(g["exponent"]))
    return run, cell


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
    import torch
    from tqdm import tqdm

    from neuroinit.profiles import load_profile

    if verify and fmt == "h5":
        raise click.ClickException("--verify checks NIR, netx and Xylo exports; allowed with --format nir or netx, "
                                   "or xylo (got --format h5)")
    stages = ["load", "write", "accuracy"] + (["verify"] if verify else [])
    bar = tqdm(total=len(stages), desc="export", unit="stage", file=sys.stderr, leave=False,
               disable=True if as_json else None)
    bar.set_postfix_str("load")
    run, cell = _export_cell(run_file, which)
    prof = load_profile(profile) if profile else cell.profile
    task, batch = _export_task(run, seed, trials)
    bar.update(1)
    report: dict = {"run": run_file, "which": which, "format": fmt, "out": out, "profile": prof.name,
                    "model": cell.model}
    bar.set_postfix_str("write")
    if fmt == "nir":
        from neuroinit.io.nir import to_nir, write_nir

        if verify and cell.model == "lif":
            from neuroinit.io.verify import check_verifiable

            check_verifiable(to_nir(cell, prof, target=nir_target)[0])   # refuse before anything is written
        ex = write_nir(out, cell, prof, inputs=batch.inputs if batch is not None else None, target=nir_target)
        report.update(nir_target=nir_target, conformance=str(ex.conformance), exact=ex.exact,
                      warnings=list(ex.warnings),
                      conformance_steps=ex.steps, conformance_trials=ex.trials, conformance_spikes=ex.spikes,
                      conformance_dropped_trials=ex.dropped_trials,
                      v_threshold=float(ex.graph.nodes["lif"].v_threshold[0]))
    elif fmt == "netx":
        from neuroinit.io.netx import write_netx

        integer_inputs = batch is not None and bool(torch.equal(batch.inputs, batch.inputs.round()))
        nx = write_netx(out, cell, prof, integer_inputs=integer_inputs)
        report.update(input_scale=nx.input_scale, a_in_unit=nx.a_in_unit, notes=list(nx.notes))
    elif fmt == "xylo":
        from neuroinit.io.xylo import export_xylo

        xy = export_xylo(out, cell, prof, batch.inputs if batch is not None else None, verify=verify, seed=seed)
        report.update(input_frac_bits=xy["input_frac_bits"], notes=xy["notes"])
    else:
        from neuroinit.io.nir import write_weights_h5

        write_weights_h5(out, cell, prof)
    bar.update(1)
    bar.set_postfix_str("accuracy")
    if cell.model == "lif" and task is not None:
        from neuroinit.emulate.integer import compare_on_task

        # netx: the deployment the file describes (graded input at input_scale, bias in a_in units)
        dep_kw = {"input_frac_bits": nx.input_frac_bits, "bias_exp": 6} if fmt == "netx" else {}
        if fmt == "xylo":   # the input counts the file describes
            dep_kw = {"input_frac_bits": xy["input_frac_bits"]}
        report["accuracy"] = compare_on_task(cell, task, prof, batch=batch, generator=torch.Generator(), **dep_kw)
    bar.update(1)
    ok = True
    if verify and fmt == "xylo":
        report["verify"], ok = xy["verify"], xy["ok"]
    elif verify and fmt == "netx":
        bar.set_postfix_str("verify")
        from neuroinit.io.netx import find_lava_python, verify_netx

        lava_python, why = find_lava_python()
        if lava_python is None or batch is None or cell.model != "lif":
            report["verify"] = {"skipped": why if lava_python is None else "no task batch to run"}
        else:
            report["verify"] = verify_netx(out, cell, batch.inputs, task=task, batch=batch, profile=prof,
                                           integer_inputs=integer_inputs, python=lava_python)
            ok = report["verify"]["ok"]
        bar.update(1)
    elif verify:
        bar.set_postfix_str("verify")
        from neuroinit.io.verify import verify_nir

        rep = verify_nir(out)
        report["verify"] = rep.to_dict()
        ok = rep.ok
        bar.update(1)
    bar.close()
    if as_json:
        echo_json(report)
    else:
        click.echo(f"wrote {out} ({fmt}, profile {prof.name}, {cell.model} network)")
        if "conformance" in report:
            click.echo(f"conformance vectors: {report['conformance']} ({report['conformance_trials']} trials x "
                       f"{report['conformance_steps']} steps, {report['conformance_spikes']} spikes; "
                       f"{report['conformance_dropped_trials']} near-tie trials dropped)")
        for w in report.get("warnings", []) + report.get("notes", []):
            click.echo(f"warning: {w}")
        acc = report.get("accuracy")
        if acc:
            click.echo(f"task accuracy: float {acc['float_accuracy']:.3f} -> chip {acc['chip_accuracy']:.3f} "
                       f"({acc['accuracy_change']:+.3f}); loss {acc['float_loss']:.4g} -> {acc['chip_loss']:.4g} "
                       f"({acc['arithmetic']} arithmetic, {acc['spike_mismatches']} spike mismatches of "
                       f"{acc['spikes_float']} float spikes)")
        v = report.get("verify", {})
        if "skipped" in v:
            click.echo(f"verify in Lava skipped: {v['skipped']}")
        elif fmt == "xylo" and verify:
            for name, b in v.items():   # a 0/1 raster and the task input, as Xylo's input counts
                click.echo(f"verify xylosim, {name} input ({b['trials']} trials x {b['steps']} steps, "
                           f"{b['spikes']} spikes): {b['spike_mismatches']} spike, {b['i_mismatches']} current, "
                           f"{b['v_mismatches']} membrane, {b['v_out_mismatches']} readout mismatches")
        elif fmt == "netx" and verify:
            click.echo(f"verify in Lava ({v['trials']} trials x {v['steps']} steps, {v['spikes_lava']} spikes): "
                       f"{v['spike_mismatches']} spike, {v['v_mismatches']} voltage, {v['readout_v_mismatches']} "
                       f"readout mismatches vs the integer emulation"
                       + (f"; accuracy Lava {v['lava_accuracy']:.3f}, emulation {v['emulation_accuracy']:.3f}"
                          if "lava_accuracy" in v else ""))
        elif verify:
            for name, b in v["by_input"].items():   # the conformance (task) input and a 0/1 raster
                click.echo(f"verify {name} ({b['trials']} trials x {b['steps']} steps, {b['spikes_float']} spikes): "
                           + ", ".join(f"{k} {n} mismatches" for k, n in b["mismatches"].items()))
    if not ok:
        raise click.ClickException({"netx": "verification failed: Lava differs from the integer emulation",
                                    "xylo": "verification failed: xylosim differs from the package's emulation"}
                                   .get(fmt, "verification failed: an importer's spikes differ from neuroinit's"))
# --- end export ---
