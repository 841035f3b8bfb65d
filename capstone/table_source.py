"""A Postgres table as a collection's source: its changes captured, read and acknowledged.

A collection with ``source.table`` follows that table, one document per row (the ``id`` column is
the document id, ``content`` is chunked, the ``metadata`` columns become the chunks' metadata).
Changes are captured in the table's own database, in the ``capstone`` schema:

* ``capstone.source_changes`` is the queue: one row per changed document id, written by triggers
  on the followed table in the same transaction as the change (so a change is queued if and only
  if it commits), each followed by ``NOTIFY capstone_source_changes, '<collection>'`` (Postgres
  sends one per transaction and collection however many rows changed);
* ``capstone.table_sources`` says per collection which table and columns are captured and whether
  the whole table still has to be read (``snapshot``: ``pending``, the run key reading it, ``done``).

The first run of the collection installs the capture (a ``SECURITY DEFINER`` function, so that the
application's roles need no privilege on the queue; an ``AFTER INSERT OR DELETE`` trigger, an
``AFTER UPDATE`` trigger on the captured columns that fires only when one of them changed, and an
``AFTER TRUNCATE`` trigger that asks for a new snapshot), then reads the whole table. Every later
run *claims* the queued ids (marks them with its run key, committed at once), reads those rows
(an id whose row is gone is a tombstone), and :func:`acknowledge` deletes the claimed entries only
after the upsert committed. A run that fails leaves its claims in place: the next run claims them
again, and re-reading a row whose text did not change embeds nothing. So no change is lost across a
crash, a triggerer restart or a paused DAG; some may be read twice.

Installing needs ``CREATE`` on the database (for the ``capstone`` schema, once) and the
``TRIGGER`` privilege on the table (or owning it); without them :class:`CaptureRefused` names the
``GRANT`` that is missing, and the other way:

A table followed by its ``updated_at`` column (``source.table.updated_at``) needs only ``SELECT``
and nothing in its database: :class:`WatermarkChanges` reads the rows updated since the last run's
mark (less ``lookback_seconds``) and the table's ids (deletes), and keeps the mark in
``capstone.table_watermarks`` of the *store's* database, made current by
:func:`acknowledge_watermark` after the upsert.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import psycopg
from psycopg import sql

from capstone.connections import connect, postgres_params
from capstone.errors import TerminalError
from capstone.settings import TableSourceSettings
from capstone.table_watch import CHANNEL, capture_fingerprint

__all__ = [
    "CaptureRefused",
    "SourceTableInvalid",
    "TableChanges",
    "WatermarkChanges",
    "acknowledge",
    "acknowledge_watermark",
    "install_capture",
    "remove_capture",
]

log = logging.getLogger(__name__)

# Ids read per query when a run reads the rows of its claimed changes.
READ_IDS_PER_QUERY = 5000
# Text types a content column may have: anything else is refused when the capture is installed.
_TEXT_TYPES = ("text", "character varying", "character", "citext", "name")
# The other way, for refusals of the capture.
_WITHOUT_TRIGGERS = (
    "; or, where no trigger may be created on it, follow it by a column the application sets on "
    "every insert and update: source.table.updated_at (see README, Follow a table)"
)
# Types an updated_at column may have (following a table without triggers).
_TIME_TYPES = ("timestamp with time zone", "timestamp without time zone")

_SCHEMA_DDL = """
CREATE SCHEMA IF NOT EXISTS capstone;
CREATE TABLE IF NOT EXISTS capstone.source_changes (
    seq bigserial PRIMARY KEY,
    collection text NOT NULL,
    document_id text NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    run_key text
);
CREATE INDEX IF NOT EXISTS source_changes_by_collection ON capstone.source_changes (collection, seq);
CREATE TABLE IF NOT EXISTS capstone.table_sources (
    collection text PRIMARY KEY,
    source text NOT NULL,
    capture text NOT NULL,
    snapshot text NOT NULL DEFAULT 'pending',
    installed_at timestamptz NOT NULL DEFAULT now()
)
"""


class CaptureRefused(TerminalError):
    """The connection's role may not install the change capture: a privilege is missing."""


