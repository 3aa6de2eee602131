"""benchmarks/targets.py: the project's performance targets, judged on stored and on made-up bench results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


def _targets():
    spec = importlib.util.spec_from_file_location("neuroinit_benchmark_targets", ROOT / "targets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(variant, method, us, *, batch=16, profile="ideal", **extra):
    return {"variant": variant, "method": method, "hidden": 256, "batch": batch, "profile": profile,
            "us_per_step": us, "us_per_step_min": us, **extra}


def test_stored_schema_2_results_are_judged():
    old = json.loads((ROOT / "results" / "cpu-lif-loihi-like-t1.json").read_text())
    margins = [t for t in _targets().evaluate_targets([old]) if "snntorch" in t["target"]]
    assert margins[0]["met"] is True and "thread(s)" not in margins[0]["measured"]


def test_chip_rows_are_judged_against_float_peers_and_their_own_roofline():
    chip = {"chip": {"bound_us": 100.0}}
    rows = [_row("lif", "neuroinit-fused", 50.0),
            _row("lif", "neuroinit-fused", 200.0, profile="loihi-like", roofline=chip, own_roofline_fraction=0.5),
            _row("lif", "autograd-eprop", 250.0), _row("lif", "norse-bptt", 300.0),
            _row("lif", "neuroinit-fused", 400.0, batch=64, profile="loihi-like", roofline=chip,
                 own_roofline_fraction=0.25),
            _row("lif", "neuroinit-fused", 100.0, batch=64), _row("lif", "autograd-eprop", 350.0, batch=64)]
    got = {t["target"]: t["met"] for t in _targets().evaluate_targets([{"results": rows}])}
    assert got["chip row within 3x of the float fused row: lif loihi-like N=256 B=16"] is False   # 4x
    assert got["chip row faster than every peer: lif loihi-like N=256 B=16"] is True
    assert got[">= 50% of the chip path's own roofline: lif loihi-like N=256 B=16"] is True
    assert got["chip row within 3x of the float fused row: lif loihi-like N=256 B=64"] is False
    assert got["chip row faster than every peer: lif loihi-like N=256 B=64"] is False   # 400 vs 350
    assert got[">= 50% of the chip path's own roofline: lif loihi-like N=256 B=64"] is False
