"""Local tooling, never imported by the runtime: the local Airflow stack, its REST client, the demo.

The DAG factory that Airflow imports lives one level up (``dag_factory``); this package starts and
drives a local Airflow for ``make demo``, ``make up`` and the end-to-end tests.
"""
