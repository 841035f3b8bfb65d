"""A table followed by its ``updated_at`` column, by a role that may only read it: no trigger, no
queue in its database. Each run reads the rows updated since the last run's mark (less the
lookback) and the table's ids; the collection ends with exactly the table's rows. The
``TablePollTrigger`` fires when the table's newest ``updated_at`` or row count moved."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from airflow.sdk.module_loading import import_string
from psycopg import sql

from capstone.pipeline import load_documents, run_key_for
from capstone.settings import CollectionSettings
from capstone.table_source import SourceTableInvalid, acknowledge_watermark
from capstone.table_watch import capture_fingerprint
from capstone.triggers import TablePollTrigger
from tests.support.pipeline import run_pipeline
from tests.support.settings import collection_settings
from tests.support.tables import assert_mirrors_the_table

READER_CONNECTION = "app_reader"


@pytest.fixture
def articles(pg_dsn: str, pg_schema: str) -> Iterator[sql.Identifier]:
    """``<schema>.articles (id, body, title, updated_at)`` with three rows, readable (SELECT only) by
    the role of connection ``app_reader``."""
    table = sql.Identifier(pg_schema, "articles")
    name = f"reader_{pg_schema}"
    role = sql.Identifier(name)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id integer PRIMARY KEY, body text, title text, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(table)
        )
        for i in range(3):
            conn.execute(
                sql.SQL("INSERT INTO {} (id, body, title) VALUES (%s, %s, %s)").format(table),
                (i, f"Article {i} is about vector search.\n\nIt has two paragraphs.", f"t{i}"),
            )
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'reader'").format(role))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(pg_schema), role))
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(table, role))
    parts = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    uri = f"postgresql://{name}:reader@{parts['host']}:{parts['port']}/{parts['dbname']}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(f"AIRFLOW_CONN_{READER_CONNECTION.upper()}", uri)
        yield table
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
        conn.execute(sql.SQL("DROP ROLE {}").format(role))


def _settings(schema: str, **source: Any) -> CollectionSettings:
    table = {
        "name": f"{schema}.articles",
        "content": "body",
        "metadata": ["title"],
        "connection_id": READER_CONNECTION,
        "updated_at": "updated_at",
        **source,
    }
    return collection_settings(
        f"poll_{schema}",
        schema,
        "collection",
        source={"table": table},
        embedding={"dimension": 32},
        chunking={"size": 40, "unit": "characters"},
        store={"max_delete_fraction": 1.0},
    )


def _execute(dsn: str, statement: str, table: sql.Identifier, *args: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL(statement).format(table), args)


def test_a_role_that_may_only_read_the_table_follows_it_exactly(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    settings = _settings(pg_schema, lookback_seconds=0)  # (the default would read every row again here)
    first = run_pipeline(settings, run_key_for(settings.collection, "1"), [])
    assert first["upserted"] == 6  # three rows, two paragraphs each
    assert_mirrors_the_table(pg_dsn, pg_schema, "collection", articles, settings)

    _execute(pg_dsn, "INSERT INTO {} (id, body, title) VALUES (7, 'A new article.', 'new')", articles)
    _execute(pg_dsn, "UPDATE {} SET body = 'Rewritten.', updated_at = now() WHERE id = 1", articles)
    _execute(pg_dsn, "DELETE FROM {} WHERE id = 2", articles)
    loaded = load_documents(settings, run_key_for(settings.collection, "2"), [])
    second = run_pipeline(settings, run_key_for(settings.collection, "2"), [])

    assert loaded["sources"] == [
        f"table {pg_schema}.articles (2 rows updated since the last mark, by updated_at)"
    ]
    assert (second["upserted"], second["deleted"]) == (2, 2 + 1)  # 7 and 1 in; 2 and 1's 2nd chunk out
    assert_mirrors_the_table(pg_dsn, pg_schema, "collection", articles, settings)
    with psycopg.connect(pg_dsn) as conn:  # nothing installed on the application's table
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal",
            (f"{pg_schema}.articles",),
        ).fetchone()
    assert triggers == (0,)


def test_a_run_that_failed_moves_no_mark_and_the_next_reads_its_rows_again(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    settings = _settings(pg_schema)
    run_pipeline(settings, run_key_for(settings.collection, "1"), [])
    _execute(pg_dsn, "UPDATE {} SET body = 'Changed once.', updated_at = now() WHERE id = 0", articles)
    # A run reads the change and dies before its upsert: its mark is never made current.
    load_documents(settings, run_key_for(settings.collection, "crashed"), [])
    _execute(pg_dsn, "UPDATE {} SET body = 'Changed twice.', updated_at = now() WHERE id = 1", articles)

    third = run_pipeline(settings, run_key_for(settings.collection, "3"), [])

    assert third["upserted"] == 2
    assert_mirrors_the_table(pg_dsn, pg_schema, "collection", articles, settings)


def test_a_transaction_that_committed_late_is_read_within_the_lookback(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    settings = _settings(pg_schema, lookback_seconds=120)
    run_pipeline(settings, run_key_for(settings.collection, "1"), [])
    # Its updated_at is a minute older than the mark the first run read: a transaction that began
    # before the first run and committed after it.
    _execute(
        pg_dsn,
        "UPDATE {} SET body = 'Late.', updated_at = now() - interval '60 seconds' WHERE id = 2",
        articles,
    )

    second = run_pipeline(settings, run_key_for(settings.collection, "2"), [])

    assert second["upserted"] == 1
    assert_mirrors_the_table(pg_dsn, pg_schema, "collection", articles, settings)


def test_an_updated_at_that_is_not_a_timestamp_names_the_field(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    settings = _settings(pg_schema, updated_at="title")
    with pytest.raises(
        SourceTableInvalid, match=r"source.table.updated_at: column 'title' of .* is text, not a"
    ):
        load_documents(settings, run_key_for(settings.collection, "1"), [])


def _trigger(settings: CollectionSettings) -> TablePollTrigger:
    table = settings.source.table
    assert table is not None and table.updated_at_column is not None
    return TablePollTrigger(
        collection=settings.collection,
        connection_id=table.connection_id,
        store_connection_id=settings.store.connection_id,
        table=table.qualified,
        updated_at_column=table.updated_at_column,
        capture=capture_fingerprint(table),
        poll_seconds=0.2,
        min_interval=0.0,
        refire_after=60,
    )


def test_the_poll_trigger_fires_for_a_first_read_then_for_each_change(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    settings = _settings(pg_schema)
    trigger = _trigger(settings)
    classpath, kwargs = trigger.serialize()
    assert import_string(classpath)(**kwargs).serialize() == (classpath, kwargs)

    async def next_event(stream: Any, timeout: float = 20) -> dict[str, Any]:
        return (await asyncio.wait_for(anext(stream), timeout)).payload

    async def scenario() -> list[str]:
        stream = trigger.run()
        reasons = [(await next_event(stream))["reason"]]
        run_key = run_key_for(settings.collection, "1")
        await asyncio.to_thread(load_documents, settings, run_key, [])
        await asyncio.to_thread(
            acknowledge_watermark, settings.collection, settings.store.connection_id, run_key
        )
        await asyncio.to_thread(
            _execute, pg_dsn, "UPDATE {} SET body = 'x', updated_at = now() WHERE id = 1", articles
        )
        reasons.append((await next_event(stream))["reason"])
        run_key = run_key_for(settings.collection, "2")
        await asyncio.to_thread(load_documents, settings, run_key, [])
        await asyncio.to_thread(
            acknowledge_watermark, settings.collection, settings.store.connection_id, run_key
        )
        await asyncio.to_thread(_execute, pg_dsn, "DELETE FROM {} WHERE id = 0", articles)  # the count moves
        reasons.append((await next_event(stream))["reason"])
        await stream.aclose()  # type: ignore[attr-defined]
        return reasons

    assert asyncio.run(scenario()) == ["capture not installed", "table changed", "table changed"]
