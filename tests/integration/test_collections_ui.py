"""The Collections app (:mod:`capstone.ui`) on what real runs left behind: two collections indexed
by ``dag.test()`` into the embedded Postgres (one of them with a second embedding model, so two
versions), read through Airflow's own auth dependencies with a real auth manager and real JWTs.

Access: no token -> 401; a user who may not read a DAG sees neither its collection in the list nor
its page, JSON or search (404). Every number shown is checked against the database it comes from.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from capstone.local.corpus import reference_documents
from capstone.ui.app import Databases, Searchers, create_app
from tests.support.airflow import run_collection, task_states, write_collection
from tests.support.tables import drop_test_schema, jsonl_batch
from tests.support.ui_auth import dag_list_auth_manager

pytestmark = pytest.mark.usefixtures("airflow_db")

# Airflow's test metadata DB outlives a session: names of this session's own, so that runs of earlier
# sessions are not counted.
_SESSION = uuid.uuid4().hex[:6]
SHOWN, HIDDEN = f"ui_shown_{_SESSION}", f"ui_hidden_{_SESSION}"
QUERY = "try statement exception handlers"
TOKENS: dict[str, str] = {}  # user -> JWT, signed by the auth manager of the module's client


@pytest.fixture(scope="module")
def indexed(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory, airflow_db: Path) -> Iterator[str]:
    """``ui_shown`` (hash 64-d, then 128-d: version 2 live, version 1 retired) and ``ui_hidden``
    (64-d, then a 128-d version whose validation fails: version 1 live, version 2 building)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    folder = tmp_path_factory.mktemp("ui")
    documents = reference_documents()[:40]
    batch = jsonl_batch(folder / "batch.jsonl", documents)
    configs = folder / "configs"
    for name, embedding in ((SHOWN, {}), (SHOWN, {"dimension": 128}), (HIDDEN, {})):
        spec = write_collection(configs, name, schema, embedding=embedding)
        run = run_collection(spec, [batch])
        assert str(run.state) == "success", task_states(spec.stem, run.run_id)
    ghost = {"id": "ghost", "query": "anything", "expected_document_id": "no-such-document"}
    refused = write_collection(
        configs,
        HIDDEN,
        schema,
        embedding={"dimension": 128},
        validation={"sample_queries": [ghost], "fail_on": ["vector_count", "query_relevance"]},
    )
    assert str(run_collection(refused, [batch]).state) == "failed"  # version 2 stays building
    yield schema
    drop_test_schema(pg_dsn, schema)


@pytest.fixture(scope="module")
def client(indexed: str) -> Iterator[TestClient]:
    with dag_list_auth_manager({"limited": {HIDDEN}}) as manager:
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

        app = create_app(Databases(), Searchers(limit=1))
        with TestClient(app) as test_client:
            for name in ("admin", "limited"):
                TOKENS[name] = manager.generate_jwt(SimpleAuthManagerUser(username=name, role="viewer"))
            yield test_client
        app.state.searchers.close()
        app.state.databases.close()


def _as(client: TestClient, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[user]}"}


