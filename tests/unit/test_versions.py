"""Names of collection versions (:mod:`capstone.versions`): long stable names keep their versions'
tables and indexes apart."""

from __future__ import annotations

import pytest

from capstone.index_build import KeywordIndexParams
from capstone.versions import version_table_name
from tests.support.settings import index_params


@pytest.mark.parametrize("stable", ["docs", "a" * 46, "b" * 63])
def test_versions_of_a_long_name_keep_distinct_tables_and_index_names(stable: str) -> None:
    tables = [version_table_name(stable, number) for number in (1, 2, 10)]

    assert len(set(tables)) == 3 and all(
        table.endswith(f"__v{n}") for table, n in zip(tables, (1, 2, 10), strict=True)
    )
    assert all(len(table.encode()) <= 46 for table in tables)
    for kind in ({"type": "hnsw"}, {"type": "ivfflat", "lists": 10}):
        names = {index_params("public", table, **kind).index_name for table in tables}
        assert len(names) == 3, names
    assert len({KeywordIndexParams("public", table, "auto").index_name for table in tables}) == 3
    assert len({f"{table[:50]}_document_id" for table in tables}) == 3  # the store's document_id index
