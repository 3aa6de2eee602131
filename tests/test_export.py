"""Export: NIR round trip, snntorch / norse re-simulation with 0 spike mismatches, the netx layout, the rate
weights schema, and refusals that leave no file behind."""

from __future__ import annotations

import math
import os

import h5py
import nir
import numpy as np
import pytest
import torch

from neuroinit.cells import LIFRNN, RateRNN
from neuroinit.emulate.integer import deploy, run_cell
from neuroinit.init import hardware_init
from neuroinit.io.atomic import atomic_write_path
from neuroinit.io.netx import read_netx, write_netx
from neuroinit.io.nir import (
    NIR_DT,
    conformance_path,
    euler_tau,
    graph_cell,
    nir_equal,
    read_conformance,
    write_nir,
    write_weights_h5,
)
from neuroinit.io.verify import verify_nir
from neuroinit.learning import OnlineEprop, attach_chip_constraints, make_trace_quantiser
from neuroinit.profiles import load_profile, profile_from_dict, profile_to_dict
from neuroinit.tasks import make_task


@pytest.fixture(scope="module")
def trained():
    """A recurrent LIF network on loihi-like, trained with online e-prop (chip-precision traces, weights
    projected onto the 9-bit learning grid) for two iterations on a coarse Romo (28 steps), and a 224-step Romo
    batch (the same task at dt_tau = 0.125) for the comparisons."""
    g = torch.Generator().manual_seed(3)
    task = make_task("romo", dt_tau=1.0)
    p, _ = hardware_init("lif", task.n_in, 32, task.n_out, 2.0, "loihi-like", generator=g)
    cell = LIFRNN(p, reset="zero", profile="loihi-like", tau_m=20.0, tau_out=20.0)
    rule = OnlineEprop(cell, generator=g, trace_quantiser=make_trace_quantiser(cell, generator=g))
    opt = torch.optim.Adam(cell.parameters(), lr=0.01)
    attach_chip_constraints(opt, cell, generator=g)
    for _ in range(2):
        opt.zero_grad()
        rule.backward(task.batch(4, generator=g), task)
        opt.step()
    assert float(cell.bias.detach().abs().max()) > 0          # trained: the bias moved away from its zero init
    long = make_task("romo", dt_tau=0.125, variant="test")
    inputs = 2.0 * long.batch(6, generator=g, dtype=torch.float64).inputs
    assert inputs.shape[0] >= 200
    return cell, inputs


def _files(d):
    return sorted(p.name for p in d.iterdir())


# ------------------------------------------------------------------------------------ NIR

def test_nir_round_trip_equals_what_we_wrote(trained, tmp_path):
    cell, inputs = trained
    ex = write_nir(tmp_path / "net.nir", cell, "loihi-like", inputs=inputs)
    assert _files(tmp_path) == ["net.conformance.h5", "net.nir"]
    back = nir.read(tmp_path / "net.nir")
    assert nir_equal(back, ex.graph)
    assert ex.exact and not ex.warnings
    # the flat graph of the brief: explicit Input, bias-free recurrent Linear in the cycle, per-neuron arrays
    types = {k: type(v).__name__ for k, v in back.nodes.items()}
    assert types == {"input": "Input", "w_in": "Affine", "lif": "LIF", "w_rec": "Linear", "w_out": "Affine",
                     "readout": "LI", "output": "Output"}
    assert ("lif", "w_rec") in back.edges and ("w_rec", "lif") in back.edges
    n = cell.n_hidden
    lif = back.nodes["lif"]
    for field in ("tau", "r", "v_leak", "v_threshold", "v_reset"):
        assert getattr(lif, field).shape == (n,)
    assert np.all(lif.v_leak == 0) and np.all(lif.v_reset == 0)
    # the importers' Euler step reproduces alpha exactly, with unit input scaling
    alpha = float(cell.alpha)
    assert np.all(1.0 - NIR_DT / lif.tau == alpha)
    assert np.allclose(lif.r * NIR_DT / lif.tau, 1.0, rtol=1e-15)
    assert np.all(1.0 - NIR_DT / back.nodes["readout"].tau == float(cell.kappa))
    # integer codes (int8) and their scale in metadata; the float weights are codes * scale
    dep = deploy(cell)
    for name in ("w_in", "w_rec", "w_out"):
        meta = back.nodes[name].metadata
        assert meta["codes"].dtype == np.int8 and meta["bits"] == 8 and meta["sign"] == "twos-complement"
        assert meta["exponent"] == dep.grids[name].exponent and meta["scale"] == 2.0 ** meta["exponent"]
        assert np.array_equal(meta["codes"] * meta["scale"], back.nodes[name].weight)
    meta = back.metadata
    assert meta["profile"] == "loihi-like" and "[weights]" in meta["profile_toml"]
    assert meta["dt"] == NIR_DT and meta["reset"] == "zero" and meta["format"] == "neuroinit-nir"
    # conformance vectors: the input and neuroinit's float spikes/outputs
    x, z, y = read_conformance(conformance_path(tmp_path / "net.nir"))
    theta = float(lif.v_threshold[0])
    assert np.all(lif.v_threshold == theta) and 0 < theta - float(cell.v_th) <= 2.0 ** -15
    z_ref, y_ref, _ = run_cell(graph_cell(dep.cell, theta), inputs)
    assert torch.equal(x, inputs) and torch.equal(z, z_ref) and torch.equal(y, y_ref)
    assert torch.equal(z, run_cell(dep.cell, inputs)[0])    # the tiny shift changes no spike here


