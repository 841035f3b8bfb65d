"""``python -m dag_factory``: the same command line as ``dag-factory``."""

from __future__ import annotations

import sys

from dag_factory.cli import main

if __name__ == "__main__":
    sys.exit(main())
