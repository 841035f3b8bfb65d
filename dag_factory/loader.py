"""Reading collection files: YAML to ``CollectionSpec``, with every problem tied to a file and line.

One bad file never hides the others: ``load_collections`` returns the good specs and the issues
side by side, and the caller decides what to do with each.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from dag_factory.errors import ConfigIssue, InvalidCollectionConfig, Loc, explain, format_loc
from dag_factory.spec import CollectionSpec

__all__ = ["CONFIG_SUFFIXES", "LoadResult", "configs_dir", "load_collection", "load_collections"]

CONFIG_SUFFIXES = (".yaml", ".yml")
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SYNTAX_HINTS = {
    "'\\t'": "YAML indents with spaces, not tabs",
    "cannot start any token": "put values that start with @, ` or % in quotes",
    "while scanning a quoted scalar": "close the quote",
    "while parsing a flow": "close the [ or { opened there, and quote values that contain , : [ ] { }",
    "mapping values are not allowed": "check the indentation, and quote values that contain ': '",
    "could not find expected ':'": "each line in a mapping needs `key: value`; check quotes and indentation",
    "expected a single document": "a collection file holds one YAML document: remove the extra `---`",
    "could not determine a constructor": "remove the custom `!tag`; plain YAML values only",
    "exceeded maximum nesting depth": "nested too deeply to read: flatten the structure",
}


@dataclass
class LoadResult:
    """What ``load_collections`` found: the valid specs (sorted by path) and every issue."""

    specs: list[tuple[Path, CollectionSpec]] = field(default_factory=list)
    errors: list[ConfigIssue] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        """True when every file loaded and no two files clash."""
        return not self.errors


def configs_dir() -> Path:
    """The folder of collection files: ``$DAG_FACTORY_CONFIGS``, else ``configs/`` in the repo root."""
    configured = os.environ.get("DAG_FACTORY_CONFIGS")
    return Path(configured) if configured else Path(__file__).resolve().parent.parent / "configs"


def load_collection(path: Path) -> CollectionSpec:
    """Load and validate one collection file; raise ``InvalidCollectionConfig`` listing every problem."""
    spec, _ = _load(path)
    return spec


def load_collections(paths: Iterable[Path], *, only: str | None = None) -> LoadResult:
    """Load every collection file under ``paths`` (files, or folders of ``*.yaml``/``*.yml``).

    A file that reuses the collection name (the DAG id) or the table of an earlier file, by path,
    is an error naming that file; every other valid file still loads.

    ``only`` names one collection: when every file declares its collection on a plain
    ``collection: <name>`` line and exactly one declares ``only``, that file alone is read and
    validated (a task process, which runs one DAG, then pays for one file however many there
    are). Otherwise every file is loaded, and the result may hold other collections too.
    """
    result = LoadResult()
    files, result.errors = _collect_files(paths)
    result.files = files
    if only is not None:
        declared = [_declared_collection(path) for path in files]
        if None not in declared and declared.count(only) == 1:
            files = [files[declared.index(only)]]
    loaded: list[tuple[Path, CollectionSpec, Node]] = []
    for path in files:
        try:
            spec, root = _load(path)
        except InvalidCollectionConfig as invalid:
            result.errors.extend(invalid.issues)
        else:
            loaded.append((path, spec, root))
    clashes = _clashes(loaded)
    result.errors.extend(clashes)
    clashing = {issue.path for issue in clashes}
    result.specs = [(path, spec) for path, spec, _ in loaded if path not in clashing]
    return result


# A top-level `collection: name` line, the name optionally quoted, optionally followed by a comment.
_COLLECTION_LINE = re.compile(
    r"""^collection:[ \t]*(["']?)([A-Za-z0-9_.-]+)\1[ \t]*(?:#.*)?$""", re.MULTILINE
)


def _declared_collection(path: Path) -> str | None:
    """The collection a file names on a plain top-level line, read without parsing the YAML."""
    try:
        found = _COLLECTION_LINE.findall(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    return found[0][1] if len(found) == 1 else None


# --- one file ------------------------------------------------------------------------------------


def _load(path: Path) -> tuple[CollectionSpec, Node]:
    text = _read(path)
    root, data, issues = _parse(text, path)
    if root is None or data is None:
        raise InvalidCollectionConfig(issues)
    try:
        spec = CollectionSpec.model_validate(data)
    except ValidationError as invalid:
        issues += _validation_issues(invalid, root, path)
        if not issues:  # every error was about a key we could not place: still say something
            summary = "; ".join(f"{format_loc(e['loc'])}: {e['msg']}" for e in invalid.errors())
            issues.append(ConfigIssue(path, 1, "", summary))
    if issues:
        raise InvalidCollectionConfig(sorted(issues, key=lambda issue: (issue.line or 0, issue.field)))
    return spec, root


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        message = f"not UTF-8 text ({error.reason}): save the file as UTF-8"
    except OSError as error:
        message = f"cannot read the file: {error.strerror or error}"
    raise InvalidCollectionConfig([ConfigIssue(path, None, "", message)])


# libyaml's parser composes the nodes (with their line numbers) ~10x faster than PyYAML's own, which
# the dag-processor would otherwise pay on every parse of every collection file.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):  # type: ignore[valid-type,misc]
    """A SafeLoader that remembers the node it is constructing, to place construction errors."""

    current: Node | None = None

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        self.current = node
        return super().construct_object(node, deep=deep)


def _parse(text: str, path: Path) -> tuple[Node | None, dict[str, Any] | None, list[ConfigIssue]]:
    """Compose and construct the YAML; returns the root node, the data and the YAML-level issues."""
    try:
        loader = _Loader(text)  # checks the characters up front
    except yaml.YAMLError as error:
        return None, None, [_syntax_issue(error, text, path)]
    try:
        return _compose_and_construct(loader, text, path)
    finally:
        loader.dispose()


def _compose_and_construct(
    loader: _Loader, text: str, path: Path
) -> tuple[Node | None, dict[str, Any] | None, list[ConfigIssue]]:
    try:
        root = loader.get_single_node()
        issues = _document_issues(root, text, path)
        if issues or root is None:
            return None, None, issues
        issues = list(_key_issues(root, path))
    except yaml.YAMLError as error:
        return None, None, [_syntax_issue(error, text, path)]
    except RecursionError:
        return None, None, [ConfigIssue(path, 1, "", "nested too deeply to read: flatten the structure")]
    try:
        return root, loader.construct_document(root), issues
    except Exception as error:  # e.g. `!!int abc`, or a list as a key: never a traceback
        # A key that is not text is already reported, and is the likely cause.
        return None, None, issues or [_construction_issue(error, loader.current, text, path)]


def _document_issues(root: Node | None, text: str, path: Path) -> list[ConfigIssue]:
    if root is None:
        message = "the file is empty: start with `collection: <name>` and `embedding: {provider: hash}`"
        return [ConfigIssue(path, 1, "", message)]
    if not isinstance(root, MappingNode):
        kind = "a list" if isinstance(root, SequenceNode) else f"the value {root.value!r}"
        message = f"the top level must be a mapping of fields (`collection: <name>` ...), got {kind}"
        return [ConfigIssue(path, _line(root, text), "", message)]
    return []


def _key_issues(node: Node, path: Path, loc: Loc = (), seen: set[int] | None = None) -> Iterator[ConfigIssue]:
    """Keys that are not text, and keys set twice in one mapping (PyYAML silently keeps the last)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias to a node already checked (or to one of its ancestors)
        return
    seen.add(id(node))
    if isinstance(node, SequenceNode):
        for position, item in enumerate(node.value):
            yield from _key_issues(item, path, (*loc, position), seen)
    if not isinstance(node, MappingNode):
        return
    first_line: dict[str, int] = {}
    for key, value in node.value:
        line = key.start_mark.line + 1
        if key.tag == _MERGE_TAG:  # `<<: *defaults` merges the keys of another mapping into this one
            yield from _key_issues(value, path, loc, seen)
            continue
        if not isinstance(key, ScalarNode) or key.tag != _STR_TAG:
            shown = repr(key.value) if isinstance(key, ScalarNode) else "a list or mapping"
            message = f"keys must be text, got {shown}: use a plain name or put it in quotes"
            yield ConfigIssue(path, line, format_loc(loc), message)
            continue
        if key.value in first_line:
            message = (
                f"set twice (first on line {first_line[key.value]}); YAML keeps only the last: remove one"
            )
            yield ConfigIssue(path, line, format_loc((*loc, key.value)), message)
        first_line.setdefault(key.value, line)
        yield from _key_issues(value, path, (*loc, key.value), seen)


def _syntax_issue(error: yaml.YAMLError, text: str, path: Path) -> ConfigIssue:
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow
        line = _clamp(text.count("\n", 0, error.position) + 1, text)
        return ConfigIssue(path, line, "", f"invalid YAML: {error.reason}: remove that character")
    hint = next((hint for key, hint in _SYNTAX_HINTS.items() if key in str(error)), "fix the YAML syntax")
    if not isinstance(error, yaml.MarkedYAMLError):
        return ConfigIssue(path, 1, "", f"invalid YAML: {error}: {hint}")
    mark = error.problem_mark or error.context_mark
    line = _clamp(mark.line + 1 if mark else 1, text)
    context = ""
    if error.context:
        started = f" started on line {error.context_mark.line + 1}" if error.context_mark else ""
        context = f" ({error.context}{started})"
    return ConfigIssue(path, line, "", f"invalid YAML: {error.problem or 'invalid YAML'}{context}: {hint}")


def _construction_issue(error: Exception, node: Node | None, text: str, path: Path) -> ConfigIssue:
    line = _line(node, text) if node is not None else 1
    message = f"invalid YAML value ({error}): remove the explicit `!!tag` or fix the value"
    return ConfigIssue(path, line, "", message)


def _line(node: Node, text: str) -> int:
    return _clamp(node.start_mark.line + 1, text)


def _clamp(line: int, text: str) -> int:
    """A line that exists in the file (YAML reports errors at end of input one line past it)."""
    return max(1, min(line, len(text.splitlines()) or 1))


# --- validation errors to issues ----------------------------------------------------------------


def _validation_issues(invalid: ValidationError, root: Node, path: Path) -> list[ConfigIssue]:
    issues = []
    for error in invalid.errors():
        if error["type"] == "invalid_key":  # a key that is not text: reported by _key_issues
            continue
        loc, message = explain(error, CollectionSpec)
        located = _locate(root, loc)
        if located is not None:
            issues.append(ConfigIssue(path, located[0], located[1], message))
    return issues


def _locate(root: Node, loc: Loc) -> tuple[int, str] | None:
    """The line of the deepest key of ``loc`` present in the YAML, and ``loc`` as the user writes it.

    None for an error about a key that is not text (already reported by ``_key_issues``).
    """
    line, node = root.start_mark.line + 1, root
    for part in loc:
        if part == "[key]" or (not isinstance(part, str) and isinstance(node, MappingNode)):
            return None
        child = _child(node, part)
        if child is None:
            break
        line, node = child
    return line, format_loc(loc)


def _child(node: Node, part: str | int) -> tuple[int, Node] | None:
    """The line of ``part``'s key (or list item) in ``node`` and the node of its value."""
    if isinstance(node, MappingNode) and isinstance(part, str):
        matches = [
            (k.start_mark.line + 1, v) for k, v in node.value if isinstance(k, ScalarNode) and k.value == part
        ]
        return matches[-1] if matches else None  # YAML keeps the last of duplicated keys
    if isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        item = node.value[part]
        return item.start_mark.line + 1, item
    return None


# --- many files ----------------------------------------------------------------------------------


def _collect_files(paths: Iterable[Path]) -> tuple[list[Path], list[ConfigIssue]]:
    """The collection files named by ``paths``, sorted and without repeats, and paths that don't exist."""
    files: dict[Path, Path] = {}
    unreadable: list[ConfigIssue] = []
    for path in paths:
        try:
            found = _files_in(path)
        except OSError as error:
            unreadable.append(ConfigIssue(path, None, "", f"cannot read: {error.strerror or error}"))
            continue
        for file in found:
            files.setdefault(file.resolve(), file)
    return sorted(files.values(), key=str), unreadable


def _files_in(path: Path) -> list[Path]:
    """``path`` itself, or the ``*.yaml``/``*.yml`` files directly in it when it is a folder."""
    if path.is_dir():
        return [file for file in path.iterdir() if file.suffix in CONFIG_SUFFIXES and file.is_file()]
    if not path.exists():
        raise FileNotFoundError(
            2, "no such file or folder: check the path (the DAG files read $DAG_FACTORY_CONFIGS)"
        )
    return [path]


@dataclass(frozen=True)
class _UniqueKey:
    """Something two collections must not share, and the field to blame when they do."""

    what: str
    value: Callable[[CollectionSpec], object]
    shown: Callable[[CollectionSpec], str]
    field: Callable[[CollectionSpec], Loc]
    fix: str


_UNIQUE_KEYS = (
    # The builder names each DAG after its collection, so this also catches colliding DAG ids.
    _UniqueKey(
        "collection name (and DAG id)",
        lambda spec: spec.collection,
        lambda spec: repr(spec.collection),
        lambda spec: ("collection",),
        "rename the collection",
    ),
    _UniqueKey(
        "table",
        lambda spec: (spec.store.connection_id, spec.store.schema_name, spec.table_name),
        lambda spec: f"{spec.store.schema_name}.{spec.table_name} (connection {spec.store.connection_id!r})",
        lambda spec: ("store", "table") if spec.store.table else ("collection",),
        "set `store.table` (or `store.schema`) to another name",
    ),
)


def _clashes(loaded: list[tuple[Path, CollectionSpec, Node]]) -> list[ConfigIssue]:
    """One issue for each file that reuses the name or table of an earlier (by path) valid file."""
    owners: dict[tuple[str, object], Path] = {}
    issues: list[ConfigIssue] = []
    for path, spec, root in loaded:
        clash = next((key for key in _UNIQUE_KEYS if (key.what, key.value(spec)) in owners), None)
        if clash is not None:
            issues.append(_clash_issue(clash, spec, root, path, owners[(clash.what, clash.value(spec))]))
            continue
        for key in _UNIQUE_KEYS:
            owners[(key.what, key.value(spec))] = path
    return issues


def _clash_issue(key: _UniqueKey, spec: CollectionSpec, root: Node, path: Path, first: Path) -> ConfigIssue:
    line, field_name = _locate(root, key.field(spec)) or (None, format_loc(key.field(spec)))
    message = f"{key.what} {key.shown(spec)} is already used by {first}: {key.fix}"
    return ConfigIssue(path, line, field_name, message)
