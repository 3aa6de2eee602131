"""The bench runs end to end (output schema, not speed) and never times a wrong kernel."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from neuroinit import bench
from neuroinit.cli import main

_MEASURE_DEVICE = bench.machine._measure_device  # before the fixture below stubs it

RESULT_KEYS = {"variant", "hidden", "batch", "steps", "method", "profile", "us_per_step", "us_per_step_q1",
               "us_per_step_q3", "us_per_step_min", "us_per_step_max", "repeats_us", "background_load",
               "sample_steps_per_s", "synaptic_updates_per_s", "peak_memory_mib", "state_bytes", "ratio_to_fused",
               "roofline", "roofline_fraction", "own_roofline_fraction", "fast_path", "chunk_steps", "skipped",
               "threads", "threads_tried", "background_load_window"}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Calibration is cached per test (the machine's cache stays untouched); the fused library is shared."""
    from neuroinit.learning import fused

    fused.available()  # loaded (or built) from the machine's cache before the cache moves
    monkeypatch.setenv("NEUROINIT_CACHE", str(tmp_path / "cache"))
    # a tiny calibration: the schema is under test, not the machine
    monkeypatch.setattr(bench.machine, "_measure_device", lambda device, quick: {
        "bandwidth_gbs": {"L2": 100.0, "L3": 50.0, "DRAM": 20.0}, "matmul_gflops": 50.0,
        "working_set_bytes": {"L2": 1, "L3": 2, "DRAM": 3}, "caches": {"L2": 2 ** 20, "L3": 32 * 2 ** 20},
        "method": "stub"})


def test_quick_bench_end_to_end_writes_the_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.timing, "available_cpus", lambda: 2)  # "best" tries 1 and 2 threads on any host
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "--profile", "loihi-like", "--quick", "--hidden", "8", "--batch", "2",
                                    "--steps", "4", "--repeats", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "roofline" in res.output and "snntorch-bptt" in res.output and "norse-bptt" in res.output
    from neuroinit.learning import fused

    # one check per (variant, method) that can run here: the fused step's three only with a C compiler
    n_checks = 12 if fused.available() else 9   # the fused BPTT runs everywhere (its PyTorch loops without a compiler)
    assert f"gradient checks: {n_checks}/{n_checks} ok" in res.output
    data = json.loads(out.read_text())
    assert data["schema_version"] == bench.SCHEMA_VERSION
    assert {"config", "environment", "calibration", "gradient_checks", "results", "memory_scaling",
            "wall_seconds"} <= set(data)
    env = data["environment"]
    for key in ("cpu_model", "cpu", "caches", "available_cpus", "torch", "torch_threads", "omp_wait_policy",
                "device", "fused"):
        assert key in env
    # calibrated at all CPUs, and at every other count a fused row (with a roofline) was measured at
    fused_counts = {str(r["threads"]) for r in data["results"]
                    if r["method"] == "neuroinit-fused" and r["threads"] is not None}  # None: skipped (no compiler)
    assert data["config"]["threads"] == "best" and set(data["calibrations"]) == {"2"} | fused_counts
    assert data["calibration"] == data["calibrations"]["2"]
    # timestamps carry their offset (UTC): comparable across machines and time zones
    from datetime import datetime

    assert datetime.fromisoformat(data["finished_at"]).utcoffset() is not None
    assert all(datetime.fromisoformat(c["measured_at"]).utcoffset() is not None
               for c in data["calibrations"].values())
    assert data["config"]["profile"] == "loihi-like" and data["config"]["quick"] is True
    rows = data["results"]
    assert all(set(r) == RESULT_KEYS for r in rows)
    if not fused.available():  # no C compiler here: the fused rows say so and nothing is timed under their name
        assert "fused native step is unavailable" in res.output
        skipped = [r for r in rows if r["method"] == "neuroinit-fused"]
        assert skipped and all(r["skipped"].startswith("fused step unavailable") for r in skipped)
        return
    seen = {(r["variant"], r["method"], r["profile"]) for r in rows}
    for variant in ("rate-voltage", "rate-rflo", "lif"):
        assert (variant, "neuroinit-fused", "loihi-like") in seen
        assert (variant, "neuroinit-fused", "ideal") in seen
        for m in ("neuroinit-torch", "autograd-eprop", "bptt"):
            assert (variant, m, "ideal") in seen
    assert ("lif", "snntorch-bptt", "ideal") in seen and ("lif", "norse-bptt", "ideal") in seen
    for r in rows:
        assert r["skipped"] is None
        assert r["us_per_step"] > 0 and len(r["repeats_us"]) == len(r["background_load"]) >= 1
        assert r["us_per_step_min"] <= r["us_per_step"] <= r["us_per_step_max"]
        assert math.isclose(r["sample_steps_per_s"], 2 / (r["us_per_step"] * 1e-6))
        assert r["ratio_to_fused"] > 0
        # "best": both counts timed, interleaved, the one with the lower median reported with its repeats
        tried = r["threads_tried"]
        assert set(tried) == {"1", "2"} and r["threads"] in (1, 2)
        assert tried[str(r["threads"])]["us_per_step"] == r["us_per_step"] == min(v["us_per_step"] for v in
                                                                                  tried.values())
        assert r["background_load_window"] is None or r["background_load_window"] >= 0
        if r["method"] == "neuroinit-fused":
            assert r["roofline_fraction"] > 0 and r["roofline"]["bound_us"] > 0 and r["fast_path"] is True
            # float traces run the chunked exact update (and get its own roofline); chip precision the per-step one
            chunked = r["profile"] == "ideal"
            assert (r["chunk_steps"] is not None) == chunked == ("chunked" in r["roofline"])
            # chip-precision full traces (RFLO, LIF) get the integer trace pass's roofline
            chip = not chunked and r["variant"] != "rate-voltage"
            assert ("chip" in r["roofline"]) == chip
            own = chunked or chip
            assert (r["own_roofline_fraction"] or 0) > 0 if own else r["own_roofline_fraction"] is None
        else:
            assert r["roofline_fraction"] is None
    assert {m["method"] for m in data["memory_scaling"]} == {"neuroinit-fused", "neuroinit-torch", "bptt"}


