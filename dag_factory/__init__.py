"""The DAG factory: collection YAML -> validated spec -> typed settings -> one Airflow DAG.

``spec`` declares every setting once (default, bounds, meaning), ``loader`` reads YAML with
line-aware errors, ``runtime`` turns a spec into ``capstone.settings``, ``builder`` makes the
DAG, ``factory`` builds every file of a folder (a bad file costing only its own DAG), ``cli``
validates and renders. ``dag_factory.local`` is local tooling the runtime never imports.
"""
