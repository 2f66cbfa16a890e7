"""The declared dependencies agree with each other: requirements, lock and pyproject.

A fresh install runs ``pip install -r requirements.txt -c constraints.txt``: every
requirement must be pinned in the lock at a version its lower bound allows, and
``pip install .`` must declare the same requirements (pyproject reads requirements.txt).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _requirements(name: str) -> list[Requirement]:
    lines = (ROOT / name).read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    return pins


@pytest.mark.parametrize("file", ["requirements.txt", "requirements-dev.txt"])
def test_every_requirement_is_locked_within_its_bounds(file):
    pins = _lock()
    for req in _requirements(file):
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} ({file}) is not pinned in constraints.txt"
        assert req.specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {req.name}=={version}, outside {file}'s {req.specifier}"
        )


def test_runtime_requirements_have_lower_bounds():
    for req in _requirements("requirements.txt"):
        assert any(s.operator in (">=", "==", "~=") for s in req.specifier), (
            f"{req.name}: give a lower bound that really works (requirements.txt)"
        )


def test_pyproject_reads_the_same_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dependencies" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"]["file"] == ["requirements.txt"]
    assert dynamic["optional-dependencies"]["dev"]["file"] == ["requirements-dev.txt"]
