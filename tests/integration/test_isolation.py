"""The suites never touch a user's collections: the demo's collection, indexed into a database
standing in for the user's, still answers from ``public.documents`` with its own model after the
e2e and distributed suites' collections (a ``documents`` of their own) were indexed the way their
set-up points them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from capstone.local.corpus import reference_documents, write_jsonl_batch
from capstone.local.embedded_pg import DEFAULT_DATABASE, EmbeddedPostgres
from tests.support.airflow import run_collection, task_states
from tests.support.stacks import TEST_DATABASE, distributed_configs, distributed_stack, e2e_stack

pytestmark = [pytest.mark.usefixtures("airflow_db"), pytest.mark.local_model, pytest.mark.slow]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The demo's sample queries answer from these documents; a few others stand beside them.
DEMO_DOCUMENTS = {"try", "yield", "with", "lambda", "import", "for", "global", "raise", "assert", "while"}
DEMO_QUERY = "how do I handle exceptions"


@pytest.fixture
def user_dsn(pg_server: EmbeddedPostgres) -> Iterator[str]:
    """A database standing in for the user's ``vectors``, dropped afterwards."""
    database = f"user_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server.uri("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    with psycopg.connect(pg_server.uri(database), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
    yield pg_server.uri(database)
    with psycopg.connect(pg_server.uri("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database)))


def search_header(dsn: str, collection: str = "documents") -> str:
    """The first line ``python -m capstone search`` prints: which table, which model."""
    completed = subprocess.run(
        [sys.executable, "-m", "capstone", "search", "--collection", collection, DEMO_QUERY, "--dsn", dsn],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.splitlines()[0]


def index_as_the_user(tmp_path: Path, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``make demo``'s collection (configs/documents.yaml as it is) indexed into ``dsn``."""
    configs = tmp_path / "user-configs"
    configs.mkdir()
    shutil.copy(PROJECT_ROOT / "configs" / "documents.yaml", configs / "documents.yaml")
    documents = [doc for doc in reference_documents() if doc["id"] in DEMO_DOCUMENTS]
    batch = write_jsonl_batch(documents, tmp_path / "demo.jsonl")
    monkeypatch.setenv("AIRFLOW_CONN_VECTOR_STORE_DEFAULT", dsn)
    run = run_collection(configs / "documents.yaml", [{"format": "jsonl", "path": str(batch)}])
    assert str(run.state) == "success", task_states("documents", run.run_id)


def test_the_suites_leave_the_demo_collection_alone(
    user_dsn: str, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index_as_the_user(tmp_path, user_dsn, monkeypatch)
    demo_header = search_header(user_dsn)
    assert demo_header.startswith("documents (public.documents): ")
    assert "sentence-transformers all-MiniLM-L6-v2" in demo_header

    # The suites' set-up, as their fixtures make it: each writes its collection `documents` where
    # its stack points the tasks' vector_store_default.
    stacks = [e2e_stack(), distributed_stack(distributed_configs(tmp_path))]
    batch = write_jsonl_batch(reference_documents()[:5], tmp_path / "suite.jsonl")
    for stack in stacks:
        assert stack.postgres().database == TEST_DATABASE != DEFAULT_DATABASE
        monkeypatch.setenv("AIRFLOW_CONN_VECTOR_STORE_DEFAULT", stack.postgres_uri())
        run = run_collection(stack.configs / "documents.yaml", [{"format": "jsonl", "path": str(batch)}])
        assert str(run.state) == "success", task_states("documents", run.run_id)
    assert pg_dsn == stacks[0].postgres_uri()

    assert search_header(user_dsn) == demo_header
    with psycopg.connect(user_dsn) as conn:
        registered = conn.execute("SELECT schema_name, table_name FROM capstone.collections").fetchall()
    assert registered == [("public", "documents")]
    with psycopg.connect(pg_dsn) as conn:
        suites = conn.execute(
            "SELECT schema_name, provider FROM capstone.collections WHERE name = 'documents'"
            " AND schema_name IN ('e2e', 'distributed') ORDER BY schema_name"
        ).fetchall()
        conn.execute("DROP SCHEMA IF EXISTS e2e CASCADE")
        conn.execute("DROP SCHEMA IF EXISTS distributed CASCADE")
        conn.execute("DELETE FROM capstone.collections WHERE schema_name IN ('e2e', 'distributed')")
        conn.execute("DELETE FROM capstone.collection_versions WHERE schema_name IN ('e2e', 'distributed')")
    assert suites == [("distributed", "hash"), ("e2e", "hash")]
