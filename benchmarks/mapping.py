"""Why we map over batches: one mapped task per chunk against one per batch, under ``dag.test()``.

    .venv/bin/python benchmarks/mapping.py [--chunks 1000] [--batch-size 512] [--rounds 1] [--smoke]

Two small DAGs of the same shape, prepare -> embed.expand(...) -> aggregate, embed the same
``--chunks`` chunk texts with the ``hash`` provider:

* **per chunk** (the seed's design): ``prepare`` returns one descriptor per chunk and ``embed`` is
  mapped over them: one task instance per chunk;
* **batched** (ours): ``prepare`` returns one descriptor per batch of ``--batch-size`` chunks (the
  spec's default ``embedding.batch_size`` is 512), as ``prepare_chunks`` does.

The embed task does the same work either way (hash-embed its texts, return a small manifest), so
the difference is what a mapped task instance costs Airflow. Each DAG run is a fresh Python
process. The last line is the key ratio: time per chunk per-chunk / batched.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    BENCH_DATA,
    alternate,
    bench_dsn,
    collection_documents,
    failed_tasks,
    machine_summary,
    parse_with_smoke,
    prepare_airflow,
    run_facts,
    run_worker,
    start_execution_api,
    write_result,
)

WORK_DIR = BENCH_DATA / "mapping"
DAGS_FOLDER = WORK_DIR / "dags"
PER_CHUNK, BATCHED = "bench_mapping_per_chunk", "bench_mapping_batched"
# dag.test() parses the DAGs folder to serialize the DAG it runs: this file puts both DAGs there
# (it mentions "airflow" and "dag", which Airflow's safe-mode file filter looks for).
DAG_FILE = f"""# airflow DAG file written by benchmarks/mapping.py: both mapping DAGs
import sys

sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from mapping import build_dags

globals().update(build_dags())
"""


def chunk_texts(chunks: int) -> list[str]:
    """The chunk texts both DAGs embed (deterministic, so the parsed and the run DAG agree)."""
    return [text for document in collection_documents(chunks) for text in document["chunks"]]


def build_dags(chunks: int | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """The per-chunk and the batched DAG over ``chunks`` chunks (defaults from the environment)."""
    import os

    from airflow.sdk import DAG, task

    chunks = chunks or int(os.environ.get("BENCH_MAPPING_CHUNKS", "1000"))
    batch_size = batch_size or int(os.environ.get("BENCH_MAPPING_BATCH", "512"))
    texts = chunk_texts(chunks)

    @task
    def embed(span: dict[str, int]) -> dict[str, Any]:
        """Hash-embed the chunks ``[start, stop)``; the vectors stay here, as ours go to staging."""
        from capstone.embeddings.hashing import HashEmbedder

        vectors = HashEmbedder(dimension=384).embed(texts[span["start"] : span["stop"]])
        return {"start": span["start"], "embedded": len(vectors), "failed_ids": []}

    @task
    def aggregate(manifests: Any) -> dict[str, int]:
        """Total embedded chunks over the mapped tasks."""
        results = manifests[:]
        return {"batches": len(results), "embedded": sum(result["embedded"] for result in results)}

    @task
    def prepare(size: int) -> list[dict[str, int]]:
        """One descriptor per mapped task: a chunk (size 1) or a batch of chunks."""
        return [{"start": start, "stop": min(start + size, chunks)} for start in range(0, chunks, size)]

    dags: dict[str, Any] = {}
    for dag_id, size in ((PER_CHUNK, 1), (BATCHED, batch_size)):
        with DAG(dag_id, schedule=None, catchup=False, tags=["benchmark"]) as dag:
            aggregate(embed.expand(span=prepare(size)))
        dags[dag_id] = dag
    return dags


def worker(dag_id: str, chunks: int, batch_size: int, dsn: str, result_path: Path) -> None:
    """In a fresh process: ``dag.test()`` one of the two DAGs; write its time and facts."""
    import os

    os.environ["BENCH_MAPPING_CHUNKS"] = str(chunks)
    os.environ["BENCH_MAPPING_BATCH"] = str(batch_size)
    prepare_airflow(WORK_DIR / "configs", dsn, DAGS_FOLDER)
    dag = build_dags(chunks, batch_size)[dag_id]
    harness = start_execution_api()
    started = time.perf_counter()
    run = dag.test()
    seconds = time.perf_counter() - started
    write_result(
        result_path,
        {
            "seconds": seconds,
            "harness_seconds": harness,
            "state": str(run.state),
            **run_facts(dag_id, run.run_id),
        },
    )


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=1000, help="at most [core] max_map_length (1024)")
    parser.add_argument("--batch-size", type=int, default=512, help="chunks per mapped task when batched")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (per chunk, batched)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dag-id", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    return parse_with_smoke(parser, {"chunks": 20, "batch_size": 8})


def main() -> None:
    """Both DAGs, alternating; time per chunk of each, the ratio last."""
    args = parse_args()
    if args.worker:
        worker(args.dag_id, args.chunks, args.batch_size, args.dsn, args.result)
        return
    print(machine_summary(), flush=True)
    dsn = bench_dsn()
    DAGS_FOLDER.mkdir(parents=True, exist_ok=True)
    (DAGS_FOLDER / "bench_mapping_dags.py").write_text(DAG_FILE)
    prepare_airflow(WORK_DIR / "configs", dsn, DAGS_FOLDER)
    runs: dict[str, list[dict[str, Any]]] = {PER_CHUNK: [], BATCHED: []}

    def timed(dag_id: str) -> float:
        arguments = ["--dag-id", dag_id, "--dsn", dsn, "--chunks", str(args.chunks)]
        result = run_worker(
            Path(__file__),
            [*arguments, "--batch-size", str(args.batch_size)],
            f"mapping-{dag_id}-{time.time_ns()}",
        )
        if result["state"] != "success" or failed_tasks(result):
            raise SystemExit(f"{dag_id} did not succeed: {failed_tasks(result)}")
        runs[dag_id].append(result)
        return float(result["seconds"])

    alternate(
        args.rounds, {"per chunk (seed)": lambda: timed(PER_CHUNK), "batched (ours)": lambda: timed(BATCHED)}
    )
    best = {dag_id: min(results, key=lambda r: r["seconds"]) for dag_id, results in runs.items()}
    print(f"\n{args.chunks} chunks, best of {args.rounds} round(s)")
    for label, dag_id in (("per chunk (seed)", PER_CHUNK), ("batched (ours)", BATCHED)):
        result = best[dag_id]
        print(
            f"{label:<17} {result['seconds']:7.1f}s  {result['seconds'] / args.chunks * 1000:7.1f} ms/chunk  "
            f"{result['mapped_task_instances']:5d} mapped task instances "
            f"(embed span {result['task_seconds'].get('embed', 0):.1f}s), largest XCom "
            f"{result['largest_xcom_bytes']} bytes"
        )
    harness = max(result["harness_seconds"] for results in runs.values() for result in results)
    print(f"dag.test() harness start-up, warmed up before the clock in every run: up to {harness:.1f}s")
    expected = math.ceil(args.chunks / args.batch_size)
    if best[BATCHED]["mapped_task_instances"] != expected:
        raise SystemExit(
            f"batched run mapped {best[BATCHED]['mapped_task_instances']} tasks, expected {expected}"
        )
    ratio = best[PER_CHUNK]["seconds"] / best[BATCHED]["seconds"]
    print(f"time per chunk, per-chunk mapping / batched mapping: {ratio:.1f}")


if __name__ == "__main__":
    main()
