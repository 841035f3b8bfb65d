"""``dag-factory``: validate collection files, emit their JSON Schema, show a collection's DAG.

    dag-factory validate [PATHS...] [--json]   exit 0 when every file is valid, 1 otherwise
    dag-factory schema [--output PATH]         the JSON Schema editors use to check the YAML
    dag-factory render NAME [--configs DIR]    the task graph the collection's DAG gets
    dag-factory dag-files DIR [--configs DIR]  write the two DAG files into an Airflow DAGs folder

Any unexpected failure is printed as one error line with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dag_factory.errors import ConfigIssue
from dag_factory.loader import LoadResult, configs_dir, load_collections
from dag_factory.spec import CollectionSpec

if TYPE_CHECKING:
    from airflow.sdk import DAG

__all__ = ["SCHEMA_ID", "collection_schema", "describe_dag", "main", "schema_text"]

SCHEMA_ID = "urn:capstone-vector-indexing:dag-factory:collection"
_DRAFT = "https://json-schema.org/draft/2020-12/schema"
EXIT_OK, EXIT_INVALID, EXIT_ERROR = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 valid, 1 invalid, 2 unexpected error)."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.command(args)
    except Exception as error:  # the contract is "never a traceback": say what broke, exit 2
        print(f"error  {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_ERROR
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dag-factory", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check collection files (default: the configs folder)")
    validate.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="files or folders")
    validate.add_argument("--json", action="store_true", help="print a machine-readable report")
    validate.set_defaults(command=_validate)

    schema = commands.add_parser("schema", help="print the JSON Schema of a collection file")
    schema.add_argument("--output", type=Path, metavar="PATH", help="write it to PATH instead")
    schema.set_defaults(command=_schema)

    render = commands.add_parser("render", help="print the task graph of a collection's DAG")
    render.add_argument("name", metavar="NAME", help="the collection name")
    render.add_argument("--configs", type=Path, metavar="DIR", help="folder of collection files")
    render.set_defaults(command=_render)

    dag_files = commands.add_parser(
        "dag-files", help="write the two DAG files (collections, config errors) into a DAGs folder"
    )
    dag_files.add_argument("folder", type=Path, metavar="DIR", help="Airflow's DAGs folder")
    dag_files.add_argument(
        "--configs",
        type=Path,
        metavar="DIR",
        help="the collection files' folder, written into the files (default: read $DAG_FACTORY_CONFIGS "
        "when Airflow parses them)",
    )
    dag_files.set_defaults(command=_dag_files)
    return parser


def _dag_files(args: argparse.Namespace) -> int:
    from dag_factory.dag_files import write_dag_files

    for path in write_dag_files(args.folder, args.configs):
        print(f"wrote {path}")
    return EXIT_OK


# --- validate ------------------------------------------------------------------------------------


def _default_configs() -> Path:
    """``configs_dir()``, relative to the working directory when inside it (shorter messages)."""
    folder = configs_dir()
    return folder.relative_to(Path.cwd()) if folder.is_relative_to(Path.cwd()) else folder


def _validate(args: argparse.Namespace) -> int:
    result = load_collections(args.paths or [_default_configs()])
    print(json.dumps(_report(result), indent=2) if args.json else "\n".join(_report_lines(result)))
    return EXIT_OK if result.valid else EXIT_INVALID


def _report(result: LoadResult) -> dict[str, Any]:
    specs = dict(result.specs)
    files = [
        {
            "file": str(path),
            "valid": path in specs,
            "collection": specs[path].collection if path in specs else None,
            "dag_id": specs[path].collection if path in specs else None,
        }
        for path in result.files
    ]
    return {"valid": result.valid, "files": files, "errors": [issue.as_dict() for issue in result.errors]}


def _report_lines(result: LoadResult) -> list[str]:
    specs = dict(result.specs)
    issues_by_file: dict[Path, list[ConfigIssue]] = {}
    for issue in result.errors:
        issues_by_file.setdefault(issue.path, []).append(issue)
    lines = []
    for path in [*result.files, *(p for p in issues_by_file if p not in result.files)]:
        if path in specs:
            name = specs[path].collection
            lines.append(f"ok  {path}  (collection {name} -> DAG {name})")
        lines += [f"error  {issue}" for issue in issues_by_file.get(path, [])]
    return [*lines, _summary(result)]


def _summary(result: LoadResult) -> str:
    if not result.files and result.valid:
        return "no collection files found (*.yaml, *.yml)"
    invalid = len(result.files) - len(result.specs)
    problems = f", {len(result.errors)} problem{'s' * (len(result.errors) != 1)}" if result.errors else ""
    return f"{len(result.files)} file(s): {len(result.specs)} valid, {invalid} invalid{problems}"


# --- schema --------------------------------------------------------------------------------------


def collection_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a collection file, generated from ``CollectionSpec``."""
    schema = CollectionSpec.model_json_schema(by_alias=True)
    schema.update({"$schema": _DRAFT, "$id": SCHEMA_ID, "title": "dag-factory collection"})
    return schema


