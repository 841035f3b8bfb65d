"""A private Postgres for tests that stop, crash or reconfigure their server."""

from __future__ import annotations

import socket

__all__ = ["PRIVATE_CONNECTION_ID", "free_port"]

# The Airflow connection id of the private Postgres server (see the ``private_pg`` fixture).
PRIVATE_CONNECTION_ID = "faulty_pg"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
