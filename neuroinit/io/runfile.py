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

import contextlib
import errno
import glob
import json
import math
import os
import re
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

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

FORMAT_VERSION = 1
RUN_KIND = "neuroinit-run"
WEIGHT_NAMES = ("w_in", "w_rec", "bias", "w_out", "b_out")
_NO_EXPONENT = -(2**31)
_CURVE_KEYS = ("iteration", "loss", "accuracy", "lr")
# what h5py raises on damaged files and objects (it maps HDF5 errors onto these)
_H5_ERRORS = (OSError, RuntimeError, ValueError, TypeError, KeyError)
STATUSES = ("running", "complete", "diverged", "interrupted")


# ------------------------------------------------------------------------------------------ data classes

@dataclass
class WeightSet:
    """One network's parameters: float arrays, and for quantised profiles integer codes plus their grids
    (``grids[name] = {"scale", "exponent", "code_min", "code_max"}``, exponent None for free scaling)."""

    params: dict[str, np.ndarray]
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    grids: dict[str, dict] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """Everything needed to continue a run bit for bit: ``iteration`` is the next iteration to run."""

    iteration: int
    wall_time: float
    weights: dict[str, np.ndarray]
    optimizer: dict            # {"param_groups": [...], "state": {int: {key: np.ndarray | number}}}
    generators: dict[str, np.ndarray]


@dataclass
class RunRecord:
    """One training run at one learning rate."""

    lr: float
    status: str = "running"
    message: str = ""
    iteration: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    lr_curve: list[float] = field(default_factory=list)
    loss_per_iteration: list[float] = field(default_factory=list)
    final_loss: float = math.nan
    learning_time: int | None = None
    wall_time: float = 0.0
    final: WeightSet | None = None
    checkpoint: Checkpoint | None = None
    alignment: dict[str, list] = field(default_factory=dict)   # "iteration", "cosine_<p>", "rel_error_<p>"

    @property
    def iterations_done(self) -> int:
        return len(self.loss_per_iteration)

    @property
    def initial_loss(self) -> float:
        return self.loss_per_iteration[0] if self.loss_per_iteration else math.nan

    @property
    def curve(self) -> dict[str, np.ndarray]:
        return {"iteration": np.asarray(self.iteration, dtype=np.int64),
                "loss": np.asarray(self.loss, dtype=np.float64),
                "accuracy": np.asarray(self.accuracy, dtype=np.float64),
                "lr": np.asarray(self.lr_curve, dtype=np.float64)}


@dataclass
class RunFile:
    """A run file's content as plain Python / numpy values (see the module docstring for the layout)."""

    path: str
    format_version: int
    status: str
    message: str
    seed: int
    model: str
    config: dict
    profile_text: str
    cell_config: dict
    init_report: dict
    versions: dict[str, str]
    weights: dict[str, WeightSet]
    runs: list[RunRecord]
    selected_run: int | None = None
    settings: dict = field(default_factory=dict)
    lyapunov: dict[str, dict] = field(default_factory=dict)
    floss: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    updated: str = ""

    @property
    def curves(self) -> list[dict[str, np.ndarray]]:
        """The learning curve of every run (one per learning rate)."""
        return [r.curve for r in self.runs]

    @property
    def selected(self) -> RunRecord | None:
        return None if self.selected_run is None else self.runs[self.selected_run]

    @property
    def input_scale(self) -> float:
        """The factor training applied to the task's inputs (``/settings``; 1 for rate networks by default)."""
        return float(self.settings.get("input_scale", 1.0))

    def make_task(self):
        """The task as this run trained on it (same time step); multiply its inputs by :attr:`input_scale`
        to drive the network as training did."""
        from neuroinit.tasks import make_task

        name, s = str(self.config.get("task", "romo")), self.settings
        if name.lower() == "romo":
            return make_task("romo", dt_ms=s["dt_ms"], tau_ms=s["tau_ms"])
        return make_task(name, dt_ms=s["dt_ms"])


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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
    run.updated = _now()
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


# ------------------------------------------------------------------------------------------ reading