def test_json_to_stdout_is_quiet_and_parses():
    res = CliRunner().invoke(main, ["bench", "--model", "rate", "--hidden", "6", "--batch", "1", "--steps", "3",
                                    "--repeats", "1", "--methods", "neuroinit-fused,bptt", "--json", "-"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {r["method"] for r in data["results"]} == {"neuroinit-fused", "bptt"}
    assert data["memory_scaling"] == []  # only measured where LIF runs


@pytest.mark.parametrize("args,needle", [
    (["--hidden", "0"], "--hidden"), (["--hidden", "a,b"], "--hidden"), (["--steps", "1"], "steps"),
    (["--methods", "foo"], "method"), (["--profile", "nope"], "nope"), (["--model", "spiking"], "model"),
])
def test_bad_input_exits_with_one_clear_line(args, needle):
    res = CliRunner().invoke(main, ["bench", *args])
    assert res.exit_code != 0
    assert needle in res.output and "Traceback" not in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused_cleanly():
    res = CliRunner().invoke(main, ["bench", "--device", "cuda", "--quick"])
    assert res.exit_code != 0 and "cuda" in res.output and "Traceback" not in res.output


def test_every_timed_method_computes_its_reference_gradient():
    checks = bench.check_gradients()
    assert checks and all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    covered = {(c["variant"], c["method"]) for c in checks}
    from neuroinit.learning import fused

    for variant in bench.MODEL_VARIANTS:
        for method in ("neuroinit-fused", "neuroinit-torch") if fused.available() else ("neuroinit-torch",):
            assert (variant, method) in covered or not bench.method_applies(method, variant)
    for method in ("bptt", "snntorch-bptt", "norse-bptt"):
        assert ("lif", method) in covered


def test_reference_lif_grads_is_neuroinit_bptt():
    cell = bench.make_bench_cell("lif", 10, "ideal", seed=1, dtype=torch.float64)
    batch = bench.make_batch("lif", 8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    task = bench.SyntheticTask(bench.N_IN, bench.N_OUT)
    with torch.no_grad():
        cell.w_in.mul_(3.0)
    bench.BPTT(cell).backward(batch, task)
    ref = bench.reference_lif_grads(cell.params(), batch, task, alpha=float(cell.alpha), kappa=float(cell.kappa),
                                    v_th=1.0, gamma=0.3, reset="subtract", detach_reset=False)
    for name, g in ref.items():
        assert torch.allclose(getattr(cell, name).grad, g, rtol=1e-12, atol=1e-14), name


# the machine is injected: the calibration carries the cache sizes (a 1 MiB L2 and a 32 MiB L3 here)
CALIB = {"bandwidth_gbs": {"L2": 100.0, "L3": 50.0, "DRAM": 20.0}, "matmul_gflops": 50.0,
         "caches": {"L2": 2 ** 20, "L3": 32 * 2 ** 20}}


def _check_roofline_levels(calib: dict) -> None:
    r = bench.roofline("rate-rflo", 512, 64, 0, 0, calib)
    assert r["bytes_per_step"] == 8 * 64 * 512 * 512  # read + write every B x N x N trace element once
    assert r["working_set_bytes"] == 4 * 64 * 512 ** 2 + 8 * 512 ** 2  # 69 MB: past the injected 32 MiB L3
    assert r["memory_level"] == "DRAM" and r["bound_by"] == "memory"
    assert math.isclose(r["bound_us"], 8 * 64 * 512 ** 2 / 20e9 * 1e6)
    mid = bench.roofline("rate-rflo", 256, 8, 0, 0, calib)  # 2.6 MB: between L2 and L3
    assert mid["memory_level"] == "L3" and math.isclose(mid["memory_bound_us"], 8 * 8 * 256 ** 2 / 50e9 * 1e6)
    small = bench.roofline("rate-voltage", 16, 1, 0, 0, calib)
    assert small["bytes_per_step"] == 8 * 16 * 16 and small["memory_level"] == "L2"
    # a calibration without cache sizes streams from DRAM: never the host's caches
    assert bench.roofline("rate-voltage", 16, 1, 0, 0, {**calib, "caches": {}})["memory_level"] == "DRAM"
    # the chip-precision bound places its working set by the same caches (int8 codes: 1 byte per element)
    from neuroinit.bench.chip import chip_roofline

    levels = [chip_roofline(n, b, 0, 1, calib, word_rate=1e9)["memory_level"] for n, b in ((16, 1), (256, 16),
                                                                                             (1024, 64))]
    assert levels == ["L2", "L3", "DRAM"]


def test_roofline_counts_trace_traffic_and_flops():
    _check_roofline_levels(CALIB)


def _fake_host(root, monkeypatch, *, l2: str, l3: str, cpus: int) -> None:
    """Point every host reader of neuroinit at a made-up machine: sysfs cache sizes, /proc/cpuinfo, CPU count."""
    cache = root / "cache"
    for idx, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", l2),
                                               (3, "Unified", l3)]):
        d = cache / f"index{idx}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    cpuinfo = root / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Fake CPU with a {l3} L3\nflags\t\t: fpu sse2\n")
    monkeypatch.setattr(bench.machine, "SYS_CACHE", cache)
    monkeypatch.setattr(bench.machine, "CPUINFO", cpuinfo)
    monkeypatch.setattr(bench.machine.os, "cpu_count", lambda: cpus)


