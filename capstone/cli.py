"""``python -m capstone``: operate the embedded Postgres (and, later, search a collection)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _db(action: str) -> int:
    from capstone.embedded_pg import default_server

    server = default_server()
    if action == "start":
        server.start()
        print(f"embedded Postgres running on {server.host}:{server.port} (data: {server.pgdata})")
    elif action == "stop":
        server.stop()
        print("embedded Postgres stopped")
    elif action == "status":
        running = server.is_running()
        print(f"embedded Postgres on {server.host}:{server.port}: {'running' if running else 'stopped'}")
        return 0 if running else 3
    elif action == "uri":
        print(server.start().uri())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``capstone`` console script."""
    parser = argparse.ArgumentParser(prog="capstone", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="start, stop or inspect the embedded Postgres")
    db.add_argument("action", choices=["start", "stop", "status", "uri"])
    args = parser.parse_args(argv)
    if args.command == "db":
        return _db(args.action)
    return 2


if __name__ == "__main__":
    sys.exit(main())
