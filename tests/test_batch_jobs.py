"""Batch jobs (issue 15): the CLI with its output redirected (no terminal), resume semantics, one writer per run
file or sweep directory, kills at chosen points (checkpoint writes included) that resume bit for bit, a missing
or broken C compiler that is reported, and same seed -> same file.

Kills are placed deterministically (the child kills itself at the n-th write, rename or batch), not by timing,
so these tests hold on a slow or busy machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from neuroinit.cli import main
from neuroinit.experiments import sweep as sw
from neuroinit.io.runfile import lock_holder, lock_path, read_run, run_file_lock
from neuroinit.learning import fused

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = ("w_in", "w_rec", "bias", "w_out", "b_out")
# a tiny LIF e-prop run (the fused step where it exists): 12 iterations, a checkpoint every 3
TRAIN = ["train", "--model", "lif", "--rule", "eprop", "--hidden", "12", "--batch", "4", "--iters", "12",
         "--dt-ms", "10", "--lr", "1e-2", "--eval-batch", "8", "--no-lyapunov", "--gain", "1.5",
         "--checkpoint-every", "3", "--log-every", "1", "--seed", "5"]

# Runs the CLI and, when NI_KILL = "MODE:N" is set, SIGKILLs itself at the N-th event of MODE: "write" (inside the
# HDF5 write of a checkpoint: the temporary file is half written), "rename" (the temporary file is complete, not
# yet renamed), "batch" (inside an iteration, between checkpoints); "term" sends itself SIGTERM at the N-th batch.
_CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    mode, _, n = os.environ.get("NI_KILL", "none:0").partition(":")
    count = [0]
    def hit(sig=signal.SIGKILL):
        count[0] += 1
        if count[0] == int(n):
            os.kill(os.getpid(), sig)
    if mode == "write":
        import neuroinit.io.runfile as rf
        orig_ck = rf._write_checkpoint
        def write_checkpoint(group, ck):
            orig_ck(group, ck)
            hit()
        rf._write_checkpoint = write_checkpoint
    elif mode == "rename":
        import neuroinit.io.atomic as at
        orig_fsync = at._fsync_path
        def fsync(path):
            orig_fsync(path)
            if str(path).endswith(".tmp"):
                hit()
        at._fsync_path = fsync
    elif mode in ("batch", "term"):
        import neuroinit.experiments.train as tr
        orig_batch = tr._Context.batch
        def batch(self, b, g):
            hit(signal.SIGTERM if mode == "term" else signal.SIGKILL)
            return orig_batch(self, b, g)
        tr._Context.batch = batch
    from neuroinit.cli import main
    main(sys.argv[1:], prog_name="neuroinit")
""")


