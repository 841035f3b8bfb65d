"""Collections in the Airflow UI: a plugin (:mod:`capstone.ui.plugin`) whose FastAPI app
(:mod:`capstone.ui.app`) shows every collection's health, versions and history, compares versions'
answers to a query, and serves the same as JSON. Read-only; access follows the user's DAG access."""
