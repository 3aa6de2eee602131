"""Loss curvature (science.md section 5): power iteration on Hessian-vector products against the full Hessian of
a tiny network, the generalisation gap, and the curvature / run-file forms of the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neuroinit.cells import RateRNN
from neuroinit.cli import main
from neuroinit.dynamics import (
    batch_loss,
    generalisation_gap,
    lyapunov_spectrum,
    task_inputs,
    top_hessian_eigenvalue,
)
from neuroinit.dynamics.curvature import _loss_of_w_rec
from neuroinit.init import float_init
from neuroinit.tasks import RomoTask

F64 = torch.float64
TASK = RomoTask()



def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_cell(seed: int, n: int = 5) -> RateRNN:
    p = float_init(1, n, 2, 1.5, generator=gen(seed), dtype=F64)
    return RateRNN(p._replace(w_out=p.w_out * n), alpha=0.5)  # a larger readout: a curved loss


def full_hessian_eigenvalues(cell: RateRNN, batch) -> torch.Tensor:
    """Eigenvalues of the Hessian of the loss w.r.t. the off-diagonal entries of W_rec (autapses removed)."""
    n = cell.n_hidden
    off = cell.recurrent_mask().bool()

    def loss(entries: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(n, n, dtype=F64).masked_scatter(off, entries)
        return _loss_of_w_rec(cell, w, batch, TASK)

    h = torch.autograd.functional.hessian(loss, cell.w_rec.detach()[off])
    return torch.linalg.eigvalsh(h)


@pytest.mark.parametrize("seed", [1, 2])
def test_power_iteration_matches_the_full_hessian_of_a_tiny_network(seed):
    """seed 1: the largest eigenvalue also has the largest magnitude (+31.7 vs -9.9); seed 2: the most negative
    one dominates (-30.9 vs +11.0) and the shifted second pass must find the largest."""
    cell = tiny_cell(seed)
    batch = TASK.batch(3, generator=gen(1), dtype=F64)
    eig = full_hessian_eigenvalues(cell, batch)
    res = top_hessian_eigenvalue(cell, batch, TASK, tol=1e-11, generator=gen(2))
    assert res.converged and res.iterations <= 500
    assert res.top_eigenvalue == pytest.approx(float(eig[-1]), rel=1e-6)
    if seed == 2:
        assert abs(float(eig[0])) > abs(float(eig[-1]))


def test_quantised_profile_curvature_is_taken_at_the_grid_weights_and_reproducible():
    """On a quantised profile the Hessian is that of the float loss at the weights the forward pass uses."""
    p = float_init(1, 6, 2, 1.5, generator=gen(0), dtype=F64)
    p = p._replace(w_out=p.w_out * 6)
    chip = RateRNN(p, alpha=0.5, profile="loihi-like")
    on_grid = RateRNN(chip.params(), alpha=0.5)  # ideal profile, grid values as float weights
    assert not torch.equal(chip.params().w_rec, chip.w_rec)
    batch = TASK.batch(3, generator=gen(3), dtype=F64)
    a = top_hessian_eigenvalue(chip, batch, TASK, tol=1e-9, generator=gen(4))
    b = top_hessian_eigenvalue(on_grid, batch, TASK, tol=1e-9, generator=gen(4))
    assert a.top_eigenvalue == pytest.approx(b.top_eigenvalue, rel=1e-12)
    assert a == top_hessian_eigenvalue(chip, batch, TASK, tol=1e-9, generator=gen(4))


def test_max_iter_bounds_the_work_and_reports_non_convergence():
    cell = tiny_cell(0, n=8)
    batch = TASK.batch(2, generator=gen(3), dtype=F64)
    res = top_hessian_eigenvalue(cell, batch, TASK, max_iter=2, tol=1e-15, generator=gen(4))
    assert res.iterations == 2 and not res.converged


def test_generalisation_gap_is_test_minus_train_loss():
    cell = tiny_cell(1, n=10)
    train = TASK.batch(8, generator=gen(5), dtype=F64)
    gap = generalisation_gap(cell, TASK, train_batch=train, generator=gen(6), n_trials=64)
    test = TASK.batch(64, generator=gen(6), dtype=F64)
    assert gap == pytest.approx(batch_loss(cell, test, TASK) - batch_loss(cell, train, TASK), rel=1e-12)


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_iter": 0}, "Invalid max_iter"),
    ({"tol": 0.0}, "Invalid tol"),
    ({"tol": math.inf}, "Invalid tol"),
])
def test_invalid_settings_are_rejected(kwargs, needle):
    cell = tiny_cell(0)
    batch = TASK.batch(2, generator=gen(0), dtype=F64)
    with pytest.raises(ValueError, match=needle):
        top_hessian_eigenvalue(cell, batch, TASK, generator=gen(0), **kwargs)
    with pytest.raises(ValueError, match="Invalid n_trials"):
        generalisation_gap(cell, TASK, train_batch=batch, generator=gen(0), n_trials=0)


# ------------------------------------------------------------------------------------------ CLI on run files

def _write_run(path, initial: RateRNN, final: RateRNN, *, final_loss: float) -> None:
    from neuroinit.experiments.train import TrainConfig, resolve_settings
    from neuroinit.io.runfile import RunFile, RunRecord, package_versions, weights_from_cell, write_run
    from neuroinit.profiles import load_profile

    profile = load_profile("ideal")
    record = RunRecord(lr=1e-3, status="complete", loss_per_iteration=[0.1, final_loss], final_loss=final_loss,
                       final=weights_from_cell(final))
    train_config = TrainConfig(task="romo", model="rate", hidden=initial.n_hidden, batch=4, seed=7)
    config = train_config.to_dict()
    run = RunFile(path=str(path), format_version=1, status="complete", message="", seed=7, model="rate",
                  config=config, profile_text=profile.text,
                  cell_config=initial.config(), init_report={}, versions=package_versions(),
                  weights={"initial": weights_from_cell(initial), "final": weights_from_cell(final)},
                  runs=[record], selected_run=0, summary={"final_loss": final_loss},
                  settings=resolve_settings(train_config))  # as train() stores them: time step, input scale
    write_run(path, run)


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    pytest.importorskip("h5py")
    initial = RateRNN(float_init(1, 16, 2, 0.5, generator=gen(0), dtype=F64), alpha=0.5)
    final = RateRNN(float_init(1, 16, 2, 1.5, generator=gen(1), dtype=F64), alpha=0.5)
    path = tmp_path_factory.mktemp("runs") / "run.h5"
    _write_run(path, initial, final, final_loss=0.01)
    return path, initial, final


@pytest.mark.parametrize("which", ["initial", "final"])
def test_cli_lyapunov_of_a_run_file_matches_the_library(run_file, which):
    path, initial, final = run_file
    cell = initial if which == "initial" else final
    result = CliRunner().invoke(main, ["lyapunov", str(path), "--which", which, "--k", "2", "--batch", "2",
                                       "--steps", "60", "--warmup", "10", "--dtype", "float64", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    g = gen(1)  # seed 0 + 1
    u = task_inputs(TASK, batch=2, length=70, generator=g, dtype=F64)
    expected = lyapunov_spectrum(cell, u, k=2, warmup=10, generator=g)
    np.testing.assert_allclose(data["lyapunov"]["mean_per_step"], expected.mean.numpy(), rtol=1e-10)
    assert data["network"]["which"] == which


def test_cli_curvature_of_a_run_file(run_file):
    from neuroinit.experiments.plots import curvature_of_run
    from neuroinit.io.runfile import read_run

    path = run_file[0]
    result = CliRunner().invoke(main, ["curvature", str(path), "--trials", "16", "--max-iter", "20", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = curvature_of_run(str(path), read_run(path).config, 0.01, max_iter=20, test_trials=16)
    assert data["top_eigenvalue"] == pytest.approx(expected["top_eigenvalue"], rel=1e-12)
    assert data["held_out_trials"] == 4 and data["test_trials"] == 16
    assert data["gap"] == pytest.approx(data["test_loss"] - 0.01, rel=1e-12)
    text = CliRunner().invoke(main, ["curvature", str(path), "--trials", "8", "--max-iter", "5"])
    assert text.exit_code == 0 and "top Hessian eigenvalue" in text.stdout


@pytest.mark.parametrize("args, needle", [
    (["curvature", "missing.h5"], "missing.h5"),
    (["curvature", "RUN", "--which", "final"], "--which"),
    (["curvature", "RUN", "--max-iter", "0"], "--max-iter"),
    (["lyapunov", "RUN", "--hidden", "4"], "--hidden"),
    (["lyapunov", "RUN", "--which", "floss"], "floss"),
])
def test_cli_run_file_errors_are_one_line(run_file, tmp_path, args, needle):
    path = run_file[0]
    args = [str(path) if a == "RUN" else a for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.stderr


def test_cli_rejects_a_file_that_is_not_a_run(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    result = CliRunner().invoke(main, ["curvature", str(bad)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1
