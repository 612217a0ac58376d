"""Hot/cold partitioning of a time-stamped table: recent rows in DuckDB, closed months in Parquet.

The layout chosen in docs/partitioning.md: the writer appends to a *hot* DuckDB table (for
messages, ``messages_hot``, with the unique key and its indexes); closed months are moved to
Hive-partitioned Parquet under ``<archive_dir>/month=YYYY-MM/gen=N/tenant_id=<t>/*.parquet``;
readers query one *view* (``messages``) that is the hot table ``UNION ALL`` the archived
generations listed in a manifest table. Everything here is synchronous code on one DuckDB
connection (the maintenance actor's own cursor); nothing knows about trio.

Why the view lists each archived generation explicitly instead of globbing the archive: a
glob would show a month's files the instant they are renamed into place, while the same rows
are still in the hot table (seen twice). With an explicit list, the new generation becomes
visible in the same transaction that deletes its rows from the hot table, and DuckDB's MVCC
gives every query either the state before that commit or after it, never a mix.

A move (:func:`archive_period`) is, in order:

1. a *job* row is committed to ``symbiote_partition_jobs`` naming the temporary and final
   directories (the journal);
2. one transaction T begins; ``COPY`` writes the month's hot rows (T's snapshot) into the
   temporary directory, split by tenant; the files and directories are fsynced and the
   directory is renamed to its final ``gen=N`` name (one atomic rename);
3. still in T: the month's rows are deleted from the hot table (the same snapshot, so
   exactly the exported rows), the manifest row is upserted, the view is rebuilt, the job row
   is deleted, the superseded generation (if any) is queued for deletion; COMMIT.

Recovery (:func:`recover`, run at start) reads the journal: a job row that is still there
means T never committed, so its directories are deleted and the job row removed; the hot rows
were never deleted. A job row that is gone means T committed and its files are referenced by
the manifest. Either way every row is visible exactly once, and running recovery twice is a
no-op. Rows that arrive late for an archived month land in the hot table and are still seen
once; the next move of that month merges them into a new generation (old files hard-linked,
new rows in a new file).

Superseded generations and dropped months are not deleted at once: a query that bound the
old view may still be about to open those files. They go to ``symbiote_partition_garbage``
with a not-before time and :func:`collect_garbage` removes them later.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

import duckdb
import msgspec
import pyarrow as pa

from symbiote.schema.ddl import PARTITION_DDL
from symbiote.schema.errors import BadArgument, NotFound, PeriodOpen, QueryError
from symbiote.schema.records import CORRECTABLE_MESSAGE_FIELDS

__all__ = [
    "BOOKKEEPING_DDL",
    "CORRECTABLE",
    "ArchiveFence",
    "DropResult",
    "MoveResult",
    "PartitionSpec",
    "Period",
    "PeriodInfo",
    "archive_period",
    "archived_duplicates",
    "collect_garbage",
    "correct_archived",
    "drop_period",
    "ensure_partitioning",
    "list_periods",
    "locate_archived",
    "movable_periods",
    "rebuild_view",
    "recover",
]

log = logging.getLogger("symbiote.partition")

_IDENT: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_PERIOD: Final = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
_GEN_DIR: Final = re.compile(r"^gen=(\d{1,9})$")
_UTC: Final = _dt.UTC

#: Bookkeeping tables, shared by every partitioned relation of the file (keyed by relation).
#: The text lives in :mod:`symbiote.schema.ddl` (migration 3 creates them); one source of truth.
BOOKKEEPING_DDL: Final = PARTITION_DDL


# --------------------------------------------------------------------------------------------
# values


@dataclass(frozen=True, slots=True, order=True)
class Period:
    """One calendar month in UTC, the unit of moves and retention (``"2025-11"``)."""

    year: int
    month: int

    @classmethod
    def parse(cls, text: object) -> Period:
        """``"YYYY-MM"`` as a Period; anything else is a :class:`BadArgument` on ``period``."""
        if isinstance(text, Period):
            return text
        m = _PERIOD.match(text) if isinstance(text, str) else None
        if m is None:
            raise BadArgument(f"expected 'YYYY-MM', got {text!r:.40}", field="period")
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def of(cls, ts: _dt.datetime) -> Period:
        """The month (in UTC) that contains the aware instant ``ts``."""
        u = ts.astimezone(_UTC)
        return cls(u.year, u.month)

    @property
    def start(self) -> _dt.datetime:
        """First instant of the month (inclusive)."""
        return _dt.datetime(self.year, self.month, 1, tzinfo=_UTC)

    @property
    def end(self) -> _dt.datetime:
        """First instant of the next month (exclusive)."""
        return self.next().start

    def next(self) -> Period:
        """The following month."""
        return Period(self.year + self.month // 12, self.month % 12 + 1)

    def prev(self) -> Period:
        """The preceding month."""
        return Period(self.year - (self.month == 1), (self.month - 2) % 12 + 1)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


class ArchiveFence:
    """An upper bound on the end of the newest archived month, shared in one process.

    The writer must not look at the archive on every group (a query costs a few hundred
    microseconds of a commit of a few milliseconds), only when a group holds rows of a month
    that may be archived. This fence tells it which: a move raises it to the month's end
    *before* its transaction commits, so any writer transaction that can see the move's
    commit reads a fence at least that high (the writer reads it after its first statement,
    when its snapshot is fixed). It never goes down: a rolled-back move or a dropped month
    only costs the writer an unneeded check. Reads and writes of one attribute are atomic
    under the GIL; the lock only orders the compare-and-raise.
    """

    __slots__ = ("_end", "_lock")

    def __init__(self) -> None:
        self._end: _dt.datetime | None = None
        self._lock = threading.Lock()

    @property
    def end(self) -> _dt.datetime | None:
        """No row at or after this instant is archived (None: nothing is archived)."""
        return self._end

    def raise_to(self, end: _dt.datetime) -> None:
        """Make sure the fence is at least ``end``."""
        with self._lock:
            if self._end is None or end > self._end:
                self._end = end

    def load(self, con: duckdb.DuckDBPyConnection, spec: PartitionSpec) -> None:
        """Raise the fence to the newest month in the manifest (at start, before any write)."""
        newest = _one(
            con,
            "SELECT max(period) FROM symbiote_partitions WHERE relation = ?",
            [spec.view],
        )
        if newest is not None:
            self.raise_to(Period.parse(newest).end)


@dataclass(frozen=True, slots=True)
class PartitionSpec:
    """Where one partitioned relation lives and the rules of its maintenance.

    ``grace`` is how long after its end a month may still receive late writes: a month is
    *closed* (movable, droppable) only once ``period.end + grace <= now``.
    ``garbage_delay`` must exceed the longest query deadline: files of a superseded view stay
    that long so a query that bound the old view can still read them.
    """

    archive_dir: Path
    hot_table: str = "messages_hot"
    view: str = "messages"
    ts_column: str = "ts"
    tenant_column: str = "tenant_id"
    key_column: str = "event_id"
    grace: _dt.timedelta = _dt.timedelta(days=2)
    garbage_delay: _dt.timedelta = _dt.timedelta(minutes=10)
    #: Rows per Parquet row group: small enough for min/max pruning inside a month.
    row_group_rows: int = 122_880
    #: One directory per tenant inside a month (``tenant_id=<t>/``) instead of one file per
    #: month sorted by tenant. Per-tenant drops get cheaper, but every query through the view
    #: pays to list and bind each file: with many small tenants that cost grows with history
    #: (docs/partitioning.md), so the default is one file per month.
    tenant_dirs: bool = False
    #: Shared with the writer of the same process; see :class:`ArchiveFence`.
    fence: ArchiveFence = field(default_factory=ArchiveFence, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("hot_table", "view", "ts_column", "tenant_column", "key_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _IDENT.match(value):
                raise BadArgument(f"not a plain identifier: {value!r:.40}", field=name)
        if self.hot_table == self.view:
            raise BadArgument("the view must have its own name", field="view")
        if self.grace < _dt.timedelta(0) or self.garbage_delay < _dt.timedelta(0):
            raise BadArgument("durations must not be negative", field="grace")
        object.__setattr__(self, "archive_dir", Path(self.archive_dir).absolute())

    def month_dir(self, period: Period) -> Path:
        """The directory holding every generation of ``period``."""
        return self.archive_dir / f"month={period}"

    def gen_dir(self, period: Period, gen: int) -> Path:
        """The directory of one generation of ``period``."""
        return self.month_dir(period) / f"gen={gen}"


class MoveResult(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`archive_period` did: rows moved out of the hot table into generation ``gen``."""

    period: str
    rows: int
    gen: int
    total_rows: int
    seconds: float