def schema_text() -> str:
    """``collection_schema()`` as deterministic JSON: sorted keys, two-space indent, final newline."""
    return json.dumps(collection_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _schema(args: argparse.Namespace) -> int:
    if args.output is None:
        sys.stdout.write(schema_text())
    else:
        args.output.write_text(schema_text(), encoding="utf-8")
        print(f"wrote {args.output}")
    return EXIT_OK


# --- render --------------------------------------------------------------------------------------


def _render(args: argparse.Namespace) -> int:
    folder = args.configs or _default_configs()
    result = load_collections([folder])
    found = [(path, spec) for path, spec in result.specs if spec.collection == args.name]
    if not found:
        for issue in result.errors:
            print(f"error  {issue}", file=sys.stderr)
        names = ", ".join(spec.collection for _, spec in result.specs) or "none"
        print(f"error  no valid collection {args.name!r} in {folder} (valid: {names})", file=sys.stderr)
        return EXIT_INVALID
    from dag_factory.builder import build_collection_dag  # imports Airflow: only when rendering

    path, spec = found[0]
    print("\n".join(describe_dag(build_collection_dag(spec, path), path)))
    return EXIT_OK


def describe_dag(dag: DAG, source_file: Path) -> list[str]:
    """The DAG as text: schedule, outlets, and its tasks in topological order with their upstreams."""
    tasks = list(dag.topological_sort())
    outlets = [_describe_asset(outlet) for task in tasks for outlet in task.outlets]
    lines = [
        f"DAG {dag.dag_id}  (from {source_file})",
        f"  schedule: {_describe_schedule(dag.schedule)}",
        f"  outlets:  {', '.join(outlets) or 'none'}",
        "  tasks:",
    ]
    width = max((len(task.task_id) for task in tasks), default=0)
    return lines + [f"    {_describe_task(task, width)}" for task in tasks]


def _describe_task(task: Any, width: int) -> str:
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    mapped = "[mapped]" if isinstance(task, MappedOperator) else ""
    upstream = ", ".join(sorted(task.upstream_task_ids)) or "-"
    return f"{task.task_id:<{width}}  {mapped:<8}  pool={task.pool} retries={task.retries}  <- {upstream}"


def _describe_schedule(schedule: Any) -> str:
    from airflow.sdk.definitions.asset import AssetAll, AssetAny, BaseAsset

    if isinstance(schedule, (AssetAll, AssetAny)):
        joiner = " & " if isinstance(schedule, AssetAll) else " | "
        return "(" + joiner.join(_describe_schedule(item) for item in schedule.objects) + ")"
    if isinstance(schedule, BaseAsset):
        return _describe_asset(schedule)
    return "none (manual runs only)" if schedule is None else str(schedule)


def _describe_asset(asset: Any) -> str:
    name = getattr(asset, "name", None)
    return f"Asset({name!r})" if name else repr(asset)
