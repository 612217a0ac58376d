"""The index actor: an HNSW index over ``chunks.embedding``, kept as a view of the table.

The database is the source of truth and the index a materialised view of it. The writer
gives every committed chunk upsert and delete a commit sequence (``chunks.seq``, tombstones in
``chunk_deletes``) and tells this actor after each COMMIT (:class:`ChunksCommitted`). The
notices carry ids, not vectors, and the writer drops them when this mailbox is full, so they
are only *wake-ups*: the actor always catches up from the table itself, reading everything
with ``seq`` above the index's ``highest_seq`` in one read transaction per round. A missed
notice is therefore never a lost change: the next notice, or the poll every ``poll_s``
seconds, finds the gap and the same catch-up closes it. Notices that arrive while a round is
being applied coalesce into the next round, so the round size follows the ingest rate.

Life cycle:

* ``on_start`` only registers with the writer and opens a cursor: it returns at once, so
  ``open_runtime`` never waits for an index (a rebuild of a million 768-d vectors takes
  minutes).
* ``run`` builds in the background -- load the newest snapshot from the index folder
  (``<db_path>.index/`` by default), or rebuild from the table when there is none, it is
  damaged, or it claims a ``seq`` the database never reached -- then catches up in bounded
  rounds, with progress logged and snapshots taken along the way (a build killed halfway
  resumes from its last snapshot). Until that first catch-up is done the actor is *not ready*:
  it answers :class:`Knn` and :class:`KnnBatch` with ``ready=False``: no hits while a
  snapshot loads, then the hits of the partial index with the ``highest_seq`` it covers. The
  search planner completes them with an exact scan of the newer rows inside DuckDB (see
  ``KnnHits``). :class:`IndexStatus` reports the phase and progress, :class:`AwaitReady`
  waits for the end of the build.
* Then it follows the writer, serves searches micro-batched (the rows of every pending
  :class:`Knn` and :class:`KnnBatch`, up to ``max_batch``, go into one library call in a
  worker thread, as ``MicroBatcher`` does; the runtime sends one ``KnnBatch`` per turn of
  the loop for all its concurrent callers), and saves a snapshot after enough changes or
  ``snapshot_interval_s`` seconds.
* ``on_stop`` saves a final snapshot if anything changed since the last one -- unless the
  build was still running or a round was cut short (stopping must be prompt; the build resumes
  from its last snapshot).

Threads and locks: every DuckDB call and every index mutation, load, save and search runs in a
worker thread; the actor's loop only moves messages. The DuckDB connection has its own
``CapacityLimiter(1)``; the :class:`VectorIndex` has another, shared by searches and
mutations, so the two never run in parallel on it. A round is applied in sub-batches of
``apply_rows`` vectors, one thread call each, so a search waits for at most one sub-batch and a
stop is seen between sub-batches. Snapshot loads and saves poll a stop flag while they hash
(seconds at a million vectors). A snapshot save only reads the index; it excludes mutations
with a lock but lets searches run beside it.

Bad input (wrong dimension, NaN/inf, all-zero under cosine, ``k`` out of range) is refused
with a typed error naming the field and never reaches the library; the actor stays up.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
import msgspec
import numpy as np
import pyarrow as pa
import trio

from symbiote.actors._threads import run_in_db_thread
from symbiote.actors._vector import (
    Interrupted,
    SnapshotError,
    VectorChecks,
    VectorIndex,
    VectorParams,
    ef_for_size,
)
from symbiote.actors.database import Database
from symbiote.runtime import Actor, ActorRef, Busy, Inbox, Request
from symbiote.schema.ddl import META_CHUNK_SEQ
from symbiote.schema.errors import (
    BadArgument,
    ConfigError,
    DeadlineExceeded,
    InvalidRecord,
    SymbioteError,
)
from symbiote.schema.messages import ChunksCommitted

__all__ = [
    "AwaitReady",
    "Followers",
    "Index",
    "IndexInfo",
    "IndexPhase",
    "IndexSettings",
    "IndexStatus",
    "Knn",
    "KnnBatch",
    "KnnBatchHits",
    "KnnHits",
    "SaveSnapshot",
]

log = logging.getLogger("symbiote.index")

T = TypeVar("T")

_PROGRESS_EVERY_S = 2.0

IndexPhase = Literal["starting", "loading", "rebuilding", "catching_up", "ready"]
"""Where the index actor is: its build phases, then ``ready`` (following the writer)."""


# --------------------------------------------------------------------------- messages


class Knn(msgspec.Struct, frozen=True, kw_only=True):
    """The ``k`` nearest chunks of ``vector`` (a ``(dim,)`` array); answered by :class:`KnnHits`."""

    vector: Any
    k: int
    ef: int | None = None


class KnnBatch(msgspec.Struct, frozen=True, kw_only=True):
    """The ``k`` nearest chunks of each row of ``vectors`` (a ``(q, dim)`` array of at most
    ``IndexSettings.max_batch`` rows); answered by :class:`KnnBatchHits`.

    What the runtime sends for concurrent searches: one message for the crowd instead of one
    per query (see :class:`~symbiote.runtime.Coalescer`). A bad row fails the whole message.
    """

    vectors: Any
    k: int
    ef: int | None = None


class KnnHits(msgspec.Struct, frozen=True, kw_only=True):
    """Nearest first. ``count`` is the index size and ``highest_seq`` its commit sequence.

    ``ready=False`` means the index is still being loaded or built. The hits then come from
    the part built so far: every chunk change up to ``highest_seq`` (empty lists and 0 while
    a snapshot is still loading), perhaps a few newer ones of a round being applied. The
    caller must cover the rest: the planner checks these hits against the table (still
    current, ``seq <= highest_seq``) and scans the rows committed after ``highest_seq``
    exactly in DuckDB.
    """

    chunk_ids: list[str]
    document_ids: list[str]
    distances: list[float]
    count: int
    highest_seq: int
    ready: bool = True


class KnnBatchHits(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a :class:`KnnBatch`: one :class:`KnnHits` per row, in order."""

    rows: list[KnnHits]