class _Reader:
    """Wraps h5py access so that every failure names the file and the missing / broken part."""

    def __init__(self, path: Path, f) -> None:
        self.path = path
        self.f = f

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: not a readable neuroinit run file: {what}")

    def node(self, name: str, parent=None):
        parent = self.f if parent is None else parent
        try:
            return parent[name]
        except KeyError:
            where = parent.name.rstrip("/") + "/" + name
            raise self.fail(f"missing {where}") from None
        except _H5_ERRORS as e:  # h5py raises OSError / RuntimeError on damaged objects
            raise self.fail(f"cannot read {name}: {_one_line(e)}") from None

    def array(self, name: str, parent=None) -> np.ndarray:
        d = self.node(name, parent)
        try:
            return d[()]
        except _H5_ERRORS as e:
            raise self.fail(f"cannot read {d.name}: {_one_line(e)}") from None

    def text(self, name: str, parent=None) -> str:
        d = self.node(name, parent)
        try:
            raw = d[()]
        except _H5_ERRORS as e:
            raise self.fail(f"cannot read {d.name}: {_one_line(e)}") from None
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)

    def json(self, name: str, parent=None):
        text = self.text(name, parent)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise self.fail(f"/{name} is not valid JSON ({e.msg})") from None

    def attr(self, obj, key: str, default=...):
        try:
            val = obj.attrs[key]
        except KeyError:
            if default is not ...:
                return default
            raise self.fail(f"missing attribute {key!r} on {obj.name}") from None
        except _H5_ERRORS as e:
            raise self.fail(f"cannot read attribute {key!r} on {obj.name}: {_one_line(e)}") from None
        if isinstance(val, bytes):
            return val.decode("utf-8")
        if isinstance(val, np.generic):
            return val.item()
        return val


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_weights(rd: _Reader, group) -> WeightSet:
    params = {n: rd.array(n, group) for n in WEIGHT_NAMES}
    codes: dict[str, np.ndarray] = {}
    grids: dict[str, dict] = {}
    if "codes" in group:
        cg = rd.node("codes", group)
        for name in cg:
            d = rd.node(name, cg)
            codes[name] = rd.array(name, cg)
            e = int(rd.attr(d, "exponent"))
            grids[name] = {"scale": float(rd.attr(d, "scale")), "exponent": None if e == _NO_EXPONENT else e,
                           "code_min": int(rd.attr(d, "code_min")), "code_max": int(rd.attr(d, "code_max"))}
    return WeightSet(params, codes, grids)


def _read_checkpoint(rd: _Reader, group) -> Checkpoint:
    weights = {n: rd.array(n, rd.node("weights", group)) for n in WEIGHT_NAMES}
    og = rd.node("optimizer", group)
    param_groups = rd.json("param_groups", og)
    state: dict[int, dict] = {}
    sg = rd.node("state", og)
    for idx in sg:
        eg = rd.node(idx, sg)
        entry = {}
        for key in eg:
            val = rd.array(key, eg)
            if bool(rd.attr(rd.node(key, eg), "python", False)):
                val = val.item()
            entry[key] = val
        state[int(idx)] = entry
    gg = rd.node("generators", group)
    generators = {name: rd.array(name, gg) for name in gg}
    return Checkpoint(iteration=int(rd.attr(group, "iteration")), wall_time=float(rd.attr(group, "wall_time")),
                      weights=weights, optimizer={"param_groups": param_groups, "state": state},
                      generators=generators)


def _read_run_record(rd: _Reader, group) -> RunRecord:
    cg = rd.node("curve", group)
    curve = {k: rd.array(k, cg) for k in _CURVE_KEYS}
    lt = int(rd.attr(group, "learning_time"))
    r = RunRecord(
        lr=float(rd.attr(group, "lr")), status=str(rd.attr(group, "status")),
        message=str(rd.attr(group, "message", "")),
        iteration=[int(x) for x in curve["iteration"]], loss=[float(x) for x in curve["loss"]],
        accuracy=[float(x) for x in curve["accuracy"]], lr_curve=[float(x) for x in curve["lr"]],
        loss_per_iteration=[float(x) for x in rd.array("loss_per_iteration", group)],
        final_loss=float(rd.attr(group, "final_loss")), learning_time=None if lt < 0 else lt,
        wall_time=float(rd.attr(group, "wall_time", 0.0)),
    )
    if "alignment" in group:
        ag = rd.node("alignment", group)
        r.alignment = {k: [int(x) if k == "iteration" else float(x) for x in rd.array(k, ag)] for k in ag}
    if "weights" in group and "final" in rd.node("weights", group):
        r.final = _read_weights(rd, rd.node("weights/final", group))
    if "checkpoint" in group:
        r.checkpoint = _read_checkpoint(rd, rd.node("checkpoint", group))
    return r


