"""Documents deleted upstream leave the collection: tombstones from a Postgres batch table.

(The JSONL path, under ``dag.test()``, is in ``test_pipeline_dag.py``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from capstone.pipeline import run_key_for
from tests.support.pipeline import run_pipeline
from tests.support.settings import collection_settings
from tests.support.tables import assert_table_holds_exactly, jsonl_batch


def _document(doc_id: str, chunks: list[str]) -> dict[str, Any]:
    return {"id": doc_id, "content": f"document {doc_id}", "chunks": chunks, "metadata": {}}


def test_a_postgres_batch_deletes_documents_through_its_deleted_column(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    # 7 of 12 rows go: above the mass-delete guard's default, which test_guards.py covers.
    settings = collection_settings(
        "tombs", pg_schema, "docs", embedding={"dimension": 32}, store={"max_delete_fraction": 1.0}
    )
    first = [_document(f"d{i}", [f"document {i} chunk {j}" for j in range(3)]) for i in range(4)]
    run_pipeline(settings, run_key_for("tombs", "1"), [jsonl_batch(tmp_path / "first.jsonl", first)])
    table = sql.Identifier(pg_schema, "enriched")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (batch_id text, id text, content text, chunks jsonb, metadata jsonb,"
                " deleted boolean)"
            ).format(table)
        )
        rows = [
            ("d1", None, None, None, True),  # deleted: only the id is needed
            ("d2", "document d2", Jsonb(["d2 rewritten"]), Jsonb({}), False),
            ("d3", "document d3", Jsonb(["d3 rewritten"]), Jsonb({}), None),  # NULL: not deleted
        ]
        for row in rows:
            conn.execute(sql.SQL("INSERT INTO {} VALUES ('b2', %s, %s, %s, %s, %s)").format(table), row)

    result = run_pipeline(
        settings,
        run_key_for("tombs", "2"),
        [{"format": "postgres", "table": f"{pg_schema}.enriched", "batch_id": "b2"}],
    )

    assert (result["upserted"], result["deleted"]) == (2, 3 + 2 + 2)  # all of d1, 2 lost each of d2/d3
    expected = [first[0], _document("d2", ["d2 rewritten"]), _document("d3", ["d3 rewritten"])]
    assert_table_holds_exactly(pg_dsn, pg_schema, "docs", expected, model="hash-v1", dimension=32)
