"""Training runs: hardware-aware init, optional pre-flossing, training with BPTT / e-prop / RFLO, run files.

``train(TrainConfig(...), "run.h5")`` builds the task, initialises a rate or LIF network with
:func:`neuroinit.init.hardware_init`, optionally pre-flosses it, trains it at one learning rate (or at each rate of
a grid, keeping the best) and writes everything to an HDF5 run file (:mod:`neuroinit.io.runfile`,
``docs/runfile.md``). The method and every default are documented in ``docs/training.md``.

Reproducibility: every random draw comes from an explicit generator derived from ``config.seed`` (init:
``torch.Generator().manual_seed(seed)``, the same network ``neuroinit init --seed`` reports; batches, the rule's
feedback matrix and trace rounding, the weight grid's stochastic rounding, Lyapunov frames, flossing and the
evaluation batch each from their own generator, seeded from ``numpy.random.SeedSequence([seed, stream])``).
Checkpoints hold the weights, the optimizer's ``state_dict``, every generator state that training advances and
the curve so far, so a run resumed from a checkpoint finishes with the same weights, bit for bit, as one that
never stopped (on the CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuroinit.cells.base import PARAM_NAMES, RecurrentCell
from neuroinit.experiments.train_config import (  # re-exported: other modules import these from train
    _STREAMS,  # noqa: F401
    DTYPES,
    FLOSS_MODES,
    LAST_LOGGED,
    LEARNED_FRACTION,  # noqa: F401
    OPTIMIZERS,
    RESUMABLE_CHANGES,  # noqa: F401
    TrainConfig,
    TrainingDiverged,
    _check_task,  # noqa: F401
    _is_int,  # noqa: F401
    _is_number,  # noqa: F401
    _task_kind,  # noqa: F401
    resolve_settings,
)
from neuroinit.experiments.train_setup import (  # re-exported likewise
    ProgressEvent,
    TrainResult,
    _chance,
    _config_diff,
    _Context,
    _dtype,  # noqa: F401
    _evaluate,
    _floss,
    _gen_states,
    _generator,  # noqa: F401
    _inter_floss_generator,
    _last_logged_mean,
    _lyapunov,
    _new_run_file,
    _optimizer_from_np,
    _optimizer_np,
    _profile_text,  # noqa: F401
    _seed_for,  # noqa: F401
    _set_gen_states,
    _set_weights,
    _StopFlag,
    _weights_np,
    json_str,  # noqa: F401
    learning_time,
)
from neuroinit.io.runfile import (
    Checkpoint,
    RunFile,
    read_run,
    remove_stale_temps,
    run_file_lock,
    weights_from_cell,
    write_run,
)

__all__ = [
    "DTYPES",
    "FLOSS_MODES",
    "LAST_LOGGED",
    "OPTIMIZERS",
    "ProgressEvent",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "learning_time",
    "resolve_settings",
    "train",
]


def train(config: TrainConfig, out_path, *, resume: bool = False, overwrite: bool = False,
          start_if_missing: bool = False, progress: Callable[[ProgressEvent], None] | None = None) -> TrainResult:
    """Train as ``config`` says and write the run file ``out_path`` (see the module docstring).

    ``resume``: continue the run in ``out_path`` from its last checkpoint (it must have been made with the same
    config, up to ``checkpoint_every`` / ``checkpoint_seconds``); a complete run is returned as it is; a missing
    file is an error unless ``start_if_missing`` (then a new run starts: what sweeps use). Without ``resume``
    an existing file is an error unless ``overwrite``.
    ``progress`` is called with a :class:`ProgressEvent` after every iteration (and with phase "resume", the
    iteration it continues from, when a run resumes from a checkpoint).

    One process writes a run file at a time (:func:`~neuroinit.io.runfile.run_file_lock`: a second one gets a
    :class:`~neuroinit.io.runfile.RunFileLocked` error); temporary files a killed writer left are removed.

    Raises :class:`TrainingDiverged` when the loss or the weights become NaN / infinite (with a single learning
    rate; in a grid that rate is marked diverged and the others go on), ``KeyboardInterrupt`` after Ctrl-C /
    SIGTERM (a checkpoint is written first, the file reads "interrupted"), ``ValueError`` for bad input.
    """
    out = _check_out(config, out_path, resume=resume, start_if_missing=start_if_missing)
    # SIGINT / SIGTERM stop at an iteration boundary from here on (setup included), with the file written
    with run_file_lock(out), _StopFlag() as stop:
        remove_stale_temps(out)
        job = _open_run(config, out, resume=resume, overwrite=overwrite, progress=progress)
        if isinstance(job, TrainResult):
            return job
        for k, lr in enumerate(config.lrs):
            if job.run.runs[k].status in ("complete", "diverged"):  # a diverged rate would diverge again
                continue
            _train_one(job, k, lr, stop)
        return _close_run(job)


def _check_out(config: TrainConfig, out_path, *, resume: bool, start_if_missing: bool) -> Path:
    """The run file's path, checked (see :func:`train`)."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"Invalid config {type(config).__name__}: expected a TrainConfig")
    out = Path(out_path)
    if out.suffix == "" or out.is_dir():
        raise ValueError(f"Invalid out path {str(out)!r}: give a file name such as run.h5")
    if not out.parent.exists():
        raise ValueError(f"Invalid out path {str(out)!r}: directory {str(out.parent)!r} does not exist")
    if resume and not start_if_missing and not out.exists():
        raise ValueError(f"Cannot resume {str(out)!r}: the file does not exist (check the path; "
                         "--resume-or-start starts a new run when it is missing)")
    return out


