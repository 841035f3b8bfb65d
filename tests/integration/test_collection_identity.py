"""One collection name, one table, per database: two deployments sharing a database (a schema each)
keep a registry row each; a search by name alone that finds both asks which; a table belongs to one
collection name; a registry row the spec no longer matches is repaired by the next run."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from capstone.local.corpus import reference_documents, write_jsonl_batch
from capstone.local.embedded_pg import EmbeddedPostgres
from capstone.registry import AmbiguousCollection, ensure_registry, lookup
from capstone.search import search_collection
from tests.support.airflow import run_collection, task_states, try_numbers, write_collection, xcom_value
from tests.support.tables import drop_test_schema

pytestmark = pytest.mark.usefixtures("airflow_db")

# The registry as releases before this one created it: keyed by the collection name alone.
EARLIER_REGISTRY = """
CREATE TABLE capstone.collections (
    name text PRIMARY KEY, schema_name text NOT NULL, table_name text NOT NULL,
    connection_id text NOT NULL, provider text NOT NULL, model text NOT NULL, dimension int NOT NULL,
    metric text NOT NULL, index_type text NOT NULL, index_name text NOT NULL,
    index_params jsonb NOT NULL, ef_search int NOT NULL, probes int NOT NULL,
    embedding_options jsonb NOT NULL DEFAULT '{}', last_validation jsonb,
    updated_at timestamptz NOT NULL DEFAULT now())
"""


@pytest.fixture
def other_schema(pg_dsn: str) -> Iterator[str]:
    """A second deployment's schema, beside ``pg_schema``."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    drop_test_schema(pg_dsn, name)


def _batch(tmp_path: Path, name: str, count: int) -> list[dict[str, str]]:
    path = write_jsonl_batch(reference_documents()[:count], tmp_path / f"{name}.jsonl")
    return [{"format": "jsonl", "path": str(path)}]


def test_two_deployments_keep_a_collection_each_and_a_search_by_name_asks_which(
    tmp_path: Path, pg_dsn: str, pg_schema: str, other_schema: str
) -> None:
    name = f"shared_{uuid.uuid4().hex[:8]}"
    staging = write_collection(tmp_path / "staging", name, pg_schema, embedding={"dimension": 32})
    production = write_collection(tmp_path / "production", name, other_schema)
    for spec, count in ((staging, 3), (production, 6)):
        run = run_collection(spec, _batch(tmp_path, spec.parent.name, count))
        assert str(run.state) == "success", task_states(name, run.run_id)

    with pytest.raises(AmbiguousCollection) as ambiguous:
        search_collection(name, "the with statement", dsn=pg_dsn)
    assert f"{pg_schema}.{name} (hash hash-v1" in str(ambiguous.value)
    assert f"{other_schema}.{name} (hash hash-v1" in str(ambiguous.value)
    assert "--schema" in str(ambiguous.value)

    with psycopg.connect(pg_dsn) as conn:
        assert (lookup(conn, name, pg_schema).dimension, lookup(conn, name, other_schema).dimension) == (
            32,
            64,
        )
    staging_hits = search_collection(name, "the with statement", k=50, dsn=pg_dsn, schema=pg_schema)
    production_hits = search_collection(name, "the with statement", k=50, dsn=pg_dsn, schema=other_schema)
    documents = [doc["id"] for doc in reference_documents()]
    assert {hit.document_id for hit in staging_hits} == set(documents[:3])
    assert {hit.document_id for hit in production_hits} == set(documents[:6])


def test_a_collection_of_another_name_may_not_take_a_table(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    first = write_collection(tmp_path / "first", "owner", pg_schema)
    assert str(run_collection(first, _batch(tmp_path, "first", 3)).state) == "success"
    intruder = write_collection(tmp_path / "second", "intruder", pg_schema, store={"table": "owner"})

    run = run_collection(intruder, _batch(tmp_path, "second", 4))

    assert str(run.state) == "failed"
    assert try_numbers("intruder", run.run_id, "prepare_chunks") == [1]  # terminal: no retry
    with psycopg.connect(pg_dsn) as conn:
        assert lookup(conn, "owner", pg_schema).table == "owner"
        assert conn.execute(
            "SELECT count(*) FROM capstone.collections WHERE name = 'intruder'"
        ).fetchone() == (0,)


def test_a_registry_row_gone_or_stale_is_repaired_by_the_next_unchanged_run(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    spec = write_collection(tmp_path / "configs", "repaired", pg_schema)
    batches = _batch(tmp_path, "repaired", 3)
    assert str(run_collection(spec, batches).state) == "success"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM capstone.collections WHERE schema_name = %s", (pg_schema,))

    repaired = run_collection(spec, batches)  # nothing new: it still validates, which registers

    assert str(repaired.state) == "success", task_states("repaired", repaired.run_id)
    assert xcom_value("repaired", repaired.run_id, "prepare_chunks") == []  # nothing re-embedded
    with psycopg.connect(pg_dsn) as conn:
        assert lookup(conn, "repaired", pg_schema).version == 1
    unchanged = run_collection(spec, batches)
    assert task_states("repaired", unchanged.run_id)["validate_index_health"] == ["skipped"]


def test_a_registry_of_an_earlier_release_is_keyed_by_table(pg_server: EmbeddedPostgres) -> None:
    database = f"registry_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.uri("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        with psycopg.connect(pg_server.uri(database), autocommit=True) as conn:
            conn.execute("CREATE SCHEMA capstone")
            conn.execute(EARLIER_REGISTRY)
            conn.execute(
                "INSERT INTO capstone.collections (name, schema_name, table_name, connection_id, provider,"
                " model, dimension, metric, index_type, index_name, index_params, ef_search, probes)"
                " VALUES ('documents', 'public', 'documents', 'c', 'hash', 'hash-v1', 8, 'cosine', 'hnsw',"
                " 'i', '{}', 40, 1)"
            )
            ensure_registry(conn)
            key = conn.execute(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = 'capstone.collections'::regclass AND contype = 'p'"
            ).fetchone()
            assert key == ("PRIMARY KEY (schema_name, table_name)",)
            assert conn.execute("SELECT name, search_options FROM capstone.collections").fetchall() == [
                ("documents", None)
            ]
    finally:
        with psycopg.connect(pg_server.uri("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database)))
