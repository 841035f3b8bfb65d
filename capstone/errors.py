"""Terminal or transient: whether retrying a failed task can help.

A terminal error (a missing batch, a wrong key, a model that is not installed, a dimension that
does not match, a check that failed, a refused login) fails the task on its first try with its own
message; retrying would only wait out the backoff and bury the message under retries. Everything
else (connection refused or reset, a server restart, 429/5xx, timeouts, serialization failures,
deadlocks) is transient, and the task's retries with exponential backoff take over.

:func:`is_terminal` is the one place that decides (the index build marks its error events with
it too); the DAG factory turns a terminal error into Airflow's ``AirflowFailException``.
"""

from __future__ import annotations

__all__ = ["TerminalError", "is_terminal"]


class TerminalError(Exception):
    """Retrying cannot help: the input, the configuration or the environment must change first."""


# SQLSTATE classes a retry cannot change: 28 invalid authorization, 3D invalid catalog (database),
# 42 syntax error or access rule violation (a missing table, a privilege).
_TERMINAL_SQLSTATE_CLASSES = ("28", "3D", "42")


def is_terminal(exc: BaseException) -> bool:
    """True when retrying the task that raised ``exc`` cannot help."""
    if isinstance(exc, TerminalError):
        return True
    return _is_terminal_embedding_error(exc) or _is_terminal_database_error(exc)


def _is_terminal_embedding_error(exc: BaseException) -> bool:
    from capstone.embeddings import errors as embedding

    # EmbeddingInputRejected reaches a task only when a one-word probe was refused too: the
    # request itself is wrong (a bad model name, say), not one of its inputs.
    return isinstance(
        exc,
        embedding.EmbeddingAuthenticationError
        | embedding.EmbeddingDimensionError
        | embedding.EmbeddingInputRejected
        | embedding.MissingAPIKeyError
        | embedding.MissingExtraError
        | embedding.ModelNotAvailableError,
    )


def _is_terminal_database_error(exc: BaseException) -> bool:
    import asyncpg
    import psycopg

    if isinstance(exc, psycopg.Error | asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate.startswith(_TERMINAL_SQLSTATE_CLASSES)
    return False
