"""Index health: does the collection's index hold every vector, and does it answer well?

:func:`validate_collection` runs four kinds of checks against the collection's table and index
and returns a small report (the task's XCom: counts, ranks and ids, never vectors):

- ``vector_count``: rows with an embedding vs the table's expected total after the upsert;
- ``query_relevance_<id>``: each sample query of the spec, searched in the collection's search
  mode (``search.mode``: vector through the ANN index, keyword, or hybrid;
  :func:`capstone.search.run_search`), must find its expected document among the ``top_k``
  distinct documents; the rank found and the mode are reported;
- ``recall_at_k``: ``recall_sample_size`` stored vectors (a seeded random sample) searched through
  the index and exactly (all of them in one pass over the table, :mod:`capstone.exact_scan`),
  compared as recall@k over
  their ``k`` nearest *other* rows (the row itself is found for free and would flatter the
  index); under the threshold, larger ``ef_search`` / ``probes`` are tried and the first that
  reaches it is suggested;
- ``index_freshness``: the newest row (by ``updated_at``) must come back through the index when its
  own vector is the query.

The sample queries are the only checks that load the embedding model. With
``validation.query_checks: when_changed`` (the default) they run only when their answers may have
changed (:func:`plan_query_checks`: first validation, another version, a built index, changed
queries, search settings or model, ``query_checks_changed_fraction`` of the rows written or
deleted, a query that did not pass last time, or every ``query_checks_every`` validations);
otherwise each shows as skipped, and the summary's ``query_checks`` says why.

What "fresh" means. pgvector updates its index in the writing transaction, so once the index is
valid a committed row is searchable. The limit (``freshness_limit_seconds``) therefore bounds the
*lag* of a run that wrote rows: how long after its newest write the index was confirmed to serve
every row -- the ``freshness_ms`` the indexing sensor measured, which stays true if validation is
re-run later. A run that wrote no rows (it only deleted chunks, or re-validated) has nothing new to
be fresh about: the newest row must still be searchable, and its age is reported, but an old
collection whose source has not changed is not stale, so no limit applies.

Each check passes, fails, or is skipped (nothing to measure); a failing check whose family is
listed in the spec's ``fail_on`` fails the task (:class:`IndexHealthError`, so no
``<collection>.indexed`` event is published), any other failing check only warns. A live version
is recorded in the registry (:mod:`capstone.registry`) with the summary either way, so that
``capstone search`` knows it; a version being built is recorded there only when it is switched
to (a failed validation stays in the version catalog).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from capstone import registry, store, versions
from capstone.connections import connect, postgres_params
from capstone.contracts import IndexEvent, UpsertResult, ValidationReport, VersionRef
from capstone.errors import TerminalError
from capstone.exact_scan import exact_neighbours
from capstone.index_build import KeywordIndexParams
from capstone.registry import CollectionRecord
from capstone.search import (
    MAX_EF_SEARCH,
    Hit,
    SearchTarget,
    ann_search,
    ann_session,
    ann_statement,
    distinct_documents,
    explain,
    run_search,
)
from capstone.settings import CollectionSettings, SampleQuery, SearchMode, ValidationSettings

__all__ = [
    "Check",
    "IndexHealthError",
    "QueryChecksPlan",
    "check_freshness",
    "check_query_relevance",
    "check_recall",
    "check_vector_count",
    "family_of",
    "format_report",
    "index_facts",
    "measure_recall",
    "plan_query_checks",
    "sample_vectors",
    "suggest_knob",
    "validate_collection",
]

log = logging.getLogger(__name__)

RECALL_SEED = 0.42  # setseed() value: the same rows are sampled on every run over the same table
# Sample queries fetch this many chunks per wanted document, so that a document whose chunks
# crowd the top of the list does not hide the next documents.
_CHUNKS_PER_DOCUMENT = 10
_MAX_CANDIDATES = 1000
_FRESHNESS_K = 10
_FAMILIES = (
    ("vector_count", "vector_count"),
    ("query_relevance_", "query_relevance"),
    ("recall_at_k", "recall"),
    ("index_freshness", "freshness"),
)


class IndexHealthError(TerminalError, RuntimeError):
    """A check listed in ``validation.fail_on`` did not pass (terminal: re-validating the same index
    gives the same answer)."""


@dataclass
class Check:
    """One check's outcome: ``passed`` is None when there was nothing to measure."""

    passed: bool | None
    value: str
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)

    def status(self, family: str, fail_on: Sequence[str]) -> str:
        """``pass`` or ``skip``; a failing check is ``fail`` if its family is in fail_on, else ``warn``."""
        if self.passed is None:
            return "skip"
        if self.passed:
            return "pass"
        return "fail" if family in fail_on else "warn"


