"""What parsing the DAG files costs per collection file: the dag-processor's parse, and a task's.

    .venv/bin/python benchmarks/parse.py [--files 200] [--rounds 3] [--smoke]

``--files`` collection files (copies of ``configs/release_notes.yaml``, each its own collection and
table) go into a folder of their own. Each measurement is a fresh Python process that imports
Airflow's ``DagBag`` first (not timed: every Airflow process pays it whatever the DAGs) and then
times ``DagBag`` over one DAG file, as Airflow parses it:

* **dag-processor**: ``collection_dags.py`` (every DAG) plus ``collection_config_errors.py`` (the
  validation report), with ``--files`` files; divided by ``--files`` this is the parse cost per
  collection file (target <= 5 ms);
* **task**: ``collection_dags.py`` under the parsing context Airflow's task runner sets
  (``get_parsing_context().dag_id``), which builds the running DAG alone; at ``--files`` files and
  at 1 file. The baseline, in the same run: the same parse without the context (every DAG built,
  as a task paid before).

Each is the best of ``--rounds``. The last line is the key ratio: a task's parse at ``--files``
files over its parse at 1 file (target <= 1.5: a task's start does not grow with the files).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROJECT_ROOT, machine_summary, parse_with_smoke

DAGS = PROJECT_ROOT / "dags"
TEMPLATE = PROJECT_ROOT / "configs" / "release_notes.yaml"


def write_collections(folder: Path, files: int) -> list[str]:
    """``files`` collection files in ``folder``, named ``parse_bench_<i>``; returns the names."""
    folder.mkdir(parents=True, exist_ok=True)
    template = TEMPLATE.read_text()
    names = [f"parse_bench_{index:04d}" for index in range(files)]
    for name in names:
        text = re.sub(r"^collection: .*$", f"collection: {name}", template, flags=re.MULTILINE)
        text = re.sub(r"^  table: .*$", f"  table: {name}", text, flags=re.MULTILINE)
        (folder / f"{name}.yaml").write_text(text)
    return names


def parse_seconds(dag_file: Path, configs: Path, dag_id: str | None = None) -> tuple[float, int]:
    """One fresh process's ``DagBag`` over ``dag_file``: seconds (import excluded) and DAGs found."""
    env = {**os.environ, "DAG_FACTORY_CONFIGS": str(configs)}
    env.pop("_AIRFLOW_PARSING_CONTEXT_DAG_ID", None)
    if dag_id is not None:
        env["_AIRFLOW_PARSING_CONTEXT_DAG_ID"] = dag_id
    command = [sys.executable, __file__, "--worker", str(dag_file)]
    completed = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return result["seconds"], result["dags"]


def worker(dag_file: str) -> None:
    """Import Airflow's DagBag, then time it over ``dag_file``; prints seconds and DAGs as JSON."""
    from airflow.dag_processing.dagbag import DagBag

    started = time.perf_counter()
    bag = DagBag(dag_folder=dag_file)
    seconds = time.perf_counter() - started
    if bag.import_errors:
        raise SystemExit(f"import errors: {bag.import_errors}")
    print(json.dumps({"seconds": seconds, "dags": len(bag.dags)}))


def best(rounds: int, dag_file: Path, configs: Path, dag_id: str | None, expected_dags: int) -> float:
    """The best of ``rounds`` parses, checking each found the DAGs it should."""
    times = []
    for _ in range(rounds):
        seconds, dags = parse_seconds(dag_file, configs, dag_id)
        if dags != expected_dags:
            raise SystemExit(f"{dag_file.name} (dag_id={dag_id}): {dags} DAGs, expected {expected_dags}")
        times.append(seconds)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=200, help="collection files (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per measurement; best kept")
    args = parse_with_smoke(parser, {"files": 20, "rounds": 1}, argv)
    print(machine_summary())
    with tempfile.TemporaryDirectory(prefix="parse-bench-") as scratch:
        many, one = Path(scratch) / "many", Path(scratch) / "one"
        names = write_collections(many, args.files)
        (single,) = write_collections(one, 1)
        target = names[len(names) // 2]
        dags, errors = DAGS / "collection_dags.py", DAGS / "collection_config_errors.py"
        processor = best(args.rounds, dags, many, None, args.files) + best(args.rounds, errors, many, None, 0)
        task_many = best(args.rounds, dags, many, target, 1)
        task_one = best(args.rounds, dags, one, single, 1)
        task_without_context = best(args.rounds, dags, many, None, args.files)
    per_file_ms = processor / args.files * 1000
    print(f"dag-processor, {args.files} files: {processor:.3f} s = {per_file_ms:.2f} ms per collection file")
    print(f"task parse without the parsing context (baseline): {task_without_context:.3f} s")
    print(f"task parse, {args.files} files: {task_many * 1000:.1f} ms; 1 file: {task_one * 1000:.1f} ms")
    print(f"task parse with the context / without: {task_many / task_without_context:.3f}")
    print(f"parse per collection file (ms, target <= 5): {per_file_ms:.2f}")
    print(f"task parse at {args.files} files / at 1 file (target <= 1.5): {task_many / task_one:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
