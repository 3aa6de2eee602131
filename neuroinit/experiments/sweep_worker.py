"""Sweep worker side: run state from a run file and executing one planned run in a worker (execute_run)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from neuroinit._util import one_line
from neuroinit.experiments.sweep_ids import FINISHED, TOKEN_FILE, comparable_config

# ------------------------------------------------------------------------------------------ run state

def run_state(path: str | os.PathLike, config) -> tuple[str, str]:
    """Whether the run file at ``path`` finished ``config``, judged from its content:
    ``("missing" | "complete" | "diverged" | "partial" | "mismatch" | "corrupt", detail)``.

    ``complete``: the stored config equals ``config`` (up to the checkpoint frequency) and the file says
    complete with final weights; ``diverged``: it stopped on a NaN/Inf loss (a result: rerunning gives the same);
    ``partial``: started, resumable from its checkpoint; ``mismatch``: another config; ``corrupt``: unreadable.
    """
    from neuroinit.io.runfile import read_run

    p = Path(path)
    if not p.exists():
        return "missing", ""
    try:
        rf = read_run(p)
    except ValueError as e:
        return "corrupt", str(e).splitlines()[0]
    want = comparable_config(config)
    have = comparable_config(rf.config)
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        return "mismatch", f"stored config differs in {diff}"
    if rf.status == "complete":
        if "final" not in rf.weights or rf.selected is None or rf.selected.status != "complete":
            return "partial", "marked complete without final weights"
        return "complete", ""
    if rf.status == "diverged":
        return "diverged", rf.message.splitlines()[0] if rf.message else "diverged"
    return "partial", rf.status


def _file_summary(path: Path) -> dict:
    from neuroinit.io.runfile import read_run

    rf = read_run(path)
    s = rf.summary
    out = {k: s.get(k) for k in ("final_loss", "initial_loss", "eval_loss", "eval_accuracy", "learning_time",
                                 "wall_time", "lyapunov_initial", "lyapunov_final")}
    if rf.status == "diverged":
        out["final_loss"] = None
    return out


# ------------------------------------------------------------------------------------------ one run (worker side)

def _is_shared(sweep_dir: Path, token: str) -> bool:
    try:
        return (sweep_dir / TOKEN_FILE).read_text().strip() == token
    except OSError:
        return False


def execute_run(payload: dict) -> dict:
    """Train one planned run (the function local and Dask workers call). ``payload``: ``config`` (dict),
    ``path`` (absolute run-file path in the sweep directory), ``token`` (the directory's token), ``threads``.

    Returns ``{"run_id", "status", "error", "traceback", "summary", "wall_time", "host", "file_bytes"}``;
    never raises for a failing run (the error is in the result). ``file_bytes`` carries the run file back when
    this worker does not see the sweep directory.
    """
    import platform

    if "ensemble" in payload:  # several runs trained as one batched model (neuroinit.experiments.ensemble)
        return execute_ensemble(payload)
    t0 = time.monotonic()
    path = Path(payload["path"])
    result = {"run_id": payload.get("run_id", ""), "status": "failed", "error": "", "traceback": "",
              "summary": {}, "wall_time": 0.0, "host": platform.node(), "file_bytes": None}
    tmpdir = None
    try:
        import torch

        from neuroinit.experiments.train import TrainConfig, TrainingDiverged, train

        if payload.get("threads"):
            torch.set_num_threads(int(payload["threads"]))
        config = TrainConfig.from_dict(payload["config"])
        shared = _is_shared(path.parent.parent, payload.get("token", ""))
        if shared:
            target = path
        else:
            tmpdir = Path(tempfile.mkdtemp(prefix="neuroinit-run-"))
            target = tmpdir / path.name
        state, detail = run_state(target, config)
        if state in ("corrupt", "mismatch"):
            target.unlink()
        if state not in FINISHED:
            try:
                train(config, target, resume=True, start_if_missing=True)
                state = "complete"
            except TrainingDiverged as e:
                state, detail = "diverged", str(e).splitlines()[0]
        result["status"] = state
        result["error"] = detail if state == "diverged" else ""
        result["summary"] = _file_summary(target)
        if not shared:
            result["file_bytes"] = target.read_bytes()
    except Exception as e:  # noqa: BLE001  a failing run is recorded with its error; the others go on
        result["status"] = "failed"
        result["error"] = one_line(e, with_type=True)
        result["traceback"] = "".join(traceback.format_exception(e)[-6:])[-4000:]
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        result["wall_time"] = time.monotonic() - t0
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process that nobody reaped yet is a zombie: gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _exit_with(pid: int) -> None:
    """End this worker process as soon as the sweep process ``pid`` is gone (killed with SIGKILL, say), so no
    worker trains on, orphaned, next to a resumed sweep. A daemon thread waits on a pidfd (Linux >= 5.3) or
    polls once a second."""
    import threading

    def watch() -> None:
        fd = None
        with contextlib.suppress(AttributeError, OSError):
            fd = os.pidfd_open(pid)
        if fd is not None:
            import select

            select.select([fd], [], [])
            os._exit(1)
        while _pid_alive(pid):
            time.sleep(1.0)
        os._exit(1)

    if not _pid_alive(pid):
        os._exit(1)
    threading.Thread(target=watch, name="neuroinit-sweep-watchdog", daemon=True).start()


def _init_worker(threads: int, sweep_pid: int) -> None:
    """Local pool workers: a thread budget each, and they end when the sweep process does."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _exit_with(sweep_pid)
    import torch

    torch.set_num_threads(threads)


def execute_ensemble(payload: dict) -> dict:
    """Train an ensemble of planned sweep runs (what :func:`execute_run` calls for
    a payload with ``"ensemble"``: a list of run payloads). Returns ``{"run_id", "ensemble": [result per
    member]}``, each result as ``execute_run``'s; never raises for failing runs."""
    import platform

    import torch

    from neuroinit.experiments.ensemble import train_ensemble
    from neuroinit.experiments.train_config import TrainConfig

    t0 = time.monotonic()
    members = payload["ensemble"]
    results = [{"run_id": m.get("run_id", ""), "status": "failed", "error": "", "traceback": "", "summary": {},
                "wall_time": 0.0, "host": platform.node(), "file_bytes": None} for m in members]
    tmpdir = None
    targets: list[Path] = []
    shared: list[bool] = []
    try:
        if payload.get("threads"):
            torch.set_num_threads(int(payload["threads"]))
        configs = [TrainConfig.from_dict(m["config"]) for m in members]
        todo = []
        for j, m in enumerate(members):
            path = Path(m["path"])
            shared.append(_is_shared(path.parent.parent, m.get("token", "")))
            if not shared[-1] and tmpdir is None:
                tmpdir = Path(tempfile.mkdtemp(prefix="neuroinit-ensemble-"))
            targets.append(path if shared[-1] else tmpdir / path.name)
            state, _ = run_state(targets[j], configs[j])
            if state in ("corrupt", "mismatch"):
                targets[j].unlink()
            if state not in FINISHED:
                todo.append(j)
        if todo:
            train_ensemble([configs[j] for j in todo], [targets[j] for j in todo], resume=True,
                           start_if_missing=True)
        for j, res in enumerate(results):
            state, detail = run_state(targets[j], configs[j])
            res["status"] = state if state in FINISHED else "failed"
            res["error"] = "" if state == "complete" else detail or state
            res["summary"] = _file_summary(targets[j])
            if not shared[j]:
                res["file_bytes"] = targets[j].read_bytes()
    except Exception as e:  # noqa: BLE001  failing runs are recorded with their error; the sweep goes on
        for j, res in enumerate(results):
            with contextlib.suppress(Exception):   # members finished before the failure keep their result
                state = run_state(targets[j], configs[j])[0] if j < len(targets) and shared[j] else None
                if state in FINISHED:
                    res["status"] = state
                    res["summary"] = _file_summary(targets[j])
            if res["status"] == "failed":
                res["error"] = f"in an ensemble: {one_line(e, with_type=True)}"
                res["traceback"] = "".join(traceback.format_exception(e)[-6:])[-4000:]
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        for res in results:
            res["wall_time"] = time.monotonic() - t0
    return {"run_id": payload.get("run_id", ""), "ensemble": results}
