"""The DAG factory: one DAG per collection file, the real task graph, and bad files isolated."""

from __future__ import annotations

import itertools
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import Asset
from airflow.sdk.definitions.mappedoperator import MappedOperator

from dag_factory.builder import TASK_IDS, build_collection_dag
from dag_factory.factory import build_dags
from dag_factory.loader import load_collection
from tests.support.airflow import configs_env

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DAGS = ROOT / "dags"
PIPELINE = [
    "load_enriched_documents",
    "prepare_chunks",
    "generate_embedding",
    "aggregate_embeddings",
    "batch_upsert_vectors",
    "wait_for_indexing",
    "validate_index_health",
    "publish_indexed_asset",
]


def _dagbag(configs: Path, dags: Path = DAGS) -> tuple[Any, list[warnings.WarningMessage]]:
    from airflow.dag_processing.dagbag import DagBag

    known_pools = {"default_pool", "embedding", "embedding_cheap"}
    with configs_env(configs), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bag = DagBag(dag_folder=str(dags), known_pools=known_pools)
    return bag, caught


def test_dags_folder_has_one_dag_per_config_and_no_errors_or_warnings() -> None:
    bag, caught = _dagbag(CONFIGS)
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"documents", "release_notes", "enrich_documents"}
    assert not bag.dag_warnings
    assert not [w for w in caught if "capstone" in str(w.filename) or "dag_factory" in str(w.filename)]


def test_a_broken_config_costs_only_its_own_dag(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "broken.yaml").write_text("collection: broken\nindex:\n  type: hnsw\n  m: 0\n")

    bag, _ = _dagbag(configs)

    assert {"documents", "release_notes"} <= set(bag.dag_ids)
    assert "broken" not in bag.dag_ids
    ((error_file, message),) = bag.import_errors.items()
    assert error_file.endswith("collection_config_errors.py")
    assert "broken.yaml:4 index.m" in message


def test_a_task_process_reads_and_builds_only_the_dag_it_runs(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    # Broken beyond validation, but plainly named: a task of another DAG must never read it.
    (configs / "broken.yaml").write_text("collection: broken\nindex:\n  type: hnsw\n  m: 0\n")

    with _parsing_context("release_notes"):
        bag, _ = _dagbag(configs, DAGS / "collection_dags.py")  # the one file a task parses
        only = build_dags(configs, only="release_notes")

    assert set(bag.dag_ids) == {"release_notes"}
    assert bag.import_errors == {}
    assert set(only.dags) == {"release_notes"} and only.errors == []
    assert [issue.path.name for issue in build_dags(configs).errors] == ["broken.yaml"]


def test_a_file_not_read_plainly_makes_a_task_process_load_every_file(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    # The same name as release_notes.yaml, declared in a way the quick scan does not read: the
    # clash must be found as the dag-processor finds it, so every file is loaded.
    text = (CONFIGS / "release_notes.yaml").read_text()
    text = text.replace("collection: release_notes", '"collection": release_notes')
    (configs / "another.yaml").write_text(text)

    result = build_dags(configs, only="release_notes")

    assert set(result.dags) == {"release_notes"}
    assert "`another.yaml`" in (result.dags["release_notes"].doc_md or "")  # the first file by path wins
    assert [issue.path.name for issue in result.errors] == ["release_notes.yaml"]


@contextmanager
def _parsing_context(dag_id: str) -> Iterator[None]:
    """What Airflow's task runner sets before it parses the DAG file of the task it runs."""
    os.environ["_AIRFLOW_PARSING_CONTEXT_DAG_ID"] = dag_id
    try:
        yield
    finally:
        os.environ.pop("_AIRFLOW_PARSING_CONTEXT_DAG_ID", None)


@pytest.mark.parametrize("name", ["documents", "release_notes"])
def test_generated_graph_follows_the_design(name: str) -> None:
    spec = load_collection(CONFIGS / f"{name}.yaml")
    dag = build_collection_dag(spec, CONFIGS / f"{name}.yaml")

    assert [t.task_id for t in dag.topological_sort()] == PIPELINE == list(TASK_IDS)
    assert dag.timetable.asset_condition == Asset(spec.source_asset)
    assert dag.catchup is False and dag.max_active_runs == spec.dag.max_active_runs
    for upstream, downstream in itertools.pairwise(PIPELINE):
        assert downstream in dag.get_task(upstream).downstream_task_ids

    embed = dag.get_task("generate_embedding")
    assert isinstance(embed, MappedOperator)
    assert embed.pool == spec.embedding.pool
    assert embed.retries == spec.embedding.retries
    assert embed.retry_exponential_backoff
    assert embed.max_retry_delay is not None
    assert embed.max_retry_delay.total_seconds() == spec.embedding.max_retry_delay_seconds

    sensor = dag.get_task("wait_for_indexing")
    assert type(sensor).__name__ == "VectorStoreIndexingSensor"
    publish = dag.get_task("publish_indexed_asset")
    assert [outlet.name for outlet in publish.outlets] == [spec.output_asset_name]


@pytest.mark.parametrize(
    ("config", "trigger"),
    [("articles.yaml", "TableChangesTrigger"), ("articles_polled.yaml", "TablePollTrigger")],
)
def test_a_followed_table_adds_an_asset_watched_by_its_trigger(config: str, trigger: str) -> None:
    path = ROOT / "tests" / "e2e" / "table_configs" / config
    spec = load_collection(path)
    dag = build_collection_dag(spec, path)

    condition: Any = dag.timetable.asset_condition  # AssetAny: the upstream asset | the table's
    upstream, changes = condition.objects
    assert upstream == Asset(spec.source_asset)
    assert changes.name == f"{spec.collection}.table_changes"
    (watcher,) = changes.watchers
    classpath, kwargs = watcher.trigger.serialize()
    assert classpath == f"capstone.triggers.{trigger}"
    assert kwargs["collection"] == spec.collection


def test_demo_collection_is_scheduled_by_the_enrichment_asset() -> None:
    spec = load_collection(CONFIGS / "documents.yaml")
    dag = build_collection_dag(spec, CONFIGS / "documents.yaml")
    assert dag.timetable.asset_condition == Asset("documents.enriched")
    assert dag.owner == "search-team"
