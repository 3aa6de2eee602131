"""Ensembles: K networks trained as one batched model give each member the gradient, the weights and the run
file it gets alone (float64, to 1e-10); unsupported combinations are refused; ``sweep --ensemble`` writes the
same run files as the sweep without it; on a GPU the ensemble equals the CPU one."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroinit.cells.base import PARAM_NAMES
from neuroinit.experiments.ensemble import ensemble_backward, ensemble_support, train_ensemble
from neuroinit.experiments.train import TrainConfig, _Context, train
from neuroinit.io.runfile import read_run

TINY = {"hidden": 12, "batch": 4, "eval_batch": 8, "iters": 6, "log_every": 2, "dtype": "float64",
        "lyapunov": False, "checkpoint_every": 4}
MEMBERS = [{"seed": 0, "gain": 0.5, "lr": 3e-3}, {"seed": 1, "gain": 1.0, "lr": 1e-2},
           {"seed": 2, "gain": 1.5, "lr": 5e-3}]
TOL = 1e-10


def _configs(rule: str, **extra) -> list[TrainConfig]:
    return [TrainConfig(rule=rule, **TINY, **m, **extra) for m in MEMBERS]


def _close(a, b, what: str) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, what
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    assert np.all(np.abs(a - b) <= TOL * scale), f"{what}: max diff {np.abs(a - b).max()}"


def assert_same_run(a_path, b_path) -> None:
    """The run files hold the same config, status, weights (every set), curves and summary (up to timings)."""
    a, b = read_run(a_path), read_run(b_path)
    assert a.config == b.config and a.status == b.status == "complete" and a.settings == b.settings
    assert a.cell_config == b.cell_config and a.profile_text == b.profile_text
    assert set(a.weights) == set(b.weights)
    for key in a.weights:
        for n in PARAM_NAMES:
            _close(a.weights[key].params[n], b.weights[key].params[n], f"weights {key}/{n}")
    assert len(a.runs) == len(b.runs) == 1
    ra, rb = a.runs[0], b.runs[0]
    assert ra.iteration == rb.iteration and ra.status == rb.status
    for name in ("loss", "accuracy", "lr_curve", "loss_per_iteration"):
        _close(getattr(ra, name), getattr(rb, name), name)
    _close(ra.final_loss, rb.final_loss, "final_loss")
    assert ra.learning_time == rb.learning_time
    for k, v in a.summary.items():
        if "wall_time" in k or k == "step_path":
            continue
        w = b.summary[k]
        if isinstance(v, float) and not (v is None or math.isnan(v)):
            _close(v, w, f"summary {k}")
        else:
            assert v == w or (isinstance(v, float) and math.isnan(v) and math.isnan(w)), k
    assert set(a.lyapunov) == set(b.lyapunov)
    for key in a.lyapunov:
        _close(a.lyapunov[key]["mean"], b.lyapunov[key]["mean"], f"lyapunov {key}")
    assert set(a.floss) == set(b.floss)
    for key in a.floss:
        _close(a.floss[key], b.floss[key], f"floss {key}")


@pytest.mark.parametrize("rule", ["bptt", "eprop", "eprop-autograd", "rflo"])
def test_ensemble_gradient_equals_each_member_alone(rule):
    configs = _configs(rule)
    ctxs = [_Context(c) for c in configs]
    solo_cells, ens_cells, solo_rules, ens_rules, batches = [], [], [], [], []
    for ctx in ctxs:
        params, _ = ctx.init_params()
        for cells, rules in ((solo_cells, solo_rules), (ens_cells, ens_rules)):
            cell = ctx.make_cell(params)
            cells.append(cell)
            rules.append(ctx.make_rule(cell, ctx.generators()))
        batches.append(ctx.batch(ctx.config.batch, ctx.generators()["batch"]))
    task = ctxs[0].task
    solo = [r.backward(b, task) for r, b in zip(solo_rules, batches)]
    ens = ensemble_backward(ens_rules, batches, task)
    for s, e, cs, ce in zip(solo, ens, solo_cells, ens_cells):
        _close(e.loss, s.loss, "loss")
        _close(e.outputs, s.outputs, "outputs")
        for n in PARAM_NAMES:
            gs, ge = getattr(cs, n).grad, getattr(ce, n).grad
            assert float(gs.abs().max()) > 0, n       # a real gradient, not an all-zero one
            _close(ge, gs, f"grad {n}")


@pytest.mark.parametrize("rule, extra", [("bptt", {}), ("eprop", {}),
                                         ("rflo", {"lyapunov": True, "lyapunov_k": 2, "floss_iters": 2})])
def test_ensemble_run_files_equal_solo_run_files(tmp_path, rule, extra):
    configs = [TrainConfig(**{**c.to_dict(), **extra}) for c in _configs(rule)]
    solo = [tmp_path / f"solo{j}.h5" for j in range(3)]
    ens = [tmp_path / f"ens{j}.h5" for j in range(3)]
    for c, p in zip(configs, solo):
        train(c, p)
    results = train_ensemble(configs, ens)
    assert [r.status for r in results] == ["complete"] * 3
    for a, b in zip(ens, solo):
        assert_same_run(a, b)
        assert read_run(a).summary["step_path"] == "ensemble"   # provenance: how the run was trained
    # a complete ensemble is returned as it is on resume
    again = train_ensemble(configs, ens, resume=True)
    assert [r.final_loss for r in again] == [r.final_loss for r in results]


def test_ensemble_resumes_from_member_checkpoints(tmp_path):
    """An ensemble killed after its members' checkpoint (iteration 4) resumes from it and finishes like solo runs;
    a member that is already complete is kept as it is."""
    configs = _configs("eprop")
    ens = [tmp_path / f"ens{j}.h5" for j in range(3)]
    solo = [tmp_path / f"solo{j}.h5" for j in range(3)]
    for c, p in zip(configs, solo):
        train(c, p)
    train_ensemble(configs[:1], ens[:1])

    def kill(j, event):
        if event.phase == "train" and event.iteration == 5:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt, match="killed"):
        train_ensemble(configs[1:], ens[1:], progress=kill)
    for p in ens[1:]:
        rf = read_run(p)
        assert rf.status == "running" and rf.runs[0].checkpoint.iteration == 4
    before = ens[0].read_bytes()
    results = train_ensemble(configs, ens, resume=True)
    assert [r.status for r in results] == ["complete"] * 3
    assert ens[0].read_bytes() == before
    for a, b in zip(ens, solo):
        assert_same_run(a, b)


def test_unsupported_combinations_are_refused(tmp_path):
    assert ensemble_support(TrainConfig(**TINY)) is None
    for kwargs, word in [({"model": "lif"}, "model 'lif'"), ({"lr_grid": (1e-3, 2e-3)}, "lr_grid"),
                         ({"align_every": 2, "rule": "eprop"}, "align_every"),
                         ({"floss_iters": 1, "floss_inter_every": 2, "floss_inter_iters": 1}, "inter-flossing")]:
        why = ensemble_support(TrainConfig(**{**TINY, **kwargs}))
        assert why is not None and word in why and "supported: rate networks" in why
    configs = _configs("bptt")
    with pytest.raises(ValueError, match="Invalid ensemble member: not supported in an ensemble: model 'lif'"):
        train_ensemble([*configs[:2], TrainConfig(**{**configs[2].to_dict(), "model": "lif"})],
                       [tmp_path / f"r{j}.h5" for j in range(3)])
    with pytest.raises(ValueError, match="members may differ only in seed, gain, lr; these differ in hidden"):
        train_ensemble([configs[0], TrainConfig(**{**configs[1].to_dict(), "hidden": 8})],
                       [tmp_path / "a.h5", tmp_path / "b.h5"])
    with pytest.raises(ValueError, match="same out path"):
        train_ensemble(configs[:2], [tmp_path / "a.h5", tmp_path / "a.h5"])
    assert not list(Path(tmp_path).glob("*.h5"))   # refused before anything is written


def test_sweep_with_ensemble_writes_the_same_run_files(tmp_path):
    from neuroinit.experiments.sweep import parse_spec, run_sweep

    spec = parse_spec({"name": "ens", "base": {**TINY, "checkpoint_every": 100},
                       "grid": [{"task": "romo", "model": "rate", "rule": ["bptt", "eprop"], "gain": [0.5, 1.5],
                                 "seed": [0, 1], "lr": [3e-3]},
                                {"task": "romo", "model": "lif", "rule": "eprop", "gain": 1.0, "seed": 0,
                                 "lr": [3e-3], "base": {"dt_ms": 10.0}}]})
    from neuroinit.experiments.ensemble import ensemble_groups

    groups = ensemble_groups(spec.runs, 3)   # rate bptt: 3 + 1, rate eprop: 3 + 1, the LIF run alone
    assert sorted(len(g) for g in groups) == [1, 1, 1, 3, 3]
    assert all(len(g) == 1 for g in groups if g[0].config.model == "lif")
    solo = run_sweep(spec, tmp_path / "solo", workers=0)
    ens = run_sweep(spec, tmp_path / "ens", workers=0, ensemble=3)
    assert solo.counts == ens.counts == {"complete": 9}
    files = sorted(p.name for p in (tmp_path / "solo" / "runs").glob("*.h5"))
    assert files == sorted(p.name for p in (tmp_path / "ens" / "runs").glob("*.h5")) and len(files) == 9
    for name in files:
        assert_same_run(tmp_path / "ens" / "runs" / name, tmp_path / "solo" / "runs" / name)
    paths = [read_run(tmp_path / "ens" / "runs" / name).summary["step_path"] for name in files]
    assert sorted(paths).count("ensemble") == 6        # provenance: the two ensembles of 3; the others alone
    again = run_sweep(spec, tmp_path / "ens", workers=0, ensemble=3)   # finished runs are skipped
    assert again.skipped == 9 and again.ran == 0


def test_sweep_groups_only_runs_an_ensemble_speeds_up():
    """Float32 e-prop on the CPU takes the fused native step alone (faster than the batched PyTorch step); BPTT
    and float64 e-prop form ensembles; ensemble sizes 0 and 1 mean every run alone; a negative size is an error."""
    from neuroinit.experiments.ensemble import ensemble_groups, runs_fused_alone
    from neuroinit.experiments.sweep import SweepError, parse_spec, run_sweep
    from neuroinit.learning import fused

    spec = parse_spec({"name": "g", "base": {"hidden": 8, "iters": 2},
                       "grid": [{"task": "romo", "model": "rate", "rule": ["bptt", "eprop"], "gain": [0.5, 1.5],
                                 "seed": [0, 1], "profile": "ideal"}]})
    f32 = {r.config.rule: [len(g) for g in ensemble_groups([x for x in spec.runs if x.config.rule == r.config.rule],
                                                           8)] for r in spec.runs}
    assert f32["bptt"] == [4]
    assert f32["eprop"] == ([1, 1, 1, 1] if fused.available() else [4])
    assert runs_fused_alone(spec.runs[-1].config) == fused.available()
    f64 = [TrainConfig(**{**r.config.to_dict(), "dtype": "float64"}) for r in spec.runs if r.config.rule == "eprop"]
    assert not any(runs_fused_alone(c) for c in f64)
    assert all(len(g) == 1 for size in (0, 1) for g in ensemble_groups(spec.runs, size))
    with pytest.raises(SweepError, match="Invalid ensemble -1"):
        run_sweep(spec, "unused-dir", ensemble=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rule", ["bptt", "eprop"])
def test_ensemble_on_cuda_equals_cpu(tmp_path, rule):
    cpu = _configs(rule)
    gpu = [TrainConfig(**{**c.to_dict(), "device": "cuda"}) for c in cpu]
    train_ensemble(cpu, [tmp_path / f"cpu{j}.h5" for j in range(3)])
    train_ensemble(gpu, [tmp_path / f"gpu{j}.h5" for j in range(3)])
    for j in range(3):
        a, b = read_run(tmp_path / f"gpu{j}.h5"), read_run(tmp_path / f"cpu{j}.h5")
        for n in PARAM_NAMES:
            np.testing.assert_allclose(a.weights["final"].params[n], b.weights["final"].params[n],
                                       rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(a.runs[0].loss, b.runs[0].loss, rtol=1e-8)


def test_sweep_command_ensemble_option(tmp_path):
    import json

    from click.testing import CliRunner

    from neuroinit.cli import main

    spec = tmp_path / "s.toml"
    spec.write_text('name = "cli-ens"\n[base]\nhidden = 8\nbatch = 4\neval_batch = 8\niters = 3\nlyapunov = false\n'
                    '[grid]\ntask = "romo"\nmodel = "rate"\nrule = "eprop"\ngain = [0.5, 1.0]\nseed = 0\nlr = [0.01]\n')
    res = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(tmp_path / "d"), "--workers", "0",
                                    "--ensemble", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["report"]["counts"] == {"complete": 2}
    bad = CliRunner().invoke(main, ["sweep", str(spec), "--ensemble", "-1"])
    assert bad.exit_code != 0 and "--ensemble" in bad.output


def test_sweep_ensemble_on_a_local_pool(tmp_path):
    """An ensemble is one job for the local pool; every member's run file and ledger entry is complete."""
    from neuroinit.experiments.sweep import parse_spec, read_manifest, run_sweep

    spec = parse_spec({"name": "pool", "base": {**TINY, "iters": 3},
                       "grid": [{"task": "romo", "model": "rate", "rule": "bptt", "gain": [0.5, 1.5], "seed": 0,
                                 "lr": [3e-3]}]})
    rep = run_sweep(spec, tmp_path / "d", workers=1, ensemble=2)
    assert rep.counts == {"complete": 2} and rep.ran == 2
    ledger = read_manifest(tmp_path / "d")["runs"]
    assert sorted(r["status"] for r in ledger.values()) == ["complete", "complete"]
    solo = run_sweep(spec, tmp_path / "s", workers=0)
    assert solo.counts == {"complete": 2}
    for r in spec.runs:
        assert_same_run(tmp_path / "d" / r.file, tmp_path / "s" / r.file)


