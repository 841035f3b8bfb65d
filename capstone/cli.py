"""``python -m capstone``: operate the embedded Postgres, search an indexed collection, and list or
switch the versions of a collection (one per embedding model, see :mod:`capstone.versions`).

python -m capstone db start|stop|status|uri
python -m capstone search --collection documents "how do I handle exceptions" [-k 5]
    [--mode vector|keyword|hybrid] [--filter key=value ...] [--json] [--schema SCHEMA]
    [--dsn postgresql://... | --connection AIRFLOW_CONNECTION_ID]
python -m capstone versions --collection documents [--schema SCHEMA] [--dsn ... | --connection ...]
python -m capstone rollback --collection documents [--to N] [--schema SCHEMA] [--dsn ... | --connection ...]
python -m capstone export-model [--model all-MiniLM-L6-v2]

--schema is needed only where the collection's name has tables in several schemas of the database.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capstone.registry import CollectionRecord
    from capstone.search import Hit
    from capstone.settings import SearchMode

__all__ = ["format_hits", "hits_json", "main"]

_SNIPPET_WIDTH = 90


def _db(action: str) -> int:
    from capstone.local.embedded_pg import default_server

    server = default_server()
    if action == "start":
        server.start()
        print(f"embedded Postgres running on {server.host}:{server.port} (data: {server.pgdata})")
    elif action == "stop":
        server.stop()
        print("embedded Postgres stopped")
    elif action == "status":
        running = server.is_running()
        print(f"embedded Postgres on {server.host}:{server.port}: {'running' if running else 'stopped'}")
        return 0 if running else 3
    elif action == "uri":
        print(server.start().uri())
    return 0


# -- search -----------------------------------------------------------------------------------


def _one_line(text: str, width: int = _SNIPPET_WIDTH) -> str:
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


_SCORES = {"keyword": "ts_rank_cd", "hybrid": "reciprocal rank fusion"}


def format_hits(record: CollectionRecord, query: str, hits: list[Hit], mode: SearchMode) -> str:
    """The results as printed: a header, then rank, score, document id, chunk id and a snippet."""
    knob = f"ef_search={record.ef_search}" if record.index_type == "hnsw" else f"probes={record.probes}"
    score = _SCORES.get(mode) or ("distance" if record.metric == "l2" else "similarity")
    how = {
        "vector": f"{record.provider} {record.model}, {record.index_type} {record.metric} {knob}",
        "keyword": f"full text, {record.search.text_config}",
        "hybrid": f"{record.provider} {record.model} + full text {record.search.text_config}, "
        f"rrf_k={record.search.rrf_k}",
    }[mode]
    header = (
        f"{record.name} ({record.schema}.{record.table}): {len(hits)} best chunks for {query!r} "
        f"[{mode} search: {how}; score = {score}]"
    )
    rows = [("rank", "score", "document", "chunk", "snippet")] + [
        (str(hit.rank), f"{hit.score:.4f}", hit.document_id, hit.chunk_id, _one_line(hit.snippet))
        for hit in hits
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        f"{row[0].rjust(widths[0])}  {row[1].rjust(widths[1])}  {row[2].ljust(widths[2])}  "
        f"{row[3].ljust(widths[3])}  {row[4]}"
        for row in rows
    ]
    return "\n".join([header, *lines])


def hits_json(record: CollectionRecord, query: str, hits: list[Hit], mode: SearchMode) -> str:
    """The results as one JSON document: the collection, the query, the mode and each hit in full."""
    return json.dumps(
        {
            "collection": record.name,
            "table": f"{record.schema}.{record.table}",
            "query": query,
            "mode": mode,
            "metric": record.metric,
            "hits": [hit.as_json() for hit in hits],
        },
        ensure_ascii=False,
        indent=2,
    )


def _filter_pair(value: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value); the value is read as JSON when it is JSON (numbers, true,
    ["a", "b"] for several document ids), else taken as text."""
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"a filter is key=value, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _search(args: argparse.Namespace) -> int:
    import psycopg

    from capstone.registry import lookup
    from capstone.search import SearchFilter, search_record
    from capstone.settings import DEFAULT_CONNECTION_ID

    collection, query, limit = args.collection, " ".join(args.query), args.k
    dsn, connection_id = args.dsn, args.connection
    search_filter = SearchFilter.of(dict(args.filter or []))
    target_dsn = _search_dsn(dsn, connection_id)
    try:
        conn = psycopg.connect(target_dsn, autocommit=True, application_name="capstone search")
    except psycopg.OperationalError as err:
        source = "--dsn" if dsn else f"Airflow connection {connection_id or DEFAULT_CONNECTION_ID!r}"
        raise LookupError(f"cannot connect to the Postgres given by {source}: {err}") from None
    with conn:
        record = lookup(conn, collection, args.schema)
    failed = (record.last_validation or {}).get("failed")
    if failed:
        print(
            f"warning: the last validation of {collection} failed {', '.join(failed)}: "
            "results may be incomplete or poorly ranked",
            file=sys.stderr,
        )
    mode = args.mode or record.search.mode
    try:
        hits = search_record(target_dsn, record, query, limit, search_filter, mode=mode, full_text=args.json)
    except psycopg.errors.UndefinedTable as err:
        raise LookupError(
            f"table {record.schema}.{record.table} of collection {collection!r} does not exist any more: "
            f"run the Airflow DAG {collection!r} to index it again"
        ) from err
    print(hits_json(record, query, hits, mode) if args.json else format_hits(record, query, hits, mode))
    return 0