class DropResult(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`drop_period` removed from the view (hot rows and archived rows)."""

    period: str
    tenant: str | None
    hot_rows: int
    archived_rows: int


class PeriodInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One month as the view sees it: rows still hot, rows archived, the generation read."""

    period: str
    hot_rows: int
    archived_rows: int
    gen: int | None


# --------------------------------------------------------------------------------------------
# small helpers


def _q(ident: str) -> str:
    return '"' + ident + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _now(now: _dt.datetime | None) -> _dt.datetime:
    if now is None:
        return _dt.datetime.now(_UTC)
    if now.tzinfo is None:
        raise BadArgument("must be timezone-aware", field="now")
    return now


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Any:
    row = con.execute(sql, params).fetchone()
    return None if row is None else row[0]


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (bottom-up), then ``root`` itself."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, str]]:
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns()"
        " WHERE schema_name = 'main' AND table_name = ? ORDER BY column_index",
        [table],
    ).fetchall()
    if not rows:
        raise NotFound(f"no table {table!r}", field="hot_table")
    return [(str(n), str(t)) for n, t in rows]


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        # A failed COMMIT already ended the transaction.
        pass


def _manifest(con: duckdb.DuckDBPyConnection, spec: PartitionSpec) -> dict[Period, tuple[int, int]]:
    rows = con.execute(
        "SELECT period, gen, rows FROM symbiote_partitions WHERE relation = ? ORDER BY period",
        [spec.view],
    ).fetchall()
    return {Period.parse(p): (int(g), int(n)) for p, g, n in rows}