def _cli(tmp_path: Path, args: list[str], kill: str | None = None, **kw) -> subprocess.CompletedProcess:
    """The CLI in a child process with stdout and stderr redirected to files (no terminal anywhere)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    env.pop("NI_KILL", None)
    if kill:
        env["NI_KILL"] = kill
    env.update(kw.pop("env", {}))
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.run([sys.executable, str(script), *args], stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                              env=env, cwd=tmp_path, timeout=300, check=False, **kw)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())


def _weights(path: Path) -> dict[str, np.ndarray]:
    return read_run(path).weights["final"].params


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = read_run(a), read_run(b)
    assert ra.status == rb.status == "complete"
    for n in WEIGHTS:
        assert np.array_equal(ra.weights["final"].params[n], rb.weights["final"].params[n]), n
    for x, y in zip(ra.runs, rb.runs, strict=True):
        assert x.loss_per_iteration == y.loss_per_iteration
        assert np.array_equal(np.asarray(x.accuracy), np.asarray(y.accuracy))
    assert ra.summary["eval_loss"] == rb.summary["eval_loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    d = tmp_path_factory.mktemp("ref")
    res = CliRunner().invoke(main, [*TRAIN, "--out", str(d / "ref.h5"), "--json"])  # in this process
    assert res.exit_code == 0, res.output
    return d / "ref.h5"


# ------------------------------------------------------------------------------------------ resume semantics

def test_resume_of_a_missing_file_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "typo.h5"
    r = CliRunner().invoke(main, ["train", "--resume", "--out", str(missing)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "does not exist" in lines[0]
    assert not missing.exists() and not lock_path(missing).exists()


def test_resume_or_start_starts_then_returns_the_finished_run(tmp_path):
    out = tmp_path / "r.h5"
    args = ["train", "--hidden", "8", "--batch", "4", "--iters", "3", "--eval-batch", "8", "--no-lyapunov",
            "--out", str(out), "--json", "--resume-or-start"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and json.loads(again.stdout) == json.loads(first.stdout)
    both = CliRunner().invoke(main, [*args, "--resume"])
    assert both.exit_code != 0 and "exclude each other" in both.output


@pytest.mark.parametrize("kill", [pytest.param("batch:5", marks=pytest.mark.slow),
                                  pytest.param("write:2", marks=pytest.mark.slow), "rename:3"])
def test_killed_train_resumes_bit_identically_with_redirected_output(tmp_path, reference, kill):
    """kill -9 inside an iteration, inside a checkpoint's HDF5 write and between a checkpoint's write and its
    rename; `--resume --json` with stdout and stderr redirected continues it to the uninterrupted result."""
    out = tmp_path / "run.h5"
    killed = _cli(tmp_path, [*TRAIN, "--out", str(out), "--json"], kill=kill)
    assert killed.returncode == -signal.SIGKILL
    rf = read_run(out)  # the last complete write is intact
    assert rf.status == "running" and "final" not in rf.weights
    shown = CliRunner().invoke(main, ["show", str(out)])
    assert shown.exit_code == 0 and shown.stdout.splitlines()[0].endswith(
        "interrupted (no process is writing it (stopped without a final checkpoint, e.g. killed); resume with "
        "--resume)")
    if kill.startswith(("write", "rename")):
        assert list(tmp_path.glob(".run.h5.*.tmp")), "the kill should leave the temporary file behind"
    ck = rf.runs[0].checkpoint.iteration if rf.runs[0].checkpoint else None
    resumed = _cli(tmp_path, ["train", "--resume", "--out", str(out), "--json"])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "complete"
    if ck is not None:
        assert f"resuming {out} from its checkpoint at iteration {ck} of 12" in resumed.stderr
    assert "Traceback" not in resumed.stderr and "\r" not in resumed.stderr  # no progress bar
    assert not list(tmp_path.glob(".run.h5.*.tmp")) and not lock_path(out).exists()
    _assert_same_run(out, reference)


@pytest.mark.slow
def test_killed_twice_then_resumed_twice_is_still_bit_identical(tmp_path, reference):
    out = tmp_path / "run.h5"
    # batch 1 is the initial evaluation, batch k + 2 iteration k: killed in iteration 4, after the checkpoint at 3
    assert _cli(tmp_path, [*TRAIN, "--out", str(out)], kill="batch:6").returncode == -signal.SIGKILL
    assert read_run(out).runs[0].checkpoint.iteration == 3
    # resumed, then killed inside its second checkpoint write (iteration 9): the file keeps the one at 6
    again = _cli(tmp_path, ["train", "--resume", "--out", str(out)], kill="write:2")
    assert again.returncode == -signal.SIGKILL and "from its checkpoint at iteration 3 of 12" in again.stderr
    assert read_run(out).runs[0].checkpoint.iteration == 6
    done = _cli(tmp_path, ["train", "--resume", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert "from its checkpoint at iteration 6 of 12" in done.stderr and "run file:" in done.stdout
    _assert_same_run(out, reference)


def test_sigterm_reads_interrupted_and_resumes(tmp_path, reference):
    out = tmp_path / "run.h5"
    stopped = _cli(tmp_path, [*TRAIN, "--out", str(out)], kill="term:8")
    assert stopped.returncode == 130, stopped.stderr
    assert "interrupted at iteration 7" in stopped.stderr
    rf = read_run(out)
    assert rf.status == "interrupted" and rf.runs[0].status == "interrupted"
    assert rf.runs[0].checkpoint.iteration == 7
    shown = CliRunner().invoke(main, ["show", str(out)]).stdout
    assert "interrupted" in shown.splitlines()[0] and "nan" not in shown
    assert "interrupted, 7 iterations" in shown and "(last logged)" in shown
    assert _cli(tmp_path, ["train", "--resume", "--out", str(out)]).returncode == 0
    _assert_same_run(out, reference)


def test_overwrite_and_resume_remove_stale_temporary_files(tmp_path):
    out = tmp_path / "run.h5"
    stale = [tmp_path / ".run.h5.abcd1234.tmp", tmp_path / ".run.h5.zz_99xyz.tmp"]
    other = tmp_path / ".run.h5.h5.abcd1234.tmp"  # another file's temporary: kept
    for p in [*stale, other]:
        p.write_bytes(b"x" * 100)
    args = ["train", "--hidden", "8", "--batch", "4", "--iters", "2", "--eval-batch", "8", "--no-lyapunov",
            "--out", str(out), "--overwrite"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert not any(p.exists() for p in stale) and other.exists()


# ------------------------------------------------------------------------------------------ one writer at a time

_RACE = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    import neuroinit.cli, neuroinit.experiments.sweep, neuroinit.experiments.train
    go = sys.argv[1]
    print("ready", flush=True)
    while not os.path.exists(go):  # both processes leave this loop within a millisecond of each other
        time.sleep(0.0005)
    neuroinit.cli.main(sys.argv[2:], prog_name="neuroinit")
""")


