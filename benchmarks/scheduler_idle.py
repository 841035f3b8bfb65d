"""What a shorter ``[scheduler] scheduler_idle_sleep_time`` costs an idle scheduler.

The local stack (one collection, no runs) is started once per value; after ``--settle`` seconds,
the CPU time of the scheduler's process tree (``/proc``) is read twice, ``--window`` seconds apart.
Printed: the share of one core each value costs, and the ratio to the first value (Airflow's
default, 1 s). What the shorter sleep buys is measured by ``peer_sync.py --airflow-env``.

    .venv/bin/python benchmarks/scheduler_idle.py [--sleeps 1 0.2] [--settle 45] [--window 90] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import BENCH_DATA, BENCH_DATABASE, bench_dsn, machine_summary, parse_with_smoke

from dag_factory.local.stack import AirflowStack

WORK = BENCH_DATA / "scheduler_idle"


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system, in clock ticks from ``/proc``) of ``root`` and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    seconds: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        seconds[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    total, pending = 0.0, [root]
    while pending:
        pid = pending.pop()
        total += seconds.get(pid, 0.0)
        pending.extend(children.get(pid, []))
    return total


def idle_share(sleep: str, settle: float, window: float) -> float:
    """The share of one core the idle scheduler uses with ``scheduler_idle_sleep_time`` = ``sleep``."""
    configs = Path(tempfile.mkdtemp(prefix="configs-", dir=WORK))
    (configs / "idle_probe.yaml").write_text(
        "collection: idle_probe\nsource:\n  asset: idle_probe.enriched\n"
    )
    stack = AirflowStack(
        home=WORK / "airflow",
        api_port=int(os.environ.get("BENCH_API_PORT", 28091)),
        configs=configs,
        metadata_db="airflow_bench_scheduler_idle",
        vector_db=BENCH_DATABASE,
        extra_env={"AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": sleep},
    )
    stack.drop_metadata_db()
    with stack:
        time.sleep(settle)
        scheduler = stack.processes["scheduler"].pid
        before, started = tree_cpu_seconds(scheduler), time.monotonic()
        time.sleep(window)
        return (tree_cpu_seconds(scheduler) - before) / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sleeps", nargs="+", default=["1", "0.2"], help="values to compare, the baseline first"
    )
    parser.add_argument("--settle", type=float, default=45.0, help="seconds after start-up before measuring")
    parser.add_argument("--window", type=float, default=90.0, help="seconds measured")
    args = parse_with_smoke(parser, {"settle": 5.0, "window": 5.0}, argv)
    print(machine_summary(), flush=True)
    bench_dsn()  # the embedded Postgres the stack's metadata DB lives in
    WORK.mkdir(parents=True, exist_ok=True)
    shares = {}
    for sleep in args.sleeps:
        shares[sleep] = idle_share(sleep, args.settle, args.window)
        print(f"scheduler_idle_sleep_time {sleep}: {shares[sleep]:.1%} of a core while idle", flush=True)
    baseline = shares[args.sleeps[0]]
    for sleep in args.sleeps[1:]:
        ratio = shares[sleep] / baseline if baseline else float("inf")
        print(f"idle scheduler CPU, {sleep} s / {args.sleeps[0]} s: {ratio:.1f}")


if __name__ == "__main__":
    main()