def family_of(check_name: str) -> str:
    """The ``fail_on`` entry governing a check: ``query_relevance_try`` -> ``query_relevance``."""
    for prefix, family in _FAMILIES:
        if check_name.startswith(prefix):
            return family
    return check_name


# -- entry point ------------------------------------------------------------------------------


def validate_collection(
    settings: CollectionSettings, upserted: UpsertResult, indexed: IndexEvent
) -> ValidationReport:
    """Run the checks, log them as a table, register the collection; raise when a ``fail_on`` check fails.

    ``upserted`` is the upsert task's result (``expected_count``: rows the table should hold;
    ``version``: the collection version the run wrote to), ``indexed`` the indexing sensor's event.
    The checks run against that version's table. A version being built (a new embedding model) is
    switched to (:func:`capstone.versions.switch`: the stable name, the catalog and the registry in
    one transaction) only when no ``fail_on`` check fails; otherwise the live version stays live
    and the error says so. Returns the report (small enough for XCom); its ``summary`` goes into
    the asset event.
    """
    params = postgres_params(settings.store.connection_id)
    with connect(params, application_name="capstone validation") as conn:
        ref = _version_to_validate(conn, settings, upserted)
        record = CollectionRecord.from_settings(settings, ref)
        target = SearchTarget.of(record)
        options = settings.validation
        log.info(
            "validating %s (%s): %d sample queries, recall@%d over %d sampled vectors with %s",
            record.name,
            record.store_table.qualified if ref is None else f"version {ref['number']}, {ref['table']}",
            len(options.sample_queries),
            options.recall_k,
            options.recall_sample_size,
            target.describe_knob(),
        )
        register_vector(conn)
        facts = index_facts(conn, record, target)
        plan = plan_query_checks(options, record, upserted, indexed, _previous_summary(conn, record))
        checks = _run_checks(conn, record, target, facts, options, upserted, indexed, plan)
        report = _report(record, target, facts, checks, options.fail_on, plan)
        summary = report["summary"]
        failed = summary["failed"]
        live = _settle_version(conn, settings, record, ref, summary, bool(failed))
    table = format_report(report)
    warned = summary["warned"]
    (log.error if failed else log.warning if warned else log.info)("%s", table)
    if failed:
        kept = (
            f"; version {ref['number']} ({ref['table']}, {record.model}) was not switched to, and "
            f"{record.schema}.{record.table} keeps serving version {live}"
            if ref is not None and ref["status"] == "building" and live is not None
            else ""
        )
        raise IndexHealthError(
            f"index health of collection {record.name!r}: {', '.join(failed)} failed, and validation.fail_on "
            f"lists {'it' if len(failed) == 1 else 'them'}, so {record.name}.indexed is not published{kept} "
            f"(remove a check from fail_on to only warn about it):\n{table}"
        )
    return report


def _version_to_validate(
    conn: psycopg.Connection, settings: CollectionSettings, upserted: UpsertResult
) -> VersionRef | None:
    """The version the run wrote to; for a caller that names none, the live version, or None when
    the collection has no versions (a plain table, validated as it is)."""
    if "version" in upserted:
        return upserted["version"]
    live = versions.live_version(conn, settings.store.schema, settings.store.table)
    return None if live is None else live.ref