@pytest.mark.parametrize("l2,l3,cpus,l3_bytes", [
    ("256K", "512K", 4, 512 * 1024),        # tiny L3
    ("2048K", "480M", 2, 480 * 2 ** 20),    # huge L3 (the Xeon of issue 15)
    ("1024K", "32M", 1, 32 * 2 ** 20),      # one core
])
def test_host_readers_under_a_faked_host(tmp_path, monkeypatch, l2, l3, cpus, l3_bytes):
    """The host readers report the faked machine, and nothing that is handed a calibration reads it: the
    roofline checks above give the same answers on every host."""
    _fake_host(tmp_path, monkeypatch, l2=l2, l3=l3, cpus=cpus)
    caches = bench.machine._cache_sizes()
    assert caches["L3"] == l3_bytes and caches["L1"] == 48 * 1024  # the instruction cache is left out
    assert bench.machine._cpu_model() == f"Fake CPU with a {l3} L3"
    env = bench.environment()
    assert env["logical_cpus"] == cpus and env["caches"] == caches and env["cpu_model"].startswith("Fake CPU")
    # the bandwidth working sets grow with the caches but stay bounded (a huge L3 does not allocate gigabytes)
    ws = bench.working_sets(caches, quick=True)
    assert ws["L2"] < caches["L2"] and ws["DRAM"] >= 2 * caches["L3"] and ws["DRAM"] <= max(2 * l3_bytes, 2 ** 28)
    _check_roofline_levels(CALIB)
    # a calibration measured here (bandwidth stubbed, matmul timed) records the faked caches and its working sets
    monkeypatch.setattr(bench.machine, "_measure_device", _MEASURE_DEVICE)
    monkeypatch.setattr(bench.machine, "_stream_bandwidth", lambda sizes, quick: {"L2": 100.0, "L3": 50.0, "DRAM": 20.0})
    calib = bench.calibrate(quick=True, use_cache=False)
    assert calib["caches"] == caches and calib["working_set_bytes"] == ws and calib["matmul_gflops"] > 0
    assert calib["key"].startswith(f"Fake CPU with a {l3} L3|")
    # its roofline places the working set by the faked caches (a 69 MB set fits a 480 MiB L3)
    big = bench.roofline("rate-rflo", 512, 64, 0, 0, calib)["memory_level"]
    assert big == ("L3" if l3_bytes > 69 * 10 ** 6 else "DRAM")