@dataclass
class _Job:
    """A run between its setup (:func:`_open_run`) and its end (:func:`_close_run`): what training needs."""

    ctx: _Context
    run: RunFile
    cell: RecurrentCell
    start_weights: dict
    out: Path
    notify: Callable[[ProgressEvent], None]
    started: float

    @property
    def total(self) -> int:
        return self.ctx.config.iters * len(self.run.runs)

    def done(self) -> int:
        return sum(min(r.iterations_done, self.ctx.config.iters) for r in self.run.runs)

    def phase(self, name: str) -> None:
        lrs = self.ctx.config.lrs
        self.notify(ProgressEvent(name, 0, len(lrs), lrs[0], 0, self.ctx.config.iters, self.done(), self.total,
                                  None))


def _open_run(config: TrainConfig, out: Path, *, resume: bool, overwrite: bool,
              progress: Callable[[ProgressEvent], None] | None) -> _Job | TrainResult:
    """Set the run in ``out`` (checked by :func:`_check_out`, locked by the caller) up: new: init, evaluation,
    Lyapunov, pre-flossing, first write; resumed: the stored initial weights. A complete stored run is returned
    as its :class:`TrainResult`."""
    started = time.monotonic()
    existing: RunFile | None = None
    if out.exists():
        if resume:
            existing = read_run(out)
            diff = _config_diff(existing.config, config)
            if diff:
                parts = ", ".join(f"{k}: stored {existing.config.get(k)!r} vs {getattr(config, k, None)!r}"
                                  for k in diff)
                raise ValueError(f"Invalid resume of {out}: the config differs ({parts}); resume with the "
                                 "stored config or train into a new file")
        elif not overwrite:
            raise ValueError(f"Invalid out path {str(out)!r}: the file exists; resume it (--resume) or "
                             "overwrite it (--overwrite)")
    if existing is not None and existing.status == "complete":
        return _result(existing, out)
    notify = progress or (lambda _e: None)
    ctx = _Context(config)
    if existing is None:
        lrs = config.lrs
        notify(ProgressEvent("init", 0, len(lrs), lrs[0], 0, config.iters, 0, config.iters * len(lrs), None))
        params, report = ctx.init_params()
        cell = ctx.make_cell(params)
        run = _new_run_file(ctx, report)
        job = _Job(ctx, run, cell, {}, out, notify, started)
        run.cell_config = cell.config()
        run.weights["initial"] = weights_from_cell(cell)
        run.summary["eval_loss_initial"], run.summary["eval_accuracy_initial"] = _evaluate(ctx, cell)
        if config.lyapunov:
            job.phase("lyapunov")
            run.lyapunov["initial"] = _lyapunov(ctx, cell)
        if config.floss_iters:
            job.phase("floss")
            run.floss = _floss(ctx, cell)
            run.weights["floss"] = weights_from_cell(cell)
            if config.lyapunov:
                run.lyapunov["floss"] = _lyapunov(ctx, cell)
        run.summary["wall_time_setup"] = time.monotonic() - started
        write_run(out, run)
    else:
        run = existing
        from neuroinit.cells.base import CellParams

        init = run.weights["initial"].params
        params = CellParams(*(torch.from_numpy(np.array(init[n])).to(dtype=ctx.dtype, device=ctx.device)
                              for n in PARAM_NAMES))
        cell = ctx.make_cell(params)  # the same grids as the original run: chosen from the same weights
        if run.status in ("diverged", "interrupted"):
            run.status, run.message = "running", ""
        job = _Job(ctx, run, cell, {}, out, notify, started)
    job.start_weights = run.weights.get("floss", run.weights["initial"]).params
    return job


