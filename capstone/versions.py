"""Versioned collections: one table per embedding fingerprint, behind a stable name.

Consumers query ``store.schema.store.table``. That name is a view over the *live* version's table,
``<table>__v<N>``; each embedding fingerprint (:func:`capstone.settings.embedding_fingerprint`:
provider, model, revision, dimension, normalisation, vector type) has its own version. The
catalog ``capstone.collection_versions`` lists them:

- ``live``: the version the view reads. A run whose spec has the live fingerprint writes to it in
  place, as an unversioned table would be written.
- ``building``: a run whose spec names a new fingerprint creates version N+1 beside the live one and
  *seeds* it: every chunk of the live version (its own content and metadata, no upstream replay)
  plus the run's new batches is embedded into it. Its indexes are built by the trigger and it is
  validated; only when no ``validation.fail_on`` check fails does :func:`switch` point the view at
  it, in one short transaction that also updates the catalog and the search registry. Until then
  the view, searches and validation of the live version answer from the old model. Later runs with
  the same spec go on writing to the building version until it switches.
- ``retired``: a version the view read before; ``store.keep_versions`` of them are kept (the
  newest), the others dropped after a switch. ``python -m capstone rollback`` switches back to one.
- ``rolled_back``: a version switched away from by ``rollback``. A run whose spec still names its
  fingerprint fails and says how to go on (restore the YAML, or roll forward).

Tables of earlier releases (a plain table at the stable name) are adopted as version 1 without
copying: renamed to ``<table>__v1`` with their indexes, and the view created in their place, in one
transaction. Their chunk hashes were computed over the model name: the version keeps that as its
``hash_key``, so adopting re-embeds nothing.

The switch takes an exclusive lock on the view only (not on any table): readers wait for it for
the length of one ``CREATE OR REPLACE VIEW`` and a few catalog updates (milliseconds); it waits
for running queries of the view at most ``SWITCH_LOCK_TIMEOUT`` and retries.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from capstone import store
from capstone.contracts import VersionRef
from capstone.errors import TerminalError
from capstone.settings import TEXT_SEARCH_COLUMN, CollectionSettings, embedding_fingerprint

__all__ = [
    "CATALOG_TABLE",
    "SWITCH_LOCK_TIMEOUT",
    "EmbeddingChangedDuringRun",
    "NoVersionToRollBackTo",
    "SeedingInProgress",
    "StableNameTaken",
    "SwitchRefused",
    "SwitchResult",
    "SwitchTimeout",
    "Version",
    "VersionRolledBack",
    "check_embedding_unchanged",
    "claim_seeding",
    "ensure_catalog",
    "hash_key_for",
    "list_versions",
    "record_failed_validation",
    "remember_record",
    "resolve",
    "rollback",
    "seed_source",
    "switch",
    "version_settings",
    "version_table_name",
]

log = logging.getLogger(__name__)

CATALOG_TABLE = "collection_versions"
_CATALOG = sql.Identifier(store.STAGING_SCHEMA, CATALOG_TABLE)
_CATALOG_LOCK = 7_245_021_115  # advisory lock serialising the catalog's creation
SWITCH_LOCK_TIMEOUT = "5s"  # how long a switch waits for queries of the view before trying again
_SWITCH_ATTEMPTS = 3
_RENAME_LOCK_TIMEOUT = "5s"  # adopting a table renames it: readers queue behind it at most this long
# 63 bytes (Postgres's identifier limit) less the longest index suffix, "_ivfflat_<8 hex digits>".
_VERSION_TABLE_BYTES = 63 - len("_ivfflat_00000000")
# The view's columns, in this order whatever the version table's physical order: CREATE OR REPLACE
# VIEW keeps dependent views of consumers working when the columns stay the same.
_VIEW_COLUMNS = (
    "id",
    "document_id",
    "chunk_index",
    "content",
    "metadata",
    "content_hash",
    "embedding",
    "embedding_model",
    "updated_at",
    TEXT_SEARCH_COLUMN,
)
Status = Literal["live", "building", "retired", "rolled_back"]


class StableNameTaken(TerminalError, ValueError):
    """The collection's stable name is something capstone did not create (a view, a foreign table)."""


class VersionRolledBack(TerminalError, RuntimeError):
    """The spec names the embedding of a version that ``capstone rollback`` switched away from."""


class NoVersionToRollBackTo(TerminalError, LookupError):
    """``rollback`` found no kept version to switch to."""


class SwitchRefused(TerminalError, RuntimeError):
    """The version to switch to is no longer the one this run built (a rollback or another run
    switched meanwhile)."""


class SwitchTimeout(RuntimeError):
    """The view stayed busy (long queries of it) through every try; nothing was switched."""


