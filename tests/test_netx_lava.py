"""The netx export run as lava-dl users run it: what the file carries for Lava (graded input bits, netx's reset
as the first-step schedule, the readout rule), the folded input scale, the loader's input encoding, and, where a
Lava environment is available (``$NEUROINIT_LAVA_PYTHON`` or lava-dl importable), 0 spike, voltage and readout
mismatches between Lava's ``Loihi2SimCfg`` fixed-point simulation and the integer emulation."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from neuroinit.cells import LIFRNN
from neuroinit.emulate.integer import deploy, emulate
from neuroinit.init import hardware_init
from neuroinit.io import lava_loader
from neuroinit.io.netx import find_lava_python, netx_reference, verify_netx, write_netx
from neuroinit.tasks import make_task


@pytest.fixture(scope="module")
def net():
    """A loihi-like LIF network with a nonzero bias and readout bias (the schedule and the readout matter), and
    a 56-step Romo batch scaled so that it drives spikes."""
    g = torch.Generator().manual_seed(5)
    task = make_task("romo", dt_tau=0.5, variant="test")
    p, _ = hardware_init("lif", task.n_in, 24, task.n_out, 2.0, "loihi-like", generator=g)
    cell = LIFRNN(p, reset="zero", profile="loihi-like", tau_m=20.0, tau_out=20.0)
    with torch.no_grad():
        cell.bias.copy_(0.2 * float(cell.v_th) * torch.rand(cell.n_hidden, generator=g, dtype=cell.bias.dtype))
        cell.b_out.copy_(torch.tensor([0.01, -0.02], dtype=cell.b_out.dtype))
    batch = task.batch(4, generator=g, dtype=torch.float64)
    inputs = 3.0 * batch.inputs
    return cell, task, type(batch)(inputs, batch.targets, batch.mask)


def test_file_carries_what_lava_needs(net, tmp_path):
    cell, _, _ = net
    ex = write_netx(tmp_path / "n.h5", cell)
    with h5py.File(tmp_path / "n.h5") as f:
        a = dict(f.attrs)
    assert a["netx_input_message_bits"] == 16 and a["netx_reset_offset"] == 1
    assert "chip step t + 2" in a["readout"] and a["input_scale"] == ex.input_scale
    kw = lava_loader.network_kwargs(tmp_path / "n.h5", 100)
    assert kw == {"net_config": str(tmp_path / "n.h5"), "input_message_bits": 16, "reset_interval": 128,
                  "reset_offset": 1}
    u = np.array([[0.3], [1.0]])
    k = lava_loader.encode_inputs(tmp_path / "n.h5", u)
    assert k.shape == (1, 2 + lava_loader.CHIP_LAG) and k.dtype == np.int32
    assert k[0].tolist() == [round(0.3 * ex.input_scale), round(ex.input_scale), 0, 0]


def test_loader_imports_without_lava_or_neuroinit():
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('l', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('lava', 'neuroinit', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code, lava_loader.__file__], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_loader_refuses_foreign_files(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.attrs["format"] = "something"
    with pytest.raises(ValueError, match="neuroinit netx export"):
        lava_loader.network_kwargs(tmp_path / "x.h5", 10)


def test_integer_inputs_fold_the_input_scale_into_the_weights(tmp_path):
    g = torch.Generator().manual_seed(2)
    p, _ = hardware_init("lif", 3, 16, 2, 1.5, "loihi-like", generator=g)
    cell = LIFRNN(p._replace(w_in=4 * p.w_in), reset="zero", profile="loihi-like", tau_m=20.0, tau_out=20.0)
    with torch.no_grad():   # the input grid stays coarse (input_scale > 1) while its codes shrink (room to fold)
        cell.w_in.div_(8)
    plain = write_netx(tmp_path / "a.h5", cell)
    folded = write_netx(tmp_path / "b.h5", cell, integer_inputs=True)
    assert plain.input_scale > 1 and folded.input_scale == 1
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb:
        wa, wb = fa["layer/0/weight"][()], fb["layer/0/weight"][()]
        assert np.array_equal(wb, wa * plain.input_scale) and np.abs(wb).max() <= 254
    spikes = (torch.rand(40, 3, 3, generator=g) < 0.3).double() * 4
    ra, rb = netx_reference(cell, spikes), netx_reference(cell, spikes, integer_inputs=True)
    assert ra["spikes"].sum() > 0
    for k in ("spikes", "v", "readout_v"):
        assert np.array_equal(ra[k], rb[k])


def test_reference_readout_is_the_emulators_readout_on_chip(net, tmp_path):
    """The on-chip readout (layer 1's integer voltage, read two chip steps later) tracks the emulator's host
    float readout to within its integer decay; layer 0 is the emulation of the file's deployment."""
    cell, _, batch = net
    ex = write_netx(tmp_path / "n.h5", cell)
    ref = netx_reference(cell, batch.inputs)
    em = emulate(deploy(cell, input_frac_bits=ex.input_frac_bits, bias_exp=6), batch.inputs)
    assert np.array_equal(ref["spikes"], em.spikes.numpy() > 0) and ref["spikes"].sum() > 50
    assert np.array_equal(ref["host_outputs"], em.outputs.numpy())
    err = np.abs(ref["outputs"] - ref["host_outputs"]).max()
    assert 0 < err < 0.05 * np.abs(ref["host_outputs"]).max()


def _run_file(path, cell):
    from neuroinit.io.runfile import FORMAT_VERSION, RunFile, weights_from_cell, write_run

    ws = weights_from_cell(cell)
    write_run(path, RunFile(path=str(path), format_version=FORMAT_VERSION, status="complete", message="", seed=0,
                            model="lif", config={"task": "romo", "model": "lif"},
                            settings={"dt_ms": 1.0, "tau_ms": 8.0, "input_scale": 2.0},
                            profile_text=cell.profile.text, cell_config=cell.config(), init_report={},
                            versions={}, weights={"initial": ws, "final": ws}, runs=[]))
    return path


def _lava_python() -> str:
    try:
        python, why = find_lava_python()
    except ValueError as e:
        pytest.skip(str(e))
    if python is None:
        pytest.skip(why)
    return python


@pytest.mark.slow
def test_lava_runs_the_file_as_is_with_zero_mismatches(net, tmp_path):
    """The documented user path (``python neuroinit/io/lava_loader.py FILE --inputs ... --out ...``, lava-dl's
    ``netx.hdf5.Network`` in ``Loihi2SimCfg`` fixed point) against the integer emulation."""
    python = _lava_python()
    cell, task, batch = net
    write_netx(tmp_path / "n.h5", cell)
    rep = verify_netx(tmp_path / "n.h5", cell, batch.inputs, task=task, batch=batch, python=python)
    assert rep["spikes_lava"] > 50
    assert rep["spike_mismatches"] == 0 and rep["v_mismatches"] == 0 and rep["readout_v_mismatches"] == 0
    assert rep["ok"] and rep["lava_accuracy"] == rep["emulation_accuracy"]


@pytest.mark.slow
def test_cli_export_verify_runs_lava(net, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from neuroinit.cli import main

    monkeypatch.setenv("NEUROINIT_LAVA_PYTHON", _lava_python())
    run = _run_file(tmp_path / "run.h5", net[0])
    res = CliRunner().invoke(main, ["export", str(run), "--format", "netx", "--out", str(tmp_path / "n.h5"),
                                    "--verify", "--trials", "2", "--json"])
    assert res.exit_code == 0, res.output
    v = json.loads(res.output)["verify"]
    assert v["trials"] == 2 and v["spike_mismatches"] == 0 and v["readout_v_mismatches"] == 0 and v["ok"]


def test_cli_export_verify_says_when_lava_is_skipped(net, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from neuroinit.cli import main
    from neuroinit.io import netx

    monkeypatch.setattr(netx, "find_lava_python", lambda: (None, "no lava here (test)"))
    run = _run_file(tmp_path / "run.h5", net[0])
    res = CliRunner().invoke(main, ["export", str(run), "--format", "netx", "--out", str(tmp_path / "n.h5"),
                                    "--verify", "--trials", "2"])
    assert res.exit_code == 0, res.output
    assert "verify in Lava skipped: no lava here (test)" in res.output and (tmp_path / "n.h5").is_file()
    res = CliRunner().invoke(main, ["export", str(run), "--format", "h5", "--out", str(tmp_path / "w.h5"),
                                    "--verify"])
    assert res.exit_code == 1 and "allowed with --format nir or netx" in res.output


def test_find_lava_python_refuses_a_missing_interpreter(monkeypatch, tmp_path):
    monkeypatch.setenv("NEUROINIT_LAVA_PYTHON", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="NEUROINIT_LAVA_PYTHON"):
        find_lava_python()


def test_a_bias_above_threshold_is_noted(net, tmp_path):
    cell, _, _ = net
    with torch.no_grad():
        hot = LIFRNN(cell.params()._replace(bias=cell.bias.detach().clone()), reset="zero", profile="loihi-like",
                     tau_m=20.0, tau_out=20.0)
        hot.bias[0] = 1.5 * float(hot.v_th)
    ex = write_netx(tmp_path / "n.h5", hot)
    assert any("spike in Lava's priming step" in n for n in ex.notes)
    assert not any("priming" in n for n in write_netx(tmp_path / "m.h5", cell).notes)
