"""Upstream demo DAG (airflow): stands in for the LLM enrichment pipeline.

It turns the Python language reference that ships with Python (``pydoc_data.topics``) into
enriched documents with chunks and metadata, writes them as a JSONL batch, and emits
``Asset("documents.enriched")`` whose event extra says where the batch is. That event schedules
the ``documents`` collection DAG.

Where the batch goes: a local file under ``$CAPSTONE_BATCH_DIR`` (default ``<data>/batches``), or,
when ``CAPSTONE_BATCH_URI`` is set (say ``s3://capstone-batches/enriched``), an object under it
written with the Airflow connection ``CAPSTONE_BATCH_CONN_ID`` (the distributed local stack sets
both: its workers share no disk). A run's conf may ask for ``copies`` of the corpus (ids suffixed)
and a ``revision`` (every chunk marked with it, so that every chunk is new to the collection).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, dag, get_current_context, task

ENRICHED = Asset("documents.enriched")


def _batch_dir() -> Path:
    data = Path(os.environ.get("CAPSTONE_DATA_DIR", Path(__file__).resolve().parent.parent / ".data"))
    return Path(os.environ.get("CAPSTONE_BATCH_DIR", data / "batches"))


@dag(dag_id="enrich_documents", schedule=None, catchup=False, tags=["demo", "capstone"])
def enrich_documents() -> None:
    """Write the language reference as a batch of enriched documents and announce it."""

    @task(outlets=[ENRICHED])
    def write_enriched_batch() -> dict[str, Any]:
        """Chunk every topic, write the batch atomically, put its location in the event extra."""
        from capstone.local.corpus import reference_documents, write_jsonl_batch, write_jsonl_object

        context = get_current_context()
        # A run's conf may ask for the corpus several times over (ids suffixed), for load tests.
        copies = int((context["dag_run"].conf or {}).get("copies", 1))
        documents = [
            {**doc, "id": doc["id"] if copy == 0 else f"{doc['id']}~{copy}"}
            for copy in range(copies)
            for doc in reference_documents()
        ]
        revision = (context["dag_run"].conf or {}).get("revision")
        if revision is not None:
            for doc in documents:
                doc["chunks"] = [f"{chunk} (revision {revision})" for chunk in doc["chunks"]]
        batch_id = re.sub(r"[^A-Za-z0-9_.-]", "_", context["run_id"])
        name = f"documents-{batch_id}.jsonl"
        extra: dict[str, Any] = {"format": "jsonl"}
        if os.environ.get("CAPSTONE_BATCH_URI"):
            conn_id = os.environ.get("CAPSTONE_BATCH_CONN_ID") or None
            uri = f"{os.environ['CAPSTONE_BATCH_URI'].rstrip('/')}/{name}"
            extra |= {"path": write_jsonl_object(documents, uri, conn_id), "conn_id": conn_id}
        else:
            extra["path"] = str(write_jsonl_batch(documents, _batch_dir() / name))
        extra |= {
            "batch_id": batch_id,
            "documents": len(documents),
            "chunks": sum(len(doc["chunks"]) for doc in documents),
        }
        context["outlet_events"][ENRICHED].extra = extra
        return extra

    write_enriched_batch()


enrich_documents()