def _close_run(job: _Job) -> TrainResult:
    """Select the best learning rate, evaluate, run the final Lyapunov analysis and write the complete run
    file; raises :class:`TrainingDiverged` (after writing) when no learning rate completed."""
    ctx, run, cell, out, config = job.ctx, job.run, job.cell, job.out, job.ctx.config
    complete = [k for k, r in enumerate(run.runs) if r.status == "complete"]
    if not complete:
        msgs = "; ".join(r.message for r in run.runs)
        run.status, run.message = "diverged", msgs
        write_run(out, run)
        raise TrainingDiverged(msgs)
    finishing = time.monotonic()
    best = min(complete, key=lambda k: (run.runs[k].final_loss, k))
    run.selected_run = best
    sel = run.runs[best]
    _set_weights(cell, sel.final.params)
    run.weights["final"] = sel.final
    job.phase("eval")
    eval_loss, eval_acc = _evaluate(ctx, cell)
    if config.lyapunov:
        job.phase("lyapunov")
        run.lyapunov["final"] = _lyapunov(ctx, cell)
    wall = sum(r.wall_time for r in run.runs) + float(run.summary.get("wall_time_setup", 0.0)) \
        + time.monotonic() - finishing
    lyap_before = run.lyapunov.get("floss", run.lyapunov.get("initial"))
    run.summary.update({
        "initial_loss": sel.initial_loss, "final_loss": sel.final_loss, "eval_loss": eval_loss,
        "eval_accuracy": eval_acc, "chance_accuracy": _chance(ctx.task), "learning_time": sel.learning_time,
        "wall_time": wall, "selected_lr": sel.lr, "iterations": config.iters,
        "lyapunov_initial": None if lyap_before is None else lyap_before["max_per_step"],
        "lyapunov_final": run.lyapunov["final"]["max_per_step"] if "final" in run.lyapunov else None,
    })
    run.status, run.message = "complete", ""
    write_run(out, run)
    return _result(run, out)


