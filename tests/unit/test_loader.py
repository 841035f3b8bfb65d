"""Loading collection files: every problem reported with its file, line, field and a fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dag_factory.errors import ConfigIssue, InvalidCollectionConfig
from dag_factory.loader import configs_dir, load_collection, load_collections

REPO_ROOT = Path(__file__).resolve().parents[2]
BAD_CONFIGS = Path("tests/bad_configs")  # relative: messages must keep the path as given
BAD_FILES = sorted((REPO_ROOT / BAD_CONFIGS).glob("*.yaml"))
BAD_FOLDERS = sorted(p for p in (REPO_ROOT / BAD_CONFIGS).iterdir() if p.is_dir())
MINIMAL = "collection: faq\nembedding:\n  provider: hash\n"


def expected_issues(path: Path) -> set[tuple[str, int]]:
    """The ``# expect: <field> <line>`` comments of a bad config (field ``-`` means none)."""
    found = re.findall(r"^# expect: (\S+) (\d+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    return {("" if field == "-" else field, int(line)) for field, line in found}


def issues_of(path: Path) -> list[ConfigIssue]:
    with pytest.raises(InvalidCollectionConfig) as raised:
        load_collection(path)
    return raised.value.issues


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)


def test_there_are_enough_bad_configs() -> None:
    assert len(BAD_FILES) + len(BAD_FOLDERS) >= 20
    for path in [*BAD_FILES, *(f for folder in BAD_FOLDERS for f in folder.glob("*.yaml"))]:
        assert path.read_text(encoding="utf-8").startswith("# yaml-language-server: $schema=")


@pytest.mark.parametrize("absolute", BAD_FILES, ids=lambda p: p.stem)
def test_bad_config_reports_exactly_its_expected_issues(absolute: Path, in_repo: None) -> None:
    path = BAD_CONFIGS / absolute.name
    issues = issues_of(path)
    assert {(issue.field, issue.line) for issue in issues} == expected_issues(absolute)
    assert all(issue.path == path and issue.message for issue in issues)


@pytest.mark.parametrize("folder", BAD_FOLDERS, ids=lambda p: p.name)
def test_clash_between_files_blames_the_later_file_and_keeps_the_first(folder: Path, in_repo: None) -> None:
    relative = BAD_CONFIGS / folder.name
    result = load_collections([relative])
    expected = {
        (str(relative / path.name), field, line)
        for path in folder.glob("*.yaml")
        for field, line in expected_issues(path)
    }
    assert {(str(issue.path), issue.field, issue.line) for issue in result.errors} == expected
    first = relative / "a_first.yaml"
    assert [path for path, _ in result.specs] == [first]
    assert all(str(first) in issue.message for issue in result.errors)


def test_minimal_file_loads(tmp_path: Path) -> None:
    spec = load_collection(write(tmp_path, "faq.yaml", MINIMAL))
    assert (spec.collection, spec.embedding.provider) == ("faq", "hash")


def test_issues_come_in_line_order_and_name_the_fix(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "faq.yaml",
        "collection: faq\nindex:\n  type: hsnw\n  m: 0\n  efconstruction: 64\nembedding:\n  dimension: abc\n",
    )
    assert [str(issue) for issue in issues_of(path)] == [
        f"{path}:3 index.type: must be one of 'hnsw', 'ivfflat', got 'hsnw'; did you mean 'hnsw'?",
        f"{path}:4 index.m: must be between 2 and 100, got 0",
        f"{path}:5 index.efconstruction: unknown field 'efconstruction'; did you mean 'ef_construction'? "
        "allowed: type, metric, m, ef_construction, ef_search, lists, probes, quantization, "
        "rerank_candidates, build_timeout_seconds, poll_interval_seconds, in_worker_max_rows, "
        "maintenance_work_mem",
        f"{path}:7 embedding.dimension: must be an integer, got 'abc'",
    ]


