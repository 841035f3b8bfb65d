"""Batches in object storage: read through Airflow's ObjectStoragePath from a real S3-protocol
server (moto) with the real Amazon provider and s3fs client, as a stream, failing clearly."""

from __future__ import annotations

import json
import tracemalloc
import uuid
from pathlib import Path

import pytest

from capstone import pipeline
from capstone.connections import ConnectionNotDefined
from capstone.documents import (
    BatchLocation,
    BatchNotFound,
    InvalidBatchLocation,
    read_batch,
)
from capstone.errors import is_terminal
from capstone.pipeline import run_key_for
from dag_factory.local.services import S3_BUCKET, S3Server
from tests.conftest import S3_CONNECTION_ID
from tests.support.settings import collection_settings


def _put(server: S3Server, lines: list[bytes | dict[str, object]]) -> str:
    key = f"tests/{uuid.uuid4().hex}.jsonl"
    body = b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )
    server.client().put_object(Bucket=S3_BUCKET, Key=key, Body=body)
    return f"s3://{S3_BUCKET}/{key}"


def _location(uri: str, conn_id: str | None = S3_CONNECTION_ID) -> BatchLocation:
    return BatchLocation.from_extra({"format": "jsonl", "path": uri, "conn_id": conn_id})


def test_a_batch_in_s3_is_staged_with_line_numbers_in_its_rejections(
    s3_server: S3Server, pg_schema: str
) -> None:
    uri = _put(
        s3_server,
        [
            {"id": "a", "content": "alpha", "chunks": ["alpha one", "alpha two"]},
            {"id": "b", "content": "beta", "chunks": ["beta"]},
            b"{not json",
            {"id": "c", "content": "gamma", "chunks": []},
            {"id": "a-gone", "deleted": True},
        ],
    )
    settings = collection_settings(
        "s3batch", pg_schema, "docs", embedding={"dimension": 8}, source={"max_rejected_fraction": 0.5}
    )
    loaded = pipeline.load_documents(settings, run_key_for("s3batch", "1"), [_location(uri)])

    assert (loaded["documents"], loaded["chunks"], loaded["deleted_documents"]) == (2, 3, 1)
    name = uri.rsplit("/", 1)[-1]
    assert {item["source"] for item in loaded["rejected"]} == {f"{name}:3", f"{name}:4"}
    assert loaded["sources"] == [f"{uri} (connection {S3_CONNECTION_ID})"]


def test_reading_a_large_object_keeps_memory_flat(s3_server: S3Server) -> None:
    line: dict[str, object] = {"id": "x", "content": "c" * 2000, "chunks": ["c" * 2000]}
    uri = _put(s3_server, [line] * 12_000)  # ~48 MB
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_batch(_location(uri)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 12_000
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB while streaming a 48 MB object"


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (f"s3://{S3_BUCKET}/no/such/key.jsonl", "does not exist"),
        ("s3://capstone-no-such-bucket/key.jsonl", "bucket does not exist"),
    ],
)
def test_a_missing_object_or_bucket_is_terminal_and_says_where(
    s3_server: S3Server, where: str, expected: str
) -> None:
    with pytest.raises(BatchNotFound, match=expected) as raised:
        list(read_batch(_location(where)))
    assert is_terminal(raised.value)
    assert where in str(raised.value) and S3_CONNECTION_ID in str(raised.value)


def test_an_undefined_storage_connection_is_terminal_with_the_fix(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("capstone.connections.LOOKUP_PAUSE_SECONDS", 0.0)
    with pytest.raises(ConnectionNotDefined, match=r"--conn-uri aws://") as raised:
        list(read_batch(_location(f"s3://{S3_BUCKET}/x.jsonl", conn_id="no_such_storage")))
    assert is_terminal(raised.value)


def test_a_scheme_without_its_provider_names_the_package_to_install() -> None:
    with pytest.raises(InvalidBatchLocation, match="apache-airflow-providers-google") as raised:
        list(read_batch(_location("gs://bucket/batch.jsonl", conn_id=None)))
    assert is_terminal(raised.value)


def test_file_uris_and_plain_paths_read_the_same(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"id": "a", "content": "x", "chunks": ["x"]}\n\n{"id": "b"}')
    plain = list(read_batch(_location(str(path), conn_id=None)))
    uri = list(read_batch(_location(path.as_uri(), conn_id=None)))
    assert plain == uri
    assert [where for where, _ in plain] == ["b.jsonl:1", "b.jsonl:3"]