def _parquet_source(spec: PartitionSpec, globs: Iterable[str]) -> str:
    globs = list(globs)
    if not spec.tenant_dirs:
        # The files hold every column: name them now instead of having each query expand
        # one glob per month and parse hive paths. At 131 archived months that cost a
        # recent-window query 3-4 ms, which grew with the archive (docs/partitioning.md).
        files = [str(f) for g in globs for f in sorted(Path(g).parent.glob(Path(g).name))]
        if files:
            listed = ", ".join(_lit(f) for f in files)
            return f"read_parquet([{listed}], hive_partitioning = false)"
    listed = ", ".join(_lit(g) for g in globs)
    return f"read_parquet([{listed}], hive_partitioning = true, hive_types_autocast = false)"


def _period_glob(spec: PartitionSpec, period: Period, gen: int) -> str:
    if spec.tenant_dirs:
        return str(spec.gen_dir(period, gen) / "*" / "*.parquet")
    return str(spec.gen_dir(period, gen) / "*.parquet")


def _plain_source(glob: str) -> str:
    """The files of one generation as stored (no hive columns), for rewrites."""
    return f"read_parquet({_lit(glob)}, hive_partitioning = false)"


# --------------------------------------------------------------------------------------------
# setup, view, recovery


def rebuild_view(con: duckdb.DuckDBPyConnection, spec: PartitionSpec) -> None:
    """(Re)define the view from the manifest; call it inside the transaction that changed it.

    The archived side is filtered with ``ts < <end of the last archived month>``: always true
    for archived rows, and it lets DuckDB's optimizer drop the whole Parquet scan for queries
    on recent data (a contradiction with ``ts >= <recent>`` folds to an empty result).
    """
    cols = _columns(con, spec.hot_table)
    names = ", ".join(_q(n) for n, _ in cols)
    sql = f"CREATE OR REPLACE VIEW {_q(spec.view)} AS SELECT {names} FROM {_q(spec.hot_table)}"
    manifest = _manifest(con, spec)
    if manifest:
        # Cast each archived column to the hot table's type: Parquet has no JSON type, hive
        # partition values are strings, and UNION ALL is positional.
        casts = ", ".join(f"CAST({_q(n)} AS {t}) AS {_q(n)}" for n, t in cols)
        globs = [_period_glob(spec, p, g) for p, (g, _) in manifest.items()]
        last_end = max(manifest).end.isoformat()
        sql += (
            f" UNION ALL SELECT {casts} FROM {_parquet_source(spec, globs)}"
            f" WHERE {_q(spec.ts_column)} < TIMESTAMPTZ {_lit(last_end)}"
        )
    con.execute(sql)


def ensure_partitioning(con: duckdb.DuckDBPyConnection, spec: PartitionSpec) -> list[str]:
    """Create the bookkeeping tables, finish interrupted work, and (re)create the view.

    Idempotent; run it once at start on the maintenance connection, after the hot table exists.
    Returns the periods whose interrupted move was rolled back.
    """
    spec.archive_dir.mkdir(parents=True, exist_ok=True)
    con.execute("BEGIN TRANSACTION")
    try:
        for statement in BOOKKEEPING_DDL:
            con.execute(statement)
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise
    rolled_back = recover(con, spec)
    spec.fence.load(con, spec)
    con.execute("BEGIN TRANSACTION")
    try:
        rebuild_view(con, spec)
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise
    return rolled_back


def recover(con: duckdb.DuckDBPyConnection, spec: PartitionSpec) -> list[str]:
    """Roll back every job that did not commit: delete its directories and its journal row.

    A job row exists only until its transaction commits (the commit deletes it), so a job row
    found here belongs to a move that died before COMMIT: its rows are still in the hot table
    and the manifest does not reference its files. Safe to run any number of times.
    """
    jobs = con.execute(
        "SELECT period, kind, temp_dir, final_dir FROM symbiote_partition_jobs WHERE relation = ?",
        [spec.view],
    ).fetchall()
    manifest = _manifest(con, spec)
    done: list[str] = []
    for period_text, kind, temp_dir, final_dir in jobs:
        period = Period.parse(period_text)
        referenced = manifest.get(period)
        final = Path(final_dir)
        if referenced is not None and spec.gen_dir(period, referenced[0]) == final:
            # Cannot happen with the protocol above (the commit deletes the job); if a file
            # was edited by hand, never delete what the view reads.
            log.error("job for %s points at the live generation; keeping its files", period)
        else:
            shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
        con.execute(
            "DELETE FROM symbiote_partition_jobs WHERE relation = ? AND period = ?",
            [spec.view, period_text],
        )
        log.warning("rolled back an interrupted %s of %s", kind, period)
        done.append(str(period))
    # Temporary directories without a job (a crash between mkdir and the journal cannot
    # happen, but a crash during rmtree can leave a half-deleted one).
    tmp_root = spec.archive_dir / ".tmp"
    if tmp_root.is_dir():
        live = {str(t) for _, _, t, _ in jobs}
        for child in tmp_root.iterdir():
            if str(child) not in live:
                shutil.rmtree(child, ignore_errors=True)
    return done