@dataclass(frozen=True)
class Version:
    """One version of a collection: its own table, the fingerprint of the vectors it holds."""

    schema: str
    stable: str
    number: int
    table: str
    fingerprint: str
    hash_key: str
    status: Status
    seeded: bool
    model: str
    dimension: int
    # The version whose rows this one takes on its next run (after a rollback: the one switched
    # away from), when it is live but not ``seeded``.
    seed_from: int | None = None

    @property
    def ref(self) -> VersionRef:
        """What the DAG's tasks pass on about the version a run writes to (XCom)."""
        return {
            "number": self.number,
            "table": self.table,
            "status": self.status,
            "seeded": self.seeded,
            "hash_key": self.hash_key,
            "fingerprint": self.fingerprint,
        }

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class SwitchResult:
    """What a switch did: the version now live, the one before, how long the view was locked."""

    live: int
    previous: int | None
    lock_ms: float
    dropped: tuple[str, ...]


def version_table_name(stable: str, number: int) -> str:
    """``<stable>__v<number>``, the stable name shortened (never the suffix) so that the names of the
    version's indexes (``<table>_ivfflat_<hash>``, the longest) keep the version number."""
    suffix = f"__v{number}"
    room = _VERSION_TABLE_BYTES - len(suffix.encode())
    return stable.encode()[:room].decode("utf-8", "ignore") + suffix


def version_settings(settings: CollectionSettings, ref: VersionRef) -> CollectionSettings:
    """The collection's settings with ``store.table`` the version's table: what the store, the index
    build and validation work on (the stable name stays in the spec)."""
    return dataclasses.replace(settings, store=dataclasses.replace(settings.store, table=ref["table"]))


# -- the catalog ------------------------------------------------------------------------------


# Columns the catalog gained after it was first created, with their types.
_ADDED_COLUMNS = {"seed_from": "int", "seeding_run": "text"}


def ensure_catalog(conn: psycopg.Connection) -> None:
    """Create ``capstone.collection_versions`` if missing, or add the columns it lacks (safe when
    several tasks do it at once)."""
    present = {
        row[0]
        for row in conn.execute(
            "SELECT attname FROM pg_attribute"
            " WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            (f"capstone.{CATALOG_TABLE}",),
        )
    }
    if present and not _ADDED_COLUMNS.keys() - present:
        return
    store.ensure_staging(conn)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CATALOG_LOCK,))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " schema_name text NOT NULL, stable_name text NOT NULL, version int NOT NULL,"
                " table_name text NOT NULL, fingerprint text NOT NULL, hash_key text NOT NULL,"
                " status text NOT NULL, seeded boolean NOT NULL DEFAULT false,"
                " model text NOT NULL, dimension int NOT NULL, embedding jsonb NOT NULL,"
                " record jsonb, last_validation jsonb,"
                " created_at timestamptz NOT NULL DEFAULT now(), live_from timestamptz,"
                " live_until timestamptz, PRIMARY KEY (schema_name, stable_name, version))"
            ).format(_CATALOG)
        )
        for column, kind in _ADDED_COLUMNS.items():
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    _CATALOG, sql.Identifier(column), sql.SQL(kind)
                )
            )


def has_catalog(conn: psycopg.Connection) -> bool:
    """Whether this database has a version catalog (a collection of it ran once)."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"capstone.{CATALOG_TABLE}",)).fetchone()
    return bool(row and row[0])


def list_versions(conn: psycopg.Connection, schema: str, stable: str) -> list[Version]:
    """The versions of the collection at ``schema.stable``, oldest first (none without a catalog)."""
    if not has_catalog(conn):
        return []
    rows = conn.execute(
        sql.SQL(
            "SELECT version, table_name, fingerprint, hash_key, status, seeded, model, dimension, seed_from"
            " FROM {} WHERE schema_name = %s AND stable_name = %s ORDER BY version"
        ).format(_CATALOG),
        (schema, stable),
    ).fetchall()
    return [Version(schema, stable, *values) for values in rows]


def _lock(conn: psycopg.Connection, schema: str, stable: str) -> None:
    """Serialise version changes of one collection (transaction-scoped advisory lock)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (f"versions:{schema}.{stable}",))


def _set_status(conn: psycopg.Connection, version: Version, status: Status, **extra: Any) -> None:
    sets: list[sql.Composable] = [sql.SQL("status = %s")]
    values: list[Any] = [status]
    for column, value in extra.items():
        if value == "now()":
            sets.append(sql.SQL("{} = now()").format(sql.Identifier(column)))
        else:
            sets.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            values.append(value)
    conn.execute(
        sql.SQL("UPDATE {} SET {} WHERE schema_name = %s AND stable_name = %s AND version = %s").format(
            _CATALOG, sql.SQL(", ").join(sets)
        ),
        (*values, version.schema, version.stable, version.number),
    )


# -- which version a run writes to -----------------------------------------------------------