def _settle_version(
    conn: psycopg.Connection,
    settings: CollectionSettings,
    record: CollectionRecord,
    ref: VersionRef | None,
    summary: dict[str, Any],
    failed: bool,
) -> int | None:
    """Register the validated version, switching the stable name to it when it is a new one that
    passed; returns the number of the version live afterwards. Adds ``version``, ``live_version``
    and ``switched`` to ``summary``."""
    schema, stable = settings.store.schema, settings.store.table
    if ref is None:  # an unversioned table
        registry.register(conn, record, summary)
        return None
    versions.check_embedding_unchanged(settings, ref)
    existing = versions.list_versions(conn, schema, stable)
    current = next((v for v in existing if v.status == "live"), None)
    version = next((v for v in existing if v.number == ref["number"]), None)
    if version is None or version.status not in ("live", "building"):
        raise versions.SwitchRefused(
            f"version {ref['number']} of {schema}.{stable}, which this run wrote to, is "
            f"{version.status if version else 'gone'} now (a rollback or another run switched while this run "
            f"went on): {schema}.{stable} serves version {current.number if current else 'none'}, and "
            "nothing was registered; trigger a new run"
        )
    summary |= {"version": version.number, "live_version": version.number, "switched": False}
    if version.status == "live":
        row = registry.row_values(record, summary)
        registry.register_row(conn, row)
        versions.remember_record(conn, version, row)
        return version.number
    summary["live_version"] = current.number if current else None
    if failed or not version.seeded:
        if not failed:
            log.warning(
                "version %d does not hold every chunk yet (the embedding API refused some): %s.%s keeps "
                "serving version %s; the next run embeds what is missing and switches",
                version.number,
                schema,
                stable,
                summary["live_version"],
            )
        versions.record_failed_validation(conn, version, summary)
        return summary["live_version"]
    return _switch_to(conn, settings, record, version, summary)


def _switch_to(
    conn: psycopg.Connection,
    settings: CollectionSettings,
    record: CollectionRecord,
    version: versions.Version,
    summary: dict[str, Any],
) -> int:
    """Switch the stable name to the validated new ``version``; returns its number."""
    summary |= {"switched": True, "live_version": version.number}
    row = registry.row_values(record, summary)
    result = versions.switch(
        conn, version, lambda c: registry.register_row(c, row), settings.store.keep_versions, record=row
    )
    log.info(
        "%s.%s now serves version %d (%s, %d dimensions)%s; the view was locked for %.1f ms%s",
        settings.store.schema,
        settings.store.table,
        result.live,
        record.model,
        record.dimension,
        f" instead of version {result.previous}" if result.previous is not None else "",
        result.lock_ms,
        f"; dropped {', '.join(result.dropped)} (store.keep_versions)" if result.dropped else "",
    )
    return result.live


def _run_checks(
    conn: psycopg.Connection,
    record: CollectionRecord,
    target: SearchTarget,
    facts: dict[str, Any],
    options: ValidationSettings,
    upserted: UpsertResult,
    indexed: IndexEvent,
    plan: QueryChecksPlan,
) -> dict[str, Check]:
    checks = {"vector_count": check_vector_count(conn, target, int(upserted["expected_count"]))}
    if plan.run:
        checks |= check_query_relevance(conn, record, target, options.sample_queries, options.top_k)
    else:
        log.info("sample queries not run (the embedding model is not loaded): %s", plan.reason)
        checks |= {
            f"query_relevance_{query.id}": Check(None, "not run", f"not run this time: {plan.reason}")
            for query in options.sample_queries
        }
    checks["recall_at_k"] = check_recall(
        conn, target, facts, options.recall_k, options.recall_sample_size, options.recall_threshold
    )
    wrote_rows = int(upserted.get("upserted", 0)) > 0
    checks["index_freshness"] = check_freshness(
        conn, target, facts, options.freshness_limit_seconds, wrote_rows, indexed.get("freshness_ms")
    )
    return checks


# -- index facts ------------------------------------------------------------------------------

_INDEX_SQL = """
SELECT am.amname, i.indisvalid, i.indisready, pg_relation_size(c.oid), coalesce(c.reloptions, '{}')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_index i ON i.indexrelid = c.oid
JOIN pg_am am ON am.oid = c.relam
WHERE n.nspname = %s AND c.relname = %s
"""


