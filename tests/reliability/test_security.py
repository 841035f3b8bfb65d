"""Security: hostile names stop at validation, SQL quotes what it interpolates, secrets stay secret."""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml

from capstone.local.embedded_pg import EmbeddedPostgres
from dag_factory.errors import InvalidCollectionConfig
from dag_factory.loader import load_collection
from tests.support.airflow import asset_events, run_collection, task_states, write_collection, xcoms
from tests.support.fake_openai import running_fault_plan_server
from tests.support.postgres import PRIVATE_CONNECTION_ID
from tests.support.tables import assert_table_holds_exactly, jsonl_batch

ROOT = Path(__file__).resolve().parents[2]

# -- names ---------------------------------------------------------------------------------------

HOSTILE_NAMES = {
    "double_quote": 'faq"x',
    "single_quote": "faq'x",
    "semicolon": "faq;drop table users",
    "injection": 'x"; DROP TABLE public.users; --',
    "space": "faq x",
    "tab": "faq\tx",
    "newline": "faq\nx",
    "dot": "public.faq",
    "upper_case": "Faq",
    "64_bytes": "f" * 64,
    "64_bytes_in_32_characters": "é" * 32,  # 63 bytes is the limit, not 63 characters
    "non_ascii": "faqé",
    "empty": "",
}
NAME_FIELDS = {
    "collection": lambda name: {"collection": name},
    "store.schema": lambda name: {"collection": "faq", "store": {"schema": name}},
    "store.table": lambda name: {"collection": "faq", "store": {"table": name}},
}


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({**data, "embedding": {"provider": "hash"}}, allow_unicode=True))
    return path


@pytest.mark.parametrize("field", NAME_FIELDS)
@pytest.mark.parametrize("kind", HOSTILE_NAMES)
def test_hostile_names_are_rejected_at_validation(tmp_path: Path, field: str, kind: str) -> None:
    path = _write(tmp_path / "collection.yaml", NAME_FIELDS[field](HOSTILE_NAMES[kind]))

    with pytest.raises(InvalidCollectionConfig) as raised:
        load_collection(path)

    (issue,) = raised.value.issues
    assert (issue.path, issue.field) == (path, field)
    key = field.rsplit(".", 1)[-1]
    assert issue.line == next(
        n for n, line in enumerate(path.read_text().splitlines(), 1) if f"{key}:" in line
    )
    assert "Traceback" not in str(issue)


@pytest.mark.parametrize("field", NAME_FIELDS)
def test_names_of_exactly_63_bytes_are_accepted(tmp_path: Path, field: str) -> None:
    spec = load_collection(_write(tmp_path / "collection.yaml", NAME_FIELDS[field]("f" * 63)))
    assert len({spec.collection, spec.store.schema_name, spec.table_name} & {"f" * 63}) == 1


# -- SQL built from identifiers ------------------------------------------------------------------

_SQL = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|COPY|ANALYZE|TRUNCATE|GRANT)\b|\bWITH \("
)
# What an f-string of SQL may interpolate: identifiers through quote_ident (which checks the length
# and doubles quotes), whole quoted names and expressions built from it and integers, and values
# IndexParams checks against a fixed set (index_type, opclass).
_QUOTING = {
    "quote_ident",
    "int",
    "qualified_table",
    "qualified_index",
    "indexed_expression",
    "with_options",
    "create_sql",
}
_CHECKED = {"index_type", "opclass"}


def _interpolation_is_quoted(expr: ast.expr) -> bool:
    if isinstance(expr, ast.Call):
        func = expr.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        return name in _QUOTING
    return isinstance(expr, ast.Attribute) and expr.attr in _QUOTING | _CHECKED


def _constant_text(expr: ast.expr) -> bool:
    """A str literal, a module constant (UPPER_CASE name), or a concatenation of those."""
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
        return _constant_text(expr.left) and _constant_text(expr.right)
    if isinstance(expr, ast.Constant):
        return isinstance(expr.value, str)
    return isinstance(expr, ast.Name) and expr.id.lstrip("_").isupper()


def sql_built_from_unquoted_values(source: str) -> list[tuple[int, str]]:
    """(line, snippet) of SQL text built with f-strings, % or str.format from unquoted values."""
    found = ((node, _unquoted_sql(node)) for node in ast.walk(ast.parse(source)))
    return [(getattr(node, "lineno", 0), snippet) for node, snippet in found if snippet is not None]


