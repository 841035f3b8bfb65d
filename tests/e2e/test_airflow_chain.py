"""The asset chain on real Airflow services: api-server, scheduler, dag-processor and triggerer.

``enrich_documents`` is triggered through the REST API; its ``documents.enriched`` event must
start the ``documents`` DAG, whose sensor defers to the triggerer while the index builds, whose
embedding tasks respect their pool, and whose last task publishes ``documents.indexed``.

Then a real browser (Debian's chromium, through Playwright) logs in to the same stack's UI and
finds the collection in the Collections pages of the plugin (:mod:`capstone.ui`).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dag_factory.local.api import AirflowApi
from dag_factory.local.stack import AirflowStack
from tests.support.browser import browser_page, keep_screenshot, log_in
from tests.support.stack_runs import assert_deferred_to_triggerer, follow_downstream_run, max_overlap
from tests.support.stacks import e2e_stack

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
COPIES = 30  # 30 x the language reference: ~22k chunks, so the index build takes a few seconds
CHUNKS = 733 * COPIES


@pytest.fixture(scope="module")
def stack(pg_dsn: str) -> Iterator[AirflowStack]:
    stack = e2e_stack()
    assert stack.postgres_uri() == pg_dsn  # the tests' database, never the demo's
    shutil.rmtree(stack.home, ignore_errors=True)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS e2e CASCADE")
    stack.drop_metadata_db()
    with stack as running:
        yield running


@pytest.fixture(scope="module")
def api(stack: AirflowStack) -> AirflowApi:
    return AirflowApi(stack.api_url, "admin", stack.password)


def test_asset_chain_runs_on_real_services(stack: AirflowStack, api: AirflowApi, pg_dsn: str) -> None:
    api.wait_for_dag("documents")
    api.wait_for_dag("enrich_documents")
    assert api.import_errors() == []

    upstream = api.trigger("enrich_documents", conf={"copies": COPIES})
    run, deferred_seen = follow_downstream_run(api, "documents", runs_before=0)
    tis = api.task_instances("documents", run["dag_run_id"])
    states = {ti["task_id"]: ti["state"] for ti in tis if ti["map_index"] < 1}
    assert run["state"] == "success", states

    # started by the upstream asset event, not by hand
    assert run["run_type"] == "asset_triggered"
    (event,) = api.upstream_events("documents", run["dag_run_id"])
    assert event["name"] == "documents.enriched"
    assert event["source_run_id"] == upstream["dag_run_id"]

    assert_deferred_to_triggerer(deferred_seen)

    # the pool bounded the mapped embedding tasks
    embedding = [ti for ti in tis if ti["task_id"] == "generate_embedding"]
    assert len(embedding) == -(-CHUNKS // 1500)
    assert {ti["pool"] for ti in embedding} == {"embedding_e2e"}
    assert 1 <= max_overlap(embedding) <= 2

    # the indexed asset was published with the run's summary
    (published,) = api.asset_events(source_dag_id="documents", source_run_id=run["dag_run_id"])
    assert published["name"] == "documents.indexed"
    assert published["extra"]["vector_count"] == CHUNKS
    assert published["extra"]["chunks_embedded"] == CHUNKS
    published_index = published["extra"]["index_name"]
    assert published_index.startswith("documents__v1_hnsw_")  # version 1, behind the view e2e.documents
    assert (published["extra"]["version"], published["extra"]["switched"]) == (1, False)
    # ... and the build was logged by the triggerer process (its own log file), not by a worker
    trigger_logs = list(
        stack.home.glob(
            f"logs/dag_id=documents/run_id={run['dag_run_id']}/*task_id=wait_for_indexing/*.log.trigger.*.log"
        )
    )
    trigger_text = "".join(path.read_text(errors="replace") for path in trigger_logs)
    assert f'{published_index}\\": built in' in trigger_text
    assert '"logger":"capstone.triggers.VectorStoreIndexingTrigger"' in trigger_text

    # the upsert merged its batches on two connections, and the worker's log has every one of them
    upsert_logs = stack.home.glob(
        f"logs/dag_id=documents/run_id={run['dag_run_id']}/task_id=batch_upsert_vectors/attempt=*.log"
    )
    upsert_text = "".join(path.read_text(errors="replace") for path in upsert_logs)
    merged = {(int(n), int(total)) for n, total in re.findall(r"upsert batch (\d+)/(\d+): ", upsert_text)}
    total = max(t for _, t in merged) if merged else 0
    assert total >= 2 and merged == {(n, total) for n in range(1, total + 1)}, upsert_text[-2000:]

    with psycopg.connect(pg_dsn) as conn:
        count = conn.execute("SELECT count(*), count(DISTINCT document_id) FROM e2e.documents").fetchone()
    assert count == (CHUNKS, 79 * COPIES)


def _indexed(api: AirflowApi) -> None:
    """The collection indexed at least once (the chain test above does it; alone, this test does)."""
    if api.asset_events(source_dag_id="documents"):
        return
    api.wait_for_dag("documents")
    runs_before = len(api.runs("documents"))
    api.trigger("enrich_documents", conf={"copies": 1})
    run, _ = follow_downstream_run(api, "documents", runs_before=runs_before)
    assert run["state"] == "success"


def test_the_collection_is_seen_in_the_airflow_ui(stack: AirflowStack, api: AirflowApi, pg_dsn: str) -> None:
    _indexed(api)
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM e2e.documents").fetchone()
    assert row is not None
    rows = f"{row[0]:,}"
    base = stack.api_url
    with browser_page() as page:
        log_in(page, base, "admin", stack.password)

        # Browse -> Collections: the list, in the UI's iframe
        page.get_by_role("button", name="Browse").click()
        page.get_by_role("menuitem", name="Collections").click()
        page.wait_for_url(f"{base}/plugin/capstone-collections")
        listed = page.frame_locator("iframe").locator('tr[data-collection="documents"]')
        assert listed.locator("td.rows").inner_text() == rows  # as the database holds it
        assert "enrich_documents" not in page.frame_locator("iframe").locator("#collections").inner_text()
        keep_screenshot(page, "collections-ui", "1-collections")

        # the collection's page, and a query with hits
        frame = page.frame_locator("iframe")
        listed.get_by_role("link", name="documents", exact=True).click()
        frame.locator("h1", has_text="documents").wait_for()
        assert frame.locator("#rows").inner_text() == rows
        assert frame.locator("#versions .badge.live").count() == 1
        frame.locator("input[name=q]").fill("the with statement and context managers")
        frame.get_by_role("button", name="Search").click()
        frame.locator(".hit").first.wait_for()
        assert frame.locator(".hit").count() == 5
        assert "with" in frame.locator(".hit").first.inner_text()
        keep_screenshot(page, "collections-ui", "2-collection-query")

        # the DAG's own tab
        page.goto(f"{base}/dags/documents")
        page.get_by_role("link", name="Collection", exact=True).click()
        page.frame_locator("iframe").locator("h1", has_text="documents").wait_for()
        assert page.frame_locator("iframe").locator("#checks").get_by_text("vector_count").count() == 1
        keep_screenshot(page, "collections-ui", "3-dag-tab")
