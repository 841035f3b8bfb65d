"""Airflow provider metadata: what ``airflow providers list`` and ``airflow providers triggers``
show for this package.

Airflow finds it through the ``apache_airflow_provider`` entry point (``pyproject.toml``) and
validates it against its ``provider_info.schema.json``; ``package-name`` must be the
distribution's name. Kept free of imports beyond the standard library: every Airflow process that
lists providers loads it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["DISTRIBUTION", "get_provider_info"]

DISTRIBUTION = "capstone-vector-indexing"
INTEGRATION = "pgvector indexing"


def _version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def get_provider_info() -> dict[str, Any]:
    """The provider's metadata, in the shape of Airflow's ``provider_info.schema.json``."""
    return {
        "package-name": DISTRIBUTION,
        "name": "Capstone vector indexing",
        "description": "Config-driven DAGs that keep pgvector collections in sync with their documents: "
        "embedding, staged upserts, index builds in the triggerer, validation, versioned switches.",
        "versions": [_version()],
        "integrations": [
            {
                "integration-name": INTEGRATION,
                "external-doc-url": "https://github.com/pgvector/pgvector",
                "tags": ["software"],
            }
        ],
        "sensors": [{"integration-name": INTEGRATION, "python-modules": ["capstone.sensors"]}],
        "triggers": [{"integration-name": INTEGRATION, "python-modules": ["capstone.triggers"]}],
    }
