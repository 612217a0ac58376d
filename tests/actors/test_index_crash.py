"""SIGKILL a process while its index is being built or while it ingests; the restored index
must answer exactly like one built from scratch from the same database.

The child (``index_child.py``) snapshots every few hundred changes, so a kill lands before,
during or after snapshot saves. The parent then opens the killed database twice in this
process: once as is (newest snapshot + catch-up from the table), once with the snapshot folder
removed (a full rebuild), and compares index size, the live ids and search results.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import numpy as np
import trio

from symbiote.actors._vector import VectorIndex
from symbiote.actors.index import IndexInfo, default_index_dir
from symbiote.runtime import Config, open_runtime
from tests.actors.index_child import config as child_config
from tests.actors.index_data import DIM, chunk_for, vector

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests/actors/index_child.py"
QUERIES = 60
# >= the live chunk count (at most 3,000): both indexes answer exactly, so they must agree.
EF = 4000


def _spawn(mode: str, db: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(CHILD), mode, str(db), str(log)],
        env=env,
        stderr=subprocess.PIPE,
    )


def _wait(cond: Any, proc: subprocess.Popen[bytes], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"child exited early: {err[-2000:]}")
        assert time.monotonic() < deadline, "child made no progress in time"
        time.sleep(0.005)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def _lines(log: Path) -> int:
    return log.read_text().count("\n") if log.exists() else 0


async def _observe(config: Config) -> tuple[IndexInfo, list[list[str]], set[str]]:
    async with open_runtime(config) as rt:
        # The index loads or rebuilds in the background; compare the finished ones.
        info = await rt.wait_index_ready(timeout=120)
        rows = await rt.query("SELECT chunk_id FROM chunks", fmt="records")
        live = {r["chunk_id"] for r in rows}
        results = []
        for i in range(QUERIES):
            results.append((await rt.search(vector(10_000_000 + i), k=10, ef=EF)).chunk_ids)
        # Every live chunk is findable by its own vector, and nothing else is in the index.
        assert info.count == len(live)
    return info, results, live


def _compare_with_rebuild(db: Path) -> IndexInfo:
    config = msgspec.structs.replace(child_config(str(db)), index_snapshot_every_changes=10**9)
    restored, restored_results, live = trio.run(_observe, config)
    assert restored.loaded_snapshot and not restored.rebuilt
    shutil.rmtree(default_index_dir(str(db)) or "", ignore_errors=True)
    scratch, scratch_results, live_again = trio.run(_observe, config)
    assert scratch.rebuilt
    assert live == live_again
    assert (restored.count, restored.highest_seq) == (scratch.count, scratch.highest_seq)
    assert restored_results == scratch_results
    # Deleted chunks never come back: no result names a chunk without a row.
    assert all(set(r) <= live for r in restored_results)
    return restored


def test_index_restored_after_sigkill_during_ingest(tmp_path: Path) -> None:
    rnd = random.Random(4)
    db = tmp_path / "ingest.duckdb"
    log = tmp_path / "acks.log"
    proc = _spawn("ingest", db, log)
    try:
        _wait(lambda: _lines(log) >= 40, proc, limit_s=60)
        time.sleep(rnd.uniform(0.05, 0.4))
    finally:
        _kill(proc)
    info = _compare_with_rebuild(db)
    assert info.count > 0


def test_index_restored_after_sigkill_during_build(tmp_path: Path) -> None:
    db = tmp_path / "build.duckdb"
    # A database with 12,000 chunk changes (updates and deletes included) and no index yet.
    trio.run(_fill, db, 12_000)
    index_dir = Path(default_index_dir(str(db)) or "")
    assert not index_dir.exists()
    proc = _spawn("build", db, tmp_path / "ready.log")
    try:
        # Kill right after the build's first snapshot: it catches up 100 rows per round and
        # saves every 300 changes, so it is far from done.
        _wait(lambda: (index_dir / "CURRENT.json").exists(), proc, limit_s=60)
    finally:
        _kill(proc)
    manifest = VectorIndex.read_manifest(index_dir)
    with duckdb.connect(str(db), read_only=True) as con:
        row = con.execute("SELECT value FROM symbiote_meta WHERE key = 'chunk_seq'").fetchone()
    assert row is not None and manifest.highest_seq < int(row[0]), "the kill missed the build"
    _compare_with_rebuild(db)


async def _fill(db: Path, n: int) -> None:
    config = msgspec.structs.replace(child_config(str(db)), index_enabled=False)
    async with open_runtime(config) as rt:
        for start in range(0, n, 1000):
            await rt.upsert_chunks([chunk_for(i) for i in range(start, start + 1000)])
            await rt.delete_chunks([chunk_for(start + d * 37).chunk_id for d in range(20)])
    assert np.isfinite(vector(1)).all() and DIM > 0
