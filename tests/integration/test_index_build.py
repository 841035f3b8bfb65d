"""``build_index`` against the real embedded Postgres + pgvector: builds, reuse, timeouts,
INVALID leftovers, following another backend's build, and parameter changes without downtime."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from pgvector.psycopg import register_vector_async
from psycopg import sql

from capstone.index_build import (
    DISTANCE_OPERATORS,
    IndexParams,
    KeywordIndexParams,
    build_index,
    build_memory,
    check_index,
    is_managed_index_name,
)
from tests.support.index_build import (
    IndexRow,
    create_collection,
    indexes_on,
    random_unit_vectors,
    wait_for_build,
    wait_until_gone,
)
from tests.support.settings import index_params

log = logging.getLogger("test_index_build")

# -- parameters (no database) -------------------------------------------------------------------


def test_index_name_carries_a_hash_of_the_parameters() -> None:
    a = index_params("public", "docs")
    assert a.index_name == "docs_hnsw_6a701287"  # what every release since the first names it
    b = index_params("public", "docs", m=8, ef_construction=32)
    assert a.index_name.startswith("docs_hnsw_") and len(a.index_name) == len("docs_hnsw_") + 8
    assert a.index_name != b.index_name
    # Options the index type ignores do not change the name (no needless rebuild).
    assert a.index_name == index_params("public", "docs", lists=100).index_name
    assert a.index_name != index_params("public", "docs", metric="l2").index_name


def test_index_name_fits_63_bytes_and_keeps_the_hash() -> None:
    ivfflat = index_params("public", "docs", type="ivfflat", metric="l2", lists=10)
    params = replace(ivfflat, table="é" * 31)  # 62 bytes of table name
    name = params.index_name
    assert len(name.encode()) <= 63
    assert name.endswith(f"_ivfflat_{params.params_hash}")
    assert is_managed_index_name(name, params.table)
    assert not is_managed_index_name(f"{params.table}_other", params.table)


def test_create_sql_quotes_identifiers_and_uses_the_metric_opclass() -> None:
    ivfflat = index_params("public", "docs", type="ivfflat", metric="inner_product", lists=50)
    params = replace(ivfflat, schema="my schema", table='odd"table')
    assert params.opclass == "vector_ip_ops" and DISTANCE_OPERATORS["inner_product"] == "<#>"
    assert params.create_sql() == (
        f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{params.index_name.replace(chr(34), chr(34) * 2)}" '
        'ON "my schema"."odd""table" USING ivfflat ("embedding" vector_ip_ops) WITH (lists = 50)'
    )


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"index_type": "ivfflat"}, "lists"),
        ({"m": 16, "ef_construction": 20}, "ef_construction"),
        ({"maintenance_work_mem": "lots"}, "maintenance_work_mem"),
        ({"table": "x" * 64}, "identifier"),
    ],
)
def test_bad_parameters_are_refused_with_the_reason(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        replace(index_params("public", "docs"), **kwargs)


def test_build_memory_is_sized_from_the_data_and_clamped() -> None:
    assert build_memory(1_000, 64, "hnsw") == "64MB"  # never below the server default
    assert build_memory(100_000, 384, "hnsw") == "293MB"  # 100k * 384 * 4 bytes * 2
    assert build_memory(100_000, 384, "ivfflat") == "147MB"
    assert build_memory(10_000_000, 1536, "hnsw") == "1024MB"  # capped at 1GB
    assert build_memory(100_000, 384, "hnsw", "128MB") == "128MB"  # never above the spec's value
    assert build_memory(1_000, 64, "hnsw", "512MB") == "64MB"


# -- builds ------------------------------------------------------------------------------------


def _params(schema: str, **index: Any) -> IndexParams:
    return index_params(schema, "docs", **index)


async def test_builds_a_fresh_table_and_logs_progress(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 20_000)
    params = _params(pg_schema)
    with caplog.at_level(logging.INFO, logger=log.name):
        event = await build_index(pg_dsn, params, 20_000, poll_interval=0.05, timeout=120, log=log)

    assert event["status"] == "success", event
    assert event["index_name"] == params.index_name
    assert event["indexed_count"] == 20_000 and event["builds_started"] == 1
    assert event["index_size_bytes"] > 0 and event["duration_s"] > 0 and (event["freshness_ms"] or 0) >= 0
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(params.index_name, "hnsw", True)]
    progress = [r.getMessage() for r in caplog.records if "tuples (" in r.getMessage()]
    assert progress, caplog.text
    assert any("loading tuples" in line and "%" in line and "elapsed" in line for line in progress)


async def test_returns_at_once_when_the_index_already_exists(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 1_000)
    params = _params(pg_schema)
    first = await build_index(pg_dsn, params, 1_000, poll_interval=0.05, timeout=60, log=log)
    again = await build_index(pg_dsn, params, 1_000, poll_interval=0.05, timeout=60, log=log)

    assert first["builds_started"] == 1
    assert again["status"] == "success" and again["builds_started"] == 0
    assert again["index_size_bytes"] == first["index_size_bytes"]


async def test_timeout_cancels_the_build_and_leaves_no_invalid_index(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 10_000)
    params = _params(pg_schema)
    event = await build_index(pg_dsn, params, 10_000, poll_interval=0.05, timeout=0.5, log=log)

    assert event["status"] == "timeout"
    assert f'index "{pg_schema}"."{params.index_name}" was not built within 0.5s' in event["message"]
    assert indexes_on(pg_conn, pg_schema, "docs") == []
    builds = pg_conn.execute(
        "SELECT count(*) FROM pg_stat_progress_create_index p JOIN pg_class t ON t.oid = p.relid "
        "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %s",
        (pg_schema,),
    )
    assert builds.fetchone() == (0,)


async def test_invalid_leftover_is_dropped_and_rebuilt(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 1_000)
    params = _params(pg_schema)
    # A failed CONCURRENTLY build leaves an INVALID index behind: a unique one over duplicates fails.
    with pytest.raises(psycopg.errors.UniqueViolation):
        pg_conn.execute(
            sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} (document_id)").format(
                sql.Identifier(params.index_name), sql.Identifier(pg_schema, "docs")
            )
        )
    assert _validity(pg_conn, pg_schema, params.index_name) is False

    with caplog.at_level(logging.INFO, logger=log.name):
        event = await build_index(pg_dsn, params, 1_000, poll_interval=0.05, timeout=60, log=log)

    assert event["status"] == "success" and event["builds_started"] == 1
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(params.index_name, "hnsw", True)]
    assert "is INVALID (left by a failed build): dropping it" in caplog.text


async def test_follows_a_build_another_backend_is_running(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 8_000)
    params = _params(pg_schema)
    # Another backend (say, a trigger before a triggerer restart) already runs the same build.
    other = threading.Thread(target=_run_sql, args=(pg_dsn, params.create_sql()))
    other.start()
    try:
        await wait_for_build(pg_conn, pg_schema, params.index_name)
        with caplog.at_level(logging.INFO, logger=log.name):
            event = await build_index(pg_dsn, params, 8_000, poll_interval=0.05, timeout=60, log=log)
    finally:
        other.join()

    assert event["status"] == "success" and event["builds_started"] == 0
    assert "following the build run by another backend" in caplog.text
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(params.index_name, "hnsw", True)]


async def test_cancelled_build_stops_on_the_server_and_the_next_run_rebuilds(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 8_000)
    params = _params(pg_schema)
    # Airflow cancels a trigger when its task is cleared or marked failed, or the triggerer stops.
    running = asyncio.create_task(build_index(pg_dsn, params, 8_000, poll_interval=0.05, timeout=60, log=log))
    builder = await wait_for_build(pg_conn, pg_schema, params.index_name)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running

    await wait_until_gone(pg_conn, builder)
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(params.index_name, "hnsw", False)]
    event = await build_index(pg_dsn, params, 8_000, poll_interval=0.05, timeout=60, log=log)
    assert event["status"] == "success" and event["builds_started"] == 1
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(params.index_name, "hnsw", True)]


async def test_changed_parameters_swap_indexes_without_losing_search(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 3_000)
    old, new = _params(pg_schema), _params(pg_schema, m=8, ef_construction=32)
    assert (await build_index(pg_dsn, old, 3_000, 0.05, 60, log))["status"] == "success"

    stop = asyncio.Event()
    searches = asyncio.create_task(_search_while(pg_dsn, pg_schema, stop))
    await asyncio.sleep(0.2)  # some searches on the old index first
    event = await build_index(pg_dsn, new, 3_000, poll_interval=0.05, timeout=60, log=log)
    await asyncio.sleep(0.2)
    stop.set()
    valid_indexes, index_scans = await searches

    assert event["status"] == "success" and event["index_name"] == new.index_name
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(new.index_name, "hnsw", True)]
    assert len(valid_indexes) > 10
    assert min(valid_indexes) >= 1, "a moment came when the column had no valid index"
    assert all(index_scans), "a search ran without an index"


async def test_build_error_is_reported_and_leaves_no_invalid_index(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 10, dimension=2001)  # too wide for HNSW
    event = await build_index(pg_dsn, _params(pg_schema), 10, poll_interval=0.05, timeout=60, log=log)

    assert event["status"] == "error"
    assert "could not be built" in event["message"] and "2000 dimensions" in event["message"]
    assert indexes_on(pg_conn, pg_schema, "docs") == []


async def test_missing_table_is_an_error_naming_it(pg_dsn: str, pg_schema: str) -> None:
    event = await build_index(pg_dsn, _params(pg_schema), 10, poll_interval=0.05, timeout=60, log=log)

    assert event["status"] == "error"
    assert f'table "{pg_schema}"."docs" does not exist' in event["message"]


# -- helpers -----------------------------------------------------------------------------------


def _validity(conn: psycopg.Connection, schema: str, name: str) -> bool | None:
    row = conn.execute(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    ).fetchone()
    return None if row is None else bool(row[0])


def _run_sql(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement.encode())


async def _search_while(dsn: str, schema: str, stop: asyncio.Event) -> tuple[list[int], list[bool]]:
    """Run nearest-neighbour searches until ``stop``; per search, the valid ANN indexes and
    whether the plan used one."""
    valid_indexes, index_scans = [], []
    target = sql.Identifier(schema, "docs")
    search = sql.SQL("SELECT id FROM {} ORDER BY embedding <=> %s LIMIT 5").format(target)
    vector = random_unit_vectors(1, seed=7)[0]
    plan = sql.SQL("EXPLAIN SELECT id FROM {} ORDER BY embedding <=> {}::vector LIMIT 5").format(
        target, sql.Literal(str(vector.tolist()))
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await register_vector_async(conn)
        await conn.execute("SET enable_seqscan = off")  # so any valid index is used
        while not stop.is_set():
            valid = await (await conn.execute(_VALID_ANN_INDEXES, (schema, "docs"))).fetchone()
            lines = [row[0] for row in await (await conn.execute(plan)).fetchall()]
            rows = await (await conn.execute(search, (vector,))).fetchall()
            assert len(rows) == 5
            valid_indexes.append(valid[0] if valid else 0)
            index_scans.append(any("Index Scan using docs_hnsw_" in line for line in lines))
            await asyncio.sleep(0.005)
    return valid_indexes, index_scans


_VALID_ANN_INDEXES = """
SELECT count(*) FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_am am ON am.oid = c.relam
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = %s AND t.relname = %s AND i.indisvalid AND am.amname IN ('hnsw', 'ivfflat')
"""


# -- the keyword index ---------------------------------------------------------------------------


async def test_the_keyword_index_is_built_first_with_progress_and_reported_in_the_event(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 1_000)
    params, keyword = _params(pg_schema), KeywordIndexParams(pg_schema, "docs", "auto")

    with caplog.at_level(logging.INFO, logger=log.name):
        event = await build_index(pg_dsn, params, 1_000, 0.05, 60, log, keyword)

    assert event["status"] == "success" and event["builds_started"] == 2
    assert (event["index_name"], event["keyword_index_name"]) == (params.index_name, keyword.index_name)
    assert event["keyword_index_size_bytes"] > 0
    assert indexes_on(pg_conn, pg_schema, "docs", "content_tsv") == [
        IndexRow(keyword.index_name, "gin", True)
    ]
    built = [line for line in caplog.text.splitlines() if ": building over " in line]
    assert len(built) == 2 and "USING gin" in built[0] and "USING hnsw" in built[1]  # keyword first
    assert f"index {keyword.qualified_index()} is valid" in caplog.text

    again = await build_index(pg_dsn, params, 1_000, 0.05, 60, log, keyword)
    assert again["status"] == "success" and again["builds_started"] == 0  # both already valid


async def test_an_invalid_keyword_index_is_dropped_and_rebuilt(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    create_collection(pg_conn, pg_schema, "docs", 1_000)
    params, keyword = _params(pg_schema), KeywordIndexParams(pg_schema, "docs", "auto")
    # A failed CONCURRENTLY build under the keyword index's name: unique over duplicate document ids.
    with pytest.raises(psycopg.errors.UniqueViolation):
        pg_conn.execute(
            sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} (document_id)").format(
                sql.Identifier(keyword.index_name), sql.Identifier(pg_schema, "docs")
            )
        )

    with caplog.at_level(logging.INFO, logger=log.name):
        event = await build_index(pg_dsn, params, 1_000, 0.05, 60, log, keyword)

    assert event["status"] == "success" and event["builds_started"] == 2
    assert (
        f"index {keyword.qualified_index()} is INVALID (left by a failed build): dropping it" in caplog.text
    )
    assert indexes_on(pg_conn, pg_schema, "docs", "content_tsv") == [
        IndexRow(keyword.index_name, "gin", True)
    ]


async def test_a_table_without_the_keyword_column_gets_its_vector_index_and_a_warning(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A run whose upsert ran before capstone was upgraded: its table has no content_tsv yet.
    create_collection(pg_conn, pg_schema, "docs", 100)
    pg_conn.execute(
        sql.SQL("ALTER TABLE {} DROP COLUMN content_tsv").format(sql.Identifier(pg_schema, "docs"))
    )
    params, keyword = _params(pg_schema), KeywordIndexParams(pg_schema, "docs", "auto")

    with caplog.at_level(logging.INFO, logger=log.name):
        event = await build_index(pg_dsn, params, 100, 0.05, 60, log, keyword)
        ready = await check_index(pg_dsn, params, 100, log, keyword)

    assert event["status"] == "success" and event["builds_started"] == 1 and "keyword_index_name" not in event
    assert ready is not None and ready["index_name"] == params.index_name
    assert (
        'has no column "content_tsv" yet (its next run adds it): building only the vector index'
        in caplog.text
    )
    assert indexes_on(pg_conn, pg_schema, "docs") == [IndexRow(params.index_name, "hnsw", True)]


async def test_without_a_keyword_index_only_the_vector_index_is_built(
    pg_dsn: str, pg_conn: psycopg.Connection, pg_schema: str
) -> None:
    # What a trigger serialized by an earlier release asks for.
    create_collection(pg_conn, pg_schema, "docs", 100)

    event = await build_index(pg_dsn, _params(pg_schema), 100, 0.05, 60, log)

    assert event["status"] == "success" and event["builds_started"] == 1 and "keyword_index_name" not in event
    assert indexes_on(pg_conn, pg_schema, "docs", "content_tsv") == []
