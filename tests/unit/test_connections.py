"""An Airflow connection becomes what psycopg and asyncpg need, every libpq option included."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import pytest
from airflow.models.connection import Connection
from psycopg.conninfo import conninfo_to_dict

from capstone.connections import (
    ConnectionNotDefined,
    PostgresConnectionRefused,
    PostgresParams,
    postgres_params,
    refusal_reason,
)

TLS_URI = (
    "postgresql://indexer:s3cret%2Fpw@db.example.internal:6432/vectors"
    "?sslmode=verify-full&sslrootcert=%2Fetc%2Fssl%2Fca.pem&sslcert=%2Fetc%2Fssl%2Fclient.crt"
    "&sslkey=%2Fetc%2Fssl%2Fclient.key&connect_timeout=7&target_session_attrs=read-write"
    "&application_name=nightly-indexer&options=-c%20statement_timeout%3D300s"
)


def _params(uri: str = TLS_URI) -> PostgresParams:
    return PostgresParams.from_connection(Connection(conn_id="store", uri=uri), "store")


def test_the_uri_query_reaches_psycopg_whole() -> None:
    conninfo = conninfo_to_dict(_params().conninfo())

    assert conninfo == {
        "host": "db.example.internal",
        "port": "6432",
        "user": "indexer",
        "password": "s3cret/pw",
        "dbname": "vectors",
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ssl/ca.pem",
        "sslcert": "/etc/ssl/client.crt",
        "sslkey": "/etc/ssl/client.key",
        "connect_timeout": "7",
        "target_session_attrs": "read-write",
        "application_name": "nightly-indexer",
        "options": "-c statement_timeout=300s",
    }


def test_extras_count_like_the_uri_query() -> None:
    conn = Connection(
        conn_id="store",
        conn_type="postgres",
        host="db.example.internal",
        login="indexer",
        password="pw",
        schema="vectors",
        extra={"sslmode": "require", "keepalives": True, "connect_timeout": 5},
    )

    options = PostgresParams.from_connection(conn, "store").options

    assert options == {"sslmode": "require", "keepalives": "1", "connect_timeout": "5"}


def test_asyncpg_gets_the_tls_options_in_its_dsn_and_the_session_options_as_settings() -> None:
    arguments = _params().asyncpg_arguments("capstone index build")

    query = {key: values[0] for key, values in parse_qs(urlsplit(arguments["dsn"]).query).items()}
    assert query == {
        "host": "db.example.internal",
        "port": "6432",
        "user": "indexer",
        "dbname": "vectors",
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ssl/ca.pem",
        "sslcert": "/etc/ssl/client.crt",
        "sslkey": "/etc/ssl/client.key",
        "target_session_attrs": "read-write",
    }
    assert arguments["password"] == "s3cret/pw"
    assert "s3cret" not in arguments["dsn"]
    # The user's application_name wins over ours; options travel in the startup packet.
    assert arguments["server_settings"] == {
        "application_name": "nightly-indexer",
        "options": "-c statement_timeout=300s",
    }
    assert arguments["timeout"] == 7.0


def test_a_connect_timeout_means_what_libpq_says_for_asyncpg_too() -> None:
    assert "timeout" not in _params("postgresql://u:p@h/db?connect_timeout=0").asyncpg_arguments("x")
    assert _params("postgresql://u:p@h/db?connect_timeout=1").asyncpg_arguments("x")["timeout"] == 2.0


def test_an_ipv6_host_reaches_asyncpg_in_brackets() -> None:
    conn = Connection(
        conn_id="store", conn_type="postgres", host="fd00::5", port=5432, login="u", schema="db"
    )

    arguments = PostgresParams.from_connection(conn, "store").asyncpg_arguments("x")

    assert parse_qs(urlsplit(arguments["dsn"]).query)["host"] == ["[fd00::5]"]


@pytest.mark.parametrize(
    "option",
    ["channel_binding=require", "require_auth=scram-sha-256", "gssencmode=require", "sslrootcert=system"],
)
def test_options_asyncpg_cannot_enforce_are_refused_not_dropped(option: str) -> None:
    with pytest.raises(PostgresConnectionRefused, match="cannot be enforced by asyncpg"):
        _params(f"postgresql://u:p@h/db?{option}").asyncpg_arguments("x")


def test_options_asyncpg_cannot_honour_are_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    params = _params("postgresql://u:p@h/db?keepalives_idle=30")

    with caplog.at_level(logging.WARNING, logger="capstone.connections"):
        arguments = params.asyncpg_arguments("x")

    assert "keepalives_idle" not in arguments["dsn"] and "keepalives_idle" not in arguments["server_settings"]
    assert "keepalives_idle" in caplog.text


def test_extras_that_are_not_libpq_options_are_ignored_out_loud(caplog: pytest.LogCaptureFixture) -> None:
    conn = Connection(
        conn_id="store", conn_type="postgres", host="h", extra={"cursor": "dictcursor", "sslmod": "require"}
    )

    with caplog.at_level(logging.WARNING, logger="capstone.connections"):
        params = PostgresParams.from_connection(conn, "store")

    assert params.options == {}
    assert "'sslmod'" in caplog.text and "cursor" not in caplog.text  # a provider extra: no warning


def test_the_description_never_shows_a_password() -> None:
    params = _params(TLS_URI + "&sslpassword=keypass")

    text = params.describe() + repr(params)

    assert "s3cret" not in text and "keypass" not in text
    assert "indexer@db.example.internal:6432/vectors" in text and "sslmode=verify-full" in text


def test_a_dsn_string_parses_the_same_as_a_connection() -> None:
    from_dsn = PostgresParams.from_dsn(_params().conninfo(), source="Airflow connection 'store'")

    assert from_dsn == _params()


def test_an_undefined_connection_names_itself_and_how_to_define_it(
    monkeypatch: pytest.MonkeyPatch, airflow_db: object
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_NIGHTLY_STORE", raising=False)

    with pytest.raises(ConnectionNotDefined) as raised:
        postgres_params("nightly_store")

    message = str(raised.value)
    assert "'nightly_store'" in message
    assert "airflow connections add nightly_store" in message and "AIRFLOW_CONN_NIGHTLY_STORE" in message


@pytest.mark.parametrize(
    ("message", "terminal"),
    [
        ('FATAL:  password authentication failed for user "indexer"', True),
        (
            'FATAL:  pg_hba.conf rejects connection for host "h", user "u", database "d", no encryption',
            True,
        ),
        ('FATAL:  no pg_hba.conf entry for host "h", user "u", database "d", no encryption', True),
        ('FATAL:  database "vectors" does not exist', True),
        ("SSL error: certificate verify failed", True),
        ('server certificate for "db" does not match host name "10.0.0.5"', True),
        ("server does not support SSL, but SSL was required", True),
        ("Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?", False),
        ("FATAL:  the database system is starting up", False),
        ("FATAL:  terminating connection due to administrator command", False),
        ("server closed the connection unexpectedly", False),
        ("timeout expired", False),
        ("FATAL:  sorry, too many clients already", False),
    ],
)
def test_refusals_no_retry_changes_are_told_from_transient_failures(message: str, terminal: bool) -> None:
    assert (refusal_reason(message) is not None) is terminal
