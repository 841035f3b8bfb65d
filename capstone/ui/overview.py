"""What the Collections pages and their JSON API show, read from where it already lives.

Airflow's metadata database holds each collection's DAG (tagged ``capstone``), its runs, the
``<collection>.indexed`` events whose extras summarise the runs (:class:`capstone.contracts.IndexedEvent`)
and the XCom of the last validation report. Each collection's own database holds its registry row
(:mod:`capstone.registry`), its versions (:mod:`capstone.versions`) and its table. Nothing here
writes, and nothing is computed that those modules already know.

Which database a collection lives in comes from its last ``indexed`` event (its ``connection_id``;
events of earlier releases have none, and a collection never run has no event: the default
connection ``vector_store_default``). A collection is found there by its name, in the schema of the
event's ``table`` when there is one.

Row counts are exact (``count(*)``) for tables the planner estimates under :data:`EXACT_COUNT_MAX`
rows, and the planner's estimate above that (``rows_exact`` false), so that the list stays cheap on
large collections; the newest row's age is then not read either (it would scan the table).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from capstone import registry, versions
from capstone.registry import CollectionRecord
from capstone.settings import DEFAULT_CONNECTION_ID
from capstone.store import TEXT_SEARCH_COLUMN

__all__ = [
    "DAG_TAG",
    "EXACT_COUNT_MAX",
    "CollectionSummary",
    "DagInfo",
    "RunInfo",
    "TableFacts",
    "capstone_dags",
    "last_report",
    "run_history",
    "summarise",
    "table_facts",
    "version_rows",
]

log = logging.getLogger(__name__)

DAG_TAG = "capstone"  # every DAG the factory builds carries it (dag_factory.builder)
PUBLISH_TASK = "publish_indexed_asset"
VALIDATE_TASK = "validate_index_health"
EXACT_COUNT_MAX = 1_000_000
# What a version shows of its catalog row (its embedding settings and registry row stay inside).
_VERSION_COLUMNS = (
    "version",
    "status",
    "table_name",
    "model",
    "dimension",
    "fingerprint",
    "created_at",
    "live_from",
    "live_until",
)


@dataclass(frozen=True)
class RunInfo:
    """One run of a collection's DAG, with what its ``indexed`` event says it did (when it got there)."""

    run_id: str
    state: str | None
    started: datetime | None
    ended: datetime | None
    embedded: int | None = None
    deleted: int | None = None
    set_aside: int | None = None  # documents rejected and chunks the embedding refused

    @classmethod
    def of(cls, run: Any, extra: dict[str, Any] | None) -> RunInfo:
        counts: dict[str, Any] = {}
        if extra:
            counts = {
                "embedded": extra.get("chunks_embedded"),
                "deleted": extra.get("rows_deleted"),
                "set_aside": int(extra.get("rejected_documents") or 0) + int(extra.get("chunks_failed") or 0),
            }
        if run is None:  # an event whose run was deleted from the metadata database
            run_id = str((extra or {}).get("run_id"))
            return cls(run_id=run_id, state=None, started=None, ended=None, **counts)
        return cls(run.run_id, str(run.state) if run.state else None, run.start_date, run.end_date, **counts)


@dataclass(frozen=True)
class DagInfo:
    """A collection's DAG in Airflow: its last run and its last ``indexed`` event's extra."""

    dag_id: str
    paused: bool
    last_run: RunInfo | None
    event: dict[str, Any] = field(default_factory=dict)

    @property
    def connection_id(self) -> str:
        return str(self.event.get("connection_id") or DEFAULT_CONNECTION_ID)

    @property
    def schema(self) -> str | None:
        table = self.event.get("table")
        return str(table).split(".", 1)[0] if table else None


