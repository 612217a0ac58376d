"""The maintenance actor: moves closed months of the hot table to Parquet, on a schedule.

It owns one connection of its own on the shared instance (``db.cursor()``), so its long
``COPY`` and ``DELETE`` never wait behind the writer's group commits, and the writer never
waits behind it: appends and a move touch different rows, and DuckDB's MVCC lets both commit
(a late duplicate of a row being moved can conflict; the writer reports that to its one
caller). All DuckDB work runs in a worker thread with a ``CapacityLimiter(1)``, never on the
trio loop. At start it finishes or rolls back whatever a crash interrupted
(:func:`~symbiote.actors._partition.ensure_partitioning`), so it must start after the writer
has migrated the schema and before readers rely on the view.

Every ``interval_s`` (and on :class:`RunMaintenance`) it moves at most ``max_moves_per_round``
closed months (keeping ``keep_hot`` months hot), applies the retention policy
(``retain_months``) if one is set, and deletes garbage whose delay has passed. It answers
:class:`MovePeriod`, :class:`DropPeriod` and :class:`CorrectArchived` on request, one at a
time: a move is never run twice at once.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from typing import Any

import duckdb
import msgspec
import trio

from symbiote.actors._partition import (
    DropResult,
    MoveResult,
    PartitionSpec,
    Period,
    PeriodInfo,
    archive_period,
    collect_garbage,
    correct_archived,
    drop_period,
    ensure_partitioning,
    list_periods,
    locate_archived,
    movable_periods,
)
from symbiote.actors._threads import run_in_db_thread
from symbiote.actors.database import Database
from symbiote.runtime import Actor, Inbox
from symbiote.schema.errors import BadArgument, NotFound, SymbioteError, WriteConflict

__all__ = [
    "CorrectArchived",
    "DropPeriod",
    "ListPeriods",
    "Maintenance",
    "MaintenanceReport",
    "MaintenanceSettings",
    "MessageCorrected",
    "MovePeriod",
    "RunMaintenance",
]

log = logging.getLogger("symbiote.maintenance")


class MaintenanceSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Schedule and policy of one :class:`Maintenance` actor."""

    #: Seconds between rounds (a round also runs on :class:`RunMaintenance`).
    interval_s: float = 3_600.0
    #: Seconds from start to the first round (None: ``interval_s``). Shorter than the
    #: interval so that a process restarted more often than ``interval_s`` still moves.
    first_round_s: float | None = None
    #: The newest months kept in the hot table (the current one is always hot).
    keep_hot: int = 1
    #: Months moved per round at most: bounds a round's duration after a long downtime.
    max_moves_per_round: int = 2
    #: Drop archived months older than this many months (None keeps everything).
    retain_months: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.interval_s, int | float) and math.isfinite(self.interval_s)):
            raise BadArgument("must be a finite number of seconds", field="interval_s")
        if self.interval_s <= 0:
            raise BadArgument("must be positive", field="interval_s")
        first = self.first_round_s
        if first is not None and not (
            isinstance(first, int | float) and math.isfinite(first) and first >= 0
        ):
            raise BadArgument("must be a finite number of seconds >= 0", field="first_round_s")
        if self.keep_hot < 0 or self.max_moves_per_round < 1:
            raise BadArgument("keep_hot >= 0 and max_moves_per_round >= 1", field="keep_hot")
        if self.retain_months is not None and self.retain_months <= self.keep_hot:
            raise BadArgument("must exceed keep_hot", field="retain_months")


class RunMaintenance(msgspec.Struct, frozen=True):
    """Run one round now; answered with a :class:`MaintenanceReport`."""


class MovePeriod(msgspec.Struct, frozen=True, kw_only=True):
    """Move one closed month (``"YYYY-MM"``) to Parquet; answered with a ``MoveResult``."""

    period: str


class DropPeriod(msgspec.Struct, frozen=True, kw_only=True):
    """Retention: remove a closed month, or one tenant's rows of it; answered ``DropResult``."""

    period: str
    tenant: str | None = None
    purge: bool = False


class CorrectArchived(msgspec.Struct, frozen=True, kw_only=True):
    """Change columns of one archived message; answered with a :class:`MessageCorrected`.

    Without ``period`` and ``tenant`` the actor finds the message in the archive itself.
    """

    event_id: str
    changes: dict[str, Any]
    period: str | None = None
    tenant: str | None = None


class MessageCorrected(msgspec.Struct, frozen=True, kw_only=True):
    """Where a correction was applied: the hot table (``period`` None) or an archived month."""

    event_id: str
    archived: bool
    period: str | None = None


class ListPeriods(msgspec.Struct, frozen=True):
    """Every month with rows, hot or archived; answered with a list of ``PeriodInfo``."""


class MaintenanceReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one round did."""

    moved: list[MoveResult]
    dropped: list[DropResult]
    garbage_removed: int


class Maintenance(Actor):
    """Scheduled and on-demand partition maintenance; see the module docstring."""

    accepts = (RunMaintenance, MovePeriod, DropPeriod, CorrectArchived, ListPeriods)

    def __init__(
        self,
        db: Database,
        spec: PartitionSpec,
        settings: MaintenanceSettings | None = None,
        *,
        clock: Any = None,
    ) -> None:
        self.db = db
        self.spec = spec
        self.settings = settings or MaintenanceSettings()
        #: ``clock()`` -> aware datetime; tests pass a fixed one.
        self._clock = clock or (lambda: _dt.datetime.now(_dt.UTC))
        self._con: duckdb.DuckDBPyConnection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self.rounds = 0
        self.moves = 0
        self.last_report: MaintenanceReport | None = None

    async def on_start(self) -> None:
        self._con = await run_in_db_thread(self._open, limiter=self._limiter)

    def _open(self) -> duckdb.DuckDBPyConnection:
        con = self.db.cursor()
        try:
            rolled_back = ensure_partitioning(con, self.spec)
        except BaseException:
            con.close()
            raise
        if rolled_back:
            log.warning("rolled back interrupted moves at start", extra={"periods": rolled_back})
        return con

    async def on_stop(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            await run_in_db_thread(con.close, limiter=self._limiter)

    async def run(self, inbox: Inbox) -> None:
        # A deadline, not an idle timeout: a steady stream of requests must not starve rounds.
        first = self.settings.first_round_s
        next_round = trio.current_time() + (self.settings.interval_s if first is None else first)
        while True:
            request = None
            with trio.move_on_at(next_round):
                try:
                    request = await inbox.receive()
                except trio.EndOfChannel:
                    return
            if request is None:
                next_round = trio.current_time() + self.settings.interval_s
                try:
                    await self._round()
                except SymbioteError as exc:
                    # A refused step (e.g. a month reopened by a clock jump) waits for the next
                    # round; database failures that are not ours propagate and crash the actor.
                    log.warning("maintenance round refused: %s", exc)
                continue
            await inbox.serve(request, self.handle)

    async def handle(self, msg: Any) -> Any:
        con = self._connection()
        now = self._clock()
        if isinstance(msg, RunMaintenance):
            return await self._round()
        if isinstance(msg, MovePeriod):
            return await self._db(lambda: archive_period(con, self.spec, msg.period, now=now))
        if isinstance(msg, DropPeriod):
            return await self._db(
                lambda: drop_period(
                    con, self.spec, msg.period, tenant=msg.tenant, now=now, purge=msg.purge
                )
            )
        if isinstance(msg, CorrectArchived):
            return await self._db(lambda: self._correct(con, msg, now))
        if isinstance(msg, ListPeriods):
            return await self._db(lambda: list_periods(con, self.spec))
        return await super().handle(msg)

    def _connection(self) -> duckdb.DuckDBPyConnection:
        assert self._con is not None, "maintenance used before on_start"
        return self._con

    def _correct(
        self, con: duckdb.DuckDBPyConnection, msg: CorrectArchived, now: _dt.datetime
    ) -> MessageCorrected:
        period, tenant = msg.period, msg.tenant
        if period is None or tenant is None:
            found = locate_archived(con, self.spec, msg.event_id)
            if found is None:
                raise NotFound(f"no message {msg.event_id!r:.60}", field="event_id")
            period, tenant = str(found[0]), found[1]
        correct_archived(
            con, self.spec, msg.event_id, msg.changes, period=period, tenant=tenant, now=now
        )
        return MessageCorrected(event_id=msg.event_id, archived=True, period=str(period))

    async def _db(self, work: Any) -> Any:
        try:
            return await run_in_db_thread(work, limiter=self._limiter)
        except (duckdb.TransactionException, duckdb.ConstraintException) as exc:
            # A write of the writer met the same rows (e.g. a correction of a message being
            # moved). The job rolled back as a whole; the caller, or the next round, retries.
            raise WriteConflict(str(exc), field="period") from None

    async def _round(self) -> MaintenanceReport:
        """One bounded round: moves, retention, garbage; each step its own thread call."""
        con = self._connection()
        now = self._clock()
        s = self.settings
        periods: list[Period] = await self._db(
            lambda: movable_periods(
                con, self.spec, keep_hot=s.keep_hot, now=now, limit=s.max_moves_per_round
            )
        )
        moved: list[MoveResult] = []
        for p in periods:
            # One month per thread call: the loop stays responsive and a stop waits for at
            # most one move (which commits or rolls back as a whole).
            moved.append(await self._db(lambda p=p: archive_period(con, self.spec, p, now=now)))
            self.moves += 1
        dropped: list[DropResult] = []
        if s.retain_months is not None:
            oldest_kept = Period.of(now)
            for _ in range(s.retain_months - 1):
                oldest_kept = oldest_kept.prev()
            infos: list[PeriodInfo] = await self._db(lambda: list_periods(con, self.spec))
            for info in infos:
                p = Period.parse(info.period)
                # A month inside its grace period is refused by drop_period; leave it for a
                # later round rather than abort this one (and its garbage collection).
                if p < oldest_kept and p.end + self.spec.grace <= now:
                    dropped.append(
                        await self._db(
                            lambda i=info: drop_period(con, self.spec, i.period, now=now)
                        )
                    )
        removed: int = await self._db(lambda: collect_garbage(con, self.spec, now=now))
        self.rounds += 1
        report = MaintenanceReport(moved=moved, dropped=dropped, garbage_removed=removed)
        self.last_report = report
        if moved or dropped:
            log.info(
                "maintenance round",
                extra={"moved": [m.period for m in moved], "dropped": [d.period for d in dropped]},
            )
        return report
