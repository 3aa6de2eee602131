"""Run files: one HDF5 file per training run, versioned, self-describing and written atomically.

The schema is documented in ``docs/runfile.md``; in short (``format_version`` 1)::

    /                       attrs: format_version, kind = "neuroinit-run", status, message, seed, model,
                                   created, updated, selected_run
    /config                 str: the TrainConfig as JSON (verbatim, sorted keys)
    /settings               str: JSON of the values behind the config's defaults (alpha, dt, lr, ...)
    /profile                str: the hardware profile's TOML text, verbatim
    /cell_config            str: JSON keyword arguments of make_cell (profile by name)
    /init_report            str: JSON of neuroinit.init.InitReport
    /versions               attrs: python, neuroinit, torch, numpy, h5py, neurogym
    /weights/<which>/       which = initial | floss | final; datasets w_in, w_rec, bias, w_out, b_out (float)
    /weights/<which>/codes/ int32 codes of the chip matrices (quantised profiles only); each dataset has
                            attrs scale, exponent (-2**31 when none), code_min, code_max
    /runs/<k>/              one per learning rate (k = 0, 1, ...); attrs lr, status, message, iterations_done,
                            initial_loss, final_loss, learning_time (-1 = never), wall_time
    /runs/<k>/curve/        iteration (int64), loss, accuracy, lr (float64), one row per logged iteration
    /runs/<k>/loss_per_iteration   float64, the training loss of every iteration done
    /runs/<k>/alignment/    (config align_every > 0) iteration (int64), cosine_<param>, rel_error_<param> (float64)
                            for param in w_in, w_rec, bias, w_out, b_out: local rule vs BPTT gradient
    /runs/<k>/weights/final/       as /weights/final (present when the run completed)
    /runs/<k>/checkpoint/   attrs iteration, wall_time; weights/, optimizer/ (param_groups JSON + state/<i>/<key>),
                            generators/<name> (uint8 torch generator states)
    /lyapunov/<which>/      which = initial | floss | final; attrs max, k, mean_per_step..., dataset spectrum
    /floss/                 losses, exponents (when pre-flossing ran)
    /summary                attrs: final_loss, eval_loss, eval_accuracy, learning_time, wall_time, selected_lr

Readers: :func:`read_run` (everything, as plain numpy / Python values) and :func:`load_cell` (a
:class:`~neuroinit.cells.base.RecurrentCell` rebuilt from the stored weights and profile text). A file that is
not a run file, is truncated or corrupt, or lacks a required part raises ``ValueError`` naming the file and
what is wrong, on one line.
"""

from __future__ import annotations

import json
import os

import numpy as np

from neuroinit._util import utc_now
from neuroinit.io.runfile_lock import (  # noqa: F401  (every old name stays importable from here)
    RunFileLocked,
    _holder_text,
    lock_holder,
    lock_path,
    remove_stale_temps,
    run_file_lock,
)
from neuroinit.io.runfile_read import (  # noqa: F401
    _read_checkpoint,
    _read_run_record,
    _read_weights,
    _Reader,
    _summary_value,
    load_cell,
    profile_from_text,
    read_run,
)
from neuroinit.io.runfile_records import (  # noqa: F401
    _CURVE_KEYS,
    _H5_ERRORS,
    _NO_EXPONENT,
    FORMAT_VERSION,
    RUN_KIND,
    STATUSES,
    WEIGHT_NAMES,
    Checkpoint,
    RunFile,
    RunRecord,
    WeightSet,
)

__all__ = [
    "FORMAT_VERSION",
    "RUN_KIND",
    "WEIGHT_NAMES",
    "Checkpoint",
    "RunFile",
    "RunFileLocked",
    "RunRecord",
    "WeightSet",
    "load_cell",
    "lock_holder",
    "lock_path",
    "package_versions",
    "read_run",
    "remove_stale_temps",
    "run_file_lock",
    "weights_from_cell",
    "write_run",
]

# ------------------------------------------------------------------------------------------ helpers

def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a run depends on ("" when one is not installed)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("neuroinit", "torch", "numpy", "h5py", "neurogym"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = ""
    return out


def weights_from_cell(cell) -> WeightSet:
    """Float parameters of ``cell`` plus, on a quantised profile, the integer codes on ``cell.grids``.

    The codes are ``round(value / scale)`` of the float weights (which training keeps on the learning grid);
    a chip with finer learning weights than inference weights (Loihi) stores the inference codes of the
    top bits, as the forward pass sees them.
    """
    import torch

    from neuroinit.quantize import round_to_codes

    params = {n: getattr(cell, n).detach().cpu().to(torch.float64).numpy().astype(
        _np_dtype(getattr(cell, n).dtype)) for n in WEIGHT_NAMES}
    codes: dict[str, np.ndarray] = {}
    grids: dict[str, dict] = {}
    for name, grid in cell.grids.items():
        if grid is None:
            continue
        w = getattr(cell, name).detach().cpu().to(torch.float64)
        codes[name] = round_to_codes(w, grid, rounding="nearest").numpy().astype(np.int32)
        grids[name] = {"scale": float(grid.scale), "exponent": grid.exponent,
                       "code_min": int(grid.code_min), "code_max": int(grid.code_max)}
    return WeightSet(params, codes, grids)


def _np_dtype(torch_dtype) -> np.dtype:
    import torch

    return {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
            torch.bfloat16: np.float32}.get(torch_dtype, np.float32)



def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default, allow_nan=True)


# ------------------------------------------------------------------------------------------ writing

