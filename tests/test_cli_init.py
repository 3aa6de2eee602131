"""`neuroinit init`: hardware-aware initialisation report from the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from neuroinit.cli import main
from neuroinit.init import hardware_init


def _invoke(*args: str):
    return CliRunner().invoke(main, ["init", *args])


def _one_error_line(result, *needles: str) -> str:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.mark.parametrize("model", ["lif", "rate"])
def test_init_json_realises_the_requested_gain_on_loihi(model):
    result = _invoke("--model", model, "--hidden", "256", "--gain", "1.5", "--profile", "loihi-like", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert report["model"] == model
    assert report["profile"] == "loihi-like"
    assert report["n_hidden"] == 256
    assert report["used_gain"] == 1.5
    assert abs(report["realised_gain_std"] / 1.5 - 1) < 0.02
    assert set(report["exponent"]) == {"w_in", "w_rec", "w_out"}
    # the same numbers as the library call with the CLI's defaults (1 input, 2 outputs, seed 0)
    _, expected = hardware_init(model, 1, 256, 2, 1.5, "loihi-like", generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)
    assert report == json.loads(json.dumps(expected.to_dict()))


def test_init_json_is_strict_json_for_the_ideal_profile():
    result = _invoke("--model", "rate", "--hidden", "32", "--gain", "1.0", "--profile", "ideal", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report["gain_interval"] == [0.0, None]  # (0, inf): inf is written as null
    assert report["scale"] == {"w_in": None, "w_rec": None, "w_out": None}


def test_init_human_report():
    result = _invoke("--model", "lif", "--hidden", "64", "--gain", "2", "--profile", "loihi-like", "--seed", "3",
                     "--rounding", "stochastic", "--inputs", "2", "--outputs", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "lif network, N = 64, profile loihi-like" in out
    for key in ("requested gain", "realisable gains", "realised gain", "spectral radius", "threshold code",
                "w_rec"):
        assert key in out
    again = _invoke("--model", "lif", "--hidden", "64", "--gain", "2", "--profile", "loihi-like", "--seed", "3",
                    "--rounding", "stochastic", "--inputs", "2", "--outputs", "3")
    assert again.stdout == out  # seeded: the same report


def test_clamp_gain_reports_the_edge():
    result = _invoke("--model", "rate", "--hidden", "128", "--gain", "1e6", "--profile", "loihi-like", "--json",
                     "--clamp-gain")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["requested_gain"] == 1e6
    assert report["used_gain"] == report["gain_interval"][1]
    assert math.isfinite(report["used_gain"])


@pytest.mark.parametrize(("args", "needles"), [
    (("--gain", "1e6"), ("Invalid gain 1e+06", "loihi-like", "realisable gains are [", "--clamp-gain")),
    (("--gain", "-1"), ("Invalid gain -1",)),
    (("--gain", "abc"), ("'--gain'", "'abc' is not a valid float")),
    (("--gain", "1.5", "--profile", "loihi-lik"), ("unknown profile 'loihi-lik'", "loihi-like")),
    (("--gain", "1.5", "--model", "izhikevich"), ("'--model'", "'izhikevich' is not one of 'alif', 'lif', 'rate'")),
    (("--gain", "1.5", "--hidden", "0"), ("'--hidden'",)),
    (("--gain", "1.5", "--hidden", "200000"), ("200000 hidden neurons exceed the limit",)),
    (("--gain", "1.5", "--rounding", "up"), ("'--rounding'", "nearest", "stochastic")),
])
def test_bad_input_gives_one_clear_line(args, needles):
    base = {"--model": "rate", "--hidden": "256", "--profile": "loihi-like"}
    opts = dict(zip(args[::2], args[1::2]))
    merged = [x for k, v in (base | opts).items() for x in (k, v)]
    _one_error_line(_invoke(*merged), *needles)


def test_missing_required_option_is_one_line():
    _one_error_line(_invoke("--model", "rate", "--gain", "1.0", "--profile", "ideal"), "Missing option '--hidden'")


def test_bad_profile_file_is_one_line(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("name = 'broken'\n[weights\n")
    _one_error_line(_invoke("--model", "rate", "--hidden", "8", "--gain", "1", "--profile", str(bad)),
                    "broken.toml", "not valid TOML")