class _LrRun:
    """Training one learning rate ``k`` of a job: the rule, the optimizer and the generators (fresh, or from the
    record's checkpoint), and what every iteration does around the gradient (stop, inter-flossing, the update,
    divergence, logging, checkpoints). :func:`_train_one` drives one; ensembles drive several
    (:mod:`neuroinit.experiments.ensemble`)."""

    def __init__(self, job: _Job, k: int, lr: float) -> None:
        ctx, run, cell = job.ctx, job.run, job.cell
        self.job, self.k, self.lr = job, k, lr
        self.rec = rec = run.runs[k]
        _set_weights(cell, job.start_weights)
        self.gens = ctx.generators()
        self.rule = ctx.make_rule(cell, self.gens)
        self.opt = ctx.make_optimizer(cell, lr, self.gens)
        self.start, self.wall_before = 0, 0.0
        if rec.checkpoint is not None:
            ck = rec.checkpoint
            _set_weights(cell, ck.weights)
            self.opt.load_state_dict(_optimizer_from_np(ck.optimizer))
            _set_gen_states(self.gens, ck.generators, str(job.out))
            self.start, self.wall_before = ck.iteration, ck.wall_time
            job.notify(ProgressEvent("resume", k, len(run.runs), lr, self.start, ctx.config.iters, job.done(),
                                     job.total, None))
        self.step_path: str | None = None   # what /summary/step_path says (None: the rule's path)
        start = self.start
        # Drop whatever was logged after the checkpoint (a kill or a divergence after it).
        rec.loss_per_iteration = rec.loss_per_iteration[:start]
        keep = sum(1 for it in rec.iteration if it < start)
        rec.iteration, rec.loss = rec.iteration[:keep], rec.loss[:keep]
        rec.accuracy, rec.lr_curve = rec.accuracy[:keep], rec.lr_curve[:keep]
        if rec.alignment:
            keep_a = sum(1 for it in rec.alignment["iteration"] if it < start)
            rec.alignment = {k: v[:keep_a] for k, v in rec.alignment.items()}
        rec.status, rec.message = "running", ""
        # inter-flossing (every floss_inter_every iterations, floss_inter_iters flossing iterations; fresh Adam and
        # generator per episode): /floss/inter_<k>_iteration (E,) and /floss/inter_<k>_losses (E, floss_inter_iters)
        self.inter_key = f"inter_{k}"
        self.inter_its = [int(x) for x in run.floss.get(self.inter_key + "_iteration", []) if int(x) < start]
        self.inter_losses = [list(x) for x in run.floss.get(self.inter_key + "_losses", [])][:len(self.inter_its)]
        self.t0 = self.last_ck = time.monotonic()

    def checkpoint(self, iteration: int) -> None:
        rec = self.rec
        rec.checkpoint = Checkpoint(iteration=iteration, wall_time=self.wall_before + time.monotonic() - self.t0,
                                    weights=_weights_np(self.job.cell), optimizer=_optimizer_np(self.opt),
                                    generators=_gen_states(self.gens))
        rec.wall_time = rec.checkpoint.wall_time
        write_run(self.job.out, self.job.run)

    def interrupt(self, i: int) -> str:
        """Checkpoint at iteration ``i`` and mark the run interrupted; returns the message."""
        run = self.job.run
        run.status = self.rec.status = "interrupted"
        run.message = self.rec.message = f"interrupted at iteration {i} (lr {self.lr:g}); resume with --resume"
        self.checkpoint(i)
        return run.message

    def before(self, i: int) -> None:
        """Inter-flossing before iteration ``i`` where the config asks for it."""
        c, run = self.job.ctx.config, self.job.run
        if c.floss_inter_every and i > 0 and i % c.floss_inter_every == 0:
            fl = _floss(self.job.ctx, self.job.cell, c.floss_inter_iters, _inter_floss_generator(c.seed, i))
            self.inter_its.append(i)
            self.inter_losses.append([float(x) for x in fl["losses"]])
            run.floss[self.inter_key + "_iteration"] = np.asarray(self.inter_its, dtype=np.float64)
            run.floss[self.inter_key + "_losses"] = np.asarray(self.inter_losses, dtype=np.float64)

    def after(self, i: int, trial, batch) -> bool:
        """The rest of iteration ``i`` once the rule wrote ``.grad`` for ``trial`` on ``batch``: the optimizer
        step, the divergence check, logging, progress and checkpoints. False when the run diverged (the file
        is written; with a single learning rate the whole run is marked diverged)."""
        job, rec, c, cell, opt = self.job, self.rec, self.job.ctx.config, self.job.cell, self.opt
        run, lr = job.run, self.lr
        loss = float(trial.loss)
        if c.align_every and i % c.align_every == 0 and math.isfinite(loss):
            _log_alignment(rec, i, cell, batch, job.ctx.task)
        run.summary["step_path"] = self.step_path or getattr(self.rule, "step_path", None) or (
            "fused-native" if getattr(self.rule, "uses_fast_path", False) else "torch")
        bad = None
        if not math.isfinite(loss):
            bad = f"the loss is {loss} at iteration {i}"
        else:
            opt.step()
            # a tensor's sum is finite iff its entries are (weights far below float overflow); 20x cheaper than
            # isfinite().all() here (10 vs 216 us at 67k weights), checked every iteration
            if not all(math.isfinite(float(getattr(cell, n).detach().sum())) for n in PARAM_NAMES):
                bad = f"the weights became NaN/Inf in the update of iteration {i}"
        if bad is not None:
            last = rec.checkpoint.iteration if rec.checkpoint is not None else 0
            rec.status = "diverged"
            rec.message = (f"Training diverged: {bad} (lr {lr:g}); stopped. The run file keeps the last good "
                           f"checkpoint (iteration {last}); try a smaller learning rate")
            if len(run.runs) == 1:
                run.status, run.message = "diverged", rec.message
            write_run(job.out, run)
            return False
        rec.loss_per_iteration.append(loss)
        if i % c.log_every == 0 or i == c.iters - 1:
            rec.iteration.append(i)
            rec.loss.append(loss)
            rec.accuracy.append(float(job.ctx.task.accuracy(trial.outputs, batch)))
            rec.lr_curve.append(float(opt.param_groups[0]["lr"]))
        job.notify(ProgressEvent("train", self.k, len(run.runs), lr, i + 1, c.iters, job.done(), job.total, loss))
        now = time.monotonic()
        if i + 1 < c.iters and ((i + 1) % c.checkpoint_every == 0
                                or (c.checkpoint_seconds and now - self.last_ck >= c.checkpoint_seconds)):
            self.checkpoint(i + 1)
            self.last_ck = time.monotonic()
        return True

    def complete(self) -> None:
        rec = self.rec
        rec.wall_time = self.wall_before + time.monotonic() - self.t0
        rec.status = "complete"
        rec.final = weights_from_cell(self.job.cell)
        rec.checkpoint = None
        rec.final_loss = _last_logged_mean(rec.loss)
        rec.learning_time = learning_time(rec.loss_per_iteration)
        write_run(self.job.out, self.job.run)


