"""``python -m capstone``: the same command line as ``capstone``."""

from __future__ import annotations

import sys

from capstone.cli import main

sys.exit(main())
