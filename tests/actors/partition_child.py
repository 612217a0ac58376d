"""Child process for the SIGKILL test: runs one move of a month and stops at a named step.

    python partition_child.py <db_path> <archive_dir> <period> <stop_step>

It prints each step of the move as it is reached (``step <name>``) and, at ``stop_step``,
prints ``paused`` and sleeps until the parent kills it with SIGKILL.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path

import duckdb

from symbiote.actors._partition import PartitionSpec, archive_period, ensure_partitioning

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def main() -> None:
    db, archive, period, stop = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    con = duckdb.connect(db)
    spec = PartitionSpec(archive_dir=archive)
    ensure_partitioning(con, spec)

    def hook(step: str) -> None:
        print(f"step {step}", flush=True)
        if step == stop:
            print("paused", flush=True)
            time.sleep(60)  # the parent kills us here

    archive_period(con, spec, period, now=NOW, hook=hook)
    print("done", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    main()
