"""Build every collection's DAG from a folder of YAML files, one bad file costing only its own DAG.

The DAGs folder holds two thin files that call this module (``dag-factory dag-files DIR`` writes
them, see :mod:`dag_factory.dag_files`):

* ``dags/collection_dags.py`` registers one DAG per valid collection file;
* ``dags/collection_config_errors.py`` raises one import error that lists every broken file
  (file, line, field, fix). Airflow marks all DAGs of a file that has an import error as broken,
  so the errors live in their own file and the good collections keep running. It only validates:
  building a DAG from a valid spec is the other file's work, and a failure there is logged by it.

A task process parses ``collection_dags.py`` to run one task of one DAG. Airflow tells it which
(``get_parsing_context().dag_id``), and ``generate_dags`` then reads and builds that collection's
file alone, so starting a task does not grow with the number of collection files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from airflow.sdk import DAG, get_parsing_context

from dag_factory.errors import ConfigIssue, InvalidCollectionConfig
from dag_factory.loader import configs_dir, load_collections

__all__ = ["FactoryResult", "build_dags", "generate_dags", "raise_config_errors"]

log = logging.getLogger(__name__)


@dataclass
class FactoryResult:
    """The DAGs built from a configs folder, and the problems that kept others from being built."""

    dags: dict[str, DAG] = field(default_factory=dict)
    errors: list[ConfigIssue] = field(default_factory=list)


def build_dags(configs: Path | None = None, *, only: str | None = None) -> FactoryResult:
    """Load every collection file under ``configs`` (default: ``configs_dir()``) and build its DAG.

    With ``only`` (a collection name), just that collection's DAG is built, from its file alone
    when one file declares it plainly (see ``load_collections``).
    """
    from dag_factory.builder import build_collection_dag

    loaded = load_collections([configs or configs_dir()], only=only)
    result = FactoryResult(errors=list(loaded.errors))
    for path, spec in loaded.specs:
        if only is not None and spec.collection != only:
            continue
        try:
            result.dags[spec.collection] = build_collection_dag(spec, path)
        except Exception as exc:  # a bug or an environment problem: report it against the file
            log.exception("could not build the DAG of %s", path)
            result.errors.append(ConfigIssue(path, None, "", f"could not build the DAG: {exc}"))
    return result


def generate_dags(configs: Path | None = None) -> dict[str, DAG]:
    """The DAGs of the valid collection files (broken files are logged, and reported elsewhere).

    In a task process only the DAG that runs is built.
    """
    result = build_dags(configs, only=get_parsing_context().dag_id)
    for issue in result.errors:
        log.error("collection config skipped: %s", issue)
    return result.dags


def raise_config_errors(configs: Path | None = None) -> None:
    """Raise one InvalidCollectionConfig listing every broken collection file, if there is one."""
    errors = load_collections([configs or configs_dir()]).errors
    if errors:
        raise InvalidCollectionConfig(errors)