class SourceTableInvalid(TerminalError):
    """``source.table`` names a table or column that is not there, or a content column that is
    not text."""


def _names(collection: str) -> dict[str, sql.Identifier]:
    """The capture's function and trigger names: hashed, as a collection name may use 63 bytes."""
    key = hashlib.sha256(collection.encode()).hexdigest()[:12]
    return {
        "function": sql.Identifier("capstone", f"capture_{key}"),
        "truncate_function": sql.Identifier("capstone", f"capture_truncate_{key}"),
        "write": sql.Identifier(f"capstone_{key}_write"),
        "update": sql.Identifier(f"capstone_{key}_update"),
        "truncate": sql.Identifier(f"capstone_{key}_truncate"),
    }


def _table(source: TableSourceSettings) -> sql.Identifier:
    return sql.Identifier(source.schema, source.table)


# -- installing -----------------------------------------------------------------------------------


def install_capture(conn: psycopg.Connection, collection: str, source: TableSourceSettings) -> bool:
    """Install (or bring up to date) the capture of ``source`` for ``collection``; returns whether
    the whole table must be read (a new capture, a changed one, or a snapshot not finished)."""
    fingerprint = capture_fingerprint(source)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('capstone.table_sources'))")
        row = None
        if conn.execute("SELECT to_regclass('capstone.table_sources')").fetchone() != (None,):
            row = conn.execute(
                "SELECT source, capture, snapshot FROM capstone.table_sources WHERE collection = %s",
                (collection,),
            ).fetchone()
        if row is not None and row[1] == fingerprint:
            return bool(row[2] != "done")
        id_type = _check_columns(conn, source)
        _create_queue(conn, source)
        if row is not None and row[0] != source.qualified:
            _drop_triggers(conn, collection, row[0])
        _create_triggers(conn, collection, source, id_type)
        conn.execute(
            "INSERT INTO capstone.table_sources (collection, source, capture) VALUES (%s, %s, %s) "
            "ON CONFLICT (collection) DO UPDATE SET source = excluded.source, capture = excluded.capture, "
            "snapshot = 'pending', installed_at = now()",
            (collection, source.qualified, fingerprint),
        )
    log.info("capturing the changes of %s for collection %s (%s)", source.qualified, collection, fingerprint)
    return True


def _create_queue(conn: psycopg.Connection, source: TableSourceSettings) -> None:
    """The queue and catalog tables, where they are missing (IF NOT EXISTS alone would still ask
    for the privilege to create them)."""
    present = conn.execute(
        "SELECT to_regnamespace('capstone') IS NOT NULL "
        "AND to_regclass('capstone.source_changes') IS NOT NULL "
        "AND to_regclass('capstone.table_sources') IS NOT NULL"
    ).fetchone()
    if present == (True,):
        return
    try:
        if conn.execute("SELECT to_regnamespace('capstone')").fetchone() != (None,):
            conn.execute(_SCHEMA_DDL.split(";", 1)[1])
        else:
            conn.execute(_SCHEMA_DDL)
    except psycopg.errors.InsufficientPrivilege as exc:
        database = sql.Identifier(conn.info.dbname)
        raise CaptureRefused(
            f"following {source.qualified} needs a 'capstone' schema in its database, and the role of "
            f"connection {source.connection_id!r} may not create it ({exc.diag.message_primary}): "
            f"{_grant(conn, 'CREATE', sql.SQL('DATABASE {}').format(database))} (once)"
        ) from None


