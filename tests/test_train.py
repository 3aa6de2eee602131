"""Training runs: config validation, real learning for every (model x rule) pair on Romo, learning-rate grids,
bit-identical resume after SIGKILL and after Ctrl-C, NaN handling, and the train / show commands."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from neuroinit.cli import main
from neuroinit.experiments.train import (
    ProgressEvent,
    TrainConfig,
    TrainingDiverged,
    learning_time,
    resolve_settings,
    train,
)
from neuroinit.io.runfile import load_cell, read_run

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = ("w_in", "w_rec", "bias", "w_out", "b_out")
# Tiny, fast settings (no Lyapunov analysis unless a test wants it). LIF at dt = 10 ms = 0.5 tau_m: 56 steps.
TINY = {"hidden": 16, "batch": 16, "eval_batch": 32, "lyapunov": False}
LIF_FAST = {"dt_ms": 10.0}


def _final(path) -> dict[str, np.ndarray]:
    return read_run(path).weights["final"].params


# ------------------------------------------------------------------------------------------ config

def test_config_defaults_follow_the_sources():
    c = TrainConfig()
    assert (c.task, c.model, c.hidden, c.batch, c.optimizer, c.iters) == ("romo", "rate", 256, 32, "adam", 6000)
    s = resolve_settings(c)
    assert s["lr"] == 0.05 / 256 and s["alpha"] == 0.5 and s["form"] == "voltage"   # Schuessler et al. 2020
    assert resolve_settings(TrainConfig(rule="rflo"))["form"] == "rate"              # Murray's RFLO
    assert resolve_settings(TrainConfig(rule="rflo", form="voltage"))["form"] == "voltage"
    lif = resolve_settings(TrainConfig(model="lif"))
    assert lif["dt_tau"] == lif["dt_ms"] / lif["tau_ms"] < 0.5            # finer steps than the rate net
    assert lif["tau_m_ms"] == 5 * lif["tau_ms"] and lif["tau_out_ms"] == lif["tau_ms"]
    assert TrainConfig(lr_grid=[1e-3, 3e-3]).lrs == (1e-3, 3e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden = 3  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, match", [
    ({"model": "izhikevich"}, "Invalid model 'izhikevich'"),
    ({"rule": "hebb"}, "Invalid rule 'hebb'"),
    ({"gain": -1.0}, "Invalid gain"),
    ({"gain": float("nan")}, "Invalid gain"),
    ({"hidden": 0}, "Invalid hidden"),
    ({"iters": 2.5}, "Invalid iters"),
    ({"lr": 0.0}, "Invalid lr"),
    ({"lr": 1e-3, "lr_grid": (1e-3, 1e-2)}, "give lr or lr_grid, not both"),
    ({"lr_grid": (1e-3, -1.0)}, "Invalid lr_grid"),
    ({"optimizer": "lbfgs"}, "Invalid optimizer"),
    ({"seed": -1}, "Invalid seed"),
    ({"device": "tpu"}, "Invalid device"),
    ({"model": "lif", "form": "rate"}, "form is for rate networks"),
    ({"dt_ms": 200.0, "tau_ms": 100.0}, "0 < alpha = dt / tau <= 1"),
    ({"tau_out_ms": 5.0}, "Invalid tau_out_ms for a rate network"),
    ({"tau_m_ms": 5.0}, "Invalid tau_m_ms for a rate network"),
    ({"model": "lif", "task": "2af", "tau_ms": 5.0}, "set the membrane with tau_m_ms"),
    ({"lyapunov_k": 300}, "Invalid lyapunov_k 300: at most hidden = 256"),
    ({"floss_mode": "gentle"}, "Invalid floss_mode"),
    ({"profile": "loihi-lik"}, "did you mean 'loihi-like'"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_unknown_task_says_how_to_list_valid_ids():
    with pytest.raises(ValueError) as info:
        TrainConfig(task="PerceptualDecisonMaking-v0")
    msg = str(info.value)
    assert "available_tasks()" in msg and "did you mean 'PerceptualDecisionMaking-v0'" in msg
    assert TrainConfig(task="2af").task == "PerceptualDecisionMaking-v0"
    with pytest.raises(ValueError, match="Invalid config keys"):
        TrainConfig.from_dict({"task": "romo", "hiden": 3})


def test_learning_time_is_schuessler_definition():
    assert learning_time([1.0, 0.5, 0.06, 0.049, 0.01]) == 3
    assert learning_time([1.0, 0.5, 0.05]) is None   # strictly below 5%
    assert learning_time([]) is None


# ------------------------------------------------------------------------------------------ learning

@pytest.mark.parametrize("model", ["rate", "lif"])
@pytest.mark.parametrize("rule", ["bptt", "eprop", "eprop-autograd", "rflo"])
def test_loss_drops_on_romo(tmp_path, model, rule):
    extra = LIF_FAST if model == "lif" else {}
    cfg = TrainConfig(model=model, rule=rule, gain=1.5, iters=30, lr=1e-2, log_every=1, seed=1, **TINY, **extra)
    res = train(cfg, tmp_path / "run.h5")
    losses = np.asarray(read_run(tmp_path / "run.h5").runs[0].loss_per_iteration)
    assert len(losses) == 30 and res.status == "complete"
    assert losses[-5:].mean() < 0.8 * losses[0], (model, rule, losses[0], losses[-5:])
    assert res.initial_loss == losses[0] and math.isfinite(res.eval_loss)


def test_run_file_holds_the_whole_run(tmp_path):
    cfg = TrainConfig(rule="rflo", profile="loihi-like", clamp_gain=True, gain=1.5, iters=12, lr=3e-2,
                      log_every=5, checkpoint_every=4, lyapunov=True, lyapunov_k=2, floss_iters=2,
                      **{k: v for k, v in TINY.items() if k != "lyapunov"})
    events: list[ProgressEvent] = []
    res = train(cfg, tmp_path / "run.h5", progress=events.append)
    rf = read_run(tmp_path / "run.h5")
    assert rf.status == "complete" and rf.config == json.loads(json.dumps(cfg.to_dict()))
    assert "loihi" in rf.profile_text and rf.settings["form"] == "rate" and rf.versions["torch"]
    assert rf.runs[0].iteration == [0, 5, 10, 11] and len(rf.runs[0].loss_per_iteration) == 12
    assert rf.runs[0].checkpoint is None  # dropped once the run completed
    assert set(rf.weights) == {"initial", "floss", "final"}
    for which in ("initial", "floss", "final"):
        ws = rf.weights[which]
        for name in ("w_in", "w_rec", "w_out"):
            g = ws.grids[name]
            w = ws.params[name].astype(np.float64)
            # the 8-bit codes the forward pass uses (Loihi learns on a finer 9-bit grid: top bits)
            assert np.array_equal(ws.codes[name], np.clip(np.round(w / g["scale"]), g["code_min"], g["code_max"]))
            if which == "initial":
                assert np.array_equal(ws.codes[name] * g["scale"], w)  # the init lies on the grid exactly
            else:  # training keeps the weights on the 9-bit learning grid
                assert np.array_equal(np.round(w / (g["scale"] / 2)) * (g["scale"] / 2), w)
    assert set(rf.lyapunov) == {"initial", "floss", "final"} and rf.lyapunov["final"]["mean"].shape == (2,)
    assert res.lyapunov_initial == rf.lyapunov["floss"]["max_per_step"]
    assert rf.floss["losses"].shape == (2,)
    assert [e.phase for e in events if e.phase != "train"][:3] == ["init", "lyapunov", "floss"]
    assert [e.done for e in events if e.phase == "train"] == list(range(1, 13))
    cell = load_cell(tmp_path / "run.h5")
    assert cell.form == "rate" and cell.profile.name == "loihi-like"
    task = rf.make_task()
    assert task.dt_tau == 0.5 and rf.input_scale == 1.0


def test_lr_grid_keeps_the_best_and_stores_every_curve(tmp_path):
    cfg = TrainConfig(lr_grid=(1e-5, 2e-2), iters=20, log_every=2, **TINY)
    res = train(cfg, tmp_path / "grid.h5")
    rf = read_run(tmp_path / "grid.h5")
    assert [r.lr for r in rf.runs] == [1e-5, 2e-2] and all(r.status == "complete" for r in rf.runs)
    means = [float(np.mean(r.loss[-20:])) for r in rf.runs]
    assert rf.selected_run == int(np.argmin(means)) == 1 and res.lr == 2e-2
    assert all(c["iteration"].tolist() == [*range(0, 20, 2), 19] for c in rf.curves)
    for n in WEIGHTS:
        assert np.array_equal(rf.weights["final"].params[n], rf.runs[1].final.params[n])
    # the same seed for every rate: the same first batch, so the same initial loss
    assert rf.runs[0].loss_per_iteration[0] == rf.runs[1].loss_per_iteration[0]


# ------------------------------------------------------------------------------------------ resume

_CHILD = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from neuroinit.experiments.train import TrainConfig, train
    cfg = TrainConfig.from_dict({cfg!r})
    def slow(ev):  # past iteration 10 (the checkpoint at 8 written) it waits to be killed: no race on a busy host
        if ev.phase == "train":
            time.sleep(0.1 if ev.done < 10 else 3600)
    train(cfg, sys.argv[1], progress=slow)
""")