def _race(tmp_path: Path, args: list[str]) -> list[subprocess.CompletedProcess]:
    """Two processes that import everything first, then start ``args`` at the same moment."""
    script, go = tmp_path / "race.py", tmp_path / "go"
    script.write_text(_RACE)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(go), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.communicate()[1]
    go.touch()
    out = []
    for p in procs:
        so, se = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


def test_two_trains_started_together_on_one_file_one_is_refused(tmp_path):
    out = tmp_path / "run.h5"
    res = _race(tmp_path, [*TRAIN, "--out", str(out), "--json"])
    codes = sorted(r.returncode for r in res)
    assert codes[0] == 0 and codes[1] != 0, [r.stderr for r in res]
    loser = next(r for r in res if r.returncode != 0)
    lines = [ln for ln in loser.stderr.splitlines() if "fused native step" not in ln]
    assert len(lines) == 1 and "is being written by another process (pid" in lines[0], loser.stderr
    assert read_run(out).status == "complete" and not lock_path(out).exists()


def test_lock_names_the_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "run.h5"
    with run_file_lock(out):
        holder = lock_holder(out)
        assert holder.startswith(f"pid {os.getpid()} on ")
        r = CliRunner().invoke(main, ["train", "--hidden", "8", "--iters", "2", "--out", str(out)])
        lines = [ln for ln in r.output.strip().splitlines() if not ln.startswith("note:")]  # note: no compiler
        assert r.exit_code != 0 and len(lines) == 1 and f"pid {os.getpid()}" in lines[0]
    assert lock_holder(out) is None and not lock_path(out).exists()
    # a lock file left by a killed process (flock is released by the kernel) does not block the next writer
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from neuroinit.io.runfile import run_file_lock
        with run_file_lock({str(out)!r}):
            print("locked", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)], stdout=subprocess.PIPE, text=True)
    with child.stdout:
        assert child.stdout.readline().strip() == "locked"
    child.wait(timeout=60)
    assert lock_path(out).exists() and lock_holder(out) is None
    with run_file_lock(out):
        assert lock_holder(out).startswith(f"pid {os.getpid()}")


SPEC = """
name = "kills"
[base]
hidden = 8
batch = 4
iters = 6
log_every = 1
eval_batch = 8
lyapunov = false
checkpoint_every = 2
[grid]
rule = ["bptt", "eprop"]
gain = [0.5, 1.5]
"""


