"""The whole collection DAG under ``dag.test()`` against the embedded Postgres (trigger inline)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from capstone import registry, store
from capstone.local.corpus import reference_documents, write_jsonl_batch
from capstone.search import KeywordSearchUnavailable, search_collection
from capstone.settings import SearchSettings
from dag_factory.runtime import settings_from_mapping
from tests.support.airflow import (
    asset_events,
    run_collection,
    task_states,
    write_collection,
    xcom_value,
    xcoms,
)
from tests.support.versions import as_an_earlier_release, live_table, relation_kind

pytestmark = pytest.mark.usefixtures("airflow_db")

BAD_DOCUMENTS: list[Any] = [
    {"content": "no id", "chunks": ["x"]},
    {"id": "empty-chunks", "content": "x", "chunks": []},
    {"id": "bad-chunk", "content": "x", "chunks": ["fine", 42]},
    {"id": "assert", "content": "duplicate of a real topic", "chunks": ["dup"]},
]


def _batch(tmp_path: Path, documents: list[Any], name: str) -> dict[str, Any]:
    path = write_jsonl_batch(documents, tmp_path / "batches" / f"{name}.jsonl")
    return {"format": "jsonl", "path": str(path)}


def _table_rows(dsn: str, schema: str, table: str) -> dict[str, tuple]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT id, document_id, chunk_index, content, metadata, updated_at,"
                " embedding IS NOT NULL FROM {}"
            ).format(sql.Identifier(schema, table))
        ).fetchall()
    return {row[0]: row[1:] for row in rows}


@pytest.fixture
def corpus() -> list[dict[str, Any]]:
    return reference_documents()


def test_first_run_indexes_every_valid_chunk_and_publishes(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]]
) -> None:
    spec = write_collection(tmp_path / "configs", "ref_first", pg_schema)
    run = run_collection(spec, [_batch(tmp_path, corpus + BAD_DOCUMENTS, "b1")])

    states = task_states("ref_first", run.run_id)
    assert str(run.state) == "success", states
    valid_chunks = sum(len(doc["chunks"]) for doc in corpus)
    rows = _table_rows(pg_dsn, pg_schema, "ref_first")
    assert len(rows) == valid_chunks
    with_doc = corpus[-1]
    for index, text in enumerate(with_doc["chunks"]):
        document_id, chunk_index, content, metadata, _updated, has_vector = rows[
            f"{with_doc['id']}_chunk_{index}"
        ]
        assert (document_id, chunk_index, content, has_vector) == (with_doc["id"], index, text, True)
        assert metadata == with_doc["metadata"]

    loaded = xcom_value("ref_first", run.run_id, "load_enriched_documents")
    assert loaded["rejected_count"] == 4
    assert {r["id"] for r in loaded["rejected"]} == {None, "empty-chunks", "bad-chunk", "assert"}
    assert len(states["generate_embedding"]) == math.ceil(valid_chunks / 100)
    assert set(states["generate_embedding"]) == {"success"}

    event = asset_events("ref_first.indexed")[-1]
    assert event["vector_count"] == valid_chunks
    assert event["chunks_embedded"] == valid_chunks
    assert event["rejected_documents"] == 4
    assert event["run_id"] == run.run_id
    assert event["index_name"].startswith("ref_first__v1_hnsw_")  # on version 1, behind the view
    assert (event["table"], event["version"], event["live_version"], event["switched"]) == (
        f"{pg_schema}.ref_first",
        1,
        1,
        False,
    )


def test_rerun_embeds_nothing_and_publishes_nothing(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]]
) -> None:
    spec = write_collection(tmp_path / "configs", "ref_rerun", pg_schema)
    batch = _batch(tmp_path, corpus, "b1")
    assert str(run_collection(spec, [batch]).state) == "success"
    before = _table_rows(pg_dsn, pg_schema, "ref_rerun")
    events_before = len(asset_events("ref_rerun.indexed"))

    run = run_collection(spec, [batch])

    states = task_states("ref_rerun", run.run_id)
    assert str(run.state) == "success"
    # prepare_chunks found nothing and skipped every task after it at once (not one level a loop)
    assert states.pop("load_enriched_documents") == states.pop("prepare_chunks") == ["success"]
    assert states == {
        task: ["skipped"]
        for task in (
            "generate_embedding",
            "aggregate_embeddings",
            "batch_upsert_vectors",
            "wait_for_indexing",
            "validate_index_health",
            "publish_indexed_asset",
        )
    }
    assert _table_rows(pg_dsn, pg_schema, "ref_rerun") == before
    assert len(asset_events("ref_rerun.indexed")) == events_before


def test_changed_document_reembeds_only_its_chunks_and_drops_lost_ones(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]]
) -> None:
    spec = write_collection(tmp_path / "configs", "ref_change", pg_schema)
    assert str(run_collection(spec, [_batch(tmp_path, corpus, "b1")]).state) == "success"
    before = _table_rows(pg_dsn, pg_schema, "ref_change")

    changed = copy.deepcopy(corpus)
    target = next(doc for doc in changed if doc["id"] == "with")
    assert len(target["chunks"]) > 3
    lost = len(target["chunks"]) - 2
    target["chunks"] = [target["chunks"][0], "The with statement, rewritten by the enrichment step."]
    run = run_collection(spec, [_batch(tmp_path, [target], "b2")])

    assert str(run.state) == "success", task_states("ref_change", run.run_id)
    aggregated = xcom_value("ref_change", run.run_id, "aggregate_embeddings")
    upserted = xcom_value("ref_change", run.run_id, "batch_upsert_vectors")
    assert aggregated["embedded"] == 1
    assert (upserted["upserted"], upserted["deleted"]) == (1, lost)
    after = _table_rows(pg_dsn, pg_schema, "ref_change")
    assert len(after) == len(before) - lost
    assert after["with_chunk_1"][2] == "The with statement, rewritten by the enrichment step."
    assert after["with_chunk_0"] == before["with_chunk_0"]  # unchanged chunk: not even re-written
    assert all(after[key] == before[key] for key in after if not key.startswith("with_"))


def test_documents_deleted_upstream_leave_the_collection(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]]
) -> None:
    spec = write_collection(tmp_path / "configs", "ref_delete", pg_schema)
    assert str(run_collection(spec, [_batch(tmp_path, corpus, "b1")]).state) == "success"
    before = _table_rows(pg_dsn, pg_schema, "ref_delete")
    gone = {"lambda", "yield"}
    removed = {key for key, row in before.items() if row[0] in gone}
    assert removed

    tombstones = [{"id": doc_id, "deleted": True} for doc_id in sorted(gone)]
    tombstones.append({"id": "never-indexed", "deleted": True})  # nothing to delete: no error
    run = run_collection(spec, [_batch(tmp_path, tombstones, "b2")])

    assert str(run.state) == "success", task_states("ref_delete", run.run_id)
    loaded = xcom_value("ref_delete", run.run_id, "load_enriched_documents")
    assert (loaded["documents"], loaded["deleted_documents"], loaded["rejected_count"]) == (0, 3, 0)
    upserted = xcom_value("ref_delete", run.run_id, "batch_upsert_vectors")
    assert (upserted["upserted"], upserted["deleted"]) == (0, len(removed))
    after = _table_rows(pg_dsn, pg_schema, "ref_delete")
    assert set(after) == set(before) - removed
    assert all(after[key] == before[key] for key in after)  # the rest untouched
    event = asset_events("ref_delete.indexed")[-1]
    assert event["run_id"] == run.run_id
    assert (event["deleted_documents"], event["rows_deleted"]) == (3, len(removed))
    assert (event["chunks_embedded"], event["vector_count"]) == (0, len(after))


@pytest.mark.slow
def test_5000_chunks_map_over_batches_and_keep_xcoms_small(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    documents = [
        {"id": f"d{i}", "content": f"doc {i}", "chunks": [f"document {i} chunk {j} " * 20 for j in range(10)]}
        for i in range(500)
    ]
    spec = write_collection(
        tmp_path / "configs", "big_run", pg_schema, embedding={"batch_size": 400}, upsert_batch_size=1000
    )
    run = run_collection(spec, [_batch(tmp_path, documents, "big")])

    states = task_states("big_run", run.run_id)
    assert str(run.state) == "success", states
    assert len(states["generate_embedding"]) <= math.ceil(5000 / 400)
    sizes = {
        (task, map_index, key): len(json.dumps(value))
        for task, map_index, key, value in xcoms("big_run", run.run_id)
    }
    assert max(sizes.values()) < 64 * 1024, sizes
    assert len(_table_rows(pg_dsn, pg_schema, "big_run")) == 5000


def _keyword_state(dsn: str, schema: str, name: str) -> tuple[str | None, list[tuple[str, bool]]]:
    """(the text search configuration of the keyword column of the collection's live table, or of
    its plain table before it has versions; its GIN indexes and validity)."""
    table = live_table(dsn, schema, name) if relation_kind(dsn, schema, name) == "v" else name
    with psycopg.connect(dsn) as conn:
        config = store.stored_text_config(conn, store.CollectionTable(schema, table, 64, "english", "vector"))
        indexes = conn.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = %s::regclass AND am.amname = 'gin'",
            (f"{schema}.{table}",),
        ).fetchall()
    return config, [(name, bool(valid)) for name, valid in indexes]


def test_a_table_of_an_earlier_release_gets_its_keyword_index_in_place_on_the_next_run(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]]
) -> None:
    spec = write_collection(tmp_path / "configs", "ref_upgrade", pg_schema)
    batch = _batch(tmp_path, corpus, "b1")
    assert str(run_collection(spec, [batch]).state) == "success"
    # What an earlier release left: a plain table (before versions), without a keyword column (its
    # GIN index goes with it), and a registry row without search options.
    as_an_earlier_release(pg_dsn, pg_schema, "ref_upgrade", "hash-v1")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP COLUMN content_tsv").format(sql.Identifier(pg_schema, "ref_upgrade"))
        )
        conn.execute("UPDATE capstone.collections SET search_options = NULL WHERE name = 'ref_upgrade'")
        conn.execute("ALTER TABLE capstone.collections DROP COLUMN vector_type")  # its registry had none
    before = _table_rows(pg_dsn, pg_schema, "ref_upgrade")
    assert _keyword_state(pg_dsn, pg_schema, "ref_upgrade") == (None, [])
    assert search_collection("ref_upgrade", "try statement", k=3, dsn=pg_dsn)  # vector, as it was validated
    with pytest.raises(KeywordSearchUnavailable, match="its next run adds it"):
        search_collection("ref_upgrade", "try statement", k=3, dsn=pg_dsn, mode="keyword")

    run = run_collection(spec, [batch])  # the same documents: nothing to embed

    states = task_states("ref_upgrade", run.run_id)
    assert str(run.state) == "success", states
    assert states["generate_embedding"] in ([], ["skipped"]) and states["publish_indexed_asset"] == [
        "success"
    ]
    assert _table_rows(pg_dsn, pg_schema, "ref_upgrade") == before  # same rows, not re-embedded
    config, gin = _keyword_state(pg_dsn, pg_schema, "ref_upgrade")
    indexed = xcom_value("ref_upgrade", run.run_id, "wait_for_indexing")
    assert (config, gin) == ("english", [(indexed["keyword_index_name"], True)])
    report = xcom_value("ref_upgrade", run.run_id, "validate_index_health")
    assert report["summary"]["search_mode"] == "hybrid"
    hits = search_collection("ref_upgrade", "finally", k=3, dsn=pg_dsn, mode="keyword")
    assert len(hits) == 3 and all("finally" in hit.text.lower() for hit in hits)


def test_a_new_text_search_configuration_regenerates_the_keyword_column(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]]
) -> None:
    configs = tmp_path / "configs"
    batch = _batch(tmp_path, corpus, "b1")
    assert str(run_collection(write_collection(configs, "ref_config", pg_schema), [batch]).state) == "success"
    spec = write_collection(configs, "ref_config", pg_schema, search={"text_config": "simple"})

    run = run_collection(spec, [batch])

    assert str(run.state) == "success", task_states("ref_config", run.run_id)
    config, gin = _keyword_state(pg_dsn, pg_schema, "ref_config")
    assert config == "simple" and [valid for _, valid in gin] == [True]
    with psycopg.connect(pg_dsn) as conn:
        stems = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE content_tsv @@ to_tsquery('simple', 'statements')").format(
                sql.Identifier(pg_schema, "ref_config")
            )
        ).fetchone()
    assert stems is not None and stems[0] > 0  # 'simple' keeps the plural 'english' would stem


def test_an_unchanged_run_still_rebuilds_a_missing_index_and_registers_new_search_settings(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]]
) -> None:
    configs, batch = tmp_path / "configs", _batch(tmp_path, corpus, "b1")
    first = run_collection(write_collection(configs, "ref_heal", pg_schema), [batch])
    keyword_index = xcom_value("ref_heal", first.run_id, "wait_for_indexing")["keyword_index_name"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # dropped by hand, or a failed build
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(pg_schema, keyword_index)))

    healed = run_collection(write_collection(configs, "ref_heal", pg_schema), [batch])
    changed = run_collection(write_collection(configs, "ref_heal", pg_schema, search={"rrf_k": 10}), [batch])
    unchanged = run_collection(
        write_collection(configs, "ref_heal", pg_schema, search={"rrf_k": 10}), [batch]
    )

    assert task_states("ref_heal", healed.run_id)["publish_indexed_asset"] == ["success"]
    assert _keyword_state(pg_dsn, pg_schema, "ref_heal")[1] == [(keyword_index, True)]
    assert task_states("ref_heal", changed.run_id)["validate_index_health"] == ["success"]
    with psycopg.connect(pg_dsn) as conn:
        record = registry.registered_row(conn, pg_schema, "ref_heal")
        assert record is not None and record.search == replace(_default_search(), rrf_k=10)
    assert task_states("ref_heal", unchanged.run_id)["generate_embedding"] == ["skipped"]  # nothing left


def _default_search() -> SearchSettings:
    return settings_from_mapping({"collection": "x", "embedding": {"provider": "hash"}}).search