@pytest.mark.parametrize(
    ("yaml_text", "field", "message"),
    [
        ("embedding: {}\n", "collection", "required: add `collection: <name>`"),
        (
            "collection: faq\nindex: {poll_interval_seconds: 0}\n",
            "index.poll_interval_seconds",
            "must be greater than 0 and at most 3600, got 0",
        ),
        (
            "collection: faq\nvalidation: {freshness_limit_seconds: -1}\n",
            "validation.freshness_limit_seconds",
            "must be greater than 0, got -1",
        ),
        (
            "collection: faq\nembedding: {retries: 1.5}\n",
            "embedding.retries",
            "must be a whole number, got 1.5",
        ),
        (
            "collection: faq\ndag: {tags: demo}\n",
            "dag.tags",
            "must be a list (`- item` lines or `[a, b]`), got 'demo'",
        ),
        ("collection: faq\nindex: 3\n", "index", "must be a mapping of `key: value` lines, got 3"),
        (
            "collection: faq\ndescription: 12\n",
            "description",
            "must be text, got 12 (put the value in quotes to make it text)",
        ),
        (
            "collection: faq\nstore: {schema: Search}\n",
            "store.schema",
            "must be a plain lower-case SQL identifier (letters a-z, digits and '_', starting with a letter "
            "or '_', at most 63 bytes), got 'Search'; try 'search'",
        ),
        (
            "collection: faq\nindex: {maintenance_work_mem: lots}\n",
            "index.maintenance_work_mem",
            "must be 'auto' or a Postgres size such as '256MB' or '1GB', got 'lots'",
        ),
        (
            "collection: faq\nvalidation: {sample_queries: [{id: Q 1, query: q, expected_document_id: d}]}\n",
            "validation.sample_queries[0].id",
            "must match the regular expression ^[a-z0-9_]{1,60}$, got 'Q 1'",
        ),
        (
            "collection: faq\nembedding: {retry_delay_seconds: 10, max_retry_delay_seconds: 5}\n",
            "embedding.max_retry_delay_seconds",
            "must be at least retry_delay_seconds (10.0), got 5.0",
        ),
    ],
)
def test_pydantic_errors_read_as_plain_words(
    tmp_path: Path, yaml_text: str, field: str, message: str
) -> None:
    (issue,) = issues_of(write(tmp_path, "faq.yaml", yaml_text))
    assert (issue.field, issue.message) == (field, message)
    assert "Value error" not in issue.message and "Input should" not in issue.message


def test_schema_name_is_reported_as_written(tmp_path: Path) -> None:
    (issue,) = issues_of(write(tmp_path, "faq.yaml", "collection: faq\nstore:\n  schema_name: Bad\n"))
    assert (issue.field, issue.line) == ("store.schema_name", 3)


def test_missing_nested_field_points_at_its_mapping(tmp_path: Path) -> None:
    text = "collection: faq\nvalidation:\n  sample_queries:\n    - id: q\n\n      query: x\n"
    issues = issues_of(write(tmp_path, "faq.yaml", text))
    assert [(i.field, i.line) for i in issues] == [("validation.sample_queries[0].expected_document_id", 4)]


@pytest.mark.parametrize(
    ("yaml_text", "line", "words"),
    [
        ("collection: faq\nm: !!int abc\n", 2, "remove the explicit `!!tag`"),
        ('collection: "faq\x01"\n', 1, "characters are not allowed"),
        ("collection: faq\n---\ncollection: other\n", 2, "remove the extra `---`"),
        ('collection: "faq\n', 1, "close the quote"),
        ("collection: faq\n? [a, b]\n: 1\n", 2, "keys must be text, got a list or mapping"),
        ("collection: faq\n~: 1\n", 2, "keys must be text, got '~'"),
        ("null\n", 1, "the top level must be a mapping"),
        ("collection: faq\ndag:\n  default_args:\n    <<: {1: x}\n", 4, "keys must be text, got '1'"),
        ("x: " + "[" * 1500 + "]" * 1500 + "\ncollection: faq\n", 1, "nested too deeply"),
    ],
)
def test_yaml_problems_are_issues_with_a_line(tmp_path: Path, yaml_text: str, line: int, words: str) -> None:
    (issue,) = issues_of(write(tmp_path, "faq.yaml", yaml_text))
    assert issue.line == line
    assert words in issue.message


