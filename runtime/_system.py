"""The composition root: the supervision tree of a runtime and its public API.

The tree::

    symbiote            one_for_one
    └─ data             rest_for_one   (a writer restart restarts everything after it)
       ├─ writer        owns the DuckDB file and its read-write connection
       ├─ readers       one_for_one
       │  ├─ reader-0   own connection (cursor) on the same instance
       │  └─ ...
       ├─ index         HNSW over chunks.embedding, follows the writer's commits
       └─ maintenance   moves closed months of messages to Parquet, retention, corrections

The maintenance actor comes last: it needs the schema the writer migrated, and a writer
restart restarts it too (its connection came from the writer's instance). It stops first.

:func:`open_runtime` starts it and yields a :class:`Runtime`, whose methods are the whole data
API; :func:`start_blocking` gives the same API to synchronous code.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import gc
import logging
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import pyarrow as pa
import trio

from symbiote.actors._partition import DropResult, MoveResult, PartitionSpec, PeriodInfo
from symbiote.actors._threads import set_db_thread_nice
from symbiote.actors._vector import VectorParams
from symbiote.actors.database import Database
from symbiote.actors.index import (
    AwaitReady,
    Followers,
    Index,
    IndexInfo,
    IndexSettings,
    IndexStatus,
    Knn,
    KnnBatch,
    KnnBatchHits,
    KnnHits,
    SaveSnapshot,
    default_index_dir,
)
from symbiote.actors.maintenance import (
    CorrectArchived,
    DropPeriod,
    ListPeriods,
    Maintenance,
    MaintenanceReport,
    MaintenanceSettings,
    MessageCorrected,
    MovePeriod,
    RunMaintenance,
)
from symbiote.actors.mesh.actor import (
    Mesh,
    MeshFlush,
    MeshGrant,
    MeshJoin,
    MeshLinks,
    MeshMembers,
    MeshPublish,
    MeshSearch,
    MeshSettings,
    MeshStatus,
    local_search_via,
)
from symbiote.actors.mesh.federation import FederationConfig
from symbiote.actors.reader import Query, QueryFormat, Reader, Stream
from symbiote.actors.search import SearchPlanner
from symbiote.actors.writer import Writer
from symbiote.runtime._actor import Actor, ActorRef
from symbiote.runtime._blocking import BlockingHost
from symbiote.runtime._coalesce import Coalescer, Ticket
from symbiote.runtime._config import Config
from symbiote.runtime._gil import switch_interval
from symbiote.runtime._groups import unwrap_single
from symbiote.runtime._specs import ChildSpec, SupervisorSpec
from symbiote.runtime._supervisor import Supervisor, open_supervisor
from symbiote.runtime._tree import TreeNode, format_tree
from symbiote.schema.errors import (
    ActorCrashed,
    BadArgument,
    ConfigError,
    NotFound,
    SymbioteError,
    WriteConflict,
    error_of,
)
from symbiote.schema.mesh import FederatedHits, Grant, MemberInfo, MeshInfo, Published
from symbiote.schema.messages import (
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
from symbiote.schema.records import (
    Chunk,
    Document,
    Limits,
    Message,
    validate_message_changes,
)
from symbiote.schema.search import SearchFilter, SearchHits

__all__ = [
    "BlockingRuntime",
    "Runtime",
    "build_tree",
    "maintenance_settings",
    "mesh_settings",
    "open_runtime",
    "partition_spec",
    "start_blocking",
]

log = logging.getLogger("symbiote.runtime")

R = TypeVar("R")

Params = Sequence[Any] | dict[str, Any] | None


def index_settings(config: Config) -> IndexSettings:
    """The index actor's settings from ``config``."""
    params = VectorParams(
        dim=config.dim,
        metric="cosine",
        M=config.index_m,
        ef_construction=config.index_ef_construction,
        ef_search=config.index_ef_search,
        ef_auto=config.index_ef_auto,
        # The index's own cap bounds one over-fetch of a filtered search, not the caller's k.
        max_k=max(config.search_max_fetch, config.search_max_k),
        backend=config.index_backend,
        threads=config.index_threads,
    )
    return IndexSettings(
        params=params,
        directory=config.index_dir or default_index_dir(config.db_path),
        snapshot_every_changes=config.index_snapshot_every_changes,
        snapshot_interval_s=config.index_snapshot_interval_s,
        catchup_rows=config.index_catchup_rows,
        poll_s=config.index_poll_s,
        max_batch=config.index_max_batch,
        max_pending=max(config.index_mailbox, config.index_max_batch),
    )


