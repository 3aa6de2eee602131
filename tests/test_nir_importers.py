"""Tie-proof NIR exports and the stock importers (issue 13, deliverables 4 and 5): snntorch, norse and rockpool
run on the exported file of a small trained network, with a 0/1 raster and the task's analog input."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import nir
import numpy as np
import pytest
import torch

from neuroinit.cells import LIFRNN
from neuroinit.emulate.integer import deploy, run_cell
from neuroinit.init import hardware_init
from neuroinit.io.importers import graph_target, leaky_readout, load_norse, load_snntorch
from neuroinit.io.nir import (
    TIE_MARGIN,
    conformance_path,
    graph_cell,
    membrane_grid,
    read_conformance,
    tie_free_raster,
    tie_free_trials,
    tie_margins,
    tie_proof_threshold,
    to_nir,
    write_nir,
)
from neuroinit.io.verify import import_norse, simulate_imported, verify_nir
from neuroinit.learning import OnlineEprop, attach_chip_constraints, make_trace_quantiser
from neuroinit.tasks import make_task


@pytest.fixture(scope="module")
def trained():
    """A 32-neuron reset-to-zero LIF on loihi-like trained for 3 online e-prop iterations on a coarse Romo with
    the bias held at 0 (membranes from rest are then sums of grid weights: the tie case), and an analog Romo
    batch (6 trials x 224 steps)."""
    g = torch.Generator().manual_seed(3)
    task = make_task("romo", dt_tau=1.0)
    p, _ = hardware_init("lif", task.n_in, 32, task.n_out, 2.0, "loihi-like", generator=g)
    cell = LIFRNN(p, reset="zero", profile="loihi-like", tau_m=20.0, tau_out=20.0)
    rule = OnlineEprop(cell, generator=g, trace_quantiser=make_trace_quantiser(cell, generator=g))
    opt = torch.optim.Adam([q for name, q in cell.named_parameters() if name != "bias"], lr=0.01)
    attach_chip_constraints(opt, cell, generator=g)
    w0 = cell.w_rec.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        rule.backward(task.batch(4, generator=g), task)
        opt.step()
    assert not torch.equal(cell.w_rec.detach(), w0) and float(cell.bias.detach().abs().max()) == 0
    long = make_task("romo", dt_tau=0.125, variant="test")
    inputs = 2.0 * long.batch(6, generator=g, dtype=torch.float64).inputs
    assert inputs.shape[0] >= 200 and not torch.all((inputs == 0) | (inputs == 1))   # analog
    return cell, inputs


def _quiet_stdout():
    return contextlib.redirect_stdout(io.StringIO())


# ------------------------------------------------------------------------------------ tie-proofing

def test_a_tie_that_flipped_norse_spikes_now_has_margin(trained, tmp_path):
    cell, _ = trained
    dep = deploy(cell)
    q = membrane_grid(dep)
    assert q == min(dep.grids["w_in"].scale, dep.grids["w_rec"].scale)
    v_th = float(dep.cell.v_th)
    theta = tie_proof_threshold(v_th, q)
    assert v_th < theta <= v_th + 2 * TIE_MARGIN * v_th and (theta - v_th) / q not in (0.0, 1.0)
    x = (torch.rand(256, 8, cell.n_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
         < 0.3).double()
    # before: the graph's threshold was v_th, reached exactly from rest, and norse's rounding flipped spikes
    _, _, v = run_cell(dep.cell, x)
    assert int((v == v_th).sum()) > 10
    old, _, _ = to_nir(cell)
    old.nodes["lif"].v_threshold = np.full(cell.n_hidden, v_th)
    z_ref, _, _ = run_cell(dep.cell, x)
    z, _ = simulate_imported(import_norse(old), x)
    assert int((z != z_ref).sum()) > 100
    # after: the same membranes are >= eps from theta, the decisions on the grid are unchanged, norse agrees
    gcell = graph_cell(dep.cell, theta)
    assert float(tie_margins(gcell, x).min()) >= TIE_MARGIN
    # the shift only decides differently on membranes in the band (v_th, theta] (rare); before a trial's first
    # band hit its spikes are the trained threshold's
    band = (v > v_th) & (v <= theta)
    assert int(band.sum()) <= 1e-4 * v.numel()
    z_new = run_cell(gcell, x)[0]
    for k in range(x.shape[1]):
        hits = torch.nonzero(band[:, k].any(-1)).flatten()
        first = int(hits[0]) if hits.numel() else x.shape[0]
        assert torch.equal(z_new[:first, k], z_ref[:first, k])
        if first == x.shape[0]:
            assert torch.equal(z_new[:, k], z_ref[:, k])
    z_ref = z_new
    new, _, _ = to_nir(cell)
    assert np.all(new.nodes["lif"].v_threshold == theta)
    z, _ = simulate_imported(import_norse(new), x)
    assert torch.equal(z, z_ref)
    z, _ = simulate_imported(import_norse(new, dtype=torch.float32), x, dtype=torch.float32)
    assert torch.equal(z, z_ref)


def test_threshold_stays_in_its_grid_interval():
    q = 2.0 ** -6
    for v_th in (1.0, 0.75, 1.0 + q / 2, 1.0 + 1e-9, 1.0 + q - 1e-9):
        theta = tie_proof_threshold(v_th, q)
        g0 = np.floor(v_th / q) * q
        eps = min(2 * TIE_MARGIN * v_th, q / 4)
        assert g0 < theta < g0 + q and min(theta - g0, g0 + q - theta) >= eps * (1 - 1e-9)
        grid = np.arange(-200, 200) * q                            # same decision for every grid value
        assert np.array_equal(grid > theta, grid > v_th)
    assert tie_proof_threshold(0.8, None) == 0.8
    for v_th in (1.0, 0.75, 1.0 + q / 2, 1.0 + 1e-9):                # a cell that spikes at v >= v_th
        theta = tie_proof_threshold(v_th, q, ">=")
        assert abs(theta - v_th) <= q / 4 and np.array_equal(grid > theta, grid >= v_th)
    with pytest.raises(ValueError, match="Invalid threshold comparison"):
        tie_proof_threshold(1.0, q, "<")


def test_tie_free_trials_drop_near_ties_and_refuse_when_none_is_left(trained):
    cell, inputs = trained
    dep = deploy(cell)
    # with the trained threshold every trial of the task input reaches v_th exactly (bias 0, dyadic inputs)
    old = graph_cell(dep.cell, 1.0)
    assert float(tie_margins(old, inputs).max()) == 0.0
    with pytest.raises(ValueError, match="Invalid conformance input: every one of its 6 trials"):
        tie_free_trials(old, inputs)
    # with the graph's threshold all are kept; a larger margin drops the trials below it
    gcell = graph_cell(dep.cell, tie_proof_threshold(1.0, membrane_grid(dep)))
    kept, dropped, margin = tie_free_trials(gcell, inputs)
    assert kept.shape[1] == 6 and dropped == 0 and margin >= TIE_MARGIN
    # random analog input: the margins vary by trial; a cut at their median drops the trials below it
    u = 2.0 * torch.rand(100, 8, cell.n_in, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = tie_margins(gcell, u)
    cut = float(m.median())
    kept, dropped, margin = tie_free_trials(gcell, u, margin=cut)
    assert kept.shape[1] == int((m >= cut).sum()) >= 1 and dropped == 8 - kept.shape[1] > 0 and margin >= cut
    assert torch.equal(kept, u[:, m >= cut])
    x, dropped, margin = tie_free_raster(gcell, trials=3)
    assert x.shape == (256, 3, cell.n_in) and margin >= TIE_MARGIN and set(x.unique().tolist()) == {0.0, 1.0}


# ------------------------------------------------------------------------------------ verify: both inputs, all importers

@pytest.mark.parametrize("target", ["generic", "stock"])
def test_verify_gives_zero_mismatches_in_snntorch_norse_rockpool_on_01_and_analog(trained, tmp_path, target):
    pytest.importorskip("rockpool")
    cell, inputs = trained
    ex = write_nir(tmp_path / "net.nir", cell, inputs=inputs, target=target)
    assert ex.dropped_trials == 0 and ex.margin >= TIE_MARGIN
    rep = verify_nir(tmp_path / "net.nir")
    assert set(rep.by_input) == {"conformance", "raster01"} and rep.ok
    for name, b in rep.by_input.items():
        assert b["steps"] >= 200 and b["spikes_float"] > 1000, name          # a meaningful comparison
        assert {k: b["mismatches"][k] for k in ("snntorch", "norse", "rockpool")} == {
            "snntorch": 0, "norse": 0, "rockpool": 0}, name
        assert b["margin"] >= TIE_MARGIN
        assert max(b["output_max_abs_diff"][k] for k in ("snntorch", "norse", "rockpool")) < 1e-5
    assert rep.mismatches["conformance_file"] == 0
    x, _, _ = read_conformance(conformance_path(tmp_path / "net.nir"))
    assert torch.equal(x, inputs)                                             # the analog task input


# ------------------------------------------------------------------------------------ stock importers

def _conformance(path):
    x, z, y = read_conformance(conformance_path(path))
    return x, z, y


def test_stock_snntorch_and_norse_import_the_stock_file(trained, tmp_path):
    """The user's first try, on the stock target: the libraries' own entry points, float32."""
    import norse.torch
    from snntorch.import_nir import import_from_nir

    cell, inputs = trained
    write_nir(tmp_path / "s.nir", cell, inputs=inputs, target="stock")
    g = nir.read(tmp_path / "s.nir")
    assert graph_target(g) == "stock" and "readout" not in g.nodes and np.all(g.nodes["lif"].r == 1)
    x, z_ref, y_ref = _conformance(tmp_path / "s.nir")
    kappa = float(g.metadata["kappa"])
    with _quiet_stdout():
        snn_module = import_from_nir(copy.deepcopy(g))
    norse_module = norse.torch.from_nir(copy.deepcopy(g), dt=float(g.metadata["dt"]), ignore_warnings=True)
    for module in (snn_module, norse_module):
        z, a = simulate_imported(module, x, dtype=torch.float32)
        assert torch.equal(z, z_ref)
        assert float((leaky_readout(a, kappa) - y_ref).abs().max()) < 1e-5
    for load in (load_snntorch, load_norse):     # neuroinit's loaders return the same stock modules
        z, _ = simulate_imported(load(tmp_path / "s.nir"), x, dtype=torch.float32)
        assert torch.equal(z, z_ref)


def test_stock_importers_fail_on_the_generic_file_as_documented(trained, tmp_path):
    """The bugs docs/export.md lists (snntorch 1.0, norse 1.1, rockpool 3.1): if one of these starts passing,
    a library was fixed and the table must change."""
    import norse.torch
    from snntorch.import_nir import import_from_nir

    cell, inputs = trained
    write_nir(tmp_path / "g.nir", cell, inputs=inputs)
    g = nir.read(tmp_path / "g.nir")
    x, z_ref, _ = _conformance(tmp_path / "g.nir")
    with _quiet_stdout(), pytest.raises(ValueError, match="Unknown node type.*LI"):
        import_from_nir(copy.deepcopy(g))
    no_li = copy.deepcopy(g)                    # snntorch without the LI: input wired into W_rec
    del no_li.nodes["readout"]
    no_li.edges = [e for e in no_li.edges if "readout" not in e] + [("w_out", "output")]
    with _quiet_stdout():
        z, _ = simulate_imported(import_from_nir(no_li), x, dtype=torch.float32)
    assert int((z != z_ref).sum()) > 1000
    module = norse.torch.from_nir(copy.deepcopy(g), dt=float(g.metadata["dt"]), ignore_warnings=True)
    z, y = simulate_imported(module, x, dtype=torch.float32)    # r ignored: inputs scaled by dt/tau
    assert int(z.sum()) < int(z_ref.sum()) // 100
    assert y.shape[-1] == cell.n_out and not torch.allclose(y, _conformance(tmp_path / "g.nir")[2].float().double())
    rockpool_nir = pytest.importorskip("rockpool.nn.modules.torch.nir")
    with pytest.raises(AttributeError, match="tau_mem"):
        rockpool_nir.from_nir(copy.deepcopy(g))


def test_stock_target_refuses_a_dt_snntorch_would_not_use(trained):
    cell, _ = trained
    with pytest.raises(ValueError, match="Invalid dt 0.001 for target 'stock'"):
        to_nir(cell, dt=1e-3, target="stock")
    with pytest.raises(ValueError, match="Invalid NIR target 'lava'"):
        to_nir(cell, target="lava")


def test_rockpool_adapter_is_built_from_rockpool_classes(trained, tmp_path):
    pytest.importorskip("rockpool")
    from rockpool.nn.modules import ExpSynTorch, LIFNeuronTorch, LinearTorch

    from neuroinit.io.importers import load_rockpool, run_rockpool

    cell, inputs = trained
    write_nir(tmp_path / "g.nir", cell, inputs=inputs)
    net = load_rockpool(tmp_path / "g.nir")
    mods = [net[i] for i in range(4)]
    assert isinstance(mods[0], LinearTorch) and isinstance(mods[2], LinearTorch)
    assert isinstance(mods[1], LIFNeuronTorch) and isinstance(mods[3], ExpSynTorch)
    assert float(mods[1].max_spikes_per_dt) == 1.0
    x, z_ref, y_ref = _conformance(tmp_path / "g.nir")
    for _ in range(2):                                           # runs from rest each time
        z, y = run_rockpool(net, x)
        assert torch.equal(z, z_ref) and float((y - y_ref).abs().max()) < 1e-5


# ------------------------------------------------------------------------------------ CLI

def test_cli_export_stock_target_verifies_both_inputs(trained, tmp_path):
    rf = pytest.importorskip("neuroinit.io.runfile")
    from click.testing import CliRunner

    from neuroinit.cli import main

    cell, _ = trained
    ws = rf.weights_from_cell(cell)
    run = tmp_path / "run.h5"
    rf.write_run(run, rf.RunFile(path=str(run), format_version=rf.FORMAT_VERSION, status="complete", message="",
                                 seed=0, model="lif", config={"task": "romo", "model": "lif"},
                                 settings={"dt_ms": 1.0, "tau_ms": 8.0, "input_scale": 2.0},
                                 profile_text=cell.profile.text, cell_config=cell.config(), init_report={},
                                 versions={}, weights={"initial": ws, "final": ws}, runs=[]))
    out = tmp_path / "net.nir"
    res = CliRunner().invoke(main, ["export", str(run), "--format", "nir", "--nir-target", "stock", "--out",
                                    str(out), "--verify", "--trials", "3", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["nir_target"] == "stock" and rep["v_threshold"] > 1.0 and rep["verify"]["ok"]
    assert set(rep["verify"]["by_input"]) == {"conformance", "raster01"}
    for b in rep["verify"]["by_input"].values():
        assert b["mismatches"]["snntorch"] == 0 and b["mismatches"]["norse"] == 0 and b["spikes_float"] > 100
    assert graph_target(nir.read(out)) == "stock"