def _train_one(job: _Job, k: int, lr: float, stop: _StopFlag) -> None:
    c = job.ctx.config
    lrun = _LrRun(job, k, lr)
    for i in range(lrun.start, c.iters):
        if stop.event.is_set():
            raise KeyboardInterrupt(lrun.interrupt(i))
        lrun.before(i)
        batch = job.ctx.batch(c.batch, lrun.gens["batch"])
        lrun.opt.zero_grad(set_to_none=True)
        trial = lrun.rule.backward(batch, job.ctx.task)
        if not lrun.after(i, trial, batch):
            if len(job.run.runs) == 1:
                raise TrainingDiverged(lrun.rec.message)
            return
    lrun.complete()


def _log_alignment(rec, iteration: int, cell: RecurrentCell, batch, task) -> None:
    """Cosine and relative error of the gradient the rule just wrote (``.grad``) vs BPTT's on the same batch,
    appended to ``rec.alignment`` (``iteration``, ``cosine_<param>``, ``rel_error_<param>``)."""
    from neuroinit.dynamics.alignment import alignment_with_bptt

    local = {n: getattr(cell, n).grad.detach().clone() if getattr(cell, n).grad is not None
             else torch.zeros_like(getattr(cell, n)) for n in PARAM_NAMES}
    a = alignment_with_bptt(cell, local, batch, task)
    log = rec.alignment
    if not log:
        log.update({"iteration": []} | {f"{k}_{n}": [] for k in ("cosine", "rel_error") for n in PARAM_NAMES})
    log["iteration"].append(iteration)
    for n in PARAM_NAMES:
        log[f"cosine_{n}"].append(a.cosine[n])
        log[f"rel_error_{n}"].append(a.rel_error[n])


def _result(run: RunFile, out: Path) -> TrainResult:
    s = run.summary
    lt = s.get("learning_time")
    return TrainResult(
        out_path=str(out), status=run.status, initial_loss=float(s.get("initial_loss", math.nan)),
        final_loss=float(s.get("final_loss", math.nan)), eval_loss=float(s.get("eval_loss", math.nan)),
        eval_accuracy=float(s.get("eval_accuracy", math.nan)),
        chance_accuracy=float(s.get("chance_accuracy", math.nan)),
        learning_time=None if lt is None or lt == -1 else int(lt), wall_time=float(s.get("wall_time", math.nan)),
        lr=float(s.get("selected_lr", math.nan)), lrs=tuple(r.lr for r in run.runs),
        iterations=int(s.get("iterations", 0)),
        lyapunov_initial=s.get("lyapunov_initial"), lyapunov_final=s.get("lyapunov_final"),
    )