class IndexStatus(msgspec.Struct, frozen=True):
    """Ask for an :class:`IndexInfo`."""


class AwaitReady(msgspec.Struct, frozen=True):
    """Answered with an :class:`IndexInfo` once the index's build has caught up."""


class SaveSnapshot(msgspec.Struct, frozen=True):
    """Save a snapshot now if anything changed since the last; answered by :class:`IndexInfo`."""


class IndexInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the index holds and how it got there.

    ``count`` is the number of indexed chunks, ``highest_seq`` the commit sequence they reflect
    and ``target_seq`` the newest one the actor knows the table has reached (the lag is the
    difference). ``building`` is True until the build after a start has caught up (then
    ``ready``); ``phase`` says which step it is in, ``build_s`` how long it took.
    """

    count: int
    highest_seq: int
    target_seq: int
    ready: bool
    building: bool
    phase: IndexPhase
    build_s: float | None
    snapshot_seq: int | None
    changes_since_snapshot: int
    snapshots_saved: int
    loaded_snapshot: bool
    rebuilt: bool
    searches: int
    #: Query rows answered with ``ready=False`` while building.
    searches_not_ready: int
    batches: int
    catchups: int
    notices: int
    #: The ef a search without ``ef=`` uses now (it grows with ``count``; see
    #: :func:`~symbiote.actors._vector.ef_for_size`).
    default_ef: int


class IndexSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the index actor runs; built from the runtime Config by the composition root."""

    params: VectorParams
    #: Snapshot folder; None keeps the index in memory only (e.g. an in-memory database).
    directory: str | None
    #: Snapshot after this many changes, or after ``snapshot_fraction`` of the index size if
    #: that is more: saving costs ~1/40 of inserting the same vectors, so scaling the spacing
    #: with the size keeps snapshots a few percent of the work at any size.
    snapshot_every_changes: int = 50_000
    snapshot_fraction: float = 0.25
    snapshot_interval_s: float = 300.0
    #: Most changes read from the table per catch-up round (bounds memory during builds).
    catchup_rows: int = 20_000
    #: Vectors per library call when applying a round: the longest a search waits behind a
    #: catch-up, and how often a stop is noticed. At 768-d on 2 cores: 71-74 ms per call of
    #: 256 against 297-323 ms per call of 1,024, at the same insert rate (3,469-3,612 against
    #: 3,172-3,443 vectors/s). Searches during a build use the partial index, so they wait
    #: behind these calls.
    apply_rows: int = 256
    #: How often the actor checks the table for commits whose notice was dropped.
    poll_s: float = 1.0
    #: Most query rows in one library call (and in one KnnBatch), and most queued before the
    #: mailbox backs up.
    max_batch: int = 256
    max_pending: int = 1024

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool]] = [
            ("snapshot_every_changes", self.snapshot_every_changes >= 1),
            ("snapshot_fraction", 0.0 <= self.snapshot_fraction <= 10.0),
            ("snapshot_interval_s", self.snapshot_interval_s > 0),
            ("catchup_rows", self.catchup_rows >= 1),
            ("apply_rows", self.apply_rows >= 1),
            ("poll_s", self.poll_s > 0),
            ("max_batch", self.max_batch >= 1),
            ("max_pending", self.max_pending >= 1),
        ]
        for field, ok in checks:
            if not ok:
                raise ConfigError(f"{field} is out of range", field=field)


