"""Fixtures of the reliability tests: a private Postgres that tests may stop, and a faulty OpenAI fake."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from capstone.local.embedded_pg import EmbeddedPostgres
from tests.support.fake_openai import FaultPlanServer, running_fault_plan_server
from tests.support.postgres import PRIVATE_CONNECTION_ID, free_port


@pytest.fixture(scope="session")
def private_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A second embedded Postgres, for this session only: tests may stop and start it at will.

    The shared server (``pg_server``) also serves other test runs and must never be stopped.
    Its password is random, so a test can look for it in logs. Exported as the Airflow
    connection ``faulty_pg``.
    """
    root = tmp_path_factory.mktemp("private_pg")
    server = EmbeddedPostgres(
        root=root,
        port=free_port(),
        settings={"shared_buffers": "32MB", "max_connections": "40", "max_wal_size": "256MB"},
    )
    server.start()
    variable = f"AIRFLOW_CONN_{PRIVATE_CONNECTION_ID.upper()}"
    previous = os.environ.get(variable)
    os.environ[variable] = server.uri()
    try:
        yield server
    finally:
        if previous is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def running_private_pg(private_pg: EmbeddedPostgres) -> EmbeddedPostgres:
    """The private server, started again if an earlier test left it stopped."""
    return private_pg.start()


@pytest.fixture
def faulty_openai() -> Iterator[FaultPlanServer]:
    """A fake OpenAI server with a distinctive key and a fault plan the test sets."""
    with running_fault_plan_server(api_key="sk-reliability-7f3a9c2e1d", seed=30) as server:
        yield server
