"""A reader actor: one connection of its own on the shared instance, one query at a time.

Queries run in a worker thread (DuckDB releases the GIL while it works, so the trio loop
stays free). If the caller gives up — its deadline passes or it is cancelled — or the reader
is being stopped, the running query is interrupted on this reader's connection with
``interrupt()``, and the reader waits for its thread to return before taking the next request:
a connection is never used by two threads, and no thread is ever abandoned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

import duckdb
import msgspec
import outcome
import pyarrow as pa
import trio

from symbiote.actors._query import iter_batches, run_query
from symbiote.actors._threads import run_in_db_thread
from symbiote.actors.database import Database
from symbiote.runtime import Actor, Inbox, Request
from symbiote.schema.errors import (
    BadArgument,
    DeadlineExceeded,
    Interrupted,
    QueryError,
    SymbioteError,
)

__all__ = ["Query", "Reader", "Stream"]

log = logging.getLogger("symbiote.reader")

T = TypeVar("T")

QueryFormat = Literal["arrow", "numpy", "records"]


class Query(msgspec.Struct, frozen=True, kw_only=True):
    """Run one read-only statement and answer with its whole result.

    ``sql`` is SQL text or an Ibis expression (with the ``ibis`` extra installed), which the
    reader compiles for DuckDB in its worker thread and runs like SQL.
    """

    sql: Any  # str, or an ibis.Expr; in-process only
    params: tuple[Any, ...] | dict[str, Any] | None = None
    fmt: QueryFormat = "arrow"


class Stream(msgspec.Struct, frozen=True, kw_only=True):
    """Run one statement and send its result, batch by batch, into ``into``; send with ``tell``.

    ``into`` is a bounded channel: the reader produces no faster than the consumer takes. It
    carries record batches and, if the statement fails, one :class:`SymbioteError` as its
    last item; the reader closes it at the end. ``idle_timeout_s`` bounds how long a stalled
    consumer may hold the reader.
    """

    sql: Any  # str, or an ibis.Expr (see Query)
    into: Any  # trio.MemorySendChannel[pa.RecordBatch | SymbioteError]; in-process only
    params: tuple[Any, ...] | dict[str, Any] | None = None
    batch_rows: int = 10_000
    idle_timeout_s: float = 30.0


class Reader(Actor):
    """Serves :class:`Query` and :class:`Stream` on its own connection."""

    accepts = (Query, Stream)

    def __init__(self, db: Database) -> None:
        self.db = db
        self._con: duckdb.DuckDBPyConnection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self.interrupts = 0

    async def on_start(self) -> None:
        self._con = await run_in_db_thread(self.db.cursor, limiter=self._limiter)

    async def on_stop(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            await run_in_db_thread(con.close, limiter=self._limiter)

    async def run(self, inbox: Inbox) -> None:
        async for request in inbox:
            if request.abandoned:
                request.fail(DeadlineExceeded("the caller gave up before the query started"))
                continue
            if isinstance(request.msg, Stream):
                await self._stream(request, request.msg)
                request.reply(None)
                continue
            await self._query(request, request.msg)

    async def _query(self, request: Request, q: Query) -> None:
        con = self._connection()
        try:
            result = await self._guarded(
                request, lambda: run_query(con, to_sql(q.sql), q.params, q.fmt)
            )
        except SymbioteError as exc:
            request.fail(exc)
        else:
            request.reply(result)

    def _connection(self) -> duckdb.DuckDBPyConnection:
        assert self._con is not None, "reader used before on_start"
        return self._con

    async def _guarded(self, request: Request, work: Callable[[], T]) -> T:
        """Run ``work`` in this reader's thread; interrupt it if the caller or we give up."""
        con = self._connection()
        done = False

        async def interrupter() -> None:
            try:
                await request.wait_abandoned()
            finally:
                # Runs when the caller gives up and when we are being cancelled (shutdown).
                if not done:
                    self.interrupts += 1
                    con.interrupt()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupter)
            # Captured, not raised, inside the nursery: it would wrap the error in a group.
            result = await outcome.acapture(run_in_db_thread, work, limiter=self._limiter)
            done = True
            nursery.cancel_scope.cancel()
        return result.unwrap()

    async def _stream(self, request: Request, msg: Stream) -> None:
        send: trio.MemorySendChannel[pa.RecordBatch | SymbioteError] = msg.into
        async with send:
            try:
                await self._pump(request, msg, send)
            except SymbioteError as exc:
                with trio.move_on_after(msg.idle_timeout_s):
                    try:
                        await send.send(exc)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the consumer went away: nothing more to send

    async def _pump(
        self,
        request: Request,
        msg: Stream,
        send: trio.MemorySendChannel[pa.RecordBatch | SymbioteError],
    ) -> None:
        con = self._connection()
        batches: Iterator[pa.RecordBatch] = await self._guarded(
            request, lambda: iter_batches(con, to_sql(msg.sql), msg.params, msg.batch_rows)
        )
        try:
            while True:
                batch = await self._guarded(request, lambda: next(batches, None))
                if batch is None:
                    return
                with trio.move_on_after(msg.idle_timeout_s) as idle:
                    await send.send(batch)
                if idle.cancelled_caught:
                    raise Interrupted(
                        f"the consumer took no batch for {msg.idle_timeout_s} s",
                        field="idle_timeout_s",
                    )
        finally:
            # Ends the statement (and frees the connection) whether or not it finished.
            with trio.CancelScope(shield=True):
                await run_in_db_thread(_close_iterator, batches, limiter=self._limiter)


def to_sql(statement: Any) -> str:
    """SQL text for ``statement``: itself if it is a str, compiled if it is an Ibis expression.

    Compiling can take milliseconds, which is why readers call this in their worker thread.
    """
    if isinstance(statement, str):
        return statement
    if type(statement).__module__.startswith("ibis."):
        import ibis  # optional extra: only needed when an expression is passed

        try:
            return str(ibis.to_sql(statement, dialect="duckdb"))
        except Exception as exc:  # ibis raises many types; all mean "cannot compile this"
            raise QueryError(f"cannot compile the Ibis expression: {exc}", field="sql") from None
    raise BadArgument(
        f"must be SQL text or an Ibis expression, not {type(statement).__name__}", field="sql"
    )


def _close_iterator(batches: Iterator[pa.RecordBatch]) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()
