"""The pgvector store against the real embedded Postgres: staging, batching, upserts, deletions."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from psycopg import sql

from capstone import store
from capstone.contracts import BatchDescriptor
from capstone.documents import EnrichedDocument

DIM = 8


def _docs(n: int, chunks: int = 3, tag: str = "v1") -> list[EnrichedDocument]:
    return [
        EnrichedDocument(
            id=f"doc{i}",
            content=f"document {i}",
            chunks=[f"doc {i} chunk {j} {tag}" for j in range(chunks)],
            metadata={"n": i, "tag": tag},
        )
        for i in range(n)
    ]


def _embed_all(
    conn: psycopg.Connection, table: store.CollectionTable, run_key: str, batches: list[BatchDescriptor]
) -> None:
    rng = np.random.default_rng(0)
    for batch in batches:
        for ids, _texts in store.pending_batch_texts(conn, run_key, table, batch["batch_no"], 1000):
            store.write_batch_vectors(conn, run_key, ids, rng.random((len(ids), DIM), dtype=np.float32))
        store.record_batch_embedded(conn, run_key, batch["batch_no"])


def _index(
    conn: psycopg.Connection, table: store.CollectionTable, run_key: str, docs: list[EnrichedDocument]
) -> int:
    store.ensure_staging(conn)
    store.ensure_collection_table(conn, table)
    store.stage_documents(conn, run_key, "c", docs, "m")
    batches = store.assign_batches(conn, run_key, table, batch_size=4, max_batches=1024)
    _embed_all(conn, table, run_key, batches)
    merged = sum(
        store.merge_batch(conn, run_key, table, "m", first, last, count)
        for first, last, count in store.merge_spans(conn, run_key, 7)
    )
    store.delete_lost_chunks(conn, run_key, table)
    store.drop_run_staging(conn, run_key)
    return merged


def _rows(conn: psycopg.Connection, table: store.CollectionTable) -> list[tuple]:
    return conn.execute(
        sql.SQL("SELECT id, document_id, chunk_index, metadata->>'tag' FROM {} ORDER BY id").format(
            table.ident
        )
    ).fetchall()


def test_first_run_stores_every_chunk_with_its_document_and_index(
    pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    table = store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    assert _index(pg_conn, table, "run1", _docs(5)) == 15
    rows = _rows(pg_conn, table)
    assert len(rows) == 15
    assert ("doc3_chunk_2", "doc3", 2, "v1") in rows
    assert store.count_vectors(pg_conn, table) == 15


def test_unchanged_chunks_are_not_batched_again(pg_conn: psycopg.Connection, pg_schema: str) -> None:
    table = store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    _index(pg_conn, table, "run1", _docs(5))
    store.stage_documents(pg_conn, "run2", "c", _docs(5), "m")
    assert store.assign_batches(pg_conn, "run2", table, 4, 1024) == []
    # the same text under another model must be embedded again
    store.stage_documents(pg_conn, "run3", "c", _docs(5), "m2")
    assert sum(b["chunks"] for b in store.assign_batches(pg_conn, "run3", table, 4, 1024)) == 15


def test_changed_document_replaces_its_chunks_and_drops_the_ones_it_lost(
    pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    table = store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    _index(pg_conn, table, "run1", _docs(3, chunks=4))
    changed = [
        EnrichedDocument(
            id="doc1", content="new", chunks=["doc 1 chunk 0 v1", "rewritten"], metadata={"n": 1, "tag": "v1"}
        )
    ]
    store.stage_documents(pg_conn, "run2", "c", changed, "m")
    batches = store.assign_batches(pg_conn, "run2", table, 4, 1024)
    assert sum(b["chunks"] for b in batches) == 1  # only the rewritten chunk
    assert store.count_lost_chunks(pg_conn, "run2", table) == 2
    _index(pg_conn, table, "run2", changed)
    rows = _rows(pg_conn, table)
    assert [r[0] for r in rows if r[1] == "doc1"] == ["doc1_chunk_0", "doc1_chunk_1"]
    assert len(rows) == 4 + 2 + 4


def test_batches_never_exceed_the_map_limit(pg_conn: psycopg.Connection, pg_schema: str) -> None:
    table = store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    store.ensure_staging(pg_conn)
    store.ensure_collection_table(pg_conn, table)
    store.stage_documents(pg_conn, "run1", "c", _docs(100, chunks=10), "m")
    batches = store.assign_batches(pg_conn, "run1", table, batch_size=1, max_batches=7)
    assert len(batches) <= 7
    assert sum(b["chunks"] for b in batches) == 1000


def test_rewriting_a_batch_replaces_its_vectors(pg_conn: psycopg.Connection, pg_schema: str) -> None:
    store.ensure_staging(pg_conn)
    store.stage_documents(pg_conn, "rerun", "c", _docs(1, chunks=2), "m")
    ids = ["doc0_chunk_0", "doc0_chunk_1"]
    store.write_batch_vectors(pg_conn, "rerun", ids, np.ones((2, DIM), dtype=np.float32))
    store.write_batch_vectors(pg_conn, "rerun", ids, np.full((2, DIM), 2, dtype=np.float32))
    assert store.staged_vector_ids(pg_conn, "rerun") == ids
    vectors = pg_conn.execute(
        sql.SQL("SELECT embedding::text FROM {} ORDER BY id").format(store.run_table("rerun", "vectors"))
    ).fetchall()
    assert vectors == [("[" + ",".join(["2"] * DIM) + "]",)] * 2
    store.drop_run_staging(pg_conn, "rerun")


def test_each_run_stages_into_its_own_unlogged_tables_dropped_at_the_end(
    pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    table = store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    store.ensure_staging(pg_conn)
    store.ensure_collection_table(pg_conn, table)
    store.stage_documents(pg_conn, "own1", "c", _docs(2), "m")
    store.stage_documents(pg_conn, "own2", "c", _docs(3), "m")
    assert (store.count_staged_chunks(pg_conn, "own1"), store.count_staged_chunks(pg_conn, "own2")) == (6, 9)
    for kind in store.STAGING_KINDS:
        name = store.run_table("own1", kind).as_string(pg_conn)
        persistence = pg_conn.execute("SELECT relpersistence FROM pg_class WHERE oid = %s::regclass", (name,))
        assert persistence.fetchone() == ("u",), name
    # staging again replaces what the run staged before
    store.stage_documents(pg_conn, "own1", "c", _docs(1), "m")
    assert store.count_staged_chunks(pg_conn, "own1") == 3
    store.drop_run_staging(pg_conn, "own1")
    assert not store.run_staging_exists(pg_conn, "own1")
    assert store.count_staged_chunks(pg_conn, "own1") == 0 and store.staged_vector_ids(pg_conn, "own1") == []
    assert store.run_staging_exists(pg_conn, "own2")
    # an abandoned run's tables go once it is older than the limit
    pg_conn.execute(
        "UPDATE capstone.staging_runs SET created_at = now() - interval '8 days' WHERE run_key = 'own2'"
    )
    assert store.drop_stale_staging(pg_conn, "other collection") == 0
    assert store.drop_stale_staging(pg_conn, "c") == 1
    assert not store.run_staging_exists(pg_conn, "own2")


def test_long_run_keys_get_distinct_valid_table_names(pg_conn: psycopg.Connection, pg_schema: str) -> None:
    store.ensure_staging(pg_conn)
    first, second = "k" * 100, "k" * 101  # Postgres would truncate both names to the same 63 bytes
    store.stage_documents(pg_conn, first, "c", _docs(1), "m")
    store.stage_documents(pg_conn, second, "c", _docs(2), "m")
    assert (store.count_staged_chunks(pg_conn, first), store.count_staged_chunks(pg_conn, second)) == (3, 6)
    store.drop_run_staging(pg_conn, first)
    store.drop_run_staging(pg_conn, second)


def test_a_merge_missing_staged_chunks_rolls_back(pg_conn: psycopg.Connection, pg_schema: str) -> None:
    table = store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    store.ensure_staging(pg_conn)
    store.ensure_collection_table(pg_conn, table)
    store.stage_documents(pg_conn, "lost", "c", _docs(2), "m")
    _embed_all(pg_conn, table, "lost", store.assign_batches(pg_conn, "lost", table, 10, 1024))
    pg_conn.execute(
        sql.SQL("DELETE FROM {} WHERE id = 'doc1_chunk_1'").format(store.run_table("lost", "chunks"))
    )
    ((first, last, count),) = store.merge_spans(pg_conn, "lost", 100)
    with pytest.raises(store.StagingIncomplete, match="wrote 5 rows where 6 vectors were staged"):
        store.merge_batch(pg_conn, "lost", table, "m", first, last, count)
    assert store.count_vectors(pg_conn, table) == 0
    store.drop_run_staging(pg_conn, "lost")


def test_dimension_mismatch_fails_before_writing(pg_conn: psycopg.Connection, pg_schema: str) -> None:
    store.ensure_collection_table(
        pg_conn, store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    )
    with pytest.raises(store.DimensionMismatch, match=r"dimension 8 .* produces 16"):
        store.ensure_collection_table(
            pg_conn, store.CollectionTable(pg_schema, "chunks", 16, "english", "vector")
        )


def test_merging_new_chunks_again_falls_back_to_the_upsert(
    pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    table = store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    store.ensure_staging(pg_conn)
    store.ensure_collection_table(pg_conn, table)
    store.stage_documents(pg_conn, "again", "c", _docs(4), "m")
    _embed_all(pg_conn, table, "again", store.assign_batches(pg_conn, "again", table, 4, 1024))
    spans = store.merge_spans(pg_conn, "again", 5)
    first = [store.merge_batch(pg_conn, "again", table, "m", a, b, n) for a, b, n in spans]
    # a retry of the task: every span was planned as new, but its rows are in the table now
    again = [store.merge_batch(pg_conn, "again", table, "m", a, b, n) for a, b, n in spans]
    assert first == again == [n for _a, _b, n in spans] and sum(first) == 12
    assert len(_rows(pg_conn, table)) == 12
    store.drop_run_staging(pg_conn, "again")


def test_the_keyword_column_is_generated_from_the_text(pg_conn: psycopg.Connection, pg_schema: str) -> None:
    table = store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    store.ensure_collection_table(pg_conn, table)
    pg_conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, document_id, chunk_index, content, content_hash, embedding_model)"
            " VALUES ('d_chunk_0', 'd', 0, 'Raising exceptions in generators', 'h', 'm')"
        ).format(table.ident)
    )
    row = pg_conn.execute(sql.SQL("SELECT content_tsv::text FROM {}").format(table.ident)).fetchone()

    assert row is not None and row[0] == "'except':2 'generat':4 'rais':1"
    assert store.stored_text_config(pg_conn, table) == "english"
    store.ensure_collection_table(pg_conn, table)  # up to date: nothing to do
    assert store.stored_text_config(pg_conn, table) == "english"


def test_an_unknown_text_search_configuration_names_the_setting_and_the_choices(
    pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    with pytest.raises(
        store.KeywordColumnConflict, match=r"search.text_config 'klingon' .* it has: .*english.*simple"
    ):
        store.ensure_collection_table(
            pg_conn, store.CollectionTable(pg_schema, "chunks", DIM, "klingon", "vector")
        )
    assert (
        store.stored_dimension(pg_conn, store.CollectionTable(pg_schema, "chunks", DIM, "klingon", "vector"))
        is None
    )


def test_a_content_tsv_column_capstone_did_not_create_is_refused(
    pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    table = store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    store.ensure_collection_table(pg_conn, table)
    pg_conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN content_tsv").format(table.ident))
    pg_conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN content_tsv tsvector").format(table.ident))

    with pytest.raises(store.KeywordColumnConflict, match="that capstone did not create"):
        store.ensure_collection_table(pg_conn, table)


def test_an_unknown_text_search_configuration_for_an_existing_table_names_the_setting(
    pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    store.ensure_collection_table(
        pg_conn, store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    )

    with pytest.raises(store.KeywordColumnConflict, match=r"search.text_config 'klingon' .* it has: "):
        store.ensure_collection_table(
            pg_conn, store.CollectionTable(pg_schema, "chunks", DIM, "klingon", "vector")
        )
    assert (
        store.stored_text_config(
            pg_conn, store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
        )
        == "english"
    )


def test_adding_the_keyword_column_drops_the_ann_index_first_and_keeps_the_rows(
    pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    table = store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    store.ensure_staging(pg_conn)
    store.ensure_collection_table(pg_conn, table)
    store.stage_documents(pg_conn, "kw", "c", _docs(4), "m")
    _embed_all(pg_conn, table, "kw", store.assign_batches(pg_conn, "kw", table, 4, 1024))
    for first, last, count in store.merge_spans(pg_conn, "kw", 100):
        store.merge_batch(pg_conn, "kw", table, "m", first, last, count)
    pg_conn.execute(
        sql.SQL("ALTER TABLE {} DROP COLUMN content_tsv").format(table.ident)
    )  # an earlier release
    pg_conn.execute(
        sql.SQL("CREATE INDEX chunks_hnsw_0123abcd ON {} USING hnsw (embedding vector_cosine_ops)").format(
            table.ident
        )
    )
    before = pg_conn.execute(
        sql.SQL("SELECT id, updated_at FROM {} ORDER BY id").format(table.ident)
    ).fetchall()

    store.ensure_collection_table(pg_conn, table)

    after = pg_conn.execute(
        sql.SQL("SELECT id, updated_at FROM {} ORDER BY id").format(table.ident)
    ).fetchall()
    assert after == before and len(after) > 0
    assert store.stored_text_config(pg_conn, table) == "english"
    assert not store.index_is_valid(
        pg_conn, pg_schema, "chunks_hnsw_0123abcd"
    )  # dropped, for the trigger to rebuild
    store.drop_run_staging(pg_conn, "kw")


def test_a_table_of_another_vector_type_fails_before_writing(
    pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    store.ensure_collection_table(
        pg_conn, store.CollectionTable(pg_schema, "chunks", DIM, "english", "vector")
    )
    with pytest.raises(
        store.VectorTypeMismatch, match=r"as vector .* resolves to halfvec: set store.vector_type to vector"
    ):
        store.ensure_collection_table(
            pg_conn, store.CollectionTable(pg_schema, "chunks", DIM, "english", "halfvec")
        )


def test_a_halfvec_table_takes_the_staged_vectors(pg_conn: psycopg.Connection, pg_schema: str) -> None:
    table = store.CollectionTable(pg_schema, "halves", DIM, "english", "halfvec")

    assert _index(pg_conn, table, "half", _docs(3)) == 9

    row = pg_conn.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = %s::regclass AND attname = 'embedding'",
        (f"{pg_schema}.halves",),
    ).fetchone()
    assert row == (f"halfvec({DIM})",) and store.stored_vector_type(pg_conn, table) == "halfvec"
    assert store.count_vectors(pg_conn, table) == 9
