"""The Collections app: server-rendered pages and a JSON API, mounted by Airflow's api-server.

Routes (under :data:`URL_PREFIX`, ``/capstone``):

    GET /                                   the list of collections (HTML)
    GET /collections/{dag_id}               one collection: versions, runs, last validation, query box
    GET /api/collections                    the list (JSON)
    GET /api/collections/{dag_id}           one collection, with its versions, runs and last validation
    GET /api/collections/{dag_id}/search    q, k, mode, filter (a JSON object), version: the hits

Airflow protects its own API, not a plugin's app: every route here requires a logged-in user
through Airflow's own dependencies (``requires_access_view(AccessView.WEBSITE)``: a bearer token or
the UI's session cookie; none -> 401) and shows only collections whose DAG the user may read
(``get_authorized_dag_ids``, ``is_authorized_dag``); another collection answers 404, as if it did
not exist. Only GET routes: nothing here changes anything.

It is cheap to hold: one bounded connection pool per database (:class:`Databases`), at most
:data:`MAX_SEARCHERS` warm :class:`capstone.search.Searcher` (least recently used closed first), and
no model loaded until somebody searches.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg
    from fastapi import FastAPI
    from psycopg_pool import ConnectionPool

    from capstone.search import Searcher

__all__ = ["MAX_SEARCHERS", "URL_PREFIX", "Databases", "LazyApp", "Searchers", "create_app", "parse_filter"]

log = logging.getLogger(__name__)

URL_PREFIX = "/capstone"
POOL_SIZE = 2  # connections per collection database
MAX_SEARCHERS = 4  # warm searchers (a model each) held at once
POOL_TIMEOUT_SECONDS = 5.0  # a page waits this long for a database, then says it is unreachable
HISTORY_RUNS = 20


class Databases:
    """A bounded connection pool per Airflow connection id, opened on first use."""

    def __init__(self, max_size: int = POOL_SIZE) -> None:
        self.max_size = max_size
        self._pools: dict[str, ConnectionPool] = {}
        self._lock = threading.Lock()

    @contextmanager
    def connection(self, connection_id: str) -> Iterator[psycopg.Connection]:
        with self._pool(connection_id).connection() as conn:
            yield conn

    def _pool(self, connection_id: str) -> ConnectionPool:
        from psycopg_pool import ConnectionPool

        from capstone.connections import postgres_dsn

        with self._lock:
            pool = self._pools.get(connection_id)
            if pool is None:
                pool = ConnectionPool(
                    postgres_dsn(connection_id, attempts=1),
                    min_size=1,
                    max_size=self.max_size,
                    kwargs={"autocommit": True, "application_name": "capstone ui"},
                    open=True,
                    timeout=POOL_TIMEOUT_SECONDS,
                    name=f"capstone-ui-{connection_id}",
                )
                self._pools[connection_id] = pool
            return pool

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()


class Searchers:
    """At most ``limit`` warm searchers, by (connection, schema, collection, version)."""

    def __init__(self, limit: int = MAX_SEARCHERS) -> None:
        self.limit = limit
        self._held: OrderedDict[tuple[str, str, str, int | None], Searcher] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, connection_id: str, schema: str, collection: str, version: int | None) -> Searcher:
        from capstone.search import Searcher

        key = (connection_id, schema, collection, version)
        with self._lock:
            searcher = self._held.get(key)
            if searcher is not None:
                self._held.move_to_end(key)
                return searcher
        searcher = Searcher(
            collection, schema=schema, connection_id=connection_id, pool_size=POOL_SIZE, version=version
        )
        with self._lock:
            raced = self._held.get(key)
            if raced is not None:  # another request made one meanwhile: keep that one
                searcher.close()
                return raced
            self._held[key] = searcher
            while len(self._held) > self.limit:
                _, evicted = self._held.popitem(last=False)
                evicted.close()
        return searcher

    def __len__(self) -> int:
        return len(self._held)

    def close(self) -> None:
        with self._lock:
            for searcher in self._held.values():
                searcher.close()
            self._held.clear()


class LazyApp:
    """The ASGI app Airflow mounts, built on its first request: every Airflow process loads plugins,
    and only the api-server serves them, so importing this costs the others nothing."""

    def __init__(self) -> None:
        self._app: FastAPI | None = None
        self._lock = threading.Lock()

    @property
    def app(self) -> FastAPI:
        with self._lock:
            if self._app is None:
                self._app = create_app()
            return self._app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def create_app(databases: Databases | None = None, searchers: Searchers | None = None) -> FastAPI:
    """The Collections app (see the module's docstring)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
    from airflow.api_fastapi.core_api.security import requires_access_view
    from fastapi import Depends, FastAPI

    from capstone.ui import routes

    app = FastAPI(
        title="Capstone collections",
        description="The collections capstone keeps in pgvector, as the Airflow user may see them.",
        dependencies=[Depends(requires_access_view(AccessView.WEBSITE))],
    )
    app.state.databases = Databases() if databases is None else databases
    app.state.searchers = Searchers() if searchers is None else searchers
    routes.add_routes(app)
    return app


def parse_filter(value: str | None) -> dict[str, Any] | None:
    """The ``filter`` query parameter: a JSON object of metadata values (and ``document_id``)."""
    if not value or not value.strip():
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f'filter must be a JSON object such as {{"topic": "try"}}: {exc.msg}') from exc
    if not isinstance(parsed, dict):
        raise ValueError('filter must be a JSON object such as {"topic": "try"}')
    return parsed
