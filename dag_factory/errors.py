"""Errors a user sees when a collection file is wrong: file, line, field, and what to do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ConfigIssue", "InvalidCollectionConfig"]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in one file, e.g. ``configs/faq.yaml:12 index.m: must be between 2 and 100, got 0``."""

    path: Path
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{where} {self.field}: {self.message}" if self.field else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"file": str(self.path), "line": self.line, "field": self.field, "message": self.message}


class InvalidCollectionConfig(ValueError):
    """A collection file that cannot become a DAG; ``issues`` lists every problem found in it."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))
