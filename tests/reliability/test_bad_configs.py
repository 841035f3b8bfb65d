"""Broken collection files beside good ones: every good DAG still loads, every broken file is named.

Reuses the hand-written bad configs of tests/bad_configs (with their ``# expect: <field> <line>``
comments) and the YAML fuzz strategy of tests/unit/test_spec_fuzz.py; what is new here is mixing
them with good files in one DAGs folder, as Airflow's DagBag and the DAG factory read it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dag_factory.factory import build_dags
from dag_factory.loader import load_collection
from tests.support.airflow import configs_env, write_collection
from tests.unit.test_loader import BAD_FILES, REPO_ROOT, expected_issues
from tests.unit.test_spec_fuzz import documents

DAGS = REPO_ROOT / "dags"
GOOD = ("good_alpha", "good_beta")
POOLS = {"default_pool", "embedding", "embedding_test"}


def _configs_folder(folder: Path) -> dict[Path, set[tuple[str, int | None]]]:
    """Good files, every hand-written bad file and a few more; returns each bad file's expected issues."""
    for name in GOOD:
        write_collection(folder, name, "public")
    broken: dict[Path, set[tuple[str, int | None]]] = {}
    for source in BAD_FILES:
        broken[Path(shutil.copy(source, folder / source.name))] = set(expected_issues(source))
    clash = REPO_ROOT / "tests/bad_configs/duplicate_table"
    shutil.copy(clash / "a_first.yaml", folder / "dup_a_first.yaml")  # valid: keeps the table
    broken[Path(shutil.copy(clash / "b_second.yaml", folder / "dup_b_second.yaml"))] = set(
        expected_issues(clash / "b_second.yaml")
    )
    latin1 = folder / "latin1.yaml"
    latin1.write_bytes(b"collection: caf\xe9\nembedding: {provider: hash}\n")
    broken[latin1] = {("", None)}
    hostile = folder / "hostile_table.yaml"
    hostile.write_text("collection: hostile\nstore:\n  table: 'x\"; DROP TABLE users; --'\n")
    broken[hostile] = {("store.table", 3)}
    return broken


def _where(path: Path, field: str, line: int | None) -> str:
    """How a ConfigIssue starts when printed."""
    where = f"{path}:{line}" if line else str(path)
    return f"{where} {field}:" if field else f"{where}:"


def _dagbag(folder: Path) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    with configs_env(folder):
        return DagBag(dag_folder=str(DAGS), known_pools=POOLS)


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Path, set[tuple[str, int | None]]]]:
    folder = tmp_path_factory.mktemp("configs")
    return folder, _configs_folder(folder)


def test_dagbag_loads_every_good_dag_and_one_import_error_names_every_broken_file(
    configs: tuple[Path, dict[Path, set[tuple[str, int | None]]]],
) -> None:
    folder, broken = configs
    assert len(broken) >= 33

    bag = _dagbag(folder)

    assert set(bag.dag_ids) == {*GOOD, "faq", "enrich_documents"}
    ((error_file, message),) = bag.import_errors.items()
    assert error_file.endswith("collection_config_errors.py")
    for path, issues in broken.items():
        for field, line in issues:
            assert _where(path, field, line) in message, (path.name, field, line)
    # Each issue starts a line (the first one may follow the exception's name).
    blamed = set(
        re.findall(rf"^(?:\S+InvalidCollectionConfig: )?({re.escape(str(folder))}/[^:\s]+):", message, re.M)
    )
    assert blamed == {str(path) for path in broken}


@pytest.mark.parametrize(
    "tracebacks",
    [
        pytest.param(
            "True",
            marks=pytest.mark.xfail(
                strict=True,
                reason="Airflow's default [core] dagbag_import_error_tracebacks=True prints the raise in "
                "dags/collection_config_errors.py as a traceback above the list of problems",
            ),
        ),
        "False",
    ],
)
def test_the_import_error_is_the_list_of_problems_not_a_traceback(
    configs: tuple[Path, dict[Path, set[tuple[str, int | None]]]],
    monkeypatch: pytest.MonkeyPatch,
    tracebacks: str,
) -> None:
    folder, _ = configs
    monkeypatch.setenv("AIRFLOW__CORE__DAGBAG_IMPORT_ERROR_TRACEBACKS", tracebacks)

    ((_, message),) = _dagbag(folder).import_errors.items()

    assert "Traceback" not in message and 'File "' not in message
    assert message.splitlines()[0].startswith(str(folder))


# -- fuzzed files beside good ones -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz_configs")
    for name in GOOD:  # "a_" sorts first: a fuzzed file reusing a name or table is the one blamed
        write_collection(folder, name, "public").rename(folder / f"a_{name}.yaml")
    return folder


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(documents(), min_size=1, max_size=3))
def test_fuzzed_files_never_cost_the_good_collections_their_dags(fuzz_folder: Path, texts: list[str]) -> None:
    for old in fuzz_folder.glob("fuzz_*.yaml"):
        old.unlink()
    paths = [fuzz_folder / f"fuzz_{i}.yaml" for i in range(len(texts))]
    for path, text in zip(paths, texts, strict=True):
        path.write_text(text, encoding="utf-8")

    result = build_dags(fuzz_folder)

    assert set(GOOD) <= set(result.dags)
    assert all(issue.path in paths for issue in result.errors)
    assert all(issue.message and "Traceback" not in str(issue) for issue in result.errors)
    for path in paths:  # a file no issue names is a DAG
        if not any(issue.path == path for issue in result.errors):
            assert load_collection(path).collection in result.dags