def _check_columns(
    conn: psycopg.Connection, source: TableSourceSettings, privileges: tuple[str, ...] = ("SELECT", "TRIGGER")
) -> str:
    """Check the table, its columns and the role's ``privileges`` on it; returns the id column's type."""
    columns: dict[str, str] = dict(
        conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            (_table(source).as_string(conn),),
        ).fetchall()
    )
    if not columns:
        raise SourceTableInvalid(
            f"source.table.name: {source.qualified} does not exist (or is not visible to the role of "
            f"connection {source.connection_id!r}): check the name, and that the role may read it"
        )
    wanted = {"id": source.id_column, "content": source.content_column}
    wanted.update({f"metadata ({name})": name for name in source.metadata_columns})
    if source.updated_at_column is not None:
        wanted["updated_at"] = source.updated_at_column
    for field, column in wanted.items():
        if column not in columns:
            raise SourceTableInvalid(
                f"source.table.{field.split(' ')[0]}: {source.qualified} has no column {column!r} "
                f"(its columns: {', '.join(sorted(columns))})"
            )
    content_type = columns[source.content_column].split("(")[0]
    if content_type not in _TEXT_TYPES:
        raise SourceTableInvalid(
            f"source.table.content: column {source.content_column!r} of {source.qualified} is "
            f"{content_type}, not text: name a text column (or a view that casts it)"
        )
    if (
        source.updated_at_column is not None
        and re.sub(r"\(\d+\)", "", columns[source.updated_at_column]) not in _TIME_TYPES
    ):
        raise SourceTableInvalid(
            f"source.table.updated_at: column {source.updated_at_column!r} of {source.qualified} is "
            f"{columns[source.updated_at_column]}, not a timestamp: name the column the application "
            "sets to now() on every insert and update"
        )
    for privilege in privileges:
        allowed = conn.execute(
            "SELECT has_table_privilege(to_regclass(%s), %s)", (_table(source).as_string(conn), privilege)
        ).fetchone()
        if not (allowed and allowed[0]):
            raise CaptureRefused(
                f"role {conn.info.user} (connection {source.connection_id!r}) lacks the {privilege} "
                f"privilege on {source.qualified}, which following the table needs: "
                f"{_grant(conn, privilege, _table(source))}"
                + (_WITHOUT_TRIGGERS if privilege == "TRIGGER" else "")
            )
    return str(columns[source.id_column])


def _create_triggers(
    conn: psycopg.Connection, collection: str, source: TableSourceSettings, id_type: str
) -> None:
    names, table, doc_id = _names(collection), _table(source), sql.Identifier(source.id_column)
    captured = [source.id_column, source.content_column, *source.metadata_columns]
    changed = sql.SQL(" OR ").join(
        sql.SQL("OLD.{0} IS DISTINCT FROM NEW.{0}").format(sql.Identifier(column)) for column in captured
    )
    statements = [
        _FUNCTION.format(
            function=names["function"],
            collection=sql.Literal(collection),
            id=doc_id,
            channel=sql.Literal(CHANNEL),
        ),
        _TRUNCATE_FUNCTION.format(
            function=names["truncate_function"],
            collection=sql.Literal(collection),
            channel=sql.Literal(CHANNEL),
        ),
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(names["write"], table),
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(names["update"], table),
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(names["truncate"], table),
        sql.SQL("CREATE TRIGGER {} AFTER INSERT OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
            names["write"], table, names["function"]
        ),
        sql.SQL(
            "CREATE TRIGGER {} AFTER UPDATE OF {} ON {} FOR EACH ROW WHEN ({}) EXECUTE FUNCTION {}()"
        ).format(
            names["update"],
            sql.SQL(", ").join(sql.Identifier(column) for column in dict.fromkeys(captured)),
            table,
            changed,
            names["function"],
        ),
        sql.SQL("CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()").format(
            names["truncate"], table, names["truncate_function"]
        ),
    ]
    try:
        for statement in statements:
            conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise CaptureRefused(
            f"the role of connection {source.connection_id!r} may not create the capture on "
            f"{source.qualified} ({exc.diag.message_primary}): "
            f"{_grant(conn, 'TRIGGER', _table(source))}, and "
            f"{_grant(conn, 'CREATE', sql.SQL('SCHEMA capstone'))}" + _WITHOUT_TRIGGERS
        ) from None
    log.debug("capture of %s (id %s) installed", source.qualified, id_type)