def test_euler_tau_hits_alpha_exactly():
    for alpha in (math.exp(-1 / 20), math.exp(-0.1), 0.5, 0.0, float(np.float32(math.exp(-1 / 3)))):
        assert 1.0 - NIR_DT / euler_tau(alpha) == alpha


def test_snntorch_and_norse_reproduce_trained_network_spike_for_spike(trained, tmp_path):
    cell, inputs = trained
    write_nir(tmp_path / "net.nir", cell, "loihi-like", inputs=inputs)
    rep = verify_nir(tmp_path / "net.nir")
    assert rep.steps >= 200 and rep.spikes_float > 200          # a meaningful comparison
    assert rep.mismatches["snntorch"] == 0
    assert rep.mismatches["norse"] == 0
    assert rep.mismatches["conformance_file"] == 0 and rep.ok
    assert rep.output_max_abs_diff["snntorch"] < 1e-12 and rep.output_max_abs_diff["norse"] < 1e-12
    # the integer emulation of loihi-like is reported (truncating decays make it differ from float)
    assert rep.integer["arithmetic"] == "lava" and rep.integer["chip_steps"] == rep.steps + 1
    assert 0 <= rep.mismatches["integer"] < rep.steps * rep.trials * rep.neurons


def test_verify_on_the_ideal_profile_has_zero_integer_mismatches(tmp_path):
    g = torch.Generator().manual_seed(0)
    p, _ = hardware_init("lif", 3, 24, 2, 1.5, "ideal", generator=g)
    cell = LIFRNN(p._replace(bias=0.05 * torch.randn(24, generator=g)), reset="zero", profile="ideal")
    write_nir(tmp_path / "ideal.nir", cell, inputs=_spike_inputs(120, 3, 3))
    rep = verify_nir(tmp_path / "ideal.nir")
    assert rep.spikes_float > 200 and set(rep.by_input) == {"conformance", "raster01"}
    assert {"conformance_file", "snntorch", "norse", "integer"} <= set(rep.mismatches)
    assert all(n == 0 for n in rep.mismatches.values())
    assert "codes" not in nir.read(tmp_path / "ideal.nir").nodes["w_rec"].metadata


def test_weights_at_the_most_negative_code_round_trip(tmp_path):
    """A weight at code_min = -128 has |w| > code_max * scale: re-choosing the grid from the weights would pick
    a coarser exponent; the file's own grids must be used (regression)."""
    cell = _lif(2, 16, profile="loihi-like", gain=1.5)
    grid = cell.grids["w_rec"]
    with torch.no_grad():
        cell.w_rec[0, 1] = grid.code_min * grid.scale
    write_nir(tmp_path / "neg.nir", cell, inputs=_spike_inputs(120, 3, 2))
    rep = verify_nir(tmp_path / "neg.nir", simulators=("snntorch",))
    assert rep.mismatches == {"conformance_file": 0, "snntorch": 0} and rep.spikes_float > 50


