"""A collection that follows an application's table, on real Airflow services: no upstream DAG and
no schedule, only the table's commits. The capture triggers queue each change, the triggerer's
``TableChangesTrigger`` (an ``AssetWatcher``) fires the collection's DAG, and the collection ends
with exactly the table's rows, also when the triggerer is killed while changes arrive and when the
DAG was paused."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from capstone.table_source import remove_capture
from dag_factory.loader import load_collection
from dag_factory.local.api import AirflowApi
from dag_factory.local.stack import AirflowStack
from dag_factory.runtime import collection_settings
from tests.support.stacks import AIRFLOW_MINOR, ROOT, TEST_DATABASE
from tests.support.tables import assert_table_holds_exactly, table_documents

pytestmark = pytest.mark.e2e

CONFIGS = ROOT / "tests" / "e2e" / "table_configs"
SCHEMA = "e2e_app"
TABLE = sql.Identifier(SCHEMA, "articles")
DAG_ID = "articles"
POLLED = "articles_polled"  # the same table followed by its updated_at column (no triggers)


@pytest.fixture(scope="module")
def stack(pg_dsn: str) -> Iterator[AirflowStack]:
    stack = AirflowStack(
        home=ROOT / ".data" / f"airflow-e2e-tables-{AIRFLOW_MINOR}",
        api_port=int(os.environ.get("E2E_TABLES_API_PORT", 28083)),
        configs=CONFIGS,
        metadata_db=f"airflow_e2e_tables_{AIRFLOW_MINOR}",
        vector_db=TEST_DATABASE,
    )
    assert stack.postgres_uri() == pg_dsn
    shutil.rmtree(stack.home, ignore_errors=True)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for collection in (DAG_ID, POLLED):  # an earlier session's
            remove_capture(conn, collection)
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, body text, title text, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(TABLE)
        )
        _write(conn, [(i, _body(i, 0), f"title {i}") for i in range(5)])
    stack.drop_metadata_db()
    with stack as running:
        yield running


@pytest.fixture(scope="module")
def api(stack: AirflowStack) -> AirflowApi:
    return AirflowApi(stack.api_url, "admin", stack.password)


def _body(i: int, version: int) -> str:
    return f"Article {i}, version {version}. It talks about indexes.\n\nAnd about search, at length."


def _write(conn: psycopg.Connection, rows: list[tuple[int, str, str]]) -> None:
    for row in rows:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE SET body = excluded.body, "
                "title = excluded.title, updated_at = now()"
            ).format(TABLE),
            row,
        )


def _expected(dsn: str, collection: str) -> list[dict[str, Any]]:
    settings = collection_settings(load_collection(CONFIGS / f"{collection}.yaml"))
    return table_documents(dsn, TABLE, settings)


def _wait_until_indexed(dsn: str, timeout: float = 120.0, collection: str = DAG_ID) -> None:
    """Wait until the collection holds exactly the table's rows (and no change is queued)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            expected = _expected(dsn, collection)
            assert_table_holds_exactly(
                dsn, SCHEMA, f"{collection}_index", expected, model="hash-v1", dimension=64
            )
            with psycopg.connect(dsn) as conn:
                queued = conn.execute(
                    "SELECT count(*) FROM capstone.source_changes WHERE collection = %s", (collection,)
                ).fetchone()
            assert queued == (0,), f"{queued} changes still queued"
            return
        except (AssertionError, psycopg.errors.UndefinedTable):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _runs(api: AirflowApi, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
    return api.runs(dag_id)


def _wait_runs_finished(
    api: AirflowApi, dag_id: str = DAG_ID, timeout: float = 120.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _runs(api, dag_id)
        if runs and all(run["state"] in ("success", "failed") for run in runs):
            return runs
        time.sleep(1)
    raise TimeoutError(f"runs of {dag_id} still going: {[run['state'] for run in _runs(api, dag_id)]}")


def test_the_first_run_reads_the_table_then_every_commit_reaches_the_collection(
    stack: AirflowStack, api: AirflowApi, pg_dsn: str
) -> None:
    api.wait_for_dag(DAG_ID)
    assert api.import_errors() == []
    _wait_until_indexed(pg_dsn)  # nobody triggered anything: the watcher saw no capture, and fired
    first = _wait_runs_finished(api)
    assert [run["run_type"] for run in first] == ["asset_triggered"]

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _write(conn, [(1, _body(1, 1), "title 1"), (9, _body(9, 0), "new")])
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = 3").format(TABLE))
        conn.execute(
            sql.SQL("UPDATE {} SET title = 'renamed', updated_at = now() WHERE id = 4").format(TABLE)
        )

    _wait_until_indexed(pg_dsn)
    runs = _wait_runs_finished(api)
    assert all(run["state"] == "success" for run in runs), runs
    (event,) = api.upstream_events(DAG_ID, runs[0]["dag_run_id"])[:1]
    assert event["name"] == "articles.table_changes"
    assert event["extra"]["from_trigger"] is True

    # The same table followed without triggers: TablePollTrigger saw the changes too.
    _wait_until_indexed(pg_dsn, collection=POLLED)
    polled = _wait_runs_finished(api, POLLED)
    assert polled and all(run["state"] == "success" for run in polled), polled
    assert {run["run_type"] for run in polled} == {"asset_triggered"}


def test_changes_made_while_the_triggerer_is_down_are_not_lost(
    stack: AirflowStack, api: AirflowApi, pg_dsn: str
) -> None:
    _wait_runs_finished(api)
    stack.kill("triggerer")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for i in range(10, 30):
            _write(conn, [(i, _body(i, 0), f"title {i}")])
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = 0").format(TABLE))
    time.sleep(2)
    stack.restart_service("triggerer")

    _wait_until_indexed(pg_dsn, timeout=180)
    assert all(run["state"] == "success" for run in _wait_runs_finished(api))
    _wait_until_indexed(pg_dsn, timeout=60, collection=POLLED)


def test_a_paused_dag_catches_up_when_unpaused(stack: AirflowStack, api: AirflowApi, pg_dsn: str) -> None:
    _wait_runs_finished(api)
    runs_before = len(_runs(api))
    api.pause(DAG_ID)
    time.sleep(3)  # the scheduler drops the watcher of a paused DAG
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _write(conn, [(2, _body(2, 5), "while paused")])
    time.sleep(5)
    assert len(_runs(api)) == runs_before  # paused: nothing ran

    api.unpause(DAG_ID)

    # Airflow dropped the asset event the trigger fired while the DAG was paused: the trigger fires
    # again once the change has waited its check_every (60 s) unclaimed.
    _wait_until_indexed(pg_dsn, timeout=180)
    assert len(_wait_runs_finished(api)) > runs_before
