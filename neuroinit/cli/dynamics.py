"""The ``init``, ``lyapunov``, ``curvature`` and ``alignment`` commands: a network's initial state and dynamics."""

from __future__ import annotations

import contextlib
import sys

import click

from neuroinit._util import fmt
from neuroinit.cli import OneLineErrorsCommand, echo_json, fail_cleanly, main
from neuroinit.cli.choices import ModelChoice
from neuroinit.cli.sweep import _gain_list


# --- init ---
def _print_init_report(report) -> None:
    lo, hi = report.gain_interval
    rel = (report.realised_gain_std / report.used_gain - 1) if report.used_gain else 0.0
    rows = [
        ("requested gain", fmt(report.requested_gain)),
        ("used gain", fmt(report.used_gain) + ("  (clamped)" if report.used_gain != report.requested_gain
                                                  else "")),
        ("realisable gains", f"[{fmt(lo)}, {fmt(hi)}]  (realised within 2%)"),
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
        click.echo(f"  {name.ljust(8)}  {fmt(report.scale.get(name)).rjust(10)}  "
                   f"{('-' if exp is None else str(exp)).rjust(8)}  {fmt(report.rmse[name]).rjust(10)}")


@main.command("init", cls=OneLineErrorsCommand)
@click.option("--model", type=ModelChoice(), required=True, help="Neuron model (registered cells).")
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


# --- dynamics ---
_DYN_DTYPES = ("float32", "float64")


def _print_spectrum(res, title: str) -> None:
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


def _print_lyapunov(report) -> None:
    net, d = report.network, report.drive
    click.echo(f"{net.title}; {net.cell.extra_repr()}")
    click.echo(f"driven by {d['task']} (dt {d['dt_ms']:g} ms, input x {d['input_scale']:g}): {d['batch']} sequences "
               f"x {d['steps']} steps after {d['warmup']} warm-up steps, QR every {d['qr_every']}, {d['dtype']}")
    _print_spectrum(report.before, "initial" if report.floss else "exponents")
    if report.floss:
        f = report.floss
        _print_spectrum(report.after, f"after {f['iters']} {f['mode']} flossing iterations (k = {f['k']})")


def _check_network_options(run, which, fresh: dict) -> None:
    """RUN or a fresh init (--model --hidden --gain), not both; the rate and LIF options for their model only."""
    if run is not None:
        given = [name for name, val in fresh.items() if val is not None]
        if given:
            raise ValueError(f"Invalid options {', '.join(given)} with a run file: they describe a fresh init; "
                             "give either RUN or --model/--hidden/--gain")
        return
    missing = [name for name in ("--model", "--hidden", "--gain") if fresh[name] is None]
    if missing:
        raise ValueError(f"Missing {', '.join(missing)}: give a RUN file, or a fresh init with --model, "
                         "--hidden and --gain")
    if which is not None:
        raise ValueError("Invalid option --which without a RUN file: it selects a stored network")
    from neuroinit.cells import cell_class

    section = cell_class(fresh["--model"]).config_section()
    options = {"--alpha": "alpha", "--activation": "activation", "--form": "form", "--dt": "dt", "--tau-m": "tau_m"}
    wrong = [n for n, key in options.items() if fresh[n] is not None and key not in section]
    if wrong:
        allowed = [n for n, key in options.items() if key in section]
        raise ValueError(f"Invalid options {', '.join(wrong)} for --model {fresh['--model']}: allowed "
                         f"{', '.join(allowed) or 'none of the cell options'}")


def _floss_k_value(text: str | None):
    """--floss-k as the library takes it: "auto" or an integer (None: the library's default)."""
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"Invalid --floss-k {text}: allowed auto (max(1, N // 8)) or an integer 1..N") from None


def _given(**values) -> dict:
    """The options given on the command line (None: not given, the library's default applies)."""
    return {k: v for k, v in values.items() if v is not None}


@contextlib.contextmanager
def _floss_progress(total: int, desc: str, quiet: bool):
    """A progress bar on stderr for flossing (none in --json mode or without iterations); yields the callback."""
    if quiet or not total:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="it", file=sys.stderr, leave=False, disable=None)

    def progress(it, loss, exps):
        bar.update(1)
        bar.set_postfix_str(f"lambda_1 {exps[0]:+.4f}", refresh=False)

    try:
        yield progress
    finally:
        bar.close()


@main.command("lyapunov", cls=OneLineErrorsCommand)
@click.argument("run", required=False)
@click.option("--which", type=click.Choice(["initial", "floss", "final"]), default=None,
              help="Run-file form: which stored network [final].")
@click.option("--model", type=ModelChoice(), default=None, help="Fresh init: the neuron model.")
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
@click.option("--k", type=click.IntRange(min=1), default=None, help="How many top exponents [1].")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Sequences [10].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Accumulated steps per sequence (task trials are concatenated back to back) [500].")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              help="Re-orthonormalised warm-up steps (discarded) [50].")
@click.option("--qr-every", type=click.IntRange(min=1), default=None,
              help="Re-orthonormalise every this many steps [1].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the fresh init (inputs and initial states use seed + 1, flossing seed + 2).")
