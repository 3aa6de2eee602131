"""The ``train``, ``show`` and ``compare`` commands: training runs and their run files."""

from __future__ import annotations

import sys

import click

from neuroinit.cli import (
    OneLineErrorsCommand,
    _check_out_dir,
    _note_missing_fused,
    echo_json,
    fail_cleanly,
    main,
)
from neuroinit.cli.choices import ModelChoice


# --- train ---
def _float_list(value: str | None) -> tuple[float, ...]:
    if value is None:
        return ()
    try:
        vals = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: allowed a comma-separated list of numbers, e.g. 1e-3,3e-3,1e-2",
                                 param_hint="--lr-grid") from None
    if not vals:
        raise click.BadParameter(f"{value!r}: allowed a comma-separated list of numbers", param_hint="--lr-grid")
    return vals


# CLI option name -> TrainConfig field (the same name with dashes, except where noted)
_TRAIN_FIELDS = ("task", "model", "rule", "gain", "profile", "hidden", "batch", "iters", "lr", "lr_grid",
                 "optimizer", "seed", "device", "dtype", "form", "activation", "dt_ms", "tau_ms", "tau_m_ms",
                 "tau_out_ms", "v_th", "reset", "n_refractory", "input_scale", "clamp_gain", "log_every",
                 "checkpoint_every", "checkpoint_seconds", "eval_batch", "lyapunov", "lyapunov_k", "floss_iters",
                 "floss_k", "floss_mode", "floss_lr", "fast", "align_every", "floss_inter_every", "floss_inter_iters",
                 "io_init", "chip_neuron", "tau_syn_ms", "cell_options")


@main.command("train", cls=OneLineErrorsCommand)
@click.option("--task", default="romo", show_default=True,
              help="'romo', a neurogym id (e.g. PerceptualDecisionMaking-v0) or an alias (2af, dms).")
@click.option("--model", type=ModelChoice(), default="rate", show_default=True)
@click.option("--rule", type=click.Choice(["bptt", "eprop", "eprop-autograd", "rflo"]), default="eprop",
              show_default=True, help="Learning rule (rflo on a rate net uses Murray's rate form).")
@click.option("--gain", type=float, default=1.0, show_default=True, help="Initial recurrent gain g.")
@click.option("--profile", default="ideal", show_default=True, help="Hardware profile name or .toml path.")
@click.option("--hidden", type=int, default=256, show_default=True, help="Hidden neurons N.")
@click.option("--batch", type=int, default=32, show_default=True, help="Trials per iteration.")
@click.option("--iters", type=int, default=6000, show_default=True, help="Training iterations.")
@click.option("--lr", type=float, default=None, help="Learning rate [default: 0.05/N on Romo, 3e-3 on neurogym].")
@click.option("--lr-grid", default=None, help="Comma-separated learning rates; keeps the best by the mean of "
              "the last 20 logged losses (all curves are stored).")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random draw.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--form", type=click.Choice(["voltage", "rate"]), default=None,
              help="Rate-net form [default: rate for rflo, voltage otherwise].")
@click.option("--activation", type=click.Choice(["tanh", "linear", "relu", "softplus"]), default="tanh",
              show_default=True)
@click.option("--dt-ms", type=float, default=None, help="Time step in ms [default per task/model, see docs].")
@click.option("--tau-ms", type=float, default=None, help="Rate neuron tau in ms; Romo's time unit for LIF nets.")
@click.option("--tau-m-ms", type=float, default=None, help="LIF membrane time constant in ms.")
@click.option("--tau-out-ms", type=float, default=None, help="LIF readout time constant in ms.")
@click.option("--v-th", type=float, default=1.0, show_default=True, help="LIF threshold.")
@click.option("--reset", type=click.Choice(["subtract", "zero"]), default="subtract", show_default=True)
@click.option("--n-refractory", type=int, default=0, show_default=True, help="LIF refractory steps.")
@click.option("--chip-neuron", is_flag=True, help="LIF: train the profile's [neuron] model (xylo-like: synaptic "
                                                  "current, v >= v_th, spike counts, its reset; docs/export.md).")
@click.option("--tau-syn-ms", type=float, default=None, help="With --chip-neuron: synaptic current tau in ms "
                                                             "[default dt / ln 2].")
@click.option("--cell-option", "cell_options", multiple=True, metavar="NAME=VALUE",
              help="A parameter of the model's own cell (repeatable), e.g. --model alif --cell-option tau_a=500 "
                   "--cell-option beta=0.2; the names each model takes: its class's config section.")