def test_the_matmul_rate_is_the_faster_of_torchs_and_the_fused_librarys_own_gemm(monkeypatch):
    # where the fused library takes its GEMMs itself (torch's BLAS runs no AVX-512 code), its rate is the machine's
    monkeypatch.setattr(bench.machine, "_measure_device", _MEASURE_DEVICE)
    monkeypatch.setattr(bench.machine, "_stream_bandwidth",
                        lambda sizes, quick: {"L2": 100.0, "L3": 50.0, "DRAM": 20.0})
    monkeypatch.setattr(bench.machine, "_own_gemm_gflops", lambda n, repeats: 1e4)
    calib = bench.calibrate(quick=True, use_cache=False)
    assert calib["matmul_gflops"] == 1e4 and "ni_gemm_tn" in calib["method"]
    monkeypatch.setattr(bench.machine, "_own_gemm_gflops", lambda n, repeats: None)
    calib = bench.calibrate(quick=True, use_cache=False)
    assert 0 < calib["matmul_gflops"] < 1e4 and "torch matmul" in calib["method"]


def test_markdown_table_renders_every_row(tmp_path):
    cfg = bench.BenchConfig(models="lif", hidden=(6,), batch=(1,), steps=3, repeats=1,
                            methods=("neuroinit-fused", "snntorch-bptt"), memory_scaling=False)
    result = bench.run_bench(cfg)
    md = bench.format_table(result, markdown=True)
    lines = [ln for ln in md.splitlines() if ln.startswith("| lif")]
    assert len(lines) == 2 and all(ln.count("|") == len(bench.TABLE_HEADER) + 1 for ln in lines)


