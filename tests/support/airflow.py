"""Running a collection's DAG with ``dag.test()`` and reading back what Airflow recorded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


def write_collection(configs: Path, name: str, schema: str, **overrides: Any) -> Path:
    """Write a hash-provider collection file into ``configs`` and return its path."""
    spec: dict[str, Any] = {
        "collection": name,
        "source": {"asset": f"{name}.enriched"},
        # One mapped task per batch of 100 (up to 64), so that tests see several mapped tasks.
        "embedding": {
            "provider": "hash",
            "dimension": 64,
            "batch_size": 100,
            "parallel_tasks": 64,
            "pool": "embedding_test",
        },
        "store": {"schema": schema, "table": name},
        "index": {"type": "hnsw", "metric": "cosine", "poll_interval_seconds": 0.2},
        "upsert_batch_size": 250,
        "validation": {"fail_on": ["vector_count"]},
        "dag": {"retries": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    configs.mkdir(parents=True, exist_ok=True)
    path = configs / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@contextmanager
def configs_env(configs: Path) -> Iterator[None]:
    """Point the DAG factory (and so the DAGs folder dag.test() parses) at ``configs``."""
    previous = os.environ.get("DAG_FACTORY_CONFIGS")
    os.environ["DAG_FACTORY_CONFIGS"] = str(configs)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DAG_FACTORY_CONFIGS", None)
        else:
            os.environ["DAG_FACTORY_CONFIGS"] = previous


def run_collection(spec_path: Path, batches: list[dict[str, Any]], **conf: Any) -> Any:
    """Build the collection's DAG from its file and run it once with ``dag.test()``; ``conf`` goes
    into the run's conf beside the batches (e.g. ``allow_mass_delete=True``)."""
    from dag_factory.builder import build_collection_dag
    from dag_factory.loader import load_collection

    dag = build_collection_dag(load_collection(spec_path), spec_path)
    with configs_env(spec_path.parent):
        return dag.test(run_conf={"batches": batches, **conf})


def task_states(dag_id: str, run_id: str) -> dict[str, list[str]]:
    """``task_id -> [state per map index]`` of one run."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state).where(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id
            )
        ).all()
    states: dict[str, list[str]] = {}
    for task_id, _map_index, state in sorted(rows, key=lambda r: (r[0], r[1])):
        states.setdefault(task_id, []).append(str(state))
    return states


def xcoms(dag_id: str, run_id: str) -> list[tuple[str, int, str, Any]]:
    """``(task_id, map_index, key, value)`` of every XCom the run wrote."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run_id)
        ).all()
        return [(x.task_id, x.map_index, x.key, XComModel.deserialize_value(x)) for x in rows]


def xcom_value(dag_id: str, run_id: str, task_id: str) -> Any:
    """The return value of a non-mapped task."""
    for task, map_index, key, value in xcoms(dag_id, run_id):
        if task == task_id and key == "return_value" and map_index == -1:
            return value
    raise KeyError(f"no return value for {task_id}")


def asset_events(name: str) -> list[dict[str, Any]]:
    """Extras of every event of the asset called ``name``, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.extra)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.name == name)
            .order_by(AssetEvent.id)
        ).all()
    return [dict(row[0] or {}) for row in rows]


def try_numbers(dag_id: str, run_id: str, task_id: str) -> list[int]:
    """The try number each map index of ``task_id`` ended on, by map index."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(TaskInstance.map_index, TaskInstance.try_number)
            .where(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id, TaskInstance.task_id == task_id
            )
            .order_by(TaskInstance.map_index)
        ).all()
    return [int(try_number) for _map_index, try_number in rows]