def _versions(args: argparse.Namespace) -> int:
    """``versions`` and ``rollback``: list the collection's versions, or switch to another one."""
    import psycopg

    from capstone import versions
    from capstone.registry import lookup

    with psycopg.connect(
        _search_dsn(args.dsn, args.connection), autocommit=True, application_name="capstone versions"
    ) as conn:
        record = lookup(conn, args.collection, args.schema)
        if args.command == "rollback":
            result = versions.rollback(conn, record.schema, record.table, args.to)
            print(
                f"{record.schema}.{record.table} now serves version {result.live} (was version "
                f"{result.previous}); the view was locked for {result.lock_ms:.1f} ms"
            )
        rows = versions.describe(conn, record.schema, record.table)
    print(f"versions of {args.collection} ({record.schema}.{record.table}):")
    for row in rows:
        failed = f", last validation failed {', '.join(row['failed_checks'])}" if row["failed_checks"] else ""
        since = (
            f" since {row['live_from']:%Y-%m-%d %H:%M}"
            if row["status"] == "live" and row["live_from"]
            else ""
        )
        print(
            f"  {row['version']:>3}  {row['status']:<11} {row['table_name']}  {row['model']} "
            f"({row['dimension']} dimensions){since}{failed}"
        )
    return 0


def _search_dsn(dsn: str | None, connection_id: str | None) -> str:
    """``--dsn``, else the Airflow connection; with neither given and ``vector_store_default``
    undefined, the project's embedded Postgres if it is already running (say, after ``make demo``).

    Only this interactive, read-only command does that, and it says so: it never starts a server,
    and a pipeline task never falls back at all.
    """
    from capstone.connections import ConnectionNotDefined
    from capstone.search import resolve_dsn

    try:
        return resolve_dsn(dsn, connection_id)
    except ConnectionNotDefined as undefined:
        if connection_id is not None:
            raise LookupError(f"{undefined}; or pass the database's postgresql:// URI with --dsn") from None
        from capstone.local.embedded_pg import EmbeddedPostgres, default_data_dir

        try:
            server = EmbeddedPostgres.running_at(default_data_dir())
        except RuntimeError:
            server = None
        if server is None:
            raise LookupError(
                f"{undefined}; or pass --dsn (the project's embedded Postgres is not running either: "
                "`make demo` or `python -m capstone db start` starts it)"
            ) from None
        print(
            f"note: Airflow connection {undefined.connection_id!r} is not defined: searching the project's "
            f"embedded Postgres on {server.host}:{server.port}, database {server.database!r} (data in "
            f"{server.root})",
            file=sys.stderr,
        )
        return server.uri()


