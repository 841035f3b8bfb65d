"""The ``dag-factory`` command line: validate, schema, render; exit codes and never a traceback."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from dag_factory import cli
from tests.unit.test_loader import BAD_CONFIGS, BAD_FILES, BAD_FOLDERS, MINIMAL, REPO_ROOT, expected_issues

SCHEMA_FILE = REPO_ROOT / "configs" / "schema.json"
EXAMPLE_CONFIGS = sorted((REPO_ROOT / "configs").glob("*.y*ml"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m dag_factory ARGS`` from the repo root, as CI runs it."""
    return subprocess.run(
        [sys.executable, "-m", "dag_factory", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)


def assert_reports(output: str, path: Path, expected: set[tuple[str, int]]) -> None:
    assert "Traceback" not in output
    for field, line in expected:
        assert f"{path}:{line} {field}:" in output if field else f"{path}:{line}: " in output


# --- validate ------------------------------------------------------------------------------------


@pytest.mark.parametrize("absolute", BAD_FILES, ids=lambda p: p.stem)
def test_validate_reports_each_bad_file(
    absolute: Path, capsys: pytest.CaptureFixture[str], in_repo: None
) -> None:
    path = BAD_CONFIGS / absolute.name
    code, output = run_in_process(capsys, "validate", str(path))
    assert code == 1
    assert_reports(output, path, expected_issues(absolute))


@pytest.mark.parametrize(
    "name", ["hnsw_m_out_of_range", "bad_yaml_syntax", "duplicate_keys", "empty", "several_problems"]
)
def test_validate_as_a_subprocess(name: str) -> None:
    path = BAD_CONFIGS / f"{name}.yaml"
    result = run("validate", str(path))
    assert result.returncode == 1, result.stderr
    assert_reports(result.stdout + result.stderr, path, expected_issues(REPO_ROOT / path))


@pytest.mark.parametrize("folder", BAD_FOLDERS, ids=lambda p: p.name)
def test_validate_a_folder_with_clashing_files(folder: Path) -> None:
    relative = BAD_CONFIGS / folder.name
    result = run("validate", str(relative))
    assert result.returncode == 1
    assert f"ok  {relative / 'a_first.yaml'}" in result.stdout
    assert_reports(result.stdout, relative / "b_second.yaml", expected_issues(folder / "b_second.yaml"))


def test_example_configs_are_valid() -> None:
    result = run("validate", "configs/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("\nok  ") + result.stdout.startswith("ok  ") == len(EXAMPLE_CONFIGS)


def test_validate_defaults_to_the_configs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "faq.yaml").write_text(MINIMAL, encoding="utf-8")
    monkeypatch.setenv("DAG_FACTORY_CONFIGS", str(tmp_path))
    code, output = run_in_process(capsys, "validate")
    assert code == 0
    assert output.splitlines()[0] == f"ok  {tmp_path / 'faq.yaml'}  (collection faq -> DAG faq)"


def test_validate_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "a.yaml", tmp_path / "b.yaml"
    good.write_text(MINIMAL, encoding="utf-8")
    bad.write_text("collection: help\nindex: {m: 0}\n", encoding="utf-8")
    code, output = run_in_process(capsys, "validate", "--json", str(tmp_path))
    assert code == 1
    assert json.loads(output) == {
        "valid": False,
        "files": [
            {"file": str(good), "valid": True, "collection": "faq", "dag_id": "faq"},
            {"file": str(bad), "valid": False, "collection": None, "dag_id": None},
        ],
        "errors": [
            {"file": str(bad), "line": 2, "field": "index.m", "message": "must be between 2 and 100, got 0"}
        ],
    }


def test_unexpected_failure_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(paths: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "load_collections", broken)
    code, output = run_in_process(capsys, "validate", "configs")
    assert (code, output) == (2, "error  RuntimeError: disk on fire\n")


# --- schema --------------------------------------------------------------------------------------


def test_committed_schema_is_up_to_date() -> None:
    result = run("schema")
    assert result.returncode == 0
    assert SCHEMA_FILE.read_text(encoding="utf-8") == result.stdout, "run `make schema` and commit it"


def test_schema_is_draft_2020_12_with_an_id() -> None:
    schema = json.loads(cli.schema_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert (schema["$id"], schema["required"]) == (cli.SCHEMA_ID, ["collection"])
    assert "schema" in schema["$defs"]["StoreSpec"]["properties"]  # the alias users write


def test_schema_output_option_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "schema.json"
    code, output = run_in_process(capsys, "schema", "--output", str(target))
    assert code == 0 and output == f"wrote {target}\n"
    assert target.read_text(encoding="utf-8") == cli.schema_text()


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.stem)
def test_example_configs_pass_the_json_schema(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# yaml-language-server: $schema=./schema.json")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))
    assert [error.message for error in validator.iter_errors(yaml.safe_load(text))] == []


# Collection files outside configs/: the table demo's and the table e2e test's.
OTHER_CONFIGS = [
    REPO_ROOT / "dag_factory" / "local" / "table_demo" / "articles.yaml",
    *sorted((REPO_ROOT / "tests" / "e2e" / "table_configs").glob("*.yaml")),
]


@pytest.mark.parametrize("path", OTHER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_the_other_collection_files_are_valid_and_pass_the_json_schema(path: Path) -> None:
    result = run("validate", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    text = path.read_text(encoding="utf-8")
    reference = "# yaml-language-server: $schema="
    assert text.startswith(reference)
    schema_path = (path.parent / text.splitlines()[0].removeprefix(reference)).resolve()
    assert schema_path == SCHEMA_FILE
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))
    assert [error.message for error in validator.iter_errors(yaml.safe_load(text))] == []


def test_json_schema_catches_what_editors_should_flag() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))
    document = yaml.safe_load(
        (REPO_ROOT / BAD_CONFIGS / "unknown_nested_key.yaml").read_text(encoding="utf-8")
    )
    assert [
        "'efconstruction' was unexpected" in error.message for error in validator.iter_errors(document)
    ] == [True]