def spec_fingerprint(settings: CollectionSettings) -> str:
    """The embedding fingerprint of the spec (with the model's revision where the provider knows it)."""
    from capstone.embeddings.factory import model_revision

    revision = model_revision(settings.embedding)
    return embedding_fingerprint(settings.embedding, settings.store.vector_type, revision)


def hash_key_for(conn: psycopg.Connection, settings: CollectionSettings) -> str:
    """The key the chunks of a run with these settings are hashed with: the key of the version
    :func:`resolve` will pick, read without changing anything (the load task stages chunks before
    the version's table is created). Raises :class:`VersionRolledBack` like :func:`resolve`."""
    fingerprint = spec_fingerprint(settings)
    schema, stable = settings.store.schema, settings.store.table
    ensure_catalog(conn)
    existing = list_versions(conn, schema, stable)
    if existing:
        same = [version for version in existing if version.fingerprint == fingerprint]
        _refuse_rolled_back(settings, existing, same)
        return same[0].hash_key if same else fingerprint
    if _relation_kind(conn, schema, stable) == "r":
        matches, model, _dimension, _kind = _adoptable(conn, settings)
        return model if matches else fingerprint
    return fingerprint


def _refuse_rolled_back(settings: CollectionSettings, versions: list[Version], same: list[Version]) -> None:
    live = next((version for version in versions if version.status == "live"), None)
    for version in same:
        if version.status == "rolled_back":
            raise VersionRolledBack(
                f"collection {settings.collection}: version {version.number} ({version.model}, "
                f"{version.dimension} dimensions) was rolled back, and the spec still names its embedding. "
                f"Either restore the YAML's embedding to the live version's"
                f"{f' ({live.model}, {live.dimension} dimensions)' if live else ''}, or roll forward to it: "
                f"`python -m capstone rollback --collection {settings.collection} --to {version.number}`"
            )


class EmbeddingChangedDuringRun(TerminalError, RuntimeError):
    """The spec's embedding is not the one of the version the run's earlier tasks chose."""


def check_embedding_unchanged(settings: CollectionSettings, ref: VersionRef) -> None:
    """Refuse to write or switch when the spec's embedding fingerprint is no longer the version's:
    the YAML changed while the run was going on (or workers run different model packages)."""
    if ref["fingerprint"].startswith("adopted-"):
        return
    fingerprint = spec_fingerprint(settings)
    if fingerprint != ref["fingerprint"]:
        raise EmbeddingChangedDuringRun(
            f"collection {settings.collection}: this run writes to version {ref['number']} "
            f"(embedding {ref['fingerprint']}), but the spec now names embedding {fingerprint}: the YAML's "
            "embedding changed while the run went on, or this worker has another version of the model's "
            "package than the one that started the run. Nothing was written; trigger a new run"
        )


def resolve(conn: psycopg.Connection, settings: CollectionSettings) -> Version:
    """The version of the collection a run with these settings writes to, creating what is missing.

    - No version yet: a plain table at the stable name (an earlier release's) is adopted as version
      1; otherwise version 1 is created, live at once (there is nothing older to keep serving).
    - The live version has the spec's fingerprint: it.
    - A version being built has it: that one (the run adds its batches to it).
    - A rolled-back version has it: :class:`VersionRolledBack`.
    - Otherwise a new version is created beside the live one, ``building``, or a retired version
      with this fingerprint is rebuilt from where it was (only what changed since is embedded).
    Versions being built for a fingerprint the spec no longer names are abandoned: dropped, or, if
    they were live once, kept as retired.
    """
    schema, stable = settings.store.schema, settings.store.table
    fingerprint = spec_fingerprint(settings)
    ensure_catalog(conn)
    with conn.transaction():
        _lock(conn, schema, stable)
        versions = list_versions(conn, schema, stable)
        if not versions:
            version = _first_version(conn, settings, fingerprint)
            if version.fingerprint != fingerprint:  # an adopted table of another embedding
                version = _version_for(conn, settings, [version], fingerprint)
        else:
            version = _version_for(conn, settings, versions, fingerprint)
    _ensure_version_table(conn, settings, version)
    return version


def _ensure_version_table(conn: psycopg.Connection, settings: CollectionSettings, version: Version) -> None:
    """Create (or upgrade) the version's table, and keep the view's columns in step with the live
    version's table (say, its keyword column added by this release)."""
    table = version_settings(settings, version.ref).store_table
    store.ensure_collection_table(conn, table)
    live = live_version(conn, version.schema, version.stable)
    if version.status == "building" and live is not None and not _grants(conn, version.schema, version.table):
        # Searches read the live version's table directly: the roles that may, may read the new one.
        with conn.transaction():
            _grant(conn, version.schema, version.table, _grants(conn, version.schema, live.table))
    if version.status == "live" and _view_columns(conn, version.schema, version.stable) != _table_columns(
        conn, version.schema, version.table
    ):
        with conn.transaction():
            _lock(conn, version.schema, version.stable)
            if live_version(conn, version.schema, version.stable) == version:  # not switched meanwhile
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (SWITCH_LOCK_TIMEOUT,))
                _replace_view(conn, version)


