"""Run files: round trip through HDF5, plain-h5py readability, rebuilding cells, and clear errors for corrupt,
truncated, foreign or incomplete files."""

from __future__ import annotations

import json
import math
import os

import h5py
import numpy as np
import pytest
import torch

from neuroinit.cells import make_cell
from neuroinit.init import hardware_init
from neuroinit.io.runfile import (
    FORMAT_VERSION,
    Checkpoint,
    RunFile,
    RunRecord,
    load_cell,
    package_versions,
    read_run,
    weights_from_cell,
    write_run,
)
from neuroinit.profiles import load_profile


def _cell(model="rate", profile="ideal", n=12, seed=0):
    kw = {"alpha": 0.5} if model == "rate" else {"dt": 1.0, "tau_m": 20.0, "tau_out": 20.0}
    params, report = hardware_init(model, 1, n, 2, 1.2, profile, generator=torch.Generator().manual_seed(seed),
                                   out_of_range="clamp")
    return make_cell(model, params, profile=load_profile(profile), **kw), report


def _run_file(model="rate", profile="ideal", with_checkpoint=True) -> tuple[RunFile, object]:
    cell, report = _cell(model, profile)
    prof = load_profile(profile)
    rec0 = RunRecord(lr=1e-3, status="complete", iteration=[0, 10, 19], loss=[0.08, 0.05, 0.03],
                     accuracy=[0.5, 0.6, math.nan], lr_curve=[1e-3] * 3,
                     loss_per_iteration=list(np.linspace(0.08, 0.03, 20)), final_loss=0.03, learning_time=None,
                     wall_time=1.5, final=weights_from_cell(cell))
    rec1 = RunRecord(lr=3e-3, status="running", iteration=[0], loss=[0.08], accuracy=[0.5], lr_curve=[3e-3],
                     loss_per_iteration=[0.08, 0.07, 0.06])
    if with_checkpoint:
        w = {n: getattr(cell, n).detach().numpy().copy() for n in ("w_in", "w_rec", "bias", "w_out", "b_out")}
        rec1.checkpoint = Checkpoint(
            iteration=3, wall_time=0.25, weights=w,
            optimizer={"param_groups": [{"lr": 3e-3, "betas": [0.9, 0.999], "params": [0, 1, 2, 3, 4]}],
                       "state": {0: {"step": np.array(3.0, dtype=np.float32), "exp_avg": np.ones((12, 1), np.float32)},
                                 1: {"step": 7}}},
            generators={"batch": torch.Generator().manual_seed(5).get_state().numpy()})
    run = RunFile(path="", format_version=FORMAT_VERSION, status="running", message="", seed=7, model=model,
                  config={"task": "romo", "model": model, "lr_grid": [1e-3, 3e-3], "hidden": 12},
                  profile_text=prof.text, cell_config=cell.config(), init_report=report.to_dict(),
                  versions=package_versions(), weights={"initial": weights_from_cell(cell)},
                  runs=[rec0, rec1], selected_run=0, settings={"alpha": 0.5, "lr": 1e-3},
                  lyapunov={"initial": {"max_per_step": -0.01, "k": 2, "mean": np.array([-0.01, -0.2])}},
                  floss={"losses": np.array([0.1, 0.05])},
                  summary={"final_loss": 0.03, "learning_time": None, "eval_accuracy": 0.75})
    return run, cell


def test_round_trip_everything(tmp_path):
    run, _ = _run_file()
    path = tmp_path / "run.h5"
    write_run(path, run)
    back = read_run(path)
    assert back.format_version == FORMAT_VERSION and back.status == "running" and back.seed == 7
    assert back.config == run.config and back.settings == run.settings
    assert back.profile_text == run.profile_text and back.cell_config == run.cell_config
    assert back.init_report == json.loads(json.dumps(run.init_report))
    assert back.versions == run.versions and back.versions["torch"]
    for name, arr in run.weights["initial"].params.items():
        assert np.array_equal(back.weights["initial"].params[name], arr)
        assert back.weights["initial"].params[name].dtype == arr.dtype
    r0, r1 = back.runs
    assert r0.status == "complete" and r0.learning_time is None and r0.wall_time == 1.5
    assert r0.loss == run.runs[0].loss and r0.iteration == [0, 10, 19]
    assert math.isnan(r0.accuracy[-1]) and r0.accuracy[:2] == [0.5, 0.6]
    assert r0.loss_per_iteration == run.runs[0].loss_per_iteration
    assert r0.final is not None and r0.checkpoint is None
    assert back.curves[1]["lr"].tolist() == [3e-3]
    ck = r1.checkpoint
    assert ck.iteration == 3 and ck.wall_time == 0.25
    assert ck.optimizer["param_groups"] == run.runs[1].checkpoint.optimizer["param_groups"]
    assert ck.optimizer["state"][0]["step"].dtype == np.float32 and ck.optimizer["state"][1]["step"] == 7
    assert isinstance(ck.optimizer["state"][1]["step"], int)
    g = torch.Generator()
    g.set_state(torch.from_numpy(ck.generators["batch"]))
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(5)))
    assert back.selected is back.runs[0]
    assert back.lyapunov["initial"]["max_per_step"] == -0.01
    assert np.array_equal(back.lyapunov["initial"]["mean"], [-0.01, -0.2])
    assert np.array_equal(back.floss["losses"], [0.1, 0.05])
    assert back.summary == {"final_loss": 0.03, "learning_time": None, "eval_accuracy": 0.75}
    assert back.created and back.updated