def _spike_inputs(steps, trials, n_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, trials, n_in, generator=g, dtype=torch.float64) < 0.3).double()


def test_subtractive_reset_exports_with_a_warning_and_refuses_verify(tmp_path):
    g = torch.Generator().manual_seed(0)
    p, _ = hardware_init("lif", 2, 8, 2, 1.0, "loihi-like", generator=g)
    cell = LIFRNN(p, reset="subtract", profile="loihi-like")
    ex = write_nir(tmp_path / "sub.nir", cell)
    assert not ex.exact and "subtraction" in ex.warnings[0]
    back = nir.read(tmp_path / "sub.nir")
    assert back.metadata["exact"] == np.False_ and "subtraction" in back.metadata["warnings"]
    with pytest.raises(ValueError, match="reset='subtract' cannot be expressed in NIR"):
        verify_nir(tmp_path / "sub.nir")


# ------------------------------------------------------------------------------------ netx

def test_netx_file_has_the_documented_layout(trained, tmp_path):
    cell, _ = trained
    ex = write_netx(tmp_path / "net.h5", cell, "loihi-like")
    d = read_netx(tmp_path / "net.h5")
    assert set(d) == {"layer", "attrs"} and set(d["layer"]) == {"0", "1"}
    rec, out = d["layer"]["0"], d["layer"]["1"]
    assert rec["type"] == "dense_rec" and out["type"] == "dense"
    assert set(rec) == {"type", "shape", "inFeatures", "outFeatures", "weight", "weight_rec", "bias", "neuron"}
    assert set(rec["neuron"]) == {"type", "iDecay", "vDecay", "vThMant", "refDelay", "gradedSpike"}
    n = cell.n_hidden
    assert rec["shape"].tolist() == [n] and rec["inFeatures"] == cell.n_in and rec["outFeatures"] == n
    assert rec["weight"].shape == (n, cell.n_in) and rec["weight_rec"].shape == (n, n)
    dep = deploy(cell, input_frac_bits=ex.input_frac_bits, bias_exp=6)
    for w in (rec["weight"], rec["weight_rec"], out["weight"]):
        assert w.dtype == np.float64 and np.array_equal(w, np.round(w)) and w.min() >= -256 and w.max() <= 254
    assert np.array_equal(rec["weight"], 2 * dep.codes["w_in"])
    assert np.array_equal(rec["weight_rec"], (2 * dep.codes["w_rec"]) << dep.exp_rec)
    assert np.array_equal(rec["bias"], dep.bias)
    neuron = rec["neuron"]
    assert neuron["type"] == "CUBA" and neuron["iDecay"] == 4096 and neuron["refDelay"] == 1
    assert neuron["vDecay"] == dep.decay == round(4096 * (1 - float(cell.alpha)))
    assert neuron["vThMant"] == dep.threshold == round(float(cell.v_th) / dep.unit)
    assert out["neuron"]["vThMant"] == 2 ** 17 - 1
    attrs = d["attrs"]
    assert attrs["profile"] == "loihi-like" and attrs["input_scale"] == 2.0 ** ex.input_frac_bits
    assert dep.exp_in == 0 and attrs["a_in_unit"] == dep.unit


def test_netx_refuses_non_loihi_profiles(tmp_path):
    g = torch.Generator().manual_seed(0)
    p, _ = hardware_init("lif", 2, 8, 2, 1.0, "ideal", generator=g)
    with pytest.raises(ValueError, match="netx is lava-dl's format for Loihi"):
        write_netx(tmp_path / "x.h5", LIFRNN(p, reset="zero"), "ideal")
    assert _files(tmp_path) == []


# ------------------------------------------------------------------------------------ rate networks

