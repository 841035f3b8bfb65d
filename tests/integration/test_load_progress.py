"""Reading a long batch says how far it got, without changing what is staged."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from capstone import pipeline
from capstone.documents import BatchLocation
from capstone.pipeline import run_key_for
from tests.support.settings import collection_settings
from tests.support.tables import jsonl_batch


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_loading_logs_its_progress_through_a_long_batch(
    tmp_path: Path, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "LOAD_PROGRESS_SECONDS", 0.0)  # a line after every document
    documents: list[dict[str, object]] = [
        {"id": f"d{i}", "content": "x", "chunks": [f"chunk of {i}"]} for i in range(5)
    ]
    documents.insert(2, {"id": "bad", "content": "x", "chunks": []})
    documents.append({"id": "d1", "deleted": True})  # a duplicate id: set aside, the first one wins
    settings = collection_settings("progress", pg_schema, "docs", embedding={"dimension": 8})

    # A handler of its own: Airflow's logging set-up, done on first use, replaces the root's handlers.
    logger, collect = logging.getLogger("capstone.pipeline"), _Collect()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(collect)
    try:
        loaded = pipeline.load_documents(
            settings,
            run_key_for("progress", "1"),
            [BatchLocation.from_extra(jsonl_batch(tmp_path / "b.jsonl", documents))],
        )
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)

    pattern = re.compile(r"read (\d+) documents so far \(\d+ documents/s\), (\d+) set aside")
    progress = [
        (int(match[1]), int(match[2])) for message in collect.messages if (match := pattern.match(message))
    ]
    assert [read for read, _ in progress] == list(range(1, len(documents) + 1))
    assert progress[-1][1] >= 1  # the empty-chunks document, counted as it went
    assert (loaded["documents"], loaded["rejected_count"], loaded["deleted_documents"]) == (5, 2, 0)