def _first_version(conn: psycopg.Connection, settings: CollectionSettings, fingerprint: str) -> Version:
    schema, stable = settings.store.schema, settings.store.table
    kind = _relation_kind(conn, schema, stable)
    if kind == "r":
        return _adopt(conn, settings, fingerprint)
    if kind is not None:
        raise StableNameTaken(
            f"{schema}.{stable} exists and is not a table capstone created (relkind {kind!r}): the "
            "collection's name is the view capstone keeps over its live version; drop or rename it, "
            "or set store.table to another name"
        )
    version = _insert(conn, settings, 1, fingerprint, fingerprint, "live", seeded=True)
    store.ensure_collection_table(conn, version_settings(settings, version.ref).store_table)
    _replace_view(conn, version)
    log.info(
        "collection %s: created version 1 (%s) behind the view %s.%s",
        settings.collection,
        version.table,
        schema,
        stable,
    )
    return version


def _version_for(
    conn: psycopg.Connection, settings: CollectionSettings, versions: list[Version], fingerprint: str
) -> Version:
    live = next((version for version in versions if version.status == "live"), None)
    if live is not None and live.fingerprint == fingerprint:
        for abandoned in (v for v in versions if v.status == "building"):
            _abandon(conn, abandoned)
        return live
    same = [version for version in versions if version.fingerprint == fingerprint]
    _refuse_rolled_back(settings, versions, same)
    for abandoned in (v for v in versions if v.status == "building" and v.fingerprint != fingerprint):
        _abandon(conn, abandoned)
    building = next((version for version in same if version.status in ("building", "retired")), None)
    if building is not None:
        if building.status == "retired":
            log.info(
                "collection %s: the spec names the embedding of retired version %d again: rebuilding it "
                "from the live version (only chunks that changed since are embedded)",
                settings.collection,
                building.number,
            )
            _set_status(conn, building, "building", seeded=False)
            building = dataclasses.replace(building, status="building", seeded=False)
        return building
    if live is None:  # every version was dropped or rolled back by hand: start afresh, live at once
        number = max(version.number for version in versions) + 1
        version = _insert(conn, settings, number, fingerprint, fingerprint, "live", seeded=True)
        store.ensure_collection_table(conn, version_settings(settings, version.ref).store_table)
        _replace_view(conn, version)
        return version
    number = max(version.number for version in versions) + 1
    version = _insert(conn, settings, number, fingerprint, fingerprint, "building", seeded=False)
    log.warning(
        "collection %s: the embedding changed (%s, %d dimensions -> %s, %d dimensions): building version "
        "%d in %s.%s beside the live version %d; searches keep using version %d until version %d validates",
        settings.collection,
        live.model,
        live.dimension,
        settings.embedding.model,
        settings.embedding.dimension,
        number,
        version.schema,
        version.table,
        live.number,
        live.number,
        number,
    )
    return version


def _abandon(conn: psycopg.Connection, version: Version) -> None:
    """A version being built for an embedding the spec no longer names: dropped, unless it was live
    once (a retired version being rebuilt), which goes back to being a kept earlier version."""
    if version_record(conn, version) is not None:
        log.warning(
            "collection %s.%s: version %d is no longer being rebuilt (the spec names another embedding): "
            "kept as an earlier version",
            version.schema,
            version.stable,
            version.number,
        )
        _set_status(conn, version, "retired")
        return
    _drop(conn, version, "it was being built for an embedding the spec no longer names")


def _insert(
    conn: psycopg.Connection,
    settings: CollectionSettings,
    number: int,
    fingerprint: str,
    hash_key: str,
    status: Status,
    *,
    seeded: bool,
    table: str | None = None,
    model: str | None = None,
    dimension: int | None = None,
    adopting: bool = False,
) -> Version:
    version = Version(
        schema=settings.store.schema,
        stable=settings.store.table,
        number=number,
        table=table or version_table_name(settings.store.table, number),
        fingerprint=fingerprint,
        hash_key=hash_key,
        status=status,
        seeded=seeded,
        model=model or settings.embedding.model,
        dimension=dimension or settings.embedding.dimension,
    )
    if not adopting and _relation_kind(conn, version.schema, version.table) is not None:
        raise StableNameTaken(
            f"{version.qualified} already exists and is not a version capstone keeps of collection "
            f"{settings.collection}: drop or rename it, or set store.table to another name"
        )
    embedding = {
        **dataclasses.asdict(settings.embedding),
        "vector_type": settings.store.vector_type,
    }
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (schema_name, stable_name, version, table_name, fingerprint, hash_key, status,"
            " seeded, model, dimension, embedding, live_from) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
            " %s, CASE WHEN %s = 'live' THEN now() END)"
        ).format(_CATALOG),
        (
            version.schema,
            version.stable,
            number,
            version.table,
            fingerprint,
            hash_key,
            status,
            seeded,
            version.model,
            version.dimension,
            Jsonb(embedding),
            status,
        ),
    )
    return version


