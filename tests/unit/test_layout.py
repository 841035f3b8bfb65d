"""What runs where: the production runtime never imports the local tooling (``*.local``)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What a worker, the triggerer and the dag-processor import: the task bodies, the trigger and
# sensor, search, the DAG factory, and the DAG files themselves (parsed as the dag-processor does).
RUNTIME_MODULES = (
    "capstone.pipeline",
    "capstone.validation",
    "capstone.triggers",
    "capstone.sensors",
    "capstone.search",
    "capstone.registry",
    "capstone.embeddings",
    "dag_factory.builder",
    "dag_factory.factory",
    "dag_factory.runtime",
)
DAG_FILES = ("collection_dags.py", "collection_config_errors.py", "enrich_documents.py")

_IMPORT_THE_RUNTIME = """
import importlib, json, runpy, sys
for module in sys.argv[2].split(","):
    importlib.import_module(module)
for dag_file in sys.argv[3].split(","):
    try:
        runpy.run_path(f"{sys.argv[1]}/dags/{dag_file}")
    except Exception as exc:  # collection_config_errors raises when a config is broken: not here
        raise SystemExit(f"{dag_file}: {exc}")
local = sorted(name for name in sys.modules if name.startswith(("capstone.local", "dag_factory.local")))
print(json.dumps(local))
"""


def test_the_runtime_and_the_dag_files_never_import_the_local_tooling() -> None:
    env = {**os.environ, "DAG_FACTORY_CONFIGS": str(ROOT / "configs"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _IMPORT_THE_RUNTIME,
            str(ROOT),
            ",".join(RUNTIME_MODULES),
            ",".join(DAG_FILES),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def _modules() -> list[Path]:
    return sorted(path for package in ("capstone", "dag_factory") for path in (ROOT / package).rglob("*.py"))


def test_every_function_fits_on_a_screen() -> None:
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in _modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []


def test_every_module_says_what_it_answers() -> None:
    assert [
        str(path.relative_to(ROOT))
        for path in _modules()
        if not ast.get_docstring(ast.parse(path.read_text()))
    ] == []