# --------------------------------------------------------------------------------------------
# the job machinery: journal, build in a temp dir, rename, commit


def _next_gen(
    spec: PartitionSpec, period: Period, manifest: Mapping[Period, tuple[int, int]]
) -> int:
    gens = [manifest[period][0]] if period in manifest else [0]
    month = spec.month_dir(period)
    if month.is_dir():
        # Leftover directories (garbage not yet collected) keep their numbers: never reuse one.
        for child in month.iterdir():
            m = _GEN_DIR.match(child.name)
            if m:
                gens.append(int(m.group(1)))
    return max(gens) + 1


Hook = Callable[[str], None]


def _noop(step: str) -> None:
    del step


def _run_job(
    con: duckdb.DuckDBPyConnection,
    spec: PartitionSpec,
    period: Period,
    kind: str,
    now: _dt.datetime,
    build: Callable[[Path, Path | None], int],
    finish: Callable[[], None],
    hook: Hook,
) -> tuple[int, int]:
    """Run one journaled rewrite of ``period``; return (rows built, new generation).

    ``build(temp_dir, old_gen_dir)`` writes the new generation into ``temp_dir`` inside the
    job's transaction and returns its row count; ``finish()`` runs in the same transaction
    after the rename (e.g. deleting the moved hot rows). The manifest, the view, the journal
    and the garbage list are updated here, in that same transaction.
    """
    manifest = _manifest(con, spec)
    gen = _next_gen(spec, period, manifest)
    old = manifest.get(period)
    old_dir = spec.gen_dir(period, old[0]) if old is not None else None
    temp = spec.archive_dir / ".tmp" / f"{period}-{uuid.uuid4().hex[:12]}"
    final = spec.gen_dir(period, gen)
    # Before anything can commit: the writer checks incoming rows of this month against the
    # archive from now on (see ArchiveFence).
    spec.fence.raise_to(period.end)
    # 1. The journal row, committed on its own: from here on a crash is rolled back by recover.
    try:
        con.execute(
            "INSERT INTO symbiote_partition_jobs VALUES (?, ?, ?, ?, ?, ?)",
            [spec.view, str(period), kind, str(temp), str(final), now],
        )
    except duckdb.ConstraintException:
        raise PeriodOpen(
            f"another move of {period} is in progress (or was interrupted: run recover)",
            field="period",
        ) from None
    hook("journaled")
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            temp.parent.mkdir(parents=True, exist_ok=True)
            rows = build(temp, old_dir)
            hook("exported")
            _fsync_tree(temp)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(temp, final)
            _fsync_dir(final.parent)
            _fsync_dir(spec.archive_dir)
            hook("renamed")
            finish()
            total = rows
            con.execute(
                "INSERT INTO symbiote_partitions VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (relation, period) DO UPDATE"
                " SET gen = excluded.gen, rows = excluded.rows, updated_at = excluded.updated_at",
                [spec.view, str(period), gen, total, now],
            )
            if old_dir is not None:
                _queue_garbage(con, old_dir, now + spec.garbage_delay)
            rebuild_view(con, spec)
            con.execute(
                "DELETE FROM symbiote_partition_jobs WHERE relation = ? AND period = ?",
                [spec.view, str(period)],
            )
            hook("before_commit")
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
    except BaseException:
        # Not a crash (that is recover's job): undo the files and the journal row now.
        try:
            recover(con, spec)
        except Exception:  # pragma: no cover - keep the original error
            log.exception(
                "cleanup after a failed %s of %s failed; recover() at restart", kind, period
            )
        raise
    hook("committed")
    return total, gen


def _queue_garbage(con: duckdb.DuckDBPyConnection, path: Path, not_before: _dt.datetime) -> None:
    con.execute(
        "INSERT INTO symbiote_partition_garbage VALUES (?, ?) ON CONFLICT (path) DO NOTHING",
        [str(path), not_before],
    )


def _link_tree(src: Path, dst: Path, skip_tenant_dirs: frozenset[str] = frozenset()) -> None:
    """Hard-link every file of ``src`` into ``dst`` (archived files are never modified)."""
    for tenant_dir in sorted(src.iterdir()):
        if tenant_dir.is_file():
            os.link(tenant_dir, dst / tenant_dir.name)
            continue
        if tenant_dir.name in skip_tenant_dirs:
            continue
        (dst / tenant_dir.name).mkdir(parents=True, exist_ok=True)
        for f in tenant_dir.iterdir():
            os.link(f, dst / tenant_dir.name / f.name)


