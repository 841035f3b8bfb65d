"""Changing a collection's embedding model without downtime (:mod:`capstone.versions`), under
``dag.test()`` against the embedded Postgres.

A new model is embedded into a version of its own beside the live one, from the live version's own
content plus the run's batches; the stable name (a view) switches to it only after it validates;
``capstone rollback`` switches back; tables of earlier releases are adopted without copying.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql

from capstone import registry
from capstone.cli import main as capstone_cli
from capstone.documents import BatchLocation
from capstone.embeddings.hashing import HashEmbedder
from capstone.index_build import IndexParams
from capstone.local.corpus import reference_documents
from capstone.pipeline import load_documents, prepare_chunks
from capstone.search import Searcher, search_collection
from capstone.store import index_is_valid
from capstone.versions import SwitchRefused, list_versions, switch, version_table_name
from dag_factory.loader import load_collection
from dag_factory.runtime import collection_settings
from tests.support.airflow import run_collection, task_states, write_collection, xcom_value
from tests.support.pipeline import run_pipeline
from tests.support.settings import collection_settings as settings_for
from tests.support.tables import assert_table_holds_exactly, jsonl_batch
from tests.support.versions import as_an_earlier_release, relation_kind, served_dimensions, version_states

pytestmark = pytest.mark.usefixtures("airflow_db")

QUERY = "try statement exception handlers finally clause"
NEW_DOCUMENT = {
    "id": "walrus",
    "content": "Assignment expressions",
    "chunks": ["The walrus operator := assigns a value inside an expression."],
    "metadata": {"section": "expressions"},
}


@pytest.fixture
def corpus() -> list[dict[str, Any]]:
    return reference_documents()


def _chunk_ids(hits: list[Any]) -> list[str]:
    return [hit.chunk_id for hit in hits]


def _registered_dimension(dsn: str, name: str) -> int:
    with psycopg.connect(dsn) as conn:
        return registry.lookup(conn, name).dimension


def test_a_new_model_is_built_beside_the_live_version_and_switched_to_once_it_validates(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    configs, name = tmp_path / "configs", "model_swap"
    first = run_collection(
        write_collection(configs, name, pg_schema), [jsonl_batch(tmp_path / "b1.jsonl", corpus)]
    )
    assert str(first.state) == "success", task_states(name, first.run_id)
    before = _chunk_ids(search_collection(name, QUERY, k=5, dsn=pg_dsn))

    # While the new model embeds, searches through the stable name still answer from version 1.
    during: list[tuple[set[int], list[str], int]] = []
    embed = HashEmbedder.embed

    def embed_and_search(self: HashEmbedder, texts: Any) -> np.ndarray:
        if self.dimension == 128 and not during:
            hits = _chunk_ids(search_collection(name, QUERY, k=5, dsn=pg_dsn))
            during.append(
                (served_dimensions(pg_dsn, pg_schema, name), hits, _registered_dimension(pg_dsn, name))
            )
        return embed(self, texts)

    monkeypatch.setattr(HashEmbedder, "embed", embed_and_search)
    spec = write_collection(configs, name, pg_schema, embedding={"dimension": 128})
    reader = _reader_role(pg_dsn, pg_schema, name)  # a consumer allowed to read the collection
    # Only the new document arrives: every other chunk comes from version 1's own rows.
    second = run_collection(spec, [jsonl_batch(tmp_path / "b2.jsonl", [NEW_DOCUMENT])])

    assert str(second.state) == "success", task_states(name, second.run_id)
    assert during == [({64}, before, 64)]
    assert served_dimensions(pg_dsn, pg_schema, name) == {128}
    assert_table_holds_exactly(
        pg_dsn, pg_schema, name, [*corpus, NEW_DOCUMENT], model="hash-v1", dimension=128
    )
    chunks = sum(len(doc["chunks"]) for doc in corpus) + 1
    assert xcom_value(name, second.run_id, "aggregate_embeddings")["embedded"] == chunks
    event = xcom_value(name, second.run_id, "publish_indexed_asset")
    assert (event["version"], event["live_version"], event["switched"]) == (2, 2, True)
    assert event["table"] == f"{pg_schema}.{name}" and event["index_name"].startswith(f"{name}__v2_hnsw_")
    assert version_states(pg_dsn, pg_schema, name) == {1: "retired", 2: "live"}  # keep_versions 1
    assert _registered_dimension(pg_dsn, name) == 128
    assert search_collection(name, "walrus operator assignment", k=1, dsn=pg_dsn, mode="vector")[
        0
    ].document_id == ("walrus")

    with psycopg.connect(pg_dsn) as conn:  # ... may read the new version too
        readable = conn.execute(
            "SELECT has_table_privilege(%s, %s, 'SELECT'), has_table_privilege(%s, %s, 'SELECT')",
            (reader, f"{pg_schema}.{name}", reader, f"{pg_schema}.{version_table_name(name, 2)}"),
        ).fetchone()
    assert readable == (True, True)

    again = run_collection(spec, [jsonl_batch(tmp_path / "b2.jsonl", [NEW_DOCUMENT])])  # unchanged

    assert task_states(name, again.run_id)["generate_embedding"] == ["skipped"]
    assert version_states(pg_dsn, pg_schema, name) == {1: "retired", 2: "live"}


def test_a_new_version_that_fails_validation_is_not_switched_to(
    tmp_path: Path,
    pg_dsn: str,
    pg_schema: str,
    corpus: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    configs, name = tmp_path / "configs", "model_refused"
    batch = jsonl_batch(tmp_path / "b1.jsonl", corpus)
    assert str(run_collection(write_collection(configs, name, pg_schema), [batch]).state) == "success"
    ghost = {"id": "ghost", "query": "anything", "expected_document_id": "no-such-document"}
    refused = write_collection(
        configs,
        name,
        pg_schema,
        embedding={"dimension": 128},
        validation={"sample_queries": [ghost], "fail_on": ["vector_count", "query_relevance"]},
    )

    run = run_collection(refused, [batch])

    states = task_states(name, run.run_id)
    assert states["validate_index_health"] == ["failed"] and states["publish_indexed_asset"] == [
        "upstream_failed"
    ]
    assert version_states(pg_dsn, pg_schema, name) == {1: "live", 2: "building"}
    assert served_dimensions(pg_dsn, pg_schema, name) == {64}
    assert _registered_dimension(pg_dsn, name) == 64
    assert search_collection(name, QUERY, k=3, dsn=pg_dsn)  # still answering, with the old model
    assert capstone_cli(["versions", "--collection", name, "--dsn", pg_dsn]) == 0
    listing = capsys.readouterr().out
    assert "building" in listing and "last validation failed query_relevance_ghost" in listing

    # The check fixed (and no earlier version kept): the next run finishes version 2 and switches.
    fixed = write_collection(
        configs, name, pg_schema, embedding={"dimension": 128}, store={"keep_versions": 0}
    )
    with Searcher(name, dsn=pg_dsn) as searcher:  # a service that loaded version 1
        assert searcher.record.dimension == 64 and searcher.search(QUERY, k=3)
        finished = run_collection(fixed, [batch])
        # Version 1 is dropped (keep_versions 0): the searcher follows the switch by itself.
        assert searcher.search(QUERY, k=3) and searcher.record.dimension == 128

    states = task_states(name, finished.run_id)
    assert str(finished.state) == "success", states
    assert states["generate_embedding"] in ([], ["skipped"])  # version 2 already held every chunk
    assert served_dimensions(pg_dsn, pg_schema, name) == {128}
    assert version_states(pg_dsn, pg_schema, name) == {2: "live"}
    with psycopg.connect(pg_dsn) as conn:
        gone = conn.execute(
            "SELECT to_regclass(%s)", (f"{pg_schema}.{version_table_name(name, 1)}",)
        ).fetchone()
    assert gone == (None,)


def test_rollback_switches_back_and_a_run_of_the_rolled_back_model_says_how_to_go_on(
    tmp_path: Path,
    pg_dsn: str,
    pg_schema: str,
    corpus: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    configs, name = tmp_path / "configs", "model_back"
    batch = jsonl_batch(tmp_path / "b1.jsonl", corpus)
    assert str(run_collection(write_collection(configs, name, pg_schema), [batch]).state) == "success"
    new_model = write_collection(configs, name, pg_schema, embedding={"dimension": 128})
    with_new_document = jsonl_batch(tmp_path / "b2.jsonl", [NEW_DOCUMENT])
    assert str(run_collection(new_model, [with_new_document]).state) == "success"

    assert capstone_cli(["rollback", "--collection", name, "--dsn", pg_dsn]) == 0

    assert "now serves version 1 (was version 2)" in capsys.readouterr().out
    assert served_dimensions(pg_dsn, pg_schema, name) == {64}
    assert _registered_dimension(pg_dsn, name) == 64
    assert search_collection(name, QUERY, k=3, dsn=pg_dsn)
    assert version_states(pg_dsn, pg_schema, name) == {1: "live", 2: "rolled_back"}

    refused = run_collection(new_model, [with_new_document])

    assert task_states(name, refused.run_id)["load_enriched_documents"] == ["failed"]
    assert served_dimensions(pg_dsn, pg_schema, name) == {64}

    # The YAML names version 1's model again: its next run takes what version 2 got meanwhile.
    reconciled = run_collection(write_collection(configs, name, pg_schema), [])

    assert str(reconciled.state) == "success", task_states(name, reconciled.run_id)
    assert xcom_value(name, reconciled.run_id, "aggregate_embeddings")["embedded"] == 1  # only the new chunk
    assert_table_holds_exactly(
        pg_dsn, pg_schema, name, [*corpus, NEW_DOCUMENT], model="hash-v1", dimension=64
    )

    assert capstone_cli(["rollback", "--collection", name, "--to", "2", "--dsn", pg_dsn]) == 0
    assert served_dimensions(pg_dsn, pg_schema, name) == {128}
    assert version_states(pg_dsn, pg_schema, name) == {1: "retired", 2: "live"}
    assert _registered_dimension(pg_dsn, name) == 128
    assert capstone_cli(["rollback", "--collection", name, "--to", "7", "--dsn", pg_dsn]) == 1
    assert "has no kept version number 7" in capsys.readouterr().err


def test_a_table_of_an_earlier_release_is_adopted_as_version_1_without_copying(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]]
) -> None:
    configs, name = tmp_path / "configs", "model_adopt"
    spec = write_collection(configs, name, pg_schema)
    batch = jsonl_batch(tmp_path / "b1.jsonl", corpus)
    assert str(run_collection(spec, [batch]).state) == "success"
    as_an_earlier_release(pg_dsn, pg_schema, name, "hash-v1")
    before = _rows(pg_dsn, pg_schema, name)

    run = run_collection(spec, [batch])

    assert task_states(name, run.run_id)["generate_embedding"] == ["skipped"]  # nothing re-embedded
    assert relation_kind(pg_dsn, pg_schema, name) == "v"
    assert _rows(pg_dsn, pg_schema, version_table_name(name, 1)) == before  # the same rows, not copied
    assert version_states(pg_dsn, pg_schema, name) == {1: "live"}
    settings = collection_settings(load_collection(spec))
    at_version = IndexParams.of(settings)
    with psycopg.connect(pg_dsn) as conn:
        assert index_is_valid(
            conn, pg_schema, at_version.index_name.replace(name, version_table_name(name, 1), 1)
        )
    assert search_collection(name, QUERY, k=3, dsn=pg_dsn)

    # A new model is then built from the adopted version's own rows: no batch at all.
    rebuilt = run_collection(write_collection(configs, name, pg_schema, embedding={"dimension": 128}), [])

    assert str(rebuilt.state) == "success", task_states(name, rebuilt.run_id)
    assert_table_holds_exactly(pg_dsn, pg_schema, name, corpus, model="hash-v1", dimension=128)
    assert version_states(pg_dsn, pg_schema, name) == {1: "retired", 2: "live"}


def _reader_role(dsn: str, schema: str, name: str) -> str:
    """A role (dropped with the test's schema) that may read the collection and its live table."""
    role = f"reader_{schema}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        for relation in (name, version_table_name(name, 1)):
            conn.execute(
                sql.SQL("GRANT SELECT ON {} TO {}").format(
                    sql.Identifier(schema, relation), sql.Identifier(role)
                )
            )
    return role


def _rows(dsn: str, schema: str, table: str) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id, content, metadata, content_hash, embedding::text, updated_at FROM {}").format(
                sql.Identifier(schema, table)
            )
        ).fetchall()
    return {row[0]: row[1:] for row in rows}


