"""Gradient alignment (local rule vs BPTT): exact where theory says so, below 1 otherwise; CLI, training log."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neuroinit.cells import PARAM_NAMES
from neuroinit.cli import main
from neuroinit.dynamics.alignment import compare_grads, rule_gradients
from neuroinit.experiments.alignment_report import KIND, fresh_alignment, read_report, summarise
from neuroinit.experiments.train import TrainConfig, train
from neuroinit.io.runfile import read_run

SMALL = {"hidden": 12, "batch": 4}
TINY_RUN = {"hidden": 12, "batch": 8, "eval_batch": 16, "lyapunov": False, "lr": 1e-2}


def _max_dev(values: dict[str, list[float]], target: float, names=PARAM_NAMES) -> float:
    return max(abs(v - target) for n in names for v in values[n])


# ------------------------------------------------------------------------------------------ the measure

def test_compare_grads_on_known_vectors():
    loc = {n: torch.tensor([1.0, 0.0], dtype=torch.float64) for n in PARAM_NAMES}
    ref = {n: torch.tensor([1.0, 1.0], dtype=torch.float64) for n in PARAM_NAMES}
    ref["b_out"] = torch.zeros(2, dtype=torch.float64)
    cos, rel = compare_grads(loc, ref)
    assert cos["w_rec"] == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert rel["w_rec"] == pytest.approx(1 / math.sqrt(2), abs=1e-15)   # ||(0, -1)|| / ||(1, 1)||
    assert math.isnan(cos["b_out"]) and math.isnan(rel["b_out"])        # no BPTT direction to compare with


def test_summary_statistics_over_batches_and_seeds():
    per_seed = [{"cosine": {n: [0.2, 0.4] for n in PARAM_NAMES}},
                {"cosine": {n: [0.6, 0.6] for n in PARAM_NAMES}}]
    s = summarise(per_seed, "cosine")["w_rec"]
    assert s["mean"] == pytest.approx(0.45)                      # mean of the seed means 0.3 and 0.6
    assert s["std_seeds"] == pytest.approx(np.std([0.3, 0.6], ddof=1))
    assert s["std_batches"] == pytest.approx(np.mean([np.std([0.2, 0.4], ddof=1), 0.0]))
    assert (s["n_seeds"], s["n_batches"]) == (2, 4)


@pytest.mark.parametrize("form", ["voltage", "rate"])
def test_eprop_alignment_is_exact_without_recurrence(form):
    """Gain 0 (W_rec = 0), symmetric feedback: e-prop equals BPTT for every parameter (science.md 2.2 check 3)."""
    r = fresh_alignment(model="rate", rule="eprop", gain=0.0, form=form, batches=2, **SMALL)
    assert r["settings"]["form"] == form
    assert _max_dev(r["cosine"], 1.0) < 1e-10
    assert _max_dev(r["rel_error"], 0.0) < 1e-10


def test_alpha_one_alignment_is_exact_against_one_step_truncated_bptt():
    """alpha = 1: e-prop is one-step truncated BPTT at any gain (science.md 2.2 check 2), not full BPTT."""
    tau = 100.0  # Romo's time unit for the rate net (training's default): dt = tau gives alpha = 1
    r1 = fresh_alignment(model="rate", rule="eprop", gain=1.5, dt_ms=tau, tau_ms=tau, truncation=1, batches=2,
                         **SMALL)
    assert _max_dev(r1["cosine"], 1.0) < 1e-10 and _max_dev(r1["rel_error"], 0.0) < 1e-10
    full = fresh_alignment(model="rate", rule="eprop", gain=1.5, dt_ms=tau, tau_ms=tau, batches=2, **SMALL)
    assert max(full["cosine"]["w_rec"]) < 0.99


@pytest.mark.parametrize("model,rule", [("rate", "eprop"), ("rate", "rflo"), ("lif", "eprop")])
def test_recurrent_network_is_below_one_and_the_readout_is_exact(model, rule):
    extra = {"dt_ms": 10.0} if model == "lif" else {}
    r = fresh_alignment(model=model, rule=rule, gain=1.5, batches=2, **SMALL, **extra)
    assert max(r["cosine"]["w_rec"]) < 0.99 and min(r["rel_error"]["w_rec"]) > 0.05
    # the readout's gradient needs no backpropagation through time: exact for every rule and gain
    assert _max_dev(r["cosine"], 1.0, ("w_out", "b_out")) < 1e-10


@pytest.mark.parametrize("model,rule", [("rate", "rflo"), ("lif", "eprop")])
def test_gain_zero_is_not_exact_for_random_feedback_or_lif(model, rule):
    """RFLO's random feedback and LIF e-prop's dropped reset path leave an error even without recurrence."""
    extra = {"dt_ms": 10.0} if model == "lif" else {}
    r = fresh_alignment(model=model, rule=rule, gain=0.0, batches=2, **SMALL, **extra)
    assert max(r["cosine"]["w_in"]) < 1 - 1e-6
    assert _max_dev(r["cosine"], 1.0, ("w_out", "b_out")) < 1e-10


def test_rule_gradients_leaves_grad_untouched():
    from neuroinit.cells import make_cell
    from neuroinit.init import float_init
    from neuroinit.learning import make_rule
    from neuroinit.tasks import make_task

    task = make_task("romo")
    cell = make_cell("rate", float_init(1, 8, 2, 1.0, generator=torch.Generator().manual_seed(0),
                                        dtype=torch.float64))
    cell.w_rec.grad = torch.ones_like(cell.w_rec)
    batch = task.batch(3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g, loss = rule_gradients(cell, make_rule("eprop", cell, generator=torch.Generator()), batch, task)
    assert torch.equal(cell.w_rec.grad, torch.ones_like(cell.w_rec)) and cell.w_in.grad is None
    assert float(g["w_rec"].abs().max()) > 0 and loss > 0


# ------------------------------------------------------------------------------------------ CLI

def _cli(*args):
    return CliRunner().invoke(main, ["alignment", *args])


def test_cli_fresh_init_table_json_and_out(tmp_path):
    out = tmp_path / "a.json"
    r = _cli("--pairs", "rate:eprop,rate:rflo", "--gain", "0,1.5", "--hidden", "10", "--batch", "3",
             "--batches", "2", "--seeds", "2", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "cos w_rec" in r.output and "N = 10" in r.output and f"wrote {out}" in r.output
    doc = read_report(out)
    assert doc["kind"] == KIND and doc["source"] == "fresh"
    assert [(c["model"], c["rule"], c["gain"]) for c in doc["conditions"]] == [
        ("rate", "eprop", 0.0), ("rate", "eprop", 1.5), ("rate", "rflo", 0.0), ("rate", "rflo", 1.5)]
    exact = doc["conditions"][0]["summary"]["cosine"]["w_rec"]
    assert abs(exact["mean"] - 1) < 1e-10 and exact["n_seeds"] == 2 and exact["n_batches"] == 4
    assert doc["conditions"][1]["summary"]["cosine"]["w_rec"]["mean"] < 0.99
    assert [s["seed"] for s in doc["conditions"][1]["per_seed"]] == [0, 1]
    r = _cli("--model", "rate", "--rule", "eprop", "--gain", "0.5", "--hidden", "10", "--batch", "3",
             "--batches", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["conditions"][0]["gain"] == 0.5


@pytest.mark.parametrize("args,needle", [
    (["--gain", "x"], "--gain"),
    (["--pairs", "rate:bptt", "--gain", "1"], "--pairs"),
    (["--model", "lif", "--gain", "1", "--alpha", "1"], "--alpha"),
    (["--hidden", "8"], "Missing --gain"),
    (["--gain", "1", "--pairs", "rate:eprop", "--model", "rate"], "not both"),
    (["--gain", "1", "--rule", "bptt"], "--rule"),
    (["--gain", "1", "--which", "final"], "--which"),
])
def test_cli_bad_input_is_one_line(args, needle):
    r = _cli(*args)
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.output, r.output


def test_cli_on_a_run_file_and_align_every_in_training(tmp_path):
    path = tmp_path / "run.h5"
    train(TrainConfig(rule="eprop", gain=1.5, iters=5, align_every=2, **TINY_RUN), path)
    rec = read_run(path).runs[0]
    assert rec.alignment["iteration"] == [0, 2, 4]
    assert set(rec.alignment) == {"iteration"} | {f"{k}_{n}" for k in ("cosine", "rel_error") for n in PARAM_NAMES}
    assert all(abs(c - 1) < 1e-5 for c in rec.alignment["cosine_w_out"])   # float32 training: rounding only
    assert all(-1 <= c < 0.999 for c in rec.alignment["cosine_w_rec"])
    # logging the alignment does not change training
    plain = tmp_path / "plain.h5"
    train(TrainConfig(rule="eprop", gain=1.5, iters=5, **TINY_RUN), plain)
    a, b = read_run(path).weights["final"].params, read_run(plain).weights["final"].params
    assert all(np.array_equal(a[n], b[n]) for n in PARAM_NAMES)
    assert read_run(plain).runs[0].alignment == {}

    out = tmp_path / "a.json"
    r = _cli(str(path), str(plain), "--which", "initial", "--batches", "1", "--out", str(out))
    assert r.exit_code == 0, r.output
    doc = read_report(out)
    assert doc["source"] == "runs" and len(doc["conditions"]) == 1      # same model, rule, gain: one condition
    assert doc["setup"]["hidden"] == 12 and doc["conditions"][0]["which"] == "initial"
    r = _cli(str(path), "--gain", "1")
    assert r.exit_code != 0 and "fresh init" in r.output.strip().splitlines()[0]


def test_align_every_is_validated():
    with pytest.raises(ValueError, match="align_every"):
        TrainConfig(align_every=-1)
    with pytest.raises(ValueError, match="bptt"):
        TrainConfig(rule="bptt", align_every=5)


def test_added_fields_keep_existing_run_ids():
    """align_every at its default leaves run ids, condition keys and stored-config checks as they were."""
    from neuroinit.experiments.sweep import ADDED_FIELDS, condition_key, run_id

    cfg = TrainConfig(task="romo", model="rate", rule="eprop", gain=0.5, hidden=256, iters=2000, seed=3,
                      floss_iters=100, floss_k=32)
    assert "align_every" in ADDED_FIELDS
    assert run_id(cfg) == "2f7227b1bc109fd8"          # the id this config had before align_every existed
    assert run_id(TrainConfig()) == "b73cfcd816a73eba"
    old = {k: v for k, v in cfg.to_dict().items() if k != "align_every"}   # a run file written before
    assert run_id(old) == run_id(cfg) and condition_key(old) == condition_key(cfg.to_dict())
    assert run_id(TrainConfig(align_every=10)) != run_id(TrainConfig())


# ------------------------------------------------------------------------------------------ figure

def test_alignment_figure_has_a_curve_per_model_and_rule_with_labelled_ticks(tmp_path):
    from neuroinit.experiments.alignment_plot import alignment_figure
    from neuroinit.experiments.alignment_report import fresh_report

    doc = fresh_report([("rate", "eprop"), ("rate", "rflo")], [0.0, 0.5, 2.0], [0, 1], batches=1, **SMALL)
    path = tmp_path / "a.json"
    from neuroinit.experiments.alignment_report import write_report

    write_report(path, doc)
    fig, n = alignment_figure(doc)
    assert n == 8                                              # 2 pairs x (cosine, rel_error) x (W_in, W_rec)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 4
    for ax in axes:
        labels = {line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")}
        assert labels == {"rate eprop", "rate rflo"}
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.5", "2"]
        assert sum(bool(t.get_text()) for t in ax.get_yticklabels()) >= 3
        assert ax.get_xlabel() == "initial gain g" and ax.get_ylabel()
    title = fig._suptitle.get_text()
    assert "N = 12" in title and "1 batches x 2 seeds" in title and "s.e.m." in title
    eprop = next(ln for ln in axes[1].get_lines() if ln.get_label() == "rate eprop")   # W_rec cosine
    assert abs(eprop.get_ydata()[0] - 1) < 1e-10 and eprop.get_ydata()[-1] < 0.99
    out = tmp_path / "fig.png"
    r = CliRunner().invoke(main, ["plot", str(path), "--figure", "alignment", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["curves"] == 8 and out.stat().st_size > 10_000
    r = CliRunner().invoke(main, ["plot", str(tmp_path), "--figure", "alignment", "--out", str(out)])
    assert r.exit_code != 0 and "alignment file" in r.output.strip().splitlines()[-1]


def test_a_run_file_written_before_align_every_resumes(tmp_path):
    from neuroinit.io.runfile import write_run

    path = tmp_path / "old.h5"
    cfg = TrainConfig(rule="eprop", gain=1.0, iters=2, **TINY_RUN)
    train(cfg, path)
    rf = read_run(path)
    del rf.config["align_every"]                      # as a run file from before the field existed
    write_run(path, rf)
    assert train(cfg, path, resume=True).status == "complete"
    with pytest.raises(ValueError, match="align_every"):
        train(dataclasses.replace(cfg, align_every=1), path, resume=True)


def test_alignment_log_survives_an_interrupted_run(tmp_path):
    cfg = TrainConfig(rule="rflo", gain=1.0, iters=6, align_every=1, checkpoint_every=2, checkpoint_seconds=0,
                      **TINY_RUN)
    whole = tmp_path / "whole.h5"
    train(cfg, whole)

    def stop_after_five(ev):
        if ev.phase == "train" and ev.iteration == 5:
            raise RuntimeError("simulated crash")

    cut = tmp_path / "cut.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, cut, progress=stop_after_five)
    assert read_run(cut).runs[0].alignment["iteration"] == [0, 1, 2, 3]   # as of the checkpoint at iteration 4
    train(cfg, cut, resume=True)
    a, b = read_run(whole).runs[0].alignment, read_run(cut).runs[0].alignment
    assert a["iteration"] == list(range(6)) and a == b
