"""Build every collection's DAG from a folder of YAML files, one bad file costing only its own DAG.

The DAGs folder holds two thin files that call this module (``dag-factory dag-files DIR`` writes
them, see :mod:`dag_factory.dag_files`):

* ``dags/collection_dags.py`` registers one DAG per valid collection file;
* ``dags/collection_config_errors.py`` raises one import error that lists every broken file
  (file, line, field, fix). Airflow marks all DAGs of a file that has an import error as broken,
  so the errors live in their own file and the good collections keep running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from airflow.sdk import DAG

from dag_factory.errors import ConfigIssue, InvalidCollectionConfig
from dag_factory.loader import configs_dir, load_collections

__all__ = ["FactoryResult", "build_dags", "generate_dags", "raise_config_errors"]

log = logging.getLogger(__name__)


@dataclass
class FactoryResult:
    """The DAGs built from a configs folder, and the problems that kept others from being built."""

    dags: dict[str, DAG] = field(default_factory=dict)
    errors: list[ConfigIssue] = field(default_factory=list)


def build_dags(configs: Path | None = None) -> FactoryResult:
    """Load every collection file under ``configs`` (default: ``configs_dir()``) and build its DAG."""
    from dag_factory.builder import build_collection_dag

    loaded = load_collections([configs or configs_dir()])
    result = FactoryResult(errors=list(loaded.errors))
    for path, spec in loaded.specs:
        try:
            result.dags[spec.collection] = build_collection_dag(spec, path)
        except Exception as exc:  # a bug or an environment problem: report it against the file
            log.exception("could not build the DAG of %s", path)
            result.errors.append(ConfigIssue(path, None, "", f"could not build the DAG: {exc}"))
    return result


def generate_dags(configs: Path | None = None) -> dict[str, DAG]:
    """The DAGs of the valid collection files (broken files are logged, and reported elsewhere)."""
    result = build_dags(configs)
    for issue in result.errors:
        log.error("collection config skipped: %s", issue)
    return result.dags


def raise_config_errors(configs: Path | None = None) -> None:
    """Raise one InvalidCollectionConfig listing every broken collection file, if there is one."""
    errors = build_dags(configs).errors
    if errors:
        raise InvalidCollectionConfig(errors)