def _resume_config(**kw) -> TrainConfig:
    base = dict(rule="eprop", gain=1.5, iters=40, lr=1e-2, checkpoint_every=7, log_every=3, seed=3, **TINY)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    cfg = _resume_config(iters=24, checkpoint_every=4)
    ref = tmp_path / "ref.h5"
    train(cfg, ref)

    out = tmp_path / "killed.h5"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(cfg=cfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, str(script), str(out)], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for a checkpoint past iteration 7, then kill -9
            if out.exists():
                try:
                    ck = read_run(out).runs[0].checkpoint
                except ValueError:
                    ck = None
                if ck is not None and ck.iteration >= 8:
                    break
            assert child.poll() is None, "the child finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared")
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    killed = read_run(out)
    assert killed.status == "running" and "final" not in killed.weights
    done_before = killed.runs[0].checkpoint.iteration
    assert 8 <= done_before < 24

    res = train(cfg, out, resume=True)
    assert res.status == "complete"
    a, b = _final(ref), _final(out)
    for n in WEIGHTS:
        assert np.array_equal(a[n], b[n]), n
    ra, rb = read_run(ref).runs[0], read_run(out).runs[0]
    assert ra.loss_per_iteration == rb.loss_per_iteration and ra.iteration == rb.iteration
    assert ra.accuracy == rb.accuracy