@click.option("--dtype", type=click.Choice(_DYN_DTYPES), default="float32", show_default=True)
@click.option("--floss-iters", type=click.IntRange(min=0), default=None,
              help="Floss the network this many iterations, then report the exponents again [0].")
@click.option("--floss-mode", type=click.Choice(["local", "full", "detached"]), default=None, help="[local]")
@click.option("--floss-k", default=None, help="Exponents flossed: an integer 1..N, or auto = max(1, N // 8) [auto].")
@click.option("--floss-lr", type=click.FloatRange(0, min_open=True), default=None, help="[0.001]")
@click.option("--floss-steps", type=click.IntRange(min=1), default=None,
              help="Flossing window: steps over which each iteration's exponents are estimated [55].")
@click.option("--floss-warmup", type=click.IntRange(min=0), default=None,
              help="Flossing transient before the window (re-orthonormalised, not differentiated) [20].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (no progress bar).")
@fail_cleanly
def lyapunov_command(run, which, model, hidden, gain, alpha, activation, form, dt, tau_m, input_scale, profile, task,
                     k, batch, steps, warmup, qr_every, seed, dtype, floss_iters, floss_mode, floss_k, floss_lr,
                     floss_steps, floss_warmup, as_json) -> None:
    """Top-K Lyapunov exponents (QR method; natural log, per step and per tau) of the network stored in RUN
    (--which initial|floss|final), or of a fresh init (--model --hidden --gain [--alpha --profile]), driven by
    task inputs as training feeds them (time step and input scale: the run's settings, or training's defaults).
    LIF networks get the surrogate (pseudo-derivative) spectrum. Defaults in brackets are the library's
    (neuroinit.experiments.lyapunov_report)."""
    import torch

    from neuroinit.experiments import lyapunov_report as lyap

    fresh = {"--model": model, "--hidden": hidden, "--gain": gain, "--alpha": alpha, "--activation": activation,
             "--form": form, "--dt": dt, "--tau-m": tau_m, "--input-scale": input_scale, "--profile": profile}
    _check_network_options(run, which, fresh)
    if run is not None:
        net = lyap.network_from_run(run, which or "final", task=task, dtype=getattr(torch, dtype))
    else:
        net = lyap.fresh_network(model, hidden, gain, profile=profile or "ideal", task=task or "romo", seed=seed,
                                 dtype=getattr(torch, dtype), input_scale=input_scale,
                                 **_given(alpha=alpha, activation=activation, form=form, dt=dt, tau_m=tau_m))
    n = net.cell.n_hidden
    if k is not None and k > net.cell.observable_size:   # K N exponents (K = 2 for ALIF), as lyapunov_spectrum
        raise ValueError(f"Invalid --k {k}: must be between 1 and the state size K N = {net.cell.observable_size}")
    floss_k = _floss_k_value(floss_k)
    if isinstance(floss_k, int) and not 1 <= floss_k <= n:
        raise ValueError(f"Invalid --floss-k {floss_k}: allowed auto (max(1, N // 8)) or an integer between 1 and "
                         f"N = {n}")
    spec = lyap.SpectrumSettings(**_given(k=k, batch=batch, steps=steps, warmup=warmup, qr_every=qr_every))
    floss = lyap.FlossSettings(**_given(iters=floss_iters, mode=floss_mode, k=floss_k, lr=floss_lr,
                                        steps=floss_steps, warmup=floss_warmup))
    with _floss_progress(floss.iters, f"{floss.mode} flossing", as_json) as progress:
        report = lyap.analyse(net, spec, floss, seed=seed, progress=progress)
    if as_json:
        echo_json(report.to_dict())
    else:
        _print_lyapunov(report)


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
    from neuroinit.cells import model_names
    from neuroinit.dynamics.alignment import ALIGN_RULES

    if value is None:
        return None
    out = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        model, _, rule = item.partition(":")
        if model not in model_names() or rule not in ALIGN_RULES:
            raise click.BadParameter(f"{item!r}: allowed MODEL:RULE with MODEL {' or '.join(model_names())} and RULE "
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
    from neuroinit.experiments import alignment_report as al

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
            from neuroinit.cells import model_names

            models = _str_list(model, "model", model_names()) or ("rate",)
            rules = _str_list(rule, "rule", al.ALIGN_RULES) or ("eprop",)
            pair_list = tuple((m, r) for m in models for r in rules)
        config = {"task": task, "hidden": hidden, "batch": batch, "profile": profile}
        if alpha is not None:
            from neuroinit.cells import cell_class
            from neuroinit.experiments.train import TrainConfig, resolve_settings

            spiking = sorted({m for m, _ in pair_list if "alpha" not in cell_class(m).config_section()})
            if spiking:
                raise ValueError(f"Invalid --alpha for --model {', '.join(spiking)}: it sets a rate network's "
                                 "dt / tau")
            tau = resolve_settings(TrainConfig(task=task, model=pair_list[0][0], lyapunov_k=1))["tau_ms"]
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