def index_facts(conn: psycopg.Connection, record: CollectionRecord, target: SearchTarget) -> dict[str, Any]:
    """Name, type, parameters, size and validity of the collection's index (pg_index, pg_class), and
    whether the ANN query's plan scans it."""
    name = record.index_name
    keyword = _keyword_index_facts(conn, record)
    row = conn.execute(_INDEX_SQL, (record.schema, name)).fetchone()
    if row is None:
        return {
            "name": name,
            "exists": False,
            "valid": False,
            "scan": None,
            "usable": False,
            "keyword_index": keyword,
        }
    method, valid, ready, size, options = row
    scan = _ann_scan(conn, target, record.dimension)
    return {
        "name": name,
        "exists": True,
        "type": method,
        "params": dict(_parse_option(option) for option in options),
        "size_bytes": int(size),
        "valid": bool(valid and ready),
        "scan": scan,
        "usable": bool(valid and ready) and scan == f"Index Scan using {name}",
        "keyword_index": keyword,
    }


def _keyword_index_facts(conn: psycopg.Connection, record: CollectionRecord) -> dict[str, Any]:
    """Name, size and validity of the collection's keyword (GIN) index."""
    name = KeywordIndexParams(record.schema, record.store_table.table, "auto").index_name
    row = conn.execute(_INDEX_SQL, (record.schema, name)).fetchone()
    if row is None:
        return {"name": name, "exists": False, "valid": False}
    _, valid, ready, size, _ = row
    return {"name": name, "exists": True, "valid": bool(valid and ready), "size_bytes": int(size)}


def _parse_option(option: str) -> tuple[str, int | str]:
    key, _, value = option.partition("=")
    return key, int(value) if value.isdigit() else value


def _ann_scan(conn: psycopg.Connection, target: SearchTarget, dimension: int) -> str:
    """How the ANN query reads the table: ``Index Scan using <name>``, or the scan it does instead."""
    probe = np.ones(dimension, dtype=np.float32)
    with ann_session(conn, target):
        nodes = explain(conn, ann_statement(target), probe, 10)
    for node in nodes:
        if "Index Name" in node:
            return f"{node['Node Type']} using {node['Index Name']}"
    scans = [node["Node Type"] for node in nodes if node["Node Type"].endswith("Scan")]
    return scans[0] if scans else nodes[0]["Node Type"]


def _unusable(facts: dict[str, Any]) -> str:
    if not facts["exists"]:
        return f"index {facts['name']} does not exist: searches scan the whole table"
    if not facts["valid"]:
        return f"index {facts['name']} is INVALID (a failed build): searches scan the whole table"
    return f"the ANN query does not use index {facts['name']} (plan: {facts['scan']})"


# -- vector_count -----------------------------------------------------------------------------


def check_vector_count(conn: psycopg.Connection, target: SearchTarget, expected: int) -> Check:
    """Rows with an embedding vs ``expected``, the table's total after the run's upsert."""
    row = conn.execute(
        sql.SQL("SELECT count(*), count(embedding) FROM {}").format(target.table.ident)
    ).fetchone()
    total, found = (int(row[0]), int(row[1])) if row else (0, 0)
    detail = f"{found} rows with embeddings, {expected} expected after the upsert"
    if total > found:
        detail += f"; {total - found} rows have no embedding and cannot be found"
    if found < expected:
        detail += f" ({expected - found} missing: deleted since the upsert, or a concurrent write)"
    return Check(found >= expected, f"{found}/{expected}", detail, {"found": found, "expected": expected})


# -- when the sample queries run ----------------------------------------------------------------


@dataclass(frozen=True)
class QueryChecksPlan:
    """Whether this validation runs the sample queries, and why (``validation.query_checks``)."""

    run: bool
    reason: str
    runs_since: int  # validations since the queries last ran: 0 when they run now
    fingerprint: str  # of what the queries' answers depend on besides the rows

    def summary(self, passed_now: bool) -> dict[str, Any]:
        """What the report and the registry keep for the next validation to decide on; ``passed``
        is of the last time the queries ran (they are skipped only after they all passed)."""
        return {
            "ran": self.run,
            "reason": self.reason,
            "runs_since": self.runs_since,
            "fingerprint": self.fingerprint,
            "passed": passed_now if self.run else True,
        }