def _write_str(parent, name: str, text: str) -> None:
    import h5py

    parent.create_dataset(name, data=text, dtype=h5py.string_dtype("utf-8"))


def _write_weights(group, ws: WeightSet) -> None:
    for name in WEIGHT_NAMES:
        group.create_dataset(name, data=np.asarray(ws.params[name]))
    if ws.codes:
        cg = group.create_group("codes")
        for name, codes in ws.codes.items():
            d = cg.create_dataset(name, data=np.asarray(codes, dtype=np.int32))
            g = ws.grids[name]
            d.attrs["scale"] = float(g["scale"])
            d.attrs["exponent"] = _NO_EXPONENT if g.get("exponent") is None else int(g["exponent"])
            d.attrs["code_min"] = int(g["code_min"])
            d.attrs["code_max"] = int(g["code_max"])


def _write_checkpoint(group, ck: Checkpoint) -> None:
    group.attrs["iteration"] = int(ck.iteration)
    group.attrs["wall_time"] = float(ck.wall_time)
    wg = group.create_group("weights")
    for name, arr in ck.weights.items():
        wg.create_dataset(name, data=np.asarray(arr))
    og = group.create_group("optimizer")
    _write_str(og, "param_groups", _dumps(ck.optimizer["param_groups"]))
    sg = og.create_group("state")
    for idx, entry in ck.optimizer["state"].items():
        eg = sg.create_group(str(idx))
        for key, val in entry.items():
            if val is None:
                continue
            is_array = isinstance(val, np.ndarray)
            d = eg.create_dataset(key, data=np.asarray(val))
            d.attrs["python"] = not is_array  # a plain number in the state_dict, not a tensor
    gg = group.create_group("generators")
    for name, state in ck.generators.items():
        gg.create_dataset(name, data=np.asarray(state, dtype=np.uint8))


def _write_run_record(group, r: RunRecord) -> None:
    group.attrs["lr"] = float(r.lr)
    group.attrs["status"] = r.status
    group.attrs["message"] = r.message
    group.attrs["iterations_done"] = r.iterations_done
    group.attrs["initial_loss"] = float(r.initial_loss)
    group.attrs["final_loss"] = float(r.final_loss)
    group.attrs["learning_time"] = -1 if r.learning_time is None else int(r.learning_time)
    group.attrs["wall_time"] = float(r.wall_time)
    cg = group.create_group("curve")
    for key, arr in r.curve.items():
        cg.create_dataset(key, data=arr)
    group.create_dataset("loss_per_iteration", data=np.asarray(r.loss_per_iteration, dtype=np.float64))
    if r.alignment:
        ag = group.create_group("alignment")
        for key, vals in r.alignment.items():
            ag.create_dataset(key, data=np.asarray(vals, dtype=np.int64 if key == "iteration" else np.float64))
    if r.final is not None:
        _write_weights(group.create_group("weights/final"), r.final)
    if r.checkpoint is not None:
        _write_checkpoint(group.create_group("checkpoint"), r.checkpoint)


def write_run(path: str | os.PathLike, run: RunFile) -> None:
    """Write ``run`` to ``path`` atomically (temp file beside it, fsync, rename): a reader, or a run killed
    mid-write, sees either the previous complete file or the new one."""
    import h5py

    from neuroinit.io.atomic import atomic_write_path

    if run.status not in STATUSES:
        raise ValueError(f"Invalid run status {run.status!r}: allowed {', '.join(STATUSES)}")
    run.updated = utc_now()
    if not run.created:
        run.created = run.updated
    with atomic_write_path(path) as tmp, h5py.File(tmp, "w") as f:
        a = f.attrs
        a["format_version"] = FORMAT_VERSION
        a["kind"] = RUN_KIND
        a["status"] = run.status
        a["message"] = run.message
        a["seed"] = int(run.seed)
        a["model"] = run.model
        a["created"] = run.created
        a["updated"] = run.updated
        a["selected_run"] = -1 if run.selected_run is None else int(run.selected_run)
        _write_str(f, "config", _dumps(run.config))
        _write_str(f, "settings", _dumps(run.settings))
        _write_str(f, "profile", run.profile_text)
        _write_str(f, "cell_config", _dumps(run.cell_config))
        _write_str(f, "init_report", _dumps(run.init_report))
        vg = f.create_group("versions")
        for k, v in run.versions.items():
            vg.attrs[k] = str(v)
        wg = f.create_group("weights")
        for which, ws in run.weights.items():
            _write_weights(wg.create_group(which), ws)
        rg = f.create_group("runs")
        for k, r in enumerate(run.runs):
            _write_run_record(rg.create_group(str(k)), r)
        lg = f.create_group("lyapunov")
        for which, res in run.lyapunov.items():
            g = lg.create_group(which)
            for key, val in res.items():
                if isinstance(val, (np.ndarray, list, tuple)):
                    g.create_dataset(key, data=np.asarray(val, dtype=np.float64))
                else:
                    g.attrs[key] = val
        if run.floss:
            fg = f.create_group("floss")
            for key, val in run.floss.items():
                fg.create_dataset(key, data=np.asarray(val, dtype=np.float64))
        sg = f.create_group("summary")
        for key, val in run.summary.items():
            sg.attrs[key] = _attr_value(val)


def _attr_value(val):
    if val is None:
        return "null"
    if isinstance(val, (bool, np.bool_)):
        return bool(val)
    if isinstance(val, (int, float, str, np.integer, np.floating)):
        return val
    return _dumps(val)