def _summary_value(val):
    if isinstance(val, bytes):
        val = val.decode("utf-8")
    if isinstance(val, np.generic):
        val = val.item()
    if val == "null":
        return None
    return val


def read_run(path: str | os.PathLike) -> RunFile:
    """Read a run file completely (checkpoints included) into a :class:`RunFile`.

    Raises ``ValueError`` naming the file and the problem when it is missing, not HDF5, truncated, of an
    unknown format version or lacks a required part.
    """
    import h5py

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such run file")
    try:
        f = h5py.File(p, "r")
    except _H5_ERRORS as e:
        size = p.stat().st_size
        why = "empty file" if size == 0 else f"not an HDF5 file or truncated/corrupt ({size} bytes; {_one_line(e)})"
        raise ValueError(f"{p}: not a readable neuroinit run file: {why}") from None
    with f:
        rd = _Reader(p, f)
        kind = rd.attr(f, "kind", None)
        if kind != RUN_KIND:
            raise rd.fail(f"attribute kind = {kind!r}, expected {RUN_KIND!r} (is this a neuroinit run file?)")
        version = rd.attr(f, "format_version", None)
        if version != FORMAT_VERSION:
            raise rd.fail(f"format_version = {version!r}; this neuroinit reads format_version {FORMAT_VERSION}")
        runs = []
        rg = rd.node("runs")
        try:
            keys = sorted(rg, key=int)
        except ValueError:
            raise rd.fail(f"/runs holds non-numeric groups {sorted(rg)}") from None
        if keys != [str(k) for k in range(len(keys))]:
            raise rd.fail(f"/runs groups {keys} are not numbered 0..{len(keys) - 1}")
        for k in keys:
            runs.append(_read_run_record(rd, rd.node(k, rg)))
        wg = rd.node("weights")
        if "initial" not in wg:
            raise rd.fail("missing /weights/initial")
        weights = {which: _read_weights(rd, rd.node(which, wg)) for which in wg}
        lyapunov: dict[str, dict] = {}
        if "lyapunov" in f:
            lg = rd.node("lyapunov")
            for which in lg:
                g = rd.node(which, lg)
                res: dict[str, Any] = {k: rd.attr(g, k) for k in g.attrs}
                for key in g:
                    res[key] = rd.array(key, g)
                lyapunov[which] = res
        floss = {}
        if "floss" in f:
            fg = rd.node("floss")
            floss = {k: rd.array(k, fg) for k in fg}
        summary = {}
        if "summary" in f:
            sg = rd.node("summary")
            summary = {k: _summary_value(rd.attr(sg, k)) for k in sg.attrs}
        sel = int(rd.attr(f, "selected_run", -1))
        if sel >= len(runs):
            raise rd.fail(f"selected_run = {sel} but the file holds {len(runs)} runs")
        return RunFile(
            path=str(p), format_version=int(version), status=str(rd.attr(f, "status")),
            message=str(rd.attr(f, "message", "")), seed=int(rd.attr(f, "seed")), model=str(rd.attr(f, "model")),
            config=rd.json("config"), settings=rd.json("settings"), profile_text=rd.text("profile"), cell_config=rd.json("cell_config"),
            init_report=rd.json("init_report"),
            versions={k: str(rd.attr(rd.node("versions"), k)) for k in rd.node("versions").attrs},
            weights=weights, runs=runs, selected_run=None if sel < 0 else sel, lyapunov=lyapunov, floss=floss,
            summary=summary, created=str(rd.attr(f, "created", "")), updated=str(rd.attr(f, "updated", "")),
        )


def profile_from_text(text: str, *, where: str):
    """The :class:`~neuroinit.profiles.HardwareProfile` stored verbatim in a run file."""
    from neuroinit.profiles import profile_from_dict

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not a readable neuroinit run file: /profile is not valid TOML ({e})") from None
    return profile_from_dict(data, where=f"{where}:/profile", text=text)