def test_a_table_of_another_embedding_is_adopted_and_replaced_in_one_run_and_can_be_rolled_back_to(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]]
) -> None:
    configs, name = tmp_path / "configs", "model_upgrade"
    batch = jsonl_batch(tmp_path / "b1.jsonl", corpus)
    assert str(run_collection(write_collection(configs, name, pg_schema), [batch]).state) == "success"
    as_an_earlier_release(pg_dsn, pg_schema, name, "hash-v1")

    # Upgrading and changing the model at once: the old table becomes version 1, the run builds 2.
    run = run_collection(write_collection(configs, name, pg_schema, embedding={"dimension": 128}), [])

    assert str(run.state) == "success", task_states(name, run.run_id)
    assert_table_holds_exactly(pg_dsn, pg_schema, name, corpus, model="hash-v1", dimension=128)
    assert version_states(pg_dsn, pg_schema, name) == {1: "retired", 2: "live"}
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        building = next(v for v in list_versions(conn, pg_schema, name) if v.number == 2)
        with pytest.raises(SwitchRefused, match=r"version 2 .* is live now, not building"):
            switch(conn, replace(building, status="building"), lambda _conn: None, keep_versions=1)

    assert capstone_cli(["rollback", "--collection", name, "--dsn", pg_dsn]) == 0  # to the adopted table
    assert served_dimensions(pg_dsn, pg_schema, name) == {64}
    assert _registered_dimension(pg_dsn, name) == 64
    assert search_collection(name, QUERY, k=3, dsn=pg_dsn)


