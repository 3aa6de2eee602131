"""The ``neuroinit`` command line: parsing and printing only; the work lives in the library."""

from __future__ import annotations

import functools
import json
import math
import sys

import click

from neuroinit.profiles import ProfileError


def fail_cleanly(func):
    """Turn library errors into one line on stderr and a non-zero exit (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            out = func(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not at exit
            return out
        except BrokenPipeError:
            _end_quietly_on_broken_pipe()
        except (ProfileError, ValueError, FileNotFoundError, OSError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise click.ClickException(str(msg).splitlines()[0] if str(msg) else type(e).__name__) from None

    return wrapper


def _end_quietly_on_broken_pipe() -> None:
    """The reader of stdout went away (``neuroinit show run.h5 | head -1``): stop without a message, as a
    command killed by SIGPIPE does (exit status 141); stdout goes to /dev/null so the exit flush is silent."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


def _check_out_dir(out: str, option: str = "--out") -> None:
    """Output files go into existing directories only (a typo in a path is an error, not a new directory)."""
    import os

    parent = os.path.dirname(out)
    if parent and not os.path.isdir(parent):
        raise click.ClickException(f"Invalid {option} {out!r}: directory {parent!r} does not exist; create it "
                                   "first or give another path")


def _note_missing_fused(reason: str | None) -> None:
    """One line on stderr when the fused native step cannot run here (no compiler, a broken CC, ...)."""
    click.echo(f"note: the fused native step is unavailable ({reason}); the PyTorch step runs instead (the "
               "same results to float32 rounding, 30-50x slower for LIF at N = 256)", err=True)


def json_safe(obj):
    """Non-finite floats as null (an ideal profile's gain interval ends at inf; a sequence that met a zero
    Jacobian has exponent -inf), so ``--json`` output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def echo_json(obj) -> None:
    click.echo(json.dumps(json_safe(obj), indent=2, sort_keys=True, default=float))


class _OneLineUsageError(click.ClickException):
    """A bad option value as one line ("Error: Invalid value for '--model': ...") with the usage exit code 2,
    instead of click's usage text + hint + error (the CLI contract: one clear line, no traceback)."""

    exit_code = 2


