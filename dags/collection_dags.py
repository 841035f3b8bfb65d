"""Airflow DAGs generated from the collection files in configs/ (read by the airflow dag-processor).

The folder is $DAG_FACTORY_CONFIGS, or configs/ in the repository. A broken file is left out
here and reported by collection_config_errors.py, so the other collections keep running.
"""

from dag_factory.factory import generate_dags

globals().update(generate_dags())
