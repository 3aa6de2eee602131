"""`neuroinit profiles list|show`: output, JSON mode and clean failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from neuroinit.cli import main
from neuroinit.profiles import bundled_profile_names, load_profile, profile_to_dict

SEVEN = ["ideal", "loihi-like", "loihi2-like", "xylo-like", "spinnaker2-like", "reckon-like", "brainscales2-like"]


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def _assert_clean_failure(result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    err = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert len(err.splitlines()) == 1, err
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_list_table(runner):
    result = runner.invoke(main, ["profiles", "list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["name", "weights", "scaling", "learning"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(SEVEN) <= set(rows)
    assert rows["ideal"].split()[1:4] == ["float", "none", "on-chip"]
    assert rows["loihi-like"].split()[1:4] == ["int8", "pow2", "on-chip"]
    assert rows["xylo-like"].split()[1:4] == ["int8", "pow2", "off-chip"]
    assert rows["brainscales2-like"].split()[1:3] == ["int7", "free"]
    assert load_profile("reckon-like").description in rows["reckon-like"]


def test_list_json(runner):
    result = runner.invoke(main, ["profiles", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == bundled_profile_names()
    by_name = {r["name"]: r for r in rows}
    assert by_name["loihi-like"] == {
        "name": "loihi-like", "weight_bits": 8, "scaling": "pow2", "on_chip_learning": True,
        "description": load_profile("loihi-like").description,
    }
    assert by_name["ideal"]["weight_bits"] == 0 and by_name["xylo-like"]["on_chip_learning"] is False


@pytest.mark.parametrize("name", SEVEN)
def test_show_every_section(runner, name):
    result = runner.invoke(main, ["profiles", "show", name])
    assert result.exit_code == 0, result.output
    out = result.stdout
    profile = load_profile(name)
    assert out.startswith(f"{name}: {profile.description}\n")
    for section, values in profile_to_dict(profile).items():
        if isinstance(values, dict):
            assert f"[{section}]\n" in out
            for key, value in values.items():
                assert f"  {key} = {json.dumps(value)}\n" in out
    assert ("ideal: yes" in out) is (name == "ideal")


def test_show_json_is_profile_to_dict(runner):
    result = runner.invoke(main, ["profiles", "show", "reckon-like", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == profile_to_dict(load_profile("reckon-like"))


def test_show_user_profile_by_path(runner, tmp_path):
    text = (Path(load_profile("xylo-like").source)).read_text(encoding="utf-8").replace(
        'name = "xylo-like"', 'name = "my-xylo"').replace("max_fan_in = 63", "max_fan_in = 31")
    path = tmp_path / "my-xylo.toml"
    path.write_text(text, encoding="utf-8")
    result = runner.invoke(main, ["profiles", "show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["name"] == "my-xylo" and data["limits"]["max_fan_in"] == 31
    result = runner.invoke(main, ["profiles", "show", str(path)])
    assert result.exit_code == 0 and f"source: {path}" in result.stdout


def test_show_unknown_name_fails_cleanly(runner):
    result = runner.invoke(main, ["profiles", "show", "loihi-lik"])
    _assert_clean_failure(result, "unknown profile 'loihi-lik'", "did you mean 'loihi-like'?", "ideal")


@pytest.mark.parametrize("as_json", [False, True])
def test_show_malformed_file_fails_cleanly(runner, tmp_path, as_json):
    text = Path(load_profile("ideal").source).read_text(encoding="utf-8").replace("bits = 0 ", "bitz = 0 ", 1)
    path = tmp_path / "broken.toml"
    path.write_text(text, encoding="utf-8")
    result = runner.invoke(main, ["profiles", "show", str(path), *(["--json"] if as_json else [])])
    _assert_clean_failure(result, str(path), "unknown key 'weights.bitz'", "did you mean 'weights.bits'?", "allowed:")


def test_show_bad_toml_and_missing_file_fail_cleanly(runner, tmp_path):
    path = tmp_path / "syntax.toml"
    path.write_text('name = "x"\n[weights\nbits = 8\n', encoding="utf-8")
    _assert_clean_failure(runner.invoke(main, ["profiles", "show", str(path)]), str(path), "not valid TOML")
    missing = tmp_path / "absent.toml"
    _assert_clean_failure(runner.invoke(main, ["profiles", "show", str(missing)]), str(missing),
                          "no such profile file")


def test_show_needs_an_argument(runner):
    result = runner.invoke(main, ["profiles", "show"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "NAME_OR_PATH" in result.stderr


def test_profiles_help_lists_subcommands(runner):
    result = runner.invoke(main, ["profiles", "--help"])
    assert result.exit_code == 0
    assert "list" in result.stdout and "show" in result.stdout