def plan_query_checks(
    options: ValidationSettings,
    record: CollectionRecord,
    upserted: UpsertResult,
    indexed: IndexEvent,
    previous: dict[str, Any] | None,
) -> QueryChecksPlan:
    """Run the sample queries (which load the embedding model) only when their answers may have
    changed, and at least every ``query_checks_every`` validations; ``previous`` is the summary of
    the last validation registered for the collection."""
    fingerprint = _queries_fingerprint(options, record)
    reason = _why_queries_run(options, record, upserted, indexed, previous, fingerprint)
    if reason is not None:
        return QueryChecksPlan(True, reason, 0, fingerprint)
    runs_since = int(previous["query_checks"]["runs_since"]) + 1 if previous else 1
    changed, total = _rows_changed(upserted)
    reason = (
        f"{changed} of {total} rows changed (under validation.query_checks_changed_fraction "
        f"{options.query_checks_changed_fraction:g}), same version, index and queries; they last ran "
        f"{runs_since} validation{'s' if runs_since != 1 else ''} ago and passed"
    )
    return QueryChecksPlan(False, reason, runs_since, fingerprint)


def _why_queries_run(
    options: ValidationSettings,
    record: CollectionRecord,
    upserted: UpsertResult,
    indexed: IndexEvent,
    previous: dict[str, Any] | None,
    fingerprint: str,
) -> str | None:
    """The reason the sample queries run this time, or None when nothing calls for them."""
    if options.query_checks == "always":
        return "validation.query_checks is always"
    last = (previous or {}).get("query_checks")
    if previous is None or not isinstance(last, dict):
        return "first validation"
    if previous.get("version") != record.version:
        return f"version {record.version} was not validated before"
    if last.get("fingerprint") != fingerprint:
        return "the sample queries, the search settings or the model changed"
    if int(indexed.get("builds_started", 0)) > 0:
        return "the index was built"
    if not last.get("passed", False):
        return "a sample query did not pass the last time they ran"
    changed, total = _rows_changed(upserted)
    if changed >= options.query_checks_changed_fraction * total:
        return f"{changed} of {total} rows changed"
    if int(last.get("runs_since", 0)) + 1 >= options.query_checks_every:
        return f"every {options.query_checks_every} validations (validation.query_checks_every)"
    return None


def _rows_changed(upserted: UpsertResult) -> tuple[int, int]:
    """Rows the run upserted or deleted, and the rows the table holds after it."""
    changed = int(upserted.get("upserted", 0)) + int(upserted.get("deleted", 0))
    return changed, max(int(upserted.get("expected_count", 0)), changed)


def _queries_fingerprint(options: ValidationSettings, record: CollectionRecord) -> str:
    described = json.dumps(
        {
            "queries": [[q.id, q.query, q.expected_document_id] for q in options.sample_queries],
            "top_k": options.top_k,
            "search": repr(record.search),
            "model": [record.provider, record.model, record.dimension],
        },
        sort_keys=True,
    )
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def _previous_summary(conn: psycopg.Connection, record: CollectionRecord) -> dict[str, Any] | None:
    """The summary of the last validation the registry holds for the collection's stable name."""
    registered = registry.registered_row(conn, record.schema, record.table)
    return registered.last_validation if registered is not None else None


# -- query_relevance --------------------------------------------------------------------------


def check_query_relevance(
    conn: psycopg.Connection,
    record: CollectionRecord,
    target: SearchTarget,
    queries: Sequence[SampleQuery],
    top_k: int,
) -> dict[str, Check]:
    """One check per sample query: its expected document among the ``top_k`` documents found by a
    search in the collection's mode."""
    if not queries:
        return {}
    mode = record.search.mode
    if mode != "vector" and store.stored_text_config(conn, record.store_table) is None:
        log.warning(
            "%s has no keyword column yet (written before capstone was upgraded; its next run adds it): "
            "sample queries run in vector mode instead of %s",
            record.store_table.qualified,
            mode,
        )
        mode = "vector"
    texts = [query.query for query in queries]
    vectors = list(record.embedder().embed(texts)) if mode != "keyword" else [None] * len(texts)
    candidates = min(_MAX_CANDIDATES, top_k * _CHUNKS_PER_DOCUMENT)
    found = [
        run_search(conn, target, record.search, mode, text, vector, candidates)
        for text, vector in zip(texts, vectors, strict=True)
    ]
    return {
        f"query_relevance_{query.id}": _relevance(conn, target, query, hits, top_k, mode)
        for query, hits in zip(queries, found, strict=True)
    }


