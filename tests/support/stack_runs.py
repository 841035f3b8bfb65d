"""Following runs of the local stack through the REST API (end-to-end and distributed tests)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from dag_factory.local.api import AirflowApi

TRIGGER = "capstone.triggers.VectorStoreIndexingTrigger"


def parse_stamp(stamp: str | None) -> datetime | None:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None


def max_overlap(instances: list[dict[str, Any]]) -> int:
    """The most task instances that ran at the same time (from their start and end dates)."""
    edges: list[tuple[datetime, int]] = []
    for ti in instances:
        start, end = parse_stamp(ti["start_date"]), parse_stamp(ti["end_date"])
        if start and end:
            edges += [(start, 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):
        running += step
        peak = max(peak, running)
    return peak


def follow_downstream_run(
    api: AirflowApi, dag_id: str, runs_before: int, timeout: float = 420.0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Wait for the next run of ``dag_id`` (it had ``runs_before`` runs) to finish; returns it and
    every ``wait_for_indexing`` instance seen deferred on the way."""
    deadline = time.monotonic() + timeout
    deferred_seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        runs = api.runs(dag_id)
        if len(runs) > runs_before:
            run = runs[0]
            for ti in api.task_instances(dag_id, run["dag_run_id"]):
                if ti["task_id"] == "wait_for_indexing" and ti["state"] == "deferred":
                    deferred_seen.append(ti)
            if run["state"] in ("success", "failed"):
                return run, deferred_seen
        time.sleep(0.25)
    raise TimeoutError(f"the {dag_id} run did not finish within {timeout:.0f}s")


def assert_deferred_to_triggerer(deferred_seen: list[dict[str, Any]]) -> None:
    """The sensor freed its worker slot: it deferred, and its trigger ran in the triggerer."""
    assert deferred_seen, "wait_for_indexing was never seen deferred"
    assert any(ti["trigger"] and ti["trigger"]["classpath"] == TRIGGER for ti in deferred_seen)
    assert any(
        ti["triggerer_job"] and ti["triggerer_job"]["job_type"] == "TriggererJob" for ti in deferred_seen
    )