# --------------------------------------------------------------------------------------------
# moves


def _check_closed(spec: PartitionSpec, period: Period, now: _dt.datetime) -> None:
    if period.end + spec.grace > now:
        raise PeriodOpen(
            f"{period} may still receive writes until {(period.end + spec.grace).isoformat()}",
            field="period",
        )


def _hot_count(
    con: duckdb.DuckDBPyConnection, spec: PartitionSpec, period: Period, tenant: str | None = None
) -> int:
    sql = (
        f"SELECT count(*) FROM {_q(spec.hot_table)}"
        f" WHERE {_q(spec.ts_column)} >= ? AND {_q(spec.ts_column)} < ?"
    )
    params: list[Any] = [period.start, period.end]
    if tenant is not None:
        sql += f" AND {_q(spec.tenant_column)} = ?"
        params.append(tenant)
    return int(_one(con, sql, params) or 0)


def archive_period(
    con: duckdb.DuckDBPyConnection,
    spec: PartitionSpec,
    period: Period | str,
    *,
    now: _dt.datetime | None = None,
    hook: Hook = _noop,
) -> MoveResult:
    """Move the hot rows of a closed month to Parquet, atomically for every reader.

    A month that is already archived gets a new generation holding its old files (hard
    links) plus the rows that arrived late; with no late rows this is a no-op.

    Raises:
        BadArgument: ``period`` is not ``YYYY-MM``.
        PeriodOpen: the month may still receive writes (``end + grace > now``) or another
            move of it is in progress.
        NotFound: the month has no rows at all.
    """
    p = Period.parse(period)
    at = _now(now)
    _check_closed(spec, p, at)
    t0 = time.perf_counter()
    manifest = _manifest(con, spec)
    hot = _hot_count(con, spec, p)
    if hot == 0:
        if p in manifest:
            gen, total = manifest[p]
            return MoveResult(period=str(p), rows=0, gen=gen, total_rows=total, seconds=0.0)
        raise NotFound(f"no rows in {p}", field="period")
    ts, tenant = _q(spec.ts_column), _q(spec.tenant_column)
    where = f"{ts} >= ? AND {ts} < ?"
    bounds = [p.start, p.end]
    moved = [0]
    old_total = manifest[p][1] if p in manifest else 0

    def build(temp: Path, old_dir: Path | None) -> int:
        # Inside the job transaction: COPY and the DELETE in finish() see one snapshot, so
        # exactly the rows exported are deleted; a late row committed meanwhile stays hot.
        fresh = temp if old_dir is None else temp.with_name(temp.name + "-new")
        if spec.tenant_dirs:
            target, split = str(fresh), f" PARTITION_BY ({tenant}),"
        else:
            fresh.mkdir(parents=True)
            target, split = str(fresh / "data_0.parquet"), ""
        # Sorted by tenant then time: row-group min/max then prune on both inside the file.
        con.execute(
            f"COPY (SELECT * FROM {_q(spec.hot_table)} WHERE {where} ORDER BY {tenant}, {ts})"
            f" TO {_lit(target)} (FORMAT parquet,{split}"
            f" ROW_GROUP_SIZE {int(spec.row_group_rows)}, COMPRESSION zstd)",
            bounds,
        )
        moved[0] = int(
            _one(con, f"SELECT count(*) FROM {_q(spec.hot_table)} WHERE {where}", bounds)
        )
        if old_dir is not None:
            # Merge: the old generation by hard links, the late rows as one more file each.
            temp.mkdir(parents=True)
            _link_tree(old_dir, temp)
            suffix = uuid.uuid4().hex[:8]
            for entry in fresh.iterdir():
                if entry.is_file():
                    os.rename(entry, temp / f"late-{suffix}-{entry.name}")
                    continue
                (temp / entry.name).mkdir(exist_ok=True)
                for f in entry.iterdir():
                    os.rename(f, temp / entry.name / f"late-{suffix}-{f.name}")
            shutil.rmtree(fresh)
        return old_total + moved[0]

    def finish() -> None:
        con.execute(f"DELETE FROM {_q(spec.hot_table)} WHERE {where}", bounds)

    total, gen = _run_job(con, spec, p, "move", at, build, finish, hook)
    seconds = time.perf_counter() - t0
    log.info("archived %s: %d rows to gen %d in %.3f s", p, moved[0], gen, seconds)
    return MoveResult(period=str(p), rows=moved[0], gen=gen, total_rows=total, seconds=seconds)


