"""Fixtures shared by every test: the one embedded Postgres (real server, real pgvector)."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from capstone.local.embedded_pg import EmbeddedPostgres, default_server
from dag_factory.local.services import S3Server

# The shared helpers (tests/support/): registered here, before any test module imports them, so
# that their asserts explain themselves.
pytest.register_assert_rewrite("tests.support")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_MINOR = "_".join(version("apache-airflow").split(".")[:2])
os.environ.setdefault("CAPSTONE_DATA_DIR", str(PROJECT_ROOT / ".data"))
# Airflow reads its configuration when first imported: point it at a project-local test home
# (SQLite metadata) before any test module imports airflow; one per Airflow minor, since each
# migrates its metadata DB to its own schema (the compatibility lane runs an older Airflow).
os.environ.setdefault("AIRFLOW_HOME", str(PROJECT_ROOT / ".data" / f"airflow-test-{AIRFLOW_MINOR}"))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(PROJECT_ROOT / "dags"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ.setdefault("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "1")
# Airflow 3.2's dag.test() starts the task execution API in-process with a JWT validator, which
# needs [api_auth] jwt_secret (3.3 stubs the validator out): a secret of this test run's own.
os.environ.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(32))


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata DB (SQLite) in the test AIRFLOW_HOME, for dag.test() and DagBag."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )
    return home


@pytest.fixture(scope="session")
def pg_server() -> EmbeddedPostgres:
    """The embedded PostgreSQL 18 + pgvector server, started once (left running for the next run),
    its database the tests' own (``capstone_test``): never ``vectors``, where the demo's and a
    user's collections live."""
    from tests.support.stacks import TEST_DATABASE

    return dataclasses.replace(default_server(), database=TEST_DATABASE).start()


@pytest.fixture(scope="session")
def pg_dsn(pg_server: EmbeddedPostgres) -> Iterator[str]:
    """DSN of the tests' database; also exported as the ``vector_store_default`` Airflow connection."""
    dsn = pg_server.uri()
    previous = os.environ.get("AIRFLOW_CONN_VECTOR_STORE_DEFAULT")
    os.environ["AIRFLOW_CONN_VECTOR_STORE_DEFAULT"] = dsn
    yield dsn
    if previous is None:
        os.environ.pop("AIRFLOW_CONN_VECTOR_STORE_DEFAULT", None)
    else:
        os.environ["AIRFLOW_CONN_VECTOR_STORE_DEFAULT"] = previous


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A fresh, uniquely named schema for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    from tests.support.tables import drop_test_schema

    drop_test_schema(pg_dsn, name)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(f"reader_{name}")))  # a test's


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit psycopg connection to the embedded server."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


# The Airflow connection id of the S3-protocol server the tests start (see ``s3_server``).
S3_CONNECTION_ID = "capstone_s3_test"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """An S3-protocol server (moto) with the batches bucket, exported as ``capstone_s3_test``."""
    from tests.support.postgres import free_port

    server = S3Server(root=Path(os.environ["CAPSTONE_DATA_DIR"]) / "s3-test", port=free_port())
    server.start()
    variable = f"AIRFLOW_CONN_{S3_CONNECTION_ID.upper()}"
    os.environ[variable] = json.dumps(server.connection())
    yield server
    os.environ.pop(variable, None)
    server.stop()
