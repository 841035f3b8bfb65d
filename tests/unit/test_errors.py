"""Which errors fail a task at once (terminal) and which go on to its retries (transient)."""

from __future__ import annotations

import asyncpg
import httpx2 as httpx  # the HTTP client the openai package builds on
import openai
import psycopg
import pytest
from psycopg import errors as pg

from capstone.connections import ConnectionNotDefined, PostgresConnectionRefused
from capstone.documents import BatchNotFound, InvalidBatchLocation
from capstone.embeddings import (
    EmbeddingAuthenticationError,
    EmbeddingDimensionError,
    EmbeddingInputRejected,
    EmbeddingResponseError,
    MissingAPIKeyError,
    MissingExtraError,
    ModelNotAvailableError,
)
from capstone.errors import is_terminal
from capstone.pipeline import MassDeleteRefused, MergeRefused, TooManyRejected
from capstone.store import DimensionMismatch, StagingIncomplete
from capstone.validation import IndexHealthError

_REQUEST = httpx.Request("POST", "http://embeddings.test/v1/embeddings")

TERMINAL = {
    "connection not defined": ConnectionNotDefined("vector_store_default"),
    "login refused": PostgresConnectionRefused("password authentication failed"),
    "batch file missing": BatchNotFound("batch file /x.jsonl does not exist"),
    "unknown batch format": InvalidBatchLocation("unknown batch format 'csv'"),
    "too many rejected": TooManyRejected("25 of 25 documents were rejected"),
    "mass delete": MassDeleteRefused("would delete 12 of the 20 rows"),
    "staging emptied by a crash": StagingIncomplete("re-run the DAG"),
    "table of another dimension": DimensionMismatch("dimension 8, model produces 16"),
    "model of another dimension": EmbeddingDimensionError("hash", "m", actual=16, configured=8),
    "fail_on check failed": IndexHealthError("vector_count failed"),
    "api key refused": EmbeddingAuthenticationError("HTTP 401"),
    "api key missing": MissingAPIKeyError("OPENAI_API_KEY is not set"),
    "extra missing": MissingExtraError("sentence-transformers", "torch"),
    "model not installed": ModelNotAvailableError("all-MiniLM-L6-v2 is not installed"),
    "request refused with a probe": EmbeddingInputRejected("model 'nope' does not exist"),
    "missing table": pg.UndefinedTable("relation does not exist"),
    "missing privilege": pg.InsufficientPrivilege("permission denied for schema"),
    "wrong password (sqlstate)": pg.InvalidPassword("password authentication failed"),
    "missing database": pg.InvalidCatalogName('database "x" does not exist'),
    "not the table's owner (asyncpg)": asyncpg.InsufficientPrivilegeError("must be owner of table docs"),
    "merge refused": MergeRefused("2 of 5 upsert batches failed: permission denied"),
}
TRANSIENT = {
    "connection refused": psycopg.OperationalError("connection refused"),
    "server shut down": pg.AdminShutdown("terminating connection due to administrator command"),
    "server starting": pg.CannotConnectNow("the database system is starting up"),
    "too many connections": pg.TooManyConnections("sorry, too many clients already"),
    "serialization failure": pg.SerializationFailure("could not serialize access"),
    "deadlock": pg.DeadlockDetected("deadlock detected"),
    "statement timeout": pg.QueryCanceled("canceling statement due to statement timeout"),
    "rate limited": openai.RateLimitError(
        "rate limited", response=httpx.Response(429, request=_REQUEST), body=None
    ),
    "server error": openai.InternalServerError(
        "bad gateway", response=httpx.Response(502, request=_REQUEST), body=None
    ),
    "api timeout": openai.APITimeoutError(request=_REQUEST),
    "odd api answer": EmbeddingResponseError("2 vectors for 3 inputs"),
    "socket reset": ConnectionResetError("connection reset by peer"),
    "timeout": TimeoutError(),
    "server gone (asyncpg)": asyncpg.AdminShutdownError("terminating connection"),
}


@pytest.mark.parametrize("error", TERMINAL.values(), ids=TERMINAL.keys())
def test_errors_no_retry_can_fix_are_terminal(error: Exception) -> None:
    assert is_terminal(error)


@pytest.mark.parametrize("error", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_errors_a_retry_may_outlast_are_transient(error: Exception) -> None:
    assert not is_terminal(error)