def _grant(conn: psycopg.Connection, privilege: str, on: sql.Composable) -> str:
    """The statement that grants the connection's role ``privilege`` on ``on``, for messages."""
    statement = sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(privilege), on, sql.Identifier(conn.info.user))
    return statement.as_string(conn)


# Runs as its owner (SECURITY DEFINER): the application's roles write the queue through it only.
_FUNCTION = sql.SQL("""
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $capture$
BEGIN
    IF TG_OP = 'INSERT' OR TG_OP = 'UPDATE' THEN
        INSERT INTO capstone.source_changes (collection, document_id) VALUES ({collection}, NEW.{id}::text);
    END IF;
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.{id} IS DISTINCT FROM NEW.{id}) THEN
        INSERT INTO capstone.source_changes (collection, document_id) VALUES ({collection}, OLD.{id}::text);
    END IF;
    PERFORM pg_notify({channel}, {collection});
    RETURN NULL;
END
$capture$""")

_TRUNCATE_FUNCTION = sql.SQL("""
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $capture$
BEGIN
    UPDATE capstone.table_sources SET snapshot = 'pending' WHERE collection = {collection};
    PERFORM pg_notify({channel}, {collection});
    RETURN NULL;
END
$capture$""")


def _drop_triggers(conn: psycopg.Connection, collection: str, qualified: str) -> None:
    """Drop the capture triggers from the table the collection followed before."""
    names = _names(collection)
    schema, _, table = qualified.partition(".")
    if conn.execute(
        "SELECT to_regclass(%s)", (sql.Identifier(schema, table).as_string(conn),)
    ).fetchone() == (None,):
        return
    for trigger in ("write", "update", "truncate"):
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(names[trigger], sql.Identifier(schema, table))
        )


def remove_capture(conn: psycopg.Connection, collection: str) -> bool:
    """Stop capturing for ``collection`` in ``conn``'s database: drop its triggers and functions,
    its queued changes and its catalog row, and its mark where it followed a table by updated_at
    (a collection that no longer follows a table, or a test's clean slate). The next run that
    follows a table installs a new capture and reads it whole. Returns whether there was one."""
    with conn.transaction():
        if conn.execute("SELECT to_regclass('capstone.table_watermarks')").fetchone() != (None,):
            conn.execute("DELETE FROM capstone.table_watermarks WHERE collection = %s", (collection,))
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('capstone.table_sources'))")
        if conn.execute("SELECT to_regclass('capstone.table_sources')").fetchone() == (None,):
            return False
        row = conn.execute(
            "DELETE FROM capstone.table_sources WHERE collection = %s RETURNING source", (collection,)
        ).fetchone()
        conn.execute("DELETE FROM capstone.source_changes WHERE collection = %s", (collection,))
        if row is not None:
            _drop_triggers(conn, collection, row[0])
        names = _names(collection)
        for function in ("function", "truncate_function"):
            conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(names[function]))
    return row is not None


# -- reading --------------------------------------------------------------------------------------


