"""Large vectors in pgvector: `vector` vs `halfvec` vs binary quantization with an exact re-rank,
on 100k x 1536 low-rank vectors (issue 16's groundwork: what `store.vector_type` and
`index.quantization` would buy).

The data: 100,000 vectors of 1536 dimensions drawn from a 64-dimensional subspace with decaying
singular values, plus a little isotropic noise, L2-normalised (embeddings of real text are far
from uniform; recall on uniform random vectors means nothing). 200 queries come from the same
distribution and are not in the table. Truth is the exact top 10 by cosine in float32 (numpy).

For each variant, the same rows, HNSW m=16 ef_construction=64, cosine, the same
maintenance_work_mem (2GB) and parallel workers; timed is the `CREATE INDEX` alone:

- `vector`: `vector(1536)`, `vector_cosine_ops`, `ef_search` 100;
- `halfvec`: `halfvec(1536)` (2-byte floats), `halfvec_cosine_ops`, `ef_search` 100;
- `binary`: an expression index over `binary_quantize(embedding)::bit(1536)` (`bit_hamming_ops`) of
  the `vector` table; a query takes the `--rerank` nearest by Hamming distance (`ef_search` =
  that) and re-ranks them by the exact cosine distance of the full vectors.

Printed per variant: build seconds, table + index size, recall@10, query p50; then the ratios to
`vector` (build time, total size, index size), the binary variant's last.

    .venv/bin/python benchmarks/quantization.py [--rows 100000] [--queries 200] [--rerank 200] [--smoke]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import psycopg
from common import bench_dsn, drop_schema, machine_summary, parse_with_smoke
from pgvector.psycopg import register_vector
from psycopg import sql

SCHEMA = "bench_quantization"
DIMENSION = 1536
RANK = 64
K = 10
MEMORY = "2GB"


def low_rank_vectors(rows: int, seed: int) -> np.ndarray:
    """``rows`` unit vectors from a 64-d subspace of R^1536 with decaying spectrum, plus noise."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(7).standard_normal((RANK, DIMENSION)).astype(np.float32)
    spectrum = (1.0 / np.sqrt(np.arange(1, RANK + 1))).astype(np.float32)
    vectors = (rng.standard_normal((rows, RANK)).astype(np.float32) * spectrum) @ basis
    vectors += rng.standard_normal((rows, DIMENSION)).astype(np.float32) * 0.05 * float(np.sqrt(RANK))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def exact_top_k(table: np.ndarray, queries: np.ndarray, k: int) -> list[set[int]]:
    """Row ids of the k nearest rows by cosine (the vectors are unit: the largest dot products)."""
    truth: list[set[int]] = []
    for start in range(0, len(queries), 50):
        scores = queries[start : start + 50] @ table.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        truth.extend(set(map(int, row)) for row in top)
    return truth