def movable_periods(
    con: duckdb.DuckDBPyConnection,
    spec: PartitionSpec,
    *,
    keep_hot: int = 1,
    now: _dt.datetime | None = None,
    limit: int = 12,
) -> list[Period]:
    """Closed months with hot rows, oldest first, leaving the ``keep_hot`` latest months hot.

    At most ``limit`` months (one maintenance round stays bounded).
    """
    at = _now(now)
    newest_cold = Period.of(at)
    for _ in range(max(keep_hot, 0)):
        newest_cold = newest_cold.prev()
    ts = _q(spec.ts_column)
    rows = con.execute(
        f"SELECT DISTINCT strftime({ts} AT TIME ZONE 'UTC', '%Y-%m') AS p"
        f" FROM {_q(spec.hot_table)} WHERE {ts} < ? ORDER BY p LIMIT ?",
        [newest_cold.start, limit],
    ).fetchall()
    out = [Period.parse(r[0]) for r in rows]
    return [p for p in out if p.end + spec.grace <= at]


# --------------------------------------------------------------------------------------------
# retention and corrections


def _archived_tenants(
    con: duckdb.DuckDBPyConnection, spec: PartitionSpec, period: Period, gen: int
) -> dict[str, Path | None]:
    """Tenant value -> its directory in one generation (None when tenants share the file)."""
    if not spec.tenant_dirs:
        glob = _period_glob(spec, period, gen)
        rows = con.execute(
            f"SELECT DISTINCT {_q(spec.tenant_column)} FROM {_plain_source(glob)}"
        ).fetchall()
        return {str(r[0]): None for r in rows}
    out: dict[str, Path | None] = {}
    prefix = spec.tenant_column + "="
    for child in spec.gen_dir(period, gen).iterdir():
        # Hive partition values are URL-escaped by DuckDB's writer.
        if child.is_dir() and child.name.startswith(prefix):
            out[unquote(child.name[len(prefix) :])] = child
    return out


def _rewrite_month(
    con: duckdb.DuckDBPyConnection,
    spec: PartitionSpec,
    old_dir: Path,
    temp: Path,
    select: str,
    params: list[Any],
) -> None:
    """Write ``select`` (over ``{src}``, the old generation's files) as the new month file."""
    src = _plain_source(str(old_dir / "*.parquet"))
    temp.mkdir(parents=True)
    con.execute(
        f"COPY ({select.format(src=src)}"
        f" ORDER BY {_q(spec.tenant_column)}, {_q(spec.ts_column)})"
        f" TO {_lit(str(temp / 'data_0.parquet'))} (FORMAT parquet,"
        f" ROW_GROUP_SIZE {int(spec.row_group_rows)}, COMPRESSION zstd)",
        params,
    )


def drop_period(
    con: duckdb.DuckDBPyConnection,
    spec: PartitionSpec,
    period: Period | str,
    *,
    tenant: str | None = None,
    now: _dt.datetime | None = None,
    purge: bool = False,
    hook: Hook = _noop,
) -> DropResult:
    """Retention in one call: remove a closed month (or one tenant's part of it) from the view.

    The hot rows of the month are deleted and its archived generation is unlisted in one
    transaction; the files become garbage (deleted by :func:`collect_garbage`, or at once
    with ``purge=True`` when no query can still be reading them).

    Raises:
        BadArgument: malformed ``period`` or empty ``tenant``.
        PeriodOpen: the month may still receive writes.
        NotFound: the month has no rows (field ``period``), or the tenant has none in it
            (field ``tenant``). Nothing is deleted.
    """
    p = Period.parse(period)
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise BadArgument("must be a non-empty string", field="tenant")
    at = _now(now)
    _check_closed(spec, p, at)
    manifest = _manifest(con, spec)
    hot = _hot_count(con, spec, p, tenant)
    archived = manifest.get(p)
    tenants: dict[str, Path | None] = {}
    if archived is not None:
        tenants = _archived_tenants(con, spec, p, archived[0])
    # "The month has no rows" is about the month, whatever the tenant: an unknown tenant of
    # a month that still has hot rows is a NotFound on ``tenant``, not on ``period``.
    month_hot = hot if tenant is None or hot else _hot_count(con, spec, p)
    if month_hot == 0 and archived is None:
        raise NotFound(f"no rows in {p}", field="period")
    if tenant is not None and hot == 0 and tenant not in tenants:
        raise NotFound(f"tenant {tenant!r} has no rows in {p}", field="tenant")
    ts = _q(spec.ts_column)
    hot_sql = f"DELETE FROM {_q(spec.hot_table)} WHERE {ts} >= ? AND {ts} < ?"
    hot_params: list[Any] = [p.start, p.end]
    if tenant is not None:
        hot_sql += f" AND {_q(spec.tenant_column)} = ?"
        hot_params.append(tenant)
    archived_rows = 0

    if archived is not None and tenant is not None and tenant in tenants:
        # One tenant out of an archived month: a new generation without its rows.
        gen, total = archived
        tdir = tenants[tenant]
        tq = _q(spec.tenant_column)
        if tdir is not None:
            archived_rows = int(
                _one(con, f"SELECT count(*) FROM {_plain_source(str(tdir / '*.parquet'))}")
            )
        else:
            glob = _period_glob(spec, p, gen)
            archived_rows = int(
                _one(con, f"SELECT count(*) FROM {_plain_source(glob)} WHERE {tq} = ?", [tenant])
            )

        def build(temp: Path, old_dir: Path | None) -> int:
            assert old_dir is not None
            if tdir is not None:  # the other tenants' files are reused as hard links
                temp.mkdir(parents=True)
                _link_tree(old_dir, temp, frozenset({tdir.name}))
            else:
                _rewrite_month(
                    con, spec, old_dir, temp, f"SELECT * FROM {{src}} WHERE {tq} <> ?", [tenant]
                )
            return total - archived_rows

        def finish() -> None:
            con.execute(hot_sql, hot_params)

        _run_job(con, spec, p, "drop-tenant", at, build, finish, hook)
    else:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(hot_sql, hot_params)
            if archived is not None and tenant is None:
                archived_rows = archived[1]
                con.execute(
                    "DELETE FROM symbiote_partitions WHERE relation = ? AND period = ?",
                    [spec.view, str(p)],
                )
                _queue_garbage(con, spec.month_dir(p), at + spec.garbage_delay)
                rebuild_view(con, spec)
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
    if purge:
        collect_garbage(con, spec, force=True)
    log.info(
        "dropped %s%s: %d hot, %d archived rows",
        p,
        f" ({tenant})" if tenant else "",
        hot,
        archived_rows,
    )
    return DropResult(period=str(p), tenant=tenant, hot_rows=hot, archived_rows=archived_rows)