def test_chunked_roofline_counts_the_carried_traces_only_for_long_trials():
    calib = {"bandwidth_gbs": {"L2": 100.0, "L3": 50.0, "DRAM": 20.0}, "matmul_gflops": 100.0}
    n, b, i, o = 64, 4, 8, 2
    one = bench.roofline("lif", n, b, i, o, calib, steps=100, chunk=100)["chunked"]
    four = bench.roofline("lif", n, b, i, o, calib, steps=100, chunk=25)["chunked"]
    forward, grad = 2 * b * n * (n + i + o), 2 * b * n * (n + i + 1)
    assert one["boundaries"] == 0 and one["flops_per_step"] == forward + grad and one["bytes_per_step"] == 0
    # three boundaries, each a GEMM over the chunk's 25 steps into the B N (N + I + 1) traces
    assert four["boundaries"] == 3
    assert math.isclose(four["flops_per_step"], forward + grad + grad * 25 * 3 / 100)
    assert bench.roofline("rate-voltage", n, b, i, o, calib, steps=100, chunk=25)["chunked"]["boundaries"] == 0
    assert "chunked" not in bench.roofline("lif", n, b, i, o, calib)


def test_bench_help_lists_every_method():
    res = CliRunner().invoke(main, ["bench", "--help"])
    assert res.exit_code == 0
    listed = " ".join(res.output.split()).replace("- ", "-")  # click wraps the help text (also at hyphens)
    for method in bench.METHODS:
        assert method in listed


# ------------------------------------------------------------------------------------------ calibration checks
def _measurement(l2: float, l3: float, dram: float, gflops: float = 50.0) -> dict:
    return {"bandwidth_gbs": {"L2": l2, "L3": l3, "DRAM": dram}, "matmul_gflops": gflops,
            "working_set_bytes": {"L2": 1, "L3": 2, "DRAM": 3}, "caches": {"L2": 2 ** 20, "L3": 32 * 2 ** 20},
            "method": "injected"}


def _inject(monkeypatch, measurements: list[dict]) -> list[dict]:
    """``_measure_device`` hands out ``measurements`` in order; returns the list of those not yet taken."""
    left = list(measurements)
    monkeypatch.setattr(bench.machine, "_measure_device", lambda device, quick: left.pop(0))
    return left


@pytest.mark.parametrize("calib,problem", [
    (_measurement(100.0, 50.0, 20.0), None),
    (_measurement(90.0, 100.0, 20.0), None),                       # within the 15% tolerance
    (_measurement(2.7, 50.0, 20.0), "L2 bandwidth 2.7 GB/s is below L3"),  # issue 16: L2 below DRAM
    (_measurement(100.0, 10.0, 20.0), "L3 bandwidth 10.0 GB/s is below DRAM"),
    (_measurement(100.0, 50.0, float("nan")), "DRAM bandwidth nan"),
    (_measurement(100.0, 50.0, 20.0, gflops=0.2), "matmul rate 0.2"),
    (_measurement(100.0, 50.0, 20.0, gflops=float("inf")), "matmul rate inf"),
])
def test_calibration_problems_name_what_contradicts_the_hierarchy(calib, problem):
    problems = bench.calibration_problems(calib)
    assert problems == [] if problem is None else any(p.startswith(problem) for p in problems), problems


def test_contradicting_calibration_is_measured_again_and_the_sane_one_cached(monkeypatch):
    left = _inject(monkeypatch, [_measurement(2.7, 50.0, 20.0), _measurement(80.0, 40.0, 18.0),
                                 _measurement(1.0, 1.0, 1.0)])
    calib = bench.calibrate(use_cache=True)
    # per level the fastest of the two measurements (a busy machine only slows a run down): L2 80, L3 50, DRAM 20
    assert calib["attempts"] == 2 and calib["suspect"] is False and calib["problems"] == []
    assert calib["bandwidth_gbs"] == {"L2": 80.0, "L3": 50.0, "DRAM": 20.0} and calib["cached"] is False
    assert len(left) == 1
    again = bench.calibrate(use_cache=True)  # read back from the cache: nothing measured
    assert again["cached"] is True and again["bandwidth_gbs"] == calib["bandwidth_gbs"] and len(left) == 1


