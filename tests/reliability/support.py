"""What the reliability tests share: the exact table a set of documents must produce, a fault-plan
OpenAI fake, a private Postgres server, and running the pipeline's task functions by hand."""

from __future__ import annotations

import io
import json
import random
import socket
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from capstone.contracts import EmbeddingTotals, UpsertResult
from capstone.documents import BatchLocation
from capstone.embeddings.hashing import HashEmbedder
from capstone.pipeline import (
    NothingToIndex,
    aggregate_manifests,
    embed_batch,
    load_documents,
    prepare_chunks,
    upsert_vectors,
)
from capstone.settings import CollectionSettings
from tests.fakes.openai_server import FakeOpenAIServer, Fault, FaultKind, RecordedRequest, _EmbeddingsHandler

__all__ = [
    "PRIVATE_CONNECTION_ID",
    "FaultPlanServer",
    "StoredChunk",
    "assert_table_holds_exactly",
    "expected_chunks",
    "free_port",
    "jsonl_batch",
    "run_pipeline",
    "run_until_upsert",
    "running_fault_plan_server",
    "stored_chunks",
]

# The Airflow connection id of the private Postgres server (see the ``private_pg`` fixture).
PRIVATE_CONNECTION_ID = "faulty_pg"


# -- the table a collection must end with -----------------------------------------------------


@dataclass(frozen=True)
class StoredChunk:
    """One row of a collection table, as the tests compare it."""

    document_id: str
    chunk_index: int
    content: str
    metadata: dict[str, Any]
    embedding_model: str


def stored_chunks(dsn: str, schema: str, table: str) -> tuple[dict[str, StoredChunk], dict[str, np.ndarray]]:
    """Every row of the table by id, and its vector (rows without a vector have none)."""
    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        rows = conn.execute(
            sql.SQL(
                "SELECT id, document_id, chunk_index, content, metadata, embedding_model, embedding FROM {}"
            ).format(sql.Identifier(schema, table))
        ).fetchall()
    chunks = {row[0]: StoredChunk(*row[1:6]) for row in rows}
    assert len(chunks) == len(rows), "duplicate ids in the collection table"
    vectors = {row[0]: np.asarray(row[6].to_numpy(), dtype=np.float32) for row in rows if row[6] is not None}
    return chunks, vectors


def expected_chunks(documents: Sequence[dict[str, Any]], model: str) -> dict[str, StoredChunk]:
    """The rows the pipeline must store for ``documents`` (all valid, ids unique)."""
    return {
        f"{doc['id']}_chunk_{index}": StoredChunk(doc["id"], index, text, doc.get("metadata") or {}, model)
        for doc in documents
        for index, text in enumerate(doc["chunks"])
    }


def assert_table_holds_exactly(
    dsn: str,
    schema: str,
    table: str,
    documents: Sequence[dict[str, Any]],
    *,
    model: str,
    dimension: int,
    missing: Collection[str] = (),
) -> None:
    """The table holds one row per chunk of ``documents`` (but the ``missing`` chunk ids) and
    nothing else, each with its own vector.

    The hash embedder (also behind the fake OpenAI server) is deterministic, so every stored vector
    is compared with the vector of its own text: a vector written under another chunk's id fails.
    """
    chunks, vectors = stored_chunks(dsn, schema, table)
    expected = {i: chunk for i, chunk in expected_chunks(documents, model).items() if i not in missing}
    assert sorted(chunks) == sorted(expected)
    assert chunks == expected
    assert sorted(vectors) == sorted(expected), "rows without a vector"
    ids = sorted(expected)
    want = HashEmbedder(dimension=dimension).embed([expected[i].content for i in ids])
    got = np.stack([vectors[i] for i in ids])
    np.testing.assert_allclose(got, want, atol=1e-6)


