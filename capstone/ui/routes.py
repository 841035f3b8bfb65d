"""The Collections app's routes (see :mod:`capstone.ui.app`), and how each gathers what it shows.

Imported by :func:`capstone.ui.app.create_app` only, inside the api-server: it imports Airflow's
API security module at the top, as FastAPI resolves the routes' annotations here.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import psycopg
from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from psycopg_pool import PoolTimeout

from capstone.connections import ConnectionNotDefined
from capstone.search import SEARCH_MODES, KeywordSearchUnavailable
from capstone.ui import overview, render
from capstone.ui.app import HISTORY_RUNS, Databases, Searchers, parse_filter
from capstone.ui.overview import CollectionSummary, DagInfo

__all__ = ["add_routes", "collection_detail", "collection_summaries", "search_version"]

log = logging.getLogger(__name__)

_UNREACHABLE = (ConnectionNotDefined, psycopg.Error, PoolTimeout)
# What a search answers with a message in its panel rather than a 500: bad parameters, a version no
# longer kept, a keyword search without its column, a database error, and a model this api-server
# cannot load (its extra not installed here: MissingExtraError is an ImportError; no offline copy:
# ModelNotAvailableError is an OSError).
_SEARCH_REFUSED = (ValueError, LookupError, KeywordSearchUnavailable, psycopg.Error, ImportError, OSError)


def collection_summaries(databases: Databases, dags: list[DagInfo]) -> list[CollectionSummary]:
    """The summaries of ``dags``' collections, one pooled connection per database they live in."""
    by_database: dict[str, list[DagInfo]] = {}
    for dag in dags:
        by_database.setdefault(dag.connection_id, []).append(dag)
    summaries: list[CollectionSummary] = []
    for connection_id, group in by_database.items():
        try:
            with databases.connection(connection_id) as conn:
                summaries += overview.summarise(conn, group)
        except _UNREACHABLE as exc:
            why = f"database of connection {connection_id!r} unreachable: {str(exc).splitlines()[0]}"
            log.warning("%s", why)
            summaries += [CollectionSummary(dag, problem=why) for dag in group]
    return sorted(summaries, key=lambda summary: summary.name)


def collection_detail(databases: Databases, summary: CollectionSummary) -> dict[str, Any]:
    """One collection as its page and the JSON API show it."""
    detail: dict[str, Any] = {**summary.as_json(), "versions": [], "runs": [], "last_report": None}
    runs = overview.run_history(summary.dag.dag_id, HISTORY_RUNS)
    detail["runs"] = [dataclasses.asdict(run) for run in runs]
    run_id = summary.dag.event.get("run_id")
    if run_id:
        detail["last_report"] = overview.last_report(summary.dag.dag_id, str(run_id))
    if summary.record is not None:
        with databases.connection(summary.dag.connection_id) as conn:
            detail["versions"] = overview.version_rows(conn, summary.record)
    return detail


def search_version(
    searchers: Searchers, summary: CollectionSummary, version: int | None, query: dict[str, Any]
) -> dict[str, Any]:
    """The hits of ``query`` (q, k, mode, filter) in one version of the collection, or why none."""
    record = summary.record
    assert record is not None
    answer: dict[str, Any] = {"version": version or record.version, "hits": [], "error": None}
    try:
        searcher = searchers.get(summary.dag.connection_id, record.schema, record.name, version)
        hits = searcher.search(query["q"], query["k"], mode=query["mode"], filter=query["filter"])
        answer["model"] = searcher.record.model
        answer["hits"] = [hit.as_json() for hit in hits]
    except _SEARCH_REFUSED as exc:
        answer["error"] = str(exc).splitlines()[0]
    return answer


def _visible(user: Any) -> list[DagInfo]:
    permitted = get_auth_manager().get_authorized_dag_ids(user=user, method="GET")
    return overview.capstone_dags(permitted)


def _dag_details(dag_id: str) -> DagDetails:
    """What the auth manager is asked about a DAG: its id, and its team where Airflow has teams (3.3)."""
    from airflow.models.dag import DagModel

    get_team_name = getattr(DagModel, "get_team_name", None)
    if get_team_name is None:  # Airflow 3.2: no teams
        return DagDetails(id=dag_id)
    return DagDetails(id=dag_id, team_name=get_team_name(dag_id))


