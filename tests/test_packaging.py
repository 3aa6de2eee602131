"""The wheel ships every package: pyproject's explicit package list names each folder with an __init__.py."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_declared_in_pyproject():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "neuroinit").rglob("__init__.py")}
    missing = sorted(found - declared)
    assert not missing, f"packages missing from pyproject.toml [tool.setuptools] packages: {missing}"