def _rows(dsn: str, schema: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/api/collections",
        f"/collections/{SHOWN}",
        f"/api/collections/{SHOWN}",
        f"/api/collections/{SHOWN}/search?q=x",
    ],
)
def test_every_route_requires_a_logged_in_user(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer not-a-jwt"}).status_code in (401, 403)
    # the UI's session cookie is a login too
    token = TOKENS["admin"]
    assert client.get(path, headers={"Cookie": f"_token={token}"}).status_code == 200


def test_the_list_shows_each_collection_as_its_database_holds_it(
    client: TestClient, pg_dsn: str, indexed: str
) -> None:
    listed = {
        item["collection"]: item
        for item in client.get("/api/collections", headers=_as(client, "admin")).json()
    }
    assert {SHOWN, HIDDEN} <= set(listed)
    shown = listed[SHOWN]
    assert shown["rows"] == _rows(pg_dsn, indexed, SHOWN) > 0 and shown["rows_exact"]
    assert (shown["live_version"], shown["building_versions"]) == (2, [])
    assert (shown["provider"], shown["dimension"], shown["table"]) == ("hash", 128, f"{indexed}.{SHOWN}")
    assert shown["index"]["type"] == "hnsw" and shown["index"]["size_bytes"] > 0
    assert shown["index"]["keyword_index"]  # the GIN index of keyword and hybrid searches
    assert shown["last_run"]["state"] == "success"
    assert shown["last_validation"]["failed"] == []
    assert shown["newest_row"] is not None
    assert shown["last_run"]["embedded"] == shown["rows"]  # the second run re-embedded it all
    hidden = listed[HIDDEN]  # a model change refused by its validation
    assert (hidden["live_version"], hidden["building_versions"], hidden["dimension"]) == (1, [2], 64)
    assert hidden["last_run"]["state"] == "failed" and hidden["last_run"]["embedded"] is None

    page = client.get("/", headers=_as(client, "admin")).text
    assert f'data-collection="{SHOWN}"' in page and f'data-collection="{HIDDEN}"' in page
    assert f"{shown['rows']:,}" in page and "building v2" in page


def test_a_user_who_may_not_read_a_dag_does_not_see_its_collection(client: TestClient) -> None:
    limited = _as(client, "limited")
    listed = {item["collection"] for item in client.get("/api/collections", headers=limited).json()}
    assert SHOWN in listed and HIDDEN not in listed
    assert f'data-collection="{HIDDEN}"' not in client.get("/", headers=limited).text
    for path in (
        f"/collections/{HIDDEN}",
        f"/api/collections/{HIDDEN}",
        f"/api/collections/{HIDDEN}/search?q=x",
    ):
        assert client.get(path, headers=limited).status_code == 404, path
        assert client.get(path, headers=_as(client, "admin")).status_code == 200, path


def test_a_collection_shows_its_versions_runs_and_last_validation_report(client: TestClient) -> None:
    detail = client.get(f"/api/collections/{SHOWN}", headers=_as(client, "admin")).json()
    assert [(v["version"], v["status"], v["dimension"]) for v in detail["versions"]] == [
        (1, "retired", 64),
        (2, "live", 128),
    ]
    assert all(v["validation"]["failed"] == [] for v in detail["versions"])
    runs = detail["runs"]
    assert [run["state"] for run in runs] == ["success", "success"]
    assert runs[0]["embedded"] > 0 and runs[0]["set_aside"] == 0
    report = detail["last_report"]
    assert report["collection"] == SHOWN and report["checks"]["vector_count"]["status"] == "pass"
    page = client.get(f"/collections/{SHOWN}", headers=_as(client, "admin")).text
    assert 'id="runs-chart"' in page and page.count("<rect ") >= 2  # a bar per run
    assert "vector_count" in page and "retired" in page


def test_search_answers_from_the_live_version_or_another_kept_one(client: TestClient) -> None:
    admin = _as(client, "admin")
    searchers: Searchers = client.app.state.searchers  # type: ignore[attr-defined]
    searchers.close()
    client.get("/", headers=admin)
    client.get(f"/collections/{SHOWN}", headers=admin)
    assert len(searchers) == 0  # no model is loaded until somebody searches

    live = client.get(f"/api/collections/{SHOWN}/search", params={"q": QUERY, "k": 3}, headers=admin).json()
    assert live["version"] == 2 and [hit["rank"] for hit in live["hits"]] == [1, 2, 3]
    assert all(hit["text"] and hit["document_id"] for hit in live["hits"])
    old = client.get(
        f"/api/collections/{SHOWN}/search", params={"q": QUERY, "k": 3, "version": 1}, headers=admin
    )
    assert old.json()["version"] == 1 and len(old.json()["hits"]) == 3
    assert len(searchers) == 1  # bounded: the least recently used searcher was closed

    keyword = client.get(
        f"/api/collections/{SHOWN}/search", params={"q": "finally", "mode": "keyword", "k": 2}, headers=admin
    ).json()
    assert keyword["hits"] and all("finally" in hit["text"].lower() for hit in keyword["hits"])
    bad = client.get(f"/api/collections/{SHOWN}/search", params={"q": "x", "filter": "[1]"}, headers=admin)
    assert bad.status_code == 422 and "JSON object" in bad.json()["detail"]

    page = client.get(f"/collections/{SHOWN}", params={"q": QUERY, "k": 2}, headers=admin).text
    assert page.count('class="version-hits"') == 2  # live and the retired version, side by side
    assert 'data-version="2"' in page and 'data-version="1"' in page and page.count('class="hit"') == 4


def test_a_version_being_built_answers_beside_the_live_one(client: TestClient) -> None:
    admin = _as(client, "admin")
    detail = client.get(f"/api/collections/{HIDDEN}", headers=admin).json()
    building = detail["versions"][-1]
    assert (building["version"], building["status"]) == (2, "building")
    assert "query_relevance_ghost" in building["validation"]["failed"]  # why it has not switched
    search = f"/api/collections/{HIDDEN}/search"
    assert len(client.get(search, params={"q": QUERY, "version": 2}, headers=admin).json()["hits"]) == 5
    page = client.get(f"/collections/{HIDDEN}", params={"q": QUERY, "k": 2}, headers=admin).text
    assert 'data-version="1"' in page and 'data-version="2"' in page and "(building)" in page


def test_a_dag_that_indexes_nothing_is_not_found(client: TestClient) -> None:
    assert client.get("/api/collections/no_such_dag", headers=_as(client, "admin")).status_code == 404
    page = client.get("/collections/no_such_dag", headers=_as(client, "admin"))  # the tab of any DAG
    assert page.status_code == 404 and "indexes no collection" in page.text