def _adopt(conn: psycopg.Connection, settings: CollectionSettings, fingerprint: str) -> Version:
    """Make an earlier release's plain table version 1: rename it and its indexes, and create the
    view in its place, in the caller's transaction (readers see the table or the view, never
    nothing). Nothing is copied or re-embedded."""
    schema, stable = settings.store.schema, settings.store.table
    same, model, dimension, kind = _adoptable(conn, settings)
    # A table of another embedding is version 1 of an unknown fingerprint: the spec's builds beside it.
    adopted_fingerprint = fingerprint if same else f"adopted-{dimension}-{kind}-{model}"[:200]
    target = version_table_name(stable, 1)
    if _relation_kind(conn, schema, target) is not None:
        raise StableNameTaken(
            f"cannot adopt {schema}.{stable} as version 1 of collection {settings.collection}: "
            f"{schema}.{target} already exists; drop or rename it"
        )
    grants = _grants(conn, schema, stable)
    _rename_with_indexes(conn, schema, stable, target)
    version = _insert(
        conn,
        settings,
        1,
        adopted_fingerprint,
        model,  # earlier releases hashed chunks over the model name
        "live",
        seeded=True,
        table=target,
        model=model,
        dimension=dimension,
        adopting=True,
    )
    _replace_view(conn, version)
    _grant(conn, schema, stable, grants)  # whoever read the table reads the view
    log.warning(
        "collection %s: adopted the table %s.%s of an earlier release as version 1 (renamed to %s with its "
        "indexes; nothing copied); %s.%s is now a view over the live version%s",
        settings.collection,
        schema,
        stable,
        target,
        schema,
        stable,
        ""
        if same
        else f": its vectors ({model}, {dimension} dimensions) are not the spec's, so this run "
        "builds the spec's embedding as version 2 beside it",
    )
    return version


def _adoptable(
    conn: psycopg.Connection, settings: CollectionSettings
) -> tuple[bool, str, int | None, str | None]:
    """(whether the plain table at the stable name holds the spec's embedding, the model its rows
    name, its dimension, its vector type)."""
    table = store.CollectionTable(
        settings.store.schema,
        settings.store.table,
        settings.embedding.dimension,
        settings.search.text_config,
        settings.store.vector_type,
    )
    dimension = store.stored_dimension(conn, table)
    kind = store.stored_vector_type(conn, table)
    sample = conn.execute(sql.SQL("SELECT embedding_model FROM {} LIMIT 1").format(table.ident)).fetchone()
    model = str(sample[0]) if sample else settings.embedding.model
    same = (dimension, kind, model) == (
        settings.embedding.dimension,
        settings.store.vector_type,
        settings.embedding.model,
    )
    return same, model, dimension, kind


def _rename_with_indexes(conn: psycopg.Connection, schema: str, table: str, target: str) -> None:
    """Rename ``schema.table`` to ``target`` and its capstone-managed indexes to the names they have
    on ``target`` (so that the trigger finds them built), waiting at most ``_RENAME_LOCK_TIMEOUT``
    for the table's readers."""
    from capstone.index_build import renamed_managed_index

    conn.execute("SELECT set_config('lock_timeout', %s, true)", (_RENAME_LOCK_TIMEOUT,))
    indexes = conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace"
        " WHERE n.nspname = %s AND t.relname = %s",
        (schema, table),
    ).fetchall()
    conn.execute(
        sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(schema, table), sql.Identifier(target))
    )
    for (name,) in indexes:
        new = renamed_managed_index(name, table, target)
        if new is None and name == f"{table[:50]}_document_id":
            new = f"{target[:50]}_document_id"
        if new is not None and new != name:
            conn.execute(
                sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                    sql.Identifier(schema, name), sql.Identifier(new)
                )
            )


# Table privileges GRANT accepts (aclexplode's privilege_type names): what is copied between versions.
_PRIVILEGES = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN"}
)


def _grants(conn: psycopg.Connection, schema: str, name: str) -> list[tuple[str | None, str]]:
    """(role, or None for PUBLIC; privilege) granted on ``schema.name`` to roles other than its owner."""
    rows = conn.execute(
        "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, a.privilege_type"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a"
        " WHERE n.nspname = %s AND c.relname = %s AND a.grantee <> c.relowner",
        (schema, name),
    ).fetchall()
    return [(row[0], str(row[1])) for row in rows]


