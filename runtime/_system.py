"""The composition root: the supervision tree of a runtime and its public API.

The tree::

    symbiote            one_for_one
    └─ data             rest_for_one   (a writer restart restarts the readers after it)
       ├─ writer        owns the DuckDB file and its read-write connection
       └─ readers       one_for_one
          ├─ reader-0   own connection (cursor) on the same instance
          └─ ...

:func:`open_runtime` starts it and yields a :class:`Runtime`, whose methods are the whole data
API; :func:`start_blocking` gives the same API to synchronous code.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pyarrow as pa
import trio

from symbiote.actors.database import Database
from symbiote.actors.reader import Query, QueryFormat, Reader, Stream
from symbiote.actors.writer import Writer
from symbiote.runtime._actor import ActorRef
from symbiote.runtime._blocking import BlockingHost
from symbiote.runtime._config import Config
from symbiote.runtime._specs import ChildSpec, SupervisorSpec
from symbiote.runtime._supervisor import Supervisor, open_supervisor
from symbiote.runtime._tree import TreeNode, format_tree
from symbiote.schema.errors import BadArgument, SymbioteError
from symbiote.schema.messages import (
    DeleteChunks,
    IngestMessages,
    UpsertChunks,
    UpsertDocuments,
    WriteAck,
)
from symbiote.schema.records import Chunk, Document, Limits, Message

__all__ = ["BlockingRuntime", "Runtime", "build_tree", "open_runtime", "start_blocking"]

log = logging.getLogger("symbiote.runtime")

R = TypeVar("R")

Params = Sequence[Any] | dict[str, Any] | None


def build_tree(config: Config, db: Database) -> SupervisorSpec:
    """The runtime's supervision tree for ``config``, as data."""
    limits = Limits(dim=config.dim, max_text_bytes=config.max_text_bytes)
    writer = ChildSpec(
        id="writer",
        factory=lambda: Writer(
            db,
            limits,
            max_batch_rows=config.max_batch_rows,
            batch_window_s=config.batch_window_s,
        ),
        mailbox=config.writer_mailbox,
        shutdown=config.shutdown_s,
    )
    readers = SupervisorSpec(
        id="readers",
        strategy="one_for_one",
        children=tuple(
            ChildSpec(
                id=f"reader-{i}",
                factory=lambda: Reader(db),
                mailbox=config.reader_mailbox,
                shutdown=config.shutdown_s,
            )
            for i in range(config.readers)
        ),
        intensity=config.restart_intensity,
        period=config.restart_period_s,
    )
    data = SupervisorSpec(
        id="data",
        strategy="rest_for_one",
        children=(writer, readers),
        intensity=config.restart_intensity,
        period=config.restart_period_s,
    )
    return SupervisorSpec(id="symbiote", children=(data,), strategy="one_for_one")