def _search_command(args: argparse.Namespace) -> int:
    """Run ``search``; an error the user can act on is one line on stderr and exit code 1."""
    import psycopg

    from capstone.embeddings import MissingAPIKeyError, MissingExtraError, ModelNotAvailableError
    from capstone.versions import NoVersionToRollBackTo, SwitchRefused, SwitchTimeout

    try:
        return _versions(args) if args.command in ("versions", "rollback") else _search(args)
    except (
        LookupError,
        psycopg.OperationalError,
        MissingAPIKeyError,
        MissingExtraError,
        ModelNotAvailableError,
        NoVersionToRollBackTo,
        SwitchRefused,
        SwitchTimeout,
        psycopg.errors.DependentObjectsStillExist,
    ) as err:
        print(f"capstone {args.command}: error: {err}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    from capstone.settings import SEARCH_MODES

    parser = argparse.ArgumentParser(
        prog="capstone", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="start, stop or inspect the embedded Postgres")
    db.add_argument("action", choices=["start", "stop", "status", "uri"])
    search = commands.add_parser(
        "search",
        help="search an indexed collection (by meaning, by keyword, or both)",
        description="Print the collection's best chunks for the query: in vector mode, the query is "
        "embedded with the collection's model and its nearest chunks found through the index with the "
        "ef_search/probes its spec sets; in keyword mode, Postgres full text search ranks the chunks "
        'that match the words ("quoted phrases", or, -excluded); hybrid fuses both lists. The default '
        "mode is the collection's search.mode.",
    )
    search.add_argument("--collection", required=True, help="collection name (the DAG id)")
    search.add_argument("query", nargs="+", help="the query text")
    search.add_argument("-k", type=_positive, default=5, help="how many chunks to print (default 5)")
    search.add_argument(
        "--filter",
        metavar="KEY=VALUE",
        type=_filter_pair,
        action="append",
        help="only chunks whose metadata has KEY=VALUE (VALUE read as JSON where it is JSON); "
        "document_id=ID for one document; repeat for several conditions",
    )
    search.add_argument(
        "--mode",
        choices=SEARCH_MODES,
        help="how to rank (default: the collection's search.mode)",
    )
    search.add_argument("--json", action="store_true", help="print the hits, full text and metadata, as JSON")
    _where(search)
    listing = commands.add_parser(
        "versions",
        help="list a collection's versions (one per embedding model) and which one is live",
    )
    listing.add_argument("--collection", required=True, help="collection name (the DAG id)")
    _where(listing)
    rollback = commands.add_parser(
        "rollback",
        help="switch a collection back to its previous version (or to version --to N)",
        description="Point the collection's stable name (the view consumers query) and its search "
        "registration at an earlier version kept by store.keep_versions, in one transaction. The version "
        "switched away from is kept; runs whose YAML still names its model fail until the YAML names the "
        "live model again, or `rollback --to` rolls forward to it.",
    )
    rollback.add_argument("--collection", required=True, help="collection name (the DAG id)")
    rollback.add_argument(
        "--to", type=int, metavar="N", help="the version to switch to (default: the previous)"
    )
    _where(rollback)
    _export_parser(commands)
    return parser


def _export_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export-model",
        help="export a local model to ONNX on this host (once; what embedding.backend onnx runs)",
        description="Export the Transformer of a local sentence-transformers model to ONNX, verified "
        "against torch's vectors, into the model cache ($CAPSTONE_MODEL_CACHE, default "
        "~/.cache/capstone/models), and print its path. Run it where a worker image is built; a task "
        "that finds no export makes one itself (needs torch: the [local] extra).",
    )
    export.add_argument(
        "--model", default=None, help="the model name or directory (default: the bundled all-MiniLM-L6-v2)"
    )


def _export_model(model: str | None) -> int:
    import logging

    from capstone.embeddings.model_files import BUNDLED_MODEL
    from capstone.embeddings.onnx_export import exported_onnx

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(exported_onnx(model or BUNDLED_MODEL))
    return 0


def _where(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--schema",
        help="the collection's schema (store.schema), needed where its name has tables in several "
        "schemas of the database (two deployments sharing it)",
    )
    where = command.add_mutually_exclusive_group()
    where.add_argument("--dsn", help="a libpq URI, e.g. postgresql://user:pass@host:5432/db")
    where.add_argument(
        "--connection",
        metavar="ID",
        help="an Airflow connection id (default vector_store_default; if that is not defined, the "
        "project's embedded Postgres when it is running)",
    )


def _positive(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 1000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000, got {number}")
    return number


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``capstone`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "db":
        return _db(args.action)
    if args.command in ("search", "versions", "rollback"):
        return _search_command(args)
    if args.command == "export-model":
        return _export_model(args.model)
    return 2


if __name__ == "__main__":
    sys.exit(main())
