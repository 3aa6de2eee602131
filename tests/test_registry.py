"""The registry of cell classes is the one source of model choices: a toy cell registered in a test is offered by
the CLI and trains through ``neuroinit train``; ALIF trains from the CLI on Romo and a neurogym task."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
from click.testing import CliRunner

from neuroinit.cells import (
    LocalDerivatives,
    LocalFactors,
    RateState,
    RecurrentCell,
    TraceSpec,
    cell_class,
    make_cell,
    model_names,
    register,
    unregister,
)
from neuroinit.cells.base import readout
from neuroinit.cli import main
from neuroinit.experiments.train import TrainConfig
from neuroinit.io.runfile import load_cell, read_run


class ToyCell(RecurrentCell):
    """A linear leaky network ``x_t = (1 - leak) x_{t-1} + leak (W_rec x_{t-1} + W_in u_t + b)`` declared in a
    test, nowhere else."""

    model = "toylinear"
    state_type = RateState
    task_defaults: ClassVar[dict] = {"romo": {"dt_ms": 50.0, "tau_ms": 100.0, "input_scale": 1.0},
                                     "neurogym": {"dt_ms": 20.0, "tau_ms": 100.0, "input_scale": 1.0}}

    def __init__(self, params, *, leak: float = 0.5, profile=None, quantised_forward=True, remove_autapses=True):
        if not 0 < leak <= 1:
            raise ValueError(f"Invalid leak {leak!r}: allowed 0 < leak <= 1")
        super().__init__(params, profile=profile, quantised_forward=quantised_forward,
                         remove_autapses=remove_autapses)
        self.leak = float(leak)

    @classmethod
    def train_kwargs(cls, settings, config, profile):
        return {"leak": settings["dt_ms"] / settings["tau_ms"], **config.cell_options}

    def config(self):
        return {"leak": self.leak, "profile": self.profile.name, "quantised_forward": self.quantised_forward,
                "remove_autapses": self.remove_autapses}

    def init_state(self, batch_size):
        return RateState(self.w_rec.new_zeros(batch_size, self.n_hidden))

    def step(self, params, state, u, *, eprop_detach=False, feedback=None):
        x_rec = state.x.detach() if eprop_detach else state.x
        x = (1 - self.leak) * state.x + self.leak * (x_rec @ params.w_rec.T + u @ params.w_in.T + params.bias)
        return readout(x, params.w_out, params.b_out, feedback), RateState(x)

    def observable(self, state):
        return state.x

    def dt_over_tau(self):
        return self.leak

    def local_derivatives(self, params, state, u):
        return LocalDerivatives(decay=((1 - self.leak,),), spike=(1.0,), spike_to=(0.0,), reset=((0.0,),),
                                current=(self.leak,))

    def trace_spec(self):
        return TraceSpec(pre_decay=1 - self.leak, pre_gain=self.leak, elig_decay=0.0, readout_decay=0.0)

    def local_factors(self, params, prev, new, u):
        return LocalFactors(pre_rec=prev.x, pre_in=u, post=torch.ones_like(new.x), readout_in=new.x)


@pytest.fixture
def toy():
    register(ToyCell)
    try:
        yield ToyCell
    finally:
        unregister("toylinear")


def test_registry_lookup_and_errors(toy):
    assert {"rate", "lif", "alif", "toylinear"} <= set(model_names())
    assert cell_class("toylinear") is ToyCell
    assert ToyCell.config_section() == {"leak": 0.5}
    with pytest.raises(ValueError, match=r"^Invalid model 'nope': allowed alif, lif, rate, toylinear$"):
        cell_class("nope")
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (ToyCell,), {}))
    with pytest.raises(ValueError, match="Invalid cell class"):
        register(int)


def test_unregistered_toy_is_gone():
    assert "toylinear" not in model_names()
    r = CliRunner().invoke(main, ["train", "--help"])
    assert "toylinear" not in r.output


def test_toy_cell_in_cli_help_and_trains_through_cli(toy, tmp_path):
    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0 and "toylinear" in r.output
    out = tmp_path / "toy.h5"
    r = CliRunner().invoke(main, ["train", "--model", "toylinear", "--hidden", "8", "--batch", "4", "--iters", "3",
                                  "--lr", "1e-2", "--eval-batch", "8", "--no-lyapunov", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["iterations"] == 3
    cell = load_cell(out)
    assert type(cell) is ToyCell and cell.leak == 0.5
    bad = CliRunner().invoke(main, ["train", "--model", "toylinear", "--tau-m-ms", "5", "--iters", "1",
                                    "--out", str(tmp_path / "bad.h5")])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert "Invalid tau_m_ms for a toylinear network" in bad.output


def test_cell_options_are_validated_by_the_cell(toy):
    assert TrainConfig(model="toylinear", cell_options={"leak": 0.25}).cell_options == {"leak": 0.25}
    with pytest.raises(ValueError, match=r"Invalid cell_options \['tau_a'\] for model 'toylinear': allowed leak"):
        TrainConfig(model="toylinear", cell_options={"tau_a": 3.0})
    with pytest.raises(ValueError, match="Invalid leak 2.0"):
        TrainConfig(model="toylinear", cell_options={"leak": 2.0})
    with pytest.raises(ValueError, match=r"Invalid beta -1.0"):
        TrainConfig(model="alif", cell_options={"beta": -1.0})
    with pytest.raises(ValueError, match=r"Invalid n_refractory 2 for model 'alif'"):
        TrainConfig(model="alif", n_refractory=2)


@pytest.mark.parametrize("task", ["romo", "2af"])
def test_alif_trains_from_the_cli(task, tmp_path):
    out = tmp_path / f"alif_{task}.h5"
    r = CliRunner().invoke(main, ["train", "--model", "alif", "--task", task, "--rule", "eprop", "--hidden", "12",
                                  "--batch", "4", "--iters", "3", "--lr", "1e-2", "--eval-batch", "8",
                                  "--lyapunov-k", "2", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    run = read_run(out)
    assert run.config["model"] == "alif" and run.status == "complete"
    cell = load_cell(out)
    assert cell.model == "alif" and cell.tau_a == 200.0
    assert abs(run.lyapunov["final"]["max_per_step"]) < 10   # a finite exponent of the (v, a) dynamics


def test_alif_cell_options_reach_the_run(tmp_path):
    from neuroinit.experiments.train import train

    cfg = TrainConfig(model="alif", hidden=8, batch=4, iters=2, eval_batch=8, lyapunov=False,
                      cell_options={"tau_a": 400.0, "beta": 0.5})
    train(cfg, tmp_path / "opts.h5")
    cell = load_cell(tmp_path / "opts.h5")
    assert cell.tau_a == 400.0 and float(cell.beta) == 0.5
    assert make_cell("alif", cell.float_params(), **cell.config()).config() == cell.config()


def test_cell_options_from_the_cli_reach_the_cell(tmp_path):
    out = tmp_path / "a.h5"
    r = CliRunner().invoke(main, ["train", "--model", "alif", "--cell-option", "tau_a=300", "--cell-option",
                                  "beta=0.5", "--hidden", "8", "--batch", "4", "--iters", "2", "--eval-batch", "4",
                                  "--no-lyapunov", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert read_run(out).config["cell_options"] == {"tau_a": 300, "beta": 0.5}
    cfg = load_cell(out).config()
    assert (cfg["tau_a"], cfg["beta"]) == (300.0, 0.5)
    bad = CliRunner().invoke(main, ["train", "--model", "lif", "--cell-option", "tau_a=300", "--iters", "1",
                                    "--out", str(tmp_path / "b.h5")])
    assert bad.exit_code != 0 and "Invalid cell_options ['tau_a'] for model 'lif'" in bad.output
    bad = CliRunner().invoke(main, ["train", "--model", "alif", "--cell-option", "tau_a", "--iters", "1",
                                    "--out", str(tmp_path / "c.h5")])
    assert bad.exit_code != 0 and "allowed NAME=VALUE" in bad.output