class Followers:
    """The refs the writer notifies after a commit; an index actor adds itself when it starts.

    Pass :meth:`refs` as the writer's ``subscribers``. Refs are stable across restarts, so an
    entry is never removed: a notice to a restarting follower is simply dropped (it catches up).
    """

    def __init__(self) -> None:
        self._refs: tuple[ActorRef, ...] = ()

    def add(self, ref: ActorRef) -> None:
        """Register ``ref`` (idempotent)."""
        if ref not in self._refs:
            self._refs = (*self._refs, ref)

    def refs(self) -> Sequence[ActorRef]:
        """The registered refs."""
        return self._refs


# --------------------------------------------------------------------------- catch-up data


class _Changes(msgspec.Struct):
    """One catch-up round read from the table: everything with ``after < seq <= upto``."""

    after: int
    upto: int
    high_water: int
    ids: list[str]
    documents: list[str]
    vectors: Any  # float32 (n, dim)
    deleted: list[str]

    @property
    def size(self) -> int:
        return len(self.ids) + len(self.deleted)


class _Search:
    """A checked search request waiting for the library: its rows and how to answer."""

    __slots__ = ("ef", "k", "request", "single", "vectors")

    def __init__(
        self, request: Request, vectors: np.ndarray, k: int, ef: int, single: bool
    ) -> None:
        self.request = request
        self.vectors = vectors  # float32 (rows, dim), C-contiguous
        self.k = k
        self.ef = ef
        self.single = single  # a Knn (answer KnnHits), else a KnnBatch


def _hits(
    ids: list[str | None],
    docs: list[str],
    distances: list[float],
    k: int,
    count: int,
    seq: int,
    ready: bool,
) -> KnnHits:
    """One row of a library answer as :class:`KnnHits` (its first ``k`` live hits)."""
    ids = ids[:k]
    if None in ids:
        # Fewer than k live chunks: the missing slots are at the end of the row.
        ids = ids[: ids.index(None)]
    n = len(ids)
    return KnnHits(
        chunk_ids=ids,  # type: ignore[arg-type]  # no None left
        document_ids=docs[:n],
        distances=distances[:n],
        count=count,
        highest_seq=seq,
        ready=ready,
    )


def _arrow_matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """A FLOAT[dim] Arrow column as a float32 ``(n, dim)`` matrix (no per-row Python)."""
    if len(column) == 0:
        return np.empty((0, dim), dtype=np.float32)
    arr = column.combine_chunks()
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(len(arr), dim)


# --------------------------------------------------------------------------- the actor


