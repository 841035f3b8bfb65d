"""The Airflow plugin: the Collections app in the api-server, and its views in Airflow's UI.

Airflow finds it through the ``airflow.plugins`` entry point (``pyproject.toml``) and the provider
metadata (:mod:`capstone.provider`). It adds:

- the FastAPI app of :mod:`capstone.ui.app`, mounted at ``/capstone``, built on its first request;
- "Collections" under Browse in the UI's navigation, the list page in the UI's iframe;
- a "Collection" tab on every DAG's page, that DAG's collection page (a DAG that indexes none says so).

Kept to one import of Airflow: every Airflow process loads plugins, and only the api-server serves
this one.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from capstone.ui.app import URL_PREFIX, LazyApp

__all__ = ["CollectionsPlugin"]


class CollectionsPlugin(AirflowPlugin):
    name = "capstone_collections"
    fastapi_apps = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "Capstone collections"}]
    external_views = [
        {
            "name": "Collections",
            "href": f"{URL_PREFIX}/",
            "url_route": "capstone-collections",
            "category": "browse",
            "destination": "nav",
        },
        {
            "name": "Collection",
            "href": f"{URL_PREFIX}/collections/{{DAG_ID}}",
            "url_route": "capstone-collection",
            "destination": "dag",
        },
    ]