#: Columns a correction may change (the key, the time and the tenant place the row).
CORRECTABLE: Final = CORRECTABLE_MESSAGE_FIELDS


def correct_archived(
    con: duckdb.DuckDBPyConnection,
    spec: PartitionSpec,
    key: str,
    changes: Mapping[str, object],
    *,
    period: Period | str,
    tenant: str,
    now: _dt.datetime | None = None,
    hook: Hook = _noop,
) -> int:
    """Change columns of one archived row: a new generation with that tenant's file rewritten.

    Costs a rewrite of the month's file (with ``tenant_dirs``, of one tenant's file; the
    others are hard-linked). A row still
    in the hot table is corrected with a plain ``UPDATE`` by the writer instead.

    Raises:
        BadArgument: unknown or non-correctable column, malformed period.
        NotFound: the month is not archived, the tenant has no file in it, or no row has
            ``key`` there. Nothing is changed.
    """
    p = Period.parse(period)
    at = _now(now)
    if not changes:
        raise BadArgument("nothing to change", field="changes")
    types = dict(_columns(con, spec.hot_table))
    for name in changes:
        if name not in CORRECTABLE or name not in types:
            raise BadArgument(f"column {name!r:.40} cannot be corrected", field="changes")
    manifest = _manifest(con, spec)
    if p not in manifest:
        raise NotFound(f"{p} is not archived", field="period")
    gen, total = manifest[p]
    tenants = _archived_tenants(con, spec, p, gen)
    if tenant not in tenants:
        raise NotFound(f"tenant {tenant!r} has no rows in {p}", field="tenant")
    tdir = tenants[tenant]
    kq, tq = _q(spec.key_column), _q(spec.tenant_column)
    if tdir is not None:
        src = _plain_source(str(tdir / "*.parquet"))
        found = int(_one(con, f"SELECT count(*) FROM {src} WHERE {kq} = ?", [key]) or 0)
    else:
        src = _plain_source(_period_glob(spec, p, gen))
        found = int(
            _one(con, f"SELECT count(*) FROM {src} WHERE {kq} = ? AND {tq} = ?", [key, tenant]) or 0
        )
    if found == 0:
        raise NotFound(f"no archived row with {spec.key_column} {key!r:.60}", field="key")
    names = list(changes)
    replace = ", ".join(
        f"CASE WHEN {kq} = ? THEN CAST(? AS {types[n]}) ELSE {_q(n)} END AS {_q(n)}" for n in names
    )
    params: list[Any] = []
    for n in names:
        value = changes[n]
        if n in ("attrs", "pii_flags") and value is not None and not isinstance(value, str):
            value = msgspec.json.encode(value).decode()
        params += [key, value]

    def build(temp: Path, old_dir: Path | None) -> int:
        assert old_dir is not None
        if tdir is None:
            _rewrite_month(
                con, spec, old_dir, temp, f"SELECT * REPLACE ({replace}) FROM {{src}}", params
            )
            return total
        temp.mkdir(parents=True)
        _link_tree(old_dir, temp, frozenset({tdir.name}))
        (temp / tdir.name).mkdir()
        con.execute(
            f"COPY (SELECT * REPLACE ({replace}) FROM {src})"
            f" TO {_lit(str(temp / tdir.name / 'data_0.parquet'))} (FORMAT parquet,"
            f" ROW_GROUP_SIZE {int(spec.row_group_rows)}, COMPRESSION zstd)",
            params,
        )
        return total

    def finish() -> None:
        pass

    _run_job(con, spec, p, "correct", at, build, finish, hook)
    return found


