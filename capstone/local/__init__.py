"""Local tooling, never imported by the runtime: the embedded Postgres and the demo corpus.

What a worker, the triggerer or the dag-processor imports lives one level up (``capstone``);
this package serves the local set-up only (``make demo``, ``make test``, the benchmarks).
"""
