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
            return func(*args, **kwargs)
        except (ProfileError, ValueError, FileNotFoundError, OSError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise click.ClickException(str(msg).splitlines()[0] if str(msg) else type(e).__name__) from None

    return wrapper


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=float))


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
class _OneLineUsageError(click.ClickException):
    """A bad option value as one line ("Error: Invalid value for '--model': ...") with the usage exit code 2,
    instead of click's usage text + hint + error (the CLI contract: one clear line, no traceback)."""

    exit_code = 2


class _OneLineErrorsCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise _OneLineUsageError(e.format_message().splitlines()[0]) from None


def _json_safe(obj):
    """Non-finite floats (the ideal profile's gain interval ends at inf) as null, so --json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


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


@main.command("init", cls=_OneLineErrorsCommand)
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
        echo_json(_json_safe(report.to_dict()))
    else:
        _print_init_report(report)
# --- end init ---


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
