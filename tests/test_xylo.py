"""Xylo: the profile-stated neuron arithmetic against SynSense's bit-accurate simulator xylosim, the Xylo
export's limit checks, and the refusal of arithmetic the emulator does not know."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from neuroinit.cells import LIFRNN
from neuroinit.emulate.integer import chip_decay, deploy, emulate, spike_counts
from neuroinit.init import hardware_init
from neuroinit.io.xylo import read_xylo, verify_xylo, write_xylo, xylo_spec
from neuroinit.profiles import ProfileError, load_profile, profile_from_dict, profile_to_dict


def _cell(*, n_in=4, n=16, n_out=2, gain=1.5, seed=0, bias=0.05, profile="xylo-like", reset="subtract",
          **kw) -> LIFRNN:
    g = torch.Generator().manual_seed(seed)
    p, _ = hardware_init("lif", n_in, n, n_out, gain, profile, generator=g, out_of_range="clamp")
    p = p._replace(bias=bias * torch.randn(n, generator=g))
    return LIFRNN(p, reset=reset, profile=profile, **kw)


def _random_chip(seed: int, *, n_in=6, n=20, n_out=3, w_scale=127, shift_in=0, shift_rec=0, density=0.5):
    """A xylo-like deployment with random integer codes (weights, decays, threshold, biases): the arithmetic,
    not a trained network, is under test."""
    rng = np.random.default_rng(seed)
    dep = deploy(_cell(n_in=n_in, n=n, n_out=n_out, gain=0.5, seed=seed))
    codes = lambda shape: (rng.integers(-w_scale, w_scale + 1, shape) * (rng.random(shape) < density))
    w_rec = codes((n, n))
    np.fill_diagonal(w_rec, 0)
    ro = dict(dep.readout, w_out=codes((n_out, n)), decay=int(rng.integers(0, 8)), syn_decay=int(rng.integers(1, 5)),
              bias=rng.integers(-50, 50, n_out), threshold=int(rng.integers(200, 3000)))
    return dataclasses.replace(
        dep, w_in=codes((n, n_in)), w_rec=w_rec, exp_in=shift_in, exp_rec=shift_rec,
        threshold=int(rng.integers(20, 2000)), decay=int(rng.integers(0, 10)), syn_decay=int(rng.integers(1, 8)),
        bias=rng.integers(-100, 100, n), readout=ro)


# ------------------------------------------------------------------------------------ rules, by hand

def test_xylo_rules_by_hand():
    dep = deploy(_cell())
    x = np.array([3, 15, 16, -1, -3, 0, 1000, -1000])
    # xylosim decay(): v >> dash, and +-1 when that is 0 (a small positive state still decays)
    assert chip_decay(x, 4, dep).tolist() == [1, 1, 1, -1, -1, 0, 62, -63]
    assert chip_decay(x, 0, dep).tolist() == x.tolist()   # dash 0 empties the state
    # Xylo: spikes at v >= theta, min(floor(v / theta), 31) of them
    v = np.array([9, 10, 19, 20, 10 * 40])
    assert spike_counts(v, 10, ">=", 31).tolist() == [0, 1, 1, 2, 31]
    assert spike_counts(v, 10, ">", 31).tolist() == [0, 0, 1, 1, 31]
    assert spike_counts(v, 10, ">=", 1).tolist() == [0, 1, 1, 1, 1]


# ------------------------------------------------------------------------------------ against xylosim

@pytest.mark.parametrize("seed,w_scale,shift_in,shift_rec,rate_max", [
    (0, 20, 0, 0, 1),       # 0/1 raster, mostly single spikes
    (1, 127, 0, 0, 15),     # input counts up to 15: multi-spike steps
    (2, 127, 3, 1, 15),     # shifted weights: the synaptic current and membrane saturate
    (3, 127, 5, 0, 15),     # deep saturation, negative and positive
])
def test_emulator_equals_xylosim_on_random_networks(seed, w_scale, shift_in, shift_rec, rate_max):
    pytest.importorskip("xylosim")
    dep = _random_chip(seed, w_scale=w_scale, shift_in=shift_in, shift_rec=shift_rec)
    spec = xylo_spec(dep)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, rate_max + 1, (150, 3, dep.w_in.shape[1]), generator=g).double()
    x = x * (torch.rand(x.shape, generator=g) < 0.4)
    rep = verify_xylo(spec, dep, x)
    assert rep["steps"] == 150 and rep["spikes"] > 100
    assert rep["spike_mismatches"] == rep["i_mismatches"] == rep["v_mismatches"] == rep["v_out_mismatches"] == 0
    em = emulate(dep, x)
    if rate_max > 1:
        assert rep["multi_spike_entries"] > 0
    if shift_in >= 3:
        assert em.events["synaptic_sum_saturated"] > 0 and em.events["v_saturated"] > 0, "must saturate"


def test_xylosim_and_emulator_see_saturation_order():
    """Saturation after every add makes the order of adds matter: a big positive input then a negative
    recurrent input differs from their clipped sum; both simulators must agree on it."""
    pytest.importorskip("xylosim")
    dep = _random_chip(4, n_in=2, n=2, n_out=1, w_scale=127, shift_in=7, shift_rec=7, density=1.0)
    w_in = np.array([[127, 127], [127, 127]])
    w_rec = np.array([[0, -128], [-128, 0]])
    dep = dataclasses.replace(dep, w_in=w_in, w_rec=w_rec, threshold=30000, decay=1, syn_decay=1,
                              bias=np.zeros(2, np.int64))
    spec = xylo_spec(dep)
    x = torch.zeros(20, 1, 2, dtype=torch.float64)
    x[:8] = 15
    rep = verify_xylo(spec, dep, x)
    assert rep["spike_mismatches"] == rep["i_mismatches"] == rep["v_mismatches"] == 0 and rep["spikes"] > 0


# ------------------------------------------------------------------------------------ export and limits

def test_write_read_xylo_round_trip(tmp_path):
    cell = _cell(gain=1.0)
    exp = write_xylo(tmp_path / "net.h5", cell)
    spec, attrs = read_xylo(tmp_path / "net.h5")
    assert attrs["format"] == "neuroinit-xylo" and attrs["profile"] == "xylo-like" and attrs["input_cap"] == 15
    for name, value in exp.spec.items():
        assert np.array_equal(spec[name], value), name
    assert spec["weights_in"].shape == (4, 16) and spec["weights_out"].shape == (16, 2)


def test_xylo_export_refuses_each_violated_limit():
    dep = deploy(_cell())
    with pytest.raises(ValueError, match=r"weight_shift_in = 9; allowed: 0\.\.7"):
        xylo_spec(dataclasses.replace(dep, exp_in=9))
    with pytest.raises(ValueError, match=r"threshold 40000\.\.40000; allowed: 1\.\.32767"):
        xylo_spec(dataclasses.replace(dep, threshold=40000))
    with pytest.raises(ValueError, match=r"dash_syn 0\.\.0; allowed: 1\.\.15"):
        xylo_spec(dataclasses.replace(dep, syn_decay=0))
    with pytest.raises(ValueError, match=r"bias outside int16"):
        xylo_spec(dataclasses.replace(dep, bias=np.full(16, 40000)))
    with pytest.raises(ValueError, match=r"fan-in 74; allowed: <= 63"):
        xylo_spec(dataclasses.replace(dep, w_in=np.ones((70, 4), np.int64), w_rec=np.ones((70, 70), np.int64),
                                      bias=np.zeros(70, np.int64)))
    with pytest.raises(ValueError, match=r"neuron\.synapse = 'none' is not Xylo's arithmetic"):
        write_xylo("unused.h5", _cell(profile="reckon-like", n_in=2, n=8))


def test_arithmetic_follows_the_rules_not_the_name():
    from neuroinit.emulate.integer import arithmetic_of

    for name, want in (("loihi-like", "lava"), ("xylo-like", "fixed")):
        base = profile_to_dict(load_profile(name))
        base["name"] = "some-chip"
        prof = profile_from_dict(base, where="<renamed>")
        assert arithmetic_of(prof) == want
    base = profile_to_dict(load_profile("xylo-like"))
    base["name"] = "loihi-impostor"
    dep = deploy(_cell(), profile_from_dict(base, where="<renamed>"))
    assert dep.arithmetic == "fixed" and dep.spike_compare == ">=" and dep.chip_reset == "subtract"


def test_lif_chip_options_train_what_deploys():
    opts = LIFRNN.neuron_options("xylo-like", 1.0, tau_m=20.0, tau_out=4.0)
    assert opts["threshold_compare"] == ">=" and abs(np.exp(-1.0 / opts["tau_syn"]) - 0.5) < 1e-12
    assert abs(np.exp(-1.0 / opts["tau_m"]) - (1 - 2.0 ** -4)) < 1e-12   # dash_mem 4 exactly
    assert opts["max_spikes"] == 31 and opts["reset"] == "subtract" and opts["reset_leaks"] is True
    assert LIFRNN.neuron_options("loihi-like", 1.0) == {"threshold_compare": ">", "reset": "zero"}
    cell = _cell(**opts)
    dep = deploy(cell)
    assert dep.syn_decay == 1 and dep.alpha_syn_chip == 0.5 and dep.decay == 4 and dep.alpha_chip == cell.alpha
    assert not any(n.startswith(("synaptic decay realised", "decay realised", "the cell has no", "the chip emits",
                                 "the chip subtracts", "the chip spikes at")) for n in dep.notes), dep.notes
    # v >= v_th fires at the threshold itself, v > v_th does not
    from neuroinit.cells.lif import spike
    v = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    assert spike(v, 1.0, 0.3, ">=").tolist() == [0, 1, 1] and spike(v, 1.0, 0.3).tolist() == [0, 0, 1]


def test_unknown_arithmetic_is_refused(tmp_path):
    text = load_profile("xylo-like").text.replace('synapse = "current"', 'synapse = "dendritic"')
    path = tmp_path / "odd.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    msg = str(err.value)
    assert str(path) in msg and "neuron.synapse" in msg and "'dendritic'" in msg and "none, current" in msg
    assert "\n" not in msg
    base = profile_to_dict(load_profile("xylo-like"))
    base["neuron"]["max_spikes"] = 0
    with pytest.raises(ProfileError, match=r"neuron\.max_spikes.*allowed: integer 1\.\.255"):
        profile_from_dict(base, where="<test>")
    base = profile_to_dict(load_profile("xylo-like"))
    base["neuron"]["schedule"] = "dense-delay"
    with pytest.raises(ProfileError, match=r"neuron\.schedule.*dense-delay"):
        profile_from_dict(base, where="<test>")


# ------------------------------------------------------------------------------------ trained network, CLI

def test_trained_xylo_network_exports_and_matches_xylosim(tmp_path):
    """Train a tiny xylo-like network with the chip's neuron options for a few iterations, export it with
    --format xylo --verify: the file loads into xylosim and matches the emulation on a 0/1 raster and on the
    task's inputs (as Xylo's input counts)."""
    pytest.importorskip("xylosim")
    import json

    from click.testing import CliRunner

    from neuroinit.cli import main
    from neuroinit.experiments.train import TrainConfig, train

    run = tmp_path / "run.h5"
    cfg = TrainConfig(task="romo", model="lif", profile="xylo-like", chip_neuron=True, hidden=16, batch=8, iters=4,
                      lyapunov=False, eval_batch=16, checkpoint_every=1000, log_every=2, seed=0)
    train(cfg, run)
    out = tmp_path / "net.xylo.h5"
    res = CliRunner().invoke(main, ["export", str(run), "--format", "xylo", "--out", str(out), "--verify",
                                    "--trials", "4", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    for name in ("raster", "task"):
        v = rep["verify"][name]
        assert v["steps"] >= 100 and v["spikes"] > 50, (name, v)
        assert v["spike_mismatches"] == v["i_mismatches"] == v["v_mismatches"] == v["v_out_mismatches"] == 0
    assert rep["accuracy"]["arithmetic"] == "fixed" and 0 <= rep["accuracy"]["chip_accuracy"] <= 1
    spec, attrs = read_xylo(out)
    assert attrs["input_frac_bits"] == rep["input_frac_bits"] and spec["dash_syn"].min() == 1
    assert rep["profile"] == "xylo-like"
    res = CliRunner().invoke(main, ["export", str(run), "--format", "xylo", "--profile", "loihi-like", "--out",
                                    str(tmp_path / "x.h5")])
    assert res.exit_code != 0 and "neuron.synapse = 'none' is not Xylo's arithmetic" in res.output
    assert not (tmp_path / "x.h5").exists()


def test_spec_uses_rockpool_xylosim_argument_names():
    """Every key of the specification is an argument of rockpool's XyloSim.from_specification (read from
    rockpool's installed source: its Xylo package imports samna, which needs the internet, at import time)."""
    import ast
    import importlib.util
    from pathlib import Path

    spec_rp = importlib.util.find_spec("rockpool")
    if spec_rp is None:
        pytest.skip("rockpool is not installed")
    src = Path(spec_rp.submodule_search_locations[0]) / "devices" / "xylo" / "syns61201" / "xylo_sim.py"
    tree = ast.parse(src.read_text(encoding="utf-8"))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "from_specification")
    args = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    spec = xylo_spec(deploy(_cell()))
    assert set(spec) <= args, sorted(set(spec) - args)
    assert {"weights_in", "weights_rec", "weights_out", "dash_mem", "dash_syn", "threshold", "bias"} <= set(spec)