def test_recursive_aliases_are_reported_not_followed_forever(tmp_path: Path) -> None:
    issues = issues_of(write(tmp_path, "faq.yaml", "collection: faq\ndag:\n  tags: &t [*t]\n"))
    assert [(i.field, i.line) for i in issues] == [("dag.tags[0]", 3)]


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = "collection: faq\ndag:\n  default_args:\n    <<: {a: 1}\n    a: 2\n"
    spec = load_collection(write(tmp_path, "faq.yaml", text))
    assert spec.dag.default_args == {"a": 2}


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "faq.yaml"
    path.write_bytes(b"collection: caf\xe9\n")
    (issue,) = issues_of(path)
    assert "save the file as UTF-8" in issue.message


def test_a_bad_file_does_not_stop_the_good_ones(tmp_path: Path) -> None:
    good = write(tmp_path, "b_good.yaml", MINIMAL)
    also_good = write(tmp_path, "c_good.yml", MINIMAL.replace("faq", "help"))
    write(tmp_path, "a_bad.yaml", "collection: [\n")
    result = load_collections([tmp_path])
    assert [path for path, _ in result.specs] == [good, also_good]
    assert [(issue.path.name, issue.line) for issue in result.errors] == [("a_bad.yaml", 1)]
    assert not result.valid


def test_folders_are_read_one_level_deep_and_only_yaml(tmp_path: Path) -> None:
    write(tmp_path, "faq.yaml", MINIMAL)
    write(tmp_path, "schema.json", "{}")
    write(tmp_path, "notes.txt", "not a config")
    (tmp_path / "nested").mkdir()
    write(tmp_path / "nested", "other.yaml", "collection: [\n")
    result = load_collections([tmp_path])
    assert result.files == [tmp_path / "faq.yaml"]
    assert result.valid


def test_a_file_named_twice_is_loaded_once(tmp_path: Path) -> None:
    path = write(tmp_path, "faq.yaml", MINIMAL)
    result = load_collections([tmp_path, path])
    assert result.valid and len(result.specs) == 1


def test_a_missing_path_is_an_issue(tmp_path: Path) -> None:
    result = load_collections([tmp_path / "nope"])
    assert [issue.path for issue in result.errors] == [tmp_path / "nope"]
    assert "no such file or folder" in result.errors[0].message


def test_duplicate_name_names_the_first_file_and_the_collection_line(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", MINIMAL)
    write(tmp_path, "b.yaml", "# comment\n" + MINIMAL)
    write(tmp_path, "c.yaml", "\n\n" + MINIMAL)
    result = load_collections([tmp_path])
    assert [(i.path.name, i.line, i.field) for i in result.errors] == [
        ("b.yaml", 2, "collection"),
        ("c.yaml", 3, "collection"),
    ]
    assert all(f"already used by {first}" in issue.message for issue in result.errors)
    assert [path for path, _ in result.specs] == [first]


def test_a_derived_table_clash_points_at_the_collection(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "collection: faq\nstore: {table: help}\n")
    write(tmp_path, "b.yaml", "collection: help\n")
    write(tmp_path, "c.yaml", "collection: other\nstore: {schema: archive, table: help}\n")
    (issue,) = load_collections([tmp_path]).errors
    assert (issue.path.name, issue.line, issue.field) == ("b.yaml", 1, "collection")
    assert "table public.help" in issue.message


def test_configs_dir_defaults_to_the_repo_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAG_FACTORY_CONFIGS", raising=False)
    assert configs_dir() == REPO_ROOT / "configs"


def test_configs_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DAG_FACTORY_CONFIGS", str(tmp_path))
    assert configs_dir() == tmp_path
