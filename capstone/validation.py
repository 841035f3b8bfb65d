"""Index health validation: is the index there, and does it hold every vector it should?

The report's checks each have a status (``pass`` / ``warn`` / ``fail``); a check named in the
spec's ``fail_on`` that does not pass fails the task, so no ``<collection>.indexed`` event is
published.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from capstone import store
from capstone.connections import postgres_dsn

__all__ = ["IndexHealthError", "validate_collection"]

log = logging.getLogger(__name__)


class IndexHealthError(RuntimeError):
    """A check listed in ``validation.fail_on`` did not pass."""


def validate_collection(
    settings: Any,
    index: dict[str, Any],
    validation: dict[str, Any],
    upserted: dict[str, Any],
    indexed: dict[str, Any],
) -> dict[str, Any]:
    """Run the checks, log them as a table, raise when a ``fail_on`` check fails; returns the report."""
    table = store.CollectionTable(settings.schema, settings.table, settings.dimension)
    with psycopg.connect(postgres_dsn(settings.connection_id), autocommit=True) as conn:
        checks = {"vector_count": _vector_count(conn, table, int(upserted["expected_count"]))}
    return _finish(settings.collection, checks, validation.get("fail_on", []), indexed)


def _vector_count(conn: psycopg.Connection, table: store.CollectionTable, expected: int) -> dict[str, Any]:
    found = store.count_vectors(conn, table)
    return {
        "status": "pass" if found >= expected else "fail",
        "value": found,
        "expected": expected,
        "detail": f"{found} rows with embeddings, {expected} expected",
    }


def _finish(
    collection: str, checks: dict[str, dict[str, Any]], fail_on: list[str], indexed: dict[str, Any]
) -> dict[str, Any]:
    failed = [
        name for name, check in checks.items() if check["status"] != "pass" and _family(name) in fail_on
    ]
    for name, check in checks.items():
        if check["status"] != "pass" and name not in failed:
            check["status"] = "warn"
    width = max(len(name) for name in checks)
    lines = [
        f"{name.ljust(width)}  {check['status'].upper():4}  {check['detail']}"
        for name, check in checks.items()
    ]
    log.info("index health of %s:\n%s", collection, "\n".join(lines))
    report = {
        "collection": collection,
        "checks": checks,
        "index": {key: indexed.get(key) for key in ("index_name", "index_size_bytes", "indexed_count")},
        "summary": {name: check["status"] for name, check in checks.items()} | {"failed": failed},
    }
    if failed:
        raise IndexHealthError(
            f"index health of {collection}: {', '.join(failed)} failed (listed in validation.fail_on), "
            "so the indexed asset is not published:\n" + "\n".join(lines)
        )
    return report


def _family(check: str) -> str:
    if check.startswith("query_relevance"):
        return "query_relevance"
    if check.startswith("recall"):
        return "recall"
    if check.startswith("index_freshness"):
        return "freshness"
    return check