def test_going_back_to_an_earlier_model_rebuilds_its_kept_version_with_what_changed_since(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]]
) -> None:
    configs, name = tmp_path / "configs", "model_return"
    assert (
        str(
            run_collection(
                write_collection(configs, name, pg_schema), [jsonl_batch(tmp_path / "a.jsonl", corpus)]
            ).state
        )
        == "success"
    )
    new_model = write_collection(configs, name, pg_schema, embedding={"dimension": 128})
    gone = corpus[0]
    changes = [NEW_DOCUMENT, {"id": gone["id"], "deleted": True}]
    assert str(run_collection(new_model, [jsonl_batch(tmp_path / "b.jsonl", changes)]).state) == "success"

    back = run_collection(write_collection(configs, name, pg_schema), [])

    assert str(back.state) == "success", task_states(name, back.run_id)
    assert version_states(pg_dsn, pg_schema, name) == {1: "live", 2: "retired"}
    assert xcom_value(name, back.run_id, "aggregate_embeddings")["embedded"] == 1  # the new chunk only
    assert_table_holds_exactly(
        pg_dsn, pg_schema, name, [*corpus[1:], NEW_DOCUMENT], model="hash-v1", dimension=64
    )


def test_a_retried_prepare_of_a_new_version_stages_the_live_rows_once(
    tmp_path: Path, pg_dsn: str, pg_schema: str, corpus: list[dict[str, Any]]
) -> None:
    old = settings_for("model_retry", pg_schema, embedding={"dimension": 64})
    run_pipeline(old, "retry-r1", [jsonl_batch(tmp_path / "a.jsonl", corpus)])
    new = settings_for("model_retry", pg_schema, embedding={"dimension": 128})
    load_documents(
        new, "retry-r2", [BatchLocation.from_extra(jsonl_batch(tmp_path / "b.jsonl", [NEW_DOCUMENT]))]
    )

    first = prepare_chunks(new, "retry-r2", max_batches=8)
    again = prepare_chunks(new, "retry-r2", max_batches=8)  # the task's retry

    chunks = sum(len(doc["chunks"]) for doc in corpus) + 1
    assert first["summary"]["to_embed"] == again["summary"]["to_embed"] == chunks
    assert again["summary"]["seeded"] == chunks - 1