def partition_spec(config: Config) -> PartitionSpec | None:
    """The hot/cold layout of ``messages`` for ``config``; None when partitioning is off.

    Off when ``partition_enabled`` is false, or for an in-memory database without an
    ``archive_dir`` (its archive would outlive it). The writer and the maintenance actor
    share the one instance returned (its fence, see ``ArchiveFence``).
    """
    if not config.partition_enabled:
        return None
    archive = config.archive_dir
    if not archive:
        if config.db_path.startswith(":memory:"):
            return None
        archive = str(Path(config.db_path).with_name(Path(config.db_path).name + ".archive"))
    return PartitionSpec(
        archive_dir=Path(archive),
        grace=_dt.timedelta(seconds=config.partition_grace_s),
        garbage_delay=_dt.timedelta(seconds=config.garbage_delay_s),
    )


def maintenance_settings(config: Config) -> MaintenanceSettings:
    """The maintenance actor's schedule and policy from ``config``."""
    return MaintenanceSettings(
        interval_s=config.maintenance_interval_s,
        first_round_s=config.maintenance_first_round_s,
        keep_hot=config.keep_hot_months,
        max_moves_per_round=config.max_moves_per_round,
        retain_months=config.retain_months,
    )


def build_tree(
    config: Config, db: Database, *, partition: PartitionSpec | None = None
) -> SupervisorSpec:
    """The runtime's supervision tree for ``config``, as data.

    ``partition`` is the layout from :func:`partition_spec` (pass the same instance the
    runtime uses); None builds the tree without the maintenance actor.
    """
    limits = Limits(dim=config.dim, max_text_bytes=config.max_text_bytes)
    # The index registers itself here when it starts; the writer notifies whoever is in it.
    followers = Followers()
    writer = ChildSpec(
        id="writer",
        factory=lambda: Writer(
            db,
            limits,
            max_batch_rows=config.max_batch_rows,
            batch_window_s=config.batch_window_s,
            subscribers=followers.refs,
            partition=partition,
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
    children: tuple[ChildSpec | SupervisorSpec, ...] = (writer, readers)
    if config.index_enabled:
        settings = index_settings(config)
        index = ChildSpec(
            id="index",
            factory=lambda: Index(db, settings, followers=followers),
            mailbox=config.index_mailbox,
            # The final snapshot is taken in on_stop; give it the time a large one needs.
            shutdown=max(config.shutdown_s, 30.0),
        )
        children = (*children, index)
    if partition is not None:
        settings_m = maintenance_settings(config)
        spec = partition
        maintenance = ChildSpec(
            id="maintenance",
            factory=lambda: Maintenance(db, spec, settings_m),
            mailbox=config.maintenance_mailbox,
            # A move in progress runs in a thread that cannot be cancelled; it commits or
            # rolls back as a whole, so give it the time a large month needs.
            shutdown=max(config.shutdown_s, 60.0),
        )
        children = (*children, maintenance)
    data = SupervisorSpec(
        id="data",
        strategy="rest_for_one",
        children=children,
        intensity=config.restart_intensity,
        period=config.restart_period_s,
    )
    if not config.mesh_enabled:
        return SupervisorSpec(id="symbiote", children=(data,), strategy="one_for_one")
    data, mesh = _with_mesh(config, data)
    return SupervisorSpec(id="symbiote", children=(data, mesh), strategy="one_for_one")


# -- the mesh child ---------------------------------------------------------------------------


def mesh_settings(config: Config) -> MeshSettings:
    """The mesh actor's settings from ``config`` (paths defaulted next to the database)."""
    base = config.db_path
    key_path = config.mesh_key_path or str(Path(base + ".mesh") / "node.key")
    cert_path = config.mesh_cert_path or str(Path(base + ".mesh") / "node.crt")
    host, _, port = config.mesh_listen.rpartition(":")
    transport = msgspec.structs.replace(
        config.mesh_transport,
        host=host.strip("[]"),
        port=int(port),
        advertise=config.mesh_advertise or None,
        mesh=config.mesh_name,
    )
    return MeshSettings(
        key_path=key_path,
        ca_cert_path=config.mesh_ca_cert_path,
        cert_path=cert_path,
        ca_key_path=config.mesh_ca_key_path,
        bootstrap_path=config.mesh_bootstrap_path,
        transport=transport,
        swim=config.mesh_swim,
        sync=config.mesh_sync,
        trust=config.mesh_trust,
        federation=FederationConfig(
            dim=config.dim,
            max_hits=config.mesh_fed_max_hits,
            max_peers=config.mesh_fed_max_peers,
            max_outgoing=config.mesh_fed_max_outgoing,
            inflight_per_peer=config.mesh_fed_inflight_per_peer,
            inflight=config.mesh_fed_inflight,
            max_text_chars=config.mesh_fed_max_text_chars,
            # An answer must fit in one frame of the transport, with room for the envelope.
            max_reply_bytes=max(1024, config.mesh_transport.max_frame - 4096),
            redact=tuple(config.mesh_redact),
        ),
        persist_backlog=config.mesh_persist_backlog,
        state_interval_s=config.mesh_state_interval_s,
        join_retry_s=config.mesh_join_retry_s,
        io_timeout_s=config.default_timeout_s,
    )


class _Caught:
    """A child's factory that remembers the actor it built last, to reach that actor's ref.

    The kernel sets ``actor.ref`` before ``on_start``, and a ref is stable across restarts,
    so a sibling started later (the mesh) can talk to this actor through it; the kernel
    stays unaware of who talks to whom.
    """

    def __init__(self, factory: Callable[[], Actor]) -> None:
        self._factory = factory
        self._actor: Actor | None = None

    def __call__(self) -> Actor:
        self._actor = self._factory()
        return self._actor

    @property
    def ref(self) -> ActorRef:
        if self._actor is None:
            raise ConfigError("the actor has not been started yet", field="ref")
        return self._actor.ref


def _with_mesh(config: Config, data: SupervisorSpec) -> tuple[SupervisorSpec, ChildSpec]:
    """``data`` with its writer, readers and index factories caught, and the mesh child.

    The mesh sits beside ``data`` under the root (one_for_one), not inside it: it holds no
    database connection, only refs, so a restart of the data actors does not take the node
    off the network (its writes wait for the new writer and are retried).
    """
    caught: dict[str, _Caught] = {}

    def catch(spec: ChildSpec | SupervisorSpec, path: str) -> ChildSpec | SupervisorSpec:
        if isinstance(spec, SupervisorSpec):
            children = tuple(catch(c, f"{path}{spec.id}/") for c in spec.children)
            return msgspec.structs.replace(spec, children=children)
        c = caught[path + spec.id] = _Caught(spec.factory)
        return msgspec.structs.replace(spec, factory=c)

    data = msgspec.structs.replace(data, children=tuple(catch(c, "") for c in data.children))
    writer = caught["writer"]
    readers = [c for name, c in caught.items() if name.startswith("readers/")]
    index = caught.get("index")

    async def write(msg: PersistMesh, timeout: float) -> WriteAck:
        ack: WriteAck = await writer.ref.ask(msg, timeout=timeout)
        return ack

    async def sql(text: str, params: list[Any], timeout: float) -> pa.Table:
        reader = min(readers, key=lambda c: c.ref.depth).ref
        table: pa.Table = await reader.ask(
            Query(sql=text, params=tuple(params), fmt="arrow"), timeout=timeout
        )
        return table

    search = None
    if index is not None:
        idx = index

        async def knn(vector: Any, k: int, ef: int | None, timeout: float) -> KnnHits:
            hits: KnnHits = await idx.ref.ask(Knn(vector=vector, k=k, ef=ef), timeout=timeout)
            return hits

        planner = SearchPlanner(
            dim=config.dim,
            knn=knn,
            sql=sql,
            max_k=config.search_max_k,
            max_fetch=config.search_max_fetch,
            exact_rows=config.search_exact_rows,
            count_ttl_s=config.search_count_ttl_s,
        )
        search = local_search_via(planner, sql)
    links = MeshLinks(write=write, sql=sql, search=search)
    settings = mesh_settings(config)
    mesh = ChildSpec(
        id="mesh",
        factory=lambda: Mesh(settings, links),
        mailbox=config.mesh_mailbox,
        shutdown=config.shutdown_s,
    )
    return data, mesh


def _message_count(request: IngestMessages) -> int:
    return len(request.messages)


class Runtime:
    """The data API of a running symbiote, for trio code. Get one from :func:`open_runtime`.

    Every call takes an optional ``timeout`` (seconds; the config's ``default_timeout_s`` when
    omitted) and raises typed :class:`SymbioteError` subclasses.
    """

    def __init__(
        self,
        config: Config,
        supervisor: Supervisor,
        db: Database,
        *,
        partition: PartitionSpec | None = None,
    ) -> None:
        self.config = config
        self._sup = supervisor
        self._db = db
        self._writer = supervisor.ref("data/writer")
        self._limits = Limits(dim=config.dim, max_text_bytes=config.max_text_bytes)
        #: The messages layout (None: partitioning is off); see docs/partitioning.md.
        self.partition = partition
        self._maintenance: ActorRef | None = (
            supervisor.ref("data/maintenance") if partition is not None else None
        )
        self._readers = [supervisor.ref(f"data/readers/reader-{i}") for i in range(config.readers)]
        # Calls in flight per reader, for least-loaded dispatch.
        self._inflight = dict.fromkeys(self._readers, 0)
        self._mesh: ActorRef | None = supervisor.ref("mesh") if config.mesh_enabled else None
        self._index: ActorRef | None = (
            supervisor.ref("data/index") if config.index_enabled else None
        )
        # Concurrent searches reach the index actor as one KnnBatch per turn, not one Knn
        # each (docs/vector-search.md, "Client-side batching").
        self._knn_calls: Coalescer[tuple[Any, int, int | None], KnnHits] | None = (
            Coalescer(
                self._knn_many,
                name="index search",
                max_batch=config.index_max_batch,
                max_waiting=max(config.index_mailbox, config.index_max_batch),
            )
            if config.index_enabled
            else None
        )
        # Concurrent ingest calls reach the writer as one IngestBatch per turn.
        self._ingest_calls: Coalescer[IngestMessages, WriteAck] = Coalescer(
            self._ingest_many,
            name="ingest",
            max_batch=config.ingest_max_batch,
            max_waiting=max(config.writer_mailbox, config.ingest_max_batch),
            # A batch is one request to the writer: keep it within the writer's group bound.
            weight=_message_count,
            max_weight=config.max_batch_rows,
        )
        self.planner = SearchPlanner(
            dim=config.dim,
            knn=self._knn,
            sql=self._sql,
            max_k=config.search_max_k,
            max_fetch=config.search_max_fetch,
            exact_rows=config.search_exact_rows,
            count_ttl_s=config.search_count_ttl_s,
        )

    # -- writes ----------------------------------------------------------------------------

    async def ingest(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> WriteAck:
        """Store chat messages; a message whose ``event_id`` is stored already is skipped.

        Returns after COMMIT (the write is durable): ``written`` new rows, ``duplicates``
        skipped ones.
        """
        request = IngestMessages(messages=tuple(messages))
        return await self._ingest_calls.call(request, timeout=self._timeout(timeout))

    async def submit_ingest(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Ticket[WriteAck]:
        """Queue messages for the writer without waiting for their commit.

        Returns a :class:`Ticket` whose answer is what :meth:`ingest` would have returned
        (or raised). Waits only while the ingest queue is full (``Config.writer_mailbox``
        requests, at least ``ingest_max_batch``) or earlier callers wait for room
        (backpressure, in arrival order); ``timeout`` bounds that wait and the commit. For
        a producer that keeps many small requests in flight without a task per request:
        submit a window, then collect the answered tickets (``done``, ``result()``) in one
        step.
        """
        request = IngestMessages(messages=tuple(messages))
        return await self._ingest_calls.submit(request, timeout=self._timeout(timeout))

    def submit_ingest_nowait(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Ticket[WriteAck]:
        """Like :meth:`submit_ingest`, but raises :class:`Busy` at once when the queue is full."""
        request = IngestMessages(messages=tuple(messages))
        return self._ingest_calls.submit_nowait(request, timeout=self._timeout(timeout))

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

    async def correct_message(
        self, event_id: str, changes: Mapping[str, Any], *, timeout: float | None = None
    ) -> MessageCorrected:
        """Change correctable columns of one stored message, wherever it lives.

        ``changes`` maps columns (``text``, ``media_url``, ``media_type``, ``attrs``,
        ``pii_flags``, ``author_raw``, ``created_by_run``) to new values. A message in the
        hot table is updated by the writer (a plain ``UPDATE``, milliseconds); one in an
        archived month by the maintenance actor, which rewrites that month's file as a new
        generation (about a hundred milliseconds per million rows of the month). Readers see
        the old or the new version, never both.

        Raises:
            InvalidRecord: a column that cannot be corrected or a bad value (field
                ``changes`` or ``changes.<column>``), or a bad ``event_id``.
            NotFound: no message has ``event_id`` (field ``event_id``). Nothing changed.
        """
        # Checked here, not only by the writer: an archived message never reaches it.
        values: Any = dict(changes) if isinstance(changes, Mapping) else changes
        validate_message_changes(event_id, values, self._limits)
        wait = self._timeout(timeout)
        fix = CorrectMessage(event_id=event_id, changes=values)
        for attempt in range(3):
            try:
                ack: WriteAck = await self._writer.ask(fix, timeout=wait)
            except WriteConflict:
                # A move of the message's month deleted the hot row meanwhile: after it
                # commits the row is archived, so ask again (bounded).
                if attempt == 2:
                    raise
                await trio.sleep(0.05 * (attempt + 1))
                continue
            if ack.written:
                return MessageCorrected(event_id=event_id, archived=False)
            if self._maintenance is None:
                raise NotFound(f"no message {event_id!r:.60}", field="event_id")
            # Not hot: archived (the maintenance actor finds its month), or unknown.
            done: MessageCorrected = await self._maintenance.ask(
                CorrectArchived(event_id=event_id, changes=values), timeout=wait
            )
            return done
        raise AssertionError("unreachable")  # pragma: no cover

    # -- partitioning (docs/partitioning.md) -----------------------------------------------

    async def periods(self, *, timeout: float | None = None) -> list[PeriodInfo]:
        """Every month with messages, oldest first: rows still hot, rows archived, generation."""
        infos: list[PeriodInfo] = await self._maintenance_ref().ask(
            ListPeriods(), timeout=self._timeout(timeout)
        )
        return infos

    async def move_period(self, period: str, *, timeout: float | None = None) -> MoveResult:
        """Move the hot messages of a closed month (``"YYYY-MM"``) to Parquet now.

        The maintenance rounds do this by themselves (``keep_hot_months``); this is for
        operators and tests. Readers see every message exactly once during the move.

        Raises:
            BadArgument: ``period`` is not ``YYYY-MM`` (field ``period``).
            PeriodOpen: the month may still receive writes (its end plus
                ``partition_grace_s`` is in the future).
            NotFound: the month has no messages.
        """
        result: MoveResult = await self._maintenance_ref().ask(
            MovePeriod(period=period), timeout=self._timeout(timeout)
        )
        return result

    async def drop_period(
        self,
        period: str,
        tenant: str | None = None,
        *,
        purge: bool = False,
        timeout: float | None = None,
    ) -> DropResult:
        """Retention in one call: delete a closed month's messages (or one tenant's of it).

        Hot and archived rows leave the view in one transaction; archived files are deleted
        after ``garbage_delay_s`` (``purge=True``: at once, when no query can be reading).

        Raises:
            BadArgument: malformed ``period`` or empty ``tenant``.
            PeriodOpen: the month may still receive writes.
            NotFound: the month has no messages (field ``period``), or the tenant none in it
                (field ``tenant``). Nothing is deleted on any error.
        """
        result: DropResult = await self._maintenance_ref().ask(
            DropPeriod(period=period, tenant=tenant, purge=purge), timeout=self._timeout(timeout)
        )
        return result

    async def run_maintenance(self, *, timeout: float | None = None) -> MaintenanceReport:
        """Run one maintenance round now (moves, retention, garbage) and report it."""
        report: MaintenanceReport = await self._maintenance_ref().ask(
            RunMaintenance(), timeout=self._timeout(timeout)
        )
        return report

    def _maintenance_ref(self) -> ActorRef:
        if self._maintenance is None:
            raise ConfigError(
                "partitioning is off (partition_enabled = false, or an in-memory database"
                " without archive_dir)",
                field="partition_enabled",
            )
        return self._maintenance

    # -- reads -----------------------------------------------------------------------------

    async def query(
        self,
        sql: str | Any,  # or an Ibis expression (extra "ibis")
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
        sql: str | Any,  # or an Ibis expression (extra "ibis")
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

    # -- vector search ---------------------------------------------------------------------

    async def search(
        self,
        vector: Any,
        k: int = 10,
        *,
        where: SearchFilter | dict[str, Any] | None = None,
        ef: int | None = None,
        rerank: bool = False,
        one_per_document: bool = False,
        with_rows: bool = False,
        timeout: float | None = None,
    ) -> SearchHits:
        """The ``k`` chunks nearest to ``vector`` (cosine), nearest first.

        ``where`` filters on chunk and document fields (see
        :class:`~symbiote.schema.search.SearchFilter`); the answer is the true filtered
        top-k (index over-fetch checked in DuckDB, or an exact scan in DuckDB when the filter
        is very selective). ``ef`` widens the index search (recall for time);
        ``rerank`` recomputes distances from the stored embeddings; ``one_per_document``
        keeps the nearest chunk of each document; ``with_rows`` adds the chunk rows.
        Bad input raises :class:`InvalidRecord` (field ``vector``) or :class:`BadArgument`
        (``k``, ``ef``, ``where.<field>``...).
        """
        self._index_ref()
        return await self.planner.search(
            vector,
            k,
            where=where,
            ef=ef,
            rerank=rerank,
            one_per_document=one_per_document,
            with_rows=with_rows,
            timeout=self._timeout(timeout),
        )

    async def index_status(self, *, timeout: float | None = None) -> IndexInfo:
        """What the index holds: size, commit sequence, build phase and progress, counters.

        The index is built in the background after a start: ``ready`` is False (and
        ``building`` True) until it has caught up with the table; ``count`` and
        ``highest_seq`` against ``target_seq`` show how far it got. Searches meanwhile use
        what is indexed and scan the rest exactly in DuckDB (everything while a snapshot
        loads): complete, slower the further the build has to go.
        """
        info: IndexInfo = await self._index_ref().ask(IndexStatus(), timeout=self._timeout(timeout))
        return info

    async def wait_index_ready(self, *, timeout: float | None = None) -> IndexInfo:
        """Wait until the index's build after the start has caught up; returns its status.

        Raises :class:`~symbiote.schema.errors.DeadlineExceeded` if it takes longer than
        ``timeout`` (a rebuild of a million 768-d vectors takes minutes).
        """
        info: IndexInfo = await self._index_ref().ask(AwaitReady(), timeout=self._timeout(timeout))
        return info

    async def save_index(self, *, timeout: float | None = None) -> IndexInfo:
        """Save an index snapshot now (if anything changed since the last one)."""
        info: IndexInfo = await self._index_ref().ask(
            SaveSnapshot(), timeout=self._timeout(timeout)
        )
        return info

    def _index_ref(self) -> ActorRef:
        if self._index is None:
            raise ConfigError("vector search is off (index_enabled = false)", field="index_enabled")
        return self._index

    async def _ingest_many(
        self, requests: list[IngestMessages], timeout: float
    ) -> list[WriteAck | SymbioteError]:
        """One batch of the ingest coalescer: one IngestBatch, one outcome per request."""
        acks: WriteAcks = await self._writer.ask(
            IngestBatch(requests=tuple(requests)), timeout=timeout
        )
        return [o if isinstance(o, WriteAck) else error_of(o) for o in acks.outcomes]

    async def _knn(self, vector: Any, k: int, ef: int | None, timeout: float) -> KnnHits:
        self._index_ref()
        assert self._knn_calls is not None  # set whenever the index is
        return await self._knn_calls.call((vector, k, ef), timeout=timeout)

    async def _knn_many(
        self, items: list[tuple[Any, int, int | None]], timeout: float
    ) -> list[KnnHits | SymbioteError]:
        """One batch of the coalescer: a KnnBatch per distinct ``(k, ef)`` (usually one)."""
        groups: dict[tuple[int, int | None], list[int]] = {}
        for i, (_, k, ef) in enumerate(items):
            groups.setdefault((k, ef), []).append(i)
        out: list[KnnHits | SymbioteError | None] = [None] * len(items)
        ref = self._index_ref()

        async def ask(key: tuple[int, int | None], rows: list[int]) -> None:
            vectors = np.stack([items[i][0] for i in rows])
            try:
                hits: KnnBatchHits = await ref.ask(
                    KnnBatch(vectors=vectors, k=key[0], ef=key[1]), timeout=timeout
                )
            except SymbioteError as exc:
                for i in rows:
                    out[i] = exc
            else:
                for i, row in zip(rows, hits.rows, strict=True):
                    out[i] = row

        if len(groups) == 1:
            [(key, rows)] = groups.items()
            await ask(key, rows)
        else:
            # Asked together, so they can land in the same turn of the index actor.
            async with trio.open_nursery() as nursery:
                for key, rows in groups.items():
                    nursery.start_soon(ask, key, rows)
        return [r if r is not None else ActorCrashed("index search: no answer") for r in out]

    async def _sql(self, sql: str, params: list[Any], timeout: float) -> pa.Table:
        table: pa.Table = await self.query(sql, params, fmt="arrow", timeout=timeout)
        return table

    # -- the mesh --------------------------------------------------------------------------

    async def publish(
        self, kind: str, payload: bytes | msgspec.Struct, *, timeout: float | None = None
    ) -> Published:
        """Publish a signed row of ``kind`` to the mesh; returns after it is committed.

        A struct payload is encoded as MessagePack. Peers receive it by anti-entropy and
        store it in their ``mesh_rows``. ``grant`` and ``trust_report`` are published by the
        mesh itself (see :meth:`grant`). Raises ``TooLarge`` over the payload cap, ``LogFull``
        at the log's limits, ``ConfigError`` when the mesh is off.
        """
        data = payload if isinstance(payload, bytes) else msgspec.msgpack.encode(payload)
        published: Published = await self._mesh_ref().ask(
            MeshPublish(kind=kind, payload=data), timeout=self._timeout(timeout)
        )
        return published

    async def grant(
        self,
        peer_id: str,
        tags: Sequence[str],
        *,
        expires_in_s: float = 30 * 86_400.0,
        permissions: Sequence[str] = ("search",),
        redact: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Published:
        """Let ``peer_id`` search this node's documents tagged with any of ``tags``.

        The grant is a row signed by this node; it replaces this node's earlier grant to the
        peer (``permissions=()`` revokes). It expires after ``expires_in_s``. ``redact``
        adds fields blanked from this peer's answers to the configured ``mesh_redact``.
        Bad input raises ``BadArgument`` naming the field.
        """
        if not isinstance(expires_in_s, int | float) or not expires_in_s > 0:
            raise BadArgument("must be a positive number of seconds", field="expires_in_s")
        if isinstance(tags, str):
            tags = [tags]
        try:
            grant = msgspec.convert(
                {
                    "grantee": peer_id,
                    "tags": list(tags),
                    "permissions": list(permissions),
                    "expires_at": int(_dt.datetime.now(_dt.UTC).timestamp() + expires_in_s),
                    "redact": list(redact),
                },
                Grant,
            )
        except msgspec.ValidationError as exc:
            text = str(exc)
            field = text.rsplit("`$.", 1)[-1].rstrip("`").split("[")[0] if "`$." in text else None
            raise BadArgument(text.split(" - at ")[0], field=field) from None
        published: Published = await self._mesh_ref().ask(
            MeshGrant(grant=grant), timeout=self._timeout(timeout)
        )
        return published

    async def federated_search(
        self,
        vector: Any,
        k: int = 10,
        *,
        tags: Sequence[str] = (),
        where: SearchFilter | dict[str, Any] | None = None,
        deadline: float | None = None,
        peers: Sequence[str] | None = None,
        include_local: bool = True,
    ) -> FederatedHits:
        """Search this node and the peers that granted it ``tags``, merged by distance.

        The query goes in parallel to every alive, trusted peer whose grant to this node
        covers one of ``tags`` (any tag when empty), or to exactly ``peers``; each answers
        only from its documents inside the grant, with its redactions. Returns after every
        peer answered or ``deadline`` seconds (``mesh_fed_deadline_s`` by default): peers
        that did not answer in time are in ``missing``. Each hit names its ``origin``.
        ``include_local`` adds this node's own hits (filtered by ``tags`` too).
        """
        wait = self.config.mesh_fed_deadline_s if deadline is None else deadline
        msg = MeshSearch(
            vector=vector,
            k=k,
            tags=(tags,) if isinstance(tags, str) else tuple(tags),
            where=where,
            deadline_s=wait,
            peers=None if peers is None else tuple(peers),
            include_local=include_local,
        )
        timeout = (wait if isinstance(wait, int | float) and wait > 0 else 1.0) + 5.0
        hits: FederatedHits = await self._mesh_ref().ask(msg, timeout=timeout)
        return hits

    async def mesh_members(self, *, timeout: float | None = None) -> list[MemberInfo]:
        """The members this node knows, with status and relative trust."""
        members: list[MemberInfo] = await self._mesh_ref().ask(
            MeshMembers(), timeout=self._timeout(timeout)
        )
        return members

    async def mesh_status(self, *, timeout: float | None = None) -> MeshInfo:
        """This node's peer id, address, row counts and counters."""
        info: MeshInfo = await self._mesh_ref().ask(MeshStatus(), timeout=self._timeout(timeout))
        return info

    async def mesh_join(self, addrs: Sequence[str], *, timeout: float | None = None) -> int:
        """Join the mesh through members' "host:port"; how many answered (JoinFailed if none)."""
        n: int = await self._mesh_ref().ask(
            MeshJoin(addrs=(addrs,) if isinstance(addrs, str) else tuple(addrs)),
            timeout=self._timeout(timeout),
        )
        return n

    async def mesh_flush(self, *, timeout: float | None = None) -> int:
        """Commit every received row still waiting for the database; how many."""
        n: int = await self._mesh_ref().ask(MeshFlush(), timeout=self._timeout(timeout))
        return n

    def _mesh_ref(self) -> ActorRef:
        if self._mesh is None:
            raise ConfigError("the mesh is off (mesh_enabled = false)", field="mesh_enabled")
        return self._mesh

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
    set_db_thread_nice(config.db_thread_nice)
    db = Database(
        config.db_path,
        threads=config.duckdb_threads,
        checkpoint_threshold=config.checkpoint_threshold,
        vacuum=config.db_vacuum,
    )
    partition = partition_spec(config)
    gil_s = None if config.gil_switch_interval_ms is None else config.gil_switch_interval_ms / 1e3
    with switch_interval(gil_s), unwrap_single():
        # The coalescers' tasks outlive the tree: a batch in flight when the body ends is
        # answered by the stopping writer (its committed groups are always answered) and
        # handed on to its callers; only then are the coalescers closed.
        async with trio.open_nursery() as coalescers:
            try:
                async with open_supervisor(build_tree(config, db, partition=partition)) as sup:
                    runtime = Runtime(config, sup, db, partition=partition)
                    await coalescers.start(runtime._ingest_calls.run)
                    if runtime._knn_calls is not None:
                        await coalescers.start(runtime._knn_calls.run)
                    if config.gc_freeze:
                        gc.freeze()
                    log.info(
                        "runtime started",
                        extra={"db_path": config.db_path, "readers": config.readers},
                    )
                    yield runtime
            finally:
                coalescers.cancel_scope.cancel()


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
        ack: WriteAck = self._run("ingest", tuple(messages), timeout=timeout)
        return ack

    def upsert_documents(
        self, documents: Iterable[Document], *, timeout: float | None = None
    ) -> WriteAck:
        """Blocking :meth:`Runtime.upsert_documents`."""
        ack: WriteAck = self._run("upsert_documents", tuple(documents), timeout=timeout)
        return ack

    def upsert_chunks(self, chunks: Iterable[Chunk], *, timeout: float | None = None) -> WriteAck:
        """Blocking :meth:`Runtime.upsert_chunks`."""
        ack: WriteAck = self._run("upsert_chunks", tuple(chunks), timeout=timeout)
        return ack

    def delete_chunks(self, chunk_ids: Iterable[str], *, timeout: float | None = None) -> WriteAck:
        """Blocking :meth:`Runtime.delete_chunks`."""
        ack: WriteAck = self._run("delete_chunks", tuple(chunk_ids), timeout=timeout)
        return ack

    def correct_message(
        self, event_id: str, changes: Mapping[str, Any], *, timeout: float | None = None
    ) -> MessageCorrected:
        """Blocking :meth:`Runtime.correct_message`."""
        done: MessageCorrected = self._run("correct_message", event_id, changes, timeout=timeout)
        return done

    def periods(self, *, timeout: float | None = None) -> list[PeriodInfo]:
        """Blocking :meth:`Runtime.periods`."""
        infos: list[PeriodInfo] = self._run("periods", timeout=timeout)
        return infos

    def move_period(self, period: str, *, timeout: float | None = None) -> MoveResult:
        """Blocking :meth:`Runtime.move_period`."""
        result: MoveResult = self._run("move_period", period, timeout=timeout)
        return result

    def drop_period(
        self,
        period: str,
        tenant: str | None = None,
        *,
        purge: bool = False,
        timeout: float | None = None,
    ) -> DropResult:
        """Blocking :meth:`Runtime.drop_period`."""
        result: DropResult = self._run("drop_period", period, tenant, purge=purge, timeout=timeout)
        return result

    def run_maintenance(self, *, timeout: float | None = None) -> MaintenanceReport:
        """Blocking :meth:`Runtime.run_maintenance`."""
        report: MaintenanceReport = self._run("run_maintenance", timeout=timeout)
        return report

    def query(
        self,
        sql: str | Any,  # or an Ibis expression (extra "ibis")
        params: Params = None,
        *,
        fmt: QueryFormat = "arrow",
        timeout: float | None = None,
    ) -> Any:
        """Blocking :meth:`Runtime.query`."""
        return self._run("query", sql, params, fmt=fmt, timeout=timeout)

    def stream(
        self,
        sql: str | Any,  # or an Ibis expression (extra "ibis")
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

    def search(
        self,
        vector: Any,
        k: int = 10,
        *,
        where: SearchFilter | dict[str, Any] | None = None,
        ef: int | None = None,
        rerank: bool = False,
        one_per_document: bool = False,
        with_rows: bool = False,
        timeout: float | None = None,
    ) -> SearchHits:
        """Blocking :meth:`Runtime.search`."""
        hits: SearchHits = self._run(
            "search",
            vector,
            k,
            where=where,
            ef=ef,
            rerank=rerank,
            one_per_document=one_per_document,
            with_rows=with_rows,
            timeout=timeout,
        )
        return hits

    def index_status(self, *, timeout: float | None = None) -> IndexInfo:
        """Blocking :meth:`Runtime.index_status`."""
        info: IndexInfo = self._run("index_status", timeout=timeout)
        return info

    def wait_index_ready(self, *, timeout: float | None = None) -> IndexInfo:
        """Blocking :meth:`Runtime.wait_index_ready`."""
        info: IndexInfo = self._run("wait_index_ready", timeout=timeout)
        return info

    def save_index(self, *, timeout: float | None = None) -> IndexInfo:
        """Blocking :meth:`Runtime.save_index`."""
        info: IndexInfo = self._run("save_index", timeout=timeout)
        return info

    def publish(
        self, kind: str, payload: bytes | msgspec.Struct, *, timeout: float | None = None
    ) -> Published:
        """Blocking :meth:`Runtime.publish`."""
        published: Published = self._run("publish", kind, payload, timeout=timeout)
        return published

    def grant(
        self,
        peer_id: str,
        tags: Sequence[str],
        *,
        expires_in_s: float = 30 * 86_400.0,
        permissions: Sequence[str] = ("search",),
        redact: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Published:
        """Blocking :meth:`Runtime.grant`."""
        published: Published = self._run(
            "grant",
            peer_id,
            tags,
            expires_in_s=expires_in_s,
            permissions=permissions,
            redact=redact,
            timeout=timeout,
        )
        return published

    def federated_search(
        self,
        vector: Any,
        k: int = 10,
        *,
        tags: Sequence[str] = (),
        where: SearchFilter | dict[str, Any] | None = None,
        deadline: float | None = None,
        peers: Sequence[str] | None = None,
        include_local: bool = True,
    ) -> FederatedHits:
        """Blocking :meth:`Runtime.federated_search`."""
        hits: FederatedHits = self._run(
            "federated_search",
            vector,
            k,
            tags=tags,
            where=where,
            deadline=deadline,
            peers=peers,
            include_local=include_local,
        )
        return hits

    def mesh_members(self, *, timeout: float | None = None) -> list[MemberInfo]:
        """Blocking :meth:`Runtime.mesh_members`."""
        members: list[MemberInfo] = self._run("mesh_members", timeout=timeout)
        return members

    def mesh_status(self, *, timeout: float | None = None) -> MeshInfo:
        """Blocking :meth:`Runtime.mesh_status`."""
        info: MeshInfo = self._run("mesh_status", timeout=timeout)
        return info

    def mesh_join(self, addrs: Sequence[str], *, timeout: float | None = None) -> int:
        """Blocking :meth:`Runtime.mesh_join`."""
        n: int = self._run("mesh_join", addrs, timeout=timeout)
        return n

    def mesh_flush(self, *, timeout: float | None = None) -> int:
        """Blocking :meth:`Runtime.mesh_flush`."""
        n: int = self._run("mesh_flush", timeout=timeout)
        return n

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