def test_calibration_that_stays_contradicting_is_suspect_and_never_cached(monkeypatch):
    bad = _measurement(2.7, 50.0, 20.0)
    left = _inject(monkeypatch, [bad] * (bench.CALIB_ATTEMPTS + 1) + [_measurement(100.0, 50.0, 20.0)])
    calib = bench.calibrate(use_cache=True)
    assert calib["suspect"] is True and calib["attempts"] == bench.CALIB_ATTEMPTS and calib["cached"] is False
    assert any("L2 bandwidth 2.7" in p for p in calib["problems"])
    assert len(left) == 2 and not bench.machine._calib_path().exists()
    # the table carries the warning
    result = {"config": {"threads": "best"}, "results": [], "gradient_checks": [], "calibrations": {"1": calib},
              "calibration": calib, "environment": bench.environment()}
    assert "WARNING: calibration at 1 thread(s) is suspect" in bench.format_table(result)
    again = bench.calibrate(use_cache=True)  # the next run measures again: once more bad, then sane
    assert again["cached"] is False and again["attempts"] == 2 and again["suspect"] is False and not left
    assert bench.calibrate(use_cache=True)["cached"] is True


def test_the_cli_warns_of_a_suspect_calibration_and_still_runs(monkeypatch):
    monkeypatch.setattr(bench.machine, "_measure_device", lambda device, quick: _measurement(2.7, 50.0, 20.0))
    res = CliRunner().invoke(main, ["bench", "--model", "lif", "--hidden", "6", "--batch", "1", "--steps", "3",
                                    "--repeats", "1", "--threads", "1", "--methods", "bptt", "--no-memory-scaling"])
    assert res.exit_code == 0, res.output
    assert "warning: the calibration at 1 thread(s) contradicts the memory hierarchy" in res.stderr
    assert "WARNING: calibration at 1 thread(s) is suspect" in res.stdout


def test_a_cached_contradicting_calibration_is_measured_again(monkeypatch):
    """A calibration cached by an earlier version (one entry with its key, before the check) is not trusted."""
    path = bench.machine._calib_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**_measurement(2.7, 50.0, 20.0), "key": bench.machine._calib_key("cpu")}))
    left = _inject(monkeypatch, [_measurement(100.0, 50.0, 20.0)])
    calib = bench.calibrate(use_cache=True)
    assert calib["cached"] is False and calib["bandwidth_gbs"]["L2"] == 100.0 and not left
    assert bench.calibrate(use_cache=True)["cached"] is True


def test_a_calibration_is_not_reused_on_a_host_with_other_caches(tmp_path, monkeypatch):
    """Hosts under one generic model name (a hypervisor's) sharing one cache directory: each has its own key."""
    _fake_host(tmp_path / "a", monkeypatch, l2="1024K", l3="32M", cpus=2)
    same_name = bench.machine.CPUINFO
    key_a = bench.machine._calib_key("cpu")
    _fake_host(tmp_path / "b", monkeypatch, l2="1024K", l3="480M", cpus=2)
    monkeypatch.setattr(bench.machine, "CPUINFO", same_name)
    assert bench.machine._cpu_model() == "Fake CPU with a 32M L3"
    assert bench.machine._calib_key("cpu") != key_a
    left = _inject(monkeypatch, [_measurement(100.0, 50.0, 20.0), _measurement(150.0, 90.0, 25.0)])
    bench.calibrate(threads=1)
    _fake_host(tmp_path / "c", monkeypatch, l2="1024K", l3="32M", cpus=2)
    monkeypatch.setattr(bench.machine, "CPUINFO", same_name)
    assert bench.calibrate(threads=1)["cached"] is False and not left