def _relevance(
    conn: psycopg.Connection,
    target: SearchTarget,
    query: SampleQuery,
    hits: list[Hit],
    top_k: int,
    mode: SearchMode,
) -> Check:
    expected = query.expected_document_id
    documents = distinct_documents(hits)
    rank = next((hit.rank for hit in documents if hit.document_id == expected), None)
    top = [hit.document_id for hit in documents[:top_k]]
    facts = {"rank": rank, "expected_document_id": expected, "top_documents": top, "mode": mode}
    asked = f"for {query.query!r} ({mode} search)"
    if rank is not None and rank <= top_k:
        return Check(True, f"rank {rank}", f"{expected!r} at rank {rank} of top {top_k} {asked}", facts)
    if not _document_exists(conn, target, expected):
        detail = (
            f"{expected!r} has no rows in {target.table.qualified} {asked}: check the sample query's "
            "expected_document_id, or why the document was not indexed"
        )
    else:
        where = f"found at rank {rank}" if rank else f"not among the {len(documents)} documents fetched"
        detail = f"{expected!r} not in the top {top_k} {asked} ({where}); top: {', '.join(top)}"
    return Check(False, f"rank {rank}" if rank else "absent", detail, facts)


def _document_exists(conn: psycopg.Connection, target: SearchTarget, document_id: str) -> bool:
    row = conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE document_id = %s)").format(target.table.ident),
        (document_id,),
    ).fetchone()
    return bool(row and row[0])


# -- recall_at_k ------------------------------------------------------------------------------


def check_recall(
    conn: psycopg.Connection,
    target: SearchTarget,
    facts: dict[str, Any],
    k: int,
    sample_size: int,
    threshold: float,
) -> Check:
    """Mean recall@k of ANN vs exact search over a seeded sample of stored vectors."""
    knob_name, knob = target.knob
    base: dict[str, Any] = {"k": k, "threshold": threshold, knob_name: knob}
    if not facts["usable"]:
        return Check(False, "n/a", f"recall not measured: {_unusable(facts)}", {**base, "recall": None})
    sample = sample_vectors(conn, target, sample_size)
    if not sample:
        return Check(None, "n/a", "the table holds no vectors to sample", {**base, "recall": None})
    neighbours = exact_neighbours(conn, target, [vector for _, vector in sample], k + 1)
    truth = [_others(hits, chunk_id, k) for (chunk_id, _), hits in zip(sample, neighbours, strict=True)]
    recall = measure_recall(conn, target, sample, truth)
    facts_out: dict[str, Any] = {**base, "recall": round(recall, 4), "sample_size": len(sample)}
    detail = f"recall@{k} {recall:.3f} over {len(sample)} sampled vectors with {target.describe_knob()}"
    if recall >= threshold:
        return Check(
            True, f"{recall:.3f}", f"{detail} (threshold {threshold})", facts_out | {"suggestion": None}
        )
    suggestion = suggest_knob(conn, target, sample, truth, threshold)
    facts_out["suggestion"] = suggestion
    return Check(
        False, f"{recall:.3f}", f"{detail}, under the threshold {threshold}: {suggestion}", facts_out
    )


def sample_vectors(conn: psycopg.Connection, target: SearchTarget, size: int) -> list[tuple[str, np.ndarray]]:
    """``size`` stored (id, vector) pairs picked by ``ORDER BY random()`` after ``setseed``: the same
    rows on every run over the same table."""
    with conn.transaction():
        # A synchronised scan may start mid-table, which would change the rows random() is paired with.
        conn.execute("SELECT set_config('synchronize_seqscans', 'off', true), setseed(%s)", (RECALL_SEED,))
        rows = conn.execute(
            sql.SQL(
                "SELECT id, embedding FROM {} WHERE embedding IS NOT NULL ORDER BY random() LIMIT %s"
            ).format(target.table.ident),
            (size,),
        ).fetchall()
    return [(chunk_id, store.stored_vector(embedding)) for chunk_id, embedding in rows]