def test_readable_by_plain_h5py(tmp_path):
    run, _ = _run_file()
    path = tmp_path / "run.h5"
    write_run(path, run)
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert f.attrs["kind"] == "neuroinit-run"
        assert json.loads(f["config"].asstr()[()])["hidden"] == 12
        assert "[weights]" in f["profile"].asstr()[()]
        assert f["runs/0/curve/loss"][()].tolist() == [0.08, 0.05, 0.03]
        assert f["weights/initial/w_rec"].shape == (12, 12)
        assert f["runs/1/checkpoint"].attrs["iteration"] == 3


@pytest.mark.parametrize("model", ["rate", "lif"])
def test_load_cell_rebuilds_the_network(tmp_path, model):
    run, cell = _run_file(model, profile="loihi-like")
    run.weights["final"] = run.runs[0].final
    path = tmp_path / "run.h5"
    write_run(path, run)
    for which in ("initial", "final"):
        back = load_cell(path, which)
        assert type(back) is type(cell) and back.config() == cell.config()
        assert back.profile == cell.profile and back.profile.text == cell.profile.text
        for n in ("w_in", "w_rec", "bias", "w_out", "b_out"):
            assert torch.equal(getattr(back, n), getattr(cell, n))
        u = torch.rand(15, 3, 1, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(back(u)[0], cell(u)[0])
    with pytest.raises(ValueError, match="no weights 'floss'.*available: final, initial"):
        load_cell(path, "floss")


def test_quantised_weights_store_codes_and_scales(tmp_path):
    run, _ = _run_file("lif", profile="loihi-like")
    path = tmp_path / "run.h5"
    write_run(path, run)
    ws = read_run(path).weights["initial"]
    assert set(ws.codes) == {"w_in", "w_rec", "w_out"}
    for name, codes in ws.codes.items():
        g = ws.grids[name]
        assert codes.dtype == np.int32 and g["scale"] == 2.0 ** g["exponent"]
        assert codes.min() >= g["code_min"] and codes.max() <= g["code_max"]
        assert np.array_equal(codes * g["scale"], ws.params[name].astype(np.float64))  # on the grid, exactly
    ideal, _ = _run_file("rate", profile="ideal")
    write_run(tmp_path / "ideal.h5", ideal)
    assert read_run(tmp_path / "ideal.h5").weights["initial"].codes == {}


# ------------------------------------------------------------------------------------------ failures

def _one_line_error(path, match):
    with pytest.raises(ValueError) as info:
        read_run(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert match in msg, msg
    return msg


def test_truncated_file_is_a_clear_error(tmp_path):
    run, _ = _run_file()
    path = tmp_path / "run.h5"
    write_run(path, run)
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        bad = tmp_path / f"cut{cut}.h5"
        bad.write_bytes(data[:cut])
        _one_line_error(bad, "not a readable neuroinit run file")


def test_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "noise.h5"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    _one_line_error(bad, "not an HDF5 file or truncated/corrupt")
    _one_line_error(tmp_path / "missing.h5", "no such run file")


def test_foreign_or_incomplete_files_name_what_is_wrong(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    _one_line_error(foreign, "is this a neuroinit run file?")
    run, _ = _run_file()
    path = tmp_path / "run.h5"
    write_run(path, run)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    _one_line_error(path, "format_version = 99")
    write_run(path, run)
    with h5py.File(path, "a") as f:
        del f["weights/initial/w_rec"]
    _one_line_error(path, "missing /weights/initial/w_rec")
    write_run(path, run)
    with h5py.File(path, "a") as f:
        del f["runs/1/checkpoint/optimizer"]
    _one_line_error(path, "missing /runs/1/checkpoint/optimizer")
    write_run(path, run)
    with h5py.File(path, "a") as f:
        del f["config"]
        f["config"] = "{not json"
    _one_line_error(path, "/config is not valid JSON")


def test_write_is_atomic(tmp_path):
    run, _ = _run_file()
    path = tmp_path / "run.h5"
    write_run(path, run)
    before = path.read_bytes()
    broken, _ = _run_file()
    broken.weights["initial"].params.pop("w_rec")  # fails half-way through writing
    with pytest.raises(KeyError):
        write_run(path, broken)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.h5"]  # no temporary file left behind
    with pytest.raises(ValueError, match="Invalid run status"):
        write_run(path, RunFile(**{**run.__dict__, "status": "weird"}))


def test_load_cell_keeps_the_stored_grids_when_a_weight_sits_on_code_min(tmp_path):
    # a weight trained onto code_min (-128 * scale) would make a fresh grid choice one exponent coarser
    cell, _report = _cell("lif", "loihi-like")
    grid = cell.grids["w_rec"]
    with torch.no_grad():
        cell.w_rec[0, 1] = grid.code_min * grid.scale
    run, _ = _run_file("lif", "loihi-like")
    run.weights["final"] = weights_from_cell(cell)
    path = tmp_path / "run.h5"
    write_run(path, run)
    loaded = load_cell(path, "final")
    assert loaded.grids["w_rec"] == grid
    assert torch.equal(loaded.params().w_rec, cell.params().w_rec)
