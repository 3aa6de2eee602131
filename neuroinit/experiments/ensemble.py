"""Ensembles: K independent training runs of the same shapes trained as one batched model.

``train_ensemble([config_1, ..., config_K], [path_1, ..., path_K])`` trains K runs that differ only in seed, gain
and learning rate (same task, model, rule, N, batch, iterations, ...) together: every time step of all K
networks is one batched operation on stacked weights ``(K, out, in)`` (:func:`~neuroinit.cells.rate.rate_step`,
:func:`~neuroinit.learning.online.trace_step` and :func:`~neuroinit.learning.online.accumulate_step` take a
leading member dimension), instead of K small ones. Everything else is each member's own, exactly as when it is
trained alone (:func:`~neuroinit.experiments.train.train`): its network, initialisation, evaluation, Lyapunov
analysis and pre-flossing (the solo code, member by member), its data stream and rule generators
(``_Context.generators``), its optimizer (the same ``torch.optim`` optimizer with its own learning rate and
state), its checkpoints, divergence handling and run file. So each member's run file has the content of the run
trained alone (weights and curves equal to float rounding: batched and single matrix products may round
differently; tested to 1e-10 in float64), and a sweep may mix ensemble and solo runs freely.

Supported (:func:`ensemble_support`): rate networks, rules ``bptt``, ``eprop``, ``eprop-autograd`` and ``rflo``,
the Romo task, profiles without chip-precision traces, a single learning rate per run, no inter-flossing and no
gradient-alignment logging. Anything else trains alone. On the CPU, the PyTorch step is used for every member:
a float32 run that trains alone with ``fast = true`` (the fused native online step) agrees with its ensemble twin to
float32 rounding, not bit for bit. A member's ``/summary/step_path`` says ``ensemble``. With ``device = "cuda"`` in
the configs the same code runs on a GPU (tested against the CPU where one is present; not yet measured).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from neuroinit.cells.base import PARAM_NAMES, CellParams
from neuroinit.experiments.train import (  # the solo run's pieces: an ensemble reuses them member by member
    RESUMABLE_CHANGES,
    ProgressEvent,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    _check_out,
    _close_run,
    _Job,
    _LrRun,
    _open_run,
    _result,
    _StopFlag,
    _task_kind,
)
from neuroinit.io.runfile import remove_stale_temps, run_file_lock
from neuroinit.learning.autograd import BPTT, AutogradEprop
from neuroinit.learning.base import Trial, accumulate_grads
from neuroinit.learning.online import OnlineEprop, accumulate_step, init_traces, trace_step
from neuroinit.tasks.base import Batch

__all__ = ["MEMBER_FIELDS", "SUPPORTED", "ensemble_backward", "ensemble_groups", "ensemble_key",
           "ensemble_support", "runs_fused_alone", "train_ensemble"]

MEMBER_FIELDS = ("seed", "gain", "lr")   # what may differ between the members of one ensemble
SUPPORTED = "rate networks, rules bptt / eprop / eprop-autograd / rflo, the Romo task, profiles without " \
            "chip-precision traces, one learning rate per run, no inter-flossing, no align_every"


def ensemble_support(config: TrainConfig) -> str | None:
    """None when ``config`` can train in an ensemble; otherwise one line saying why not and what is supported."""
    from neuroinit.profiles import load_profile

    why = []
    if config.model != "rate":
        why.append(f"model {config.model!r}")
    if config.rule not in ("bptt", "eprop", "eprop-autograd", "rflo"):
        why.append(f"rule {config.rule!r}")
    if _task_kind(config.task) != "romo":
        why.append(f"task {config.task!r}")
    if len(config.lrs) != 1:
        why.append("an lr_grid")
    if config.floss_inter_every:
        why.append("inter-flossing")
    if config.align_every:
        why.append("align_every")
    profile = load_profile(config.profile) if not why else None
    if profile is not None and profile.learns_on_chip and profile.learning.trace_bits:
        why.append(f"profile {config.profile!r} (chip-precision traces)")
    if not why:
        return None
    return f"not supported in an ensemble: {', '.join(why)}; supported: {SUPPORTED}"


def ensemble_key(config: TrainConfig) -> str:
    """Runs with equal keys may train in one ensemble: the config up to seed, gain, learning rate and the
    checkpoint frequency."""
    d = config.to_dict()
    for name in (*MEMBER_FIELDS, *RESUMABLE_CHANGES):
        d.pop(name, None)
    return json.dumps(d, sort_keys=True, default=str)


def _check(configs: Sequence[TrainConfig], out_paths: Sequence) -> None:
    if not configs:
        raise ValueError("Invalid ensemble: no configs")
    if len(out_paths) != len(configs):
        raise ValueError(f"Invalid ensemble: {len(configs)} configs but {len(out_paths)} out paths")
    paths = [str(Path(p).resolve()) for p in out_paths]
    if len(set(paths)) != len(paths):
        raise ValueError("Invalid ensemble: two members write the same out path")
    for c in configs:
        if not isinstance(c, TrainConfig):
            raise ValueError(f"Invalid config {type(c).__name__}: expected a TrainConfig")  # noqa: TRY004
        reason = ensemble_support(c)
        if reason is not None:
            raise ValueError(f"Invalid ensemble member: {reason}")
    key = ensemble_key(configs[0])
    for c in configs[1:]:
        if ensemble_key(c) != key:
            a, b = configs[0].to_dict(), c.to_dict()
            diff = sorted(k for k in a if k not in (*MEMBER_FIELDS, *RESUMABLE_CHANGES) and a[k] != b.get(k))
            raise ValueError(f"Invalid ensemble: members may differ only in {', '.join(MEMBER_FIELDS)}; these "
                             f"differ in {', '.join(diff)}")


def train_ensemble(configs: Sequence[TrainConfig], out_paths: Sequence, *, resume: bool = False,
                   overwrite: bool = False, start_if_missing: bool = False,
                   progress: Callable[[int, ProgressEvent], None] | None = None) -> list[TrainResult]:
    """Train ``configs`` as one ensemble, member ``j`` into ``out_paths[j]`` (module docstring).

    ``resume`` / ``overwrite`` / ``start_if_missing`` as in :func:`~neuroinit.experiments.train.train`, per
    member (each member's file is locked while the ensemble trains): complete members are
    returned as they are, the others continue from their checkpoints (members at different checkpoints train in
    one ensemble per checkpoint iteration). ``progress(j, event)`` reports member ``j``'s events. A member that
    diverges leaves the ensemble (its file says diverged; its result has ``status == "diverged"``); the others
    go on. Ctrl-C / SIGTERM checkpoints every member, then raises ``KeyboardInterrupt``.
    """
    _check(configs, out_paths)
    outs = [_check_out(c, p, resume=resume, start_if_missing=start_if_missing) for c, p in zip(configs, out_paths)]
    with contextlib.ExitStack() as stack:
        for out in outs:
            stack.enter_context(run_file_lock(out))
            remove_stale_temps(out)
        stop = stack.enter_context(_StopFlag())
        jobs: list[_Job | TrainResult] = []
        for j, (c, out) in enumerate(zip(configs, outs)):
            notify = None if progress is None else (lambda e, j=j: progress(j, e))
            jobs.append(_open_run(c, out, resume=resume, overwrite=overwrite, progress=notify))
        todo = [j for j, job in enumerate(jobs)
                if isinstance(job, _Job) and job.run.runs[0].status not in ("complete", "diverged")]
        lruns = {j: _LrRun(jobs[j], 0, jobs[j].ctx.config.lrs[0]) for j in todo}
        for lrun in lruns.values():
            lrun.step_path = "ensemble"
        for start in sorted({lr.start for lr in lruns.values()}):
            _train_members([lruns[j] for j in todo if lruns[j].start == start], stop)
        results = []
        for job in jobs:
            if isinstance(job, TrainResult):
                results.append(job)
                continue
            try:
                results.append(_close_run(job))
            except TrainingDiverged:
                results.append(_result(job.run, job.out))
        return results


def _train_members(members: list[_LrRun], stop: _StopFlag) -> None:
    """The training loop of :func:`~neuroinit.experiments.train._train_one`, one iteration for all members."""
    c = members[0].job.ctx.config
    task = members[0].job.ctx.task
    active = list(members)
    for i in range(members[0].start, c.iters):
        if stop.event.is_set():
            msgs = [m.interrupt(i) for m in active]
            raise KeyboardInterrupt(f"{msgs[0]} ({len(msgs)} ensemble members checkpointed)")
        batches = [m.job.ctx.batch(c.batch, m.gens["batch"]) for m in active]
        for m in active:
            m.opt.zero_grad(set_to_none=True)
        trials = ensemble_backward([m.rule for m in active], batches, task)
        active = [m for m, t, b in zip(active, trials, batches) if m.after(i, t, b)]
        if not active:
            return
    for m in active:
        m.complete()


def _stack_batches(batches: Sequence[Batch]) -> Batch:
    shapes = {tuple(b.inputs.shape) for b in batches}
    if len(shapes) != 1:
        raise ValueError(f"Invalid ensemble batches: members drew inputs of different shapes {sorted(shapes)}")
    return Batch(*(torch.stack(x, dim=1) for x in zip(*batches)))


def _stack_state(state, k: int):
    return type(state)(*(s.unsqueeze(0).repeat(k, *([1] * s.dim())) for s in state))


def ensemble_backward(rules: Sequence, batches: Sequence[Batch], task) -> list[Trial]:
    """One trial per member, batched: member ``j`` runs ``batches[j]`` through ``rules[j].cell`` and gets the
    gradient ``rules[j].backward(batches[j], task)`` would give, added to its ``.grad``. The rules are of one
    kind on cells of one configuration (BPTT, autograd e-prop or online e-prop / RFLO without chip-precision
    traces)."""
    kinds = {type(r) for r in rules}
    if len(kinds) != 1 or next(iter(kinds)) not in (BPTT, AutogradEprop, OnlineEprop):
        raise ValueError(f"Invalid ensemble rules {sorted(k.__name__ for k in kinds)}: one of BPTT, "
                         "AutogradEprop, OnlineEprop for all members")
    cells = [r.cell for r in rules]
    per = [c.params() for c in cells]
    stacked = CellParams(*(torch.stack([getattr(p, n) for p in per]) for n in PARAM_NAMES))
    # vectors get a singleton batch dimension, so (K, B, n) + (K, 1, n) broadcasts member by member
    view = stacked._replace(bias=stacked.bias.unsqueeze(-2), b_out=stacked.b_out.unsqueeze(-2))
    sb = _stack_batches(batches)
    if isinstance(rules[0], OnlineEprop):
        return _online(rules, cells, stacked, view, sb, batches, task)
    return _autograd(rules, cells, view, sb, batches, task)


def _autograd(rules, cells, view, sb, batches, task) -> list[Trial]:
    """BPTT / autograd e-prop (``_run_and_differentiate`` for all members at once)."""
    r0 = rules[0]
    if getattr(r0, "truncation", None) is not None or getattr(r0, "feedback", None) is not None:
        raise ValueError("Invalid ensemble rule: truncated BPTT and random-feedback autograd e-prop are not "
                         f"supported; supported: {SUPPORTED}")
    detach = isinstance(r0, AutogradEprop)
    cell = cells[0]
    state = _stack_state(cell.init_state(sb.inputs.shape[2]), len(cells))
    ys = []
    for u in sb.inputs:
        y, state = cell.step(view, state, u, eprop_detach=detach)
        ys.append(y)
    outputs = torch.stack(ys)
    losses = [task.loss(outputs[:, k], b) for k, b in enumerate(batches)]
    leaves = [getattr(c, n) for c in cells for n in PARAM_NAMES]
    grads = torch.autograd.grad(sum(losses), leaves, allow_unused=True)
    np_ = len(PARAM_NAMES)
    for k, c in enumerate(cells):
        g = grads[k * np_:(k + 1) * np_]
        # contiguous: autograd hands back strided slices, and torch's fused Adam (the optimizer train uses; seen
        # with torch 2.14 on the CPU) keeps its state in the strides of the first .grad and steps wrongly when a
        # later .grad has other strides
        accumulate_grads(c, {n: x.contiguous() for n, x in zip(PARAM_NAMES, g) if x is not None})
    outputs = outputs.detach()
    return [Trial(loss.detach(), outputs[:, k]) for k, loss in enumerate(losses)]


@torch.no_grad()
def _online(rules, cells, stacked, view, sb, batches, task) -> list[Trial]:
    """Online e-prop / RFLO (:meth:`OnlineEprop.step` for all members at once)."""
    if any(r.trace_quantiser is not None for r in rules):
        raise ValueError(f"Invalid ensemble rule: chip-precision traces are not supported; supported: {SUPPORTED}")
    cell, k = cells[0], len(cells)
    spec = rules[0].spec
    fb = view.w_out if rules[0].feedback is None else torch.stack([r.feedback for r in rules])
    n_steps, _, batch_size = sb.mask.shape
    state = _stack_state(cell.init_state(batch_size), k)
    traces = init_traces(spec, (k, batch_size), cell.n_in, cell.n_hidden, like=stacked.w_rec.detach())
    grads = {n: torch.zeros_like(getattr(stacked, n)) for n in PARAM_NAMES}
    outputs = stacked.w_out.new_empty(n_steps, k, batch_size, cell.n_out)
    for t in range(n_steps):
        u = sb.inputs[t]
        y, new = cell.step(view, state, u)
        f = cell.local_factors(view, state, new, u)
        traces = trace_step(spec, traces, f)
        accumulate_step(grads, task.output_error(y, sb, t), fb, f, traces)
        outputs[t] = y
        state = new
    for j, c in enumerate(cells):
        accumulate_grads(c, {n: g[j] for n, g in grads.items()})
    return [Trial(task.loss(outputs[:, j], b).detach(), outputs[:, j]) for j, b in enumerate(batches)]


# ------------------------------------------------------------------------------------------ sweeps

def runs_fused_alone(config: TrainConfig) -> bool:
    """Whether ``config`` trained alone takes the fused native online step (:mod:`neuroinit.learning.fused`:
    e-prop / RFLO, ``fast``, float32, CPU, a C compiler). On the CPU that step (one native call per trial) is
    faster than the batched PyTorch step of an ensemble (``benchmarks/ensemble_speed.md``), so a sweep trains
    such runs alone."""
    if not (config.rule in ("eprop", "rflo") and config.fast and config.dtype == "float32"
            and torch.device(config.device).type == "cpu"):
        return False
    from neuroinit.learning import fused

    return fused.available()


def ensemble_groups(runs: Sequence, size: int) -> list[list]:
    """Planned sweep runs (:class:`~neuroinit.experiments.sweep.PlannedRun`) in groups of at most ``size`` that
    may train as one ensemble (equal :func:`ensemble_key`, each supported, not :func:`runs_fused_alone`), in the
    order given; a run that cannot join one is a group of its own (it trains alone)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"Invalid ensemble size {size!r}: an integer >= 0 (0 or 1: every run alone)")
    groups: list[list] = []
    open_: dict[str, list] = {}
    for run in runs:
        if size <= 1 or ensemble_support(run.config) is not None or runs_fused_alone(run.config):
            groups.append([run])
            continue
        key = ensemble_key(run.config)
        group = open_.get(key)
        if group is None or len(group) >= size:
            group = open_[key] = []
            groups.append(group)
        group.append(run)
    return groups
