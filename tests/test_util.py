"""Tests for neuroinit._util (the shared small helpers) and tasks.task_from_settings (the one task rebuild)."""

from __future__ import annotations

import math
import platform
from datetime import UTC, datetime

import pytest

from neuroinit._util import cache_dir, cpu_fields, cpu_id, cpu_model, cpu_slug, fmt, one_line, utc_now
from neuroinit.tasks import task_from_settings


def test_one_line_takes_the_first_line_or_the_type():
    e = ValueError("first line\nsecond line")
    assert one_line(e) == "first line"
    assert one_line(e, with_type=True) == "ValueError: first line"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(OSError("  \n"), with_type=True) == "OSError"


def test_fmt_dashes_missing_numbers():
    assert fmt(None) == "-" and fmt(math.nan) == "-"
    assert fmt(1.234567) == "1.235" and fmt(1.234567, ".2f") == "1.23" and fmt(math.inf) == "inf"
    assert fmt(3) == "3"


def test_utc_now_is_an_iso_timestamp_in_utc():
    t = datetime.fromisoformat(utc_now())
    assert t.tzinfo is not None and t.utcoffset() == UTC.utcoffset(None) and t.microsecond == 0


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("NEUROINIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("fused") == tmp_path / "xdg" / "neuroinit" / "fused"
    monkeypatch.setenv("NEUROINIT_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"
    assert cache_dir("a", "b.json") == tmp_path / "own" / "a" / "b.json"


def test_cpu_model_and_id_read_the_given_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Toy CPU 9000\nflags\t\t: fpu sse2 avx2\n\n"
                    "processor\t: 1\nmodel name\t: Toy CPU 9000\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_model(info) == "Toy CPU 9000"
    assert cpu_id(info) == "model name\t: Toy CPU 9000flags\t\t: fpu sse2 avx2"
    other = tmp_path / "other"
    other.write_text("model name\t: Toy CPU 9000\nflags\t\t: fpu sse2 avx512f\n")
    assert cpu_id(other) != cpu_id(info)                 # a different instruction set is a different build
    missing = tmp_path / "missing"
    # no /proc/cpuinfo (macOS, some containers): what platform says, never an error
    assert cpu_model(missing) == (platform.processor() or platform.machine())
    assert cpu_id(missing) == platform.processor()


def test_cpu_fields_reads_the_first_processor_block(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: ToyVendor\nflags\t\t: fpu avx2\n\n"
                    "processor\t: 1\nvendor_id\t: Other\nflags\t\t: fpu avx512f\n")
    assert cpu_fields(info) == {"processor": "0", "vendor_id": "ToyVendor", "flags": "fpu avx2"}
    assert cpu_fields(tmp_path / "missing") is None


def test_cpu_slug_names_vendor_family_and_model(tmp_path):
    amd = tmp_path / "amd"
    amd.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                   "model name\t: AMD EPYC 7B13 64-Core Processor\n")
    assert cpu_slug(amd) == "amd-25-1"
    intel = tmp_path / "intel"
    intel.write_text("vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n")
    assert cpu_slug(intel) == "intel-6-143"
    odd = tmp_path / "odd"
    odd.write_text("vendor_id\t: Toy Vendor/1\ncpu family\t: 7\nmodel\t\t: 2\n")
    assert cpu_slug(odd) == "toy-vendor-1-7-2"  # file-name safe
    # no vendor, family or model (ARM's cpuinfo, no /proc): the architecture
    assert cpu_slug(tmp_path / "missing") == (platform.machine() or "cpu")


def test_task_from_settings_rebuilds_the_run_task():
    romo = task_from_settings("romo", {"dt_ms": 5.0, "tau_ms": 20.0})
    assert romo.dt_tau == pytest.approx(0.25) and romo.variant == "train"
    assert task_from_settings("Romo", {"dt_ms": 50.0}).dt_tau == pytest.approx(0.5)    # tau default 100 ms
    assert task_from_settings("romo", {"dt_ms": 50.0, "tau_ms": 100.0}, variant="test").variant == "test"
    with pytest.raises(ValueError, match="no-such-task"):
        task_from_settings("no-such-task", {"dt_ms": 20.0})


def test_task_from_settings_gives_neurogym_tasks_the_run_time_step():
    task = task_from_settings("2af", {"dt_ms": 20.0, "tau_ms": 100.0})
    assert task.dt_ms == 20.0


def test_json_safe_writes_non_finite_numbers_as_null():
    import json

    from neuroinit._util import json_safe

    doc = {"a": float("inf"), "b": [1.0, float("nan"), (2, -float("inf"))], "c": "x"}
    assert json.dumps(json_safe(doc), allow_nan=False) == '{"a": null, "b": [1.0, null, [2, null]], "c": "x"}'