class Runtime:
    """The data API of a running symbiote, for trio code. Get one from :func:`open_runtime`.

    Every call takes an optional ``timeout`` (seconds; the config's ``default_timeout_s`` when
    omitted) and raises typed :class:`SymbioteError` subclasses.
    """

    def __init__(self, config: Config, supervisor: Supervisor, db: Database) -> None:
        self.config = config
        self._sup = supervisor
        self._db = db
        self._writer = supervisor.ref("data/writer")
        self._readers = [supervisor.ref(f"data/readers/reader-{i}") for i in range(config.readers)]
        # Calls in flight per reader, for least-loaded dispatch.
        self._inflight = dict.fromkeys(self._readers, 0)

    # -- writes ----------------------------------------------------------------------------

    async def ingest(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> WriteAck:
        """Store chat messages; a message whose ``event_id`` is stored already is skipped.

        Returns after COMMIT (the write is durable): ``written`` new rows, ``duplicates``
        skipped ones.
        """
        return await self._write(IngestMessages(messages=tuple(messages)), timeout)

    async def upsert_documents(
        self, documents: Iterable[Document], *, timeout: float | None = None
    ) -> WriteAck:
        """Insert or replace documents by ``id``."""
        return await self._write(UpsertDocuments(documents=tuple(documents)), timeout)

    async def upsert_chunks(
        self, chunks: Iterable[Chunk], *, timeout: float | None = None
    ) -> WriteAck:
        """Insert or replace chunks (with their embeddings) by ``chunk_id``."""
        return await self._write(UpsertChunks(chunks=tuple(chunks)), timeout)

    async def delete_chunks(
        self, chunk_ids: Iterable[str], *, timeout: float | None = None
    ) -> WriteAck:
        """Delete chunks by id."""
        return await self._write(DeleteChunks(chunk_ids=tuple(chunk_ids)), timeout)

    async def _write(self, msg: Any, timeout: float | None) -> WriteAck:
        ack: WriteAck = await self._writer.ask(msg, timeout=self._timeout(timeout))
        return ack

    # -- reads -----------------------------------------------------------------------------

    async def query(
        self,
        sql: str,
        params: Params = None,
        *,
        fmt: QueryFormat = "arrow",
        timeout: float | None = None,
    ) -> Any:
        """Run one read-only statement on the least-loaded reader.

        ``fmt``: ``"arrow"`` (a ``pyarrow.Table``), ``"numpy"`` (a dict of arrays) or
        ``"records"`` (a list of dicts). When the deadline passes or the caller is cancelled,
        the query is interrupted on its connection.
        """
        reader = self._pick_reader()
        msg = Query(sql=sql, params=_params(params), fmt=fmt)
        self._inflight[reader] += 1
        try:
            return await reader.ask(msg, timeout=self._timeout(timeout))
        finally:
            self._inflight[reader] -= 1

    @asynccontextmanager
    async def stream(
        self,
        sql: str,
        params: Params = None,
        *,
        batch_rows: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[AsyncIterator[pa.RecordBatch]]:
        """Stream a large result as Arrow record batches of at most ``batch_rows`` rows.

        Use as ``async with rt.stream(sql) as batches: async for batch in batches: ...``.
        Memory stays bounded: the reader runs ahead of the consumer by at most two batches,
        and leaving the block early ends the query. ``timeout`` bounds the wait for each batch.
        """
        rows = self.config.stream_batch_rows if batch_rows is None else batch_rows
        if not isinstance(rows, int) or rows < 1:
            raise BadArgument(f"must be a positive integer, got {rows!r}", field="batch_rows")
        wait = self._timeout(timeout)
        send, receive = trio.open_memory_channel[pa.RecordBatch | SymbioteError](2)
        reader = self._pick_reader()
        msg = Stream(
            sql=sql, params=_params(params), into=send, batch_rows=rows, idle_timeout_s=wait
        )
        self._inflight[reader] += 1
        try:
            async with receive:
                await reader.tell(msg)
                yield _batches(receive, wait)
        finally:
            self._inflight[reader] -= 1

    # -- introspection ---------------------------------------------------------------------

    def tree(self) -> TreeNode:
        """The live supervision tree, with each actor's counters."""
        return self._sup.tree()

    def format_tree(self) -> str:
        """The live supervision tree as text."""
        return format_tree(self._sup.tree())

    # -- internals -------------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        return self.config.default_timeout_s if timeout is None else timeout

    def _pick_reader(self) -> ActorRef:
        return min(self._readers, key=lambda r: (self._inflight[r], r.depth))


async def _batches(
    receive: trio.MemoryReceiveChannel[pa.RecordBatch | SymbioteError], wait: float
) -> AsyncIterator[pa.RecordBatch]:
    from symbiote.schema.errors import DeadlineExceeded

    while True:
        with trio.move_on_after(wait) as scope:
            try:
                item = await receive.receive()
            except trio.EndOfChannel:
                return
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"no batch within {wait} s")
        if isinstance(item, SymbioteError):
            raise item
        yield item


def _params(params: Params) -> tuple[Any, ...] | dict[str, Any] | None:
    if params is None or isinstance(params, dict):
        return params
    if isinstance(params, str | bytes):
        raise BadArgument("must be a sequence or a mapping of values, not a string", field="params")
    return tuple(params)


@asynccontextmanager
async def open_runtime(config: Config | None = None) -> AsyncIterator[Runtime]:
    """Start a runtime on ``config`` (defaults: ``Config()``) and shut it down on exit."""
    config = config or Config()
    db = Database(config.db_path, threads=config.duckdb_threads)
    async with open_supervisor(build_tree(config, db)) as sup:
        log.info("runtime started", extra={"db_path": config.db_path, "readers": config.readers})
        yield Runtime(config, sup, db)


class BlockingRuntime:
    """The :class:`Runtime` API for synchronous code; get one from :func:`start_blocking`.

    Each method blocks until the trio side answers; :meth:`submit` returns a
    ``concurrent.futures.Future`` instead (``asyncio.wrap_future`` turns it into an awaitable).
    """

    def __init__(self, host: BlockingHost[Runtime]) -> None:
        self._host = host
        self._rt: Runtime | None = None

    def __enter__(self) -> BlockingRuntime:
        self._rt = self._host.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut the tree down and stop the trio thread."""
        self._host.close()

    @property
    def runtime(self) -> Runtime:
        """The trio-side runtime (use its methods only through :meth:`call`/:meth:`submit`)."""
        if self._rt is None:
            self._rt = self._host.start()
        return self._rt

    def call(self, fn: Callable[..., Awaitable[R]], *args: Any) -> R:
        """Run ``await fn(*args)`` in the runtime's trio thread, blocking."""
        return self._host.call(fn, *args)

    def submit(
        self, method: str | Callable[..., Awaitable[R]], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """Start a runtime method (by name: ``"ingest"``) or coroutine function; get a Future."""
        fn = getattr(self.runtime, method) if isinstance(method, str) else method

        async def invoke() -> Any:
            return await fn(*args, **kwargs)

        return self._host.submit(invoke)

    def ingest(self, messages: Iterable[Message], *, timeout: float | None = None) -> WriteAck:
        """Blocking :meth:`Runtime.ingest`."""
        return self._run("ingest", tuple(messages), timeout=timeout)

    def upsert_documents(
        self, documents: Iterable[Document], *, timeout: float | None = None
    ) -> WriteAck:
        """Blocking :meth:`Runtime.upsert_documents`."""
        return self._run("upsert_documents", tuple(documents), timeout=timeout)

    def upsert_chunks(self, chunks: Iterable[Chunk], *, timeout: float | None = None) -> WriteAck:
        """Blocking :meth:`Runtime.upsert_chunks`."""
        return self._run("upsert_chunks", tuple(chunks), timeout=timeout)

    def delete_chunks(self, chunk_ids: Iterable[str], *, timeout: float | None = None) -> WriteAck:
        """Blocking :meth:`Runtime.delete_chunks`."""
        return self._run("delete_chunks", tuple(chunk_ids), timeout=timeout)

    def query(
        self,
        sql: str,
        params: Params = None,
        *,
        fmt: QueryFormat = "arrow",
        timeout: float | None = None,
    ) -> Any:
        """Blocking :meth:`Runtime.query`."""
        return self._run("query", sql, params, fmt=fmt, timeout=timeout)

    def stream(
        self,
        sql: str,
        params: Params = None,
        *,
        batch_rows: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Blocking :meth:`Runtime.stream`: a generator of record batches.

        Close the generator (or exhaust it) to end the query early.
        """
        rt = self.runtime
        send, receive = trio.open_memory_channel[Any](0)
        # A trio task drives the stream and hands each batch over a rendezvous channel, so
        # the host pulls at its own pace and at most one batch waits in between.
        done = self._host.submit(self._drive_stream, rt, sql, params, batch_rows, timeout, send)
        try:
            while True:
                item = self._host.call(_receive_or_end, receive)
                if item is _END:
                    break
                yield item
        finally:
            self._host.call(_aclose, receive)
            done.result()

    @staticmethod
    async def _drive_stream(
        rt: Runtime,
        sql: str,
        params: Params,
        batch_rows: int | None,
        timeout: float | None,
        send: trio.MemorySendChannel[Any],
    ) -> None:
        async with send:
            try:
                async with rt.stream(
                    sql, params, batch_rows=batch_rows, timeout=timeout
                ) as batches:
                    async for batch in batches:
                        await send.send(batch)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except SymbioteError as exc:
                try:
                    await send.send(exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    def tree(self) -> TreeNode:
        """The live supervision tree."""
        return self.runtime.tree()

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.runtime, method)

        async def invoke() -> Any:
            return await fn(*args, **kwargs)

        return self._host.call(invoke)


_END = object()


async def _receive_or_end(receive: trio.MemoryReceiveChannel[Any]) -> Any:
    try:
        item = await receive.receive()
    except trio.EndOfChannel:
        return _END
    if isinstance(item, SymbioteError):
        raise item
    return item


async def _aclose(receive: trio.MemoryReceiveChannel[Any]) -> None:
    await receive.aclose()


def start_blocking(config: Config | None = None) -> BlockingRuntime:
    """A runtime on ``config`` in a background trio thread, for synchronous hosts.

    Use it as a context manager: ``with start_blocking(Config(...)) as rt: rt.ingest(...)``.
    """
    return BlockingRuntime(BlockingHost(lambda: open_runtime(config)))