def _grant(conn: psycopg.Connection, schema: str, name: str, grants: list[tuple[str | None, str]]) -> None:
    """Grant ``grants`` (from :func:`_grants`) on ``schema.name``: consumers' roles keep reading the
    collection through a new view or a new version's table."""
    for role, privilege in grants:
        if privilege in _PRIVILEGES:
            conn.execute(
                sql.SQL("GRANT {} ON {} TO {}").format(
                    sql.SQL(privilege),  # one of the names above
                    sql.Identifier(schema, name),
                    sql.SQL("PUBLIC") if role is None else sql.Identifier(role),
                )
            )


def _relation_kind(conn: psycopg.Connection, schema: str, name: str) -> str | None:
    row = conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    ).fetchone()
    return None if row is None else str(row[0])


def _table_columns(conn: psycopg.Connection, schema: str, name: str) -> list[tuple[str, str]]:
    """(name, type without typmod) of the view columns the table has, in the view's order."""
    rows: dict[str, str] = dict(
        conn.execute(
            "SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a"
            " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
            (schema, name),
        ).fetchall()
    )
    return [(column, str(rows[column]).rpartition(".")[2]) for column in _VIEW_COLUMNS if column in rows]


def _view_columns(conn: psycopg.Connection, schema: str, name: str) -> list[tuple[str, str]]:
    return _table_columns(conn, schema, name) if _relation_kind(conn, schema, name) == "v" else []


def _replace_view(conn: psycopg.Connection, version: Version) -> None:
    """Point the stable name at ``version``'s table (in the caller's transaction).

    ``CREATE OR REPLACE VIEW`` keeps views that depend on it; the embedding column is cast to its
    type without a dimension, so a new dimension is no change of the view's column types. A change
    from ``vector`` to ``halfvec`` is one: then the view is dropped and created again, which
    Postgres refuses while other views depend on it (the error says which).
    """
    columns = _table_columns(conn, version.schema, version.table)
    select = sql.SQL(", ").join(
        sql.SQL("{}::{} AS {}").format(sql.Identifier(name), sql.SQL(kind), sql.Identifier(name))
        if name == "embedding"  # the type is one of two names read from the catalog
        else sql.Identifier(name)
        for name, kind in columns
    )
    view = sql.Identifier(version.schema, version.stable)
    statement = sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT {} FROM {}").format(
        view, select, sql.Identifier(version.schema, version.table)
    )
    try:
        with conn.transaction():
            conn.execute(statement)
    except (psycopg.errors.InvalidTableDefinition, psycopg.errors.DatatypeMismatch):
        grants = _grants(conn, version.schema, version.stable)
        conn.execute(sql.SQL("DROP VIEW {}").format(view))
        conn.execute(statement)
        _grant(conn, version.schema, version.stable, grants)
    conn.execute(
        sql.SQL("COMMENT ON VIEW {} IS {}").format(
            view,
            sql.Literal(
                f"capstone: the live version of this collection, version {version.number} ({version.table}); "
                "managed by capstone, do not edit"
            ),
        )
    )


def _drop(conn: psycopg.Connection, version: Version, why: str) -> None:
    log.warning(
        "collection %s.%s: dropping version %d (%s): %s",
        version.schema,
        version.stable,
        version.number,
        version.table,
        why,
    )
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(version.schema, version.table)))
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE schema_name = %s AND stable_name = %s AND version = %s").format(
            _CATALOG
        ),
        (version.schema, version.stable, version.number),
    )


def mark_seeded(conn: psycopg.Connection, version: Version | VersionRef, schema: str, stable: str) -> None:
    """Record that the version holds every chunk of its seed source (its seeding run merged)."""
    number = version.number if isinstance(version, Version) else version["number"]
    conn.execute(
        sql.SQL(
            "UPDATE {} SET seeded = true, seed_from = NULL, seeding_run = NULL"
            " WHERE schema_name = %s AND stable_name = %s AND version = %s"
        ).format(_CATALOG),
        (schema, stable, number),
    )


def seed_source(conn: psycopg.Connection, schema: str, stable: str, number: int) -> Version | None:
    """Where version ``number`` takes the rows it lacks from: the live version for a version being
    built, the version switched away from for one rolled back to; None when it needs none."""
    versions = list_versions(conn, schema, stable)
    version = next((v for v in versions if v.number == number), None)
    if version is None or version.seeded:
        return None
    wanted = version.seed_from if version.status == "live" else None
    source = next(
        (v for v in versions if (v.number == wanted if wanted is not None else v.status == "live")), None
    )
    if source is None or source.number == number or _relation_kind(conn, schema, source.table) != "r":
        return None
    return source


class SeedingInProgress(RuntimeError):
    """Another run is staging the rows of the same version; this one retries after it."""