def _one(request: Request, user: Any, dag_id: str) -> CollectionSummary:
    """The collection of ``dag_id``; 404 when there is none or the user may not read its DAG."""
    allowed = get_auth_manager().is_authorized_dag(method="GET", details=_dag_details(dag_id), user=user)
    dags = overview.capstone_dags([dag_id]) if allowed else []
    if not dags:
        raise HTTPException(status_code=404, detail=f"no collection {dag_id!r}")
    (summary,) = collection_summaries(request.app.state.databases, dags)
    return summary


def _query(q: str, k: int, mode: str | None, filter: str | None) -> dict[str, Any]:
    if mode is not None and mode not in SEARCH_MODES:
        raise HTTPException(status_code=422, detail=f"mode must be one of {', '.join(SEARCH_MODES)}")
    try:
        return {"q": q, "k": k, "mode": mode or None, "filter": parse_filter(filter)}
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc


def _compared(summary: CollectionSummary, detail: dict[str, Any], chosen: int | None) -> int | None:
    """The version a page query also runs on: ``chosen``, else the one being built, else the newest
    other kept version."""
    others = [row["version"] for row in detail["versions"] if row["version"] != detail["live_version"]]
    if chosen in others:
        return chosen
    building = [number for number in summary.building if number in others]
    return (building or others or [None])[-1]


def _page_results(
    request: Request,
    summary: CollectionSummary,
    detail: dict[str, Any],
    query: dict[str, Any],
    compare: int | None,
) -> list[dict[str, Any]]:
    """The page's query, on the live version and (when the collection keeps one) a second."""
    record = summary.record
    if not query["q"].strip() or record is None:
        return []
    try:
        query.update(_query(query["q"], query["k"], query["mode"], query["raw_filter"] or None))
    except HTTPException as exc:
        return [{"version": record.version, "hits": [], "error": exc.detail}]
    compared = _compared(summary, detail, compare)
    versions = [None] if compared is None else [None, compared]
    return [search_version(request.app.state.searchers, summary, version, query) for version in versions]


def add_routes(app: FastAPI) -> None:
    """Register the pages and the JSON API on ``app``."""
    _add_pages(app)
    _add_api(app)


def _add_pages(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse)
    def collections_page(request: Request, user: GetUserDep) -> HTMLResponse:
        summaries = collection_summaries(request.app.state.databases, _visible(user))
        return HTMLResponse(render.collections_page(request, summaries))

    @app.get("/collections/{dag_id}", response_class=HTMLResponse)
    def collection_page(
        request: Request,
        dag_id: str,
        user: GetUserDep,
        q: str = "",
        k: int = Query(5, ge=1, le=100),
        mode: str | None = None,
        filter: str | None = None,
        compare: int | None = None,
    ) -> HTMLResponse:
        try:
            summary = _one(request, user, dag_id)
        except HTTPException:  # the DAG tab of a DAG that is no collection: a page, not JSON
            return HTMLResponse(render.missing_page(request, dag_id), status_code=404)
        detail = collection_detail(request.app.state.databases, summary)
        query = {"q": q, "k": k, "mode": mode or None, "filter": None, "raw_filter": filter or ""}
        results = _page_results(request, summary, detail, query, compare)
        return HTMLResponse(render.collection_page(request, summary, detail, query, results))


def _add_api(app: FastAPI) -> None:
    @app.get("/api/collections")
    def list_collections(request: Request, user: GetUserDep) -> list[dict[str, Any]]:
        summaries = collection_summaries(request.app.state.databases, _visible(user))
        return [summary.as_json() for summary in summaries]

    @app.get("/api/collections/{dag_id}")
    def get_collection(request: Request, dag_id: str, user: GetUserDep) -> dict[str, Any]:
        summary = _one(request, user, dag_id)
        return collection_detail(request.app.state.databases, summary)

    @app.get("/api/collections/{dag_id}/search")
    def search(
        request: Request,
        dag_id: str,
        user: GetUserDep,
        q: str,
        k: int = Query(5, ge=1, le=100),
        mode: str | None = None,
        filter: str | None = None,
        version: int | None = None,
    ) -> dict[str, Any]:
        summary = _one(request, user, dag_id)
        if summary.record is None:
            raise HTTPException(status_code=409, detail=f"{dag_id}: {summary.problem}")
        answer = search_version(request.app.state.searchers, summary, version, _query(q, k, mode, filter))
        if answer["error"]:
            raise HTTPException(status_code=422, detail=answer["error"])
        return answer