def load_cell(path: str | os.PathLike, which: str = "final", *, dtype=None, device="cpu"):
    """Rebuild the stored network as a cell: ``make_cell(model, params, **cell_config)`` with the profile
    parsed from the stored TOML text. ``which``: ``"final"`` (trained; the selected learning rate),
    ``"initial"`` (from the hardware-aware init) or ``"floss"`` (after pre-flossing, when it ran).

    The cell's chip grids are the stored ones (not re-chosen from the loaded weights: a weight trained onto
    ``code_min`` would make a fresh choice one exponent coarser); the integer codes are in :func:`read_run`'s
    ``weights[which]``.
    """
    import torch

    from neuroinit.cells import make_cell
    from neuroinit.cells.base import CellParams

    run = read_run(path)
    if which not in run.weights:
        have = ", ".join(sorted(run.weights))
        extra = " (the run has not finished: resume it, or load 'initial')" if which == "final" else ""
        raise ValueError(f"{path}: no weights {which!r} in this run file{extra}; available: {have}")
    ws = run.weights[which]
    profile = profile_from_text(run.profile_text, where=str(path))
    kwargs = dict(run.cell_config)
    kwargs["profile"] = profile
    params = CellParams(*(torch.as_tensor(np.asarray(ws.params[n])) for n in WEIGHT_NAMES))
    if dtype is not None or device != "cpu":
        params = CellParams(*(t.to(dtype=dtype or t.dtype, device=device) for t in params))
    try:
        cell = make_cell(run.model, params, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot rebuild the {run.model!r} cell from /cell_config: {_one_line(e)}") from None
    from neuroinit.quantize import Grid

    for name, g in ws.grids.items():
        cell.grids[name] = Grid(float(g["scale"]), int(g["code_min"]), int(g["code_max"]), g["exponent"])
    return cell


# ------------------------------------------------------------------------------------------ one writer at a time
class RunFileLocked(ValueError):
    """Another process is writing this run file (one line: the file, the holder's pid and host)."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a run file: ``.NAME.lock`` beside it."""
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


def _holder_text(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        return ""


@contextlib.contextmanager
def run_file_lock(path: str | os.PathLike, *, wait: float = 1.0) -> Iterator[None]:
    """Hold the exclusive writer lock of run file ``path`` for the ``with`` block, or raise
    :class:`RunFileLocked` naming the process that holds it.

    The lock is ``flock`` on ``.NAME.lock`` (the file records ``pid host time`` for the message): the kernel
    releases it when the holder exits or is killed, so a lock left by a dead process is never stale. The file is
    removed on release; a process that locked a file already removed tries again on the new one. A holder that
    has not yet written its pid (it is just starting) is waited for up to ``wait`` seconds."""
    import fcntl
    import socket

    target = lock_path(path)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            if not holder and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise RunFileLocked(f"Run file {str(path)!r} is being written by another process "
                                f"({holder or 'unknown'}); wait for it to finish or choose another --out") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            fd = -1  # a file system without locks (NFS mounted nolock): the file is written unguarded
            with contextlib.suppress(OSError):
                os.unlink(target)
            break
        try:
            same = os.fstat(fd).st_ino == os.stat(target).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a lock file its holder had just removed: lock the current one
    if fd < 0:
        yield
        return
    try:
        info = f"pid {os.getpid()} on {socket.gethostname()} since {_now()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(target)
        os.close(fd)


def lock_holder(path: str | os.PathLike) -> str | None:
    """Who holds the writer lock of run file ``path`` ("pid P on HOST since T"), or None when nobody does
    (a probe with a shared lock: it never creates the lock file)."""
    import fcntl

    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(fd) or "a process that is starting"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove the temporary files of atomic writes of run file ``path`` (``.NAME.XXXXXXXX.tmp``) that a killed
    writer left behind; call it while holding :func:`run_file_lock`. Returns how many were removed."""
    p = Path(path)
    pattern = re.compile(re.escape(f".{p.name}.") + r"[A-Za-z0-9_]{8}\.tmp")
    n = 0
    for q in p.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
        if pattern.fullmatch(q.name):
            with contextlib.suppress(FileNotFoundError):
                q.unlink()
                n += 1
    return n
