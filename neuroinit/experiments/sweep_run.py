"""Running a sweep: the ledger sweep.json, the directory lock, and the local-pool and Dask executors (run_sweep)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from neuroinit._util import one_line, utc_now
from neuroinit.experiments.sweep_ids import (
    _ATTEMPTS,
    _CLUSTER_STALE_S,
    _LOCAL_STALE_S,
    FINISHED,
    LOCK_FILE,
    MANIFEST,
    MANIFEST_KIND,
    MANIFEST_VERSION,
    RUNS_DIR,
    TOKEN_FILE,
    PlannedRun,
    SweepError,
    _effective_lr,
    condition_key,
)
from neuroinit.experiments.sweep_spec import SweepSpec, load_spec
from neuroinit.experiments.sweep_worker import _file_summary, _init_worker, execute_run, run_state

# ------------------------------------------------------------------------------------------ the ledger

def read_manifest(sweep_dir: str | os.PathLike) -> dict:
    """The ledger ``DIR/sweep.json`` (``{}`` when there is none); ``ValueError`` when it is unreadable."""
    p = Path(sweep_dir) / MANIFEST
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a readable sweep ledger ({one_line(e, with_type=True)})") from None
    if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND:
        raise ValueError(f"{p}: not a neuroinit sweep ledger (kind {data.get('kind') if isinstance(data, dict) else None!r})")
    return data


def _write_manifest(sweep_dir: Path, data: dict) -> None:
    from neuroinit.io.atomic import atomic_write_path

    data["updated"] = utc_now()
    with atomic_write_path(sweep_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=float), encoding="utf-8")


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a batch system's stop, ``kill``) stops the sweep as Ctrl-C does: running runs checkpoint, the
    ledger is written, ``KeyboardInterrupt`` propagates."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _lock(sweep_dir: Path):
    import fcntl

    with open(sweep_dir / LOCK_FILE, "a+") as fh:  # the lock goes with the file's closing (or the process)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"Another sweep is running in {sweep_dir} (it holds {sweep_dir / LOCK_FILE}); wait "
                             "for it or use another --out") from None
        yield


def _remove_stale_temps(runs_dir: Path, older_than: float) -> int:
    """Temporary files of atomic writes (run files, the ledger) that a killed process left behind."""
    now = time.time()
    n = 0
    for p in [*runs_dir.glob(".*.h5.*.tmp"), *runs_dir.parent.glob(f".{MANIFEST}.*.tmp")]:
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime >= older_than:
                p.unlink()
                n += 1
    return n


# ------------------------------------------------------------------------------------------ running a sweep

@dataclass(frozen=True)
class SweepEvent:
    """Reported after each run finishes (or is found finished): ``done`` of ``total``."""

    run_id: str
    status: str
    done: int
    total: int
    description: str
    error: str = ""


@dataclass
class SweepReport:
    sweep_dir: str
    name: str
    total: int
    skipped: int                # finished before this invocation (checked by content)
    ran: int
    counts: dict[str, int]
    wall_time: float
    executor: str
    failed: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"sweep_dir": self.sweep_dir, "name": self.name, "total": self.total, "skipped": self.skipped,
                "ran": self.ran, "counts": dict(self.counts), "wall_time": self.wall_time,
                "executor": self.executor, "failed": list(self.failed)}


def _record(run: PlannedRun) -> dict:
    c = run.config
    return {"id": run.run_id, "file": run.file, "task": c.task, "model": c.model, "rule": run.rule,
            "gain": c.gain, "seed": c.seed, "lr": _effective_lr(c), "lr_scale": run.lr_scale,
            "profile": c.profile, "condition": condition_key(c.to_dict()), "status": "pending", "error": "",
            "traceback": "", "attempts": 0, "wall_time": None, "host": "", "finished": "", "summary": {}}


def run_sweep(spec: SweepSpec | str | os.PathLike, sweep_dir: str | os.PathLike, *, workers: int | None = None,
              scheduler=None, threads: int = 1, progress: Callable[[SweepEvent], None] | None = None,
              on_start: Callable[[int, int], None] | None = None, connect_timeout: float = 30.0,
              ensemble: int = 0) -> SweepReport:
    """Run every planned run of ``spec`` not yet finished in ``sweep_dir`` (see the module docstring).

    ``workers``: local processes (default: the CPUs this process may use, divided by ``threads``; 0 runs in
    this process). ``scheduler``: a Dask scheduler address (``"tcp://host:port"``) or a ``distributed.Client``;
    then ``workers`` is ignored. ``threads``: torch intra-op threads per run. ``on_start(total, finished)`` is
    called once the finished runs are known; ``progress`` after each run. ``connect_timeout``: seconds to
    wait for the Dask scheduler. ``ensemble = K > 1``: compatible runs (same config up to seed, gain and learning
    rate; rate networks, see :mod:`neuroinit.experiments.ensemble`) train K at a time as one batched model, each
    into its own run file with the content it has when trained alone; the others train alone.
    """
    from neuroinit.experiments.ensemble import ensemble_groups

    t0 = time.monotonic()
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    workers = _check_run_args(workers, threads, ensemble)
    root = Path(sweep_dir).resolve()
    if root.exists() and not root.is_dir():
        raise SweepError(f"Invalid sweep directory {str(root)!r}: it is a file")
    (root / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    with _lock(root), _sigterm_interrupts():
        token = _token(root)
        _remove_stale_temps(root / RUNS_DIR, _CLUSTER_STALE_S if scheduler is not None else _LOCAL_STALE_S)
        manifest, pending, skipped = _open_ledger(root, spec)
        if on_start is not None:
            on_start(len(spec.runs), skipped)
        groups = {g[0].run_id: g for g in ensemble_groups(pending, ensemble)}
        recorder = _Recorder(root, manifest, groups, len(spec.runs), skipped, progress or (lambda _e: None))
        executor = "in-process" if workers == 0 and scheduler is None else (
            "dask" if scheduler is not None else f"local pool ({workers} workers)")
        payload = _payload(pending, groups, root, token, threads)
        heads = [g[0] for g in groups.values()]
        try:
            if not heads:
                pass
            elif scheduler is not None:
                executor = _run_dask(heads, payload, scheduler, recorder.finish, connect_timeout)
            elif workers == 0:
                _run_here(heads, payload, threads, recorder.finish)
            else:
                _run_local(heads, payload, workers, threads, recorder.finish)
        finally:
            _write_manifest(root, manifest)
    records = manifest["runs"]
    failed = [{"id": r.run_id, "run": r.describe(), "error": records[r.run_id]["error"]} for r in spec.runs
              if records[r.run_id]["status"] == "failed"]
    final_counts = Counter(records[r.run_id]["status"] for r in spec.runs)
    return SweepReport(sweep_dir=str(root), name=spec.name, total=len(spec.runs), skipped=skipped,
                       ran=sum(recorder.counts.values()), counts=dict(final_counts),
                       wall_time=time.monotonic() - t0, executor=executor, failed=failed)


def _check_run_args(workers: int | None, threads: int, ensemble: int) -> int:
    """Check ``threads`` and ``ensemble``; returns ``workers`` (default: usable CPUs // threads), checked."""
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise SweepError(f"Invalid threads {threads!r}: an integer >= 1")
    if not isinstance(ensemble, int) or isinstance(ensemble, bool) or ensemble < 0:
        raise SweepError(f"Invalid ensemble {ensemble!r}: an integer >= 0 (runs per batched model; 0 or 1: alone)")
    if workers is None:
        from neuroinit._util import available_cpus

        workers = max(1, available_cpus() // threads)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise SweepError(f"Invalid workers {workers!r}: an integer >= 0 (0 runs in this process)")
    return workers


def _token(root: Path) -> str:
    """The sweep directory's secret (made once): workers write run files only where it matches."""
    token_path = root / TOKEN_FILE
    if not token_path.exists():
        with contextlib.suppress(FileExistsError), open(token_path, "x") as fh:
            fh.write(secrets.token_hex(16) + "\n")
    return token_path.read_text().strip()


def _open_ledger(root: Path, spec: SweepSpec) -> tuple[dict, list[PlannedRun], int]:
    """The ledger with ``spec``'s runs recorded (finished ones checked by content, a failed one keeps its last
    error until the retry reports), written; returns it, the runs still to do and how many are finished."""
    try:
        manifest = read_manifest(root)
    except ValueError:
        manifest = {}  # rebuilt from the run files below
    old = manifest.get("runs", {}) if isinstance(manifest.get("runs"), dict) else {}
    records: dict[str, dict] = dict(old)
    pending: list[PlannedRun] = []
    skipped = 0
    for run in spec.runs:
        rec = {**_record(run), **{k: v for k, v in old.get(run.run_id, {}).items()
                                  if k in ("attempts", "host", "finished", "wall_time")}}
        state, detail = run_state(root / run.file, run.config)
        if state in FINISHED:
            rec["status"], rec["error"] = state, detail if state == "diverged" else ""
            rec["summary"] = _file_summary(root / run.file)
            skipped += 1
        else:
            prev = old.get(run.run_id, {})
            if prev.get("status") == "failed":
                rec["status"], rec["error"], rec["traceback"] = "failed", prev.get("error", ""), \
                    prev.get("traceback", "")
            pending.append(run)
        records[run.run_id] = rec
    specs = manifest.get("specs", {}) if isinstance(manifest.get("specs"), dict) else {}
    specs[spec.name] = {"path": spec.path, "description": spec.description, "text": spec.text,
                        "runs": [r.run_id for r in spec.runs], "updated": utc_now()}
    manifest = {"kind": MANIFEST_KIND, "format_version": MANIFEST_VERSION,
                "created": manifest.get("created") or utc_now(), "specs": specs, "runs": records}
    _write_manifest(root, manifest)
    return manifest, pending, skipped


def _payload(pending: list[PlannedRun], groups: dict, root: Path, token: str, threads: int) -> dict:
    """What each job sends a worker: one run's config and path, or an ensemble's (under its first run's id)."""
    payload = {r.run_id: {"run_id": r.run_id, "config": r.config.to_dict(), "path": str(root / r.file),
                          "token": token, "threads": threads} for r in pending}
    for head, group in groups.items():
        if len(group) > 1:
            payload[head] = {"run_id": head, "threads": threads, "ensemble": [payload[r.run_id] for r in group]}
    return payload


class _Recorder:
    """Records finished jobs in the ledger (written after each) and reports them to ``notify``."""

    def __init__(self, root: Path, manifest: dict, groups: dict, total: int, done: int, notify) -> None:
        self.root, self.manifest, self.groups, self.total, self.done = root, manifest, groups, total, done
        self.notify = notify
        self.counts: Counter = Counter()

    def finish(self, run: PlannedRun, res: dict) -> None:
        """Record a job's result: one run's, or an ensemble's (per member; an executor's failure of the whole
        job applies to every member)."""
        members = self.groups.get(run.run_id, [run])
        for j, member in enumerate(members):
            self._finish_one(member, res["ensemble"][j] if "ensemble" in res else {**res, "run_id": member.run_id})

    def _finish_one(self, run: PlannedRun, res: dict) -> None:
        rec = self.manifest["runs"][run.run_id]
        if res.get("file_bytes") is not None:
            from neuroinit.io.atomic import atomic_write_path

            try:
                with atomic_write_path(self.root / run.file) as tmp:
                    tmp.write_bytes(res["file_bytes"])
            except OSError as e:
                res = {**res, "status": "failed",
                       "error": f"cannot write the returned run file: {one_line(e, with_type=True)}"}
        rec.update(status=res["status"], error=res.get("error", ""), traceback=res.get("traceback", ""),
                   wall_time=res.get("wall_time"), host=res.get("host", ""), finished=utc_now(),
                   summary=res.get("summary", {}), attempts=int(rec.get("attempts", 0)) + 1)
        self.counts[res["status"]] += 1
        self.done += 1
        _write_manifest(self.root, self.manifest)
        self.notify(SweepEvent(run.run_id, res["status"], self.done, self.total, run.describe(),
                               res.get("error", "")))


def _failed(run: PlannedRun, error: str) -> dict:
    """The result of a job that failed outside the training code (its worker, the cluster)."""
    return {"run_id": run.run_id, "status": "failed", "error": error, "traceback": "", "summary": {},
            "wall_time": None, "host": "", "file_bytes": None}


def _run_here(heads: list[PlannedRun], payload: dict, threads: int, finish) -> None:
    """Run the jobs one after another in this process (``workers = 0``)."""
    import torch

    old_threads = torch.get_num_threads()
    try:
        for run in heads:
            finish(run, execute_run({**payload[run.run_id], "threads": threads}))
    finally:
        torch.set_num_threads(old_threads)


def _pool_context():
    """Workers fork from a clean server process that imported torch and the training code once (fast worker
    start, no threads inherited from this process); where there is no fork server, spawn."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["neuroinit.experiments.sweep", "neuroinit.experiments.train"])
        return ctx
    return multiprocessing.get_context("spawn")


def _stop_workers(pool, timeout: float = 30.0) -> None:
    """SIGTERM every worker process (a training run writes a checkpoint at its next iteration and stops) and
    wait for them; the pool is broken afterwards."""
    import signal

    procs = list((getattr(pool, "_processes", None) or {}).values())  # no public handle on the pool's processes
    pool.shutdown(wait=False, cancel_futures=True)  # each worker exits after its current run
    for p in procs:
        with contextlib.suppress(Exception):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()


def _run_local(pending: list[PlannedRun], payload: dict, workers: int, threads: int, finish) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = _pool_context()
    queue = deque(pending)
    deaths: Counter = Counter()
    while queue:
        pool = ProcessPoolExecutor(max_workers=min(workers, len(queue)), mp_context=ctx, initializer=_init_worker,
                                   initargs=(threads, os.getpid()))
        inflight: dict = {}
        lost: list[PlannedRun] = []
        try:
            while queue or inflight:
                while queue and len(inflight) < workers:
                    run = queue.popleft()
                    inflight[pool.submit(execute_run, payload[run.run_id])] = run
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    run = inflight.pop(fut)
                    try:
                        res = fut.result()
                    except BrokenProcessPool:
                        lost.append(run)
                        continue
                    except Exception as e:  # noqa: BLE001  recorded as a failed run, the sweep goes on
                        res = _failed(run, one_line(e, with_type=True))
                    finish(run, res)
                if lost:
                    lost += list(inflight.values())
                    inflight.clear()
                    break
        except BaseException:  # Ctrl-C / SIGTERM: let the running runs checkpoint, then stop
            _stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=not lost, cancel_futures=True)
        for run in reversed(lost):
            deaths[run.run_id] += 1
            if deaths[run.run_id] >= _ATTEMPTS:
                finish(run, _failed(run, f"the worker process died {deaths[run.run_id]} times while this run "
                                         "was in flight (killed or out of memory?)"))
            else:
                queue.appendleft(run)


def _run_dask(pending: list[PlannedRun], payload: dict, scheduler, finish, connect_timeout: float) -> str:
    try:
        from distributed import Client, as_completed
    except ImportError:  # pragma: no cover - distributed is a dependency
        raise SweepError("--scheduler needs the 'distributed' package (pip install 'dask[distributed]')") from None
    own = not isinstance(scheduler, Client)
    if own:
        if not isinstance(scheduler, str) or not scheduler:
            raise SweepError(f"Invalid scheduler {scheduler!r}: an address such as tcp://127.0.0.1:8786")
        try:
            client = Client(scheduler, timeout=f"{connect_timeout}s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            raise SweepError(f"Cannot reach the Dask scheduler at {scheduler}: {one_line(e, with_type=True)}") from None
    else:
        client = scheduler
    where = f"dask ({client.scheduler.address})"
    tag = secrets.token_hex(4)
    by_key = {}
    futures = []
    try:
        for run in pending:
            key = f"neuroinit-run-{run.run_id}-{tag}"
            fut = client.submit(execute_run, payload[run.run_id], key=key, pure=False)
            by_key[fut.key] = run
            futures.append(fut)
        for fut in as_completed(futures, loop=client.loop):
            run = by_key[fut.key]
            if fut.status == "error":
                exc = fut.exception()
                res = _failed(run, f"on the cluster: {one_line(exc, with_type=True)}")
            elif fut.status == "cancelled":
                res = _failed(run, "cancelled on the cluster")
            else:
                res = fut.result()
            fut.release()
            finish(run, res)
    finally:
        for fut in futures:
            with contextlib.suppress(Exception):
                fut.cancel()
        if own:
            client.close()
    return where
