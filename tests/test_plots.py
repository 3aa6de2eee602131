"""Figures from a tiny sweep: each is a non-empty image with the expected number of curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from neuroinit.cli import main
from neuroinit.experiments import plots
from neuroinit.experiments import sweep as sw

# rate: bptt, eprop, eprop+flossing; LIF: eprop. 2 gains x 2 seeds each; 8 neurons, 3 iterations, top Lyapunov
# exponent only, 2 flossing iterations, and dt = tau (28-step trials) to keep it fast: this tests the figures,
# not the science.
SPEC = """
name = "plots"
[base]
hidden = 8
batch = 4
iters = 3
log_every = 1
eval_batch = 8
lyapunov_k = 1
[flossing]
iters = 2
[[grid]]
model = "rate"
rule = ["bptt", "eprop", "eprop+flossing"]
gain = [0.5, 1.5]
seed = [0, 1]
base = {dt_ms = 100.0}
[[grid]]
model = "lif"
rule = "eprop"
gain = [0.5, 1.5]
seed = [0, 1]
base = {dt_ms = 20.0}
"""


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plots")
    (tmp / "spec.toml").write_text(SPEC)
    report = sw.run_sweep(tmp / "spec.toml", tmp / "out", workers=0)
    assert report.counts == {"complete": 16}, report.failed
    return tmp / "out"


def check_image(path) -> None:
    from matplotlib.image import imread

    assert path.stat().st_size > 5000
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert float(img[..., :3].std()) > 0.05  # not a blank canvas


@pytest.mark.parametrize("figure, expected", [
    ("learning-curves", 4 * 2),       # panels rate x {bptt, eprop, eprop+flossing} and LIF x eprop; 2 gains each
    ("lyapunov", 5 + 2),              # rate: before, after flossing, after x 3 rules; LIF: before, after
    ("flossing", 2 * 2 + 2),          # rate eprop vs eprop+flossing: a panel per gain, then final loss vs gain
    ("rate-vs-spiking", 2 * 2),       # eprop: rate and LIF x 2 gains
])
def test_figures_from_a_tiny_sweep(sweep_dir, tmp_path, figure, expected):
    out = tmp_path / f"{figure}.png"
    assert plots.plot_figure(sweep_dir, figure, out) == expected
    check_image(out)


def test_curvature_figure_and_cache(sweep_dir, tmp_path):
    out = tmp_path / "curvature.png"
    assert plots.plot_figure(sweep_dir, "curvature", out, model="rate", max_iter=4) == 2 * 3  # 2 panels x 3 rules
    check_image(out)
    cache = json.loads((sweep_dir / "analysis" / "curvature.json").read_text())
    assert len(cache) == 3 * 2 * 2 and all(np.isfinite(v["top_eigenvalue"]) for v in cache.values())


def test_filters_and_errors(sweep_dir, tmp_path):
    assert plots.plot_figure(sweep_dir, "learning-curves", tmp_path / "a.png", model="lif", gains=[1.5]) == 1
    assert plots.plot_figure(sweep_dir, "learning-curves", tmp_path / "s.png", task="romo", smooth=2) == 8
    np.testing.assert_allclose(plots._smooth(np.array([4.0, 2.0, 6.0, 0.0]), 2), [4.0, 3.0, 4.0, 3.0])
    with pytest.raises(ValueError, match="Invalid smooth 0"):
        plots.plot_figure(sweep_dir, "learning-curves", tmp_path / "s.png", smooth=0)
    with pytest.raises(ValueError, match="both models"):
        plots.plot_figure(sweep_dir, "rate-vs-spiking", tmp_path / "b.png", model="rate")
    with pytest.raises(ValueError, match="no finished runs"):
        plots.plot_figure(sweep_dir, "learning-curves", tmp_path / "c.png", gains=[9.0])
    with pytest.raises(ValueError, match="X\\+flossing"):
        plots.plot_figure(sweep_dir, "flossing", tmp_path / "d.png", model="lif")


def test_plot_and_compare_on_the_command_line(sweep_dir, tmp_path):
    out = tmp_path / "lc.png"
    res = CliRunner().invoke(main, ["plot", str(sweep_dir), "--figure", "learning-curves", "--out", str(out),
                                    "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["curves"] == 8
    check_image(out)
    res = CliRunner().invoke(main, ["plot", str(tmp_path / "nothing"), "--figure", "lyapunov", "--out",
                                    str(tmp_path / "x.png")])
    assert res.exit_code != 0 and "no such sweep directory" in res.output and "Traceback" not in res.output
    files = sorted((sweep_dir / "runs").glob("*.h5"))
    out = tmp_path / "cmp.png"
    res = CliRunner().invoke(main, ["compare", str(files[0]), str(files[-1]), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["curves"] == 2 + 4  # a loss curve and 2 spectra (before/after) per run
    check_image(out)
