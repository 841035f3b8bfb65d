"""The local Airflow stacks the end-to-end suites run, built in one place: the e2e suite's
(LocalExecutor) and the distributed suite's (CeleryExecutor, two workers), each with its own Airflow
home, metadata DB and API port, writing collections to the tests' database (never ``vectors``, the
database of the user's demo and searches)."""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

import yaml

from dag_factory.local.stack import AirflowStack

__all__ = [
    "DISTRIBUTED_SCHEMA",
    "DISTRIBUTED_WORKERS",
    "E2E_CONFIGS",
    "TEST_DATABASE",
    "distributed_configs",
    "distributed_stack",
    "e2e_stack",
]

# The database of the embedded server every test writes collections to.
TEST_DATABASE = "capstone_test"
ROOT = Path(__file__).resolve().parents[2]
E2E_CONFIGS = ROOT / "tests" / "e2e" / "configs"
DISTRIBUTED_SCHEMA = "distributed"
DISTRIBUTED_WORKERS = ("worker-a", "worker-b")
# Each Airflow minor migrates a metadata DB to its own schema: the compatibility lane, on an older
# Airflow, gets homes and metadata DBs of its own.
AIRFLOW_MINOR = "_".join(version("apache-airflow").split(".")[:2])


def e2e_stack() -> AirflowStack:
    """The e2e suite's stack (``E2E_API_PORT``, default 28081): the collection of ``E2E_CONFIGS``."""
    return AirflowStack(
        home=ROOT / ".data" / f"airflow-e2e-{AIRFLOW_MINOR}",
        api_port=int(os.environ.get("E2E_API_PORT", 28081)),
        configs=E2E_CONFIGS,
        metadata_db=f"airflow_e2e_{AIRFLOW_MINOR}",
        vector_db=TEST_DATABASE,
    )


def distributed_configs(folder: Path) -> Path:
    """The e2e collection in the distributed suite's schema, written to ``folder``."""
    spec = yaml.safe_load((E2E_CONFIGS / "documents.yaml").read_text())
    spec["store"]["schema"] = DISTRIBUTED_SCHEMA
    (folder / "documents.yaml").write_text(yaml.safe_dump(spec))
    return folder


def distributed_stack(configs: Path) -> AirflowStack:
    """The distributed suite's stack (``DISTRIBUTED_API_PORT``, default 28082): CeleryExecutor, two
    workers, the collections of ``configs``."""
    return AirflowStack(
        home=ROOT / ".data" / f"airflow-distributed-{AIRFLOW_MINOR}",
        api_port=int(os.environ.get("DISTRIBUTED_API_PORT", 28082)),
        configs=configs,
        executor="celery",
        metadata_db=f"airflow_distributed_{AIRFLOW_MINOR}",
        workers=DISTRIBUTED_WORKERS,
        vector_db=TEST_DATABASE,
    )