class OneLineErrorsCommand(click.Command):
    """A click command whose usage errors are one line on stderr (exit code 2)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise _OneLineUsageError(e.format_message().splitlines()[0]) from None


@click.group()
@click.version_option(package_name="neuroinit")
def main() -> None:
    """neuroinit: initial connectivity, local learning and chip deployment for rate and spiking RNNs."""


# --- profiles ---
@main.group("profiles")
def profiles_group() -> None:
    """Inspect hardware profiles (bundled chip families or your own TOML files)."""


def _profile_summary(profile) -> dict:
    return {
        "name": profile.name,
        "weight_bits": profile.weights.bits,
        "scaling": profile.weights.scaling,
        "on_chip_learning": profile.learns_on_chip,
        "description": profile.description,
    }


@profiles_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@fail_cleanly
def profiles_list(as_json: bool) -> None:
    """List the bundled profiles: name, weight bits, scaling, on-chip learning, description."""
    from neuroinit.profiles import bundled_profile_names, load_profile

    rows = [_profile_summary(load_profile(name)) for name in bundled_profile_names()]
    if as_json:
        echo_json(rows)
        return
    header = ("name", "weights", "scaling", "learning", "description")
    cells = [(r["name"], "float" if r["weight_bits"] == 0 else f"int{r['weight_bits']}", r["scaling"],
              "on-chip" if r["on_chip_learning"] else "off-chip", r["description"]) for r in rows]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header) - 1)]
    for c in [header, *cells]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(c[:-1], widths)) + "  " + c[-1])


@profiles_group.command("show")
@click.argument("name_or_path")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON (all sections).")
@fail_cleanly
def profiles_show(name_or_path: str, as_json: bool) -> None:
    """Show every section of a profile, given a bundled NAME or a PATH to a .toml file."""
    from neuroinit.profiles import load_profile, profile_to_dict

    profile = load_profile(name_or_path)
    data = profile_to_dict(profile)
    if as_json:
        echo_json(data)
        return
    click.echo(f"{profile.name}: {profile.description}")
    click.echo(f"source: {profile.source}")
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        click.echo(f"[{section}]")
        for key, value in values.items():
            click.echo(f"  {key} = {json.dumps(value)}")
    if not profile.weights.is_float:
        click.echo(f"weight codes: {profile.weights.code_min}..{profile.weights.code_max}")
    click.echo(f"ideal: {'yes' if profile.is_ideal else 'no'}; "
               f"learns on chip: {'yes' if profile.learns_on_chip else 'no'}")


# --- init ---
def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _print_init_report(report) -> None:
    lo, hi = report.gain_interval
    rel = (report.realised_gain_std / report.used_gain - 1) if report.used_gain else 0.0
    rows = [
        ("requested gain", _fmt(report.requested_gain)),
        ("used gain", _fmt(report.used_gain) + ("  (clamped)" if report.used_gain != report.requested_gain
                                                  else "")),
        ("realisable gains", f"[{_fmt(lo)}, {_fmt(hi)}]  (realised within 2%)"),
        ("realised gain", f"{report.realised_gain_std:.4f}  ({rel:+.2%} vs used; std(W_rec) sqrt(N))"),
        ("spectral radius", (f"{report.float_spectral_radius:.4f} float, "
                             f"{report.realised_spectral_radius:.4f} quantised")),
        ("zero weights", f"{report.frac_zero:.2%} of off-diagonal W_rec"),
        ("saturated", f"{report.n_saturated} entries at an end code"),
    ]
    if report.threshold_code is not None:
        rows.append(("threshold code", str(report.threshold_code)))
    click.echo(f"{report.model} network, N = {report.n_hidden}, profile {report.profile}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"  {key.ljust(width)}  {value}")
    click.echo(f"  {'matrix'.ljust(8)}  {'scale'.rjust(10)}  {'exponent'.rjust(8)}  {'rmse'.rjust(10)}")
    for name in report.rmse:
        exp = report.exponent.get(name)
        click.echo(f"  {name.ljust(8)}  {_fmt(report.scale.get(name)).rjust(10)}  "
                   f"{('-' if exp is None else str(exp)).rjust(8)}  {_fmt(report.rmse[name]).rjust(10)}")


@main.command("init", cls=OneLineErrorsCommand)
@click.option("--model", type=click.Choice(["rate", "lif"]), required=True, help="Rate or LIF network.")
@click.option("--hidden", type=click.IntRange(min=1), required=True, help="Number of hidden neurons N.")
@click.option("--gain", type=float, required=True, help="Recurrent gain g: W_rec ~ g N(0, 1/N).")
@click.option("--profile", required=True, help="Bundled profile name (see 'profiles list') or a .toml path.")
@click.option("--inputs", type=click.IntRange(min=1), default=1, show_default=True, help="Input channels.")
@click.option("--outputs", type=click.IntRange(min=1), default=2, show_default=True, help="Readout channels.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Generator seed.")
@click.option("--rounding", type=click.Choice(["nearest", "stochastic"]), default="nearest", show_default=True,
              help="How weights are rounded onto the profile's grid.")
@click.option("--clamp-gain", is_flag=True, help="Clamp a gain outside the realisable interval instead of failing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (inf written as null).")
@fail_cleanly
def init_command(model: str, hidden: int, gain: float, profile: str, inputs: int, outputs: int, seed: int,
                 rounding: str, clamp_gain: bool, as_json: bool) -> None:
    """Hardware-aware initialisation: draw a gain-scaled network, move it onto PROFILE's weight grid and
    report what that did (realised gain, spectral radius, zeros, saturation, scales)."""
    import torch

    from neuroinit.init import hardware_init

    _, report = hardware_init(model, inputs, hidden, outputs, gain, profile,
                              generator=torch.Generator().manual_seed(seed), rounding=rounding,
                              out_of_range="clamp" if clamp_gain else "error", dtype=torch.float64)
    if as_json:
        echo_json(report.to_dict())
    else:
        _print_init_report(report)
# --- end init ---


# --- bench ---
def _int_list(value: str, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: allowed a comma-separated list of integers >= 1",
                                 param_hint=f"--{name}") from None
    if not vals or any(v < 1 for v in vals):
        raise click.BadParameter(f"{value!r}: allowed a comma-separated list of integers >= 1",
                                 param_hint=f"--{name}")
    return vals


@main.command("bench")
@click.option("--profile", default="ideal", show_default=True,
              help="Hardware profile (bundled name or TOML path) the online rule learns under.")
@click.option("--model", "models", type=click.Choice(["rate", "lif", "both"]), default="both", show_default=True,
              help="rate: voltage form (e-prop) and rate form (RFLO); lif: spiking e-prop.")
@click.option("--hidden", default=None, help="Hidden sizes, comma-separated [128,256,512,1024; quick: 64].")
@click.option("--batch", default=None, help="Batch sizes, comma-separated [1,16,64; quick: 1,16].")
@click.option("--steps", type=int, default=None, help="Time steps T per trial [100; quick: 40].")
@click.option("--repeats", type=int, default=None, help="Timed trials per method [5; quick: 3].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's).")
# the bench's METHODS, written out so that --help does not import torch (tests/test_bench.py keeps them equal)
@click.option("--methods", default=None, help="Comma-separated subset of: neuroinit-fused, neuroinit-torch, "
              "autograd-eprop, bptt, snntorch-bptt, norse-bptt.")
@click.option("--quick", is_flag=True, help="A small configuration that finishes in under 2 minutes.")
@click.option("--recalibrate", is_flag=True, help="Measure bandwidth and matmul rate again (else cached).")
@click.option("--json", "json_out", default=None, metavar="OUT",
              help="Write the results as JSON to OUT ('-': stdout, and no table).")
@fail_cleanly
def bench_command(profile, models, hidden, batch, steps, repeats, device, threads, methods, quick, recalibrate,
                  json_out) -> None:
    """Online-update throughput of rate and LIF networks under a profile, next to autograd e-prop, BPTT,
    snntorch and norse, with the fraction of the machine's roofline reached."""
    import torch

    from neuroinit import bench

    if threads is not None:
        if threads < 1:
            raise click.BadParameter(f"{threads}: allowed integers >= 1", param_hint="--threads")
        torch.set_num_threads(threads)
    overrides = dict(profile=profile, models=models, device=device, recalibrate=recalibrate,
                     hidden=_int_list(hidden, "hidden") if hidden else None,
                     batch=_int_list(batch, "batch") if batch else None, steps=steps, repeats=repeats,
                     methods=tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None)
    if quick:
        cfg = bench.quick_config(**overrides)
    else:
        cfg = bench.BenchConfig(**{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    if cfg.device == "cpu" and "neuroinit-fused" in cfg.methods:
        from neuroinit.learning import fused

        if not fused.available():
            _note_missing_fused(fused.unavailable_reason())
    quiet = json_out == "-"
    jobs = len(bench._jobs(cfg))
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=jobs, desc="bench", unit="run", file=sys.stderr, leave=False, disable=None)

    def progress(msg: str) -> None:
        if bar is not None:
            bar.set_postfix_str(msg, refresh=True)

    partial = None
    if json_out and json_out != "-":
        from pathlib import Path

        partial = Path(json_out + ".partial.jsonl")  # one line per result as it lands (long runs)
        partial.write_text("")

    def on_result(res) -> None:
        if bar is not None:
            bar.update(1)
        if partial is not None:
            from dataclasses import asdict

            with partial.open("a") as f:
                f.write(json.dumps(asdict(res), default=float) + "\n")

    result = bench.run_bench(cfg, progress=progress, on_result=on_result)
    if bar is not None:
        bar.close()
    if json_out == "-":
        echo_json(result)
        return
    if json_out:
        from pathlib import Path

        Path(json_out).write_text(json.dumps(result, indent=2, sort_keys=True, default=float))
        if partial is not None:
            partial.unlink(missing_ok=True)
    click.echo(bench.format_table(result))
    bad = [c for c in result["gradient_checks"] if not c["ok"]]
    if bad:
        raise click.ClickException("gradient check failed for " + ", ".join(
            f"{c['variant']}/{c['method']}" for c in bad) + " (those methods were not timed)")
# --- end bench ---


# --- dynamics ---
_DYN_DTYPES = ("float32", "float64")


def _dyn_task(name: str, settings: dict):
    """The task whose inputs drive the network (None: autonomous), at the time step training uses
    (``settings``: :func:`neuroinit.experiments.train.resolve_settings`' dt_ms and tau_ms)."""
    from neuroinit.tasks import make_task

    if name.lower() == "none":
        return None
    if name.lower() == "romo":
        return make_task("romo", dt_ms=settings["dt_ms"], tau_ms=settings["tau_ms"])
    return make_task(name, dt_ms=settings["dt_ms"])


def _dyn_spectrum(cell, task, *, k: int, batch: int, steps: int, warmup: int, qr_every: int, seed: int,
                  input_scale: float = 1.0):
    """Lyapunov spectrum with inputs (task trials times ``input_scale``, as training feeds them) and initial states
    drawn from ``seed`` (the same for every call)."""
    import torch

    from neuroinit.dynamics import lyapunov_spectrum, task_inputs

    gen = torch.Generator().manual_seed(seed)
    if task is None:
        return lyapunov_spectrum(cell, None, k=k, steps=steps, batch=batch, warmup=warmup, qr_every=qr_every,
                                 generator=gen)
    if task.n_in != cell.n_in:
        raise ValueError(f"Invalid task {task.name!r} for this network: it has {task.n_in} input channels, the "
                         f"network {cell.n_in}")
    inputs = input_scale * task_inputs(task, batch=batch, length=warmup + steps, generator=gen,
                                       dtype=cell.w_rec.dtype)
    with torch.no_grad():
        return lyapunov_spectrum(cell, inputs, k=k, warmup=warmup, qr_every=qr_every, generator=gen)


def _dyn_print_spectrum(res, title: str) -> None:
    import torch

    s = res.summary()
    click.echo(f"{title}: max exponent {s['max']:+.4f} per step ({s['max_per_tau']:+.4f} per tau), "
               f"std over sequences {s['std_per_step'][0]:.4f}")
    if not bool(torch.isfinite(res.per_step).all()):
        click.echo("  note: some sequences met a zero Jacobian (log 0 = -inf): a ReLU network that fell silent, "
                   "or whose decaying state underflowed (try --dtype float64)")
    if res.k > 1:
        click.echo(f"  {'i':>4}  {'per step':>10}  {'std':>8}  {'per tau':>10}")
        for i, (m, sd, pt) in enumerate(zip(s["mean_per_step"], s["std_per_step"], s["per_tau"]), start=1):
            click.echo(f"  {i:>4}  {m:>+10.4f}  {sd:>8.4f}  {pt:>+10.4f}")


@main.command("lyapunov", cls=OneLineErrorsCommand)
@click.argument("run", required=False)
@click.option("--which", type=click.Choice(["initial", "floss", "final"]), default=None,
              help="Run-file form: which stored network [final].")
@click.option("--model", type=click.Choice(["rate", "lif"]), default=None, help="Fresh init: rate or LIF.")
@click.option("--hidden", type=click.IntRange(min=1), default=None, help="Fresh init: hidden neurons N.")
@click.option("--gain", type=float, default=None, help="Fresh init: recurrent gain g.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Fresh rate init: alpha = dt / tau [training's default: 0.5 on Romo, 0.2 on neurogym].")
@click.option("--activation", type=click.Choice(["tanh", "relu", "softplus", "linear"]), default=None,
              help="Fresh rate init: activation [tanh].")
@click.option("--form", type=click.Choice(["voltage", "rate"]), default=None, help="Fresh rate init [voltage].")
@click.option("--dt", type=click.FloatRange(0, min_open=True), default=None,
              help="Fresh LIF init: dt in ms [training's default: 2 on Romo, 5 on neurogym].")
@click.option("--tau-m", type=click.FloatRange(0, min_open=True), default=None,
              help="Fresh LIF init: membrane time constant in ms [20].")
@click.option("--input-scale", type=click.FloatRange(0, min_open=True), default=None,
              help="Fresh init: factor on the task inputs [training's default: 1 rate, 2 LIF].")
@click.option("--profile", default=None, help="Fresh init: hardware profile, bundled name or .toml path [ideal].")
@click.option("--task", default=None,
              help="Inputs that drive the network: romo, a neurogym id, or none (autonomous), at the network's "
                   "time step [fresh: romo; run file: the run's task].")
@click.option("--k", type=click.IntRange(min=1), default=1, show_default=True, help="How many top exponents.")
@click.option("--batch", type=click.IntRange(min=1), default=10, show_default=True, help="Sequences.")
@click.option("--steps", type=click.IntRange(min=1), default=500, show_default=True,
              help="Accumulated steps per sequence (task trials are concatenated back to back).")
@click.option("--warmup", type=click.IntRange(min=0), default=50, show_default=True,
              help="Re-orthonormalised warm-up steps (discarded).")
@click.option("--qr-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Re-orthonormalise every this many steps.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the fresh init (inputs and initial states use seed + 1, flossing seed + 2).")
@click.option("--dtype", type=click.Choice(_DYN_DTYPES), default="float32", show_default=True)
@click.option("--floss-iters", type=click.IntRange(min=0), default=0, show_default=True,
              help="Floss the network this many iterations, then report the exponents again.")
@click.option("--floss-mode", type=click.Choice(["local", "full", "detached"]), default="local", show_default=True)
@click.option("--floss-k", default="auto", show_default=True,
              help="Exponents flossed: an integer 1..N, or auto = max(1, N // 8).")
@click.option("--floss-lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--floss-steps", type=click.IntRange(min=1), default=55, show_default=True,
              help="Flossing window: steps over which each iteration's exponents are estimated.")
@click.option("--floss-warmup", type=click.IntRange(min=0), default=20, show_default=True,
              help="Flossing transient before the window (re-orthonormalised, not differentiated).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (no progress bar).")
@fail_cleanly
def lyapunov_command(run, which, model, hidden, gain, alpha, activation, form, dt, tau_m, input_scale, profile, task,
                     k, batch, steps, warmup, qr_every, seed, dtype, floss_iters, floss_mode, floss_k, floss_lr,
                     floss_steps, floss_warmup, as_json) -> None:
    """Top-K Lyapunov exponents (QR method; natural log, per step and per tau) of the network stored in RUN
    (--which initial|floss|final), or of a fresh init (--model --hidden --gain [--alpha --profile]), driven by
    task inputs as training feeds them (time step and input scale: the run's settings, or training's defaults).
    LIF networks get the surrogate (pseudo-derivative) spectrum."""
    import torch

    from neuroinit.cells import make_cell

    torch_dtype = getattr(torch, dtype)
    fresh = {"--model": model, "--hidden": hidden, "--gain": gain, "--alpha": alpha, "--activation": activation,
             "--form": form, "--dt": dt, "--tau-m": tau_m, "--input-scale": input_scale, "--profile": profile}
    if run is not None:
        given = [name for name, val in fresh.items() if val is not None]
        if given:
            raise ValueError(f"Invalid options {', '.join(given)} with a run file: they describe a fresh init; "
                             "give either RUN or --model/--hidden/--gain")
        from neuroinit.experiments.train import TrainConfig, resolve_settings
        from neuroinit.io.runfile import load_cell, read_run

        which = which or "final"
        cell = load_cell(run, which, dtype=torch_dtype)
        cfg = TrainConfig.from_dict(read_run(run).config)
        settings = resolve_settings(cfg)
        task_name = task or cfg.task
        network = {"run": str(run), "which": which, "model": cell.model, "n_hidden": cell.n_hidden,
                   "gain": cfg.gain, "seed": cfg.seed, "config": cell.config()}
    else:
        missing = [name for name, val in (("--model", model), ("--hidden", hidden), ("--gain", gain)) if val is None]
        if missing:
            raise ValueError(f"Missing {', '.join(missing)}: give a RUN file, or a fresh init with --model, "
                             "--hidden and --gain")
        if which is not None:
            raise ValueError("Invalid option --which without a RUN file: it selects a stored network")
        rate_only = [n for n in ("--alpha", "--activation", "--form") if fresh[n] is not None]
        lif_only = [n for n in ("--dt", "--tau-m") if fresh[n] is not None]
        if model == "lif" and rate_only:
            raise ValueError(f"Invalid options {', '.join(rate_only)} for --model lif: allowed --dt, --tau-m")
        if model == "rate" and lif_only:
            raise ValueError(f"Invalid options {', '.join(lif_only)} for --model rate: allowed --alpha, "
                             "--activation, --form")
        from neuroinit.experiments.train import TrainConfig, resolve_settings
        from neuroinit.init import hardware_init

        profile = profile or "ideal"
        task_name = task or "romo"
        # training's defaults for this task and model (time step, tau, input scale), overridden by the options
        settings = resolve_settings(TrainConfig(task="romo" if task_name.lower() == "none" else task_name,
                                                model=model, hidden=hidden, gain=gain, profile=profile, seed=seed))
        if model == "rate":
            if alpha is not None:
                settings["dt_ms"] = alpha * settings["tau_ms"]
            kwargs = {"alpha": settings["dt_ms"] / settings["tau_ms"], "activation": activation or "tanh",
                      "form": form or "voltage"}
        else:
            settings["dt_ms"] = settings["dt_ms"] if dt is None else dt
            settings["tau_ms"] = settings["tau_ms"] if tau_m is None else tau_m
            kwargs = {"dt": settings["dt_ms"], "tau_m": settings["tau_ms"], "tau_out": settings["tau_out_ms"]}
        if input_scale is not None:
            settings["input_scale"] = input_scale
        task_obj = _dyn_task(task_name, settings)
        n_in, n_out = (1, 2) if task_obj is None else (task_obj.n_in, task_obj.n_out)
        params, report = hardware_init(model, n_in, hidden, n_out, gain, profile,
                                       generator=torch.Generator().manual_seed(seed), dtype=torch_dtype)
        cell = make_cell(model, params, profile=profile, **kwargs)
        network = {"model": model, "n_hidden": hidden, "gain": gain, "used_gain": report.used_gain,
                   "seed": seed, "config": cell.config()}
    if run is not None:
        task_obj = _dyn_task(task_name, settings)
    if k > cell.n_hidden:
        raise ValueError(f"Invalid --k {k}: must be between 1 and N = {cell.n_hidden}")
    scale = float(settings["input_scale"])
    spec = {"k": k, "batch": batch, "steps": steps, "warmup": warmup, "qr_every": qr_every, "seed": seed + 1,
            "input_scale": scale}
    drive = {"task": task_name if task_obj is not None else "none", "batch": batch, "steps": steps,
             "warmup": warmup, "qr_every": qr_every, "dtype": dtype, "input_scale": scale,
             "dt_ms": settings["dt_ms"]}
    before = _dyn_spectrum(cell, task_obj, **spec)
    out = {"network": network, "drive": drive, "lyapunov": before.summary()}
    if not as_json:
        what = f"{run} ({which})" if run is not None else (
            f"fresh {model} network, N = {hidden}, gain {gain:g}, profile {profile}")
        click.echo(what + f"; {cell.extra_repr()}")
        click.echo(f"driven by {drive['task']} (dt {settings['dt_ms']:g} ms, input x {scale:g}): {batch} sequences x "
                   f"{steps} steps after {warmup} warm-up steps, QR every {qr_every}, {dtype}")
        _dyn_print_spectrum(before, "initial" if floss_iters else "exponents")
    if floss_iters:
        from neuroinit.dynamics import floss, task_inputs
        from neuroinit.dynamics.flossing import resolve_floss_k

        try:
            floss_k = resolve_floss_k(floss_k if floss_k == "auto" else int(floss_k), cell.n_hidden)
        except ValueError:
            raise ValueError(f"Invalid --floss-k {floss_k}: allowed auto (max(1, N // 8)) or an integer between 1 "
                             f"and N = {cell.n_hidden}") from None
        input_fn = None
        if task_obj is not None:
            def input_fn(g):
                return scale * task_inputs(task_obj, batch=1, length=floss_warmup + floss_steps, generator=g,
                                           dtype=cell.w_rec.dtype)
        bar = None
        if not as_json:
            from tqdm import tqdm

            bar = tqdm(total=floss_iters, desc=f"{floss_mode} flossing", unit="it", file=sys.stderr, leave=False,
                       disable=None)

        def progress(it, loss, exps):
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"lambda_1 {exps[0]:+.4f}", refresh=False)

        fr = floss(cell, iters=floss_iters, k=floss_k, mode=floss_mode, lr=floss_lr, input_fn=input_fn,
                   steps=floss_steps, warmup=floss_warmup, generator=torch.Generator().manual_seed(seed + 2),
                   callback=progress)
        if bar is not None:
            bar.close()
        after = _dyn_spectrum(cell, task_obj, **spec)
        out["floss"] = {"iters": floss_iters, "mode": floss_mode, "k": floss_k, "lr": floss_lr,
                        "steps": floss_steps, "warmup": floss_warmup,
                        "losses": fr.losses, "exponents": fr.exponents}
        out["lyapunov_after_floss"] = after.summary()
        if not as_json:
            _dyn_print_spectrum(after, f"after {floss_iters} {floss_mode} flossing iterations (k = {floss_k})")
    if as_json:
        echo_json(out)


