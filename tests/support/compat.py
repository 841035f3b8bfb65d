"""The Airflow versions the package supports, as CI tests them (``make test-package`` and the
compatibility lane ``make test-lowest``): the newest patch of each supported minor.

The lowest minor is tested with the lowest version of every dependency the package declares:
``constraints-lowest.txt`` is the lock file of that set-up (its header says how to regenerate it
from :func:`lower_bounds`, which reads the ``>=`` bounds of ``pyproject.toml``), and
``tests/unit/test_compat.py`` checks that it pins each of them, so a lower bound in
``pyproject.toml`` is always a version the tests pass on.

Run as ``python -m tests.support.compat`` to print those lower bounds as pip constraints.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

__all__ = [
    "LOWER_BOUND_EXTRAS",
    "LOWEST_AIRFLOW",
    "LOWEST_CONSTRAINTS",
    "NEWEST_AIRFLOW",
    "SUPPORTED_AIRFLOW",
    "lower_bounds",
]

ROOT = Path(__file__).resolve().parents[2]
SUPPORTED_AIRFLOW = ("3.2.2", "3.3.2")
LOWEST_AIRFLOW = min(SUPPORTED_AIRFLOW, key=Version)
NEWEST_AIRFLOW = max(SUPPORTED_AIRFLOW, key=Version)
LOWEST_CONSTRAINTS = ROOT / "constraints-lowest.txt"
# The extras a team installs on its hosts; their lower bounds are tested too. (dev, stack and bench
# are our own tooling and take constraints.txt's versions.)
LOWER_BOUND_EXTRAS = ("local", "onnx", "s3", "celery")


def lower_bounds(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """``{distribution: version}`` for every ``>=`` bound of the runtime dependencies and of the
    extras in :data:`LOWER_BOUND_EXTRAS` (names canonicalised as pip does)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = list(project["dependencies"])
    for extra in LOWER_BOUND_EXTRAS:
        declared += project["optional-dependencies"][extra]
    bounds: dict[str, str] = {}
    for line in declared:
        requirement = Requirement(line)
        for specifier in requirement.specifier:
            if specifier.operator == ">=":
                bounds[canonicalize_name(requirement.name)] = specifier.version
    return bounds


if __name__ == "__main__":
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in sorted(lower_bounds().items())))