def jsonl_batch(path: Path, lines: Sequence[bytes | dict[str, Any]]) -> dict[str, Any]:
    """Write a JSONL batch (dicts as JSON, bytes verbatim) and return its asset event extra."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for line in lines:
            data = line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode()
            handle.write(data + b"\n")
    return {"format": "jsonl", "path": str(path)}


# -- the pipeline's tasks, called by hand -----------------------------------------------------


def run_until_upsert(
    settings: CollectionSettings, run_key: str, batches: Sequence[dict[str, Any]]
) -> EmbeddingTotals | None:
    """Run load -> prepare -> embed (every batch) -> aggregate; the aggregate to upsert, or None.

    None when the batches hold nothing new (the DAG would skip the rest of the run).
    """
    load_documents(settings, run_key, [BatchLocation.from_extra(extra) for extra in batches])
    try:
        prepared = prepare_chunks(settings, run_key, max_batches=1024)
    except NothingToIndex:
        return None
    manifests = [embed_batch(settings, run_key, descriptor) for descriptor in prepared["batches"]]
    return aggregate_manifests(prepared["summary"], manifests)


def run_pipeline(
    settings: CollectionSettings, run_key: str, batches: Sequence[dict[str, Any]]
) -> UpsertResult:
    """The whole write path of one run (no index build); returns the upsert's result."""
    aggregate = run_until_upsert(settings, run_key, batches)
    assert aggregate is not None, "nothing to index"
    return upsert_vectors(settings, aggregate)


# -- a fake OpenAI server with a richer fault plan -------------------------------------------


class FaultPlanServer(FakeOpenAIServer):
    """The fake OpenAI server, plus two faults its own plan lacks.

    * ``mixed_failure_rate``: each call fails with that probability, as a 429 with Retry-After,
      a 500 with Retry-After or a hang past the client's timeout (seeded: the same calls fail on
      every run that makes its calls in the same order, as ``dag.test()`` does);
    * ``poison_marker``: every call with an input containing the marker fails with a 500, so the
      batch holding that text fails however often it is retried.
    """

    def __init__(self, *, seed: int = 0, **options: Any) -> None:
        super().__init__(seed=seed, **options)
        self.mixed_failure_rate = 0.0
        self.mixed_retry_after = 0.05
        self.poison_marker: str | None = None
        self._mixed_rng = random.Random(seed)
        self._mixed_lock = threading.Lock()
        self._httpd.RequestHandlerClass = _poison_aware_handler(self)

    def next_fault(self) -> Fault | None:
        planned = super().next_fault()
        if planned is not None:
            return planned
        with self._mixed_lock:
            if self._mixed_rng.random() >= self.mixed_failure_rate:
                return None
            kind: FaultKind = self._mixed_rng.choice(["429", "500", "hang"])
        return Fault(kind, None if kind == "hang" else self.mixed_retry_after)

    def poisoned(self, inputs: Sequence[str]) -> bool:
        """True when the call must fail because of the poison marker."""
        marker = self.poison_marker
        return marker is not None and any(marker in text for text in inputs)

    def failed_requests(self) -> list[RecordedRequest]:
        """Embedding calls answered with an error, or not at all (status 0: a hang)."""
        return [request for request in self.embedding_requests() if request.status != 200]

    def answered_texts(self) -> list[str]:
        """Every input of every successful embedding call (a text twice: embedded twice)."""
        return [
            text for request in self.embedding_requests() if request.status == 200 for text in request.inputs
        ]


def _poison_aware_handler(server: FaultPlanServer) -> type[_EmbeddingsHandler]:
    class Handler(_EmbeddingsHandler):
        fake = server

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                inputs = json.loads(body).get("input") or []
            except (json.JSONDecodeError, AttributeError):
                inputs = []
            if isinstance(inputs, str):
                inputs = [inputs]
            if server.poisoned(inputs):
                recorded = {
                    "inputs": inputs,
                    "retry_count": _int(self.headers.get("x-stainless-retry-count")),
                }
                return self._fail(Fault("500", 0.01), recorded)
            self.rfile = io.BytesIO(body)  # let the fake's own handler read the body again
            return super().do_POST()

    return Handler


def _int(value: str | None) -> int | None:
    return int(value) if value is not None else None


@contextmanager
def running_fault_plan_server(**options: Any) -> Iterator[FaultPlanServer]:
    """A started :class:`FaultPlanServer`, stopped on exit (a hanging call is released)."""
    server = FaultPlanServer(**options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- a private Postgres ----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
