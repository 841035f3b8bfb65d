"""Errors a user sees when a collection file is wrong: file, line, field, and what to do.

``explain`` turns one Pydantic error into the user's words; it knows models in general (bounds,
allowed values, field names), not our spec in particular, so the spec can import this module.
"""

from __future__ import annotations

import datetime
import difflib
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

__all__ = ["ConfigIssue", "InvalidCollectionConfig", "InvalidField", "Loc", "explain", "format_loc"]

Loc = tuple[str | int, ...]
Explainer = Callable[[ErrorDetails, Loc, type[BaseModel]], str]


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


class InvalidField(ValueError):
    """Raised by a model validator to blame one field for a cross-field rule.

    ``field`` is the dotted path (as written in YAML, e.g. ``ef_construction`` or ``[1].id``)
    relative to the model or field whose validator raised it; the loader uses it to point at
    the right line. ``str()`` names the field too, for Pydantic's own error text.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def format_loc(loc: Sequence[str | int]) -> str:
    """``('validation', 'sample_queries', 2, 'query')`` -> ``validation.sample_queries[2].query``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def explain(error: ErrorDetails, model: type[BaseModel]) -> tuple[Loc, str]:
    """The location and a plain-words message (saying how to fix it) for one Pydantic error."""
    loc: Loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, InvalidField):
        return loc + _parse_field(cause.field), cause.message
    handler = _EXPLAINERS.get(error["type"])
    message = handler(error, loc, model) if handler else _fallback(error)
    return loc, message


# --- one explainer per Pydantic error type ------------------------------------------------------


def _missing(error: ErrorDetails, loc: Loc, model: type[BaseModel]) -> str:
    name = str(loc[-1]) if loc else "collection"
    info, _ = _walk(model, loc)
    placeholder = "name" if name == "collection" else _kind(info.annotation if info else str)
    return f"required: add `{name}: <{placeholder}>`"


def _extra(error: ErrorDetails, loc: Loc, model: type[BaseModel]) -> str:
    name = str(loc[-1])
    owner = _model_at(model, loc[:-1])
    allowed = _field_names(owner) if owner else []
    guess = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean '{guess[0]}'?" if guess else ";"
    listing = f" allowed: {', '.join(allowed)}" if allowed else " remove it"
    return f"unknown field '{name}'{hint}{listing}"


def _literal(error: ErrorDetails, loc: Loc, model: type[BaseModel]) -> str:
    _, annotation = _walk(model, loc)
    choices = [str(c) for c in get_args(annotation)] if get_origin(annotation) is Literal else []
    if not choices:
        return f"must be {(error.get('ctx') or {}).get('expected')}, got {_show(error['input'])}"
    message = f"must be one of {', '.join(repr(c) for c in choices)}, got {_show(error['input'])}"
    guess = difflib.get_close_matches(str(error["input"]), choices, n=1)
    return f"{message}; did you mean {guess[0]!r}?" if guess else message


def _bounds(error: ErrorDetails, loc: Loc, model: type[BaseModel]) -> str:
    info, _ = _walk(model, loc)
    lower, upper = _limits(info.metadata if info else [], error)
    got = f", got {_show(error['input'])}"
    if lower[0] == "at least" and upper[0] == "at most":
        return f"must be between {lower[1]} and {upper[1]}{got}"
    words = [f"{kind} {value}" for kind, value in (lower, upper) if kind]
    return f"must be {' and '.join(words)}{got}"


def _value(error: ErrorDetails, loc: Loc, model: type[BaseModel]) -> str:
    cause = (error.get("ctx") or {}).get("error")
    return str(cause) if cause is not None else re.sub(r"^(Value|Assertion) error, ", "", error["msg"])


def _type_message(expected: str) -> Explainer:
    def explainer(error: ErrorDetails, loc: Loc, model: type[BaseModel]) -> str:
        value = error["input"]
        return f"must be {expected}, got {_show(value)}{_quote_hint(value, expected)}"

    return explainer


def _length(error: ErrorDetails, loc: Loc, model: type[BaseModel]) -> str:
    ctx = error.get("ctx") or {}
    if error["type"] == "string_too_short":
        if ctx.get("min_length") == 1:
            return "must not be empty"
        return f"must be at least {ctx.get('min_length')} characters long, got {_show(error['input'])}"
    return f"must be at most {ctx.get('max_length')} characters long, got {len(str(error['input']))}"


def _pattern(error: ErrorDetails, loc: Loc, model: type[BaseModel]) -> str:
    pattern = (error.get("ctx") or {}).get("pattern", "")
    return f"must match the regular expression {pattern}, got {_show(error['input'])}"


