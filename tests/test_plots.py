"""Figures from a tiny sweep: each is a non-empty image with the expected number of curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from neuroinit.cli import main
from neuroinit.experiments import figstyle, plot_select, plots
from neuroinit.experiments import sweep as sw
from neuroinit.experiments.comparison import CONTROLLED, check_controlled, compare_models

REPO = Path(__file__).resolve().parents[1]

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
    ("rate-vs-spiking", 4 * 2),       # a curve per model x rule (rate x 3 rules, LIF x eprop), 2 gains
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
    np.testing.assert_allclose(plot_select._smooth(np.array([4.0, 2.0, 6.0, 0.0]), 2), [4.0, 3.0, 4.0, 3.0])
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


# ------------------------------------------------------------------------------------------ printable figures

@pytest.fixture
def figures(monkeypatch):
    """The matplotlib Figure objects the plot functions save (to check their text)."""
    saved = []
    real = figstyle.save

    def keep(fig, out):
        saved.append(fig)
        real(fig, out)

    monkeypatch.setattr(figstyle, "save", keep)
    return saved


def _texts(fig) -> str:
    parts = [fig._suptitle.get_text() if fig._suptitle is not None else ""]
    for ax in fig.axes:
        parts.append(ax.get_title())
        leg = ax.get_legend()
        if leg is not None:
            parts += [t.get_text() for t in leg.get_texts()]
    return "\n".join(parts)


def _inside(fig, artist) -> bool:
    fig.canvas.draw()
    box = artist.get_window_extent(renderer=fig.canvas.get_renderer())
    return box.x0 >= -1 and box.x1 <= fig.bbox.x1 + 1 and box.y1 <= fig.bbox.y1 + 1


@pytest.mark.parametrize("figure", ["learning-curves", "lyapunov", "flossing", "rate-vs-spiking"])
def test_figures_are_printable(sweep_dir, tmp_path, figures, figure):
    """Labelled ticks (>= 2 on every y axis, log axes included), the scale in the text, titles inside the
    figure."""
    plots.plot_figure(sweep_dir, figure, tmp_path / f"{figure}.png")
    (fig,) = figures
    text = _texts(fig)
    for needle in ("N = 8", "2 seeds", "3 iterations", "batch 4", "fewer than 3 seeds",
                   "learning rate per condition by mean of the last 20 logged losses"):
        assert needle in text, (needle, text)
    if figure in ("learning-curves", "flossing", "lyapunov"):
        assert "flossing k = 1" in text                     # k = "auto" at N = 8: 8 // 8
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert axes
    for ax in axes:
        assert len(figstyle.labelled_ticks(ax, "y")) >= 2, (ax.get_title(), ax.get_yscale(), ax.get_ylim())
        assert len(figstyle.labelled_ticks(ax, "x")) >= 2
        assert _inside(fig, ax.title)
    assert any(ax.get_yscale() == "log" for ax in axes) or figure == "lyapunov"
    assert _inside(fig, fig._suptitle)


def test_log_axis_within_one_decade_gets_labelled_ticks():
    _fig, (ax,) = figstyle.new_figure(1)
    ax.plot([0, 1, 2], [0.6, 0.1, 0.04])
    ax.set_yscale("log")
    assert len(figstyle.labelled_ticks(ax, "y")) < 2        # matplotlib alone: only 10^-1 is labelled
    figstyle.label_log_ticks(ax)
    labels = figstyle.labelled_ticks(ax, "y")
    assert len(labels) >= 2 and all(float(t) > 0 for t in labels), labels


def test_long_titles_are_wrapped_not_cut():
    fig, (ax,) = figstyle.new_figure(1)
    long = "a condition title " * 12
    figstyle.set_title(ax, long)
    figstyle.suptitle(fig, long * 2)
    assert "\n" in ax.get_title() and _inside(fig, ax.title) and _inside(fig, fig._suptitle)


# ------------------------------------------------------------------------------------------ rate vs spiking

def _tiny_rvs_spec(tmp_path) -> Path:
    """examples/rate-vs-spiking-quick.toml with tiny sizes and one learning rate (its other axes and controls
    unchanged)."""
    text = (REPO / "examples" / "rate-vs-spiking-quick.toml").read_text()
    for a, b in (("hidden = 64", "hidden = 8"), ("batch = 16", "batch = 4"), ("iters = 600", "iters = 4"),
                 ("log_every = 10", "log_every = 1"), ("eval_batch = 128", "eval_batch = 8"),
                 ("lyapunov_k = 4", "lyapunov = false"), ("lr_scale = [0.3, 1.0, 3.0]", "lr_scale = [1.0]")):
        assert a in text
        text = text.replace(a, b)
    p = tmp_path / "rvs.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["rate-vs-spiking-quick.toml", "rate-vs-spiking-paper.toml",
                                  "n256/rate-vs-spiking.toml"])
def test_rate_vs_spiking_specs_are_controlled(name):
    configs = [r.config.to_dict() for r in sw.load_spec(REPO / "examples" / name).runs]
    by_model = {m: [c for c in configs if c["model"] == m] for m in ("rate", "lif")}
    assert {c["iters"] for c in by_model["rate"]} == {c["iters"] for c in by_model["lif"]} and \
        len({c["iters"] for c in configs}) == 1
    assert {c["seed"] for c in by_model["rate"]} == {c["seed"] for c in by_model["lif"]}
    assert len({c["seed"] for c in configs}) >= 3
    left = check_controlled(configs)                         # raises on any controlled mismatch
    assert [m.what for m in left] == ["eligibility memory"]
    assert left[0].values == {"lif": (1.0, 5.0), "rate": (1.0,)}   # default LIF 5 task tau, matched 1


def test_check_controlled_names_what_differs():
    rate = {"task": "romo", "model": "rate", "iters": 100, "seed": 0, "batch": 8, "hidden": 16}
    lif = {**rate, "model": "lif", "iters": 50, "seed": 1, "dt_ms": 10.0}
    found = {m.what: m.values for m in compare_models([rate, lif])}
    assert found["iterations"] == {"lif": (50,), "rate": (100,)} and found["seeds"] == {"lif": (1,), "rate": (0,)}
    assert "timing" not in found                             # 10 ms / 20 ms = 50 ms / 100 ms
    assert "lr grid" not in found                            # both 0.05 / N
    assert found["eligibility memory"] == {"lif": (5.0,), "rate": (1.0,)}
    with pytest.raises(ValueError, match="not controlled: iterations: lif 50, rate 100; seeds"):
        check_controlled([rate, lif])
    assert set(CONTROLLED) == {"iterations", "seeds", "batch", "timing", "lr grid"}


def test_match_eligibility_sets_lif_tau_m_to_the_task_tau(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text('[base]\nhidden = 8\n[[grid]]\nmodel = ["rate", "lif"]\nmatch_eligibility = true\n')
    cfg = {r.config.model: r.config for r in sw.load_spec(p).runs}
    assert cfg["lif"].tau_m_ms == 20.0 and cfg["rate"].tau_ms is None
    # memory matched; the default time steps differ (rate 0.5, LIF 0.25 task tau) and are reported
    assert [m.what for m in compare_models([cfg["rate"].to_dict(), cfg["lif"].to_dict()])] == ["timing"]
    p.write_text('[[grid]]\nmodel = "lif"\nmatch_eligibility = true\nbase = {tau_m_ms = 50.0}\n')
    with pytest.raises(sw.SpecError, match="match_eligibility sets tau_m_ms"):
        sw.load_spec(p)


def test_rate_vs_spiking_figure_one_curve_per_model_and_rule(tmp_path, figures):
    spec = sw.load_spec(_tiny_rvs_spec(tmp_path))
    report = sw.run_sweep(spec, tmp_path / "out", workers=0)
    assert report.counts == {"complete": 15}, report.failed
    n = plots.plot_figure(tmp_path / "out", "rate-vs-spiking", tmp_path / "rvs.png")
    check_image(tmp_path / "rvs.png")
    assert n == 5            # rate x {e-prop, BPTT}, LIF x {e-prop, BPTT}, memory-matched LIF x e-prop
    (fig,) = figures
    loss_ax, acc_ax = fig.axes[:2]
    labels = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert len(labels) == 5 and len(set(labels)) == 5 and all("lr " in t for t in labels)
    assert sum("rate" in t for t in labels) == 2 and sum("bptt" in t for t in labels) == 2
    assert len(loss_ax.get_lines()) == len(acc_ax.get_lines()) == 5
    assert loss_ax.get_xlim() == acc_ax.get_xlim() == (0.0, 3.0)         # iterations 0..3 of 4, common to all
    assert acc_ax.get_ylabel() == "training accuracy" and loss_ax.get_yscale() == "log"
    text = _texts(fig)
    assert "Differs between the models: eligibility memory: lif 1/5, rate 1" in text
    assert "3 seeds" in text and "fewer than" not in text


def _synth(model, rule, seed, lr, iters, loss_scale=1.0, **extra):
    cfg = {"task": "romo", "model": model, "rule": rule, "gain": 1.0, "seed": seed, "lr": lr, "iters": iters,
           "hidden": 16, "batch": 8, "floss_iters": 0, **extra}
    it = np.arange(0, iters, 10)
    loss = loss_scale * np.exp(-it / iters) * (1 + 0.01 * seed)
    r = sw.RunSummary(f"{model}{rule}{seed}{lr}", "", cfg, "complete", lr, final_loss=float(loss[-1]),
                      min_loss=float(loss.min()), iteration=it, loss=loss, accuracy=np.linspace(0.5, 0.9, len(it)))
    return r


def test_rate_vs_spiking_x_range_is_the_common_iterations_and_mismatch_is_stated(tmp_path, figures):
    runs = [_synth("rate", rule, s, 1e-3, 300) for rule in ("eprop", "bptt") for s in range(3)]
    runs += [_synth("lif", rule, s, 1e-3, 500, dt_ms=10.0) for rule in ("eprop", "bptt") for s in range(3)]
    assert plots.plot_rate_vs_spiking(runs, tmp_path / "r.png") == 4
    (fig,) = figures
    assert fig.axes[0].get_xlim() == (0.0, 290.0)                        # the rate runs' last logged iteration
    assert "iterations: lif 500, rate 300" in _texts(fig)


def test_flossing_conditions_that_differ_in_k_get_their_own_curves(tmp_path, figures):
    runs = [_synth("rate", "eprop", s, 1e-3, 100) for s in range(3)]
    runs += [_synth("rate", "eprop", s, 1e-3, 100, loss_scale=0.5, floss_iters=100, floss_k=k)
             for k in (8, 32) for s in range(3)]
    assert plots.plot_flossing(runs, tmp_path / "k.png") == 3 + 3      # a gain panel and the summary panel
    text = _texts(figures[0])
    assert "eprop+flossing (k 8)" in text and "eprop+flossing (k 32)" in text and "flossing k = 8/32" in text


# ------------------------------------------------------------------------------------------ lr grid edges

def test_edge_of_grid_is_flagged_in_tables_and_legends(tmp_path, figures):
    runs = [_synth("rate", "eprop", s, lr, 100, loss_scale=scale)
            for lr, scale in ((1e-4, 0.5), (3e-4, 1.0), (1e-3, 2.0)) for s in range(3)]
    (best,) = sw.select_best(runs).values()
    assert best.lr == 1e-4 and best.edge == "lowest"
    rows = sw.summarize(runs)
    assert rows[0]["edge"] == "lowest" and rows[0]["select"] == "final"
    table = sw.format_summary(rows)
    assert "0.0001 <" in table and "lowest / highest of its grid" in table
    plots.plot_learning_curves(runs, tmp_path / "e.png")
    assert "lr 0.0001, grid edge: lowest" in _texts(figures[0])
    middle = [r for r in runs if r.lr != 1e-4]
    (b,) = sw.select_best(middle + [_synth("rate", "eprop", s, 3e-5, 100, loss_scale=3.0) for s in range(3)]).values()
    assert b.lr == 3e-4 and b.edge is None
    (b,) = sw.select_best([r for r in runs if r.lr == 1e-3]).values()
    assert b.edge is None                                    # a single rate is no grid


def test_selection_criteria(tmp_path):
    assert sw.learned_at([0, 10, 20, 30, 40], [1.0, 0.01, 0.5, 0.02, 0.01]) == 30   # dips at 10, comes back up
    assert sw.learned_at([0, 10, 20], [1.0, 0.01, 0.5]) is None                      # never settles
    assert sw.learned_at([0, 10], [0.01, 0.0004]) == 10 and sw.learned_at([0, 10], [0.01, 0.0006]) is None
    # lr A: ends lower; lr B: dips lowest but comes back up (non-monotone)
    it = np.arange(0, 100, 10)
    a = np.linspace(1.0, 0.03, len(it))
    b = np.array([1.0, 0.3, 0.01, 0.001, 0.002, 0.1, 0.2, 0.3, 0.3, 0.3])
    runs = []
    for s in range(2):
        for lr, y in ((1e-3, a), (3e-3, b)):
            runs.append(sw.RunSummary(f"{s}{lr}", "", {"task": "romo", "model": "rate", "rule": "eprop", "gain": 1.0,
                                                       "seed": s, "lr": lr, "iters": 100, "floss_iters": 0},
                                      "complete", lr, final_loss=float(y[-3:].mean()), min_loss=float(y.min()),
                                      learned_at=sw.learned_at(it, y), iteration=it, loss=y))
    pick = {sel: next(iter(sw.select_best(runs, sel).values())).lr for sel in sw.SELECT}
    assert pick == {"final": 1e-3, "min": 3e-3, "learning-time": 1e-3}
    rows = sw.summarize(runs, select="min")
    assert rows[0]["best_lr"] == 3e-3 and math.isclose(rows[0]["min_loss"], 0.001)
    assert "by lowest logged loss" in sw.format_summary(rows)
    with pytest.raises(ValueError, match="Invalid select 'best'"):
        sw.select_best(runs, "best")