def test_calibrations_are_cached_per_thread_count(monkeypatch):
    left = _inject(monkeypatch, [_measurement(100.0, 50.0, 20.0), _measurement(150.0, 90.0, 25.0)])
    one, two = bench.calibrate(threads=1), bench.calibrate(threads=2)
    assert (one["threads"], two["threads"]) == (1, 2) and one["key"] != two["key"] and not left
    assert bench.calibrate(threads=1)["bandwidth_gbs"]["L2"] == 100.0
    assert bench.calibrate(threads=2)["bandwidth_gbs"]["L2"] == 150.0


# ------------------------------------------------------------------------------------------ thread counts
def test_methods_and_thread_counts_are_interleaved_within_every_repeat():
    seen = []

    def trial(name):
        def run():
            seen.append((name, torch.get_num_threads()))
        return run

    before = torch.get_num_threads()
    cfg = bench.BenchConfig(steps=10, repeats=3)
    entries = [bench.timing._Entry(bench.Result("lif", 8, 1, 10, m, "ideal"), trial(m), counts)
               for m, counts in (("a", (1, 2)), ("b", (1, 2)), ("c", (1,)))]
    bench.timing._measure(entries, lambda: None, cfg)
    warm_up = [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("c", 1)]  # each row at each of its counts
    # then per repeat, every row at every count: an untimed trial right before the timed one (warm caches)
    assert seen == warm_up + [("a", 1), ("a", 1), ("a", 2), ("a", 2), ("b", 1), ("b", 1), ("b", 2), ("b", 2),
                              ("c", 1), ("c", 1)] * 3
    for e in entries:
        assert e.repeats == 3 and {t: len(v) for t, v in e.times.items()} == {t: 3 for t in e.counts}
        assert e.res.peak_memory_mib is None or e.res.peak_memory_mib >= 0
    assert torch.get_num_threads() == before


def test_best_thread_count_is_the_lower_median():
    entry = bench.timing._Entry(bench.Result("lif", 8, 2, 10, "bptt", "ideal"), lambda: None, (1, 2),
                                times={1: [30.0, 10.0, 11.0], 2: [5.0, 12.0, 13.0]}, loads={1: [0.0] * 3, 2: [0.1] * 3})
    res = bench.timing._summarise(entry, 0.5)
    # count 1: median 11 (min 10); count 2: median 12 (min 5): the median decides, both are kept
    assert res.threads == 1 and res.us_per_step == 11.0 and res.us_per_step_min == 10.0
    assert res.threads_tried == {"1": {"us_per_step": 11.0, "us_per_step_min": 10.0},
                                 "2": {"us_per_step": 12.0, "us_per_step_min": 5.0}}
    assert res.background_load_window == 0.5 and res.background_load == [0.0] * 3


@pytest.mark.parametrize("threads,cpus,counts,jobs_per_config", [
    ("best", 2, (1, 2), 1), ("best", 1, (1,), 1), ("best", 16, (1, 16), 1), ((1, 2), 2, (1, 2), 2),
    ((4,), 2, (4,), 1),
])
def test_best_mode_times_one_thread_and_all_cpus(threads, cpus, counts, jobs_per_config):
    cfg = bench.BenchConfig(models="lif", hidden=(8,), batch=(1,), methods=("bptt",), threads=threads)
    assert cfg.thread_counts(cpus) == counts
    jobs = bench.timing.planned_rows(cfg, cpus)
    assert len(jobs) == jobs_per_config
    assert [j[-1] for j in jobs] == ([counts] if threads == "best" else [(t,) for t in counts])


@pytest.mark.parametrize("threads", ["", "0", "x", "1,-2"])
def test_bad_thread_counts_exit_with_one_clear_line(threads):
    res = CliRunner().invoke(main, ["bench", "--threads", threads])
    assert res.exit_code != 0 and "--threads" in res.output and "Traceback" not in res.output