@main.command("curvature", cls=OneLineErrorsCommand)
@click.argument("run")
@click.option("--trials", type=click.IntRange(min=1), default=256, show_default=True,
              help="Fresh trials for the test loss of the generalisation gap.")
@click.option("--max-iter", type=click.IntRange(min=1), default=500, show_default=True,
              help="At most this many Hessian-vector products.")
@click.option("--tol", type=click.FloatRange(0, min_open=True), default=1e-6, show_default=True,
              help="Stop when the eigenvalue estimate changes by less than this (relative).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@fail_cleanly
def curvature_command(run, trials, max_iter, tol, as_json) -> None:
    """Top Hessian eigenvalue of the loss w.r.t. W_rec of the trained network in RUN (power iteration on
    Hessian-vector products, untruncated BPTT loss, float64, the run's batch size of held-out trials), and its
    generalisation gap: test loss on fresh trials minus the training loss the run recorded at its end. The same
    numbers as the curvature figure of 'neuroinit plot'."""
    import math

    from neuroinit.experiments.plots import curvature_of_run
    from neuroinit.io.runfile import read_run

    rf = read_run(run)
    if "final" not in rf.weights:
        raise ValueError(f"{run}: no trained network (weights 'final') in this run file; the run has not finished")
    final_loss = rf.summary.get("final_loss")
    if final_loss is None and rf.selected is not None:
        final_loss = rf.selected.final_loss
    res = curvature_of_run(str(run), rf.config, None if final_loss is None else float(final_loss),
                           max_iter=max_iter, tol=tol, test_trials=trials)
    out = {"run": str(run), **res}
    if as_json:
        echo_json(out)
        return
    click.echo(f"{run}: {rf.config.get('model')} network on {rf.config.get('task')}, N = {rf.config.get('hidden')}")
    click.echo(f"top Hessian eigenvalue (W_rec, {res['held_out_trials']} held-out trials): "
               f"{res['top_eigenvalue']:.6g} ({res['iterations']} Hessian-vector products, "
               f"{'converged' if res['converged'] else 'NOT converged'})")
    click.echo(f"test loss ({trials} fresh trials): {res['test_loss']:.6g}")
    gap = res["gap"]
    if gap is None or not math.isfinite(gap):
        click.echo("generalisation gap: - (the run recorded no final training loss)")
    else:
        click.echo(f"train loss (recorded at the end of training): {res['train_loss']:.6g}; generalisation gap "
                   f"(test - train): {gap:+.6g}")
# --- end dynamics ---


# --- alignment ---
def _str_list(value: str | None, name: str, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
    if value is None:
        return None
    vals = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in vals if v not in allowed]
    if not vals or bad:
        raise click.BadParameter(f"{value!r}: allowed a comma-separated list of {', '.join(allowed)}",
                                 param_hint=f"--{name}")
    return vals


def _pairs(value: str | None) -> tuple[tuple[str, str], ...] | None:
    from neuroinit.dynamics.alignment import ALIGN_RULES

    if value is None:
        return None
    out = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        model, _, rule = item.partition(":")
        if model not in ("rate", "lif") or rule not in ALIGN_RULES:
            raise click.BadParameter(f"{item!r}: allowed MODEL:RULE with MODEL rate or lif and RULE "
                                     f"{', '.join(ALIGN_RULES)}, e.g. rate:eprop,rate:rflo,lif:eprop",
                                     param_hint="--pairs")
        out.append((model, rule))
    if not out:
        raise click.BadParameter(f"{value!r}: e.g. rate:eprop,rate:rflo,lif:eprop", param_hint="--pairs")
    return tuple(out)


@main.command("alignment", cls=OneLineErrorsCommand)
@click.argument("runs", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--which", type=click.Choice(["initial", "floss", "final"]), default=None,
              help="Run files: which stored network [final].")
@click.option("--model", default=None, help="Fresh init: models, comma-separated (rate, lif) [rate].")
@click.option("--rule", default=None, help="Local rules, comma-separated (eprop, rflo, eprop-autograd) [fresh: "
              "eprop; run files: the run's rule].")
@click.option("--pairs", default=None, help="Fresh init: MODEL:RULE pairs instead of --model x --rule, e.g. "
              "rate:eprop,rate:rflo,lif:eprop.")
@click.option("--gain", "gains", default=None, help="Fresh init: gains, comma-separated, e.g. 0,0.5,1,2.")
@click.option("--hidden", type=click.IntRange(min=1), default=256, show_default=True, help="Fresh init: N.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Fresh init: trials per batch (run files: the run's).")
@click.option("--batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Batches per network (the mean over them is one network's value).")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Fresh init: networks per condition (seeds --seed, --seed + 1, ...).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Fresh init: first seed.")
@click.option("--task", default="romo", show_default=True, help="Fresh init: romo, a neurogym id or alias.")
@click.option("--profile", default="ideal", show_default=True, help="Fresh init: hardware profile.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Fresh rate init: alpha = dt / tau [training's default].")
@click.option("--truncation", type=click.IntRange(min=1), default=None,
              help="Compare with BPTT truncated every this many steps (1: one-step) [full BPTT].")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float64", show_default=True)
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False),
              help="Write the JSON document (docs/alignment.md) to this file, atomically.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document instead of the table.")