def collect_garbage(
    con: duckdb.DuckDBPyConnection,
    spec: PartitionSpec,
    *,
    now: _dt.datetime | None = None,
    force: bool = False,
    limit: int = 1_000,
) -> int:
    """Delete unreferenced archive directories whose delay has passed; return how many."""
    at = _now(now)
    sql = "SELECT path FROM symbiote_partition_garbage"
    params: list[Any] = []
    if not force:
        sql += " WHERE not_before <= ?"
        params.append(at)
    paths = [str(r[0]) for r in con.execute(sql + f" LIMIT {int(limit)}", params).fetchall()]
    root = str(spec.archive_dir) + os.sep
    for path in paths:
        if path.startswith(root):  # never delete outside the archive, whatever the table says
            shutil.rmtree(path, ignore_errors=True)
        con.execute("DELETE FROM symbiote_partition_garbage WHERE path = ?", [path])
    return len(paths)


# --------------------------------------------------------------------------------------------
# reads the writer and operators need


def list_periods(con: duckdb.DuckDBPyConnection, spec: PartitionSpec) -> list[PeriodInfo]:
    """Every month with rows, hot or archived, oldest first."""
    ts = _q(spec.ts_column)
    hot = {
        Period.parse(p): int(n)
        for p, n in con.execute(
            f"SELECT strftime({ts} AT TIME ZONE 'UTC', '%Y-%m'), count(*)"
            f" FROM {_q(spec.hot_table)} GROUP BY 1"
        ).fetchall()
    }
    manifest = _manifest(con, spec)
    return [
        PeriodInfo(
            period=str(p),
            hot_rows=hot.get(p, 0),
            archived_rows=manifest[p][1] if p in manifest else 0,
            gen=manifest[p][0] if p in manifest else None,
        )
        for p in sorted(set(hot) | set(manifest))
    ]


def locate_archived(
    con: duckdb.DuckDBPyConnection, spec: PartitionSpec, key: str
) -> tuple[Period, str] | None:
    """The archived month and tenant of the row with ``key``, or None if no month holds it.

    Scans the key column of every archived generation (the files are sorted by tenant and
    time, not by key): fine for a correction, which is rare; never on the ingest path.
    """
    manifest = _manifest(con, spec)
    if not manifest:
        return None
    globs = [_period_glob(spec, p, g) for p, (g, _) in manifest.items()]
    kq, tq, ts = _q(spec.key_column), _q(spec.tenant_column), _q(spec.ts_column)
    try:
        # The month as text in SQL: fetching a TIMESTAMPTZ into Python would need pytz.
        row = con.execute(
            f"SELECT strftime({ts} AT TIME ZONE 'UTC', '%Y-%m'), {tq}"
            f" FROM {_parquet_source(spec, globs)} WHERE {kq} = ? LIMIT 1",
            [key],
        ).fetchone()
    except duckdb.Error as exc:
        raise QueryError(str(exc), field="archive") from exc
    if row is None:
        return None
    return Period.parse(row[0]), str(row[1])


def archived_duplicates(
    con: duckdb.DuckDBPyConnection, spec: PartitionSpec, rows: pa.Table
) -> set[str]:
    """Keys of ``rows`` (key, ts, tenant columns) that an archived month already holds.

    The hot table's unique index only covers hot rows; the writer calls this for the rare
    incoming rows whose month is archived, so that a retry of an archived message stays a
    duplicate. Reads only the key column of the tenants' files of those months.
    """
    manifest = _manifest(con, spec)
    if not manifest or rows.num_rows == 0:
        return set()
    first_cold_end = max(manifest).end
    ts_col = rows.column(spec.ts_column).to_pylist()
    if min(ts_col) >= first_cold_end:
        return set()
    periods = {Period.of(t) for t in ts_col if t < first_cold_end}
    globs = [_period_glob(spec, p, manifest[p][0]) for p in sorted(periods) if p in manifest]
    if not globs:
        return set()
    kq, tq = _q(spec.key_column), _q(spec.tenant_column)
    con.register("_symbiote_candidates", rows)
    try:
        found = con.execute(
            f"SELECT a.{kq} FROM {_parquet_source(spec, globs)} a"
            f" WHERE a.{tq} IN (SELECT DISTINCT {tq} FROM _symbiote_candidates)"
            f" AND a.{kq} IN (SELECT {kq} FROM _symbiote_candidates)"
        ).fetchall()
    except duckdb.Error as exc:
        raise QueryError(str(exc), field="archive") from exc
    finally:
        con.unregister("_symbiote_candidates")
    return {str(r[0]) for r in found}
