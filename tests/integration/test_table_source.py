"""A collection that follows a Postgres table: the first run reads it whole, later runs read what
the capture triggers queued, and the collection ends with exactly the table's rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from capstone.pipeline import load_documents, run_key_for
from capstone.settings import CollectionSettings
from capstone.table_source import CaptureRefused, SourceTableInvalid
from tests.support.pipeline import run_pipeline, run_until_upsert
from tests.support.settings import collection_settings
from tests.support.tables import assert_mirrors_the_table


@pytest.fixture
def articles(pg_dsn: str, pg_schema: str) -> Iterator[sql.Identifier]:
    """``<schema>.articles (id integer, body text, title text, views integer)`` with three rows."""
    table = sql.Identifier(pg_schema, "articles")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, body text, title text, views integer)").format(
                table
            )
        )
        for i in range(3):
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, 0)").format(table),
                (i, f"Article {i} is about vector search.\n\nIt has two paragraphs.", f"t{i}"),
            )
    yield table


def _settings(schema: str, **source: Any) -> CollectionSettings:
    table = {"name": f"{schema}.articles", "content": "body", "metadata": ["title"], **source}
    return collection_settings(
        f"follow_{schema}",
        schema,
        "collection",
        source={"table": table},
        embedding={"dimension": 32},
        chunking={"size": 40, "unit": "characters"},
        store={"max_delete_fraction": 1.0},
    )


def _run(settings: CollectionSettings, name: str) -> dict[str, Any] | None:
    totals = run_until_upsert(settings, run_key_for(settings.collection, name), [])
    if totals is None:
        return None
    return dict(run_pipeline(settings, run_key_for(settings.collection, name), []))


def _queued(dsn: str, collection: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM capstone.source_changes WHERE collection = %s", (collection,)
        )
        return int(row.fetchone()[0])  # type: ignore[index]


def test_inserts_updates_and_deletes_reach_the_collection_exactly(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    settings = _settings(pg_schema)
    first = run_pipeline(settings, run_key_for(settings.collection, "1"), [])
    assert first["upserted"] == 6  # three rows, two paragraphs each
    assert_mirrors_the_table(pg_dsn, pg_schema, "collection", articles, settings)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {} VALUES (7, 'A new article.', 'new', 0)").format(articles))
        conn.execute(sql.SQL("UPDATE {} SET body = 'Rewritten.' WHERE id = 1").format(articles))
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = 2").format(articles))
        conn.execute(sql.SQL("UPDATE {} SET views = views + 1").format(articles))  # not captured

    second = run_pipeline(settings, run_key_for(settings.collection, "2"), [])

    assert (second["upserted"], second["deleted"]) == (2, 2 + 1)  # 7 and 1 in; 2 and 1's 2nd chunk out
    assert_mirrors_the_table(pg_dsn, pg_schema, "collection", articles, settings)
    assert _queued(pg_dsn, settings.collection) == 0


def test_a_column_only_the_app_reads_changing_queues_nothing(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    settings = _settings(pg_schema)
    run_pipeline(settings, run_key_for(settings.collection, "1"), [])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET views = views + 1").format(articles))
        conn.execute(sql.SQL("UPDATE {} SET body = body WHERE id = 0").format(articles))  # same text
    assert _queued(pg_dsn, settings.collection) == 0


def test_changes_claimed_by_a_run_that_failed_are_read_again(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    settings = _settings(pg_schema)
    run_pipeline(settings, run_key_for(settings.collection, "1"), [])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET body = 'Changed once.' WHERE id = 0").format(articles))
    # A run reads (claims) the change and dies before its upsert: nothing is acknowledged.
    load_documents(settings, run_key_for(settings.collection, "crashed"), [])
    assert _queued(pg_dsn, settings.collection) == 1
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET body = 'Changed twice.' WHERE id = 1").format(articles))

    third = run_pipeline(settings, run_key_for(settings.collection, "3"), [])

    assert third["upserted"] == 2
    assert_mirrors_the_table(pg_dsn, pg_schema, "collection", articles, settings)
    assert _queued(pg_dsn, settings.collection) == 0


def test_unchanged_rows_re_read_embed_nothing_and_are_acknowledged(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    settings = _settings(pg_schema)
    run_pipeline(settings, run_key_for(settings.collection, "1"), [])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET body = 'Changed.' WHERE id = 0").format(articles))
        conn.execute(
            sql.SQL("UPDATE {} SET body = %s WHERE id = 0").format(articles),
            ("Article 0 is about vector search.\n\nIt has two paragraphs.",),
        )
    assert _queued(pg_dsn, settings.collection) == 2
    # Without an index yet, the run goes on to build one (with one, prepare_chunks would end it).
    totals = run_until_upsert(settings, run_key_for(settings.collection, "2"), [])
    assert totals is not None and (totals["embedded"], totals["to_delete"]) == (0, 0)
    assert _queued(pg_dsn, settings.collection) == 2
    run_pipeline(settings, run_key_for(settings.collection, "2"), [])
    assert _queued(pg_dsn, settings.collection) == 0


def test_a_truncated_table_empties_the_collection(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    settings = _settings(pg_schema)
    run_pipeline(settings, run_key_for(settings.collection, "1"), [])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("TRUNCATE {}").format(articles))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (9, 'After the truncate.', 'nine', 0)").format(articles))

    result = run_pipeline(settings, run_key_for(settings.collection, "2"), [])

    assert result["deleted"] == 6
    assert_mirrors_the_table(pg_dsn, pg_schema, "collection", articles, settings)


def test_rows_without_text_are_set_aside_with_their_reason(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET body = NULL WHERE id = 2").format(articles))
    settings = _settings(pg_schema)
    loaded = load_documents(settings, run_key_for(settings.collection, "1"), [])
    assert loaded["documents"] == 2
    assert loaded["rejected"] == [
        {"id": "2", "source": f"{pg_schema}.articles:2", "reason": "'content' is missing or empty"}
    ]
    assert loaded["sources"] == [f"table {pg_schema}.articles (all rows)"]


def test_a_role_without_the_trigger_privilege_gets_the_grant_to_ask_for(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    role = f"reader_{pg_schema}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'reader'").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(pg_schema), sql.Identifier(role))
        )
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(articles, sql.Identifier(role)))
        # What the pipeline's own role has on its schema: only the trigger privilege is missing.
        conn.execute("CREATE SCHEMA IF NOT EXISTS capstone")
        conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA capstone TO {}").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA capstone TO {}").format(sql.Identifier(role))
        )
    reader_dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=role, password="reader")
    settings = _settings(pg_schema, connection_id="app_reader")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("AIRFLOW_CONN_APP_READER", _uri(reader_dsn))
            with pytest.raises(
                CaptureRefused,
                match=rf"lacks the TRIGGER privilege on {pg_schema}.articles, .*: "
                rf'GRANT TRIGGER ON "{pg_schema}"."articles" TO "{role}"; or, where no trigger may be '
                r"created on it, follow it by .*: source.table.updated_at",
            ):
                load_documents(settings, run_key_for(settings.collection, "1"), [])
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _uri(conninfo: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    return (
        f"postgresql://{parts['user']}:{parts['password']}@{parts['host']}:{parts['port']}/{parts['dbname']}"
    )


def test_a_missing_column_names_the_field_and_the_columns_there_are(
    pg_dsn: str, pg_schema: str, articles: sql.Identifier
) -> None:
    settings = _settings(pg_schema, content="text_body")
    with pytest.raises(
        SourceTableInvalid,
        match=r"source.table.content: .* has no column 'text_body' \(its columns: body, id",
    ):
        load_documents(settings, run_key_for(settings.collection, "1"), [])
