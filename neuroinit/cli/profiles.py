"""The ``neuroinit profiles`` group: list and show hardware profiles."""

from __future__ import annotations

import json

import click

from neuroinit.cli import echo_json, fail_cleanly, main


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