def _others(hits: list[Hit], own_id: str, k: int) -> list[Hit]:
    """The first ``k`` hits other than the query's own row, which any search finds for free."""
    return [hit for hit in hits if hit.chunk_id != own_id][:k]


def measure_recall(
    conn: psycopg.Connection,
    target: SearchTarget,
    sample: Sequence[tuple[str, np.ndarray]],
    truth: Sequence[list[Hit]],
) -> float:
    """Mean recall of ANN search for the sampled rows against their exact neighbours ``truth``.

    An ANN hit counts when it is one of the exact hits or ties with the last of them (rows with
    the same distance are interchangeable: duplicates must not lower recall).
    """
    with ann_session(conn, target):
        scores = [
            _recall(_others(ann_search(conn, target, vector, len(exact) + 1), chunk_id, len(exact)), exact)
            for (chunk_id, vector), exact in zip(sample, truth, strict=True)
            if exact
        ]
    return float(np.mean(scores)) if scores else 1.0


def _recall(found: list[Hit], exact: list[Hit]) -> float:
    ids = {hit.chunk_id for hit in exact}
    worst = exact[-1].vector_distance
    tolerance = 1e-6 * max(1.0, abs(worst))
    hits = sum(1 for hit in found if hit.chunk_id in ids or hit.vector_distance <= worst + tolerance)
    return min(hits, len(exact)) / len(exact)


def suggest_knob(
    conn: psycopg.Connection,
    target: SearchTarget,
    sample: Sequence[tuple[str, np.ndarray]],
    truth: Sequence[list[Hit]],
    threshold: float,
) -> str:
    """The smallest larger ``ef_search`` / ``probes`` (by doubling) that reaches ``threshold``."""
    name, _ = target.knob
    recall, value = 0.0, target.knob[1]
    for value in _larger_knobs(target):
        recall = measure_recall(conn, target.with_knob(value), sample, truth)
        if recall >= threshold:
            return f"raise index.{name} to {value} (recall {recall:.3f} measured with {name}={value})"
    if value == target.knob[1]:
        return f"{name} is already at its maximum: rebuild the index with larger parameters"
    rebuild = "m and ef_construction" if target.index_type == "hnsw" else "lists (rows / 1000)"
    return f"recall stays at {recall:.3f} even with {name}={value}: rebuild the index with larger {rebuild}"


def _larger_knobs(target: SearchTarget) -> Iterator[int]:
    _, value = target.knob
    ceiling = MAX_EF_SEARCH if target.index_type == "hnsw" else _ivfflat_lists(target)
    while value < ceiling:
        value = min(ceiling, value * 2)
        yield value


def _ivfflat_lists(target: SearchTarget) -> int:
    # More probes than lists search nothing more.
    return max(target.probes, target.lists or target.probes)


# -- index_freshness --------------------------------------------------------------------------


def check_freshness(
    conn: psycopg.Connection,
    target: SearchTarget,
    facts: dict[str, Any],
    limit_seconds: float,
    wrote_rows: bool,
    lag_ms: float | None,
) -> Check:
    """The newest row comes back through the index for its own vector; see the module docstring for
    what the limit applies to."""
    newest = _newest_row(conn, target)
    if newest is None:
        return Check(None, "n/a", "the table holds no vectors", {"age_ms": None})
    chunk_id, vector, age_ms = newest
    lag = (age_ms if lag_ms is None else float(lag_ms)) if wrote_rows else None
    found = {"newest_id": chunk_id, "age_ms": round(age_ms), "lag_ms": None if lag is None else round(lag)}
    if not facts["usable"]:
        return Check(
            False, _duration(age_ms), f"newest row {chunk_id} not checked: {_unusable(facts)}", found
        )
    searchable = _returned_for_itself(conn, target, chunk_id, vector)
    found["searchable"] = searchable
    if not searchable:
        detail = (
            f"newest row {chunk_id} is not among the {_FRESHNESS_K} rows the index returns for its vector"
        )
        return Check(False, _duration(age_ms), detail, found)
    detail = f"newest row {chunk_id} is returned through the index; "
    if lag is None:
        detail += f"this run wrote no rows, so its age ({_duration(age_ms)}) is the collection's, not a lag"
        return Check(True, _duration(age_ms), detail, found)
    within = lag <= limit_seconds * 1000
    detail += f"searchable {_duration(lag)} after it was written (limit {_duration(limit_seconds * 1000)})"
    return Check(within, _duration(lag), detail, found)