@pytest.mark.slow  # the sweep lock (flock on DIR/.sweep.lock) predates issue 15; this checks the race
def test_two_sweeps_started_together_on_one_directory_one_is_refused(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    res = _race(tmp_path, ["sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "0", "--json"])
    codes = sorted(r.returncode for r in res)
    assert codes[0] == 0 and codes[1] != 0, [r.stderr for r in res]
    loser = next(r for r in res if r.returncode != 0)
    assert "Another sweep is running in" in loser.stderr and "Traceback" not in loser.stderr
    plan = sw.load_spec(spec)
    assert all(sw.run_state(tmp_path / "out" / r.file, r.config)[0] == "complete" for r in plan.runs)


# ------------------------------------------------------------------------------------------ sweeps killed

@pytest.fixture(scope="module")
def sweep_reference(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sweepref")
    spec = d / "spec.toml"
    spec.write_text(SPEC)
    report = sw.run_sweep(sw.load_spec(spec), d / "out", workers=0)  # in this process
    assert report.counts == {"complete": 4}
    return spec, d / "out"


@pytest.mark.parametrize("kills", [["write:3", "rename:4"],  # ~10 s on a quiet machine
                                   pytest.param(["batch:9", "write:1", "batch:4"], marks=pytest.mark.slow)])
def test_killed_sweep_resumes_to_bit_identical_runs(tmp_path, sweep_reference, kills):
    """kill -9 of an in-process sweep at several points (inside checkpoint writes, before a rename, inside an
    iteration), then the same command again: every run finishes once with the uninterrupted weights."""
    spec, ref = sweep_reference
    out = tmp_path / "out"
    args = ["sweep", str(spec), "--out", str(out), "--workers", "0", "--json"]
    for kill in kills:
        assert _cli(tmp_path, args, kill=kill).returncode == -signal.SIGKILL
    done = _cli(tmp_path, args)
    assert done.returncode == 0, done.stderr
    plan = sw.load_spec(spec)
    for r in plan.runs:
        assert sw.run_state(out / r.file, r.config)[0] == "complete", r.describe()
        _assert_same_run(out / r.file, ref / r.file)
    assert not list((out / sw.RUNS_DIR).glob(".*.tmp")) and not list((out / sw.RUNS_DIR).glob(".*.lock"))


# ------------------------------------------------------------------------------------------ no terminal

def test_broken_pipe_ends_quietly(tmp_path):
    out = tmp_path / "r.h5"
    assert CliRunner().invoke(main, ["train", "--hidden", "8", "--iters", "2", "--eval-batch", "8",
                                     "--no-lyapunov", "--out", str(out)]).exit_code == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line (`neuroinit show r.h5 | head -0`)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "neuroinit.cli", "show", str(out)], stdout=write_end,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=120, check=False)
    os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 141


@pytest.mark.parametrize("command", ["compare", "plot"])
def test_figure_into_a_missing_directory_is_refused(tmp_path, command):
    target = tmp_path / "nope" / "f.png"
    args = (["compare", "a.h5", "b.h5"] if command == "compare" else ["plot", str(tmp_path), "--figure",
                                                                       "lyapunov"]) + ["--out", str(target)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "does not exist" in r.output and str(target.parent) in r.output
    assert not target.parent.exists()


# ------------------------------------------------------------------------------------------ the native step

def test_a_broken_cc_is_reported_never_replaced(tmp_path, monkeypatch, reset_native):
    reset_native(tmp_path)  # nothing cached: a build is needed
    monkeypatch.setenv("CC", "/nonexistent")
    assert not fused.available()
    assert fused.unavailable_reason() == ("CC='/nonexistent' is not an executable on PATH (unset CC to use cc, "
                                          "gcc or clang)")
    reset_native(tmp_path)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler anywhere
    assert not fused.available() and fused.unavailable_reason().startswith("no C compiler (cc, gcc or clang)")


def test_train_and_bench_say_once_that_the_native_step_is_missing_and_record_the_path(tmp_path, monkeypatch,
                                                                                        reset_native):
    reset_native(tmp_path)
    monkeypatch.setenv("CC", "/nonexistent")
    out = tmp_path / "r.h5"
    r = CliRunner().invoke(main, [*TRAIN[:5], "--hidden", "8", "--iters", "2", "--eval-batch", "8",
                                  "--no-lyapunov", "--dt-ms", "10", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.stderr.splitlines() if "native step" in ln]
    assert notes == [("note: the fused native step is unavailable (CC='/nonexistent' is not an executable on PATH "
                      "(unset CC to use cc, gcc or clang)); the PyTorch step runs instead (the same results to "
                      "float32 rounding, several times slower; benchmarks/ has the measured ratio)")]
    assert read_run(out).summary["step_path"] == "torch"
    b = CliRunner().invoke(main, ["bench", "--model", "lif", "--hidden", "6", "--batch", "1", "--steps", "3",
                                  "--repeats", "1", "--methods", "neuroinit-fused,neuroinit-torch", "--json", "-"])
    assert b.exit_code == 0, b.output
    assert sum("fused native step is unavailable" in ln for ln in b.stderr.splitlines()) == 1
    rows = json.loads(b.stdout)["results"]
    fused_rows = [x for x in rows if x["method"] == "neuroinit-fused"]
    assert fused_rows and all(x["skipped"].startswith("fused step unavailable: CC=") and x["us_per_step"] is None
                              for x in fused_rows)
    assert [x["fast_path"] for x in rows if x["method"] == "neuroinit-torch"] == [False]


@pytest.mark.skipif(not fused.available(), reason=f"fused step unavailable: {fused.unavailable_reason()}")
def test_the_run_file_records_the_fused_path(tmp_path):
    out = tmp_path / "r.h5"
    r = CliRunner().invoke(main, [*TRAIN[:5], "--hidden", "8", "--iters", "2", "--eval-batch", "8",
                                  "--no-lyapunov", "--dt-ms", "10", "--out", str(out)])
    assert r.exit_code == 0 and r.stderr == ""
    assert read_run(out).summary["step_path"] == "fused-native"
    r = CliRunner().invoke(main, [*TRAIN[:5], "--hidden", "8", "--iters", "2", "--eval-batch", "8",
                                  "--no-lyapunov", "--dt-ms", "10", "--no-fast", "--out", str(out), "--overwrite"])
    assert r.exit_code == 0 and read_run(out).summary["step_path"] == "torch"


# ------------------------------------------------------------------------------------------ determinism

def test_same_seed_gives_identical_run_files(tmp_path):
    """Everything but timestamps and wall times is equal, dataset by dataset (weights, curves, checkpoints)."""
    import h5py

    base = ["train", "--model", "lif", "--hidden", "10", "--batch", "4", "--iters", "5", "--dt-ms", "10",
            "--eval-batch", "8", "--lyapunov-k", "2", "--checkpoint-every", "2", "--seed", "9"]
    for name in ("a.h5", "b.h5"):
        assert CliRunner().invoke(main, [*base, "--out", str(tmp_path / name)]).exit_code == 0

    def contents(path):
        items = {}
        with h5py.File(path, "r") as f:
            def visit(name, obj):
                for k, v in obj.attrs.items():
                    if "wall_time" not in k and k not in ("created", "updated"):
                        items[f"{name}@{k}"] = v.tolist() if hasattr(v, "tolist") else v
                if isinstance(obj, h5py.Dataset) and "wall_time" not in name:
                    items[name] = obj[()].tolist() if hasattr(obj[()], "tolist") else obj[()]
            f.visititems(visit)
            for k, v in f.attrs.items():
                if k not in ("created", "updated"):
                    items[f"/@{k}"] = v.tolist() if hasattr(v, "tolist") else v
        return items

    a, b = contents(tmp_path / "a.h5"), contents(tmp_path / "b.h5")
    assert a.keys() == b.keys() and len(a) > 20
    assert any("weights/final" in k for k in a) and any("loss" in k for k in a)
    assert {k for k in a if a[k] != b[k]} == set()


def test_progress_bar_on_a_terminal_only(tmp_path):
    """The same command with stderr on a pseudo-terminal draws a bar; redirected (the tests above) it does not."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "r.h5"
    with open(tmp_path / "stdout.txt", "w") as fo:
        proc = subprocess.Popen([sys.executable, "-m", "neuroinit.cli", "train", "--hidden", "8", "--iters", "30",
                                 "--eval-batch", "8", "--no-lyapunov", "--out", str(out)], stdin=subprocess.DEVNULL,
                                stdout=fo, stderr=slave, env=env)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        proc.wait(timeout=300)
    os.close(master)
    assert proc.returncode == 0, seen.decode(errors="replace")
    assert b"30/30" in seen and b"\r" in seen  # tqdm's bar, redrawn in place
    assert (tmp_path / "stdout.txt").read_text().startswith(f"run file: {out} (complete)")


def test_a_file_system_without_locks_writes_unguarded(tmp_path, monkeypatch):
    """NFS mounted nolock answers flock with ENOLCK: the run is written (shared-directory sweeps keep working)."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run.h5"
    with run_file_lock(out):
        assert not lock_path(out).exists()
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"), run_file_lock(out):
        pass
