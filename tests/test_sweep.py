"""Sweeps: spec validation before any run, the local pool, a real Dask LocalCluster, a scheduler and a worker
started as separate processes on 127.0.0.1, kill-and-resume, failures recorded without stopping the others,
best learning rate per condition."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from neuroinit.cli import main
from neuroinit.experiments import sweep as sw

# 2 gains x 2 rules x 2 seeds, a few iterations of an 8-neuron network: ~1 s a run on a loaded 2-core box.
TINY = """
name = "tiny"
[base]
hidden = 8
batch = 4
iters = 3
log_every = 1
eval_batch = 8
lyapunov = false
[grid]
rule = ["bptt", "eprop"]
gain = [0.5, 1.5]
seed = [0, 1]
"""

REPO = Path(__file__).resolve().parents[1]


def write_spec(tmp_path: Path, text: str = TINY, name: str = "spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def finished_files(sweep_dir: Path) -> list[Path]:
    return sorted((sweep_dir / sw.RUNS_DIR).glob("*.h5"))


def assert_complete_once(spec: sw.SweepSpec, sweep_dir: Path) -> None:
    """Every planned run is present exactly once, finished by content, and the ledger agrees."""
    files = finished_files(sweep_dir)
    assert sorted(f.name for f in files) == sorted(Path(r.file).name for r in spec.runs)
    for r in spec.runs:
        assert sw.run_state(sweep_dir / r.file, r.config)[0] == "complete", r.describe()
    ledger = sw.read_manifest(sweep_dir)
    assert sorted(ledger["specs"][spec.name]["runs"]) == sorted(r.run_id for r in spec.runs)
    assert {ledger["runs"][r.run_id]["status"] for r in spec.runs} == {"complete"}
    assert not list((sweep_dir / sw.RUNS_DIR).glob(".*.tmp")), "temporary files left behind"


def final_losses(sweep_dir: Path) -> dict[str, float]:
    return {r.run_id: r.final_loss for r in sw.summaries_from_dir(sweep_dir, curves=False)}


# ------------------------------------------------------------------------------------------ the spec

def test_spec_expands_the_grid_with_content_ids(tmp_path):
    text = TINY.replace('rule = ["bptt", "eprop"]', 'rule = ["bptt", "eprop+flossing"]') + "lr_scale = [0.5, 1.0]\n"
    spec = sw.load_spec(write_spec(tmp_path, text))
    assert len(spec.runs) == 2 * 2 * 2 * 2
    ids = [r.run_id for r in spec.runs]
    assert len(set(ids)) == len(ids)
    assert ids == [r.run_id for r in sw.load_spec(write_spec(tmp_path, text, "again.toml")).runs]
    floss = [r for r in spec.runs if r.rule == "eprop+flossing"]
    assert floss and all(r.config.rule == "eprop" and r.config.floss_iters == 100 and r.config.floss_mode == "local"
                         for r in floss)
    assert {r.config.lr for r in spec.runs} == {0.5 * 0.05 / 8, 0.05 / 8}
    # ids depend on content only, not on the checkpoint frequency (it does not change the result)
    r = spec.runs[0]
    assert sw.run_id(r.config) == sw.run_id({**r.config.to_dict(), "checkpoint_every": 7})
    assert r.file.startswith("runs/") and r.file.endswith(f"_{r.run_id}.h5")


def test_spec_gain_and_seed_ranges_and_blocks(tmp_path):
    text = """
