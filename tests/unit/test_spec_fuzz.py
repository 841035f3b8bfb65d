"""Property: any YAML text either loads or raises InvalidCollectionConfig with file and line, never more.

Documents are drawn from the spec's own fields (right keys, typos, right and wrong types, nesting),
dumped as YAML, and sometimes broken with a stray character or replaced by arbitrary text.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from dag_factory.errors import InvalidCollectionConfig
from dag_factory.loader import load_collection
from dag_factory.spec import CollectionSpec

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
NAMES = st.sampled_from(["faq", "help_center", "FAQ", "a b", "x" * 64, "", "faq;drop", "faq.enriched"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 100_000), st.floats(allow_nan=True), TEXT, NAMES
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT | st.integers(0, 3), inner, max_size=3),
    max_leaves=6,
)
BREAKERS = st.sampled_from(
    [":", "[", "{", "]", "}", "\t", '"', "'", "- ", "&a ", "*a", "!!int ", "\n  ", "%", "\x00"]
)


def _unwrap(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        return next(arg for arg in get_args(annotation) if arg is not type(None))
    return annotation


def value_for(annotation: Any) -> st.SearchStrategy[Any]:
    """Mostly plausible values for a field of this type, sometimes anything at all."""
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        plausible: st.SearchStrategy[Any] = mapping_for(annotation)
    elif get_origin(annotation) is list:
        plausible = st.lists(value_for(get_args(annotation)[0]), max_size=3)
    elif get_origin(annotation) is Literal:
        plausible = st.sampled_from(get_args(annotation))
    elif annotation is int:
        plausible = st.integers(2, 64) | st.integers(-5, 5000)
    elif annotation is float:
        plausible = st.floats(0.5, 100) | st.floats(-10, 100_000)
    elif annotation is str:
        plausible = NAMES | TEXT
    else:
        plausible = ANY_VALUE
    return st.one_of(plausible, plausible, plausible, ANY_VALUE)


def mapping_for(model: type[BaseModel]) -> st.SearchStrategy[dict[Any, Any]]:
    """Dicts with up to three of the model's keys (aliases or names), or the odd typo."""
    fields = {(info.alias or name): info.annotation for name, info in model.model_fields.items()}
    typos = {key[:-1] + "_": Any for key in fields} | {"colour": Any}
    key = st.one_of(*[st.sampled_from(sorted(fields))] * 4, st.sampled_from(sorted(typos)))
    keys = st.lists(key, max_size=3, unique=True)
    return keys.flatmap(
        lambda chosen: st.fixed_dictionaries({key: value_for(fields.get(key, Any)) for key in chosen})
    )


def collection_document() -> st.SearchStrategy[dict[Any, Any]]:
    """A spec-like document that usually has a good collection name, so deeper rules get exercised."""
    name = st.one_of(st.just("faq"), st.just("faq"), st.just("help_center"), NAMES, ANY_VALUE)
    return st.builds(lambda name, rest: {"collection": name, **rest}, name, mapping_for(CollectionSpec))


def documents() -> st.SearchStrategy[str]:
    """YAML text: a dumped spec-like document (maybe broken), or arbitrary values or text."""
    dumped = st.builds(
        lambda data, flow: yaml.safe_dump(data, sort_keys=False, default_flow_style=flow, allow_unicode=True),
        collection_document() | collection_document() | ANY_VALUE,
        st.sampled_from([False, None]),
    )
    broken = st.builds(
        lambda text, breaker, where: (
            text[: int(where * len(text))] + breaker + text[int(where * len(text)) :]
        ),
        dumped,
        BREAKERS,
        st.floats(0, 1),
    )
    return st.one_of(dumped, dumped, broken, TEXT)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "collection.yaml"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=documents())
def test_any_document_loads_or_says_where_it_is_wrong(config_file: Path, text: str) -> None:
    config_file.write_text(text, encoding="utf-8")
    lines = max(1, len(config_file.read_text(encoding="utf-8").splitlines()))
    try:
        spec = load_collection(config_file)
    except InvalidCollectionConfig as invalid:
        event("invalid")
        assert invalid.issues
        for issue in invalid.issues:
            assert issue.path == config_file
            assert issue.line is not None and 1 <= issue.line <= lines, issue
            assert issue.message and "Traceback" not in issue.message
            assert str(issue).startswith(f"{config_file}:{issue.line}")
    else:
        event("loads")
        assert isinstance(spec, CollectionSpec)