class TableChanges:
    """What one run reads from the followed table: the whole table (first run, a changed capture,
    after a TRUNCATE) or the rows of the changes it claimed."""

    def __init__(
        self,
        collection: str,
        source: TableSourceSettings,
        run_key: str,
        indexed_ids: Callable[[], Iterable[str]],
    ) -> None:
        """``indexed_ids`` lists the document ids the collection holds: a snapshot removes those the
        table does not (a collection that follows a table mirrors it)."""
        self._collection = collection
        self._source = source
        self._run_key = run_key
        self._indexed_ids = indexed_ids
        self.claimed = 0
        self.snapshot = False

    def describe(self) -> str:
        return f"table {self._source.qualified}"

    def summary(self) -> str:
        """What the run read, once it did: for the run's ``sources``."""
        read = "all rows" if self.snapshot else f"{self.claimed} captured changes"
        return f"{self.describe()} ({read})"

    def records(self) -> Iterator[tuple[str, Any]]:
        """``(where, raw_document)`` for every row to (re-)index; a tombstone for a claimed id whose
        row is gone."""
        params = postgres_params(self._source.connection_id)
        with connect(params, application_name=f"capstone {self._collection} source") as conn:
            self.snapshot = install_capture(conn, self._collection, self._source)
            ids = self._claim(conn)
            id_type = _column_type(conn, self._source, self._source.id_column, "id")
            if self.snapshot:
                log.info("reading all of %s (%d queued changes included)", self._source.qualified, len(ids))
                found = yield from self._read(conn, id_type, None)
                gone = sorted(set(self._indexed_ids()) - found)
                if gone:
                    log.info(
                        "%d indexed documents are not in %s: removing them", len(gone), self._source.qualified
                    )
                yield from self._tombstones(gone)
                return
            log.info("reading %d changed rows of %s", len(ids), self._source.qualified)
            for start in range(0, len(ids), READ_IDS_PER_QUERY):
                wanted = ids[start : start + READ_IDS_PER_QUERY]
                found = yield from self._read(conn, id_type, wanted)
                yield from self._tombstones(sorted(set(wanted) - found))

    def _tombstones(self, ids: list[str]) -> Iterator[tuple[str, Any]]:
        for doc_id in ids:
            yield f"{self._source.qualified}:{doc_id}", {"id": doc_id, "deleted": True}

    def _claim(self, conn: psycopg.Connection) -> list[str]:
        """Mark every queued change of the collection with this run's key (committed); their ids."""
        with conn.transaction():
            if self.snapshot:
                conn.execute(
                    "UPDATE capstone.table_sources SET snapshot = %s WHERE collection = %s",
                    (self._run_key, self._collection),
                )
            rows = conn.execute(
                "UPDATE capstone.source_changes SET run_key = %s WHERE collection = %s RETURNING document_id",
                (self._run_key, self._collection),
            ).fetchall()
        self.claimed = len(rows)
        return sorted({row[0] for row in rows})

    def _read(
        self, conn: psycopg.Connection, id_type: str, ids: list[str] | None
    ) -> Generator[tuple[str, Any], None, set[str]]:
        """The rows of ``ids`` (all rows for None); returns the ids found."""
        if ids is None:
            return (yield from self._select(conn, sql.SQL(""), ()))
        # Cast to the id column's type (from the catalog), so that its index finds the rows.
        where = sql.SQL(" WHERE {} = ANY(%s::text[]::{}[])").format(
            sql.Identifier(self._source.id_column), sql.SQL(id_type)
        )
        return (yield from self._select(conn, where, (ids,)))

    def _select(
        self, conn: psycopg.Connection, where: sql.Composable, args: tuple[Any, ...]
    ) -> Generator[tuple[str, Any], None, set[str]]:
        """The rows ``where`` selects, as raw documents; returns their ids."""
        source = self._source
        columns = sql.SQL("{}::text, {}, {}").format(
            sql.Identifier(source.id_column), sql.Identifier(source.content_column), _metadata_sql(source)
        )
        query = sql.SQL("SELECT {} FROM {}").format(columns, _table(source)) + where
        found: set[str] = set()
        with conn.transaction(), conn.cursor(name=f"source_{self._run_key}") as cur:
            cur.itersize = 2000
            cur.execute(query, args)
            for doc_id, content, metadata in cur:
                found.add(doc_id)
                yield f"{source.qualified}:{doc_id}", {"id": doc_id, "content": content, "metadata": metadata}
        return found


def _column_type(conn: psycopg.Connection, source: TableSourceSettings, column: str, field: str) -> str:
    """The type of ``column`` (spec field ``source.table.<field>``) as the catalog writes it."""
    row = conn.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass(%s) "
        "AND attname = %s AND NOT attisdropped",
        (_table(source).as_string(conn), column),
    ).fetchone()
    if row is None:
        raise SourceTableInvalid(f"source.table.{field}: {source.qualified} has no column {column!r}")
    return str(row[0])


def _metadata_sql(source: TableSourceSettings) -> sql.Composable:
    if not source.metadata_columns:
        return sql.SQL("'{}'::jsonb")
    pairs = sql.SQL(", ").join(
        sql.SQL("{}, {}").format(sql.Literal(column), sql.Identifier(column))
        for column in source.metadata_columns
    )
    return sql.SQL("jsonb_build_object({})").format(pairs)