[base]
hidden = 8
iters = 2
[[grid]]
model = "rate"
gain = {start = 0.0, stop = 3.0, step = 0.3}
seed = {start = 0, count = 5}
[[grid]]
model = "lif"
rule = "eprop"
gain = 1.0
base = {dt_ms = 10.0}
"""
    spec = sw.load_spec(write_spec(tmp_path, text))
    rate = [r for r in spec.runs if r.config.model == "rate"]
    assert sorted({r.config.gain for r in rate}) == pytest.approx([round(0.3 * i, 10) for i in range(11)])
    assert len(rate) == 11 * 5
    lif = [r for r in spec.runs if r.config.model == "lif"]
    assert len(lif) == 1 and lif[0].config.dt_ms == 10.0


BAD_SPECS = [
    ("colour = 1\n" + TINY, "unknown key(s) ['colour']"),
    (TINY.replace("hidden = 8", "hiden = 8"), "unknown key [base].hiden"),
    (TINY.replace("hidden = 8", "gain = 2.0"), "'gain' is set by [grid]"),
    (TINY.replace('rule = ["bptt", "eprop"]', 'rule = ["bptt", "backprop"]'), "invalid rule 'backprop'"),
    (TINY.replace("gain = [0.5, 1.5]", "gain = [0.5, -1.0]"), "Invalid gain -1.0"),
    (TINY.replace("hidden = 8", "hidden = 0"), "Invalid hidden 0"),
    (TINY.replace("seed = [0, 1]", "seed = []"), "seed is an empty list"),
    (TINY.replace("gain = [0.5, 1.5]", "gain = [0.5, 0.5]"), "gain repeats"),
    (TINY + "lr = [1e-3]\nlr_scale = [1.0]\n", "give lr or lr_scale, not both"),
    (TINY + "lr = [0.0]\n", "invalid learning rate 0.0"),
    (TINY.replace("[grid]", "[grid]\nwidth = 3"), "unknown key(s) ['width'] in [grid]"),
    (TINY.replace("hidden = 8", "profile = 'nope'"), "'profile' is set by [grid]"),
    (TINY + 'profile = "no-such-chip"\n', "no-such-chip"),
    (TINY.replace("iters = 3", "iters = 3\nlyapunov_k = 9"), "Invalid lyapunov_k 9"),
    ("name = 'x'\n[grid\n", "not valid TOML"),
]


@pytest.mark.parametrize("text, message", BAD_SPECS)
def test_bad_spec_fails_before_any_run(tmp_path, text, message):
    spec = write_spec(tmp_path, text)
    out = tmp_path / "out"
    with pytest.raises(sw.SpecError) as err:
        sw.run_sweep(spec, out, workers=0)
    assert message in str(err.value)
    assert str(spec) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_bad_spec_on_the_command_line_is_one_line(tmp_path):
    spec = write_spec(tmp_path, TINY.replace("hidden = 8", "hidden = -3"))
    res = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert res.exit_code != 0
    assert "Invalid hidden -3" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(main, ["sweep", str(tmp_path / "missing.toml")])
    assert res.exit_code != 0 and "no such spec file" in res.output


def test_dry_run_lists_the_planned_runs_and_writes_nothing(tmp_path):
    spec = write_spec(tmp_path, TINY)
    plan = sw.load_spec(spec)
    res = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert [ln.split()[:2] for ln in lines[:-1]] == [[r.run_id, "missing"] for r in plan.runs]
    assert lines[-1] == f"{len(plan.runs)} runs in {plan.name!r}, 0 finished in {tmp_path / 'out'}"
    res = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(tmp_path / "out"), "--dry-run", "--json"])
    doc = json.loads(res.stdout)
    assert doc["total"] == len(plan.runs) and {r["state"] for r in doc["runs"]} == {"missing"}
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ executors

def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory):
    """A Dask scheduler and a worker started as separate processes on 127.0.0.1 (the worker preloads the
    training code). Started by the first executor test, so they boot while the pool sweep runs; always stopped."""
    pytest.importorskip("distributed")
    tmp = tmp_path_factory.mktemp("dask")
    sched_file = tmp / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = []
    with open(tmp / "dask.log", "w") as log:
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                                           "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                                           str(sched_file)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp))
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                           str(sched_file), "--nthreads", "2", "--no-nanny", "--no-dashboard",
                                           "--host", "127.0.0.1", "--preload", "neuroinit.experiments.train"],
                                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp))
            yield sched_file, procs, tmp / "dask.log"
        finally:
            for p in reversed(procs):
                _stop(p)


@pytest.fixture(scope="module")
def pool_sweep(tmp_path_factory, external_cluster):
    """The tiny sweep on the local process pool (2 workers)."""
    tmp = tmp_path_factory.mktemp("pool")
    spec = sw.load_spec(write_spec(tmp))
    report = sw.run_sweep(spec, tmp / "out", workers=2)
    return spec, tmp / "out", report


def test_local_pool_runs_the_tiny_sweep(pool_sweep, tmp_path):
    spec, out, report = pool_sweep
    assert report.total == 8 and report.ran == 8 and report.counts == {"complete": 8}
    assert report.executor.startswith("local pool")
    assert_complete_once(spec, out)
    rows = sw.summarize(sw.summaries_from_dir(out))
    assert len(rows) == 4 and all(r["seeds"] == "2/2" for r in rows)
    assert "best lr" in sw.format_summary(rows)
    # rerunning skips every finished run (checked by content) and starts no worker
    again = sw.run_sweep(spec, out, workers=2)
    assert again.skipped == 8 and again.ran == 0
    # the CLI on the finished directory: summary as JSON, no progress bar on stdout
    res = CliRunner().invoke(main, ["sweep", spec.path, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["report"]["skipped"] == 8 and len(data["summary"]) == 4


# distributed's in-process scheduler leaves a listening socket to the garbage collector on close
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_dask_local_cluster_gives_the_same_results(pool_sweep, tmp_path):
    distributed = pytest.importorskip("distributed")
    spec, pool_out, _ = pool_sweep
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0",
                                  silence_logs=50) as cluster:
        report = sw.run_sweep(spec, tmp_path / "out", scheduler=cluster.scheduler_address)
    assert report.counts == {"complete": 8} and report.executor.startswith("dask")
    assert_complete_once(spec, tmp_path / "out")
    assert final_losses(tmp_path / "out") == final_losses(pool_out)  # where a run ran does not matter


def test_dask_scheduler_and_worker_as_separate_processes(pool_sweep, external_cluster, tmp_path):
    spec, pool_out, _ = pool_sweep
    sched_file, procs, log = external_cluster
    deadline = time.monotonic() + 60
    while not sched_file.exists():
        assert all(p.poll() is None for p in procs), log.read_text()
        assert time.monotonic() < deadline, "the scheduler did not start"
        time.sleep(0.1)
    address = json.loads(sched_file.read_text())["address"]
    assert address.startswith("tcp://127.0.0.1:")
    report = sw.run_sweep(spec, tmp_path / "out", scheduler=address)
    assert report.counts == {"complete": 8}, report.failed
    assert address in report.executor
    assert_complete_once(spec, tmp_path / "out")
    assert final_losses(tmp_path / "out") == final_losses(pool_out)


def test_unreachable_scheduler_is_one_clear_error(tmp_path):
    pytest.importorskip("distributed")
    with pytest.raises(sw.SweepError) as err:
        sw.run_sweep(write_spec(tmp_path), tmp_path / "out", scheduler="tcp://127.0.0.1:1", connect_timeout=1)
    assert str(err.value).startswith("Cannot reach the Dask scheduler at tcp://127.0.0.1:1")
    assert "\n" not in str(err.value)


def test_worker_without_the_sweep_directory_sends_the_file_back(tmp_path):
    spec = sw.load_spec(write_spec(tmp_path))
    run = spec.runs[0]
    target = tmp_path / "out" / run.file
    target.parent.mkdir(parents=True)
    res = sw.execute_run({"run_id": run.run_id, "config": run.config.to_dict(), "path": str(target),
                          "token": "not-this-directory", "threads": 1})
    assert res["status"] == "complete", res["error"]
    assert not target.exists() and res["file_bytes"][:8] == b"\x89HDF\r\n\x1a\n"
    target.write_bytes(res["file_bytes"])
    assert sw.run_state(target, run.config)[0] == "complete"


# ------------------------------------------------------------------------------------------ faults

def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_killed_sweep_resumes_with_every_run_once(tmp_path):
    text = TINY.replace("iters = 3", "iters = 8\ncheckpoint_every = 2")
    spec_path = write_spec(tmp_path, text)
    spec = sw.load_spec(spec_path)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "neuroinit.cli", "sweep", str(spec_path), "--out", str(out),
                             "--workers", "1", "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=REPO, start_new_session=True)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the sweep finished no run in time"
            workers |= set(_descendants(proc.pid))
            done = [r for r in spec.runs if (out / r.file).exists()
                    and sw.run_state(out / r.file, r.config)[0] == "complete"]
            if len(done) >= 2:
                break
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the sweep process only: its pool worker must die with it
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), [Path(f"/proc/{w}/cmdline").read_bytes() for w in workers if _alive(w)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        proc.stderr.close()
    report = sw.run_sweep(spec, out, workers=0)
    assert report.skipped >= 2 and report.ran >= 1 and report.skipped + report.ran == 8
    assert report.counts == {"complete": 8}
    assert_complete_once(spec, out)


def test_failing_run_is_recorded_and_does_not_stop_the_others(tmp_path, monkeypatch):
    from neuroinit.experiments import train as train_mod

    spec = sw.load_spec(write_spec(tmp_path))
    bad = spec.runs[1]
    real_train = train_mod.train

    def flaky(config, out_path, **kw):
        if sw.run_id(config) == bad.run_id:
            raise RuntimeError("simulated out-of-memory")
        return real_train(config, out_path, **kw)

    monkeypatch.setattr(train_mod, "train", flaky)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["sweep", str(spec.path), "--out", str(out), "--workers", "0"])
    assert res.exit_code == 1
    assert "1 run(s) failed" in res.output and "simulated out-of-memory" in res.output
    ledger = sw.read_manifest(out)
    rec = ledger["runs"][bad.run_id]
    assert rec["status"] == "failed" and "RuntimeError: simulated out-of-memory" in rec["error"]
    assert "Traceback" in rec["traceback"]
    assert sum(r["status"] == "complete" for r in ledger["runs"].values()) == 7
    monkeypatch.setattr(train_mod, "train", real_train)
    report = sw.run_sweep(spec, out, workers=0)  # the failed run is retried
    assert report.ran == 1 and report.counts == {"complete": 8}
    assert sw.read_manifest(out)["runs"][bad.run_id]["attempts"] == 2


def test_corrupt_run_file_is_not_taken_as_finished(pool_sweep, tmp_path):
    spec, pool_out, _ = pool_sweep
    out = tmp_path / "out"
    (out / sw.RUNS_DIR).mkdir(parents=True)
    run = spec.runs[0]
    (out / run.file).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # exists, truncated
    other = spec.runs[1]
    # a complete file of another config under this run's name
    (out / other.file).write_bytes((pool_out / spec.runs[2].file).read_bytes())
    assert sw.run_state(out / run.file, run.config)[0] == "corrupt"
    assert sw.run_state(out / other.file, other.config)[0] == "mismatch"
    sub = sw.SweepSpec(spec.name, "", spec.path, "", (run, other))
    report = sw.run_sweep(sub, out, workers=0)
    assert report.ran == 2 and report.counts == {"complete": 2}


def test_second_sweep_on_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with sw._lock(out), pytest.raises(sw.SweepError, match="Another sweep is running"):
        sw.run_sweep(write_spec(tmp_path), out, workers=0)


# ------------------------------------------------------------------------------------------ best learning rate

def _rs(seed, lr, loss, status="complete", gain=1.0):
    cfg = {"task": "romo", "model": "rate", "rule": "eprop", "gain": gain, "seed": seed, "lr": lr, "floss_iters": 0}
    return sw.RunSummary(f"{seed}-{lr}-{gain}", "", cfg, status, lr, final_loss=loss)


def test_best_learning_rate_is_the_lowest_mean_over_seeds():
    runs = [_rs(0, 1e-3, 0.10), _rs(1, 1e-3, 0.30),      # mean 0.20
            _rs(0, 3e-3, 0.15), _rs(1, 3e-3, 0.17),      # mean 0.16: best
            _rs(0, 1e-2, 0.01), _rs(1, 1e-2, None, "diverged"),  # lowest loss but a seed diverged
            _rs(0, 1e-3, 0.5, gain=2.0), _rs(0, 3e-3, 0.4, gain=2.0)]
    best = sw.select_best(runs)
    assert len(best) == 2
    by_gain = {b.runs[0].config["gain"]: b for b in best.values()}
    assert by_gain[1.0].lr == 3e-3 and by_gain[1.0].mean_final_loss == pytest.approx(0.16)
    assert by_gain[1.0].per_lr[1e-2][:2] == (1, 2)
    assert by_gain[2.0].lr == 3e-3
    rows = sw.summarize(runs)
    assert [r["best_lr"] for r in rows] == [3e-3, 3e-3]
    assert math.isclose(rows[0]["final_loss"], 0.16)