def test_results_of_schema_2_still_render():
    """Stored results from before per-row thread counts (benchmarks/results/*-t1.json) render and are evaluated."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    old = json.loads((root / "cpu-lif-loihi-like-t1.json").read_text())
    assert old["schema_version"] == 2
    table = bench.format_table(old)
    assert "results of schema < 3" in table and "calibration at 1 thread(s)" in table


_SMALL = ["bench", "--model", "rate", "--hidden", "6", "--batch", "1,2", "--steps", "3", "--repeats", "1",
          "--threads", "1", "--methods", "autograd-eprop,bptt", "--no-memory-scaling"]


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    # the results land in OUT.partial.jsonl as they are measured; a killed run is continued with --resume: the
    # configurations already timed are kept as they were, the others timed, and OUT written in full
    out = tmp_path / "b.json"
    timed = []
    real = bench.timing.time_configuration

    def interrupted(variant, n, b, rows, cfg, failed=frozenset()):
        if len(timed) == 2:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) during the third configuration
        timed.append((variant, n, b))
        return real(variant, n, b, rows, cfg, failed)

    monkeypatch.setattr(bench.timing, "time_configuration", interrupted)
    res = CliRunner().invoke(main, [*_SMALL, "--json", str(out)])
    assert res.exit_code != 0 and not out.exists()
    partial = tmp_path / "b.json.partial.jsonl"
    kept = [json.loads(line) for line in partial.read_text().splitlines()[1:]]
    assert len(kept) == 4  # two configurations (rate-voltage at B = 1 and 2), two methods each
    # a new run does not silently drop them
    res = CliRunner().invoke(main, [*_SMALL, "--json", str(out)])
    assert res.exit_code == 1 and "holds 4 results of an interrupted run: add --resume" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # another configuration cannot continue them
    res = CliRunner().invoke(main, [*[("1,4" if a == "1,2" else a) for a in _SMALL], "--json", str(out), "--resume"])
    assert res.exit_code == 1 and "it was made with another configuration (batch: stored [1, 2] vs [1, 4])" \
        in res.output
    timed.clear()

    def counted(variant, n, b, rows, cfg, failed=frozenset()):
        timed.append((variant, n, b))
        return real(variant, n, b, rows, cfg, failed)

    monkeypatch.setattr(bench.timing, "time_configuration", counted)
    res = CliRunner().invoke(main, [*_SMALL, "--json", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert sorted(timed) == [("rate-rflo", 6, 1), ("rate-rflo", 6, 2)]  # only what was missing
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 8 and not partial.exists()
    for k in kept:  # the kept rows as they were measured (ratios are recomputed over the whole run)
        match = [r for r in rows if (r["variant"], r["batch"], r["method"]) == (k["variant"], k["batch"], k["method"])]
        assert len(match) == 1 and match[0]["repeats_us"] == k["repeats_us"]


def test_resume_needs_a_file_to_continue(tmp_path):
    res = CliRunner().invoke(main, [*_SMALL, "--resume"])
    assert res.exit_code == 2 and "--resume" in res.output and "needs --json OUT" in res.output
    res = CliRunner().invoke(main, [*_SMALL, "--json", str(tmp_path / "b.json"), "--resume"])
    assert res.exit_code == 1 and "nothing was interrupted" in res.output
    res = CliRunner().invoke(main, [*_SMALL, "--json", str(tmp_path / "missing" / "b.json")])
    assert res.exit_code == 1 and "Invalid --json" in res.output and "does not exist" in res.output  # before the run
    assert len(res.output.strip().splitlines()) == 1


def test_the_json_file_is_strict_json(tmp_path, monkeypatch):
    # non-finite numbers (a roofline over a zero-time row, an ideal profile's infinite range) are written as null,
    # so that every JSON reader can parse the file
    real = bench.run_bench

    def with_nan(cfg, **kw):
        result = real(cfg, **kw)
        result["results"][0]["ratio_to_fused"] = float("nan")
        result["calibration"]["odd"] = float("inf")
        return result

    monkeypatch.setattr(bench, "run_bench", with_nan)
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, [*_SMALL, "--json", str(out)])
    assert res.exit_code == 0, res.output

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(out.read_text(), parse_constant=refuse)
    assert data["results"][0]["ratio_to_fused"] is None and data["calibration"]["odd"] is None