def test_rate_networks_refuse_nir_and_export_the_weights_schema(tmp_path):
    g = torch.Generator().manual_seed(0)
    p, _ = hardware_init("rate", 2, 16, 2, 1.0, "xylo-like", generator=g)
    cell = RateRNN(p, profile="xylo-like")
    with pytest.raises(ValueError, match="NIR has no rate nonlinearity"):
        write_nir(tmp_path / "rate.nir", cell)
    write_weights_h5(tmp_path / "rate.h5", cell)
    assert _files(tmp_path) == ["rate.h5"]
    with h5py.File(tmp_path / "rate.h5") as f:
        assert f.attrs["format"] == "neuroinit-weights" and f.attrs["model"] == "rate"
        assert set(f) == {"w_in", "w_rec", "bias", "w_out", "b_out", "codes"}
        c = f["codes/w_rec"]
        assert c.dtype == np.int8
        assert np.array_equal(c[()] * c.attrs["scale"], f["w_rec"][()])


# ------------------------------------------------------------------------------------ refusals

def _lif(n_in, n, profile="ideal", gain=1.0):
    g = torch.Generator().manual_seed(0)
    p, _ = hardware_init("lif", n_in, n, 2, gain, "ideal", generator=g)
    return LIFRNN(p, reset="zero", profile=profile)


def _small_loihi():
    """loihi-like with small limits (still Lava arithmetic): 64 neurons, fan-in 40."""
    data = profile_to_dict(load_profile("loihi-like"))
    data["limits"].update(max_neurons=64, max_fan_in=40)
    return profile_from_dict(data, where="<small loihi>")


@pytest.mark.parametrize("writer", ["nir", "netx", "h5"])
def test_refusals_leave_no_file_behind(tmp_path, writer):
    write = {"nir": write_nir, "netx": write_netx, "h5": write_weights_h5}[writer]
    small = _small_loihi()
    sat = _lif(2, 8, profile="loihi-like")
    with torch.no_grad():
        sat.w_rec.mul_(1e4)
    cases = ((_lif(2, 80), small, "80 hidden neurons exceed the limit 64"),
             (_lif(2, 48), small, r"50 fan-in \(inputs \+ recurrent\) exceed the limit 40"),
             (sat, "loihi-like", "weights of w_rec saturate"))
    for cell, profile, msg in cases:
        with pytest.raises(ValueError, match=msg):
            write(tmp_path / "out.file", cell, profile)
        assert _files(tmp_path) == []


def test_an_existing_export_survives_a_failed_rewrite(tmp_path, trained):
    cell, _ = trained
    target = tmp_path / "net.nir"
    write_nir(target, cell, conformance=False)
    before = target.read_bytes()
    sat = _lif(2, 8, profile="loihi-like")
    with torch.no_grad():
        sat.w_rec.mul_(1e4)
    with pytest.raises(ValueError, match="saturate"):
        write_nir(target, sat)
    assert target.read_bytes() == before and _files(tmp_path) == ["net.nir"]


def test_atomic_write_path_removes_the_temp_file_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_write_path(tmp_path / "x.h5") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert _files(tmp_path) == []
    with atomic_write_path(tmp_path / "x.h5") as tmp:
        tmp.write_bytes(b"whole")
    assert (tmp_path / "x.h5").read_bytes() == b"whole" and _files(tmp_path) == ["x.h5"]


# ------------------------------------------------------------------------------------ CLI

def _run_file(path, cell, *, final=True, settings=None):
    rf = pytest.importorskip("neuroinit.io.runfile")
    ws = rf.weights_from_cell(cell)
    run = rf.RunFile(path=str(path), format_version=rf.FORMAT_VERSION, status="complete" if final else "running",
                     message="", seed=0, model=cell.model, config={"task": "romo", "model": cell.model},
                     settings=settings or {"dt_ms": 1.0, "tau_ms": 8.0, "input_scale": 2.0},
                     profile_text=cell.profile.text, cell_config=cell.config(), init_report={}, versions={},
                     weights={"initial": ws, **({"final": ws} if final else {})}, runs=[])
    rf.write_run(path, run)
    return path