# --- render --------------------------------------------------------------------------------------

needs_builder = pytest.mark.skipif(
    importlib.util.find_spec("dag_factory.builder") is None
    or importlib.util.find_spec("capstone.sensors") is None,
    reason="dag_factory.builder (or capstone.sensors, which it uses) is not written yet",
)


@needs_builder
@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.stem)
def test_render_shows_the_generated_task_graph(
    path: Path, capsys: pytest.CaptureFixture[str], in_repo: None
) -> None:
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    code, output = run_in_process(capsys, "render", spec["collection"])
    assert code == 0, output
    lines = output.splitlines()
    assert lines[:3] == [
        f"DAG {spec['collection']}  (from configs/{path.name})",
        f"  schedule: Asset('{spec['collection']}.enriched')",
        f"  outlets:  Asset('{spec['collection']}.indexed')",
    ]
    tasks = [line.split()[0] for line in lines[4:]]
    assert tasks[0] == "load_enriched_documents" and tasks[-1] == "publish_indexed_asset"
    (embedding,) = [line for line in lines if line.split()[0] == "generate_embedding"]
    assert "[mapped]" in embedding
    assert f"pool={spec['embedding']['pool']} retries={spec['embedding']['retries']}" in embedding


def test_render_unknown_collection(capsys: pytest.CaptureFixture[str], in_repo: None) -> None:
    code, output = run_in_process(capsys, "render", "nope")
    assert code == 1
    assert "no valid collection 'nope' in configs" in output


def test_describe_dag_lists_tasks_in_order_with_upstreams() -> None:
    from airflow.sdk import DAG, Asset, task

    with DAG(dag_id="faq", schedule=Asset("faq.enriched"), catchup=False) as dag:

        @task
        def load() -> list[int]:
            return [1, 2]

        @task(pool="embedding", retries=3)
        def embed(batch: int) -> int:
            return batch

        @task(outlets=[Asset("faq.indexed")])
        def publish(values: object) -> None:
            return None

        publish(embed.expand(batch=load()))

    assert cli.describe_dag(dag, Path("configs/faq.yaml")) == [
        "DAG faq  (from configs/faq.yaml)",
        "  schedule: Asset('faq.enriched')",
        "  outlets:  Asset('faq.indexed')",
        "  tasks:",
        "    load               pool=default_pool retries=0  <- -",
        "    embed    [mapped]  pool=embedding retries=3  <- load",
        "    publish            pool=default_pool retries=0  <- embed",
    ]


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("validate", "schema", "render"))
