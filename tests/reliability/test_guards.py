"""Guards on what one run may do: a batch that is mostly rejects, a run that would empty the table.

Both fail the run on its first try, before anything is written, with the numbers; the mass
delete goes ahead when the run's conf allows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from capstone import store
from tests.support.airflow import run_collection, task_states, try_numbers, write_collection, xcom_value
from tests.support.tables import assert_table_holds_exactly, jsonl_batch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("airflow_db")]

RETRIES = {"retries": 2, "retry_delay_seconds": 0}


def _documents(count: int, chunks: int = 2) -> list[dict[str, Any]]:
    return [
        {
            "id": f"doc-{i:03d}",
            "content": f"document {i}",
            "chunks": [f"doc {i} part {j}" for j in range(chunks)],
        }
        for i in range(count)
    ]


def _staging_runs(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM capstone.staging_runs").fetchone()
    return int(row[0]) if row else 0


def test_a_batch_that_is_not_jsonl_fails_before_anything_is_written(
    tmp_path: Path, pg_dsn: str, pg_schema: str, capfd: pytest.CaptureFixture[str]
) -> None:
    spec = write_collection(tmp_path / "configs", "not_jsonl", pg_schema, dag=RETRIES)
    csv = tmp_path / "export.csv"
    csv.write_text("id,content,chunks\n" + "".join(f"doc-{i},text {i},chunk {i}\n" for i in range(24)))
    staging_before = _staging_runs(pg_dsn)

    run = run_collection(spec, [{"format": "jsonl", "path": str(csv)}])
    logs = "".join(capfd.readouterr())

    assert str(run.state) == "failed"
    assert try_numbers("not_jsonl", run.run_id, "load_enriched_documents") == [1]
    assert f"batch {csv}: 25 of 25 documents were rejected" in logs
    assert "more than source.max_rejected_fraction (0.5)" in logs
    assert "export.csv:1: invalid JSON" in logs  # the first reasons, with file:line
    assert _staging_runs(pg_dsn) == staging_before, "the run's staging was left behind"
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT to_regclass(%s)", (f"{pg_schema}.not_jsonl",)).fetchone() == (None,)


def test_a_few_bad_documents_stay_under_the_guard(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    spec = write_collection(
        tmp_path / "configs", "few_bad", pg_schema, source={"max_rejected_fraction": 0.25}
    )
    good = _documents(6)
    batch = jsonl_batch(tmp_path / "b.jsonl", [*good, b"not json", {"id": "empty", "chunks": []}])

    run = run_collection(spec, [batch])

    assert str(run.state) == "success", task_states("few_bad", run.run_id)  # 2 of 8 is 0.25: allowed
    assert xcom_value("few_bad", run.run_id, "load_enriched_documents")["rejected_count"] == 2
    assert_table_holds_exactly(pg_dsn, pg_schema, "few_bad", good, model="hash-v1", dimension=64)


def test_the_same_batch_sent_twice_is_not_mistaken_for_a_broken_one(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    spec = write_collection(tmp_path / "configs", "sent_twice", pg_schema, dag=RETRIES)
    documents = _documents(5)
    batch = jsonl_batch(tmp_path / "b.jsonl", documents)

    run = run_collection(spec, [batch, batch])  # an upstream retry: two events, one file

    assert str(run.state) == "success", task_states("sent_twice", run.run_id)
    assert_table_holds_exactly(pg_dsn, pg_schema, "sent_twice", documents, model="hash-v1", dimension=64)


def test_a_run_that_would_delete_most_of_the_collection_stops_unless_its_conf_allows_it(
    tmp_path: Path, pg_dsn: str, pg_schema: str, capfd: pytest.CaptureFixture[str]
) -> None:
    spec = write_collection(tmp_path / "configs", "mass_delete", pg_schema, dag=RETRIES)
    documents = _documents(10)
    assert str(run_collection(spec, [jsonl_batch(tmp_path / "v1.jsonl", documents)]).state) == "success"
    # An upstream bug: tombstones for 6 of the 10 documents (12 of 20 rows).
    tombstones = jsonl_batch(
        tmp_path / "v2.jsonl", [{"id": doc["id"], "deleted": True} for doc in documents[:6]]
    )

    refused = run_collection(spec, [tombstones])
    logs = "".join(capfd.readouterr())

    assert str(refused.state) == "failed"
    assert try_numbers("mass_delete", refused.run_id, "prepare_chunks") == [1]
    assert task_states("mass_delete", refused.run_id)["generate_embedding"] != ["success"]
    assert f"would delete 12 of the 20 rows of {pg_schema}.mass_delete (60%" in logs
    assert '"allow_mass_delete": true}' in logs
    assert_table_holds_exactly(pg_dsn, pg_schema, "mass_delete", documents, model="hash-v1", dimension=64)

    allowed = run_collection(spec, [tombstones], allow_mass_delete=True)

    assert str(allowed.state) == "success", task_states("mass_delete", allowed.run_id)
    assert xcom_value("mass_delete", allowed.run_id, "batch_upsert_vectors")["deleted"] == 12
    assert_table_holds_exactly(pg_dsn, pg_schema, "mass_delete", documents[6:], model="hash-v1", dimension=64)


def test_the_delete_guard_counts_chunks_documents_lost_too(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    spec = write_collection(
        tmp_path / "configs", "emptied", pg_schema, store={"max_delete_fraction": 0.3}, dag=RETRIES
    )
    documents = _documents(4, chunks=5)
    assert str(run_collection(spec, [jsonl_batch(tmp_path / "v1.jsonl", documents)]).state) == "success"
    shrunk = [{**doc, "chunks": doc["chunks"][:1]} for doc in documents[:2]]  # 8 of 20 rows lost: 40%

    refused = run_collection(spec, [jsonl_batch(tmp_path / "v2.jsonl", shrunk)])

    assert str(refused.state) == "failed"
    assert try_numbers("emptied", refused.run_id, "prepare_chunks") == [1]
    with psycopg.connect(pg_dsn) as conn:
        table = store.CollectionTable(pg_schema, "emptied", 64, "english", "vector")
        assert store.count_vectors(conn, table) == 20
