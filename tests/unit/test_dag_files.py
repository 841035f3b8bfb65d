"""``dag-factory dag-files``: the installed package writes the DAGs folder's two files."""

from __future__ import annotations

import shutil
from pathlib import Path

from dag_factory.cli import main
from dag_factory.dag_files import DAG_FILES, dag_file_texts

ROOT = Path(__file__).resolve().parents[2]


def test_the_repositorys_dag_files_are_the_ones_the_package_writes() -> None:
    for name, text in dag_file_texts().items():
        assert (ROOT / "dags" / name).read_text() == text


def test_written_dag_files_name_their_configs_and_load_every_collection(tmp_path: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag

    configs = tmp_path / "collections"
    shutil.copytree(ROOT / "configs", configs)
    (configs / "broken.yaml").write_text("collection: broken\nindex:\n  type: hnsw\n  m: 0\n")

    assert main(["dag-files", str(tmp_path / "dags"), "--configs", str(configs)]) == 0
    bag = DagBag(dag_folder=str(tmp_path / "dags"))

    assert sorted(path.name for path in (tmp_path / "dags").iterdir()) == sorted(DAG_FILES)
    assert set(bag.dag_ids) == {"documents", "release_notes"}
    ((error_file, message),) = bag.import_errors.items()
    assert error_file.endswith("collection_config_errors.py") and "broken.yaml:4 index.m" in message
