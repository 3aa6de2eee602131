"""Issue 12 options: the number k of flossed exponents (default "auto" = N // 8) from spec, train CLI and
`neuroinit lyapunov` to the flossing loss and the run file; inter-flossing as a schedule; run ids of runs made
before these options existed; the input/readout initialisation (Schuessler or PyTorch)."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neuroinit.cli import main
from neuroinit.dynamics import flossing
from neuroinit.dynamics.flossing import AUTO_K_FRACTION, resolve_floss_k
from neuroinit.experiments import sweep as sw
from neuroinit.experiments.train import TrainConfig, train
from neuroinit.init import IO_INITS, float_init, hardware_init
from neuroinit.io.runfile import read_run

TINY = {"hidden": 16, "batch": 8, "eval_batch": 16, "lyapunov": False, "iters": 4, "log_every": 1}


# ------------------------------------------------------------------------------------------ k

def test_auto_k_is_n_over_8_at_least_1_and_bad_k_is_refused():
    assert AUTO_K_FRACTION == 8
    assert resolve_floss_k("auto", 256) == 32 and resolve_floss_k("auto", 64) == 8
    assert resolve_floss_k("auto", 7) == 1 and resolve_floss_k(5, 16) == 5
    for bad in (0, 17, "all", 2.0, True):
        with pytest.raises(ValueError, match="Invalid k .*'auto'"):
            resolve_floss_k(bad, 16)
    assert TrainConfig(hidden=256).floss_k == 32            # stored resolved
    assert TrainConfig(hidden=64, floss_k=3).floss_k == 3
    with pytest.raises(ValueError, match="Invalid floss_k 99"):
        TrainConfig(hidden=16, floss_k=99)


@pytest.fixture
def seen_k(monkeypatch):
    """Records the k of every flossing call as it reaches the loss (the width of the exponent vector)."""
    ks: list[int] = []
    real = flossing.lyapunov_spectrum

    def spy(cell, inputs, **kw):
        if kw.get("differentiable"):
            ks.append(kw["k"])
        return real(cell, inputs, **kw)

    monkeypatch.setattr(flossing, "lyapunov_spectrum", spy)
    return ks


def test_k_from_config_reaches_the_loss_and_the_run_file(tmp_path, seen_k):
    res = train(TrainConfig(floss_iters=2, floss_k=3, **TINY), tmp_path / "r.h5")
    rf = read_run(res.out_path)
    assert seen_k == [3, 3]
    assert rf.config["floss_k"] == 3 and rf.floss["exponents"].shape == (2, 3)
    seen_k.clear()
    rf = read_run(train(TrainConfig(floss_iters=1, **TINY), tmp_path / "auto.h5").out_path)
    assert seen_k == [2] and rf.config["floss_k"] == 2 and rf.floss["exponents"].shape == (1, 2)  # 16 // 8


def test_k_from_spec_reaches_the_loss(tmp_path, seen_k):
    text = ('[base]\nhidden = 16\nbatch = 8\niters = 3\nlyapunov = false\neval_batch = 16\n'
            '[flossing]\niters = 2\nk = 5\n[grid]\nrule = "eprop+flossing"\n')
    p = tmp_path / "k.toml"
    p.write_text(text)
    spec = sw.load_spec(p)
    assert [r.config.floss_k for r in spec.runs] == [5]
    sw.run_sweep(spec, tmp_path / "sweep", workers=0)
    rf = read_run(tmp_path / "sweep" / spec.runs[0].file)
    assert seen_k == [5, 5] and rf.config["floss_k"] == 5 and rf.floss["exponents"].shape == (2, 5)
    p.write_text(text.replace("k = 5\n", ""))   # the default k = "auto": 16 // 8 = 2
    assert [r.config.floss_k for r in sw.load_spec(p).runs] == [2]


def test_k_from_the_train_cli_reaches_the_run_file(tmp_path, seen_k):
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(main, ["train", "--hidden", "16", "--batch", "8", "--iters", "2", "--eval-batch", "16",
                                  "--no-lyapunov", "--floss-iters", "2", "--floss-k", "4", "--out", str(out),
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert seen_k == [4, 4] and read_run(out).config["floss_k"] == 4
    bad = CliRunner().invoke(main, ["train", "--hidden", "16", "--floss-k", "many", "--out", str(tmp_path / "x.h5")])
    assert bad.exit_code != 0 and "--floss-k" in bad.output and "auto" in bad.output


def test_k_window_and_warmup_from_the_lyapunov_cli(seen_k):
    args = ["lyapunov", "--model", "rate", "--hidden", "16", "--gain", "0.5", "--steps", "20", "--warmup", "5",
            "--floss-iters", "2", "--floss-steps", "12", "--floss-warmup", "3", "--json"]
    r = CliRunner().invoke(main, args + ["--floss-k", "3"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["floss"]["k"] == 3 and [len(e) for e in out["floss"]["exponents"]] == [3, 3]
    assert (out["floss"]["steps"], out["floss"]["warmup"]) == (12, 3)
    r = CliRunner().invoke(main, args)                       # default auto: 16 // 8
    assert json.loads(r.stdout)["floss"]["k"] == 2 and seen_k == [3, 3, 2, 2]
    bad = CliRunner().invoke(main, args + ["--floss-k", "17"])
    assert bad.exit_code != 0 and "Invalid --floss-k 17" in bad.output


# ------------------------------------------------------------------------------------------ inter-flossing

def test_inter_flossing_runs_on_schedule_and_is_stored(tmp_path, seen_k):
    cfg = TrainConfig(floss_inter_every=2, floss_inter_iters=3, floss_k=1, **{**TINY, "iters": 5})
    rf = read_run(train(cfg, tmp_path / "i.h5").out_path)
    assert seen_k == [1] * 6                                   # episodes before iterations 2 and 4, 3 iterations each
    assert rf.floss["inter_0_iteration"].tolist() == [2, 4] and rf.floss["inter_0_losses"].shape == (2, 3)
    assert "losses" not in rf.floss and "floss" not in rf.weights   # no pre-flossing asked for
    assert sw.rule_label(rf.config) == "eprop+flossing"
    plain = read_run(train(TrainConfig(**{**TINY, "iters": 5}), tmp_path / "p.h5").out_path)
    assert plain.runs[0].loss_per_iteration[:2] == rf.runs[0].loss_per_iteration[:2]   # same until the 1st episode
    assert plain.runs[0].loss_per_iteration[2] != rf.runs[0].loss_per_iteration[2]
    with pytest.raises(ValueError, match="Invalid inter-flossing"):
        TrainConfig(floss_inter_every=2, **TINY)


def test_inter_flossing_resumes_bit_identically(tmp_path):
    cfg = TrainConfig(floss_inter_every=2, floss_inter_iters=2, floss_k=2, checkpoint_every=3,
                      **{**TINY, "iters": 8})
    ref = read_run(train(cfg, tmp_path / "ref.h5").out_path)

    def interrupt(ev):
        if ev.phase == "train" and ev.iteration == 5:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "int.h5"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=interrupt)
    assert read_run(out).runs[0].checkpoint.iteration == 5
    got = read_run(train(cfg, out, resume=True).out_path)
    assert got.runs[0].loss_per_iteration == ref.runs[0].loss_per_iteration
    for n, a in ref.weights["final"].params.items():
        assert np.array_equal(a, got.weights["final"].params[n]), n
    assert np.array_equal(got.floss["inter_0_iteration"], ref.floss["inter_0_iteration"])
    assert np.array_equal(got.floss["inter_0_losses"], ref.floss["inter_0_losses"])


def test_inter_flossing_from_spec_and_cli(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('[base]\nhidden = 16\n[flossing]\niters = 0\ninter_every = 50\ninter_iters = 5\n'
                 '[grid]\nrule = ["eprop", "eprop+flossing"]\n')
    runs = {r.rule: r.config for r in sw.load_spec(p).runs}
    assert (runs["eprop+flossing"].floss_iters, runs["eprop+flossing"].floss_inter_every,
            runs["eprop+flossing"].floss_inter_iters) == (0, 50, 5)
    assert runs["eprop"].floss_inter_every == 0
    p.write_text('[base]\nhidden = 16\n[flossing]\niters = 0\n[grid]\nrule = "eprop+flossing"\n')
    with pytest.raises(sw.SpecError, match="would not floss"):
        sw.load_spec(p)
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(main, ["train", "--hidden", "16", "--batch", "8", "--iters", "3", "--eval-batch", "16",
                                  "--no-lyapunov", "--floss-inter-every", "2", "--floss-inter-iters", "1",
                                  "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rf = read_run(out)
    assert (rf.config["floss_inter_every"], rf.config["floss_inter_iters"]) == (2, 1)
    assert rf.floss["inter_0_iteration"].tolist() == [2]


# ------------------------------------------------------------------------------------------ run ids

# ids computed by commit 6cbe674 (before floss_k = "auto", inter-flossing and io_init existed) for configs of the
# N = 256 evidence specs (examples/n256) and the quick spec: they must not change.
_OLD_IDS = [
    ("eb212a4e662fb78b", {"rule": "eprop", "gain": 0.0, "hidden": 256, "iters": 2000, "lr": 5.859375e-05, "seed": 0}),
    ("95740a4e607f65e1", {"rule": "bptt", "gain": 3.0, "hidden": 256, "iters": 2000, "lr": 0.0005859375, "seed": 2}),
    ("e0a7a43e1c582564", {"rule": "eprop", "gain": 0.0, "hidden": 256, "iters": 2000, "lr": 5.859375e-05, "seed": 0,
                          "floss_iters": 100, "floss_k": 32}),
    ("ef5cd15244eb7636", {"rule": "eprop", "gain": 0.5, "hidden": 256, "iters": 2000, "lr": 0.0001953125, "seed": 0,
                          "floss_iters": 100, "floss_k": 1}),
    ("3af6343604d5800a", {"model": "lif", "rule": "eprop", "gain": 1.0, "hidden": 256, "iters": 1000,
                          "lr": 0.0005859375, "seed": 2, "tau_m_ms": 20.0}),
    ("be464f334cfaec4f", {"model": "lif", "rule": "eprop", "gain": 2.0, "hidden": 64, "batch": 16, "iters": 1000,
                          "lr": 0.00234375, "seed": 1, "dt_ms": 10.0, "eval_batch": 128, "lyapunov_k": 4}),
]


@pytest.mark.parametrize("rid, fields", _OLD_IDS)
def test_run_ids_of_old_runs_do_not_change(rid, fields):
    config = TrainConfig(**{"batch": 32, **fields})
    assert sw.run_id(config) == rid
    # the dict an old run file stores (no added fields, floss_k 1 unless set) has the same id and compares equal
    old = {k: v for k, v in config.to_dict().items() if k not in sw.ADDED_FIELDS}
    old["floss_k"] = fields.get("floss_k", 1)
    assert sw.run_id(old) == rid and sw.comparable_config(old) == sw.comparable_config(config)
    assert sw.condition_key(old) == sw.condition_key(config)


def test_new_settings_change_the_id():
    base = TrainConfig(hidden=256, floss_iters=100)
    assert base.floss_k == 32 and sw.run_id(base) == sw.run_id(TrainConfig(hidden=256, floss_iters=100, floss_k=32))
    assert sw.run_id(base) != sw.run_id(TrainConfig(hidden=256, floss_iters=100, floss_k=1))
    for kw in ({"io_init": "pytorch"}, {"floss_inter_every": 10, "floss_inter_iters": 2}):
        assert sw.run_id(TrainConfig(hidden=256, **kw)) != sw.run_id(TrainConfig(hidden=256))
    assert set(sw.ADDED_FIELDS) <= set(TrainConfig.__dataclass_fields__)


def test_a_file_from_before_the_new_fields_is_complete_and_resumable(tmp_path):
    """A run file whose stored config lacks the added fields and holds floss_k = 1 (as 6cbe674 wrote it) is the
    planned run: run_state says complete and train(resume=True) accepts it."""
    import h5py

    cfg = TrainConfig(**TINY)
    out = tmp_path / "old.h5"
    train(cfg, out)
    old = {k: v for k, v in cfg.to_dict().items() if k not in sw.ADDED_FIELDS}
    old["floss_k"] = 1
    with h5py.File(out, "r+") as f:
        del f["config"]
        f.create_dataset("config", data=json.dumps(old), dtype=h5py.string_dtype("utf-8"))
    assert read_run(out).config == old
    assert sw.run_state(out, cfg) == ("complete", "")
    assert train(cfg, out, resume=True).status == "complete"


# ------------------------------------------------------------------------------------------ io_init

def test_io_init_pytorch_draws_nn_linear_scales():
    n_in, n, n_out = 3, 400, 2
    g = torch.Generator().manual_seed(0)
    p = float_init(n_in, n, n_out, 1.0, generator=g, dtype=torch.float64, io_init="pytorch")
    s = float_init(n_in, n, n_out, 1.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert IO_INITS == ("schuessler", "pytorch")
    assert torch.equal(p.w_rec, s.w_rec)                   # same recurrent draw for the same seed
    # U(-b, b): |w| <= b, std = b / sqrt(3), b = 1 / sqrt(fan_in)
    for w, fan_in in ((p.w_in, n_in), (p.w_out, n)):
        b = 1 / math.sqrt(fan_in)
        assert float(w.abs().max()) <= b and float(w.abs().max()) > 0.9 * b
        assert abs(float(w.std()) / (b / math.sqrt(3)) - 1) < 0.15
    # Schuessler: columns of W_in and rows of W_out have norm sqrt(N) and sqrt(N) / N
    assert torch.allclose(s.w_in.norm(dim=0), torch.full((n_in,), math.sqrt(n), dtype=torch.float64))
    assert torch.allclose(s.w_out.norm(dim=1), torch.full((n_out,), math.sqrt(n) / n, dtype=torch.float64))
    # readout entries: O(1/sqrt N) vs O(1/N)
    assert float(p.w_out.std()) / float(s.w_out.std()) > 0.5 * math.sqrt(n / 3)
    assert torch.equal(p.bias, torch.zeros(n, dtype=torch.float64))
    with pytest.raises(ValueError, match="Invalid io_init 'xavier'"):
        hardware_init("rate", n_in, 8, n_out, 1.0, generator=g, io_init="xavier")


def test_io_init_in_config_cli_and_run_file(tmp_path):
    with pytest.raises(ValueError, match="Invalid io_init"):
        TrainConfig(io_init="glorot")
    out = tmp_path / "p.h5"
    r = CliRunner().invoke(main, ["train", "--hidden", "16", "--batch", "8", "--iters", "2", "--eval-batch", "16",
                                  "--no-lyapunov", "--io-init", "pytorch", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rf = read_run(out)
    assert rf.config["io_init"] == "pytorch"
    w_out = rf.weights["initial"].params["w_out"]
    assert np.abs(w_out).max() <= 1 / math.sqrt(16) and np.abs(w_out).max() > 0.1   # Schuessler's: ~1/16 x N(0,1)