@click.option("--input-scale", type=float, default=None, help="Factor on the task inputs [default 1, LIF 2].")
@click.option("--clamp-gain", is_flag=True, help="Clamp a gain the profile cannot realise instead of failing.")
@click.option("--log-every", type=int, default=10, show_default=True, help="Log loss and accuracy every N its.")
@click.option("--checkpoint-every", type=int, default=100, show_default=True, help="Checkpoint every N its.")
@click.option("--checkpoint-seconds", type=float, default=60.0, show_default=True,
              help="Also checkpoint when this many seconds passed (0 = off).")
@click.option("--eval-batch", type=int, default=256, show_default=True, help="Trials in the final evaluation.")
@click.option("--lyapunov/--no-lyapunov", default=True, show_default=True,
              help="Lyapunov exponents of the initial and final network.")
@click.option("--lyapunov-k", type=int, default=8, show_default=True, help="How many top exponents.")
@click.option("--floss-iters", type=int, default=0, show_default=True, help="Pre-flossing iterations.")
@click.option("--floss-k", default="auto", show_default=True,
              help="Exponents flossed: an integer 1..N, or auto = max(1, N // 8) (stored resolved).")
@click.option("--floss-mode", type=click.Choice(["local", "full", "detached"]), default="local",
              show_default=True)
@click.option("--floss-lr", type=float, default=1e-3, show_default=True)
@click.option("--floss-inter-every", type=int, default=0, show_default=True,
              help="Inter-flossing: floss before every this many training iterations (0 = off).")
@click.option("--floss-inter-iters", type=int, default=0, show_default=True,
              help="Inter-flossing: flossing iterations per episode.")
@click.option("--io-init", type=click.Choice(["schuessler", "pytorch"]), default="schuessler", show_default=True,
              help="Input/readout init: Schuessler (normalised columns, readout O(1/N)) or PyTorch's nn.Linear "
                   "default U(+-1/sqrt(fan_in)).")
@click.option("--fast/--no-fast", default=True, show_default=True,
              help="Online e-prop / RFLO through the fused native step, BPTT through the fused BPTT, where they "
                   "give the same results (to float32 rounding).")
@click.option("--align-every", type=int, default=0, show_default=True,
              help="Every K iterations store the cosine / relative error of the rule's gradient vs BPTT's on the "
                   "current batch in the run file (local rules; 0 = off; see 'neuroinit alignment').")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Run file to write (HDF5).")
@click.option("--resume", is_flag=True, help="Continue OUT from its last checkpoint (config from the file); "
              "OUT must exist.")
@click.option("--resume-or-start", is_flag=True, help="Continue OUT if it exists, else start a new run there "
              "(for job scripts that rerun the same command).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads for torch (small per-step matmuls gain little from more; parallel sweeps less).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary; no progress bar.")
@fail_cleanly
def train_command(out: str, resume: bool, resume_or_start: bool, overwrite: bool, threads: int, as_json: bool,
                  **options) -> None:
    """Train a rate or LIF RNN from a hardware-aware init and write a run file (see docs/training.md)."""
    import torch

    from neuroinit.experiments.train import TrainingDiverged, train

    torch.set_num_threads(threads)
    config = _train_config(out, resume, resume_or_start, options)
    resume = resume or resume_or_start
    if config.fast and config.rule in ("eprop", "rflo") and config.device == "cpu":
        from neuroinit.learning import fused

        if not fused.available():
            _note_missing_fused(fused.unavailable_reason())
    from tqdm import tqdm

    # a progress bar on a terminal only; without one (nohup, CI, SLURM, --json) nothing but the resume line
    bar = tqdm(total=config.iters * len(config.lrs), file=sys.stderr, unit="it", dynamic_ncols=True,
               disable=as_json or not sys.stderr.isatty())
    try:
        result = train(config, out, resume=resume, overwrite=overwrite, start_if_missing=resume_or_start,
                       progress=_train_progress(bar, out))
    except TrainingDiverged as e:
        bar.close()
        raise click.ClickException(str(e).splitlines()[0]) from None
    except KeyboardInterrupt as e:
        bar.close()
        click.echo(f"{str(e) or 'interrupted'}; the run file {out} keeps the last checkpoint", err=True)
        sys.exit(130)
    bar.close()
    if as_json:
        echo_json(result.to_dict())
    else:
        _print_train_result(result)


