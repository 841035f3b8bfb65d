"""An auth manager for the Collections app's tests: Airflow's SimpleAuthManager, except that the users
of :data:`HIDDEN_DAGS` may not read those DAGs (the simple manager has no per-DAG access)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

# username -> DAG ids that user may not read
HIDDEN_DAGS: dict[str, set[str]] = {}


class DagListAuthManager(SimpleAuthManager):
    def is_authorized_dag(
        self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None
    ) -> bool:
        if details is not None and details.id in HIDDEN_DAGS.get(user.username, set()):
            return False
        return super().is_authorized_dag(
            method=method, user=user, access_entity=access_entity, details=details
        )


@contextmanager
def dag_list_auth_manager(hidden: dict[str, set[str]]) -> Iterator[DagListAuthManager]:
    """Make :class:`DagListAuthManager` Airflow's auth manager (what ``get_auth_manager`` returns)
    while the block runs, with ``hidden`` as its restrictions."""
    import os

    from airflow.api_fastapi import app as airflow_app

    previous = os.environ.get("AIRFLOW__CORE__AUTH_MANAGER")
    os.environ["AIRFLOW__CORE__AUTH_MANAGER"] = f"{__name__}.DagListAuthManager"
    HIDDEN_DAGS.clear()
    HIDDEN_DAGS.update(hidden)
    try:
        manager = airflow_app.init_auth_manager()
        assert isinstance(manager, DagListAuthManager)
        yield manager
    finally:
        airflow_app._AuthManagerState.instance = None
        HIDDEN_DAGS.clear()
        if previous is None:
            os.environ.pop("AIRFLOW__CORE__AUTH_MANAGER", None)
        else:
            os.environ["AIRFLOW__CORE__AUTH_MANAGER"] = previous
