"""Broken collection files, as one airflow import error naming file, line, field and fix.

Kept apart from collection_dags.py on purpose: Airflow marks every DAG of a file that has an import
error as broken, and the valid collections must keep running. Written by `dag-factory dag-files`.
"""

from dag_factory.factory import raise_config_errors

raise_config_errors()