def _newest_row(conn: psycopg.Connection, target: SearchTarget) -> tuple[str, np.ndarray, float] | None:
    row = conn.execute(
        sql.SQL(
            "SELECT id, embedding, extract(epoch FROM clock_timestamp() - updated_at)::float8 * 1000"
            " FROM {} WHERE embedding IS NOT NULL ORDER BY updated_at DESC, id DESC LIMIT 1"
        ).format(target.table.ident)
    ).fetchone()
    return None if row is None else (row[0], store.stored_vector(row[1]), float(row[2]))


def _returned_for_itself(
    conn: psycopg.Connection, target: SearchTarget, chunk_id: str, vector: np.ndarray
) -> bool:
    """True when the index returns the row for its own vector, or returns only rows at least as close
    (exact duplicates, or larger inner products) so that it could not have."""
    with ann_session(conn, target):
        hits = ann_search(conn, target, vector, _FRESHNESS_K)
    if any(hit.chunk_id == chunk_id for hit in hits):
        return True
    own = -float(vector @ vector) if target.metric == "inner_product" else 0.0
    return len(hits) == _FRESHNESS_K and hits[-1].vector_distance <= own + 1e-6


# -- the report -------------------------------------------------------------------------------


def _report(
    record: CollectionRecord,
    target: SearchTarget,
    facts: dict[str, Any],
    checks: dict[str, Check],
    fail_on: Sequence[str],
    plan: QueryChecksPlan,
) -> ValidationReport:
    statuses = {name: check.status(family_of(name), fail_on) for name, check in checks.items()}
    queries = [status for name, status in statuses.items() if name.startswith("query_relevance_")]
    knob_name, knob = target.knob
    recall = checks["recall_at_k"].facts.get("recall")
    return {
        "collection": record.name,
        "table": f"{record.schema}.{record.table}",
        "version": {"number": record.version, "table": record.store_table.table},
        "index": facts,
        "search": {"mode": record.search.mode, knob_name: knob},
        "checks": {
            name: {"status": statuses[name], "value": check.value, "detail": check.detail, **check.facts}
            for name, check in checks.items()
        },
        "summary": {
            **statuses,
            "recall": recall,
            knob_name: knob,
            "search_mode": record.search.mode,
            "failed": [name for name, status in statuses.items() if status == "fail"],
            "warned": [name for name, status in statuses.items() if status == "warn"],
            "query_checks": plan.summary(all(status == "pass" for status in queries)),
        },
    }


def format_report(report: ValidationReport) -> str:
    """The report as the table the task logs: one line of index facts, then one line per check."""
    index = report["index"]
    search = ", ".join(f"{name}={value}" for name, value in report["search"].items())
    if index["exists"]:
        params = ", ".join(f"{key}={value}" for key, value in index["params"].items())
        state = "valid" if index["valid"] else "INVALID"
        about = f"{index['type']} ({params}), {_size(index['size_bytes'])}, {state}, {index['scan']}"
    else:
        about = "MISSING"
    rows = [("check", "status", "value", "detail")] + [
        (name, check["status"].upper(), check["value"], check["detail"])
        for name, check in report["checks"].items()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    keyword = index.get("keyword_index") or {}
    if keyword.get("exists"):
        keyword_about = f"gin, {_size(keyword['size_bytes'])}, {'valid' if keyword['valid'] else 'INVALID'}"
    else:
        keyword_about = "MISSING (keyword and hybrid searches scan the table)"
    lines = [
        f"index health of {report['collection']} ({report['table']}{_version_note(report)}), "
        f"searched with {search}",
        f"index {index['name']}: {about}",
        f"keyword index {keyword.get('name')}: {keyword_about}",
        *(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
            for row in rows
        ),
    ]
    return "\n".join(lines)


def _version_note(report: ValidationReport) -> str:
    version = report.get("version") or {}
    return f", version {version['number']} in {version['table']}" if version.get("number") else ""


def _duration(ms: float) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms / size:.1f} {unit}"
    return f"{ms:.0f} ms"


def _size(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
