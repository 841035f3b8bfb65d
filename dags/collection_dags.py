"""One Airflow DAG per collection file in $DAG_FACTORY_CONFIGS.

Read by the dag-processor. A broken file is left out here and reported by
collection_config_errors.py, so the other collections keep running. Written by `dag-factory dag-files`.
"""

from dag_factory.factory import generate_dags

globals().update(generate_dags())