def load(conn: psycopg.Connection, vectors: np.ndarray) -> None:
    """The `vector` and `halfvec` tables, the same rows (binary COPY)."""
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    conn.execute(f"CREATE TABLE {SCHEMA}.vec (id int PRIMARY KEY, embedding vector({DIMENSION}) NOT NULL)")
    header = np.array([DIMENSION, 0], dtype=">i2").tobytes()
    matrix = np.ascontiguousarray(vectors, dtype=">f4")
    with (
        conn.cursor() as cur,
        cur.copy(f"COPY {SCHEMA}.vec (id, embedding) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        copy.set_types(["int4", "bytea"])
        for row in range(len(vectors)):
            copy.write_row((row, header + matrix[row].tobytes()))
    conn.execute(
        f"CREATE TABLE {SCHEMA}.half AS"
        f" SELECT id, embedding::halfvec({DIMENSION}) AS embedding FROM {SCHEMA}.vec"
    )
    conn.execute(f"ALTER TABLE {SCHEMA}.half ADD PRIMARY KEY (id)")
    conn.execute(f"VACUUM ANALYZE {SCHEMA}.vec")
    conn.execute(f"VACUUM ANALYZE {SCHEMA}.half")


VARIANTS: dict[str, dict[str, str]] = {
    "vector": {
        "table": "vec",
        "index": "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)",
        "query": "SELECT id FROM {schema}.vec ORDER BY embedding <=> %(q)s::vector LIMIT %(k)s",
    },
    "halfvec": {
        "table": "half",
        "index": "USING hnsw (embedding halfvec_cosine_ops) WITH (m = 16, ef_construction = 64)",
        "query": "SELECT id FROM {schema}.half ORDER BY embedding <=> %(q)s::halfvec LIMIT %(k)s",
    },
    "binary": {
        "table": "vec",
        "index": f"USING hnsw ((binary_quantize(embedding)::bit({DIMENSION})) bit_hamming_ops)"
        " WITH (m = 16, ef_construction = 64)",
        "query": "SELECT id FROM (SELECT id, embedding FROM {schema}.vec"
        f" ORDER BY binary_quantize(embedding)::bit({DIMENSION}) <~> binary_quantize(%(q)s::vector)"
        " LIMIT %(candidates)s) AS candidates ORDER BY embedding <=> %(q)s::vector LIMIT %(k)s",
    },
}


def measure(
    conn: psycopg.Connection, name: str, queries: np.ndarray, truth: list[set[int]], rerank: int
) -> dict[str, Any]:
    variant = VARIANTS[name]
    index = f"{name}_hnsw"
    conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (MEMORY,))
    started = time.perf_counter()
    conn.execute(f"CREATE INDEX {index} ON {SCHEMA}.{variant['table']} {variant['index']}")
    build = time.perf_counter() - started
    row = conn.execute(
        "SELECT pg_relation_size(%s::regclass), pg_total_relation_size(%s::regclass)",
        (f"{SCHEMA}.{index}", f"{SCHEMA}.{variant['table']}"),
    ).fetchone()
    assert row is not None
    index_bytes, total_bytes = int(row[0]), int(row[1])
    ef_search = rerank if name == "binary" else 100
    conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef_search),))
    conn.execute("SELECT set_config('enable_seqscan', 'off', false)")
    statement = variant["query"].format(schema=SCHEMA)
    found, seconds = [], []
    for vector in queries:
        started = time.perf_counter()
        ids = conn.execute(statement, {"q": vector, "k": K, "candidates": rerank}).fetchall()
        seconds.append(time.perf_counter() - started)
        found.append({int(r[0]) for r in ids})
    recall = float(np.mean([len(f & t) / K for f, t in zip(found, truth, strict=True)]))
    if name == "vector":
        conn.execute(f"DROP INDEX {SCHEMA}.{index}")  # the binary variant indexes the same table
    return {
        "build_s": build,
        "index_bytes": index_bytes,
        "total_bytes": total_bytes,  # binary: the vector table with its binary index only
        "recall": recall,
        "p50_ms": float(np.percentile(seconds, 50) * 1000),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rerank", type=int, default=200, help="binary: Hamming candidates re-ranked")
    args = parse_with_smoke(parser, {"rows": 2000, "queries": 20, "rerank": 50}, argv)
    print(machine_summary(), flush=True)
    dsn = bench_dsn()
    vectors = low_rank_vectors(args.rows, seed=1)
    queries = low_rank_vectors(args.queries, seed=2)
    truth = exact_top_k(vectors, queries, K)
    drop_schema(dsn, SCHEMA)
    results: dict[str, dict[str, Any]] = {}
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            register_vector(conn)
            started = time.perf_counter()
            load(conn, vectors)
            print(f"loaded {args.rows} x {DIMENSION} in {time.perf_counter() - started:.0f}s", flush=True)
            for name in ("vector", "halfvec", "binary"):
                results[name] = measure(conn, name, queries, truth, args.rerank)
                r = results[name]
                print(
                    f"{name:8} build {r['build_s']:7.1f}s  index {r['index_bytes'] / 2**20:7.1f} MB  "
                    f"table+index {r['total_bytes'] / 2**20:7.1f} MB  recall@10 {r['recall']:.3f}  "
                    f"query p50 {r['p50_ms']:.2f} ms",
                    flush=True,
                )
    finally:
        drop_schema(dsn, SCHEMA)
    base = results["vector"]
    print(
        f"\n{args.rows} x {DIMENSION}, HNSW m=16 ef_construction=64, binary re-ranks {args.rerank} candidates"
    )
    print(f"{'variant':8} {'build':>7} {'index size':>11} {'table+index':>12} {'recall@10':>10} {'p50':>6}")
    for name, r in results.items():
        ratios = [r[key] / base[key] for key in ("build_s", "index_bytes", "total_bytes")]
        print(
            f"{name:8} {ratios[0]:7.2f} {ratios[1]:11.2f} {ratios[2]:12.2f} {r['recall']:10.3f} "
            f"{r['p50_ms'] / base['p50_ms']:6.2f}"
        )
    binary = results["binary"]
    print(
        f"binary + re-rank vs vector: build {binary['build_s'] / base['build_s']:.2f}, "
        f"index size {binary['index_bytes'] / base['index_bytes']:.2f}, recall@10 {binary['recall']:.3f}"
    )


if __name__ == "__main__":
    main()