@fail_cleanly
def alignment_command(runs, which, model, rule, pairs, gains, hidden, batch, batches, seeds, seed, task, profile,
                      alpha, truncation, dtype, out, as_json) -> None:
    """Truncation error of local learning rules: cosine similarity and relative error between a local rule's
    gradient (e-prop, RFLO, LIF e-prop) and the BPTT gradient, per weight matrix, averaged over batches and
    seeds; for fresh inits (--pairs or --model x --rule, --gain list) or stored networks (RUNS)."""
    from neuroinit.dynamics import alignment as al

    bar = None
    if not as_json:
        from tqdm import tqdm

        bar = tqdm(desc="alignment", unit="net", file=sys.stderr, leave=False, disable=None)

    def progress(done, total):
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    ctx = click.get_current_context()
    src = click.core.ParameterSource.COMMANDLINE
    try:
        _alignment(ctx, src, al, runs, which, model, rule, pairs, gains, hidden, batch, batches, seeds, seed, task,
                   profile, alpha, truncation, dtype, out, as_json, progress)
    except click.BadParameter as e:  # raised while running: one line, no usage text
        raise click.ClickException(e.format_message().splitlines()[0].replace("--gains", "--gain")) from None
    finally:
        if bar is not None:
            bar.close()


def _alignment(ctx, src, al, runs, which, model, rule, pairs, gains, hidden, batch, batches, seeds, seed, task,
               profile, alpha, truncation, dtype, out, as_json, progress) -> None:
    """The work of ``neuroinit alignment`` (options as there): the document, written and printed."""
    if runs:
        fresh_only = [f"--{n.replace('_', '-')}" for n in ("model", "pairs", "gains", "hidden", "batch", "seeds",
                                                            "seed", "task", "profile", "alpha")
                      if ctx.get_parameter_source(n) == src]
        if fresh_only:
            raise ValueError(f"Invalid options {', '.join(fresh_only).replace('--gains', '--gain')} with run "
                             "files: they describe a fresh init; give RUNS or a fresh init, not both")
        rules = _str_list(rule, "rule", al.ALIGN_RULES)
        if rules is not None and len(rules) > 1:
            raise ValueError("Invalid --rule with run files: give one local rule")
        doc = al.runs_report(list(runs), which=which or "final", rule=rules[0] if rules else None,
                             batches=batches, truncation=truncation, dtype=dtype, progress=progress)
    else:
        if which is not None:
            raise ValueError("Invalid option --which without run files: it selects a stored network")
        gain_list = _gain_list(gains)
        if gain_list is None:
            raise ValueError("Missing --gain: give run files, or a fresh init with --gain (e.g. 0,0.5,1,2)")
        if pairs is not None and (model is not None or rule is not None):
            raise ValueError("Invalid options: give --pairs or --model/--rule, not both")
        if pairs is not None:
            pair_list = _pairs(pairs)
        else:
            models = _str_list(model, "model", ("rate", "lif")) or ("rate",)
            rules = _str_list(rule, "rule", al.ALIGN_RULES) or ("eprop",)
            pair_list = tuple((m, r) for m in models for r in rules)
        config = {"task": task, "hidden": hidden, "batch": batch, "profile": profile}
        if alpha is not None:
            if any(m != "rate" for m, _ in pair_list):
                raise ValueError("Invalid --alpha for a LIF network: it sets the rate network's dt / tau")
            from neuroinit.experiments.train import TrainConfig, resolve_settings

            tau = resolve_settings(TrainConfig(task=task, model="rate", lyapunov_k=1))["tau_ms"]
            config["dt_ms"] = alpha * tau
        doc = al.fresh_report(pair_list, gain_list, list(range(seed, seed + seeds)), batches=batches,
                              truncation=truncation, dtype=dtype, progress=progress, **config)
    if out:
        al.write_report(out, doc)
    if as_json:
        echo_json(doc)
    else:
        click.echo(al.format_table(doc))
        if out:
            click.echo(f"wrote {out}")
