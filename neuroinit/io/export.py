"""A run file's trained network to a chip format, as ``neuroinit export`` does it: one call, one report.

:func:`export_run` loads the stored network (with the weight grids it was trained on, as :func:`load_cell`
restores them), writes it in the chosen format (:data:`FORMATS`) for a profile (default: the run's), measures the
float-vs-chip task accuracy of a LIF network in the profile's integer emulation, and with ``verify`` re-simulates
the written file (NIR: snntorch, norse, rockpool and the emulation; netx: Lava; Xylo: xylosim). The
:class:`ExportReport` it returns is what the command prints (``to_dict`` is its ``--json``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from neuroinit.cells.base import RecurrentCell
from neuroinit.profiles import HardwareProfile

__all__ = ["FORMATS", "ExportReport", "export_run", "task_batch"]

FORMATS = ("nir", "netx", "h5", "xylo")
VERIFIABLE = ("nir", "netx", "xylo")


@dataclass
class ExportReport:
    """What :func:`export_run` wrote and measured. ``details``: the format's own facts (NIR: conformance
    vectors, warnings; netx: input scale, notes; Xylo: input bits, notes); ``accuracy``: float-vs-chip task
    accuracy (LIF networks whose task could be rebuilt); ``verify``: the re-simulation's result, ``ok`` False
    when it found a mismatch."""

    run: str
    which: str
    format: str
    out: str
    profile: str
    model: str
    details: dict = field(default_factory=dict)
    accuracy: dict | None = None
    verify: dict | None = None
    ok: bool = True

    def to_dict(self) -> dict:
        out = {"run": self.run, "which": self.which, "format": self.format, "out": self.out,
               "profile": self.profile, "model": self.model, **self.details}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        if self.verify is not None:
            out["verify"] = self.verify
        return out


def task_batch(run, seed: int, trials: int):
    """The run's task (Romo: its deterministic test variant) and one float64 batch of ``trials`` trials scaled
    as in training, or ``(None, None)`` when the run file holds no time step to rebuild the task at."""
    from neuroinit.tasks import task_from_settings

    name = str(run.config.get("task", "romo"))
    s = run.settings or {}
    if "dt_ms" not in s:
        return None, None
    task = task_from_settings(name, s, **({"variant": "test"} if name.lower() == "romo" else {}))
    batch = task.batch(trials, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scale = float(s.get("input_scale", 1.0))
    return task, batch._replace(inputs=batch.inputs * scale)


def export_run(run_file: str, fmt: str, out: str, *, profile: str | None = None, which: str = "final",
               verify: bool = False, nir_target: str = "generic", trials: int = 30, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> ExportReport:
    """Export network ``which`` of ``run_file`` as ``fmt`` to ``out`` (written atomically) for ``profile``
    (bundled name or .toml path; default the run's); module docstring. ``trials`` task trials drawn with
    ``seed`` make the conformance vectors and the accuracy batch. ``progress(stage)`` is called as each stage
    (load, write, accuracy, verify) starts."""
    from neuroinit.io.runfile import load_cell, read_run
    from neuroinit.profiles import load_profile

    if fmt not in FORMATS:
        raise ValueError(f"Invalid format {fmt!r}: allowed {', '.join(FORMATS)}")
    if verify and fmt not in VERIFIABLE:
        raise ValueError(f"--verify checks NIR, netx and Xylo exports; allowed with --format nir or netx, or xylo "
                         f"(got --format {fmt})")
    stage = progress or (lambda _s: None)
    stage("load")
    run, cell = read_run(run_file), load_cell(run_file, which)
    prof = load_profile(profile) if profile else cell.profile
    task, batch = task_batch(run, seed, trials)
    report = ExportReport(run=run_file, which=which, format=fmt, out=out, profile=prof.name, model=cell.model)
    stage("write")
    written = _write(report, cell, prof, batch, verify=verify, nir_target=nir_target, seed=seed)
    stage("accuracy")
    if cell.export_mapping == "lif" and task is not None:   # a chip LIF: its integer emulation runs the task
        from neuroinit.emulate.integer import compare_on_task

        report.accuracy = compare_on_task(cell, task, prof, batch=batch, generator=torch.Generator(),
                                          **written["deploy"])
    if verify:
        stage("verify")
        _verify(report, cell, prof, task, batch, written)
    return report


def _write(report: ExportReport, cell: RecurrentCell, prof: HardwareProfile, batch, *, verify: bool,
           nir_target: str, seed: int) -> dict:
    """Write ``report.out`` in ``report.format``; fill ``report.details``. Returns what the later stages need:
    ``deploy`` (the deployment the file describes, for the accuracy) and the writer's result."""
    out, inputs = report.out, (batch.inputs if batch is not None else None)
    if report.format == "nir":
        from neuroinit.io.nir import to_nir, write_nir

        if verify and cell.export_mapping == "lif":
            from neuroinit.io.verify import check_verifiable

            check_verifiable(to_nir(cell, prof, target=nir_target)[0])   # refuse before anything is written
        ex = write_nir(out, cell, prof, inputs=inputs, target=nir_target)
        report.details = {"nir_target": nir_target, "conformance": str(ex.conformance), "exact": ex.exact,
                          "warnings": list(ex.warnings), "conformance_steps": ex.steps,
                          "conformance_trials": ex.trials, "conformance_spikes": ex.spikes,
                          "conformance_dropped_trials": ex.dropped_trials,
                          "v_threshold": float(ex.graph.nodes["lif"].v_threshold[0])}
        return {"deploy": {}}
    if report.format == "netx":
        from neuroinit.io.netx import write_netx

        integer_inputs = batch is not None and bool(torch.equal(batch.inputs, batch.inputs.round()))
        nx = write_netx(out, cell, prof, integer_inputs=integer_inputs)
        report.details = {"input_scale": nx.input_scale, "a_in_unit": nx.a_in_unit, "notes": list(nx.notes)}
        # the deployment the file describes: graded input at input_scale, bias in a_in units
        return {"deploy": {"input_frac_bits": nx.input_frac_bits, "bias_exp": 6}, "integer_inputs": integer_inputs}
    if report.format == "xylo":
        from neuroinit.io.xylo import export_xylo

        xy = export_xylo(out, cell, prof, inputs, verify=verify, seed=seed)
        report.details = {"input_frac_bits": xy["input_frac_bits"], "notes": xy["notes"]}
        return {"deploy": {"input_frac_bits": xy["input_frac_bits"]}, "xylo": xy}   # the input counts it describes
    from neuroinit.io.nir import write_weights_h5

    write_weights_h5(out, cell, prof)
    return {"deploy": {}}


def _verify(report: ExportReport, cell: RecurrentCell, prof: HardwareProfile, task, batch, written: dict) -> None:
    """Re-simulate the written file (module docstring); fill ``report.verify`` and ``report.ok``."""
    if report.format == "xylo":   # export_xylo ran xylosim while writing
        report.verify, report.ok = written["xylo"]["verify"], written["xylo"]["ok"]
    elif report.format == "netx":
        from neuroinit.io.netx import find_lava_python, verify_netx

        lava_python, why = find_lava_python()
        if lava_python is None or batch is None or cell.export_mapping != "lif":
            report.verify = {"skipped": why if lava_python is None else "no task batch to run"}
        else:
            report.verify = verify_netx(report.out, cell, batch.inputs, task=task, batch=batch, profile=prof,
                                        integer_inputs=written["integer_inputs"], python=lava_python)
            report.ok = report.verify["ok"]
    else:
        from neuroinit.io.verify import verify_nir

        rep = verify_nir(report.out)
        report.verify, report.ok = rep.to_dict(), rep.ok