class Index(Actor):
    """The HNSW index actor; see the module docstring."""

    accepts = (Knn, KnnBatch, ChunksCommitted, IndexStatus, SaveSnapshot, AwaitReady)

    def __init__(
        self, db: Database, settings: IndexSettings, *, followers: Followers | None = None
    ) -> None:
        self.db = db
        self.settings = settings
        self._followers = followers
        self._checks = VectorChecks(settings.params)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._con_limiter = trio.CapacityLimiter(1)
        self._index_limiter = trio.CapacityLimiter(1)
        self._save_limiter = trio.CapacityLimiter(1)
        # Mutations and snapshot saves exclude each other; searches only need the limiter.
        self._mutation = trio.Lock()
        self._index: VectorIndex | None = None
        self._doc_of: dict[str, str] = {}
        self._target_seq = 0
        self._wake = trio.Event()
        self._pending: list[_Search] = []
        self._pending_rows = 0
        self._work = trio.Event()
        self._room = trio.Event()
        self._waiters: list[Request] = []
        # Set (from the trio thread) once the actor is being stopped; worker threads poll it.
        self._stop = threading.Event()
        self._phase: IndexPhase = "starting"
        self._ready = False
        # True once a partial index can answer while the build goes on: after a snapshot
        # loaded and its document map was read, or at once for a rebuild from empty.
        self._partial = False
        # True while a round is half applied: the index then holds changes above its
        # highest_seq, so it must not be saved as a snapshot of highest_seq.
        self._round_open = False
        self._snapshot_seq: int | None = None
        self._changes_since_snapshot = 0
        #: Set when enough changes piled up for a snapshot (see _snapshot_due).
        self._snapshot_wanted = trio.Event()
        self._last_snapshot_at = time.monotonic()
        self.build_s: float | None = None
        self.loaded_snapshot = False
        self.rebuilt = False
        self.snapshots_saved = 0
        self.searches = 0
        self.searches_not_ready = 0
        self.batches = 0
        self.catchups = 0
        self.notices = 0

    # -- start / stop ----------------------------------------------------------------------

    async def on_start(self) -> None:
        if self._followers is not None:
            # Register before reading the table: a commit from now on either is in our
            # first catch-up or sends us a notice (or is found by the poll).
            self._followers.add(self.ref)
        # Nothing else here: the supervisor's start is shielded and blocks open_runtime, so
        # the (possibly minutes long) load or rebuild happens in run(), in the background.
        self._con = await run_in_db_thread(self.db.cursor, limiter=self._con_limiter)

    async def on_stop(self) -> None:
        try:
            # A stop during the build, or in the middle of a round, skips the final save:
            # stopping must be prompt, and the next start resumes from the last snapshot.
            if (
                self._index is not None
                and self._ready
                and not self._round_open
                and self._changes_since_snapshot
            ):
                await self._save_snapshot(final=True)
        finally:
            con, self._con = self._con, None
            if con is not None:
                await run_in_db_thread(_close_quietly, con, limiter=self._con_limiter)

    # -- the loop --------------------------------------------------------------------------

    async def run(self, inbox: Inbox) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._raise_stop_flag)
            nursery.start_soon(self._searcher)
            nursery.start_soon(self._maintain)
            nursery.start_soon(self._snapshotter)
            async for request in inbox:
                await self._dispatch(request, nursery)
                # Take everything already queued in this same turn (no checkpoint): under
                # load the whole crowd of callers lands in the next batch, not half of it.
                for more in inbox.receive_nowait(self.settings.max_batch):
                    await self._dispatch(more, nursery)
            nursery.cancel_scope.cancel()

    async def _raise_stop_flag(self) -> None:
        # A worker thread cannot see a trio cancellation; this task sees it first (it sleeps
        # at a checkpoint) and raises the flag that the long thread jobs poll.
        try:
            await trio.sleep_forever()
        finally:
            self._stop.set()

    async def _dispatch(self, request: Request, nursery: trio.Nursery) -> None:
        msg = request.msg
        if isinstance(msg, Knn | KnnBatch):
            await self._queue_search(request, msg)
        elif isinstance(msg, ChunksCommitted):
            self.notices += 1
            self._note_commit(msg.high_seq)
            request.reply(None)
        elif isinstance(msg, IndexStatus):
            request.reply(self.info())
        elif isinstance(msg, AwaitReady):
            self._await_ready(request)
        elif isinstance(msg, SaveSnapshot):
            # In a task of its own: a large save must not stop the mailbox.
            nursery.start_soon(self._answer_save, request)

    async def _answer_save(self, request: Request) -> None:
        await self._save_snapshot()
        request.reply(self.info())

    def _await_ready(self, request: Request) -> None:
        if self._ready:
            request.reply(self.info())
            return
        # Bounded: callers that gave up leave, and past max_pending a new one is refused.
        self._waiters = [r for r in self._waiters if not r.abandoned]
        if len(self._waiters) >= self.settings.max_pending:
            request.fail(Busy("too many callers waiting for the index build"))
            return
        self._waiters.append(request)

    def info(self) -> IndexInfo:
        """The current :class:`IndexInfo`."""
        index = self._index
        highest = index.highest_seq if index is not None else 0
        return IndexInfo(
            count=self._indexed(),
            highest_seq=highest,
            target_seq=max(self._target_seq, highest),
            ready=self._ready,
            building=not self._ready,
            phase=self._phase,
            build_s=self.build_s,
            snapshot_seq=self._snapshot_seq,
            changes_since_snapshot=self._changes_since_snapshot,
            snapshots_saved=self.snapshots_saved,
            loaded_snapshot=self.loaded_snapshot,
            rebuilt=self.rebuilt,
            searches=self.searches,
            searches_not_ready=self.searches_not_ready,
            batches=self.batches,
            catchups=self.catchups,
            notices=self.notices,
            default_ef=ef_for_size(self.settings.params, self._indexed()),
        )

    # -- search ----------------------------------------------------------------------------

    async def _queue_search(self, request: Request, msg: Knn | KnnBatch) -> None:
        single = isinstance(msg, Knn)
        try:
            # Validated here, in the caller's turn, so one bad query fails alone and never
            # reaches the library (checks are pure functions of the params: microseconds).
            if isinstance(msg, Knn):
                vectors = _checked_vector(msg.vector, self._checks)[None, :]
            else:
                vectors = self._checked_batch(msg.vectors)
            k = self._checks.check_k(msg.k)
            ef = self._checks.check_ef(msg.ef, self._indexed())
        except SymbioteError as exc:
            request.fail(exc)
            return
        if not self._ready and not self._partial:
            # Nothing searchable yet (the snapshot is still loading): say so at once, and the
            # caller scans exactly.
            self.searches_not_ready += len(vectors)
            hits = KnnHits(
                chunk_ids=[],
                document_ids=[],
                distances=[],
                count=0,
                highest_seq=0,
                ready=False,
            )
            request.reply(hits if single else KnnBatchHits(rows=[hits] * len(vectors)))
            return
        while self._pending_rows >= self.settings.max_pending:
            # Backpressure (counted in query rows: a KnnBatch holds many): stop taking from
            # the mailbox until a batch drains.
            self._room = trio.Event()
            await self._room.wait()
        # hnswlib searches with max(ef, k): grouping by that keeps a big over-fetch from
        # dragging the small queries of its batch up to its ef.
        self._pending.append(_Search(request, vectors, k, max(ef, k), single))
        self._pending_rows += len(vectors)
        self._work.set()

    def _checked_batch(self, vectors: object) -> np.ndarray:
        out = self._checks.check_vectors(vectors, field="vectors")
        if not 1 <= len(out) <= self.settings.max_batch:
            raise BadArgument(
                f"must hold 1 to {self.settings.max_batch} vectors, got {len(out)}",
                field="vectors",
            )
        return out

    async def _searcher(self) -> None:
        while True:
            if not self._pending:
                self._work = trio.Event()
                await self._work.wait()
                continue
            batch = self._take_batch()
            self._room.set()
            groups: dict[int, list[_Search]] = {}
            for search in batch:
                if search.request.abandoned:
                    search.request.fail(
                        DeadlineExceeded("the caller gave up before the search ran")
                    )
                else:
                    groups.setdefault(search.ef, []).append(search)
            for ef, group in groups.items():
                await self._search_group(group, ef)

    def _take_batch(self) -> list[_Search]:
        """The oldest pending searches, at most ``max_batch`` rows (at least one request).

        Taken without a checkpoint: requests queued while the last batch ran go into this
        one, so the batch size follows the load with no timer.
        """
        limit = self.settings.max_batch
        rows = taken = 0
        for search in self._pending:
            n = len(search.vectors)
            if taken and rows + n > limit:
                break
            rows += n
            taken += 1
        batch = self._pending[:taken]
        del self._pending[:taken]
        self._pending_rows -= rows
        return batch

    async def _search_group(self, group: list[_Search], ef: int) -> None:
        index = self._live_index()
        k = max(s.k for s in group)
        if len(group) == 1:
            queries = group[0].vectors
        else:
            queries = np.concatenate([s.vectors for s in group])
        # Read before the search: while building, the hits then come from an index that
        # holds at least every change up to ``seq`` (a round half applied adds newer ones,
        # which the planner checks against the table).
        ready = self._ready
        seq = index.highest_seq
        try:
            # Each query was checked in _queue_search (so one bad request fails alone).
            res = await trio.to_thread.run_sync(
                index.search_checked, queries, k, ef, limiter=self._index_limiter
            )
        except SymbioteError as exc:
            for search in group:
                search.request.fail(exc)
            return
        self.batches += 1
        self.searches += len(queries)
        if not ready:
            self.searches_not_ready += len(queries)
        doc_of = self._doc_of
        count = len(index)
        # Whole-batch conversions: one numpy call each instead of several per row.
        # Clamp float noise: a vector's distance to itself can come out as -2e-7.
        all_ids = res.ids.tolist()
        all_dist = np.maximum(res.distances, 0.0).tolist()
        # Document ids of the whole batch in one pass ("" for a missing slot's None).
        width = res.ids.shape[1]
        flat_docs = [doc_of.get(c, "") for c in itertools.chain.from_iterable(all_ids)]
        row = 0
        for search in group:
            end = row + len(search.vectors)
            hits = [
                _hits(
                    all_ids[r],
                    flat_docs[r * width : (r + 1) * width],
                    all_dist[r],
                    search.k,
                    count,
                    seq,
                    ready,
                )
                for r in range(row, end)
            ]
            row = end
            search.request.reply(hits[0] if search.single else KnnBatchHits(rows=hits))

    # -- build, then follow the writer -----------------------------------------------------

    async def _maintain(self) -> None:
        await self._build()
        await self._follow()

    async def _build(self) -> None:
        """Load the newest snapshot (or start empty) and catch up; then declare ready."""
        started = time.monotonic()
        self._phase = "loading"
        high_water = await self._run_db(self._high_water)
        self._target_seq = max(self._target_seq, high_water)
        index, loaded = await self._stoppable(self._load_snapshot, high_water)
        self._index = index
        if loaded:
            self.loaded_snapshot = True
            self._snapshot_seq = index.highest_seq
            self._phase = "catching_up"
            self._doc_of = await self._run_db(self._read_document_map)
        else:
            self.rebuilt = True
            self._phase = "rebuilding"
        self._partial = True
        log.info(
            "index build started",
            extra={
                "phase": self._phase,
                "indexed": len(index),
                "highest_seq": index.highest_seq,
                "target_seq": self._target_seq,
            },
        )
        await self._catch_up(progress=True)
        self.build_s = time.monotonic() - started
        self._ready = True
        self._phase = "ready"
        waiters, self._waiters = self._waiters, []
        info = self.info()
        for request in waiters:
            request.reply(info)
        log.info(
            "index ready",
            extra={
                "indexed": len(index),
                "highest_seq": index.highest_seq,
                "rebuilt": self.rebuilt,
                "build_s": round(self.build_s, 3),
            },
        )
        # After declaring ready: searches use the index while the snapshot is written.
        if self.rebuilt or self._changes_since_snapshot:
            await self._save_snapshot()

    def _load_snapshot(self, high_water: int) -> tuple[VectorIndex, bool]:
        """The snapshot's index and True, or an empty index and False (worker thread)."""
        directory = self.settings.directory
        params = self.settings.params
        if directory is None:
            return VectorIndex(params), False
        try:
            index = VectorIndex.load(directory, params, should_stop=self._stop.is_set)
        except SnapshotError as exc:
            level = logging.INFO if exc.code == "snapshot_missing" else logging.WARNING
            log.log(level, "no usable index snapshot, rebuilding from the table: %s", exc)
            return VectorIndex(params), False
        if index.highest_seq > high_water:
            # A snapshot ahead of the database belongs to another file (or the file was
            # restored from an older copy): its contents cannot be trusted.
            log.warning(
                "index snapshot is ahead of the database; rebuilding",
                extra={"snapshot_seq": index.highest_seq, "db_seq": high_water},
            )
            return VectorIndex(params), False
        return index, True

    def _note_commit(self, high_seq: int) -> None:
        if high_seq > self._target_seq:
            self._target_seq = high_seq
            self._wake.set()

    async def _follow(self) -> None:
        while True:
            with trio.move_on_after(self.settings.poll_s):
                await self._wake.wait()
            self._wake = trio.Event()
            index = self._live_index()
            if self._target_seq <= index.highest_seq:
                # No notice (or only old ones): ask the table, in case a notice was dropped.
                self._target_seq = max(self._target_seq, await self._run_db(self._high_water))
            lag = self._target_seq - index.highest_seq
            if lag > 0:
                # Far behind (a bulk load, a stall): log progress like a build does.
                await self._catch_up(progress=lag > self.settings.catchup_rows)

    async def _catch_up(self, *, progress: bool) -> None:
        """Apply every committed change above ``highest_seq``, in bounded rounds."""
        index = self._live_index()
        started = time.monotonic()
        last_log = started
        done = 0
        total: int | None = None
        while True:
            after = index.highest_seq
            changes = await self._run_db(self._read_changes, after, self.settings.catchup_rows)
            self._target_seq = max(self._target_seq, changes.high_water)
            if changes.upto <= after:
                break
            if progress and total is None:
                total = await self._run_db(self._count_changes, after)
            await self._apply(changes)
            self.catchups += 1
            done += changes.size
            now = time.monotonic()
            if progress and now - last_log >= _PROGRESS_EVERY_S:
                last_log = now
                log.info(
                    "index catch-up progress",
                    extra={
                        "phase": self._phase,
                        "done": done,
                        "total": total or done,
                        "indexed": len(index),
                        "highest_seq": index.highest_seq,
                        "target_seq": self._target_seq,
                        "rate_per_s": round(done / max(now - started, 1e-9)),
                    },
                )
            if self._changes_since_snapshot >= self._snapshot_due(index):
                # Saved by the snapshotter task: rounds go on once the snapshot's content is
                # fixed instead of waiting for the files (seconds at a million vectors).
                self._snapshot_wanted.set()
            if changes.upto >= changes.high_water:
                break
        if progress and done:
            log.info(
                "index caught up",
                extra={
                    "done": done,
                    "seconds": round(time.monotonic() - started, 3),
                    "indexed": len(index),
                    "highest_seq": index.highest_seq,
                },
            )

    def _snapshot_due(self, index: VectorIndex) -> int:
        fraction = int(len(index) * self.settings.snapshot_fraction)
        return max(self.settings.snapshot_every_changes, fraction)

    async def _apply(self, changes: _Changes) -> None:
        """Apply one round: deletes, then upserts in sub-batches of ``apply_rows``."""
        index = self._live_index()
        step = self.settings.apply_rows
        async with self._mutation:
            self._round_open = True
            # Within a round each id has at most one row in ``chunks`` (its latest version),
            # and any tombstone of an id that still has a row is older than that row; so
            # deletes first, then upserts, gives the same end state as replaying in seq order.
            if changes.deleted:
                await self._run_index(self._apply_deletes, changes.deleted)
            for start in range(0, len(changes.ids), step):
                # One thread call per sub-batch: searches queued on the index limiter get
                # their turn in between, and a stop is seen here.
                await self._run_index(self._apply_upserts, changes, start, start + step)
            index.advance_seq(changes.upto)
            self._round_open = False
            # Counted under the lock, so a snapshot never misses a change it does not hold.
            self._changes_since_snapshot += changes.size

    def _apply_deletes(self, deleted: list[str]) -> None:
        """Worker thread, under the index limiter."""
        self._live_index().delete(deleted)
        doc_of = self._doc_of
        for cid in deleted:
            doc_of.pop(cid, None)

    def _apply_upserts(self, changes: _Changes, start: int, end: int) -> None:
        """Worker thread, under the index limiter."""
        ids = changes.ids[start:end]
        self._live_index().add(ids, changes.vectors[start:end])
        self._doc_of.update(zip(ids, changes.documents[start:end], strict=True))

    # -- snapshots -------------------------------------------------------------------------

    async def _snapshotter(self) -> None:
        while True:
            with trio.move_on_after(self.settings.snapshot_interval_s):
                await self._snapshot_wanted.wait()
            self._snapshot_wanted = trio.Event()
            if self._changes_since_snapshot:
                await self._save_snapshot()

    async def _save_snapshot(self, *, final: bool = False) -> None:
        directory = self.settings.directory
        index = self._index
        if directory is None or index is None:
            return
        await self._mutation.acquire()
        held = True
        try:
            if self._snapshot_seq == index.highest_seq and not self._changes_since_snapshot:
                return
            started = time.monotonic()
            # What the snapshot will hold: the index as it is now, under the mutation lock.
            seq, changes = index.highest_seq, self._changes_since_snapshot
            fixed = trio.Event()
            token = trio.lowlevel.current_trio_token()
            # No index limiter: a save only reads the index, and searches may run beside it.
            # Changes wait only until the snapshot's content is fixed (right after the fork
            # when a child writes the files, the whole write otherwise). Only the final save
            # (in on_stop, after the stop flag is up) must not give up half way.
            should_stop = None if final else self._stop.is_set

            def save() -> Path:
                return index.save(
                    directory,
                    should_stop=should_stop,
                    on_image=lambda: token.run_sync_soon(fixed.set),
                )

            async def run_save() -> None:
                try:
                    await self._stoppable(save, limiter=self._save_limiter)
                finally:
                    fixed.set()  # a failed save releases the changes too

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_save)
                await fixed.wait()
                self._mutation.release()
                held = False
            self._snapshot_seq = seq
            # Changes applied while the child wrote count toward the next snapshot.
            self._changes_since_snapshot -= changes
            self._last_snapshot_at = time.monotonic()
            self.snapshots_saved += 1
            log.info(
                "index snapshot saved",
                extra={
                    "indexed": len(index),
                    "highest_seq": seq,
                    "seconds": round(self._last_snapshot_at - started, 3),
                },
            )
        finally:
            if held:
                self._mutation.release()

    # -- worker threads --------------------------------------------------------------------

    async def _stoppable(
        self,
        fn: Callable[..., T],
        *args: Any,
        limiter: trio.CapacityLimiter | None = None,
    ) -> T:
        """Run a long job that polls the stop flag (snapshot load/save) in a worker thread."""
        try:
            return await run_in_db_thread(fn, *args, limiter=limiter or self._save_limiter)
        except Interrupted:
            # Only the stop flag raises this, and it goes up only once this task is
            # cancelled: let the cancellation surface instead of a crash.
            await trio.lowlevel.checkpoint()
            raise

    async def _run_index(self, fn: Callable[..., T], *args: Any) -> T:
        # Index mutations are background work like DuckDB's: a lowered-priority thread, so
        # two library threads on a 2-core machine do not starve the event loop.
        return await run_in_db_thread(fn, *args, limiter=self._index_limiter)

    async def _run_db(self, fn: Callable[..., T], *args: Any) -> T:
        return await run_in_db_thread(fn, *args, limiter=self._con_limiter)

    # -- DuckDB (worker threads, our own connection) ---------------------------------------

    def _connection(self) -> duckdb.DuckDBPyConnection:
        assert self._con is not None, "index used before on_start"
        return self._con

    def _high_water(self) -> int:
        row = (
            self._connection()
            .execute("SELECT value FROM symbiote_meta WHERE key = ?", [META_CHUNK_SEQ])
            .fetchone()
        )
        return int(row[0]) if row else 0

    def _read_document_map(self) -> dict[str, str]:
        table = (
            self._connection().execute("SELECT chunk_id, document_id FROM chunks").to_arrow_table()
        )
        return dict(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))

    def _count_changes(self, after: int) -> int:
        row = (
            self._connection()
            .execute(
                "SELECT (SELECT count(*) FROM chunks WHERE seq > $a)"
                " + (SELECT count(*) FROM chunk_deletes WHERE seq > $a)",
                {"a": after},
            )
            .fetchone()
        )
        return int(row[0]) if row else 0

    def _read_changes(self, after: int, limit: int) -> _Changes:
        """Changes with ``seq > after``, at most ``limit`` of them, from one consistent read."""
        con = self._connection()
        dim = self.settings.params.dim
        con.execute("BEGIN TRANSACTION")
        try:
            high_water = self._high_water()
            upto = high_water
            ids: list[str] = []
            documents: list[str] = []
            vectors = np.empty((0, dim), dtype=np.float32)
            deleted: list[str] = []
            if high_water > after:
                if high_water - after > limit:
                    # Every change has its own seq, so a gap of at most ``limit`` seqs holds
                    # at most ``limit`` changes and needs no bound; only a larger one is cut
                    # at the limit-th event (only the seq columns are sorted).
                    row = con.execute(
                        "SELECT seq FROM (SELECT seq FROM chunks WHERE seq > $a AND seq <= $h"
                        " UNION ALL SELECT seq FROM chunk_deletes WHERE seq > $a AND seq <= $h)"
                        " ORDER BY seq LIMIT 1 OFFSET $n",
                        {"a": after, "h": high_water, "n": limit - 1},
                    ).fetchone()
                    if row is not None:
                        upto = int(row[0])
                table = con.execute(
                    "SELECT chunk_id, document_id, embedding FROM chunks"
                    " WHERE seq > $a AND seq <= $u",
                    {"a": after, "u": upto},
                ).to_arrow_table()
                ids = table.column(0).to_pylist()
                documents = table.column(1).to_pylist()
                vectors = _arrow_matrix(table.column(2), dim)
                deleted = [
                    r[0]
                    for r in con.execute(
                        "SELECT chunk_id FROM chunk_deletes WHERE seq > $a AND seq <= $u",
                        {"a": after, "u": upto},
                    ).fetchall()
                ]
            con.execute("COMMIT")
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            raise
        return _Changes(
            after=after,
            upto=max(upto, after),
            high_water=high_water,
            ids=ids,
            documents=documents,
            vectors=vectors,
            deleted=deleted,
        )

    # -- helpers ---------------------------------------------------------------------------

    def _indexed(self) -> int:
        """How many vectors the index holds now (0 before it is loaded)."""
        return len(self._index) if self._index is not None else 0

    def _live_index(self) -> VectorIndex:
        assert self._index is not None, "index used before it was loaded"
        return self._index


