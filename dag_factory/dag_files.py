"""The two thin files a DAGs folder needs, as the installed package writes them
(``dag-factory dag-files DIR``): teams install the package and write these, nothing is copied out
of a checkout. The repository's own ``dags/`` holds the same two files.

* ``collection_dags.py`` registers one DAG per valid collection file;
* ``collection_config_errors.py`` raises one import error listing every broken file. Airflow marks
  every DAG of a file that has an import error as broken, so the errors live in a file of their own
  and the good collections keep running.

Without ``configs``, the files read the collection folder from ``$DAG_FACTORY_CONFIGS`` when Airflow
parses them; with it, that folder is written into them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DAG_FILES", "dag_file_texts", "write_dag_files"]

DAG_FILES = ("collection_dags.py", "collection_config_errors.py")

_COLLECTION_DAGS = '''"""One Airflow DAG per collection file in {where}.

Read by the dag-processor. A broken file is left out here and reported by
collection_config_errors.py, so the other collections keep running. Written by `dag-factory dag-files`.
"""

{imports}from dag_factory.factory import generate_dags

globals().update(generate_dags({argument}))
'''

_CONFIG_ERRORS = '''"""Broken collection files, as one airflow import error naming file, line, field and fix.

Kept apart from collection_dags.py on purpose: Airflow marks every DAG of a file that has an import
error as broken, and the valid collections must keep running. Written by `dag-factory dag-files`.
"""

{imports}from dag_factory.factory import raise_config_errors

raise_config_errors({argument})
'''


def dag_file_texts(configs: Path | None = None) -> dict[str, str]:
    """File name -> text of the two DAG files, reading ``configs`` (default: ``$DAG_FACTORY_CONFIGS``)."""
    if configs is None:
        fill = {"where": "$DAG_FACTORY_CONFIGS", "imports": "", "argument": ""}
    else:
        fill = {
            "where": str(configs),
            "imports": "from pathlib import Path\n\n",
            "argument": f"Path({str(configs.resolve())!r})",
        }
    return {DAG_FILES[0]: _COLLECTION_DAGS.format(**fill), DAG_FILES[1]: _CONFIG_ERRORS.format(**fill)}


def write_dag_files(folder: Path, configs: Path | None = None) -> list[Path]:
    """Write the two DAG files into ``folder`` (created if missing); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in dag_file_texts(configs).items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
