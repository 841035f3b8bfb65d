"""The package is an Airflow provider: Airflow's own CLI lists it and its trigger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import airflow
import jsonschema

from capstone.provider import DISTRIBUTION, get_provider_info


def _airflow(tmp_path: Path, *args: str) -> Any:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    completed = subprocess.run(
        [sys.executable, "-m", "airflow", *args, "--output", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return json.loads(completed.stdout)


def test_the_provider_info_follows_airflows_schema() -> None:
    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())

    jsonschema.validate(get_provider_info(), schema)


def test_airflow_lists_the_package_and_its_trigger(tmp_path: Path) -> None:
    providers = {row["package_name"]: row for row in _airflow(tmp_path, "providers", "list")}
    triggers = _airflow(tmp_path, "providers", "triggers")

    assert providers[DISTRIBUTION]["version"] == get_provider_info()["versions"][0]
    assert {
        "package_name": DISTRIBUTION,
        "class": "capstone.triggers",
        "integration_name": "pgvector indexing",
    } in (triggers)
