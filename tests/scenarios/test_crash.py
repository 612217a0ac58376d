"""Kill -9 a process in the middle of ingesting; every acknowledged write must survive.

A child process ingests at well over 1,000 messages/s and logs each acknowledged event_id;
the parent SIGKILLs it at a random moment, reopens the database itself, and checks that every
acknowledged id is there exactly once and the file opens cleanly. Short in the default suite,
>= 10 cycles with ``--full``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[2]


def _read_acks(log: Path) -> list[tuple[str, float]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            event_id, at = line.rstrip("\n").split("\t")
            out.append((event_id, float(at)))
    return out


def _wait_for_acks(log: Path, proc: subprocess.Popen[bytes], count: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while len(_read_acks(log)) < count:
        assert proc.poll() is None, (
            f"child exited early: {proc.stderr.read().decode() if proc.stderr else ''}"
        )
        assert time.monotonic() < deadline, "child acknowledged nothing in time"
        time.sleep(0.02)


def test_acknowledged_writes_survive_sigkill(tmp_path: Path, full_run: bool) -> None:
    cycles = 12 if full_run else 4
    rnd = random.Random(1234)
    db_path = tmp_path / "crash.duckdb"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cycle in range(cycles):
        log = tmp_path / f"acks-{cycle}.log"
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests/scenarios/crash_child.py"),
                str(db_path),
                str(log),
                str(cycle),
            ],
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_for_acks(log, proc, 1, limit_s=60)
            time.sleep(rnd.uniform(0.2, 0.8))  # a random moment mid-ingest
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        acks = _read_acks(log)
        times = [at for _, at in acks]
        rate = len(acks) / max(times[-1] - times[0], 1e-3)
        assert rate >= 1000, f"cycle {cycle}: child ingested only {rate:.0f} msg/s"

        # Reopen the killed database in this process: it must open cleanly and hold every
        # acknowledged id exactly once.
        con = duckdb.connect(str(db_path))
        try:
            acked = {event_id for event_id, _ in acks}
            con.register("acked", pa.table({"event_id": sorted(acked)}))
            missing = con.execute(
                "SELECT count(*) FROM (SELECT DISTINCT event_id FROM acked) a "
                "ANTI JOIN messages m USING (event_id)"
            ).fetchone()
            dupes = con.execute(
                "SELECT count(*) FROM (SELECT event_id FROM messages"
                " GROUP BY event_id HAVING count(*) > 1)"
            ).fetchone()
        finally:
            con.close()
        assert missing == (0,), (
            f"cycle {cycle}: {missing[0] if missing else '?'} acknowledged ids lost"
        )
        assert dupes == (0,), f"cycle {cycle}: duplicated event_ids"
