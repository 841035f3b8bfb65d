"""Vectors above pgvector's 2,000-dimension index limit: a 3,072-dimension model (OpenAI's
``text-embedding-3-large``, here the fake OpenAI server) is stored and indexed as ``halfvec``."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from capstone import store
from capstone.contracts import UpsertResult
from capstone.embeddings.hashing import HashEmbedder
from capstone.index_build import IndexParams, build_index
from capstone.local.corpus import reference_documents
from capstone.registry import lookup
from capstone.search import SearchTarget, ann_search, ann_session, search_collection
from capstone.validation import validate_collection
from tests.support.airflow import run_collection, task_states, write_collection, xcom_value
from tests.support.fake_openai import running_fake_openai_server
from tests.support.settings import collection_settings
from tests.support.tables import jsonl_batch

pytestmark = pytest.mark.usefixtures("airflow_db")

DIMENSION = 3072
QUERY = "try statement exception handlers finally clause"


def test_a_3072_dimension_model_is_stored_indexed_and_validated_as_halfvec(
    tmp_path: Path, pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    documents = [
        doc for doc in reference_documents() if doc["id"] in {"try", "with", "for", "while", "yield"}
    ]
    with running_fake_openai_server(native_dimension=DIMENSION) as server:
        monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
        spec = write_collection(
            tmp_path / "configs",
            "large_model",
            pg_schema,
            embedding={
                "provider": "openai",
                "model": "text-embedding-3-large",
                "dimension": DIMENSION,
                "base_url": server.base_url,
                "batch_size": 50,
            },
            search={"mode": "vector"},
            validation={
                "sample_queries": [{"id": "try", "query": QUERY, "expected_document_id": "try"}],
                "fail_on": ["vector_count", "query_relevance", "recall", "freshness"],
            },
        )
        run = run_collection(spec, [jsonl_batch(tmp_path / "batch.jsonl", documents)])
        hits = search_collection("large_model", QUERY, k=3, dsn=pg_dsn)

    assert str(run.state) == "success", task_states("large_model", run.run_id)
    with psycopg.connect(pg_dsn) as conn:
        column = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attname = 'embedding'",
            (f"{pg_schema}.large_model__v1",),  # the collection's first version, behind the view
        ).fetchone()
        definition = conn.execute(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE indrelid = %s::regclass AND c.relname = %s",
            (
                f"{pg_schema}.large_model__v1",
                xcom_value("large_model", run.run_id, "wait_for_indexing")["index_name"],
            ),
        ).fetchone()
        stored = conn.execute(
            sql.SQL("SELECT content, embedding::vector::text FROM {} ORDER BY id LIMIT 3").format(
                sql.Identifier(pg_schema, "large_model")
            )
        ).fetchall()
    assert column == (f"halfvec({DIMENSION})",)
    assert definition is not None and "USING hnsw (embedding halfvec_cosine_ops)" in definition[0]
    report: dict[str, Any] = xcom_value("large_model", run.run_id, "validate_index_health")
    assert report["summary"]["failed"] == [] and report["summary"]["recall"] >= 0.9
    assert {report["checks"][name]["status"] for name in report["checks"]} == {"pass"}
    assert hits[0].document_id == "try" and hits[0].distance is not None
    # 2-byte floats: each stored component within half-precision rounding of the model's vector
    want = HashEmbedder(dimension=DIMENSION).embed([content for content, _ in stored])
    got = np.array([[float(x) for x in text.strip("[]").split(",")] for _, text in stored])
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_a_binary_quantized_index_is_built_by_the_dag_and_searches_re_rank_by_the_full_vectors(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    corpus = reference_documents()
    spec = write_collection(
        tmp_path / "configs",
        "bits",
        pg_schema,
        embedding={"dimension": 256},
        index={"quantization": "binary", "rerank_candidates": 100},
        search={"mode": "vector"},
    )
    run = run_collection(spec, [jsonl_batch(tmp_path / "batch.jsonl", corpus)])

    assert str(run.state) == "success", task_states("bits", run.run_id)
    report: dict[str, Any] = xcom_value("bits", run.run_id, "validate_index_health")
    assert report["index"]["usable"], report["index"]  # the plan scans the bit index
    with psycopg.connect(pg_dsn) as conn:
        definition = conn.execute(
            "SELECT pg_get_indexdef(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s",
            (pg_schema, report["index"]["name"]),
        ).fetchone()
        target = SearchTarget.of(lookup(conn, "bits"))
    assert definition is not None
    assert "hnsw (((binary_quantize(embedding))::bit(256)) bit_hamming_ops)" in definition[0]
    assert target.binary_rerank == 100
    queries = HashEmbedder(dimension=256).embed([doc["content"][:200] for doc in corpus[:10]])
    with psycopg.connect(pg_dsn) as conn:
        register_vector(conn)
        for query in queries:
            with ann_session(conn, target):
                hits = ann_search(conn, target, query, 5)
            distances = [hit.vector_distance for hit in hits]
            assert len(hits) == 5 and distances == sorted(distances)  # ordered by the exact distance


def test_binary_quantization_with_a_re_rank_keeps_recall_on_dense_embeddings(
    pg_dsn: str, pg_schema: str
) -> None:
    # Embeddings of real models are dense and low-rank; the hash provider's sparse vectors are not,
    # and their sign bits say little (recall@10 ~0.35 with 100 candidates of 733 chunks).
    rows, dimension = 3000, 256
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((rows, 16)) @ rng.standard_normal((16, dimension))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    settings = collection_settings(
        "dense",
        pg_schema,
        embedding={"dimension": dimension},
        index={"quantization": "binary", "rerank_candidates": 100},
        search={"mode": "vector"},
        validation={"fail_on": ["vector_count", "recall"]},
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        store.ensure_collection_table(conn, settings.store_table)
        register_vector(conn)
        with conn.cursor().copy(
            sql.SQL(
                "COPY {} (id, document_id, chunk_index, content, content_hash, embedding, embedding_model)"
                " FROM STDIN (FORMAT BINARY)"
            ).format(settings.store_table.ident)
        ) as copy:
            copy.set_types(["text", "text", "int4", "text", "text", "vector", "text"])
            for number, vector in enumerate(vectors):
                copy.write_row(
                    (f"d{number}_chunk_0", f"d{number}", 0, f"row {number}", "h", vector, "hash-v1")
                )
    event = asyncio.run(
        build_index(pg_dsn, IndexParams.of(settings), rows, 0.1, 120.0, logging.getLogger("test.bits"))
    )

    written: UpsertResult = {
        "run_key": "dense",
        "upserted": rows,
        "failed": 0,
        "deleted": 0,
        "batches": 1,
        "expected_count": rows,
    }
    report = validate_collection(settings, written, event)

    assert event["status"] == "success" and report["index"]["usable"]
    assert report["checks"]["recall_at_k"]["recall"] >= 0.95, report["checks"]["recall_at_k"]