# --- end alignment ---


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
                 "io_init", "chip_neuron", "tau_syn_ms")


@main.command("train", cls=OneLineErrorsCommand)
@click.option("--task", default="romo", show_default=True,
              help="'romo', a neurogym id (e.g. PerceptualDecisionMaking-v0) or an alias (2af, dms).")
@click.option("--model", type=click.Choice(["rate", "lif"]), default="rate", show_default=True)
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
              help="Online e-prop / RFLO through the fused native step where it gives the same results.")
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
    import os

    import torch

    from neuroinit.experiments.train import TrainConfig, TrainingDiverged, train

    torch.set_num_threads(threads)
    if resume and resume_or_start:
        raise click.ClickException("Invalid options: --resume and --resume-or-start exclude each other")
    if resume and not os.path.exists(out):
        raise click.ClickException(f"Cannot resume {out!r}: the file does not exist (check the path; "
                                   "--resume-or-start starts a new run when it is missing)")
    resume = resume or resume_or_start

    options["lr_grid"] = _float_list(options["lr_grid"])
    if options["floss_k"] != "auto":
        try:
            options["floss_k"] = int(options["floss_k"])
        except ValueError:
            raise click.BadParameter(f"{options['floss_k']!r}: allowed auto or an integer 1..N",
                                     param_hint="--floss-k") from None
    ctx = click.get_current_context()
    if resume and os.path.exists(out):
        from neuroinit.io.runfile import read_run

        values = dict(read_run(out).config)
        for name in _TRAIN_FIELDS:  # options given on the command line must match (train() checks)
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
                values[name] = options[name]
        config = TrainConfig.from_dict(values)
    else:
        config = TrainConfig(**{name: options[name] for name in _TRAIN_FIELDS})

    if config.fast and config.rule in ("eprop", "rflo") and config.device == "cpu":
        from neuroinit.learning import fused

        if not fused.available():
            _note_missing_fused(fused.unavailable_reason())
    from tqdm import tqdm

    # a progress bar on a terminal only; without one (nohup, CI, SLURM, --json) nothing but the resume line
    bar = tqdm(total=config.iters * len(config.lrs), file=sys.stderr, unit="it", dynamic_ncols=True,
               disable=as_json or not sys.stderr.isatty())

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

    try:
        result = train(config, out, resume=resume, overwrite=overwrite, start_if_missing=resume_or_start,
                       progress=progress)
    except TrainingDiverged as e:
        bar.close()
        raise click.ClickException(str(e).splitlines()[0]) from None
    except KeyboardInterrupt as e:
        bar.close()
        msg = str(e) or "interrupted"
        click.echo(f"{msg}; the run file {out} keeps the last checkpoint", err=True)
        sys.exit(130)
    bar.close()
    summary = result.to_dict()
    if as_json:
        echo_json(summary)
        return
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


