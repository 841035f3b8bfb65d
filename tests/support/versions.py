"""Reading and staging the versions of a collection (:mod:`capstone.versions`) in tests."""

from __future__ import annotations

import json

import psycopg
from psycopg import sql

from capstone.index_build import renamed_managed_index
from capstone.store import content_hash
from capstone.versions import version_table_name

__all__ = ["as_an_earlier_release", "live_table", "relation_kind", "served_dimensions", "version_states"]


def relation_kind(dsn: str, schema: str, name: str) -> str | None:
    """``pg_class.relkind`` of ``schema.name`` (``r`` table, ``v`` view), None when there is none."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s",
            (schema, name),
        ).fetchone()
    return None if row is None else str(row[0])


def live_table(dsn: str, schema: str, name: str) -> str:
    """The table of the collection's live version (what its stable name, a view, reads)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT table_name FROM capstone.collection_versions WHERE schema_name = %s AND stable_name = %s"
            " AND status = 'live'",
            (schema, name),
        ).fetchone()
    assert row is not None, f"{schema}.{name} has no live version"
    return str(row[0])


def served_dimensions(dsn: str, schema: str, name: str) -> set[int]:
    """The dimensions of the vectors the collection's stable name serves."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            sql.SQL("SELECT DISTINCT vector_dims(embedding) FROM {}").format(sql.Identifier(schema, name))
        ).fetchall()
    return {int(row[0]) for row in rows}


def version_states(dsn: str, schema: str, name: str) -> dict[int, str]:
    """``version -> status`` from the catalog, and whether each version's table exists."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT version, status, to_regclass(format('%%I.%%I', schema_name, table_name)) IS NOT NULL"
            " FROM capstone.collection_versions WHERE schema_name = %s AND stable_name = %s",
            (schema, name),
        ).fetchall()
    return {int(number): status if exists else f"{status} (no table)" for number, status, exists in rows}


def as_an_earlier_release(dsn: str, schema: str, name: str, model: str) -> None:
    """Turn a collection indexed by this release into what an earlier one left: a plain table at the
    stable name (its indexes named after it), chunk hashes over the model name, no version catalog
    rows, a registry row without versions."""
    table = version_table_name(name, 1)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute(sql.SQL("DROP VIEW {}").format(sql.Identifier(schema, name)))
        conn.execute(
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(schema, table), sql.Identifier(name))
        )
        indexes = conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = %s::regclass",
            (f"{schema}.{name}",),
        ).fetchall()
        for (index,) in indexes:
            old = renamed_managed_index(index, table, name)
            if old is None and index == f"{table[:50]}_document_id":
                old = f"{name[:50]}_document_id"
            if old is not None:
                conn.execute(
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        sql.Identifier(schema, index), sql.Identifier(old)
                    )
                )
        rows = conn.execute(
            sql.SQL("SELECT id, content, metadata FROM {}").format(sql.Identifier(schema, name))
        ).fetchall()
        for chunk, text, metadata in rows:
            legacy = content_hash(text, json.dumps(metadata, ensure_ascii=False, sort_keys=True), model)
            conn.execute(
                sql.SQL("UPDATE {} SET content_hash = %s WHERE id = %s").format(sql.Identifier(schema, name)),
                (legacy, chunk),
            )
        conn.execute(
            "DELETE FROM capstone.collection_versions WHERE schema_name = %s AND stable_name = %s",
            (schema, name),
        )
        conn.execute(
            "UPDATE capstone.collections SET version = NULL, version_table = NULL WHERE schema_name = %s"
            " AND table_name = %s",
            (schema, name),
        )