# -- following a table without triggers (updated_at) -------------------------------------------

# In the store's database (the collection's, where the run may create tables): per collection
# followed by updated_at, the mark and row count of the last run that wrote, and those a run read
# and will make current once its writes committed (``pending_*``, by run key).
_WATERMARKS_DDL = """
CREATE SCHEMA IF NOT EXISTS capstone;
CREATE TABLE IF NOT EXISTS capstone.table_watermarks (
    collection text PRIMARY KEY,
    source text NOT NULL,
    capture text,
    mark text,
    row_count bigint,
    pending_run text,
    pending_capture text,
    pending_mark text,
    pending_count bigint,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""
WATERMARK_STATE_SQL = "SELECT capture, mark, row_count FROM capstone.table_watermarks WHERE collection = %s"


class WatermarkChanges(TableChanges):
    """What one run reads from a table followed by its ``updated_at`` column (no triggers).

    The first run (or one after the columns changed) reads the whole table. Every later run reads
    the rows whose ``updated_at`` is later than the last mark less ``lookback_seconds`` (a
    transaction that set ``updated_at`` and committed after a later one is read all the same, if it
    committed within that window), and the table's ids: an indexed document whose id is gone is
    removed. The mark, the row count, the rows and the ids come from one snapshot of the table
    (``REPEATABLE READ``); the new mark becomes current in :func:`acknowledge_watermark`, after
    the upsert.
    """

    def __init__(
        self,
        collection: str,
        source: TableSourceSettings,
        run_key: str,
        indexed_ids: Callable[[], Iterable[str]],
        store_connection_id: str,
    ) -> None:
        super().__init__(collection, source, run_key, indexed_ids)
        self._store_connection_id = store_connection_id

    def summary(self) -> str:
        lookback = f" less {self._source.lookback_seconds:g}s" if self._source.lookback_seconds else ""
        read = "all rows" if self.snapshot else f"{self.claimed} rows updated since the last mark{lookback}"
        return f"{self.describe()} ({read}, by {self._source.updated_at_column})"

    def records(self) -> Iterator[tuple[str, Any]]:
        source, fingerprint = self._source, capture_fingerprint(self._source)
        with connect(postgres_params(self._store_connection_id), application_name="capstone watermark") as st:
            last = _watermark_row(st, self._collection, source)
        self.snapshot = last is None or last[0] != fingerprint or last[1] is None
        params = postgres_params(source.connection_id)
        with connect(params, application_name=f"capstone {self._collection} source") as conn:
            id_type = _check_columns(conn, source, privileges=("SELECT",))
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction():  # one snapshot: the mark, the count, the rows and the ids agree
                mark, count = _mark_and_count(conn, source)
                if self.snapshot or last is None:
                    log.info("reading all of %s (mark %s, %d rows)", source.qualified, mark, count)
                    present = yield from self._read(conn, id_type, None)
                else:
                    log.info(
                        "reading the rows of %s updated after %s (less %gs)",
                        source.qualified,
                        last[1],
                        source.lookback_seconds,
                    )
                    found = yield from self._select(
                        conn, _updated_since(source, conn), (last[1], source.lookback_seconds)
                    )
                    self.claimed = len(found)
                    present = _all_ids(conn, source)
        gone = sorted(set(self._indexed_ids()) - present)
        if gone:
            log.info("%d indexed documents are not in %s: removing them", len(gone), source.qualified)
        yield from self._tombstones(gone)
        with connect(postgres_params(self._store_connection_id), application_name="capstone watermark") as st:
            st.execute(
                "UPDATE capstone.table_watermarks SET pending_run = %s, pending_capture = %s, "
                "pending_mark = %s, pending_count = %s, updated_at = now() WHERE collection = %s",
                (self._run_key, fingerprint, mark, count, self._collection),
            )


def _watermark_row(
    conn: psycopg.Connection, collection: str, source: TableSourceSettings
) -> tuple[str | None, str | None, int | None] | None:
    """``(capture, mark, row_count)`` of the last run that wrote (None: never), creating the catalog
    and the collection's row where they are missing."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('capstone.table_watermarks'))")
        if conn.execute("SELECT to_regclass('capstone.table_watermarks')").fetchone() == (None,):
            for statement in _WATERMARKS_DDL.split(";"):
                conn.execute(statement)
        conn.execute(
            "INSERT INTO capstone.table_watermarks (collection, source) VALUES (%s, %s) "
            "ON CONFLICT (collection) DO UPDATE SET source = excluded.source",
            (collection, source.qualified),
        )
        row = conn.execute(WATERMARK_STATE_SQL, (collection,)).fetchone()
    return None if row is None or row[0] is None else (row[0], row[1], row[2])