def capstone_dags(permitted: Iterable[str] | None = None) -> list[DagInfo]:
    """The DAGs the factory built (tag ``capstone``, a ``publish_indexed_asset`` task with an outlet,
    not stale) among ``permitted`` (all when None), by id, with their last run and last ``indexed``
    event."""
    from airflow.models.asset import AssetEvent, TaskOutletAssetReference
    from airflow.models.dag import DagModel, DagTag
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    outlets = TaskOutletAssetReference
    publishers = select(outlets.dag_id).where(outlets.task_id == PUBLISH_TASK)
    with create_session() as session:
        query = (
            select(DagModel.dag_id, DagModel.is_paused)
            .join(DagTag, DagTag.dag_id == DagModel.dag_id)
            .where(DagTag.name == DAG_TAG, DagModel.is_stale.is_(False))
            .where(DagModel.dag_id.in_(publishers))
        )
        if permitted is not None:
            query = query.where(DagModel.dag_id.in_(list(permitted)))
        dags = {dag_id: paused for dag_id, paused in session.execute(query.order_by(DagModel.dag_id))}
        if not dags:
            return []
        last_runs = session.scalars(
            select(DagRun).where(
                DagRun.id.in_(
                    select(func.max(DagRun.id)).where(DagRun.dag_id.in_(list(dags))).group_by(DagRun.dag_id)
                )
            )
        ).all()
        last_events = session.scalars(
            select(AssetEvent).where(
                AssetEvent.id.in_(
                    select(func.max(AssetEvent.id))
                    .where(AssetEvent.source_task_id == PUBLISH_TASK)
                    .where(AssetEvent.source_dag_id.in_(list(dags)))
                    .group_by(AssetEvent.source_dag_id)
                )
            )
        ).all()
        events = {str(event.source_dag_id): dict(event.extra or {}) for event in last_events}
        runs = {run.dag_id: run for run in last_runs}
        return [
            DagInfo(
                dag_id,
                bool(paused),
                None if dag_id not in runs else RunInfo.of(runs[dag_id], _extra_of_run(runs[dag_id], events)),
                events.get(dag_id, {}),
            )
            for dag_id, paused in dags.items()
        ]


def _extra_of_run(run: Any, events: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The last event's extra when it is that run's (a run still going has published nothing)."""
    extra = events.get(run.dag_id)
    return extra if extra and extra.get("run_id") == run.run_id else None


def run_history(dag_id: str, limit: int = 20) -> list[RunInfo]:
    """The last ``limit`` runs of ``dag_id`` that published an ``indexed`` event, oldest first."""
    from airflow.models.asset import AssetEvent
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import and_, select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent, DagRun)
            .outerjoin(
                DagRun,
                and_(DagRun.dag_id == AssetEvent.source_dag_id, DagRun.run_id == AssetEvent.source_run_id),
            )
            .where(AssetEvent.source_dag_id == dag_id, AssetEvent.source_task_id == PUBLISH_TASK)
            .order_by(AssetEvent.id.desc())
            .limit(limit)
        ).all()
        return [RunInfo.of(run, dict(event.extra or {})) for event, run in reversed(rows)]


def last_report(dag_id: str, run_id: str) -> dict[str, Any] | None:
    """The full validation report (every check with its numbers) of run ``run_id``: the XCom of its
    ``validate_index_health`` task, or None when it has none (or it is kept elsewhere)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(run_id=run_id, key="return_value", task_ids=VALIDATE_TASK, dag_ids=dag_id)
        ).first()
        if row is None:
            return None
        value = XComModel.deserialize_value(row[0])
    return value if isinstance(value, dict) and "checks" in value else None


@dataclass(frozen=True)
class TableFacts:
    """What the collection's table holds now."""

    rows: int
    rows_exact: bool
    newest_row: datetime | None
    index_size_bytes: int | None
    keyword_index: str | None  # the GIN index of keyword and hybrid searches, when there is one


def table_facts(conn: psycopg.Connection, record: CollectionRecord) -> TableFacts:
    """Rows, newest row, vector index size and keyword index of the table ``record`` searches."""
    table = record.store_table
    with conn.cursor(row_factory=dict_row) as cur:
        facts = cur.execute(
            "SELECT c.reltuples::bigint AS estimate,"
            " pg_relation_size(to_regclass(format('%%I.%%I', n.nspname, %(index)s::text))) AS index_size,"
            " (SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid"
            "   JOIN pg_am am ON am.oid = ic.relam JOIN pg_attribute a"
            "   ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            "   WHERE i.indrelid = c.oid AND am.amname = 'gin' AND a.attname = %(keyword)s"
            "   LIMIT 1) AS keyword"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))",
            {
                "index": record.index_name,
                "keyword": TEXT_SEARCH_COLUMN,
                "schema": table.schema,
                "table": table.table,
            },
        ).fetchone()
    if facts is None:
        return TableFacts(0, True, None, None, None)
    exact = facts["estimate"] < EXACT_COUNT_MAX  # -1: never analysed
    rows, newest = facts["estimate"], None
    if exact:
        rows, newest = conn.execute(
            sql.SQL("SELECT count(*), max(updated_at) FROM {}").format(table.ident)
        ).fetchone() or (0, None)
    return TableFacts(int(rows), exact, newest, facts["index_size"], facts["keyword"])


