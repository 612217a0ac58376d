"""Hot/cold partitioning: moves are invisible to readers, retention, bad input, crash recovery.

The exactly-once checks count rows and distinct ``event_id`` through the view: a message seen
twice makes ``count(*)`` exceed the expected total, a message lost makes it fall short.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
import trio

from symbiote.actors import _partition as part
from symbiote.actors.database import Database
from symbiote.actors.maintenance import (
    ListPeriods,
    Maintenance,
    MaintenanceReport,
    MaintenanceSettings,
    MovePeriod,
    RunMaintenance,
)
from symbiote.runtime import ChildSpec, SupervisorSpec, open_supervisor
from symbiote.schema.ddl import MESSAGES_DDL
from symbiote.schema.errors import BadArgument, NotFound, PeriodOpen

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests/actors/partition_child.py"
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
HOURS = 24 * 120  # one message an hour from 2025-01-01: four months
TENANTS = 5


def hot_ddl() -> list[str]:
    return [
        s.replace("CREATE TABLE messages", "CREATE TABLE messages_hot")
        .replace("ON messages (", "ON messages_hot (")
        .replace("INDEX messages_", "INDEX messages_hot_")
        for s in MESSAGES_DDL
    ]


def make_db(path: Path, rows: int = HOURS) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(path))
    for statement in hot_ddl():
        con.execute(statement)
    con.execute(
        "INSERT INTO messages_hot (event_id, tenant_id, source, thread_id, msg_id, ts,"
        " author_raw, author_uuid, text, attrs)"
        " SELECT 'e' || range, 'tenant/' || (range % ?), 'test', 'th' || (range % 17),"
        " range::VARCHAR, TIMESTAMPTZ '2025-01-01' + to_hours(range), 'A', 'u' || (range % 7),"
        " 'hello ' || range, '{\"n\": 1}' FROM range(?)",
        [TENANTS, rows],
    )
    return con


def seen(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    row = con.execute("SELECT count(*), count(DISTINCT event_id) FROM messages").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.fixture
def store(tmp_path: Path) -> tuple[duckdb.DuckDBPyConnection, part.PartitionSpec]:
    con = make_db(tmp_path / "db.duckdb")
    spec = part.PartitionSpec(archive_dir=tmp_path / "archive")
    part.ensure_partitioning(con, spec)
    return con, spec


@pytest.mark.parametrize("tenant_dirs", [False, True])
def test_readers_see_every_message_once_during_moves(tmp_path: Path, tenant_dirs: bool) -> None:
    con = make_db(tmp_path / "db.duckdb")
    spec = part.PartitionSpec(archive_dir=tmp_path / "archive", tenant_dirs=tenant_dirs)
    part.ensure_partitioning(con, spec)
    stop = threading.Event()
    reads: list[int] = []
    errors: list[str] = []

    def reader() -> None:
        cur = con.cursor()  # its own connection on the same instance, as a reader actor's
        n = 0
        try:
            while not stop.is_set():
                got = seen(cur)
                if got != (HOURS, HOURS):
                    errors.append(f"saw {got}")
                n += 1
        finally:
            cur.close()
            reads.append(n)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for p in ("2025-01", "2025-02", "2025-03"):
            part.archive_period(con, spec, p, now=NOW)
        # A correction swaps in a new generation: the same commit, seen by the same readers.
        part.correct_archived(
            con, spec, "e5", {"text": "fixed"}, period="2025-01", tenant="tenant/0", now=NOW
        )
        part.archive_period(con, spec, "2025-04", now=NOW)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    assert sum(reads) >= 20, reads  # many reads really overlapped the moves
    assert seen(con) == (HOURS, HOURS)
    hot = con.execute("SELECT count(*) FROM messages_hot").fetchone()
    assert hot == (0,)
    assert con.execute("SELECT text FROM messages WHERE event_id = 'e5'").fetchall() == [("fixed",)]


def test_late_rows_are_merged_and_archived_keys_stay_unique(
    store: tuple[duckdb.DuckDBPyConnection, part.PartitionSpec],
) -> None:
    con, spec = store
    part.archive_period(con, spec, "2025-01", now=NOW)
    con.execute(
        "INSERT INTO messages_hot SELECT * REPLACE ('late-' || event_id AS event_id)"
        " FROM messages WHERE ts < '2025-01-01 05:00:00+00'"
    )
    assert seen(con) == (HOURS + 5, HOURS + 5)
    candidates = pa.table(
        {
            "event_id": ["e1", "e2000", "new"],
            "ts": pa.array(
                [dt.datetime(2025, 1, 1, 1, tzinfo=dt.UTC)] * 3, pa.timestamp("us", tz="UTC")
            ),
            "tenant_id": ["tenant/1", "tenant/0", "tenant/1"],
        }
    )
    assert part.archived_duplicates(con, spec, candidates) == {"e1"}
    merged = part.archive_period(con, spec, "2025-01", now=NOW)
    assert (merged.rows, merged.gen, merged.total_rows) == (5, 2, 744 + 5)
    assert seen(con) == (HOURS + 5, HOURS + 5)
    again = part.archive_period(con, spec, "2025-01", now=NOW)  # nothing late: a no-op
    assert (again.rows, again.gen) == (0, 2)
    # The superseded generation stays until its delay has passed, then goes.
    assert spec.gen_dir(part.Period(2025, 1), 1).exists()
    assert part.collect_garbage(con, spec, now=NOW + dt.timedelta(hours=1)) == 1
    assert not spec.gen_dir(part.Period(2025, 1), 1).exists()
    assert seen(con) == (HOURS + 5, HOURS + 5)


def test_retention(store: tuple[duckdb.DuckDBPyConnection, part.PartitionSpec]) -> None:
    con, spec = store
    part.archive_period(con, spec, "2025-01", now=NOW)
    part.archive_period(con, spec, "2025-02", now=NOW)
    # An archived month, in one call; its files go at once with purge.
    dropped = part.drop_period(con, spec, "2025-01", now=NOW, purge=True)
    assert (dropped.hot_rows, dropped.archived_rows) == (0, 744)
    assert not spec.month_dir(part.Period(2025, 1)).exists()
    # One tenant of an archived month.
    one = part.drop_period(con, spec, "2025-02", tenant="tenant/3", now=NOW)
    assert one.archived_rows == 672 // TENANTS + (1 if 672 % TENANTS > 3 else 0)
    # A month still hot (never moved).
    hot = part.drop_period(con, spec, "2025-03", now=NOW)
    assert (hot.hot_rows, hot.archived_rows) == (744, 0)
    total = HOURS - 744 - one.archived_rows - 744
    assert seen(con) == (total, total)
    assert [i.period for i in part.list_periods(con, spec)] == ["2025-02", "2025-04"]
    assert con.execute(
        "SELECT count(*) FROM messages WHERE tenant_id = 'tenant/3' AND ts < '2025-03-01'"
    ).fetchone() == (0,)


def test_bad_input_deletes_nothing(
    store: tuple[duckdb.DuckDBPyConnection, part.PartitionSpec],
) -> None:
    con, spec = store
    part.archive_period(con, spec, "2025-01", now=NOW)
    before = seen(con)
    with pytest.raises(NotFound) as missing:
        part.drop_period(con, spec, "2019-05", now=NOW)
    assert missing.value.field == "period"
    with pytest.raises(NotFound) as tenant:
        part.drop_period(con, spec, "2025-01", tenant="nobody", now=NOW)
    assert tenant.value.field == "tenant"
    with pytest.raises(NotFound):
        part.drop_period(con, spec, "2025-03", tenant="nobody", now=NOW)
    # The month that is still being written (and one inside its grace period).
    with pytest.raises(PeriodOpen):
        part.drop_period(con, spec, "2025-04", now=dt.datetime(2025, 4, 20, tzinfo=dt.UTC))
    with pytest.raises(PeriodOpen):
        part.archive_period(con, spec, "2025-03", now=dt.datetime(2025, 4, 1, 12, tzinfo=dt.UTC))
    for bad in ("2025-13", "25-01", "", None, 202501):
        with pytest.raises(BadArgument) as malformed:
            part.drop_period(con, spec, bad, now=NOW)  # type: ignore[arg-type]
        assert malformed.value.field == "period"
    with pytest.raises(BadArgument):
        part.drop_period(con, spec, "2025-01", tenant="", now=NOW)
    with pytest.raises(NotFound):
        part.correct_archived(con, spec, "nope", {"text": "x"}, period="2025-01", tenant="tenant/0")
    with pytest.raises(BadArgument):
        part.correct_archived(con, spec, "e5", {"ts": "x"}, period="2025-01", tenant="tenant/0")
    with pytest.raises(NotFound):
        part.correct_archived(con, spec, "e5", {"text": "x"}, period="2025-03", tenant="tenant/0")
    with pytest.raises(BadArgument):
        part.PartitionSpec(archive_dir=Path("x"), view="messages; DROP TABLE x")
    assert seen(con) == before
    assert [i.gen for i in part.list_periods(con, spec)][:1] == [1]


@pytest.mark.parametrize("stop", ["journaled", "exported", "renamed", "before_commit", "committed"])
def test_sigkill_mid_move_leaves_every_message_once(tmp_path: Path, stop: str) -> None:
    db = tmp_path / "db.duckdb"
    make_db(db).close()
    archive = tmp_path / "archive"
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(db), str(archive), "2025-02", stop],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        lines = []
        for line in child.stdout:
            lines.append(line.strip())
            if line.strip() in ("paused", "done"):
                break
        assert lines[-1] == "paused", (lines, child.stderr.read() if child.stderr else "")
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    con = duckdb.connect(str(db))
    spec = part.PartitionSpec(archive_dir=archive)
    rolled_back = part.ensure_partitioning(con, spec)
    assert seen(con) == (HOURS, HOURS)
    infos = {i.period: i for i in part.list_periods(con, spec)}
    if stop == "committed":
        assert rolled_back == [] and infos["2025-02"].gen == 1
    else:
        assert rolled_back == ["2025-02"] and infos["2025-02"].gen is None
        tmp = archive / ".tmp"
        assert not tmp.exists() or not any(tmp.iterdir())
    assert part.ensure_partitioning(con, spec) == []  # recovery is idempotent
    part.archive_period(con, spec, "2025-02", now=NOW)  # and the move can be done again
    assert seen(con) == (HOURS, HOURS)
    con.close()


async def test_maintenance_actor_moves_on_schedule(tmp_path: Path) -> None:
    db_path = tmp_path / "db.duckdb"
    make_db(db_path).close()
    db = Database(str(db_path))
    await trio.to_thread.run_sync(db.open)
    spec = part.PartitionSpec(archive_dir=tmp_path / "archive")
    clock = lambda: dt.datetime(2025, 5, 10, tzinfo=dt.UTC)  # noqa: E731
    settings = MaintenanceSettings(interval_s=0.05, keep_hot=1, max_moves_per_round=2)
    tree = SupervisorSpec(
        id="root",
        children=(
            ChildSpec(
                id="maintenance", factory=lambda: Maintenance(db, spec, settings, clock=clock)
            ),
        ),
    )
    try:
        async with open_supervisor(tree) as sup:
            ref = sup.ref("maintenance")
            with trio.fail_after(10):
                while True:  # two scheduled rounds move Jan+Feb, then Mar (Apr stays hot)
                    infos = await ref.ask(ListPeriods(), timeout=5)
                    if [i.gen for i in infos] == [1, 1, 1, None]:
                        break
                    await trio.sleep(0.02)
            report = await ref.ask(RunMaintenance(), timeout=5)
            assert isinstance(report, MaintenanceReport) and report.moved == []
            with pytest.raises(PeriodOpen):
                await ref.ask(MovePeriod(period="2025-05"), timeout=5)  # the current month
            cur = await trio.to_thread.run_sync(db.cursor)
            assert seen(cur) == (HOURS, HOURS)
            cur.close()
    finally:
        await trio.to_thread.run_sync(db.close)
