"""What the Collections list (the UI plugin, :mod:`capstone.ui`) costs to serve with many collections.

    .venv/bin/python benchmarks/ui_list.py [--collections 50] [--rounds 30] [--smoke]

``--collections`` collection files (``hash`` embeddings, ``--documents`` reference pages each, a
table each in schema ``bench_ui``) run on the local stack (api-server, scheduler, dag-processor,
triggerer, LocalExecutor; port ``BENCH_API_PORT``, default 28093). Every DAG is triggered once
through the REST API and the benchmark waits until every run has succeeded. Then, alternating,
``--rounds`` times each, over HTTP to the real api-server with a real token:

* **list page**: ``GET /capstone/`` (HTML: every collection's registry row, versions, row count,
  index size, newest row, last run and event), target p50 <= 300 ms at 50 collections;
* **list JSON**: ``GET /capstone/api/collections``, the same data;
* **baseline**: ``GET /api/v2/dags?tags=capstone&limit=100``, Airflow's own list of the same DAGs
  on the same server, measured in the same run.

Printed: p50 and p95 of each, and each p50 over the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from common import BENCH_DATA, BENCH_DATABASE, bench_dsn, drop_schema, machine_summary, parse_with_smoke

from capstone.local.corpus import reference_documents
from dag_factory.local.api import AirflowApi
from dag_factory.local.stack import AirflowStack

WORK = BENCH_DATA / "ui_list"
SCHEMA = "bench_ui"


def write_collections(configs: Path, count: int) -> list[str]:
    names = [f"ui_bench_{index:03d}" for index in range(count)]
    for name in names:
        spec = {
            "collection": name,
            "source": {"asset": f"{name}.enriched"},
            "embedding": {"provider": "hash", "dimension": 64, "batch_size": 500},
            "store": {"schema": SCHEMA, "table": name},
            "index": {"type": "hnsw", "metric": "cosine", "poll_interval_seconds": 0.5},
            "validation": {"fail_on": ["vector_count"]},
            "dag": {"retries": 0},
        }
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return names


def index_all(api: AirflowApi, names: list[str], batch: Path, timeout: float) -> float:
    """Trigger every collection's DAG on ``batch``; seconds until every run succeeded."""
    started = time.monotonic()
    for name in names:
        api.wait_for_dag(name, timeout=300)
    for name in names:
        api.trigger(name, conf={"batches": [{"format": "jsonl", "path": str(batch)}]})
    pending = set(names)
    while pending and time.monotonic() - started < timeout:
        for name in sorted(pending):
            runs = api.runs(name)
            if runs and runs[0]["state"] == "success":
                pending.discard(name)
            elif runs and runs[0]["state"] == "failed":
                raise SystemExit(f"{name}: its run failed; see the stack's logs")
        time.sleep(2)
    if pending:
        raise SystemExit(f"not indexed after {timeout:.0f}s: {', '.join(sorted(pending))}")
    return time.monotonic() - started


def timed(client: httpx.Client, path: str, params: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    response = client.get(path, params=params)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed * 1000


def measure(base_url: str, token: str, names: list[str], rounds: int) -> dict[str, list[float]]:
    contenders = {
        "list page": ("/capstone/", None),
        "list JSON": ("/capstone/api/collections", None),
        "baseline: Airflow's DAG list": ("/api/v2/dags", {"tags": "capstone", "limit": "100"}),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        listed = client.get("/capstone/api/collections").json()
        shown = {item["collection"]: item for item in listed}
        missing = [name for name in names if (shown.get(name) or {}).get("rows") in (None, 0)]
        if missing:
            raise SystemExit(f"the list shows no rows for {', '.join(missing)}")
        for path, params in contenders.values():  # warm: pools opened, templates compiled
            timed(client, path, params)
        for _ in range(rounds):
            for name, (path, params) in contenders.items():
                times[name].append(timed(client, path, params))
    return times


def report(times: dict[str, list[float]], collections: int) -> dict[str, float]:
    baseline = statistics.median(times["baseline: Airflow's DAG list"])
    print(f"\n{collections} collections, {len(next(iter(times.values())))} rounds each, alternating:")
    print(f"{'':32} {'p50 ms':>8} {'p95 ms':>8} {'p50 / baseline':>15}")
    summary = {}
    for name, values in times.items():
        ordered = sorted(values)
        p50, p95 = statistics.median(ordered), ordered[max(0, round(0.95 * len(ordered)) - 1)]
        summary[name] = p50
        print(f"{name:32} {p50:8.1f} {p95:8.1f} {p50 / baseline:15.2f}")
    verdict = "meets" if summary["list page"] <= 300 else "MISSES"
    print(f"list page p50 {summary['list page']:.0f} ms: {verdict} the target of <= 300 ms")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collections", type=int, default=50)
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    args = parse_with_smoke(parser, {"collections": 3, "documents": 5, "rounds": 5})
    print(machine_summary())
    dsn = bench_dsn()
    drop_schema(dsn, SCHEMA)
    WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    configs = scratch / "configs"
    configs.mkdir()
    names = write_collections(configs, args.collections)
    batch = scratch / "batch.jsonl"
    batch.write_text("".join(json.dumps(doc) + "\n" for doc in reference_documents()[: args.documents]))
    stack = AirflowStack(
        home=WORK / "airflow",
        api_port=int(os.environ.get("BENCH_API_PORT", 28093)),
        configs=configs,
        metadata_db="airflow_bench_ui",
        vector_db=BENCH_DATABASE,
    )
    stack.drop_metadata_db()
    with stack:
        api = AirflowApi(stack.api_url, "admin", stack.password)
        seconds = index_all(api, names, batch, 1200)
        print(f"{len(names)} collections indexed through the scheduler in {seconds:.0f}s")
        token = httpx.post(
            f"{stack.api_url}/auth/token", json={"username": "admin", "password": stack.password}, timeout=30
        ).json()["access_token"]
        report(measure(stack.api_url, token, names, args.rounds), len(names))
    drop_schema(dsn, SCHEMA)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