def _train_config(out: str, resume: bool, resume_or_start: bool, options: dict):
    """The TrainConfig of the options; resuming, the run file's config with the options given on the command
    line (train() checks that they match)."""
    import os

    from neuroinit.experiments.train import TrainConfig

    if resume and resume_or_start:
        raise click.ClickException("Invalid options: --resume and --resume-or-start exclude each other")
    if resume and not os.path.exists(out):
        raise click.ClickException(f"Cannot resume {out!r}: the file does not exist (check the path; "
                                   "--resume-or-start starts a new run when it is missing)")
    options["lr_grid"] = _float_list(options["lr_grid"])
    options["cell_options"] = _cell_options(options["cell_options"])
    if options["floss_k"] != "auto":
        try:
            options["floss_k"] = int(options["floss_k"])
        except ValueError:
            raise click.BadParameter(f"{options['floss_k']!r}: allowed auto or an integer 1..N",
                                     param_hint="--floss-k") from None
    if (resume or resume_or_start) and os.path.exists(out):
        from neuroinit.io.runfile import read_run

        ctx = click.get_current_context()
        values = dict(read_run(out).config)
        for name in _TRAIN_FIELDS:
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
                values[name] = options[name]
        return TrainConfig.from_dict(values)
    return TrainConfig(**{name: options[name] for name in _TRAIN_FIELDS})


def _cell_options(items: tuple[str, ...]) -> dict:
    """``NAME=VALUE`` pairs as TrainConfig.cell_options: numbers as numbers, true/false as booleans, else text."""
    out: dict = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise click.BadParameter(f"{item!r}: allowed NAME=VALUE, e.g. tau_a=500", param_hint="--cell-option")
        text = text.strip()
        value: object = {"true": True, "false": False}.get(text.lower(), text)
        if value is text:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    continue
        out[name.strip()] = value
    return out


def _train_progress(bar, out: str):
    """train()'s progress callback: the resume line, phase names and the iteration count on ``bar``."""

    def progress(ev) -> None:
        if ev.phase == "resume":
            lr = f" (lr {ev.lr:g}, {ev.run + 1}/{ev.n_runs})" if ev.n_runs > 1 else ""
            bar.write(f"resuming {out} from its checkpoint at iteration {ev.iteration} of {ev.iters}{lr}",
                      file=sys.stderr)
            return
        if ev.phase != "train":
            bar.set_description(ev.phase)
            return
        desc = "train" if ev.n_runs == 1 else f"lr {ev.lr:.3g} ({ev.run + 1}/{ev.n_runs})"
        if getattr(bar, "desc", None) != desc:  # a disabled bar (no terminal, --json) has no desc
            bar.set_description(desc)
        bar.update(ev.done - bar.n)
        bar.set_postfix(loss=f"{ev.loss:.4g}", refresh=False)

    return progress


def _print_train_result(result) -> None:
    lt = result.learning_time
    click.echo(f"run file: {result.out_path} ({result.status})")
    click.echo(f"loss: initial {result.initial_loss:.4g}, final {result.final_loss:.4g} (mean of the last 20 "
               f"logged), eval {result.eval_loss:.4g}")
    click.echo(f"accuracy: {result.eval_accuracy:.3f} (chance {result.chance_accuracy:.2f})")
    click.echo(f"learning time: {'never' if lt is None else lt} (first iteration with loss < 5% of the initial)")
    if len(result.lrs) > 1:
        click.echo(f"learning rate: {result.lr:g} chosen from {', '.join(f'{x:g}' for x in result.lrs)}")
    if result.lyapunov_initial is not None:
        click.echo(f"max Lyapunov exponent (per step): {result.lyapunov_initial:+.4f} before, "
                   f"{result.lyapunov_final:+.4f} after training")
    click.echo(f"wall time: {result.wall_time:.1f} s")


def _show_summary(rf) -> dict:
    import tomllib

    try:
        profile_name = tomllib.loads(rf.profile_text).get("name", "?")
    except tomllib.TOMLDecodeError:
        profile_name = "?"
    s = rf.summary
    runs = [{"lr": r.lr, "status": r.status, "iterations_done": r.iterations_done, "initial_loss": r.initial_loss,
             "final_loss": r.final_loss, "learning_time": r.learning_time, "message": r.message,
             "checkpoint_iteration": None if r.checkpoint is None else r.checkpoint.iteration} for r in rf.runs]
    lyap = {which: {"max_per_step": res.get("max_per_step"), "max_per_tau": res.get("max_per_tau"),
                    "k": res.get("k")} for which, res in rf.lyapunov.items()}
    return {"path": rf.path, "status": rf.status, "message": rf.message, "format_version": rf.format_version,
            "config": rf.config, "settings": rf.settings, "profile": profile_name, "seed": rf.seed,
            "versions": rf.versions, "runs": runs, "selected_run": rf.selected_run,
            "summary": s, "lyapunov": lyap, "floss_iters": len(rf.floss.get("losses", ()))}