def _fallback(error: ErrorDetails) -> str:
    message = re.sub(r"^Input should be", "must be", error["msg"])
    message = re.sub(r"^(Value|Assertion) error, ", "", message)
    return f"{message}, got {_show(error['input'])}" if "input" in error else message


_EXPLAINERS: dict[str, Explainer] = {
    "missing": _missing,
    "extra_forbidden": _extra,
    "literal_error": _literal,
    "greater_than": _bounds,
    "greater_than_equal": _bounds,
    "less_than": _bounds,
    "less_than_equal": _bounds,
    "value_error": _value,
    "assertion_error": _value,
    "string_too_short": _length,
    "string_too_long": _length,
    "string_pattern_mismatch": _pattern,
    "int_type": _type_message("an integer"),
    "int_parsing": _type_message("an integer"),
    "int_parsing_size": _type_message("an integer of a sensible size"),
    "int_from_float": _type_message("a whole number"),
    "float_type": _type_message("a number"),
    "float_parsing": _type_message("a number"),
    "finite_number": _type_message("a finite number"),
    "bool_type": _type_message("true or false"),
    "bool_parsing": _type_message("true or false"),
    "string_type": _type_message("text"),
    "string_unicode": _type_message("text"),
    "list_type": _type_message("a list (`- item` lines or `[a, b]`)"),
    "dict_type": _type_message("a mapping of `key: value` lines"),
    "model_type": _type_message("a mapping of `key: value` lines"),
    "model_attributes_type": _type_message("a mapping of `key: value` lines"),
}


# --- walking a model along an error's loc ------------------------------------------------------


def _parse_field(field: str) -> Loc:
    """``'[1].id'`` -> ``(1, 'id')``; ``'source.asset'`` -> ``('source', 'asset')``."""
    return tuple(
        int(part[1:-1]) if part.startswith("[") else part for part in re.findall(r"\[\d+\]|[^.\[\]]+", field)
    )


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _lookup(model: type[BaseModel], key: str) -> FieldInfo | None:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info
    return None


def _walk(model: type[BaseModel], loc: Loc) -> tuple[FieldInfo | None, Any]:
    """The info of the last named field on ``loc`` and the type found at the end of ``loc``."""
    info: FieldInfo | None = None
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, str) and isinstance(current, type) and issubclass(current, BaseModel):
            info = _lookup(current, part)
            if info is None:
                return None, None
            current = info.annotation
        elif isinstance(part, int) and get_origin(current) is list:
            current = get_args(current)[0]
        else:
            return None, None
    return info, _unwrap(current)


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    _, found = _walk(model, loc)
    return found if isinstance(found, type) and issubclass(found, BaseModel) else None


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _limits(metadata: list[Any], error: ErrorDetails) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """The lower and upper bound of a field as words, e.g. ``('at least', 2)``, ``('at most', 100)``."""
    lower: tuple[str, Any] = ("", None)
    upper: tuple[str, Any] = ("", None)
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            lower = ("at least", item.ge)
        elif isinstance(item, annotated_types.Gt):
            lower = ("greater than", item.gt)
        elif isinstance(item, annotated_types.Le):
            upper = ("at most", item.le)
        elif isinstance(item, annotated_types.Lt):
            upper = ("less than", item.lt)
    if not lower[0] and not upper[0]:  # a constraint not declared on the field itself
        ctx = error.get("ctx") or {}
        words = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
        for key, word in words.items():
            if key in ctx:
                return ((word, ctx[key]), ("", None)) if key[0] == "g" else (("", None), (word, ctx[key]))
    return lower, upper


# --- showing values the way the user wrote them -------------------------------------------------


def _kind(annotation: Any) -> str:
    annotation = _unwrap(annotation)
    names = {str: "text", int: "integer", float: "number", bool: "true|false", list: "list", dict: "mapping"}
    return names.get(get_origin(annotation) or annotation, "value")


def _show(value: Any) -> str:
    """A short rendering of a YAML value for a message: ``'abc'``, ``0``, ``true``, ``a list``."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"the date {value.isoformat()}"
    return f"a {type(value).__name__}"


def _quote_hint(value: Any, expected: str) -> str:
    if expected != "text":
        return ""
    if isinstance(value, bool):
        return " (YAML reads yes/no/on/off/true/false as booleans: put the value in quotes)"
    if isinstance(value, (int, float, datetime.date)):
        return " (put the value in quotes to make it text)"
    return ""