def claim_seeding(
    conn: psycopg.Connection, version: Version | VersionRef, schema: str, stable: str, run_key: str
) -> None:
    """Make ``run_key`` the one run seeding the version, unless another run whose staging still
    exists is doing it (:class:`SeedingInProgress`, transient: the task retries). Two runs seeding
    at once would each delete the rows only the other one staged."""
    number = version.number if isinstance(version, Version) else version["number"]
    claimed = conn.execute(
        sql.SQL(
            "UPDATE {} SET seeding_run = %s WHERE schema_name = %s AND stable_name = %s AND version = %s"
            " AND (seeding_run IS NULL OR seeding_run = %s OR NOT EXISTS"
            " (SELECT 1 FROM capstone.staging_runs r WHERE r.run_key = seeding_run)) RETURNING version"
        ).format(_CATALOG),
        (run_key, schema, stable, number, run_key),
    ).fetchone()
    if claimed is None:
        raise SeedingInProgress(
            f"version {number} of {schema}.{stable} is being filled by another run right now: this run "
            "waits for it (the task retries)"
        )


def live_version(conn: psycopg.Connection, schema: str, stable: str) -> Version | None:
    """The version the stable name serves, or None."""
    return next((v for v in list_versions(conn, schema, stable) if v.status == "live"), None)


# -- switching --------------------------------------------------------------------------------


def switch(
    conn: psycopg.Connection,
    version: Version,
    register: Any,
    keep_versions: int,
    *,
    status_of_previous: Status = "retired",
    record: dict[str, Any] | None = None,
    expected: tuple[Status, ...] = ("building",),
) -> SwitchResult:
    """Make ``version`` live: the view, the catalog and (through ``register(conn)``, which writes the
    registry row searches read) the registry change in one transaction. Then drops the versions
    beyond the newest ``keep_versions`` earlier ones.

    The view's exclusive lock is held from the ``CREATE OR REPLACE VIEW`` to the commit; waiting
    for it gives up after :data:`SWITCH_LOCK_TIMEOUT` (running queries of the view hold it off) and
    is retried.
    """
    for attempt in range(1, _SWITCH_ATTEMPTS + 1):
        try:
            return _switch_once(conn, version, register, keep_versions, status_of_previous, record, expected)
        except psycopg.errors.LockNotAvailable:
            if attempt == _SWITCH_ATTEMPTS:
                raise SwitchTimeout(
                    f"could not lock the view {version.schema}.{version.stable} within {SWITCH_LOCK_TIMEOUT} "
                    f"in {_SWITCH_ATTEMPTS} tries: long queries of it hold it; nothing was switched, retry"
                ) from None
            log.warning("switch to version %d: the view is busy, trying again", version.number)
            time.sleep(attempt)
    raise AssertionError("unreachable")


def _switch_once(
    conn: psycopg.Connection,
    version: Version,
    register: Any,
    keep_versions: int,
    status_of_previous: Status,
    record: dict[str, Any] | None,
    expected: tuple[Status, ...],
) -> SwitchResult:
    with conn.transaction():
        _lock(conn, version.schema, version.stable)
        versions = list_versions(conn, version.schema, version.stable)
        previous = next((v for v in versions if v.status == "live"), None)
        now = next((v for v in versions if v.number == version.number), None)
        if now is None or now.status not in expected:
            raise SwitchRefused(
                f"version {version.number} of {version.schema}.{version.stable} is "
                f"{now.status if now else 'gone'} now, not {' or '.join(expected)}: it was switched away "
                "from (or dropped) while this run went on, by a rollback or another run; nothing was switched"
            )
        if previous is not None:
            _keep_registration(conn, previous)
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (SWITCH_LOCK_TIMEOUT,))
        locked = time.monotonic()
        _replace_view(conn, version)
        if previous is not None and previous.number != version.number:
            _set_status(conn, previous, status_of_previous, live_until="now()")
        if version.status == "building" or previous is None:
            _set_status(
                conn, version, "live", live_from="now()", live_until=None, seeded=True, seed_from=None
            )
        else:  # rolled back (or forward) to: it lacks what was indexed since, until its next run
            _set_status(
                conn,
                version,
                "live",
                live_from="now()",
                live_until=None,
                seeded=False,
                seed_from=previous.number,
            )
        if record is not None:
            remember_record(conn, version, record)
        register(conn)
    lock_ms = (time.monotonic() - locked) * 1000
    dropped = _drop_old(conn, version.schema, version.stable, keep_versions)
    log.info(
        "switched %s.%s from version %s to version %d (%s); the view was locked for %.1f ms",
        version.schema,
        version.stable,
        previous.number if previous else "none",
        version.number,
        version.table,
        lock_ms,
    )
    return SwitchResult(version.number, previous.number if previous else None, lock_ms, tuple(dropped))


def _keep_registration(conn: psycopg.Connection, version: Version) -> None:
    """Keep what searches read for ``version`` (the one switched away from) when the catalog has no
    record of it yet (say, a version adopted from an earlier release and never validated since), so
    that a rollback can restore it."""
    from capstone import registry

    if version_record(conn, version) is None:
        current = registry.row_for_table(conn, version.schema, version.stable)
        if current is not None:
            remember_record(conn, version, current)