def version_rows(conn: psycopg.Connection, record: CollectionRecord) -> list[dict[str, Any]]:
    """The collection's versions, oldest first: number, status, table, model, dimension, fingerprint,
    dates, and the summary of each one's last validation (a refused switch keeps its own in the
    catalog; a version once live, in the registry row it had)."""
    if not versions.has_catalog(conn):
        return []
    rows = []
    for row in versions.catalog_rows(conn, record.schema, record.table):
        validation = row["last_validation"] or (row["record"] or {}).get("last_validation")
        if row["version"] == record.version and record.last_validation:
            validation = record.last_validation
        rows.append(
            {
                **{key: row[key] for key in _VERSION_COLUMNS},
                "validation": validation,
            }
        )
    return rows


@dataclass
class CollectionSummary:
    """One line of the Collections list (and the head of a collection's page)."""

    dag: DagInfo
    record: CollectionRecord | None = None
    facts: TableFacts | None = None
    building: list[int] = field(default_factory=list)
    problem: str | None = None  # why there is nothing to show yet

    @property
    def name(self) -> str:
        return self.dag.dag_id

    def as_json(self) -> dict[str, Any]:
        """The JSON API's view of it (no secrets: the registry holds where a key comes from, never it)."""
        record = self.record
        return {
            "collection": self.name,
            "dag_id": self.dag.dag_id,
            "paused": self.dag.paused,
            "problem": self.problem,
            "connection_id": self.dag.connection_id,
            "table": None if record is None else f"{record.schema}.{record.table}",
            "live_version": None if record is None else record.version,
            "building_versions": self.building,
            "provider": None if record is None else record.provider,
            "model": None if record is None else record.model,
            "dimension": None if record is None else record.dimension,
            "index": None if record is None else _index_json(record, self.facts),
            "rows": None if self.facts is None else self.facts.rows,
            "rows_exact": None if self.facts is None else self.facts.rows_exact,
            "newest_row": None if self.facts is None else self.facts.newest_row,
            "last_run": None if self.dag.last_run is None else dataclasses.asdict(self.dag.last_run),
            "last_validation": None if record is None else record.last_validation,
        }


def _index_json(record: CollectionRecord, facts: TableFacts | None) -> dict[str, Any]:
    return {
        "type": record.index_type,
        "name": record.index_name,
        "metric": record.metric,
        "params": record.index_params,
        "size_bytes": None if facts is None else facts.index_size_bytes,
        "keyword_index": None if facts is None else facts.keyword_index,
    }


def summarise(conn: psycopg.Connection, dags: list[DagInfo]) -> list[CollectionSummary]:
    """The summaries of ``dags``' collections, all in the database of ``conn``."""
    found: dict[str, list[CollectionRecord]] = {}
    for record in registry.records(conn, [dag.dag_id for dag in dags]):
        found.setdefault(record.name, []).append(record)
    summaries = []
    for dag in dags:
        candidates = [r for r in found.get(dag.dag_id, []) if dag.schema in (None, r.schema)]
        if not candidates:
            summaries.append(CollectionSummary(dag, problem="not indexed yet"))
            continue
        if len(candidates) > 1:
            where = ", ".join(f"{r.schema}.{r.table}" for r in candidates)
            summaries.append(CollectionSummary(dag, problem=f"registered at several tables: {where}"))
            continue
        record = candidates[0]
        kept = versions.list_versions(conn, record.schema, record.table)
        building = [version.number for version in kept if version.status == "building"]
        summaries.append(CollectionSummary(dag, record, table_facts(conn, record), building))
    return summaries