# --- export ---
def _export_task(run, seed: int, trials: int):
    """The run's task (Romo: its deterministic test variant), one float64 batch scaled as in training, or
    ``(None, None)`` when the task cannot be rebuilt."""
    import torch

    from neuroinit.tasks import make_task

    name = str(run.config.get("task", "romo"))
    s = run.settings or {}
    if "dt_ms" not in s:
        return None, None
    if name.lower() == "romo":
        task = make_task("romo", dt_ms=s["dt_ms"], tau_ms=s.get("tau_ms", 100.0), variant="test")
    else:
        task = make_task(name, dt_ms=s["dt_ms"])
    batch = task.batch(trials, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scale = float(s.get("input_scale", 1.0))
    return task, batch._replace(inputs=batch.inputs * scale)


def _export_cell(path: str, which: str):
    """The stored network with the weight grids it was trained on (the run file's codes and scales)."""
    try:
        from neuroinit.io.runfile import load_cell, read_run
    except ImportError as e:  # pragma: no cover - run files ship with neuroinit
        raise click.ClickException(f"cannot read run files: {e}") from None
    from neuroinit.quantize import Grid

    run = read_run(path)
    cell = load_cell(path, which)
    ws = run.weights[which]
    for name, g in (ws.grids or {}).items():
        if name in cell.grids and g is not None:
            cell.grids[name] = Grid(float(g["scale"]), int(g["code_min"]), int(g["code_max"]),
                                    None if g.get("exponent") is None else int(g["exponent"]))
    return run, cell


@main.command("export", cls=OneLineErrorsCommand)
@click.argument("run_file", type=click.Path(dir_okay=False))
@click.option("--profile", default=None, help="Profile to deploy on (bundled name or .toml path) [the run's].")
@click.option("--format", "fmt", type=click.Choice(["nir", "netx", "h5", "xylo"]), required=True,
              help="nir: NIR graph + conformance vectors; netx: lava-dl netx HDF5 (Loihi profiles); "
                   "h5: neuroinit weights schema (any model; the export for rate networks); "
                   "xylo: Xylo's integer specification (xylo-like profile; --verify runs xylosim).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file (written atomically).")
@click.option("--verify", is_flag=True, help="NIR: re-simulate the file in snntorch, norse, rockpool (if "
                                             "installed) and the profile's integer emulation on the task input "
                                             "and a 0/1 raster; netx: run it in Lava (fixed point) when lava-dl or "
                                             "$NEUROINIT_LAVA_PYTHON is there, else say skipped; exit 1 on any "
                                             "mismatch.")
@click.option("--nir-target", type=click.Choice(["generic", "stock"]), default="generic", show_default=True,
              help="NIR only: generic (LI readout, r = tau/dt) or stock (the shape snntorch's import_from_nir "
                   "and norse's from_nir read as they are; docs/export.md).")
@click.option("--which", type=click.Choice(["final", "initial", "floss"]), default="final", show_default=True,
              help="Which stored weights to export.")
@click.option("--trials", type=click.IntRange(min=1), default=30, show_default=True,
              help="Task trials for the conformance vectors and the float-vs-chip accuracy.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the task batch.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
@fail_cleanly
def export_command(run_file: str, profile: str | None, fmt: str, out: str, verify: bool, nir_target: str,
                   which: str, trials: int, seed: int, as_json: bool) -> None:
    """Quantise RUN_FILE's trained network onto a chip profile and write it as NIR, lava-dl netx or neuroinit
    HDF5; report the float-vs-chip task accuracy (integer emulation) and, with --verify, spike mismatches of
    snntorch, norse and the emulation against neuroinit's float simulation."""
    import torch
    from tqdm import tqdm

    from neuroinit.profiles import load_profile

    if verify and fmt == "h5":
        raise click.ClickException("--verify checks NIR, netx and Xylo exports; allowed with --format nir or netx, "
                                   "or xylo (got --format h5)")
    stages = ["load", "write", "accuracy"] + (["verify"] if verify else [])
    bar = tqdm(total=len(stages), desc="export", unit="stage", file=sys.stderr, leave=False,
               disable=True if as_json else None)
    bar.set_postfix_str("load")
    run, cell = _export_cell(run_file, which)
    prof = load_profile(profile) if profile else cell.profile
    task, batch = _export_task(run, seed, trials)
    bar.update(1)
    report: dict = {"run": run_file, "which": which, "format": fmt, "out": out, "profile": prof.name,
                    "model": cell.model}
    bar.set_postfix_str("write")
    if fmt == "nir":
        from neuroinit.io.nir import to_nir, write_nir

        if verify and cell.model == "lif":
            from neuroinit.io.verify import check_verifiable

            check_verifiable(to_nir(cell, prof, target=nir_target)[0])   # refuse before anything is written
        ex = write_nir(out, cell, prof, inputs=batch.inputs if batch is not None else None, target=nir_target)
        report.update(nir_target=nir_target, conformance=str(ex.conformance), exact=ex.exact,
                      warnings=list(ex.warnings),
                      conformance_steps=ex.steps, conformance_trials=ex.trials, conformance_spikes=ex.spikes,
                      conformance_dropped_trials=ex.dropped_trials,
                      v_threshold=float(ex.graph.nodes["lif"].v_threshold[0]))
    elif fmt == "netx":
        from neuroinit.io.netx import write_netx

        integer_inputs = batch is not None and bool(torch.equal(batch.inputs, batch.inputs.round()))
        nx = write_netx(out, cell, prof, integer_inputs=integer_inputs)
        report.update(input_scale=nx.input_scale, a_in_unit=nx.a_in_unit, notes=list(nx.notes))
    elif fmt == "xylo":
        from neuroinit.io.xylo import export_xylo

        xy = export_xylo(out, cell, prof, batch.inputs if batch is not None else None, verify=verify, seed=seed)
        report.update(input_frac_bits=xy["input_frac_bits"], notes=xy["notes"])
    else:
        from neuroinit.io.nir import write_weights_h5

        write_weights_h5(out, cell, prof)
    bar.update(1)
    bar.set_postfix_str("accuracy")
    if cell.model == "lif" and task is not None:
        from neuroinit.emulate.integer import compare_on_task

        # netx: the deployment the file describes (graded input at input_scale, bias in a_in units)
        dep_kw = {"input_frac_bits": nx.input_frac_bits, "bias_exp": 6} if fmt == "netx" else {}
        if fmt == "xylo":   # the input counts the file describes
            dep_kw = {"input_frac_bits": xy["input_frac_bits"]}
        report["accuracy"] = compare_on_task(cell, task, prof, batch=batch, generator=torch.Generator(), **dep_kw)
    bar.update(1)
    ok = True
    if verify and fmt == "xylo":
        report["verify"], ok = xy["verify"], xy["ok"]
    elif verify and fmt == "netx":
        bar.set_postfix_str("verify")
        from neuroinit.io.netx import find_lava_python, verify_netx

        lava_python, why = find_lava_python()
        if lava_python is None or batch is None or cell.model != "lif":
            report["verify"] = {"skipped": why if lava_python is None else "no task batch to run"}
        else:
            report["verify"] = verify_netx(out, cell, batch.inputs, task=task, batch=batch, profile=prof,
                                           integer_inputs=integer_inputs, python=lava_python)
            ok = report["verify"]["ok"]
        bar.update(1)
    elif verify:
        bar.set_postfix_str("verify")
        from neuroinit.io.verify import verify_nir

        rep = verify_nir(out)
        report["verify"] = rep.to_dict()
        ok = rep.ok
        bar.update(1)
    bar.close()
    if as_json:
        echo_json(report)
    else:
        click.echo(f"wrote {out} ({fmt}, profile {prof.name}, {cell.model} network)")
        if "conformance" in report:
            click.echo(f"conformance vectors: {report['conformance']} ({report['conformance_trials']} trials x "
                       f"{report['conformance_steps']} steps, {report['conformance_spikes']} spikes; "
                       f"{report['conformance_dropped_trials']} near-tie trials dropped)")
        for w in report.get("warnings", []) + report.get("notes", []):
            click.echo(f"warning: {w}")
        acc = report.get("accuracy")
        if acc:
            click.echo(f"task accuracy: float {acc['float_accuracy']:.3f} -> chip {acc['chip_accuracy']:.3f} "
                       f"({acc['accuracy_change']:+.3f}); loss {acc['float_loss']:.4g} -> {acc['chip_loss']:.4g} "
                       f"({acc['arithmetic']} arithmetic, {acc['spike_mismatches']} spike mismatches of "
                       f"{acc['spikes_float']} float spikes)")
        v = report.get("verify", {})
        if "skipped" in v:
            click.echo(f"verify in Lava skipped: {v['skipped']}")
        elif fmt == "xylo" and verify:
            for name, b in v.items():   # a 0/1 raster and the task input, as Xylo's input counts
                click.echo(f"verify xylosim, {name} input ({b['trials']} trials x {b['steps']} steps, "
                           f"{b['spikes']} spikes): {b['spike_mismatches']} spike, {b['i_mismatches']} current, "
                           f"{b['v_mismatches']} membrane, {b['v_out_mismatches']} readout mismatches")
        elif fmt == "netx" and verify:
            click.echo(f"verify in Lava ({v['trials']} trials x {v['steps']} steps, {v['spikes_lava']} spikes): "
                       f"{v['spike_mismatches']} spike, {v['v_mismatches']} voltage, {v['readout_v_mismatches']} "
                       f"readout mismatches vs the integer emulation"
                       + (f"; accuracy Lava {v['lava_accuracy']:.3f}, emulation {v['emulation_accuracy']:.3f}"
                          if "lava_accuracy" in v else ""))
        elif verify:
            for name, b in v["by_input"].items():   # the conformance (task) input and a 0/1 raster
                click.echo(f"verify {name} ({b['trials']} trials x {b['steps']} steps, {b['spikes_float']} spikes): "
                           + ", ".join(f"{k} {n} mismatches" for k, n in b["mismatches"].items()))
    if not ok:
        raise click.ClickException({"netx": "verification failed: Lava differs from the integer emulation",
                                    "xylo": "verification failed: xylosim differs from the package's emulation"}
                                   .get(fmt, "verification failed: an importer's spikes differ from neuroinit's"))
# --- end export ---


# --- experiments ---
def _gain_list(value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals:
        raise click.BadParameter(f"{value!r}: allowed a comma-separated list of numbers, e.g. 0.3,1.5,3",
                                 param_hint="--gains")
    return vals


@main.command("sweep", cls=OneLineErrorsCommand)
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Sweep directory (run files, ledger sweep.json) [sweeps/<spec name>].")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Local worker processes [the CPUs available / --threads]; 0 runs in this process.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch threads per run (1 keeps results independent of the machine).")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Run on an existing Dask distributed cluster instead (see docs/experiments.md).")
@click.option("--dry-run", is_flag=True, help="Validate the spec, list the runs and how many are finished; run none.")
@click.option("--select", type=click.Choice(["final", "min", "learning-time"]), default="final", show_default=True,
              help="Summary: choose each condition's learning rate by the mean of the last 20 logged losses, the "
                   "lowest logged loss, or the learning time (loss stays below 5% of the initial).")
@click.option("--ensemble", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Train up to K compatible runs (same config up to seed, gain, lr; rate networks) as one batched "
                   "model, each into its own run file; 0: every run alone (docs/experiments.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the report and summary as JSON; no progress bar.")
@fail_cleanly
def sweep_command(spec, out, workers, threads, scheduler, dry_run, select, ensemble, as_json) -> None:
    """Run the grid in SPEC (TOML: task x model x rule x gain x seed x learning rate x profile), one run file
    per run in OUT/runs; resumable (finished runs are skipped, checked by content); a summary table at the end
    with the best learning rate per condition."""
    from pathlib import Path

    from neuroinit.experiments import sweep as sw

    plan = sw.load_spec(spec)
    out_dir = Path(out) if out else Path("sweeps") / plan.name
    if dry_run:
        states = [(r, sw.run_state(out_dir / r.file, r.config)[0]) for r in plan.runs]
        if as_json:
            echo_json({"name": plan.name, "sweep_dir": str(out_dir), "total": len(plan.runs),
                       "runs": [{"id": r.run_id, "file": r.file, "run": r.describe(), "state": s}
                                for r, s in states]})
            return
        for r, s in states:
            click.echo(f"{r.run_id}  {s:<9} {r.describe()}")
        done = sum(s in sw.FINISHED for _, s in states)
        click.echo(f"{len(plan.runs)} runs in {plan.name!r}, {done} finished in {out_dir}")
        return
    from tqdm import tqdm

    bar = None

    def on_start(total, finished):
        nonlocal bar
        bar = tqdm(total=total, initial=finished, desc=plan.name, unit="run", file=sys.stderr, dynamic_ncols=True,
                   disable=True if as_json else None)

    def progress(ev):
        if bar is not None:
            bar.update(1)
            if ev.status != "complete":
                bar.write(f"{ev.status}: {ev.description}" + (f": {ev.error}" if ev.error else ""), file=sys.stderr)

    try:
        report = sw.run_sweep(plan, out_dir, workers=workers, scheduler=scheduler, threads=threads,
                              progress=progress, on_start=on_start, ensemble=ensemble)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        click.echo(f"interrupted; finished runs are kept in {out_dir}: rerun the same command to resume",
                   err=True)
        sys.exit(130)
    finally:
        if bar is not None:
            bar.close()
    rows = sw.summarize(sw.summaries_from_dir(out_dir, curves=False), select=select)
    if as_json:
        echo_json({"report": report.to_dict(), "summary": rows})
    else:
        click.echo(sw.format_summary(rows))
        c = report.counts
        click.echo(f"{report.total} runs ({report.skipped} already finished, {report.ran} run now on "
                   f"{report.executor}): {c.get('complete', 0)} complete, {c.get('diverged', 0)} diverged, "
                   f"{c.get('failed', 0)} failed, {c.get('pending', 0)} pending; {report.wall_time:.1f} s; "
                   f"ledger {Path(report.sweep_dir) / sw.MANIFEST}")
    if report.failed:
        first = report.failed[0]
        raise click.ClickException(f"{len(report.failed)} run(s) failed (errors in the ledger "
                                   f"{Path(report.sweep_dir) / sw.MANIFEST}); first: {first['run']}: "
                                   f"{first['error']}; rerun the command to retry them")


@main.command("plot", cls=OneLineErrorsCommand)
@click.argument("sweep_dir", type=click.Path())
@click.option("--figure", type=click.Choice(["learning-curves", "lyapunov", "flossing", "rate-vs-spiking",
                                             "curvature", "alignment"]), required=True,
              help="alignment: SWEEP_DIR is a 'neuroinit alignment --out' JSON file.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Image file (.png/.pdf/.svg).")
@click.option("--task", default=None, help="Only this task.")
@click.option("--model", type=click.Choice(["rate", "lif"]), default=None, help="Only this model.")
@click.option("--gains", default=None, help="Only these gains, comma-separated.")
@click.option("--spec", "spec_name", default=None, help="Only the runs of this spec (by name) [every spec run in "
              "SWEEP_DIR].")
@click.option("--max-iter", type=click.IntRange(min=1), default=100, show_default=True,
              help="curvature: Hessian-vector products per network (power iteration).")
@click.option("--smooth", type=click.IntRange(min=1), default=1, show_default=True,
              help="Learning curves as a trailing mean over this many logged losses (1: raw).")
@click.option("--select", type=click.Choice(["final", "min", "learning-time"]), default="final", show_default=True,
              help="Choose each condition's learning rate by the mean of the last 20 logged losses, the lowest "
                   "logged loss, or the learning time (stated on the figure).")
@click.option("--json", "as_json", is_flag=True, help="Print {figure, out, curves} as JSON.")
@fail_cleanly
def plot_command(sweep_dir, figure, out, task, model, gains, spec_name, max_iter, smooth, select, as_json) -> None:
    """Draw a figure from the runs of a sweep: learning curves by gain (Fig. 1/2), max Lyapunov exponent vs
    gain before/after training (Fig. 3), flossing vs none (Fig. 4), rate vs spiking, curvature vs rule; or the
    gradient alignment vs gain from an alignment JSON file (--figure alignment)."""
    from neuroinit.experiments.plots import plot_figure

    _check_out_dir(out)
    bar = None
    if figure == "curvature" and not as_json:
        from tqdm import tqdm

        bar = tqdm(desc="curvature", unit="run", file=sys.stderr, leave=False, disable=None)

    def progress(i, total):
        if bar is not None:
            bar.total = total
            bar.update(i - bar.n)

    try:
        n = plot_figure(sweep_dir, figure, out, task=task, model=model, gains=_gain_list(gains), spec=spec_name,
                        max_iter=max_iter, smooth=smooth, progress=progress, select=select)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        echo_json({"figure": figure, "out": out, "curves": n})
    else:
        click.echo(f"{figure}: {n} curves -> {out}")


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
# --- end experiments ---


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
