"""Vectors above pgvector's 2,000-dimension index limit: a 3,072-dimension model (OpenAI's
``text-embedding-3-large``, here the fake OpenAI server) is stored and indexed as ``halfvec``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql

from capstone.embeddings.hashing import HashEmbedder
from capstone.local.corpus import reference_documents
from capstone.search import search_collection
from tests.support.airflow import run_collection, task_states, write_collection, xcom_value
from tests.support.fake_openai import running_fake_openai_server
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
            (f"{pg_schema}.large_model",),
        ).fetchone()
        definition = conn.execute(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE indrelid = %s::regclass AND c.relname = %s",
            (
                f"{pg_schema}.large_model",
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
