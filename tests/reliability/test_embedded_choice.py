"""The embedded Postgres is a choice of the local set-up, never a fallback of the pipeline.

A task whose connection is undefined fails at once, names the connection and how to define it,
writes nothing and starts no server, from whatever directory it runs. The embedded server's data
folder belongs to the project, not to the working directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capstone.local.embedded_pg import default_data_dir

ROOT = Path(__file__).resolve().parents[2]

_LOAD_WITH_NO_CONNECTION = """
import json, sys
from capstone.documents import BatchLocation
from capstone.pipeline import load_documents
from tests.support.settings import collection_settings

settings = collection_settings("orphan", "public")
try:
    load_documents(settings, "run", [BatchLocation.from_extra({"path": sys.argv[1]})])
except Exception as exc:
    print(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps({"type": None}))
"""


def _postmasters() -> set[int]:
    """PIDs of every running PostgreSQL server (a ``postgres`` process whose parent is not one)."""
    servers = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            parent = Path(f"/proc/{fields['PPid'].strip()}/comm").read_text().strip()
        except (OSError, KeyError):
            continue
        if fields.get("Name", "").strip() == "postgres" and parent != "postgres":
            servers.add(int(fields["Pid"]))
    return servers


@pytest.mark.usefixtures("airflow_db")
def test_a_task_with_no_connection_fails_naming_it_and_starts_no_postgres(tmp_path: Path) -> None:
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps({"id": "d", "content": "c", "chunks": ["c"]}) + "\n")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AIRFLOW_CONN_") and key != "CAPSTONE_DATA_DIR"
    }
    env["PYTHONPATH"] = str(ROOT)
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    servers_before = _postmasters()

    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITH_NO_CONNECTION, str(batch)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )

    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["type"] == "ConnectionNotDefined"
    assert "Airflow connection 'vector_store_default' is not defined" in outcome["message"]
    assert "AIRFLOW_CONN_VECTOR_STORE_DEFAULT" in outcome["message"]
    assert "airflow connections add vector_store_default" in outcome["message"]
    assert _postmasters() - servers_before == set(), "a Postgres server was started"
    assert list(elsewhere.iterdir()) == [], "something was written in the working directory"


def test_the_data_folder_is_the_projects_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAPSTONE_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)

    assert default_data_dir() == ROOT / ".data"


def test_an_explicit_data_folder_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSTONE_DATA_DIR", str(tmp_path / "pg"))

    assert default_data_dir() == tmp_path / "pg"
