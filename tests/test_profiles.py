"""Hardware profiles: the bundled TOML files, their validation errors and their packaging."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neuroinit.profiles import (
    HardwareProfile,
    ProfileError,
    bundled_profile_names,
    load_profile,
    profile_from_dict,
    profile_to_dict,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = REPO_ROOT / "hardware_profiles"
REQUIRED = ["ideal", "loihi-like", "loihi2-like", "xylo-like", "spinnaker2-like", "reckon-like", "brainscales2-like"]

# A small valid profile; the malformed cases below each change one thing in it.
VALID = """\
name = "tiny"
description = "a user profile for tests"

[weights]
bits = 8
sign = "twos-complement"
scaling = "pow2"
exponent_min = -10
exponent_max = 2

[state]
bits = 16
overflow = "saturate"

[decay]
kind = "shift"
bits = 4

[threshold]
bits = 15
shift = 0

[limits]
max_neurons = 256
max_fan_in = 0
max_inputs = 16
max_outputs = 4

[learning]
on_chip = true
trace_bits = 12
weight_update = "stochastic"
weight_bits = 0
"""


def _write(tmp_path: Path, text: str, name: str = "user.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _load_error(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    msg = str(info.value)
    assert "\n" not in msg, "profile errors are one line"
    return path, msg


# ------------------------------------------------------------------------------------------ bundled profiles

def test_bundled_names_include_every_chip_family():
    names = bundled_profile_names()
    assert set(REQUIRED) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", bundled_profile_names())
def test_bundled_profile_loads_and_round_trips(name):
    profile = load_profile(name)
    assert isinstance(profile, HardwareProfile)
    assert profile.name == name  # the file stem is the profile's name
    assert profile.description
    assert Path(profile.source).name == f"{name}.toml"
    assert profile.text == Path(profile.source).read_text(encoding="utf-8")
    data = profile_to_dict(profile)
    again = profile_from_dict(data)
    assert again == profile
    assert profile_to_dict(again) == data
    # the dict is the TOML mapping: every key written in the file comes back with the same value
    parsed = tomllib.loads(profile.text)
    for section, values in parsed.items():
        if isinstance(values, dict):
            assert {k: data[section][k] for k in values} == values
        else:
            assert data[section] == values


@pytest.mark.parametrize("name", bundled_profile_names())
def test_bundled_profile_documents_every_value(name):
    """Every file opens with a comment block, and every value carries its source as a comment."""
    lines = (PROFILE_DIR / f"{name}.toml").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#") and lines[1].startswith("#")
    for line in lines:
        if re.match(r"^\s*[A-Za-z_]+\s*=", line) and not line.lstrip().startswith(("name", "description")):
            assert "#" in line, f"{name}.toml: value without a source comment: {line!r}"
        if "not confirmed" in line and re.match(r"^\s*[A-Za-z_]+\s*=", line):
            assert "illustrative, not confirmed" in line, line


def test_ideal_is_the_only_ideal_profile():
    for name in bundled_profile_names():
        assert load_profile(name).is_ideal is (name == "ideal"), name


def test_ideal_profile_is_float_everywhere_and_learns_on_chip():
    p = load_profile("ideal")
    assert p.weights.bits == 0 and p.weights.scaling == "none" and p.weights.is_float
    assert p.state.bits == 0 and p.decay.kind == "float" and p.decay.bits == 0 and p.threshold.bits == 0
    assert dataclasses.astuple(p.limits) == (0, 0, 0, 0)
    assert p.learns_on_chip and p.learning.trace_bits == 0 and p.learning.weight_bits == 0


def test_chip_profiles_follow_the_team_conventions():
    loihi = load_profile("loihi-like")
    assert (loihi.weights.bits, loihi.weights.sign, loihi.weights.scaling) == (8, "twos-complement", "pow2")
    assert loihi.weights.exponent_min < loihi.weights.exponent_max
    assert (loihi.decay.kind, loihi.decay.bits, loihi.threshold.bits, loihi.threshold.shift) == ("linear", 12, 17, 6)
    assert (loihi.learning.trace_bits, loihi.learning.weight_update, loihi.learning.weight_bits) == (7, "stochastic", 9)
    xylo = load_profile("xylo-like")
    assert (xylo.weights.bits, xylo.weights.scaling, xylo.state.bits, xylo.state.overflow, xylo.decay.kind) == (
        8, "pow2", 16, "saturate", "shift")
    assert not xylo.learns_on_chip
    spinn = load_profile("spinnaker2-like")
    assert (spinn.weights.bits, spinn.weights.scaling, spinn.state.bits) == (8, "free", 0)
    reckon = load_profile("reckon-like")
    assert (reckon.weights.bits, reckon.weights.scaling, reckon.state.bits) == (8, "pow2", 16)
    assert reckon.learns_on_chip and (reckon.learning.trace_bits, reckon.learning.weight_update) == (12, "stochastic")
    bss2 = load_profile("brainscales2-like")
    assert (bss2.weights.bits, bss2.weights.sign, bss2.weights.scaling) == (7, "sign-magnitude", "free")
    assert (bss2.weights.code_min, bss2.weights.code_max) == (-63, 63)


def test_pow2_profiles_can_hold_recurrent_gains_at_n256():
    """Gains 0.5..3 at N = 256 (max|W| ~ 4 g / sqrt(N)) need exponents around -10..-7 on an 8-bit grid."""
    for name in ("loihi-like", "loihi2-like", "xylo-like", "reckon-like"):
        w = load_profile(name).weights
        for gain in (0.5, 3.0):
            max_w = 4 * gain / 256 ** 0.5
            e = 0
            while max_w > w.code_max * 2.0 ** e:
                e += 1
            while max_w <= w.code_max * 2.0 ** (e - 1):
                e -= 1
            assert w.exponent_min <= e <= w.exponent_max, (name, gain, e)


# ------------------------------------------------------------------------------------------ user profiles

def test_user_profile_loads_by_path(tmp_path):
    path = _write(tmp_path, VALID)
    for arg in (path, str(path)):
        p = load_profile(arg)
        assert p.name == "tiny" and p.source == str(path) and p.text == VALID
        assert p.weights.exponent_min == -10 and p.limits.max_inputs == 16 and p.learns_on_chip
        assert not p.is_ideal
    assert load_profile(p) is p


def test_user_profile_without_learning_section(tmp_path):
    text = VALID.split("[learning]")[0]
    p = load_profile(_write(tmp_path, text))
    assert p.learning is None and not p.learns_on_chip
    assert "learning" not in profile_to_dict(p)
    assert profile_from_dict(profile_to_dict(p)) == p


def test_profiles_are_frozen():
    p = load_profile("loihi-like")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.weights.bits = 4


def test_equality_ignores_where_a_profile_was_read_from(tmp_path):
    original = load_profile("reckon-like")
    copy = load_profile(_write(tmp_path, original.text, name="copy.toml"))
    assert copy == original and copy.source != original.source


def test_is_ideal_needs_float_decay_and_float_learning():
    ideal = profile_to_dict(load_profile("ideal"))
    assert profile_from_dict(ideal).is_ideal
    linear = {**ideal, "decay": {"kind": "linear", "bits": 12}}
    assert not profile_from_dict(linear).is_ideal
    traces = {**ideal, "learning": {**ideal["learning"], "trace_bits": 8}}
    assert not profile_from_dict(traces).is_ideal
    learn_weights = {**ideal, "learning": {**ideal["learning"], "weight_bits": 9}}
    assert not profile_from_dict(learn_weights).is_ideal
    no_learning = {k: v for k, v in ideal.items() if k != "learning"}
    assert profile_from_dict(no_learning).is_ideal


# ------------------------------------------------------------------------------------------ code ranges

def _weights(bits: int, sign: str, scaling: str = "pow2"):
    data = tomllib.loads(VALID)
    data["weights"].update(bits=bits, sign=sign, scaling=scaling)
    return profile_from_dict(data).weights


@pytest.mark.parametrize(("bits", "sign", "lo", "hi"), [
    (8, "twos-complement", -128, 127),
    (2, "twos-complement", -2, 1),
    (16, "twos-complement", -32768, 32767),
    (7, "sign-magnitude", -63, 63),
    (2, "sign-magnitude", -1, 1),
    (9, "sign-magnitude", -255, 255),
])
def test_code_range(bits, sign, lo, hi):
    w = _weights(bits, sign)
    assert (w.code_min, w.code_max) == (lo, hi)


def test_float_weights_have_no_code_range():
    w = load_profile("ideal").weights
    with pytest.raises(ValueError, match="Invalid use of code_min"):
        _ = w.code_min
    with pytest.raises(ValueError, match="Invalid use of code_max"):
        _ = w.code_max


@given(bits=st.integers(2, 32), sign=st.sampled_from(["twos-complement", "sign-magnitude"]),
       scaling=st.sampled_from(["pow2", "free"]), lo=st.integers(-64, 64), span=st.integers(0, 40),
       trace_bits=st.integers(0, 32), on_chip=st.booleans())
def test_any_valid_profile_round_trips(bits, sign, scaling, lo, span, trace_bits, on_chip):
    data = tomllib.loads(VALID)
    data["weights"].update(bits=bits, sign=sign, scaling=scaling, exponent_min=lo, exponent_max=min(lo + span, 64))
    data["learning"].update(trace_bits=trace_bits, on_chip=on_chip)
    p = profile_from_dict(data)
    assert profile_from_dict(profile_to_dict(p)) == p
    w = p.weights
    n_codes = w.code_max - w.code_min + 1
    assert n_codes == (2 ** bits if sign == "twos-complement" else 2 ** bits - 1)
    assert w.code_max == -w.code_min - (1 if sign == "twos-complement" else 0)


# ------------------------------------------------------------------------------------------ malformed files

def test_unknown_key_suggests_the_right_one(tmp_path):
    path, msg = _load_error(tmp_path, VALID.replace("bits = 8\n", "bitz = 8\n"))
    assert str(path) in msg
    assert "unknown key 'weights.bitz'" in msg
    assert "did you mean 'weights.bits'?" in msg
    assert "allowed: weights.bits, weights.sign, weights.scaling, weights.exponent_min, weights.exponent_max" in msg


def test_unknown_top_level_key_suggests_the_right_one(tmp_path):
    path, msg = _load_error(tmp_path, VALID.replace("[limits]", "[limit]"))
    assert str(path) in msg and "unknown key 'limit'" in msg and "did you mean 'limits'?" in msg
    assert "allowed: name, description, weights, state, decay, threshold, limits, learning" in msg


def test_negative_bits(tmp_path):
    path, msg = _load_error(tmp_path, VALID.replace("bits = 16\n", "bits = -1\n"))
    assert str(path) in msg
    assert "key 'state.bits' = -1 is out of range" in msg
    assert "allowed: integer 0..64" in msg


def test_bits_of_the_wrong_type(tmp_path):
    path, msg = _load_error(tmp_path, VALID.replace("bits = 8\n", 'bits = "8"\n'))
    assert str(path) in msg
    assert "key 'weights.bits' = '8' has the wrong type" in msg
    assert "allowed: int in 0..32" in msg


@pytest.mark.parametrize(("old", "new", "key", "allowed"), [
    ("on_chip = true", "on_chip = 1", "learning.on_chip", "allowed: bool"),
    ("bits = 15", "bits = 15.0", "threshold.bits", "allowed: int in 0..32"),
    ("bits = 15", "bits = true", "threshold.bits", "allowed: int in 0..32"),
    ('name = "tiny"', "name = 3", "name", "allowed: a non-empty string"),
    ('description = "a user profile for tests"', 'description = ""', "description", "allowed: a non-empty string"),
])
def test_other_wrong_types(tmp_path, old, new, key, allowed):
    assert old in VALID
    path, msg = _load_error(tmp_path, VALID.replace(old, new, 1))
    assert str(path) in msg and f"key '{key}'" in msg and allowed in msg


def test_section_that_is_not_a_table(tmp_path):
    text = VALID.replace("[limits]\nmax_neurons = 256\nmax_fan_in = 0\nmax_inputs = 16\nmax_outputs = 4\n",
                         "limits = 4\n")
    text = "limits = 4\n" + text.replace("limits = 4\n", "")
    path, msg = _load_error(tmp_path, text)
    assert str(path) in msg and "key 'limits' = 4 has the wrong type" in msg and "allowed: a table [limits]" in msg


def test_choice_not_allowed_suggests(tmp_path):
    path, msg = _load_error(tmp_path, VALID.replace('sign = "twos-complement"', 'sign = "twos-complment"'))
    assert str(path) in msg and "key 'weights.sign' = 'twos-complment' is not allowed" in msg
    assert "did you mean 'twos-complement'?" in msg and "allowed: twos-complement, sign-magnitude" in msg


def test_missing_section(tmp_path):
    text = VALID.replace("[state]\nbits = 16\noverflow = \"saturate\"\n", "")
    path, msg = _load_error(tmp_path, text)
    assert str(path) in msg
    assert "missing section [state]" in msg
    assert "required sections: weights, state, decay, threshold, limits" in msg


def test_missing_required_key(tmp_path):
    path, msg = _load_error(tmp_path, VALID.replace('kind = "shift"\n', ""))
    assert str(path) in msg and "missing key 'decay.kind'" in msg and "allowed: float, linear, shift" in msg
    path, msg = _load_error(tmp_path, VALID.replace('name = "tiny"\n', ""))
    assert str(path) in msg and "missing key 'name'" in msg and "allowed: a non-empty string" in msg


def test_exponent_min_above_exponent_max(tmp_path):
    path, msg = _load_error(tmp_path, VALID.replace("exponent_min = -10", "exponent_min = 5"))
    assert str(path) in msg
    assert "key 'weights.exponent_min' = 5 exceeds 'weights.exponent_max' = 2" in msg
    assert "allowed: exponent_min <= exponent_max" in msg


@pytest.mark.parametrize("sign", ["twos-complement", "sign-magnitude"])
def test_one_bit_weights_have_no_magnitude(tmp_path, sign):
    text = VALID.replace("bits = 8\n", "bits = 1\n").replace('"twos-complement"', f'"{sign}"')
    path, msg = _load_error(tmp_path, text)
    assert str(path) in msg and "key 'weights.bits' = 1" in msg and "allowed: 0 (float) or 2..32" in msg


def test_scaling_must_fit_float_weights(tmp_path):
    path, msg = _load_error(tmp_path, VALID.replace("bits = 8\n", "bits = 0\n"))
    assert str(path) in msg and "key 'weights.scaling' = 'pow2' does not fit weights.bits = 0" in msg
    assert "allowed: scaling = 'none' exactly when bits = 0" in msg


def test_decay_bits_must_fit_kind(tmp_path):
    path, msg = _load_error(tmp_path, VALID.replace('kind = "shift"', 'kind = "float"'))
    assert str(path) in msg and "key 'decay.bits' = 4 does not fit decay.kind = 'float'" in msg
    assert "allowed: bits = 0 exactly when kind = 'float'" in msg


def test_bad_toml_syntax(tmp_path):
    path, msg = _load_error(tmp_path, VALID.replace("max_fan_in = 0", "max_fan_in 0"))
    line = VALID.splitlines().index("max_fan_in = 0") + 1
    assert str(path) in msg
    assert "not valid TOML" in msg
    assert f"line {line}," in msg  # tomllib's position of the error


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(VALID.replace("a user profile", "caf\xe9 profile").encode("latin-1"))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(path) in str(info.value) and "not UTF-8" in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ProfileError, match="no such profile file") as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_missing_file_named_like_a_bundled_profile(tmp_path):
    with pytest.raises(ProfileError, match=r"no such profile file \(did you mean the bundled profile 'xylo-like'\?\)"):
        load_profile(tmp_path / "xylo-like.toml")


def test_unknown_profile_name_suggests_a_bundled_one():
    with pytest.raises(ProfileError) as info:
        load_profile("loihi-lik")
    msg = str(info.value)
    assert "unknown profile 'loihi-lik'" in msg
    assert "did you mean 'loihi-like'?" in msg
    assert "bundled profiles: " + ", ".join(bundled_profile_names()) in msg
    assert "or pass a path to a .toml file" in msg


def test_profile_from_dict_names_its_origin():
    data = tomllib.loads(VALID)
    data["state"]["bits"] = 99
    with pytest.raises(ProfileError, match=r"^<dict>: key 'state.bits' = 99 is out of range; allowed: integer 0..64$"):
        profile_from_dict(data)
    with pytest.raises(ProfileError, match=r"^run\.h5:profile: "):
        profile_from_dict(data, where="run.h5:profile")


# ------------------------------------------------------------------------------------------ packaging

def test_wheel_ships_the_profiles(tmp_path):
    """Build a wheel from (a copy of) this checkout and check the TOML files are inside and load from it."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "*.pyc")
    for item in ("pyproject.toml", "README.md", "LICENSE", "neuroinit", "hardware_profiles"):
        path = REPO_ROOT / item
        if path.is_dir():
            shutil.copytree(path, src / item, ignore=ignore)
        elif path.is_file():
            shutil.copy2(path, src / item)
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("neuroinit-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in REQUIRED:
            assert f"neuroinit/hardware_profiles/{name}.toml" in names
        shipped = {n for n in names if n.startswith("neuroinit/hardware_profiles/") and n.endswith(".toml")}
        assert shipped == {f"neuroinit/hardware_profiles/{p.name}" for p in PROFILE_DIR.glob("*.toml")}
        assert zf.read("neuroinit/hardware_profiles/loihi-like.toml") == (PROFILE_DIR / "loihi-like.toml").read_bytes()
        site = tmp_path / "site"
        zf.extractall(site)
    # the installed layout finds its own bundled profiles (neuroinit/hardware_profiles next to profiles.py)
    code = ("import neuroinit.profiles as m, pathlib; p = m.load_profile('xylo-like'); "
            "print(pathlib.Path(m.__file__).parent); print(pathlib.Path(p.source).parent); "
            "print(','.join(m.bundled_profile_names()))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    pkg, source_dir, names_line = proc.stdout.splitlines()
    assert Path(pkg) == site / "neuroinit"
    assert Path(source_dir) == site / "neuroinit" / "hardware_profiles"
    assert set(REQUIRED) <= set(names_line.split(","))