@pytest.mark.parametrize("profile, rule", [("loihi-like", "rflo"), ("ideal", "bptt")])
def test_resume_after_interrupt_is_bit_identical(tmp_path, profile, rule):
    """Ctrl-C (SIGINT sent from the progress hook) stops at the next iteration boundary with a checkpoint there;
    stochastic rounding (Loihi's weight updates and traces) and random feedback resume exactly."""
    cfg = _resume_config(profile=profile, rule=rule, clamp_gain=True, iters=10, lr_grid=(1e-2, 3e-2), lr=None,
                         checkpoint_every=3, hidden=12)
    train(cfg, tmp_path / "ref.h5")
    handler_before = signal.getsignal(signal.SIGINT)   # SIG_IGN in a job started with '&' or nohup, else Python's

    def interrupt(ev):
        if ev.phase == "train" and ev.run == 1 and ev.iteration == 5:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "int.h5"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=interrupt)
    mid = read_run(out)
    assert mid.status == "interrupted" and "interrupted at iteration 5" in mid.message
    assert mid.runs[0].status == "complete" and mid.runs[1].checkpoint.iteration == 5
    assert signal.getsignal(signal.SIGINT) is handler_before  # the caller's handler restored
    with pytest.raises(ValueError, match="the file exists; resume it"):
        train(cfg, out)
    with pytest.raises(ValueError, match="the config differs \\(gain"):
        train(dataclasses.replace(cfg, gain=1.4), out, resume=True)
    train(cfg, out, resume=True)
    a, b = read_run(tmp_path / "ref.h5"), read_run(out)
    assert a.selected_run == b.selected_run
    for k in range(2):
        for n in WEIGHTS:
            assert np.array_equal(a.runs[k].final.params[n], b.runs[k].final.params[n]), (k, n)
        assert a.runs[k].loss_per_iteration == b.runs[k].loss_per_iteration
    again = train(cfg, out, resume=True)  # complete: returned as it is
    assert again.final_loss == b.summary["final_loss"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from neuroinit.tasks.romo import RomoTask

    calls = {"n": 0}
    original = RomoTask.loss

    def poisoned(self, y, batch):
        calls["n"] += 1
        loss = original(self, y, batch)
        return loss * float("nan") if calls["n"] == 13 else loss   # call 1 evaluates the init: iteration 11

    monkeypatch.setattr(RomoTask, "loss", poisoned)
    cfg = _resume_config(iters=30, checkpoint_every=5)
    out = tmp_path / "nan.h5"
    with pytest.raises(TrainingDiverged, match="loss is nan at iteration 11.*last good checkpoint \\(iteration 10\\)"):
        train(cfg, out)
    rf = read_run(out)
    assert rf.status == "diverged" and "iteration 11" in rf.message
    ck = rf.runs[0].checkpoint
    assert ck.iteration == 10 and all(np.isfinite(w).all() for w in ck.weights.values())
    with pytest.raises(TrainingDiverged, match="iteration 11"):  # deterministic: not trained again
        train(cfg, out, resume=True)
    assert calls["n"] == 13

    # in a learning-rate grid the diverged rate is skipped and the others go on
    calls["n"] = 0
    grid = dataclasses.replace(cfg, lr=None, lr_grid=(1e-2, 2e-2))
    res = train(grid, tmp_path / "grid.h5")
    rf = read_run(tmp_path / "grid.h5")
    assert [r.status for r in rf.runs] == ["diverged", "complete"] and rf.selected_run == 1 and res.lr == 2e-2
    r = CliRunner().invoke(main, ["show", str(tmp_path / "grid.h5")])
    assert r.exit_code == 0 and "diverged" in r.stdout

    calls["n"] = 0  # the CLI: one line, non-zero exit
    r = CliRunner().invoke(main, ["train", "--hidden", "16", "--batch", "8", "--iters", "20", "--lr", "1e-2",
                                  "--no-lyapunov", "--eval-batch", "8", "--out", str(tmp_path / "cli.h5")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert [ln for ln in r.output.strip().splitlines() if not ln.startswith("note:")] == [  # no compiler: a note
        ("Error: Training diverged: the loss is nan at iteration 11 (lr 0.01); stopped. The run file keeps the "
         "last good checkpoint (iteration 0); try a smaller learning rate")]


# ------------------------------------------------------------------------------------------ CLI

def test_cli_train_json_and_show(tmp_path):
    out = tmp_path / "cli.h5"
    args = ["train", "--hidden", "16", "--batch", "8", "--iters", "6", "--lr", "1e-2", "--eval-batch", "16",
            "--no-lyapunov", "--gain", "1.5", "--out", str(out), "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["out_path"] == str(out) and summary["iterations"] == 6 and summary["status"] == "complete"
    assert {"final_loss", "eval_accuracy", "learning_time", "wall_time"} <= set(summary)
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "the file exists" in again.output
    resumed = CliRunner().invoke(main, ["train", "--resume", "--out", str(out), "--json"])
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["final_loss"] == summary["final_loss"]
    clash = CliRunner().invoke(main, ["train", "--resume", "--out", str(out), "--gain", "2"])
    assert clash.exit_code != 0 and "config differs (gain" in clash.output

    shown = CliRunner().invoke(main, ["show", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "complete" in shown.stdout and "rule eprop" in shown.stdout and "eval: loss" in shown.stdout
    js = json.loads(CliRunner().invoke(main, ["show", str(out), "--json"]).stdout)
    assert js["status"] == "complete" and js["config"]["hidden"] == 16 and js["profile"] == "ideal"


def test_cli_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(main, ["train", "--task", "romoo", "--out", str(tmp_path / "x.h5")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Unknown task 'romoo'" in lines[0] and "available_tasks()" in lines[0]
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)
    r = CliRunner().invoke(main, ["show", str(bad)])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and "truncated/corrupt" in r.output
    r = CliRunner().invoke(main, ["train", "--model", "snn", "--out", str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


def test_neurogym_task_trains(tmp_path):
    cfg = TrainConfig(task="PerceptualDecisionMaking-v0", hidden=16, batch=8, iters=3, eval_batch=8,
                      lyapunov=False)
    res = train(cfg, tmp_path / "pdm.h5")
    rf = read_run(tmp_path / "pdm.h5")
    assert res.status == "complete" and res.chance_accuracy == 0.5
    assert rf.settings["alpha"] == 0.2 and rf.settings["lr"] == 3e-3
    assert load_cell(tmp_path / "pdm.h5").n_in == 3 and rf.make_task().dt_ms == 20.0