def test_cli_export_nir_verify_reports_zero_mismatches_and_accuracy(trained, tmp_path):
    import json

    from click.testing import CliRunner

    from neuroinit.cli import main

    cell, _ = trained
    run = _run_file(tmp_path / "run.h5", cell)
    out = tmp_path / "net.nir"
    res = CliRunner().invoke(main, ["export", str(run), "--profile", "loihi-like", "--format", "nir", "--out",
                                    str(out), "--verify", "--trials", "4", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    v = rep["verify"]
    assert v["steps"] >= 200 and v["spikes_float"] > 200 and v["ok"]
    assert v["mismatches"]["snntorch"] == 0 and v["mismatches"]["norse"] == 0
    acc = rep["accuracy"]
    assert acc["arithmetic"] == "lava" and 0 <= acc["float_accuracy"] <= 1 and 0 <= acc["chip_accuracy"] <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.conformance.h5", "net.nir", "run.h5"]
    res = CliRunner().invoke(main, ["export", str(run), "--format", "netx", "--out", str(tmp_path / "n.h5")])
    assert res.exit_code == 0, res.output
    assert "task accuracy: float" in res.output


def test_cli_export_refusals_are_one_line_and_write_nothing(trained, tmp_path):
    from click.testing import CliRunner

    from neuroinit.cli import main

    cell, _ = trained
    no_final = _run_file(tmp_path / "nofinal.h5", cell, final=False)
    g = torch.Generator().manual_seed(0)
    p, _ = hardware_init("lif", 1, 8, 2, 1.0, "loihi-like", generator=g)
    sub = _run_file(tmp_path / "sub.h5", LIFRNN(p, reset="subtract", profile="loihi-like"))
    out = tmp_path / "x.out"
    cases = [
        ([str(no_final), "--format", "nir"], "no weights 'final'"),
        ([str(sub), "--format", "nir", "--verify"], "reset='subtract' cannot be expressed in NIR"),
        ([str(run_missing := tmp_path / "missing.h5"), "--format", "nir"], "no such run file"),
        ([str(sub), "--format", "netx", "--profile", "xylo-like"], "netx is lava-dl's format for Loihi"),
        ([str(sub), "--format", "nir", "--profile", "reckon-like"], None),  # fits: a control case
    ]
    for args, msg in cases:
        res = CliRunner().invoke(main, ["export", *args, "--out", str(out)])
        if msg is None:
            assert res.exit_code == 0, res.output
            out.unlink()
            for extra in tmp_path.glob("x.conformance.h5"):
                extra.unlink()
            continue
        assert res.exit_code == 1, res.output
        assert msg in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert not out.exists() and not run_missing.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["nofinal.h5", "sub.h5"]


def test_atomic_write_gives_the_finished_file_the_usual_permissions(tmp_path):
    with atomic_write_path(tmp_path / "y.h5") as tmp:
        tmp.write_bytes(b"data")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "y.h5").stat().st_mode & 0o777 == 0o666 & ~mask


def test_export_run_returns_the_report_the_cli_prints(trained, tmp_path):
    import json

    from click.testing import CliRunner

    from neuroinit.cli import main
    from neuroinit.io.export import export_run
    from neuroinit.io.runfile import load_cell

    cell, _ = trained
    run = _run_file(tmp_path / "run.h5", cell)
    stages = []
    rep = export_run(str(run), "netx", str(tmp_path / "a.h5"), profile="loihi-like", trials=3,
                     progress=stages.append)
    assert stages == ["load", "write", "accuracy"] and rep.ok and rep.verify is None
    assert rep.model == "lif" and rep.accuracy["arithmetic"] == "lava"
    res = CliRunner().invoke(main, ["export", str(run), "--profile", "loihi-like", "--format", "netx", "--out",
                                    str(tmp_path / "b.h5"), "--trials", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {**json.loads(json.dumps(rep.to_dict())), "out": str(tmp_path / "b.h5")}
    assert load_cell(str(run), "final").grids == cell.grids      # the grids export uses: the run file's
    with pytest.raises(ValueError, match="Invalid format 'onnx'"):
        export_run(str(run), "onnx", str(tmp_path / "c.onnx"))
    with pytest.raises(ValueError, match="--verify checks"):
        export_run(str(run), "h5", str(tmp_path / "c.h5"), verify=True)
    assert not (tmp_path / "c.onnx").exists() and not (tmp_path / "c.h5").exists()
