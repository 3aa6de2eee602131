"""Sweep specs: parsing and validating a TOML spec into planned runs (SweepSpec, load_spec, parse_spec)."""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np

from neuroinit._util import one_line
from neuroinit.experiments.sweep_ids import (
    _NOT_IN_BASE,
    AXES,
    BLOCK_KEYS,
    DEFAULT_FLOSSING,
    FLOSS_SUFFIX,
    FLOSSING_KEYS,
    RUNS_DIR,
    SPEC_KEYS,
    PlannedRun,
    SpecError,
    _effective_lr,
    _matched_tau_m,
    _safe,
    run_id,
)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    description: str
    path: str
    text: str
    runs: tuple[PlannedRun, ...]


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a spec file; every run's TrainConfig is built (and validated) here, so a bad spec
    fails before any run starts."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such spec file")
    try:
        text = p.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise SpecError(f"{p}: not a text file") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{p}: not valid TOML ({e})") from None
    return parse_spec(data, where=str(p), text=text, base_dir=p.parent)


def _fail(where: str, msg: str) -> SpecError:
    return SpecError(f"{where}: {msg}")


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _as_list(where: str, key: str, value, kind: str) -> list:
    vals = value if isinstance(value, list) else [value]
    if not vals:
        raise _fail(where, f"{key} is an empty list; give at least one value")
    for v in vals:
        ok = {"str": isinstance(v, str) and v != "", "num": _is_num(v),
              "int": isinstance(v, int) and not isinstance(v, bool)}[kind]
        if not ok:
            what = {"str": "non-empty strings", "num": "finite numbers", "int": "integers"}[kind]
            raise _fail(where, f"invalid {key} value {v!r}: allowed {what} (a value or a list)")
    if len(set(vals)) != len(vals):
        dup = sorted({v for v in vals if vals.count(v) > 1}, key=str)
        raise _fail(where, f"{key} repeats {dup}; give each value once")
    return vals


def _gains(where: str, value) -> list[float]:
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"start", "stop", "step"})
        missing = sorted({"start", "stop", "step"} - set(value))
        if unknown or missing:
            raise _fail(where, f"gain range {value!r}: needs exactly start, stop, step (stop included)")
        start, stop, step = value["start"], value["stop"], value["step"]
        if not all(_is_num(x) for x in (start, stop, step)) or step <= 0 or stop < start:
            raise _fail(where, f"gain range {value!r}: numbers with step > 0 and stop >= start")
        vals = [round(float(x), 10) for x in np.arange(start, stop + step / 2, step)]
        if len(vals) > 10000:
            raise _fail(where, f"gain range {value!r} has {len(vals)} values; at most 10000")
        return vals
    return [float(v) for v in _as_list(where, "gain", value, "num")]


def _seeds(where: str, value) -> list[int]:
    if isinstance(value, dict):
        if set(value) != {"start", "count"}:
            raise _fail(where, f"seed range {value!r}: needs exactly start and count")
        start, count = value["start"], value["count"]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, count)) or count < 1 or start < 0:
            raise _fail(where, f"seed range {value!r}: integers with start >= 0 and count >= 1")
        return list(range(start, start + count))
    return _as_list(where, "seed", value, "int")


def _resolve_profile(name: str, base_dir: Path | None) -> str:
    """A relative .toml profile path is taken relative to the spec file."""
    if base_dir is not None and name.endswith(".toml") and not os.path.isabs(name):
        cand = base_dir / name
        if cand.is_file():
            return str(cand.resolve())
    return name


