"""A collection on a Postgres that admits its user over TLS only, as managed Postgres services do.

The server is a private embedded Postgres with a CA and a server certificate generated here, and
a ``pg_hba.conf`` that accepts ``indexer`` over TLS only (``hostssl``) and rejects it otherwise.
The whole DAG runs with ``sslmode=verify-full`` (psycopg in the tasks, asyncpg in the trigger);
with ``sslmode=disable`` the run fails on its first try with a message that says TLS is required.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from psycopg import sql

from capstone.connections import PostgresConnectionRefused, PostgresParams, connect
from capstone.index_build import build_index
from capstone.local.embedded_pg import EmbeddedPostgres, ServerTls
from tests.support.airflow import (
    asset_events,
    run_collection,
    task_states,
    try_numbers,
    write_collection,
    xcoms,
)
from tests.support.postgres import free_port
from tests.support.settings import index_params
from tests.support.tables import assert_table_holds_exactly, jsonl_batch
from tests.support.tls_postgres import tls_capable_install

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("airflow_db")]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
USER = "indexer"
DATABASE = "tls_vectors"
CONNECTION_ID = "tls_store"


@dataclass(frozen=True)
class TlsServer:
    server: EmbeddedPostgres
    password: str
    ca_file: Path
    other_ca_file: Path  # a CA that did not sign the server's certificate

    def uri(self, **options: str) -> str:
        query = "&".join(f"{key}={quote(value, safe='')}" for key, value in options.items())
        return (
            f"postgresql://{USER}:{quote(self.password, safe='')}@127.0.0.1:{self.server.port}/{DATABASE}"
            + (f"?{query}" if query else "")
        )

    def verify_full(self) -> str:
        return self.uri(sslmode="verify-full", sslrootcert=str(self.ca_file))


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_ca(folder: Path, name: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key, now = _key(), datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def _write_server_cert(
    folder: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    key, now = _key(), datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = folder / "server.crt", folder / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A private Postgres admitting ``indexer`` over TLS only; its connection is ``tls_store``."""
    root = tmp_path_factory.mktemp("tls_pg")
    certs = root / "certs"
    certs.mkdir()
    ca_file, ca, ca_key = _write_ca(certs, "test-ca")
    other_ca_file, _, _ = _write_ca(certs, "other-ca")
    cert_file, key_file = _write_server_cert(certs, ca, ca_key)
    server = EmbeddedPostgres(
        root=root,
        port=free_port(),
        settings={"shared_buffers": "32MB", "max_connections": "40"},
        tls=ServerTls(cert_file=cert_file, key_file=key_file),
        install=tls_capable_install(PROJECT_ROOT / ".data"),
        hba_rules=(
            "local all all trust",
            f"hostssl all {USER} 127.0.0.1/32 scram-sha-256",
            f"host all {USER} 127.0.0.1/32 reject",
            "host all postgres 127.0.0.1/32 scram-sha-256",
        ),
    ).start()
    password = secrets.token_urlsafe(18)
    with psycopg.connect(server.uri("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(USER), password))
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE), sql.Identifier(USER))
        )
    with psycopg.connect(server.uri(DATABASE), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
    try:
        yield TlsServer(server, password, ca_file, other_ca_file)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _documents(count: int) -> list[dict[str, object]]:
    return [
        {
            "id": f"doc-{i}",
            "content": f"doc {i}",
            "chunks": [f"encrypted in transit {i} part {j}" for j in range(3)],
        }
        for i in range(count)
    ]


def _collection(configs: Path, name: str, retries: int = 0) -> Path:
    return write_collection(
        configs,
        name,
        "public",
        store={"connection_id": CONNECTION_ID, "schema": "public", "table": name},
        dag={"retries": retries, "retry_delay_seconds": 0},
    )


def test_a_whole_dag_runs_with_verify_full_and_keeps_the_password_to_itself(
    tls_server: TlsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONNECTION_ID.upper()}", tls_server.verify_full())
    documents = _documents(30)
    spec = _collection(tmp_path / "configs", "tls_docs")

    run = run_collection(spec, [jsonl_batch(tmp_path / "batch.jsonl", documents)])
    output = capfd.readouterr()

    states = task_states("tls_docs", run.run_id)
    assert str(run.state) == "success", states
    assert states["wait_for_indexing"] == ["success"]  # the trigger's asyncpg connections used TLS too
    admin = tls_server.server.uri(DATABASE)
    assert_table_holds_exactly(admin, "public", "tls_docs", documents, model="hash-v1", dimension=64)
    with psycopg.connect(admin) as conn:
        valid = conn.execute(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = 'public.tls_docs__v1'::regclass AND i.indisvalid"  # behind the view
            " AND c.relname LIKE 'tls_docs\\_\\_v1\\_hnsw\\_%'"
        ).fetchone()
    assert valid == (1,)
    places = {
        "task output": output.out + output.err,
        "xcoms": json.dumps([value for *_, value in xcoms("tls_docs", run.run_id)], default=str),
        "asset events": json.dumps(asset_events("tls_docs.indexed"), default=str),
    }
    assert "batch_upsert_vectors" in places["task output"]
    assert [place for place, text in places.items() if tls_server.password in text] == []


def test_the_connections_of_a_run_are_encrypted(tls_server: TlsServer) -> None:
    params = PostgresParams.from_dsn(tls_server.verify_full())
    with connect(params, application_name="tls check") as conn:
        row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row is not None and row[0] is True and str(row[1]).startswith("TLS")


def test_without_tls_the_run_fails_at_once_saying_the_server_requires_it(
    tls_server: TlsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONNECTION_ID.upper()}", tls_server.uri(sslmode="disable"))
    spec = _collection(tmp_path / "configs", "tls_refused", retries=3)

    run = run_collection(spec, [jsonl_batch(tmp_path / "batch.jsonl", _documents(3))])
    logs = "".join(capfd.readouterr())

    assert str(run.state) == "failed"
    assert task_states("tls_refused", run.run_id)["load_enriched_documents"] == ["failed"]
    assert try_numbers("tls_refused", run.run_id, "load_enriched_documents") == [1]  # 3 retries unused
    assert "no pg_hba.conf rule admits this connection without TLS" in logs
    assert "set sslmode=require or verify-full" in logs
    assert tls_server.password not in logs


def test_psycopg_and_asyncpg_alike_refuse_a_server_certificate_of_another_ca(tls_server: TlsServer) -> None:
    params = PostgresParams.from_dsn(
        tls_server.uri(sslmode="verify-full", sslrootcert=str(tls_server.other_ca_file))
    )
    with pytest.raises(PostgresConnectionRefused, match="certificate"):
        connect(params, application_name="tls check")

    index = index_params("public", "tls_docs")
    event = asyncio.run(build_index(params, index, 1, 0.2, 30, logging.getLogger("test")))
    assert event["status"] == "error" and event["terminal"] is True
    assert "certificate" in event["message"]


def test_asyncpg_refused_without_tls_says_what_to_set(tls_server: TlsServer) -> None:
    params = PostgresParams.from_dsn(tls_server.uri(sslmode="disable"))
    index = index_params("public", "tls_docs")

    event = asyncio.run(build_index(params, index, 1, 0.2, 30, logging.getLogger("test")))

    assert event["status"] == "error" and event["terminal"] is True
    assert "set sslmode=require" in event["message"] and tls_server.password not in event["message"]
