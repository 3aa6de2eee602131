"""Run-file reading: read_run (a whole file as a RunFile) and load_cell (the stored network as a cell)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from neuroinit._util import one_line
from neuroinit.io.runfile_records import (
    _CURVE_KEYS,
    _H5_ERRORS,
    _NO_EXPONENT,
    FORMAT_VERSION,
    RUN_KIND,
    WEIGHT_NAMES,
    Checkpoint,
    RunFile,
    RunRecord,
    WeightSet,
)

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
            raise self.fail(f"cannot read {name}: {one_line(e)}") from None

    def array(self, name: str, parent=None) -> np.ndarray:
        d = self.node(name, parent)
        try:
            return d[()]
        except _H5_ERRORS as e:
            raise self.fail(f"cannot read {d.name}: {one_line(e)}") from None

    def text(self, name: str, parent=None) -> str:
        d = self.node(name, parent)
        try:
            raw = d[()]
        except _H5_ERRORS as e:
            raise self.fail(f"cannot read {d.name}: {one_line(e)}") from None
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
            raise self.fail(f"cannot read attribute {key!r} on {obj.name}: {one_line(e)}") from None
        if isinstance(val, bytes):
            return val.decode("utf-8")
        if isinstance(val, np.generic):
            return val.item()
        return val


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
        why = "empty file" if size == 0 else f"not an HDF5 file or truncated/corrupt ({size} bytes; {one_line(e)})"
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
        raise ValueError(f"{path}: cannot rebuild the {run.model!r} cell from /cell_config: {one_line(e)}") from None
    from neuroinit.quantize import Grid

    for name, g in ws.grids.items():
        cell.grids[name] = Grid(float(g["scale"]), int(g["code_min"]), int(g["code_max"]), g["exponent"])
    return cell