def _checked_vector(vector: object, checks: VectorChecks) -> np.ndarray:
    """One query vector, checked; a float32 ``(dim,)`` array (what the planner sends) costs
    one dot product, anything else goes through the full :meth:`VectorChecks.check_vectors`."""
    dim = checks.params.dim
    if (
        type(vector) is np.ndarray
        and vector.dtype == np.float32
        and vector.shape == (dim,)
        and checks.params.metric == "cosine"
    ):
        norm2 = float(np.dot(vector, vector))
        # NaN/inf make the dot product NaN/inf; only the zero vector gives 0, which has no
        # direction under cosine.
        if math.isfinite(norm2) and norm2 > 0 and vector.flags.c_contiguous:
            return vector
    vectors = checks.check_vectors(vector, field="vector")
    if len(vectors) != 1:
        raise InvalidRecord("expected exactly one query vector", field="vector")
    out: np.ndarray = vectors[0]
    return out


def _close_quietly(con: duckdb.DuckDBPyConnection) -> None:
    # After a writer crash the instance may be closed already; there is nothing left to free.
    try:
        con.close()
    except duckdb.Error as exc:
        log.debug("index connection close: %s", exc)


def default_index_dir(db_path: str) -> str | None:
    """Where snapshots go for ``db_path``: ``<db_path>.index``; None for ``:memory:``."""
    if db_path == ":memory:" or db_path.startswith(":memory:"):
        return None
    return str(Path(db_path).with_name(Path(db_path).name + ".index"))
