"""Where an API provider's key comes from: an Airflow connection's password, else the environment."""

from __future__ import annotations

import os

from capstone.embeddings.errors import MissingAPIKeyError

__all__ = ["resolve_api_key"]


def resolve_api_key(connection_id: str | None, api_key_env: str = "OPENAI_API_KEY") -> str | None:
    """The password of Airflow connection ``connection_id`` if given, else ``$api_key_env`` or None."""
    if connection_id is None:
        return os.environ.get(api_key_env) or None
    return _connection_password(connection_id)


def _connection_password(connection_id: str) -> str:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = BaseHook.get_connection(connection_id)
    except AirflowNotFoundException as err:
        raise MissingAPIKeyError(
            f"Airflow connection {connection_id!r} (embedding.connection_id) is not defined: create it with "
            f"the API key as its password (`airflow connections add {connection_id} --conn-type generic "
            f"--conn-password ...` or the AIRFLOW_CONN_{connection_id.upper()} environment variable)"
        ) from err
    if not connection.password:
        raise MissingAPIKeyError(
            f"Airflow connection {connection_id!r} (embedding.connection_id) has no password: "
            "store the API key in its password field"
        )
    return str(connection.password)