def _unquoted_sql(node: ast.AST) -> str | None:
    """What ``node`` interpolates into SQL text without quoting it, or None."""
    if isinstance(node, ast.JoinedStr):
        text = "".join(str(part.value) for part in node.values if isinstance(part, ast.Constant))
        unquoted = [
            part.value
            for part in node.values
            if isinstance(part, ast.FormattedValue) and not _interpolation_is_quoted(part.value)
        ]
        return ast.unparse(unquoted[0]) if _SQL.search(text) and unquoted else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        builds_sql = _is_sql_text(node.left) or _is_sql_text(node.right)
        joins_constants = isinstance(node.op, ast.Add) and _constant_text(node)
        return ast.unparse(node)[:80] if builds_sql and not joins_constants else None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        # "...".format(...) on plain text; sql.SQL("...").format(...) quotes what it inserts.
        return ast.unparse(node)[:80] if _is_sql_text(node.func.value) else None
    return None


def _is_sql_text(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Constant) and isinstance(expr.value, str) and bool(_SQL.search(expr.value))


def test_sql_interpolates_identifiers_only_through_psycopg_sql_or_quote_ident() -> None:
    found = {
        f"{path.relative_to(ROOT)}:{line}": snippet
        for path in sorted((ROOT / "capstone").rglob("*.py"))
        for line, snippet in sql_built_from_unquoted_values(path.read_text())
    }
    assert found == {}, "build SQL with psycopg.sql.SQL/Identifier (or quote_ident), values as parameters"


@pytest.mark.parametrize(
    "source",
    [
        'cur.execute(f"SELECT * FROM {table}")',
        'conn.execute("DELETE FROM %s" % table)',
        'conn.execute("DROP TABLE {}".format(table))',
        'conn.execute("SELECT * FROM " + table)',
        'query = f"CREATE INDEX ON {spec.table} (embedding)"',
    ],
)
def test_the_sql_check_catches_the_usual_mistakes(source: str) -> None:
    assert sql_built_from_unquoted_values(source)


# -- secrets ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("airflow_db")
def test_no_secret_reaches_logs_xcoms_or_asset_events(
    tmp_path: Path,
    running_private_pg: EmbeddedPostgres,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    api_key = f"sk-reliability-{secrets.token_hex(12)}"
    password = running_private_pg.password  # random, made at initdb
    assert len(password) >= 24
    documents = [
        {
            "id": f"doc-{i}",
            "content": f"doc {i}",
            "chunks": [f"secret keeping {i} part {j}" for j in range(3)],
        }
        for i in range(20)
    ]
    with running_fault_plan_server(api_key=api_key) as server:
        # The key comes from an Airflow connection's password (the other tests use the environment).
        monkeypatch.setenv(
            "AIRFLOW_CONN_OPENAI_RELIABILITY", json.dumps({"conn_type": "generic", "password": api_key})
        )
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        spec = write_collection(
            tmp_path / "configs",
            "secret_run",
            "secrets",
            embedding={
                "provider": "openai",
                "model": "text-embedding-3-small",
                "dimension": 64,
                "base_url": server.base_url,
                "connection_id": "openai_reliability",
                "retries": 1,
                "retry_delay_seconds": 0,
                "max_retry_delay_seconds": 1,
                "request_timeout_seconds": 2,
            },
            store={"connection_id": PRIVATE_CONNECTION_ID},
        )
        server.fail_next(2, "500", retry_after=0.01)  # error paths log too
        server.fail_next(1, "429", retry_after=0.01)
        run = run_collection(spec, [jsonl_batch(tmp_path / "batch.jsonl", documents)])
        output = capfd.readouterr()

    assert str(run.state) == "success", task_states("secret_run", run.run_id)
    assert_table_holds_exactly(
        running_private_pg.uri(),
        "secrets",
        "secret_run",
        documents,
        model="text-embedding-3-small",
        dimension=64,
    )
    places = {
        "task output": output.out + output.err,
        "log files": _log_files(Path(os.environ["AIRFLOW_HOME"]) / "logs"),
        "xcoms": json.dumps([value for *_, value in xcoms("secret_run", run.run_id)], default=str),
        "asset events": json.dumps(asset_events("secret_run.indexed"), default=str),
        "metadata db": _metadata_db(Path(os.environ["AIRFLOW_HOME"])),
    }
    assert "batch_upsert_vectors" in places["task output"]  # the task logs were captured
    for secret in (api_key, password):
        leaks = [place for place, text in places.items() if secret in text]
        assert leaks == [], f"a secret appears in: {leaks}"


def _log_files(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


def _metadata_db(home: Path) -> str:
    """The SQLite metadata database (and its write-ahead log) as text."""
    return "".join(p.read_bytes().decode("latin-1") for p in home.glob("airflow.db*") if p.is_file())