@pytest.mark.parametrize("profile, rule", [("xylo-like", "bptt"), ("spinnaker2-like", "eprop")])
def test_ensemble_on_quantised_profiles_equals_solo(tmp_path, profile, rule):
    """Profiles without chip-precision traces: each member keeps its own weight grids (fake-quantised forward,
    straight-through gradients) and its optimizer's projection onto them (nearest rounding off chip, the
    chip's stochastic rounding on chip, from the member's own generator)."""
    configs = _configs(rule, profile=profile)
    assert ensemble_support(configs[0]) is None
    solo = [tmp_path / f"solo{j}.h5" for j in range(3)]
    ens = [tmp_path / f"ens{j}.h5" for j in range(3)]
    for c, p in zip(configs, solo):
        train(c, p)
    train_ensemble(configs, ens)
    for a, b in zip(ens, solo):
        assert_same_run(a, b)
        w = read_run(b).weights
        assert not np.array_equal(w["initial"].params["w_rec"], w["final"].params["w_rec"])   # it learned


def test_a_diverging_member_leaves_the_ensemble(tmp_path, monkeypatch):
    """Member 1's loss becomes NaN at iteration 4: its file says diverged, as alone; the others finish as alone."""
    from neuroinit.tasks.romo import RomoTask

    configs = _configs("bptt")
    solo = [tmp_path / f"solo{j}.h5" for j in range(3)]
    for j in (0, 2):
        train(configs[j], solo[j])
    calls = {"n": 0}
    original = RomoTask.loss

    def poisoned(self, y, batch):   # calls: 3 initial evaluations, then members 0, 1, 2 per iteration
        calls["n"] += 1
        loss = original(self, y, batch)
        return loss * float("nan") if calls["n"] == 3 + 3 * 4 + 2 else loss

    monkeypatch.setattr(RomoTask, "loss", poisoned)
    ens = [tmp_path / f"ens{j}.h5" for j in range(3)]
    results = train_ensemble(configs, ens)
    assert [r.status for r in results] == ["complete", "diverged", "complete"]
    rf = read_run(ens[1])
    assert rf.status == "diverged" and "the loss is nan at iteration 4" in rf.message
    assert rf.runs[0].checkpoint.iteration == 4 and len(rf.runs[0].loss_per_iteration) == 4
    for j in (0, 2):
        assert_same_run(ens[j], solo[j])