def parse_spec(data: dict, *, where: str = "<spec>", text: str = "", base_dir: Path | None = None) -> SweepSpec:
    """Validate a parsed spec (see the module docstring) and expand it into planned runs."""
    if not isinstance(data, dict):
        raise _fail(where, "a spec is a TOML table")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed top-level keys: {', '.join(SPEC_KEYS)}")
    name = data.get("name", Path(where).stem if where != "<spec>" else "sweep")
    if not isinstance(name, str) or not name:
        raise _fail(where, f"invalid name {name!r}: a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail(where, "invalid description: a string")
    base = _check_base(data.get("base", {}), "[base]", where)
    flossing = _flossing(data.get("flossing", {}), where)
    grid = data.get("grid")
    if grid is None:
        raise _fail(where, "missing [grid]: at least one block of axes (" + ", ".join(AXES) + ")")
    blocks = grid if isinstance(grid, list) else [grid]
    if not blocks or not all(isinstance(b, dict) for b in blocks):
        raise _fail(where, "[grid] must be a table or an array of tables ([[grid]])")
    runs: dict[str, PlannedRun] = {}
    for bi, block in enumerate(blocks):
        at = "[grid]" if len(blocks) == 1 else f"[[grid]] #{bi + 1}"
        _plan_block(block, at, where, base, flossing, base_dir, runs)
    return SweepSpec(name=name, description=description, path=where, text=text, runs=tuple(runs.values()))


def _check_base(base, at: str, where: str) -> dict:
    """A ``[base]`` table: TrainConfig fields other than those the grid or [flossing] set."""
    from neuroinit.experiments.train import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    if not isinstance(base, dict):
        raise _fail(where, f"{at} must be a table of TrainConfig fields")
    for key in base:
        if key in _NOT_IN_BASE:
            target = "[grid] (a value or a list)" if _NOT_IN_BASE[key] == "grid" else \
                "[flossing] (rule 'X+flossing' turns it on)"
            raise _fail(where, f"{at}.{key}: {key!r} is set by {target}, not in {at}")
        if key not in fields:
            allowed = ", ".join(sorted(fields - set(_NOT_IN_BASE)))
            raise _fail(where, f"unknown key {at}.{key}; allowed TrainConfig fields: {allowed}")
    return dict(base)


def _flossing(floss_raw, where: str) -> dict:
    """The ``[flossing]`` table as TrainConfig fields (defaults filled in), which rule 'X+flossing' adds."""
    if not isinstance(floss_raw, dict):
        raise _fail(where, "[flossing] must be a table")
    unknown = sorted(set(floss_raw) - set(FLOSSING_KEYS))
    if unknown:
        raise _fail(where, f"unknown key(s) {['flossing.' + k for k in unknown]}; allowed: "
                           f"{', '.join('flossing.' + k for k in FLOSSING_KEYS)}")
    flossing = {FLOSSING_KEYS[k]: v for k, v in {**DEFAULT_FLOSSING, **floss_raw}.items()}
    if not isinstance(flossing["floss_iters"], int) or isinstance(flossing["floss_iters"], bool) \
            or flossing["floss_iters"] < 0:
        raise _fail(where, f"invalid flossing.iters {flossing['floss_iters']!r}: an integer >= 0")
    if flossing["floss_iters"] == 0 and not flossing.get("floss_inter_every"):
        raise _fail(where, "flossing.iters = 0 without inter-flossing (flossing.inter_every, inter_iters): "
                           "rule 'X+flossing' would not floss")
    return flossing


def _block_axes(block: dict, at: str, where: str, base_dir: Path | None) -> dict:
    """One grid block's axes in the order runs are planned, each a checked list of values (lr and lr_scale:
    ``[None]`` when not given)."""
    from neuroinit.learning import RULES

    bwhere = f"{where}: {at}"
    tasks = _as_list(bwhere, "task", block.get("task", "romo"), "str")
    models = _as_list(bwhere, "model", block.get("model", "rate"), "str")
    rules = _as_list(bwhere, "rule", block.get("rule", "eprop"), "str")
    for r in rules:
        if r.removesuffix(FLOSS_SUFFIX) not in RULES:
            allowed = ", ".join(list(RULES) + [x + FLOSS_SUFFIX for x in RULES])
            raise _fail(where, f"{at}: invalid rule {r!r}; allowed: {allowed}")
    profiles = [_resolve_profile(p, base_dir) for p in _as_list(bwhere, "profile", block.get("profile", "ideal"),
                                                                "str")]
    gains = _gains(bwhere, block.get("gain", 1.0))
    seeds = _seeds(bwhere, block.get("seed", 0))
    lrs: list[float | None] = [None]
    scales: list[float | None] = [None]
    if "lr" in block:
        lrs = [float(x) for x in _as_list(bwhere, "lr", block["lr"], "num")]
    elif "lr_scale" in block:
        scales = [float(x) for x in _as_list(bwhere, "lr_scale", block["lr_scale"], "num")]
    for x in [v for v in lrs + scales if v is not None]:
        if x <= 0:
            raise _fail(where, f"{at}: invalid learning rate {x!r}: must be > 0")
    return {"task": tasks, "model": models, "rule": rules, "profile": profiles, "gain": gains, "lr": lrs,
            "lr_scale": scales, "seed": seeds}


def _plan_block(block: dict, at: str, where: str, base: dict, flossing: dict, base_dir: Path | None,
                runs: dict[str, PlannedRun]) -> None:
    """Add one grid block's runs (every combination of its axes) to ``runs``, keyed by run id (a run planned
    twice is kept once)."""
    from neuroinit.experiments.train import TrainConfig, resolve_settings

    unknown = sorted(set(block) - set(BLOCK_KEYS))
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown} in {at}; allowed: {', '.join(BLOCK_KEYS)}")
    if "lr" in block and "lr_scale" in block:
        raise _fail(where, f"{at}: give lr or lr_scale, not both")
    bbase = {**base, **_check_base(block.get("base", {}), f"{at}.base", where)}
    match = block.get("match_eligibility", False)
    if not isinstance(match, bool):
        raise _fail(where, f"{at}: invalid match_eligibility {match!r}: true or false")
    if match and "tau_m_ms" in bbase:
        raise _fail(where, f"{at}: match_eligibility sets tau_m_ms; do not set it in base too")
    from neuroinit.cells import cell_class

    axes = _block_axes(block, at, where, base_dir)
    for task, model, rule, profile, gain, lr, scale, seed in product(*axes.values()):
        plain = rule.removesuffix(FLOSS_SUFFIX)
        d = {**bbase, "task": task, "model": model, "rule": plain, "profile": profile, "gain": gain,
             "seed": seed}
        if rule.endswith(FLOSS_SUFFIX):
            d.update(flossing)
        label = f"{task} {model} {rule} gain {gain:g} seed {seed}"
        try:
            if match and "tau_m" in cell_class(model).config_section():   # a membrane to match
                d["tau_m_ms"] = _matched_tau_m(d)
            if scale is not None:
                default = resolve_settings(TrainConfig.from_dict(d))["lr"]
                d["lr"] = float(f"{scale * default:.12g}")
            elif lr is not None:
                d["lr"] = lr
            config = TrainConfig.from_dict(d)
        except (ValueError, TypeError) as e:
            raise _fail(where, f"{at}: run ({label}): {one_line(e)}") from None
        rid = run_id(config)
        if rid in runs:
            continue
        fname = _safe(f"{config.task}_{model}_{rule}_g{gain:g}_lr{_effective_lr(config):.3g}_s{seed}")
        runs[rid] = PlannedRun(rid, config, f"{RUNS_DIR}/{fname}_{rid}.h5", scale)
