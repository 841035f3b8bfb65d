"""The asset chain on a distributed Airflow: CeleryExecutor, a Redis broker, two workers as two hosts.

The workers share no disk with the upstream writer or with each other: the batch travels through
an S3-protocol server (moto, read by the real Amazon provider and s3fs), each worker has its own
home, data folder, hostname and log folder. The first run shows that the mapped embedding tasks
spread over both workers while the pool bounds them across both, and that the sensor defers to
the triggerer. The second run kills one worker's process group (SIGKILL, like a lost host) while
it runs a mapped embedding task: the run must still end with exact rows and a valid index.

Run with ``make test-distributed`` (``pytest -m distributed``); ``make test`` leaves it out.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from dag_factory.local.api import AirflowApi
from dag_factory.local.stack import AirflowStack
from tests.support.stack_runs import assert_deferred_to_triggerer, follow_downstream_run, max_overlap
from tests.support.stacks import (
    DISTRIBUTED_SCHEMA,
    DISTRIBUTED_WORKERS,
    distributed_configs,
    distributed_stack,
)

pytestmark = pytest.mark.distributed

log = logging.getLogger(__name__)

COPIES = 30  # ~22k chunks in 15 mapped embedding tasks of 1500
CHUNKS = 733 * COPIES
SCHEMA = DISTRIBUTED_SCHEMA
WORKERS = DISTRIBUTED_WORKERS
VICTIM = "worker-b"
POOL_SLOTS = 2


@pytest.fixture(scope="module")
def stack(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowStack]:
    configs = distributed_configs(tmp_path_factory.mktemp("distributed-configs"))
    spec = yaml.safe_load((configs / "documents.yaml").read_text())
    assert spec["embedding"]["pool_slots"] == POOL_SLOTS
    stack = distributed_stack(configs)
    assert stack.postgres_uri() == pg_dsn  # the tests' database, never the demo's
    shutil.rmtree(stack.home, ignore_errors=True)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    stack.drop_metadata_db()
    started = time.monotonic()
    with stack as running:
        log.warning("distributed stack up in %.1fs", time.monotonic() - started)
        yield running


@pytest.fixture(scope="module")
def api(stack: AirflowStack) -> AirflowApi:
    return AirflowApi(stack.api_url, "admin", stack.password)


def _embedding(api: AirflowApi, run: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        ti
        for ti in api.task_instances("documents", run["dag_run_id"])
        if ti["task_id"] == "generate_embedding"
    ]


def _table_counts(pg_dsn: str, revision: int | None = None) -> tuple[int, int, int, int]:
    """Rows, distinct chunk ids, distinct documents, and rows of ``revision`` (all rows if None)."""
    marker = f"% (revision {revision})" if revision is not None else "%"
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            f"SELECT count(*), count(DISTINCT id), count(DISTINCT document_id),"
            f" count(*) FILTER (WHERE content LIKE %s) FROM {SCHEMA}.documents",
            (marker,),
        ).fetchone()
    assert row is not None
    return (row[0], row[1], row[2], row[3])


def _index_valid(pg_dsn: str, index_name: str) -> bool:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (SCHEMA, index_name),
        ).fetchone()
    return bool(row and row[0])


def _published(api: AirflowApi, run: dict[str, Any]) -> dict[str, Any]:
    (event,) = api.asset_events(source_dag_id="documents", source_run_id=run["dag_run_id"])
    assert event["name"] == "documents.indexed"
    return dict(event["extra"])


def test_runs_across_two_workers(stack: AirflowStack, api: AirflowApi, pg_dsn: str) -> None:
    api.wait_for_dag("documents")
    api.wait_for_dag("enrich_documents")
    assert api.import_errors() == []
    assert stack.ping_workers() == set(WORKERS)

    started = time.monotonic()
    upstream = api.trigger("enrich_documents", conf={"copies": COPIES})
    run, deferred_seen = follow_downstream_run(api, "documents", runs_before=0)
    log.warning("first distributed run: %.1fs from trigger to end", time.monotonic() - started)
    assert run["state"] == "success", {ti["task_id"]: ti["state"] for ti in _embedding(api, run)}
    assert run["run_type"] == "asset_triggered"

    # the batch travelled through object storage, not through a shared folder
    (event,) = api.upstream_events("documents", run["dag_run_id"])
    assert event["source_run_id"] == upstream["dag_run_id"]
    assert event["extra"]["path"].startswith("s3://capstone-batches/enriched/")
    assert event["extra"]["conn_id"] == "aws_default"
    batch_name = event["extra"]["path"].rsplit("/", 1)[-1]
    assert not list(stack.home.parent.glob(f"**/{batch_name}")), "the batch was also written to disk"

    # the mapped embedding tasks ran on both hosts, never more at once than the pool's slots
    embedding = _embedding(api, run)
    assert len(embedding) == -(-CHUNKS // 1500)
    assert {ti["hostname"] for ti in embedding} == set(WORKERS)
    assert {ti["state"] for ti in embedding} == {"success"}
    assert 1 <= max_overlap(embedding) <= POOL_SLOTS

    # each worker wrote its tasks' logs in its own folder, and only there
    for name in WORKERS:
        ran_here = {ti["map_index"] for ti in embedding if ti["hostname"] == name}
        logs = stack.worker_folder(name).glob(
            f"logs/dag_id=documents/run_id={run['dag_run_id']}/task_id=generate_embedding/map_index=*/attempt=1.log"
        )
        assert {int(path.parent.name.split("=")[1]) for path in logs} == ran_here

    assert_deferred_to_triggerer(deferred_seen)

    extra = _published(api, run)
    assert extra["vector_count"] == CHUNKS and extra["chunks_embedded"] == CHUNKS
    assert _table_counts(pg_dsn) == (CHUNKS, CHUNKS, 79 * COPIES, CHUNKS)
    assert _index_valid(pg_dsn, extra["index_name"])


def _running_embedding_on(stack: AirflowStack, host: str) -> tuple[str, int] | None:
    """A mapped embedding task instance running on ``host`` now (run id, map index), from the
    metadata DB (quicker than the REST API for catching a task of a second or two)."""
    with psycopg.connect(stack.postgres().uri(stack.metadata_db)) as conn:
        row = conn.execute(
            "SELECT run_id, map_index FROM task_instance WHERE dag_id = 'documents'"
            " AND task_id = 'generate_embedding' AND state = 'running' AND hostname = %s LIMIT 1",
            (host,),
        ).fetchone()
    return (row[0], row[1]) if row else None


def _state(stack: AirflowStack, run_id: str, map_index: int) -> str | None:
    with psycopg.connect(stack.postgres().uri(stack.metadata_db)) as conn:
        row = conn.execute(
            "SELECT state FROM task_instance WHERE dag_id = 'documents' AND task_id = 'generate_embedding'"
            " AND run_id = %s AND map_index = %s",
            (run_id, map_index),
        ).fetchone()
    return row[0] if row else None


def _worker_processes(name: str) -> list[int]:
    """Processes of worker ``name`` still alive (found by the hostname in their environment)."""
    marker = f"CAPSTONE_WORKER_HOSTNAME={name}".encode()
    alive = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    alive.append(int(proc.name))
            except OSError:
                continue
    return alive


def _kill_while_embedding(stack: AirflowStack, timeout: float = 240.0) -> tuple[str, int]:
    """SIGKILL the victim's process group while one of its mapped embedding tasks is running.

    The group is frozen (SIGSTOP) first and the task's state read again, so the kill is known to
    land mid-task and not just after the task finished."""
    group = stack.processes[VICTIM].pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        victim = _running_embedding_on(stack, VICTIM)
        if victim is None:
            time.sleep(0.05)
            continue
        os.killpg(group, signal.SIGSTOP)
        time.sleep(0.5)  # let an in-flight state update through the api-server land
        if _state(stack, *victim) == "running":
            stack.kill(VICTIM)
            return victim
        os.killpg(group, signal.SIGCONT)
    raise TimeoutError(f"no mapped embedding task ran on {VICTIM} within {timeout:.0f}s")


def test_killed_worker_loses_nothing(stack: AirflowStack, api: AirflowApi, pg_dsn: str) -> None:
    runs_before = len(api.runs("documents"))
    # revision 2 changes every chunk, so every chunk is embedded again
    api.trigger("enrich_documents", conf={"copies": COPIES, "revision": 2})
    run_id, map_index = _kill_while_embedding(stack)
    killed_at = time.monotonic()
    time.sleep(1)
    assert _worker_processes(VICTIM) == [], f"processes of {VICTIM} survived SIGKILL of its group"

    run, _ = follow_downstream_run(api, "documents", runs_before=runs_before, timeout=600)
    recovery = time.monotonic() - killed_at
    log.warning(
        "killed %s during generate_embedding[%d]; the run ended %.1fs later", VICTIM, map_index, recovery
    )
    assert run["dag_run_id"] == run_id
    embedding = _embedding(api, run)
    assert run["state"] == "success", {ti["map_index"]: (ti["state"], ti["hostname"]) for ti in embedding}

    # the killed task was tried again, on the worker that was left
    (retried,) = [ti for ti in embedding if ti["map_index"] == map_index]
    assert retried["try_number"] >= 2
    assert retried["hostname"] == "worker-a"
    assert {ti["state"] for ti in embedding} == {"success"}

    # The first run's index (same parameters) took the new rows as they merged: the sensor finds it
    # valid and complete at once, so this run need not defer (the first test shows the deferral).
    assert {ti["state"] for ti in api.task_instances("documents", run["dag_run_id"])} == {"success"}
    extra = _published(api, run)
    assert extra["vector_count"] == CHUNKS and extra["chunks_embedded"] == CHUNKS
    # exact rows, no duplicates, every chunk of the new revision, and a valid index
    assert _table_counts(pg_dsn, revision=2) == (CHUNKS, CHUNKS, 79 * COPIES, CHUNKS)
    assert _index_valid(pg_dsn, extra["index_name"])