@main.command("show", cls=OneLineErrorsCommand)
@click.argument("run", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@fail_cleanly
def show_command(run: str, as_json: bool) -> None:
    """Summarise a run file: config, profile, losses, accuracy, learning time, Lyapunov before/after."""
    from neuroinit.io.runfile import lock_holder, read_run

    rf = read_run(run)
    if rf.status == "running":
        holder = lock_holder(run)
        if holder is None:  # nobody writes it: the writer was killed (SIGKILL, power, OOM) after a checkpoint
            rf.status = "interrupted"
            rf.message = "no process is writing it (stopped without a final checkpoint, e.g. killed); " \
                         "resume with --resume"
            for r in rf.runs:
                if r.status == "running":
                    r.status = "interrupted"
        else:
            rf.message = f"being written by {holder}"
    info = _show_summary(rf)
    if as_json:
        echo_json(info)
        return
    c, st, s = rf.config, rf.settings, rf.summary
    click.echo(f"{rf.path}: {rf.status}" + (f" ({rf.message})" if rf.message else ""))
    click.echo(f"task {c.get('task')}, {c.get('model')} network N={c.get('hidden')}, rule {c.get('rule')}, "
               f"gain {c.get('gain')}, profile {info['profile']}, seed {rf.seed}")
    timing = ", ".join(f"{k} {st[k]:g}" for k in ("dt_ms", "tau_ms", "tau_m_ms", "tau_out_ms", "alpha",
                                                   "input_scale") if st.get(k) is not None)
    click.echo(f"settings: {timing}; {c.get('optimizer')}, batch {c.get('batch')}, {c.get('iters')} iterations")
    for k, r in enumerate(info["runs"]):
        mark = "*" if k == rf.selected_run else " "
        lt = "never" if r["learning_time"] is None else r["learning_time"]
        extra = "" if r["checkpoint_iteration"] is None else f", checkpoint at {r['checkpoint_iteration']}"
        last = f"{r['final_loss']:.4g}"
        if r["status"] != "complete":  # unfinished: the last logged loss so far, not the (undefined) final one
            logged = rf.runs[k].loss
            last = f"{float(logged[-1]):.4g} (last logged)" if len(logged) else "-"
        click.echo(f" {mark} lr {r['lr']:.4g}: {r['status']}, {r['iterations_done']} iterations, loss "
                   f"{r['initial_loss']:.4g} -> {last}, learning time {lt}{extra}")
    if "eval_loss" in s:
        click.echo(f"eval: loss {s['eval_loss']:.4g}, accuracy {s['eval_accuracy']:.3f} "
                   f"(chance {s['chance_accuracy']:.2f}; initial network: {s.get('eval_accuracy_initial', 0):.3f})")
        lt = s.get("learning_time")
        click.echo(f"learning time: {'never' if lt is None else lt}; wall time {s.get('wall_time', 0):.1f} s")
    for which in ("initial", "floss", "final"):
        if which in rf.lyapunov:
            res = rf.lyapunov[which]
            click.echo(f"Lyapunov ({which}): max {res['max_per_step']:+.4f} per step, {res['max_per_tau']:+.4f} "
                       f"per tau (top {res['k']})")
    if info["floss_iters"]:
        click.echo(f"pre-flossing: {info['floss_iters']} iterations ({c.get('floss_mode')}, k={c.get('floss_k')})")
    if c.get("floss_inter_every"):
        click.echo(f"inter-flossing: {c.get('floss_inter_iters')} iterations every {c.get('floss_inter_every')} "
                   f"training iterations ({c.get('floss_mode')}, k={c.get('floss_k')})")
    click.echo("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(rf.versions.items()) if v))
# --- end train ---

@main.command("compare", cls=OneLineErrorsCommand)
@click.argument("run_a", type=click.Path(dir_okay=False))
@click.argument("run_b", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Image file (.png/.pdf/.svg).")
@click.option("--json", "as_json", is_flag=True, help="Print {out, curves} as JSON.")
@fail_cleanly
def compare_command(run_a, run_b, out, as_json) -> None:
    """Two run files side by side: learning curves and Lyapunov spectra before/after training."""
    from neuroinit.experiments.plots import plot_compare

    _check_out_dir(out)
    n = plot_compare(run_a, run_b, out)
    if as_json:
        echo_json({"out": out, "curves": n})
    else:
        click.echo(f"compare: {n} curves -> {out}")
