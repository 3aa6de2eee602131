"""Small helpers used across the package, defined once: timestamps, one-line error text, number formatting,
the cache directory, the CPU's identity and the CPUs available. Nothing here imports torch (the CLI imports it
at start-up)."""

from __future__ import annotations

import math
import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def utc_now() -> str:
    """The current time as an ISO 8601 UTC timestamp to the second (run files, sweep ledgers, locks)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def one_line(e: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message (its type's name when the message is empty); with
    ``with_type`` prefixed by the type's name (``"ValueError: ..."``)."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    return f"{type(e).__name__}: {lines[0]}" if with_type else lines[0]


def fmt(x, spec: str = ".4g") -> str:
    """A number for a table: ``"-"`` for None or NaN, else ``format(x, spec)``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def json_safe(obj):
    """``obj`` with non-finite floats as None, through dicts, lists and tuples (tuples become lists), so that
    ``json.dumps`` writes strict JSON (an ideal profile's gain interval ends at inf; a sequence that met a zero
    Jacobian has exponent -inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def cache_dir(*parts: str) -> Path:
    """neuroinit's cache directory (``$NEUROINIT_CACHE``, else ``$XDG_CACHE_HOME/neuroinit``, else
    ``~/.cache/neuroinit``), joined with ``parts``; not created here."""
    root = os.environ.get("NEUROINIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                             or os.path.expanduser("~/.cache"), "neuroinit")
    return Path(root).joinpath(*parts)


def available_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpuinfo_lines(cpuinfo: Path) -> list[str] | None:
    try:
        return cpuinfo.read_text().splitlines()
    except OSError:
        return None


def _first(lines: list[str], key: str) -> str:
    return next((ln for ln in lines if ln.startswith(key)), "")


def cpu_fields(cpuinfo: Path = CPUINFO) -> dict[str, str] | None:
    """Key -> value of the first processor's block of ``/proc/cpuinfo`` (vendor_id, model, flags, ...); None
    where it cannot be read."""
    lines = _cpuinfo_lines(cpuinfo)
    if lines is None:
        return None
    fields: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            break  # the first processor's block only
        k, _, v = line.partition(":")
        fields[k.strip()] = v.strip()
    return fields


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    line = _first(_cpuinfo_lines(cpuinfo) or [], "model name")
    if line:
        return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_slug(cpuinfo: Path = CPUINFO) -> str:
    """A short file-name-safe name of the CPU: vendor-family-model (``amd-25-1``, ``intel-6-167``), else the
    machine architecture (``x86_64``, ``aarch64``): what stored benchmark results are named after."""
    f = cpu_fields(cpuinfo) or {}
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(f.get("vendor_id", ""), f.get("vendor_id", ""))
    parts = [vendor, f.get("cpu family", ""), f.get("model", "")]
    if not all(parts):
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", platform.machine() or "cpu")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts)).lower()


def cpu_id(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model and instruction-set flags lines (``/proc/cpuinfo``; else what :mod:`platform` says):
    what code compiled with ``-march=native`` depends on, so part of the cache key of native builds."""
    lines = _cpuinfo_lines(cpuinfo)
    if lines is None:
        return platform.processor()
    return _first(lines, "model name") + _first(lines, "flags")