def _drop_old(conn: psycopg.Connection, schema: str, stable: str, keep: int) -> list[str]:
    """Drop the earlier versions beyond the newest ``keep`` (retired or rolled back)."""
    with conn.transaction():
        _lock(conn, schema, stable)
        rows = conn.execute(
            sql.SQL(
                "SELECT version FROM {} WHERE schema_name = %s AND stable_name = %s"
                " AND status IN ('retired', 'rolled_back') ORDER BY live_until DESC NULLS LAST, version DESC"
            ).format(_CATALOG),
            (schema, stable),
        ).fetchall()
        old = {number for (number,) in rows[keep:]}
        dropped = []
        for version in list_versions(conn, schema, stable):
            if version.number in old:
                _drop(conn, version, f"store.keep_versions keeps {keep} earlier version(s)")
                dropped.append(version.table)
    return dropped


def record_failed_validation(conn: psycopg.Connection, version: Version, summary: dict[str, Any]) -> None:
    """Keep the summary of a validation that refused to switch to the version."""
    _set_json(conn, version, "last_validation", summary)


def remember_record(conn: psycopg.Connection, version: Version, record: dict[str, Any]) -> None:
    """Keep the registry row of the live version, for a later rollback to it."""
    _set_json(conn, version, "record", record)


def _set_json(conn: psycopg.Connection, version: Version, column: str, value: dict[str, Any]) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET {} = %s WHERE schema_name = %s AND stable_name = %s AND version = %s").format(
            _CATALOG, sql.Identifier(column)
        ),
        (Jsonb(value), version.schema, version.stable, version.number),
    )


def version_record(conn: psycopg.Connection, version: Version) -> dict[str, Any] | None:
    """The registry row the version had when it was last live (what ``rollback`` restores)."""
    rows = catalog_rows(conn, version.schema, version.stable, version.number)
    return rows[0]["record"] if rows else None


def catalog_rows(
    conn: psycopg.Connection, schema: str, stable: str, number: int | None = None
) -> list[dict[str, Any]]:
    """Everything the catalog holds of the collection's versions (of version ``number`` alone, when
    given), oldest first: embedding settings, the registry row of each once live, its last
    validation, dates. The catalog must exist (:func:`has_catalog`)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            sql.SQL(
                "SELECT * FROM {} WHERE schema_name = %s AND stable_name = %s"
                " AND (%s::int IS NULL OR version = %s) ORDER BY version"
            ).format(_CATALOG),
            (schema, stable, number, number),
        ).fetchall()


def rollback(conn: psycopg.Connection, schema: str, stable: str, to: int | None = None) -> SwitchResult:
    """Switch the stable name back to the newest earlier version (or to version ``to``, which may be
    a newer one: rolling forward). The version switched away from is marked ``rolled_back`` when
    going back, ``retired`` when going forward; it is kept either way."""
    from capstone import registry

    versions = list_versions(conn, schema, stable)
    live = next((v for v in versions if v.status == "live"), None)
    kept = [v for v in versions if v.status in ("retired", "rolled_back")]
    if to is not None:
        target = next((v for v in kept if v.number == to), None)
    else:
        earlier = [v for v in kept if live is None or v.number < live.number]
        target = max(earlier, key=lambda v: v.number) if earlier else None
    if target is None:
        listing = ", ".join(f"{v.number} ({v.status}, {v.model}, {v.dimension}d)" for v in versions) or "none"
        wanted = f"number {to}" if to is not None else "older than the live one"
        raise NoVersionToRollBackTo(
            f"{schema}.{stable} has no kept version {wanted} to switch to; its versions: {listing}. "
            "store.keep_versions says how many earlier versions are kept"
        )
    row = version_record(conn, target)
    if row is None:
        raise NoVersionToRollBackTo(
            f"version {target.number} of {schema}.{stable} was never validated and live, so there is no "
            "search registration to restore; it cannot be switched to"
        )
    going_back = live is None or target.number < live.number
    return switch(
        conn,
        target,
        lambda c: registry.register_row(c, row),
        keep_versions=len(kept),  # a rollback drops nothing
        status_of_previous="rolled_back" if going_back else "retired",
        record=row,
        expected=("retired", "rolled_back"),
    )


def describe(conn: psycopg.Connection, schema: str, stable: str) -> list[dict[str, Any]]:
    """The versions as rows for the CLI: number, status, table, model, dimension, dates."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            sql.SQL(
                "SELECT version, status, table_name, model, dimension, fingerprint, created_at, live_from,"
                " live_until, last_validation->'failed' AS failed_checks FROM {}"
                " WHERE schema_name = %s AND stable_name = %s ORDER BY version"
            ).format(_CATALOG),
            (schema, stable),
        ).fetchall()
