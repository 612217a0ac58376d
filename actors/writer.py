"""The writer actor: sole owner of the read-write connection, committing in groups.

Each turn of its loop takes every write request already queued (up to ``max_batch_rows``
rows), applies them as one transaction in a worker thread, and answers each request only
after COMMIT returned, so an acknowledged write is durable. While one group commits, the next
one queues up: under load the groups grow by themselves and the fixed cost of a commit is
shared (group commit; see docs/data-layer.md for the numbers). A request that fails a
constraint is isolated by :func:`apply_batch` and fails alone.

After each commit that changed ``chunks`` it tells its subscribers (the index actor) what
changed, with the commit sequence, so they can follow the table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import duckdb
import trio

from symbiote.actors._partition import PartitionSpec
from symbiote.actors._store import BatchResult, StoreState, apply_batch
from symbiote.actors._threads import run_in_db_thread
from symbiote.actors.database import Database
from symbiote.runtime import Actor, ActorRef, Busy, Inbox, Request
from symbiote.schema.ddl import migrate
from symbiote.schema.errors import (
    ActorCrashed,
    ActorStopped,
    DeadlineExceeded,
    Failure,
    WrongMessage,
    error_of,
)
from symbiote.schema.messages import (
    ChunksCommitted,
    CorrectMessage,
    DeleteChunks,
    IngestBatch,
    IngestMessages,
    PersistMesh,
    UpsertChunks,
    UpsertDocuments,
    WriteAck,
    WriteAcks,
)
from symbiote.schema.records import Limits

__all__ = ["Writer", "request_rows"]

log = logging.getLogger("symbiote.writer")

#: Acks sent per task step; the writer yields to the loop between slices.
ACK_SLICE = 128


def request_rows(msg: Any) -> int:
    """How many rows a write request carries (the unit of the batch bound)."""
    if isinstance(msg, IngestMessages):
        return _count(msg.messages)
    if isinstance(msg, IngestBatch):
        parts = msg.requests if isinstance(msg.requests, tuple | list) else ()
        return max(1, sum(_count(r.messages) for r in parts if type(r) is IngestMessages))
    if isinstance(msg, UpsertDocuments):
        return _count(msg.documents)
    if isinstance(msg, UpsertChunks):
        return _count(msg.chunks)
    if isinstance(msg, DeleteChunks):
        return _count(msg.chunk_ids)
    if isinstance(msg, PersistMesh):
        return max(1, msg.size())
    return 1


def _count(records: object) -> int:
    # Structs do not check their field types when built: a request from another sender may
    # hold anything there. It is refused with a typed error when prepared; here it must
    # only not crash the writer.
    return len(records) if isinstance(records, tuple | list) else 1


class Writer(Actor):
    """Group-committing owner of the database; see the module docstring."""

    accepts = (
        IngestMessages,
        IngestBatch,
        UpsertDocuments,
        UpsertChunks,
        DeleteChunks,
        CorrectMessage,
        PersistMesh,
    )

    def __init__(
        self,
        db: Database,
        limits: Limits,
        *,
        max_batch_rows: int = 50_000,
        batch_window_s: float = 0.0,
        subscribers: Callable[[], Sequence[ActorRef]] = tuple,
        partition: PartitionSpec | None = None,
    ) -> None:
        self.db = db
        #: The messages layout shared with the maintenance actor (its fence says which
        #: incoming rows must be checked against archived months).
        self.partition = partition
        self.limits = limits
        self.max_batch_rows = max_batch_rows
        self.batch_window_s = batch_window_s
        self._subscribers = subscribers
        # One thread at a time on the connection: DuckDB connections are not thread-safe.
        self._limiter = trio.CapacityLimiter(1)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._state: StoreState | None = None
        #: Counters for introspection and benchmarks.
        self.commits = 0
        self.batches = 0
        self.rows = 0
        self.dropped_notifications = 0
        self._answering: _Committed | None = None
        self._handing: _Committed | None = None

    async def on_start(self) -> None:
        self._con, self._state = await run_in_db_thread(self._open, limiter=self._limiter)

    def _open(self) -> tuple[duckdb.DuckDBPyConnection, StoreState]:
        con = self.db.open()
        try:
            version = migrate(con, self.limits.dim)
            state = StoreState.load(con, self.limits, self.partition)
        except BaseException:
            self.db.close()
            raise
        log.info("writer ready", extra={"schema_version": version, "high_seq": state.high_seq})
        return con, state

    async def on_stop(self) -> None:
        self._con = None
        await run_in_db_thread(self.db.close, limiter=self._limiter)

    async def run(self, inbox: Inbox) -> None:
        # Acks go out from a second task, so that answering group k (waking its callers, who
        # then queue their next writes) overlaps with committing group k+1 in the worker
        # thread, instead of the two taking turns. Measured with 1-message requests at
        # saturation: docs/data-layer.md.
        send, receive = trio.open_memory_channel[_Committed](1)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ack_loop, receive)
                async with send:
                    await self._commit_loop(inbox, send)
        finally:
            # The rows of these groups are committed: their callers must hear so even when
            # the writer is stopped or crashes (answering twice is a no-op).
            for done in self._unanswered(receive):
                done.answer_all()

    async def _commit_loop(self, inbox: Inbox, acks: trio.MemorySendChannel[_Committed]) -> None:
        while True:
            try:
                first = await inbox.receive()
            except trio.EndOfChannel:
                return
            batch = await self._gather(inbox, first)
            live = [r for r in batch if not self._drop_abandoned(r) and not _malformed(r)]
            if live:
                done = await self._commit(live)
                # Committed: its callers must hear so even if a stop cancels the hand-over
                # to the ack task (run's finally answers it). The commit itself runs to its
                # end in the thread; the cancel lands on the next checkpoint, this send.
                self._handing = done
                await acks.send(done)
                self._handing = None

    async def _ack_loop(self, receive: trio.MemoryReceiveChannel[_Committed]) -> None:
        async for done in receive:
            self._answering = done
            await done.answer_in_slices()
            self._answering = None

    def _unanswered(self, receive: trio.MemoryReceiveChannel[_Committed]) -> list[_Committed]:
        out = [done for done in (self._handing, self._answering) if done is not None]
        while True:
            try:
                out.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return out

    async def _gather(self, inbox: Inbox, first: Request) -> list[Request]:
        """The group: ``first`` plus what is queued, bounded by rows (and the time window)."""
        batch = [first]
        rows = request_rows(first.msg)
        while rows < self.max_batch_rows:
            if len(batch) % ACK_SLICE == 0:
                await trio.lowlevel.cancel_shielded_checkpoint()
            more = inbox.poll()
            if more is None:
                if self.batch_window_s <= 0:
                    break
                with trio.move_on_after(self.batch_window_s):
                    more = await inbox.receive()
                if more is None:
                    break
            batch.append(more)
            rows += request_rows(more.msg)
        return batch

    @staticmethod
    def _drop_abandoned(request: Request) -> bool:
        # A caller that gave up was told its write is not acknowledged; skipping it keeps
        # that true and saves the work. Writes are idempotent, so its retry is safe.
        if request.abandoned:
            request.fail(DeadlineExceeded("the caller gave up before the write was committed"))
            return True
        return False

    async def _commit(self, batch: list[Request]) -> _Committed:
        assert self._con is not None and self._state is not None
        con, state = self._con, self._state
        result: BatchResult = await run_in_db_thread(
            apply_batch, con, _unpacked(batch), state, limiter=self._limiter
        )
        self.batches += 1
        self.commits += result.commits
        self.rows += sum(o.written for o in result.outcomes if isinstance(o, WriteAck))
        notice = result.chunks_committed()
        if notice is not None:
            self._publish(notice)
        return _Committed(batch, _repacked(batch, result.outcomes))

    def _publish(self, notice: ChunksCommitted) -> None:
        for ref in self._subscribers():
            # Never hold commits hostage to a follower: it sees the gap in ``seq`` with the
            # next notice (or at its restart) and catches up from the table.
            try:
                ref.tell_nowait(notice)
            except Busy:
                # Its mailbox is full: it is falling behind, which is worth a warning.
                self.dropped_notifications += 1
                log.warning("follower missed a commit notice", extra={"follower": ref.name})
            except (ActorStopped, ActorCrashed):
                # Expected in a normal stop: the tree stops the follower before the writer,
                # which may still be committing. A crashed one is being restarted by its
                # supervisor (its death is logged there); either reads the table at start.
                # Raising here would crash the writer after a successful commit.
                self.dropped_notifications += 1
                log.debug("stopped follower missed a commit notice", extra={"follower": ref.name})


class _Committed:
    """A committed group and the answers its requests are owed."""

    __slots__ = ("outcomes", "requests")

    def __init__(
        self, requests: list[Request], outcomes: list[WriteAck | WriteAcks | Failure]
    ) -> None:
        self.requests = requests
        self.outcomes = outcomes

    async def answer_in_slices(self) -> None:
        pairs = zip(self.requests, self.outcomes, strict=True)
        for n, (request, outcome) in enumerate(pairs, 1):
            _answer(request, outcome)
            if n % ACK_SLICE == 0:
                # Thousands of acks in one task step would stall the loop for milliseconds.
                await trio.lowlevel.checkpoint()

    def answer_all(self) -> None:
        for request, outcome in zip(self.requests, self.outcomes, strict=True):
            _answer(request, outcome)


def _malformed(request: Request) -> bool:
    """Refuse an IngestBatch holding anything but IngestMessages (True if refused)."""
    msg = request.msg
    if type(msg) is not IngestBatch:
        return False
    parts = msg.requests
    if not isinstance(parts, tuple | list):
        request.fail(WrongMessage("must be a tuple of IngestMessages", field="requests"))
        return True
    for i, part in enumerate(parts):
        if type(part) is not IngestMessages:
            request.fail(
                WrongMessage(
                    f"expected IngestMessages, got {type(part).__name__}", field=f"requests[{i}]"
                )
            )
            return True
    return False


def _unpacked(batch: list[Request]) -> list[Any]:
    """The write requests of ``batch``, an :class:`IngestBatch` spread into its requests."""
    out: list[Any] = []
    for request in batch:
        msg = request.msg
        if type(msg) is IngestBatch:
            out.extend(msg.requests)
        else:
            out.append(msg)
    return out


def _repacked(
    batch: list[Request], outcomes: list[WriteAck | Failure]
) -> list[WriteAck | WriteAcks | Failure]:
    """One answer per request of ``batch`` from the outcomes of :func:`_unpacked`'s list."""
    out: list[WriteAck | WriteAcks | Failure] = []
    at = 0
    for request in batch:
        msg = request.msg
        if type(msg) is IngestBatch:
            n = len(msg.requests)
            out.append(WriteAcks(outcomes=tuple(outcomes[at : at + n])))
            at += n
        else:
            out.append(outcomes[at])
            at += 1
    return out


def _answer(request: Request, outcome: WriteAck | WriteAcks | Failure) -> None:
    if isinstance(outcome, WriteAck | WriteAcks):
        request.reply(outcome)
    else:
        request.fail(error_of(outcome))