def _mark_and_count(conn: psycopg.Connection, source: TableSourceSettings) -> tuple[str | None, int]:
    """The table's newest ``updated_at`` (as text: its own type's rendering) and its row count."""
    row = conn.execute(
        sql.SQL("SELECT max({})::text, count(*) FROM {}").format(
            sql.Identifier(str(source.updated_at_column)), _table(source)
        )
    ).fetchone()
    return (row[0], int(row[1])) if row else (None, 0)


def _updated_since(source: TableSourceSettings, conn: psycopg.Connection) -> sql.Composable:
    """``WHERE updated_at > mark - lookback`` in the column's own type (the mark is its text), so
    that an index on the column serves it."""
    column = str(source.updated_at_column)
    kind = _column_type(conn, source, column, "updated_at")
    return sql.SQL(" WHERE {} > %s::{} - make_interval(secs => %s)").format(
        sql.Identifier(column), sql.SQL(kind)
    )


def _all_ids(conn: psycopg.Connection, source: TableSourceSettings) -> set[str]:
    query = sql.SQL("SELECT {}::text FROM {}").format(sql.Identifier(source.id_column), _table(source))
    return {row[0] for row in conn.execute(query)}


# -- acknowledging --------------------------------------------------------------------------------


def acknowledge(collection: str, source: TableSourceSettings, run_key: str) -> int:
    """Delete the changes ``run_key`` claimed (its writes committed) and finish its snapshot;
    returns how many queue entries went."""
    if source.updated_at_column is not None:
        raise ValueError("a table followed by updated_at is acknowledged by acknowledge_watermark")
    params = postgres_params(source.connection_id)
    with connect(params, application_name=f"capstone {collection} source") as conn, conn.transaction():
        if conn.execute("SELECT to_regclass('capstone.source_changes')").fetchone() == (None,):
            return 0
        deleted = conn.execute(
            "DELETE FROM capstone.source_changes WHERE collection = %s AND run_key = %s",
            (collection, run_key),
        ).rowcount
        conn.execute(
            "UPDATE capstone.table_sources SET snapshot = 'done' WHERE collection = %s AND snapshot = %s",
            (collection, run_key),
        )
    log.info("acknowledged %d captured changes of %s", deleted, source.qualified)
    return deleted


def acknowledge_watermark(collection: str, store_connection_id: str, run_key: str) -> bool:
    """The writes of ``run_key`` committed: the mark and row count it read become current (the
    next run reads from there, the watching trigger compares the table with them). Returns whether
    the run had read any (a run that failed before reading has nothing to acknowledge)."""
    params = postgres_params(store_connection_id)
    with connect(params, application_name="capstone watermark") as conn:
        if conn.execute("SELECT to_regclass('capstone.table_watermarks')").fetchone() == (None,):
            return False
        row = conn.execute(
            "UPDATE capstone.table_watermarks SET capture = pending_capture, mark = pending_mark, "
            "row_count = pending_count, pending_run = NULL, updated_at = now() "
            "WHERE collection = %s AND pending_run = %s RETURNING mark, row_count",
            (collection, run_key),
        ).fetchone()
    if row is not None:
        log.info("collection %s: at mark %s, %d rows", collection, row[0], row[1])
    return row is not None
