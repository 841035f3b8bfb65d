"""The DAG factory: one DAG per collection file, the real task graph, and bad files isolated."""

from __future__ import annotations

import itertools
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import Asset
from airflow.sdk.definitions.mappedoperator import MappedOperator

from dag_factory.builder import TASK_IDS, build_collection_dag
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


def _dagbag(configs: Path) -> tuple[Any, list[warnings.WarningMessage]]:
    from airflow.dag_processing.dagbag import DagBag

    known_pools = {"default_pool", "embedding", "embedding_cheap"}
    with configs_env(configs), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bag = DagBag(dag_folder=str(DAGS), known_pools=known_pools)
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


def test_demo_collection_is_scheduled_by_the_enrichment_asset() -> None:
    spec = load_collection(CONFIGS / "documents.yaml")
    dag = build_collection_dag(spec, CONFIGS / "documents.yaml")
    assert dag.timetable.asset_condition == Asset("documents.enriched")
    assert dag.owner == "search-team"
