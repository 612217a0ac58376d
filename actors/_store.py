"""The writer's synchronous write path: apply a group of write requests in one transaction.

The writer actor drains its mailbox into a list of requests and calls :func:`apply_batch` in a
worker thread on the connection it owns. The whole group is written in ONE transaction (one
commit is a few ms whatever its size, so throughput comes from grouping). If that transaction
fails, it is rolled back and the group is split in halves, recursively, until the request that
fails is alone: it gets its typed error and every other request still commits. Requests
commit in their original order, so "last wins" holds across the halves too.

:func:`apply_batch` returns only after every COMMIT has returned; the caller acknowledges
requests from the returned outcomes and then publishes the committed chunk changes.

Nothing here knows about trio: it is plain blocking code on one ``DuckDBPyConnection``.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

import duckdb
import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from symbiote.actors._partition import PartitionSpec, archived_duplicates
from symbiote.schema.ddl import META_CHUNK_SEQ, read_meta
from symbiote.schema.errors import (
    Failure,
    InvalidRecord,
    QueryError,
    SymbioteError,
    TooLarge,
    WriteConflict,
    WrongMessage,
)
from symbiote.schema.messages import (
    ChunkChange,
    ChunksCommitted,
    CorrectMessage,
    DeleteChunks,
    IngestMessages,
    PersistMesh,
    UpsertChunks,
    UpsertDocuments,
    WriteAck,
    WriteOutcome,
    WriteRequest,
)
from symbiote.schema.records import (
    Chunk,
    Document,
    Limits,
    Message,
    validate_chunks,
    validate_documents,
    validate_message_changes,
    validate_messages,
)

__all__ = ["BatchResult", "StoreState", "apply_batch", "prepare_request"]

_R = TypeVar("_R")

log = logging.getLogger(__name__)

# Errors after which the connection (or the whole database instance) cannot be trusted: the
# writer must stop and be restarted rather than blame a request.
_FATAL: Final = (
    duckdb.FatalException,
    duckdb.InternalException,
    duckdb.InterruptException,
    duckdb.ConnectionException,  # the connection is gone: blaming a request would loop forever
)

_TS: Final = pa.timestamp("us", tz="UTC")
_STR: Final = pa.string()
_STR_LIST: Final = pa.list_(pa.string())
_json_encoder: Final = msgspec.json.Encoder()


# --------------------------------------------------------------------------------------------
# state and result


class StoreState:
    """What the writer keeps between batches: the limits and the last committed chunk ``seq``.

    Build it with :meth:`load` after :func:`~symbiote.schema.ddl.migrate`. Only
    :func:`apply_batch` advances ``high_seq``, and only after a COMMIT returned.
    """

    __slots__ = ("careful_groups", "high_seq", "limits", "partition")

    def __init__(
        self, limits: Limits, high_seq: int = 0, partition: PartitionSpec | None = None
    ) -> None:
        self.limits = limits
        self.high_seq = high_seq
        #: The hot/cold layout of messages, if archived months may exist (docs/partitioning.md):
        #: its fence tells which incoming rows must be checked against the archive.
        self.partition = partition
        # Groups left to write messages with ON CONFLICT after a duplicate was met (retries
        # come in bursts after a crash); 0 means the optimistic plain INSERT.
        self.careful_groups = 0

    @classmethod
    def load(
        cls,
        con: duckdb.DuckDBPyConnection,
        limits: Limits,
        partition: PartitionSpec | None = None,
    ) -> StoreState:
        """Read the sequence high-water mark (and the newest archived month) from the database."""
        if partition is not None:
            partition.fence.load(con, partition)
        stored = int(read_meta(con, META_CHUNK_SEQ) or 0)
        # The meta row is written in the same transaction as the rows, so it cannot lag; the
        # max over the tables is a belt-and-braces guard for files edited by hand.
        row = con.execute(
            "SELECT greatest((SELECT coalesce(max(seq), 0) FROM chunks),"
            " (SELECT coalesce(max(seq), 0) FROM chunk_deletes))"
        ).fetchone()
        return cls(limits, max(stored, int(row[0]) if row else 0), partition)


class BatchResult(msgspec.Struct, kw_only=True):
    """The result of :func:`apply_batch`.

    ``outcomes[i]`` answers ``requests[i]``. ``changes`` lists committed chunk upserts and
    deletes in ``seq`` order (empty if none); ``commits`` and ``attempts`` count transactions
    committed and tried (more attempts than commits means a request failed and was isolated).
    """

    outcomes: list[WriteOutcome]
    changes: list[ChunkChange]
    high_seq: int
    commits: int = 0
    attempts: int = 0

    def chunks_committed(self) -> ChunksCommitted | None:
        """The message to tell the index actor, or None if no chunk changed."""
        if not self.changes:
            return None
        return ChunksCommitted(changes=tuple(self.changes), high_seq=self.high_seq)


# --------------------------------------------------------------------------------------------
# preparation: per-request validation and JSON encoding (so errors carry the request's paths)

_Kind = Literal["messages", "documents", "chunks", "delete", "correct", "mesh"]


@dataclass(slots=True)
class _Prepared:
    index: int
    kind: _Kind
    # Exactly one of these four holds the request's rows, according to ``kind``.
    messages: tuple[Message, ...] = ()
    documents: tuple[Document, ...] = ()
    chunks: tuple[Chunk, ...] = ()
    ids: tuple[str, ...] = ()
    # Pre-encoded JSON columns (attrs/pii_flags, extensions, metadata), aligned with the rows.
    json_a: list[bytes | None] = field(default_factory=list)
    json_b: list[bytes | None] = field(default_factory=list)
    matrix: npt.NDArray[np.float32] | None = None
    # A correction: the message's key and its new column values (JSON already encoded).
    event_id: str = ""
    changes: dict[str, Any] = field(default_factory=dict)
    # Mesh state to store (rows, grants, peers, keys, trust): the mesh actor's request.
    mesh: PersistMesh | None = None
    #: A merged group of message requests, validated together: (request index, its
    #: messages) for each. None for a prepared single request.
    parts: list[tuple[int, tuple[Message, ...]]] | None = None

    @property
    def root(self) -> str:
        if self.kind == "delete":
            return "chunk_ids"
        return "changes" if self.kind == "correct" else self.kind

    @property
    def size(self) -> int:
        n = len(self.messages) + len(self.documents) + len(self.chunks) + len(self.ids)
        if self.mesh is not None:
            n += self.mesh.size()
        return n + (self.kind == "correct")


def _encode_json(values: Iterable[Any], cap: int, path: str, name: str) -> list[bytes | None]:
    out: list[bytes | None] = []
    append = out.append
    encode = _json_encoder.encode
    for i, value in enumerate(values):
        if value is None:
            append(None)
            continue
        try:
            raw = encode(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidRecord(f"not JSON-encodable: {exc}", field=f"{path}[{i}].{name}") from None
        if len(raw) > cap:
            raise TooLarge(f"JSON larger than {cap} bytes", field=f"{path}[{i}].{name}")
        append(raw)
    return out


def _encode_one_json(value: Any, cap: int, path: str) -> str:
    try:
        raw = _json_encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRecord(f"not JSON-encodable: {exc}", field=path) from None
    if len(raw) > cap:
        raise TooLarge(f"JSON larger than {cap} bytes", field=path)
    return raw.decode()


def _records(values: tuple[_R, ...], path: str) -> tuple[_R, ...]:
    # A struct does not check its field types when built in Python; a request that did not
    # come through the runtime may carry anything in place of its tuple of records.
    if isinstance(values, tuple):
        return values
    if isinstance(values, list):
        return tuple(values)
    raise InvalidRecord(f"expected a tuple, got {type(values).__name__}", field=path)


def prepare_request(
    index: int, request: WriteRequest, limits: Limits, *, validate: bool = True
) -> _Prepared:
    """Validate one request and encode its JSON fields; raise a :class:`SymbioteError` if bad.

    ``validate=False`` skips the record checks (for requests the caller already validated) but
    still encodes and size-checks JSON.
    """
    if isinstance(request, IngestMessages):
        msgs = _records(request.messages, "messages")
        if validate:
            validate_messages(msgs, limits)
        cap = limits.max_json_bytes
        return _Prepared(
            index,
            "messages",
            messages=msgs,
            json_a=_encode_json((m.attrs for m in msgs), cap, "messages", "attrs"),
            json_b=_encode_json((m.pii_flags for m in msgs), cap, "messages", "pii_flags"),
        )
    if isinstance(request, UpsertDocuments):
        docs = _records(request.documents, "documents")
        if validate:
            validate_documents(docs, limits)
        return _Prepared(
            index,
            "documents",
            documents=docs,
            json_a=_encode_json(
                (d.extensions for d in docs), limits.max_json_bytes, "documents", "extensions"
            ),
        )
    if isinstance(request, UpsertChunks):
        chunks = _records(request.chunks, "chunks")
        # The embedding matrix is needed to write anyway, so it is always built and checked.
        matrix = validate_chunks(chunks, limits)
        return _Prepared(
            index,
            "chunks",
            chunks=chunks,
            json_a=_encode_json(
                (c.metadata for c in chunks), limits.max_json_bytes, "chunks", "metadata"
            ),
            matrix=matrix,
        )
    if isinstance(request, CorrectMessage):
        validate_message_changes(request.event_id, request.changes, limits)
        changes: dict[str, Any] = {}
        for name, value in request.changes.items():
            if name in ("attrs", "pii_flags") and value is not None:
                value = _encode_one_json(value, limits.max_json_bytes, f"changes.{name}")
            changes[name] = value
        return _Prepared(index, "correct", event_id=request.event_id, changes=changes)
    if isinstance(request, DeleteChunks):
        ids = _records(request.chunk_ids, "chunk_ids")
        if len(ids) > limits.max_rows_per_request:
            raise TooLarge(
                f"{len(ids)} ids, more than {limits.max_rows_per_request}", field="chunk_ids"
            )
        for i, chunk_id in enumerate(ids):
            if type(chunk_id) is not str or not chunk_id:
                raise InvalidRecord(
                    f"expected a non-empty str, got {chunk_id!r:.40}", field=f"chunk_ids[{i}]"
                )
        return _Prepared(index, "delete", ids=ids)
    if isinstance(request, PersistMesh):
        _check_mesh(request, limits)
        return _Prepared(index, "mesh", mesh=request)
    raise WrongMessage(f"the writer does not accept {type(request).__name__}", field="request")


# --------------------------------------------------------------------------------------------
# statements


class _StatementError(Exception):
    """A DuckDB error, tagged with the statement that raised it."""

    def __init__(self, statement: str, cause: duckdb.Error) -> None:
        super().__init__(f"{statement}: {cause}")
        self.statement = statement
        self.cause = cause


class _ColumnError(Exception):
    """Arrow could not build a column from the records' values."""

    def __init__(self, column: str, cause: Exception) -> None:
        super().__init__(f"{column}: {cause}")
        self.column = column
        self.cause = cause


def _exec(
    con: duckdb.DuckDBPyConnection,
    label: str,
    sql: str,
    params: Sequence[object] | None = None,
    rows: pa.Table | None = None,
) -> duckdb.DuckDBPyConnection:
    # ``rows`` is what the statement reads as ``_symbiote_rows``: DuckDB resolves a table
    # name it does not know to a local variable of the frame calling ``execute`` (a
    # replacement scan; a catalog table of that name would win, and none exists).
    # Registering a view instead is a catalog change in the transaction: 0.8 ms more per
    # transaction into messages_hot (2.7 against 3.6 ms for one row, 10.1 against 11.1 ms
    # for 2,000; docs/data-layer.md).
    _symbiote_rows = rows  # read by DuckDB, by name
    try:
        return con.execute(sql, params)
    except _FATAL:
        raise
    except duckdb.Error as exc:
        raise _StatementError(label, exc) from exc


def _col(name: str, values: list[Any], typ: pa.DataType) -> pa.Array:
    try:
        return pa.array(values, typ)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
        raise _ColumnError(name, exc) from exc


def _utc_col(name: str, values: list[_dt.datetime]) -> pa.Array:
    """A timestamp column of validated, timezone-aware datetimes.

    pyarrow converts an aware datetime in about 230 ns. When every value is in UTC the column
    is built from msgspec's ISO strings and cast by Arrow instead, about 110 ns a value. Only
    then: msgspec writes an offset to the minute, so a zone with an offset in seconds (old
    local mean times) takes pyarrow's own conversion.
    """
    # `is` per value, not a set of zones: a tzinfo may be unhashable (dateutil's are).
    if all(v.tzinfo is _dt.UTC for v in values):
        try:
            return pc.cast(pa.array(msgspec.to_builtins(values), _STR), _TS)
        except (pa.ArrowException, msgspec.MsgspecError, TypeError, ValueError):
            pass  # pyarrow's conversion below names the fault
    return _col(name, values, _TS)


def _created_col(values: list[_dt.datetime | None], now: _dt.datetime) -> pa.Array:
    """``created_at``: the commit's ``now`` where a message has none (nearly always all)."""
    if values.count(None) == len(values):
        return pa.repeat(pa.scalar(now, _TS), len(values))
    return _utc_col("created_at", [now if v is None else v for v in values])


def _insert_arrow(
    con: duckdb.DuckDBPyConnection, label: str, table: pa.Table, sql: str
) -> list[tuple[Any, ...]]:
    """Run ``sql``, which reads ``table`` as ``_symbiote_rows``; its result rows."""
    return _exec(con, label, sql, rows=table).fetchall()


def _first_wins(keys: list[str]) -> list[int] | None:
    """Row positions keeping the first of each key, or None if keys are already unique."""
    if len(set(keys)) == len(keys):
        return None
    seen: set[str] = set()
    keep: list[int] = []
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def _last_wins(keys: list[str]) -> list[int] | None:
    """Row positions keeping the last of each key, or None if keys are already unique."""
    last = {key: i for i, key in enumerate(keys)}
    if len(last) == len(keys):
        return None
    return sorted(last.values())


def _take(values: list[Any], keep: list[int] | None) -> list[Any]:
    return values if keep is None else [values[i] for i in keep]


#: Groups written the careful way after a duplicate event_id was met.
CAREFUL_AFTER_CONFLICT: Final = 50


def _insert_all_new(con: duckdb.DuckDBPyConnection, table: pa.Table) -> bool:
    """Try a plain INSERT of ``table``; False (transaction restarted) if an event_id exists.

    A plain INSERT costs about half of ``ON CONFLICT DO NOTHING RETURNING`` per commit on
    the unique index (4 ms against 6 ms for a 150-row group here), and in real-time ingest
    nearly every message is new. When one is not, the failed statement has aborted the
    transaction: this is the transaction's first statement (see ``_attempt``), so restarting
    it loses nothing, and the caller goes on with the careful statement.
    """
    try:
        _insert_arrow(
            con,
            "INSERT INTO messages_hot",
            table,
            "INSERT INTO messages_hot BY NAME SELECT * FROM _symbiote_rows",
        )
    except _StatementError as exc:
        if not isinstance(exc.cause, duckdb.ConstraintException):
            raise
        _rollback(con)
        _exec(con, "BEGIN", "BEGIN TRANSACTION")
        return False
    return True


def _drop_archived_repeats(
    con: duckdb.DuckDBPyConnection,
    spec: PartitionSpec,
    table: pa.Table,
    inserted: set[str] | None,
) -> set[str]:
    """Undo the insert of rows an archived month already holds; return their keys.

    ``inserted`` holds the keys the INSERT stored; None means every row of ``table``.

    The hot table's unique index covers hot rows only, so a retry of a message whose month
    was moved to Parquet went in as new. Runs after the INSERT, inside its transaction: the
    transaction's snapshot is fixed by then, so the fence read now covers every move that
    snapshot can see (:class:`~symbiote.actors._partition.ArchiveFence`). In real-time
    ingest every row is newer than the fence and this costs one Arrow ``min``, no query.
    """
    fence = spec.fence.end
    if fence is None or table.num_rows == 0 or (inserted is not None and not inserted):
        return set()
    ts = table.column("ts")
    if pc.min(ts).as_py() >= fence:
        return set()
    old = table.filter(pc.less(ts, pa.scalar(fence, _TS)))
    if inserted is not None:
        old = old.filter(pc.is_in(old.column("event_id"), pa.array(sorted(inserted), _STR)))
    if old.num_rows == 0:
        return set()
    # If the archive cannot be read this raises QueryError(field="archive"): the request
    # fails (alone, after bisection) rather than risk a message seen twice.
    repeats = archived_duplicates(
        con, spec, old.select([spec.key_column, spec.ts_column, spec.tenant_column])
    )
    if repeats:
        _insert_arrow(
            con,
            "DELETE FROM messages_hot",
            pa.table({"event_id": pa.array(sorted(repeats), _STR)}),
            "DELETE FROM messages_hot WHERE event_id IN (SELECT event_id FROM _symbiote_rows)",
        )
        log.info("skipped %d retries of archived messages", len(repeats))
    return repeats


def _write_messages(
    con: duckdb.DuckDBPyConnection,
    preps: list[_Prepared],
    now: _dt.datetime,
    state: StoreState,
) -> dict[int, WriteAck]:
    msgs = [m for p in preps for m in p.messages]
    attrs = [a for p in preps for a in p.json_a]
    pii = [a for p in preps for a in p.json_b]
    event_ids = [m.event_id for m in msgs]
    # DuckDB keeps the first duplicate within one statement too, but that is not documented:
    # deduplicate here so that "first occurrence wins" is ours to guarantee.
    keep = _first_wins(event_ids)
    if keep is not None:
        msgs = [msgs[i] for i in keep]
    table = pa.table(
        {
            "event_id": _col("event_id", _take(event_ids, keep), _STR),
            "tenant_id": _col("tenant_id", [m.tenant_id for m in msgs], _STR),
            "source": _col("source", [m.source for m in msgs], _STR),
            "thread_id": _col("thread_id", [m.thread_id for m in msgs], _STR),
            "msg_id": _col("msg_id", [m.msg_id for m in msgs], _STR),
            "ts": _utc_col("ts", [m.ts for m in msgs]),
            "author_raw": _col("author_raw", [m.author_raw for m in msgs], _STR),
            "author_uuid": _col("author_uuid", [m.author_uuid for m in msgs], _STR),
            "text": _col("text", [m.text for m in msgs], _STR),
            "media_url": _col("media_url", [m.media_url for m in msgs], _STR),
            "media_type": _col("media_type", [m.media_type for m in msgs], _STR),
            "attrs": _col("attrs", _take(attrs, keep), _STR),
            "pii_flags": _col("pii_flags", _take(pii, keep), _STR),
            "created_at": _created_col([m.created_at for m in msgs], now),
            "created_by_run": _col("created_by_run", [m.created_by_run for m in msgs], _STR),
        }
    )
    inserted: set[str] | None
    if state.careful_groups == 0 and _insert_all_new(con, table):
        inserted = None  # every row of the table went in
    else:
        state.careful_groups = (
            CAREFUL_AFTER_CONFLICT if state.careful_groups == 0 else state.careful_groups - 1
        )
        rows = _insert_arrow(
            con,
            "INSERT INTO messages_hot",
            table,
            "INSERT INTO messages_hot BY NAME SELECT * FROM _symbiote_rows"
            " ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        )
        inserted = {r[0] for r in rows}
    repeats: set[str] = set()
    if state.partition is not None:
        repeats = _drop_archived_repeats(con, state.partition, table, inserted)
    if inserted is None and keep is None and not repeats:
        # The real-time case: every message of the group was new. Acks are values, so one
        # per request size serves all (building a set of the keys and checking each message
        # against it cost about a microsecond per message).
        return _all_written(preps)
    if inserted is None:
        inserted = set(table.column("event_id").to_pylist())
    inserted -= repeats
    acks: dict[int, WriteAck] = {}
    credited: set[str] = set()
    for p in preps:
        for index, messages in p.parts if p.parts is not None else ((p.index, p.messages),):
            new = 0
            for m in messages:
                eid = m.event_id
                if eid in inserted and eid not in credited:
                    credited.add(eid)
                    new += 1
            acks[index] = WriteAck(written=new, duplicates=len(messages) - new)
    return acks


def _all_written(preps: list[_Prepared]) -> dict[int, WriteAck]:
    acks: dict[int, WriteAck] = {}
    by_size: dict[int, WriteAck] = {}
    for p in preps:
        for index, messages in p.parts if p.parts is not None else ((p.index, p.messages),):
            n = len(messages)
            ack = by_size.get(n)
            if ack is None:
                ack = by_size[n] = WriteAck(written=n)
            acks[index] = ack
    return acks


def _write_documents(con: duckdb.DuckDBPyConnection, preps: list[_Prepared]) -> dict[int, WriteAck]:
    docs = [d for p in preps for d in p.documents]
    ext = [e for p in preps for e in p.json_a]
    ids = [d.id for d in docs]
    # An upsert statement may not touch one key twice, and the later request is the newer
    # version: keep the last.
    keep = _last_wins(ids)
    if keep is not None:
        docs = [docs[i] for i in keep]
    table = pa.table(
        {
            "id": _col("id", _take(ids, keep), _STR),
            "content": _col("content", [d.content for d in docs], _STR),
            "created_at": _col("created_at", [d.created_at for d in docs], _TS),
            "source_checksum": _col("source_checksum", [d.source_checksum for d in docs], _STR),
            "title": _col("title", [d.title for d in docs], _STR),
            "slug": _col("slug", [d.slug for d in docs], _STR),
            "date": _col("date", [d.date for d in docs], pa.date32()),
            "summary": _col("summary", [d.summary for d in docs], _STR),
            "authors": _col("authors", [d.authors for d in docs], _STR_LIST),
            "tags": _col("tags", [d.tags for d in docs], _STR_LIST),
            "status": _col("status", [d.status for d in docs], _STR),
            "subject_uuid": _col("subject_uuid", [d.subject_uuid for d in docs], _STR),
            "alias": _col("alias", [d.alias for d in docs], _STR),
            "avatar_url": _col("avatar_url", [d.avatar_url for d in docs], _STR),
            "interests": _col("interests", [d.interests for d in docs], _STR_LIST),
            "filename": _col("filename", [d.filename for d in docs], _STR),
            "mime_type": _col("mime_type", [d.mime_type for d in docs], _STR),
            "media_type": _col("media_type", [d.media_type for d in docs], _STR),
            "phash": _col("phash", [d.phash for d in docs], _STR),
            "window_start": _col("window_start", [d.window_start for d in docs], _TS),
            "window_end": _col("window_end", [d.window_end for d in docs], _TS),
            "doc_type": _col("doc_type", [d.doc_type for d in docs], _STR),
            "extensions": _col("extensions", _take(ext, keep), _STR),
        }
    )
    _insert_arrow(
        con,
        "INSERT OR REPLACE INTO documents",
        table,
        "INSERT OR REPLACE INTO documents BY NAME SELECT * FROM _symbiote_rows",
    )
    acks: dict[int, WriteAck] = {}
    for p in preps:
        n = len(p.documents)
        distinct = len({d.id for d in p.documents})
        acks[p.index] = WriteAck(written=distinct, duplicates=n - distinct)
    return acks


def _correct_messages(
    con: duckdb.DuckDBPyConnection, preps: list[_Prepared]
) -> dict[int, WriteAck]:
    """Apply corrections to hot rows, in request order; ``written=0`` when no hot row matched."""
    acks: dict[int, WriteAck] = {}
    for p in preps:
        names = sorted(p.changes)
        sets = ", ".join(f'"{n}" = ?' for n in names)  # names checked against a fixed set
        rows = _exec(
            con,
            "UPDATE messages_hot",
            f"UPDATE messages_hot SET {sets} WHERE event_id = ? RETURNING event_id",
            [*(p.changes[n] for n in names), p.event_id],
        ).fetchall()
        acks[p.index] = WriteAck(written=len(rows))
    return acks


def _current_seqs(con: duckdb.DuckDBPyConnection, chunk_ids: list[str]) -> dict[str, int]:
    """The stored seq of each of ``chunk_ids`` that exists (from ``chunk_keys``)."""
    if not chunk_ids:
        return {}
    rows = _insert_arrow(
        con,
        "SELECT FROM chunk_keys",
        pa.table({"chunk_id": _col("chunk_id", chunk_ids, _STR)}),
        "SELECT chunk_id, seq FROM chunk_keys"
        " WHERE chunk_id IN (SELECT chunk_id FROM _symbiote_rows)",
    )
    return {str(r[0]): int(r[1]) for r in rows}


def _write_chunks(
    con: duckdb.DuckDBPyConnection, preps: list[_Prepared], base_seq: int, dim: int
) -> tuple[dict[int, WriteAck], list[ChunkChange]]:
    # Replay the group's upserts and deletes in order to find each id's final operation; an id
    # moved to the end on every touch so that seq order follows the order of last writes.
    offsets: dict[int, int] = {}
    matrices: list[npt.NDArray[np.float32]] = []
    total = 0
    final: dict[str, tuple[_Prepared, int]] = {}
    for p in preps:
        if p.kind == "chunks":
            assert p.matrix is not None
            offsets[p.index] = total
            matrices.append(p.matrix)
            total += len(p.matrix)
            for j, c in enumerate(p.chunks):
                final.pop(c.chunk_id, None)
                final[c.chunk_id] = (p, j)
        else:
            for chunk_id in p.ids:
                final.pop(chunk_id, None)
                final[chunk_id] = (p, -1)

    upserts = [(cid, p, j) for cid, (p, j) in final.items() if j >= 0]
    deletes = [cid for cid, (_, j) in final.items() if j < 0]
    changes: list[ChunkChange] = []
    seq = base_seq

    # ``chunks`` has no index (see _CHUNK_KEYS_MIGRATION in schema/ddl.py): the current seq
    # of each key is in ``chunk_keys``, and an old version is deleted by its seq, which
    # follows insertion order, so zone maps keep that delete from scanning the table.
    old = _current_seqs(con, list(final))
    if old:
        _insert_arrow(
            con,
            "DELETE FROM chunks",
            pa.table({"seq": pa.array(list(old.values()), pa.int64())}),
            "DELETE FROM chunks WHERE seq IN (SELECT seq FROM _symbiote_rows)",
        )

    if upserts:
        chunks = [p.chunks[j] for _, p, j in upserts]
        all_rows = np.concatenate(matrices) if len(matrices) > 1 else matrices[0]
        take = np.fromiter((offsets[p.index] + j for _, p, j in upserts), np.int64, len(upserts))
        mat = all_rows[take] if len(take) != len(all_rows) else all_rows
        seqs = np.arange(seq + 1, seq + 1 + len(upserts), dtype=np.int64)
        seq += len(upserts)
        table = pa.table(
            {
                "chunk_id": _col("chunk_id", [cid for cid, _, _ in upserts], _STR),
                "document_id": _col("document_id", [c.document_id for c in chunks], _STR),
                "text": _col("text", [c.text for c in chunks], _STR),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(mat).reshape(-1), pa.float32()), dim
                ),
                "metadata": _col("metadata", [p.json_a[j] for _, p, j in upserts], _STR),
                "seq": pa.array(seqs, pa.int64()),
            }
        )
        _insert_arrow(
            con,
            "INSERT INTO chunks",
            table,
            "INSERT INTO chunks BY NAME SELECT * FROM _symbiote_rows",
        )
        _insert_arrow(
            con,
            "INSERT OR REPLACE INTO chunk_keys",
            table.select(["chunk_id", "seq"]),
            "INSERT OR REPLACE INTO chunk_keys BY NAME SELECT * FROM _symbiote_rows",
        )
        changes.extend(
            ChunkChange(cid, int(s)) for (cid, _, _), s in zip(upserts, seqs, strict=True)
        )

    # Only ids that existed leave a tombstone; keep the request order for their seqs.
    gone = [cid for cid in deletes if cid in old]
    deleted = set(gone)
    if gone:
        _insert_arrow(
            con,
            "DELETE FROM chunk_keys",
            pa.table({"chunk_id": _col("chunk_id", gone, _STR)}),
            "DELETE FROM chunk_keys WHERE chunk_id IN (SELECT chunk_id FROM _symbiote_rows)",
        )
        tomb_seqs = np.arange(seq + 1, seq + 1 + len(gone), dtype=np.int64)
        seq += len(gone)
        _insert_arrow(
            con,
            "INSERT INTO chunk_deletes",
            pa.table({"chunk_id": pa.array(gone, _STR), "seq": pa.array(tomb_seqs)}),
            "INSERT INTO chunk_deletes BY NAME SELECT * FROM _symbiote_rows",
        )
        changes.extend(
            ChunkChange(cid, int(s), True) for cid, s in zip(gone, tomb_seqs, strict=True)
        )

    if seq != base_seq:
        _exec(
            con,
            "UPDATE symbiote_meta",
            "UPDATE symbiote_meta SET value = ? WHERE key = ?",
            [str(seq), META_CHUNK_SEQ],
        )

    acks: dict[int, WriteAck] = {}
    credited: set[str] = set()
    for p in preps:
        if p.kind == "chunks":
            n = len(p.chunks)
            distinct = len({c.chunk_id for c in p.chunks})
            acks[p.index] = WriteAck(written=distinct, duplicates=n - distinct)
        else:
            ids = p.ids
            hit = 0
            for cid in ids:
                if cid in deleted and cid not in credited:
                    credited.add(cid)
                    hit += 1
            acks[p.index] = WriteAck(written=hit, duplicates=len(ids) - hit)
    return acks, changes


# --------------------------------------------------------------------------------------------
# mesh state (the mesh actor's PersistMesh requests; tables from schema.mesh.MESH_DDL)

_BIN: Final = pa.binary()
_I64: Final = pa.int64()
#: Largest payload one stored mesh row may carry (a row's own cap is 64 KiB by default).
_MAX_MESH_PAYLOAD: Final = 16 << 20


def _check_mesh(request: PersistMesh, limits: Limits) -> None:
    if request.size() > limits.max_rows_per_request:
        raise TooLarge(
            f"{request.size()} records, more than {limits.max_rows_per_request}", field="rows"
        )
    for i, row in enumerate(request.rows):
        if not row.origin or row.seq < 1:
            raise InvalidRecord("needs an origin and a seq >= 1", field=f"rows[{i}]")
        if len(row.payload) > _MAX_MESH_PAYLOAD:
            raise TooLarge(f"payload over {_MAX_MESH_PAYLOAD} bytes", field=f"rows[{i}].payload")


def _ts_of(unix_s: int | None) -> _dt.datetime | None:
    return None if unix_s is None else _dt.datetime.fromtimestamp(unix_s, _dt.UTC)


def _write_mesh(
    con: duckdb.DuckDBPyConnection, preps: list[_Prepared], now: _dt.datetime
) -> dict[int, WriteAck]:
    """Upsert every table a group of PersistMesh requests touches; one statement per table.

    Within the group the last version of a key wins (one upsert statement may not touch a key
    twice). Rows: a copy of a held row replaces its key id and signature only when the
    content is the same (a re-signed row); other content under a held ``(origin, seq)`` is
    ignored, so the first version stays.
    """
    reqs = [p.mesh for p in preps if p.mesh is not None]
    rows = list({(r.origin, r.seq): r for m in reqs for r in m.rows}.values())
    if rows:
        _insert_arrow(
            con,
            "INSERT INTO mesh_rows",
            pa.table(
                {
                    "origin": _col("origin", [r.origin for r in rows], _STR),
                    "seq": _col("seq", [r.seq for r in rows], _I64),
                    "hlc_wall_ms": _col("hlc_wall_ms", [r.hlc.wall_ms for r in rows], _I64),
                    "hlc_logical": _col("hlc_logical", [r.hlc.logical for r in rows], pa.int32()),
                    "kind": _col("kind", [r.kind for r in rows], _STR),
                    "payload": _col("payload", [r.payload for r in rows], _BIN),
                    "key_id": _col("key_id", [r.key_id for r in rows], _STR),
                    "signature": _col("signature", [r.signature for r in rows], _BIN),
                    "received_at": _col("received_at", [now] * len(rows), _TS),
                }
            ),
            "INSERT INTO mesh_rows SELECT origin, seq, hlc_wall_ms, hlc_logical, kind, payload,"
            " key_id, signature, received_at FROM _symbiote_rows"
            " ON CONFLICT (origin, seq) DO UPDATE SET key_id = excluded.key_id,"
            " signature = excluded.signature"
            " WHERE mesh_rows.payload = excluded.payload AND mesh_rows.kind = excluded.kind"
            " AND mesh_rows.hlc_wall_ms = excluded.hlc_wall_ms"
            " AND mesh_rows.hlc_logical = excluded.hlc_logical",
        )
    grants = list({(g.granter, g.row_seq): g for m in reqs for g in m.grants}.values())
    if grants:
        _insert_arrow(
            con,
            "INSERT INTO grants",
            pa.table(
                {
                    "granter": _col("granter", [g.granter for g in grants], _STR),
                    "grantee": _col("grantee", [g.grantee for g in grants], _STR),
                    "row_seq": _col("row_seq", [g.row_seq for g in grants], _I64),
                    "tags": _col("tags", [g.tags for g in grants], _STR_LIST),
                    "permissions": _col("permissions", [g.permissions for g in grants], _STR_LIST),
                    "redact": _col("redact", [g.redact for g in grants], _STR_LIST),
                    "expires_at": _col("expires_at", [_ts_of(g.expires_at) for g in grants], _TS),
                    "signature": _col("signature", [g.signature for g in grants], _BIN),
                }
            ),
            "INSERT OR REPLACE INTO grants BY NAME SELECT * FROM _symbiote_rows",
        )
    peers = list({r.peer_id: r for m in reqs for r in m.peers}.values())
    if peers:
        _insert_arrow(
            con,
            "INSERT INTO peers",
            pa.table(
                {
                    "peer_id": _col("peer_id", [r.peer_id for r in peers], _STR),
                    "addrs": _col("addrs", [r.addrs for r in peers], _STR_LIST),
                    "status": _col("status", [r.status for r in peers], _STR),
                    "incarnation": _col("incarnation", [r.incarnation for r in peers], _I64),
                    "genesis_key": _col("genesis_key", [r.genesis_key for r in peers], _BIN),
                    "pretrusted": _col("pretrusted", [r.pretrusted for r in peers], pa.bool_()),
                    "seen_at": _col("seen_at", [r.seen_at for r in peers], _TS),
                }
            ),
            # first_seen is kept; a key learnt once is not forgotten by a later empty one.
            "INSERT INTO peers SELECT peer_id, addrs, status, incarnation, genesis_key,"
            " pretrusted, seen_at, seen_at FROM _symbiote_rows"
            " ON CONFLICT (peer_id) DO UPDATE SET addrs = excluded.addrs,"
            " status = excluded.status, incarnation = excluded.incarnation,"
            " genesis_key = CASE WHEN octet_length(excluded.genesis_key) > 0"
            " THEN excluded.genesis_key ELSE peers.genesis_key END,"
            " pretrusted = excluded.pretrusted, last_seen = excluded.last_seen",
        )
    keys = list({(k.peer_id, k.key_id): k for m in reqs for k in m.peer_keys}.values())
    if keys:
        _insert_arrow(
            con,
            "INSERT INTO peer_keys",
            pa.table(
                {
                    "peer_id": _col("peer_id", [k.peer_id for k in keys], _STR),
                    "key_id": _col("key_id", [k.key_id for k in keys], _STR),
                    "public_key": _col("public_key", [k.public_key for k in keys], _BIN),
                    "rotation_seq": _col(
                        "rotation_seq", [k.rotation_seq for k in keys], pa.int32()
                    ),
                    "valid_from": _col("valid_from", [_ts_of(k.valid_from) for k in keys], _TS),
                    "expired_at": _col("expired_at", [_ts_of(k.expired_at) for k in keys], _TS),
                    "rotation": _col("rotation", [k.rotation for k in keys], _BIN),
                }
            ),
            "INSERT OR REPLACE INTO peer_keys BY NAME SELECT * FROM _symbiote_rows",
        )
    edges = list({(e.from_peer, e.to_peer): e for m in reqs for e in m.trust_edges}.values())
    if edges:
        _insert_arrow(
            con,
            "INSERT INTO trust_edges",
            pa.table(
                {
                    "from_peer": _col("from_peer", [e.from_peer for e in edges], _STR),
                    "to_peer": _col("to_peer", [e.to_peer for e in edges], _STR),
                    "satisfactory": _col("satisfactory", [e.satisfactory for e in edges], _I64),
                    "unsatisfactory": _col(
                        "unsatisfactory", [e.unsatisfactory for e in edges], _I64
                    ),
                    "updated_at": _col("updated_at", [now] * len(edges), _TS),
                }
            ),
            "INSERT OR REPLACE INTO trust_edges BY NAME SELECT * FROM _symbiote_rows",
        )
    scored = [m for m in reqs if m.trust_scores]
    if scored:
        latest = scored[-1]
        at = latest.scores_at or now
        _insert_arrow(
            con,
            "INSERT INTO trust_scores",
            pa.table(
                {
                    "peer_id": _col("peer_id", [t.peer_id for t in latest.trust_scores], _STR),
                    "score": _col("score", [t.score for t in latest.trust_scores], pa.float64()),
                    "computed_at": _col("computed_at", [at] * len(latest.trust_scores), _TS),
                }
            ),
            "INSERT OR REPLACE INTO trust_scores BY NAME SELECT * FROM _symbiote_rows",
        )
        _exec(
            con,
            "DELETE FROM trust_scores",
            "DELETE FROM trust_scores WHERE computed_at < ?",
            [at],
        )
    return {p.index: WriteAck(written=p.size) for p in preps}


# --------------------------------------------------------------------------------------------
# transactions


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        # A failed COMMIT has already ended the transaction; nothing left to undo.
        pass


def _attempt(
    con: duckdb.DuckDBPyConnection, preps: list[_Prepared], state: StoreState
) -> tuple[dict[int, WriteAck], list[ChunkChange], int]:
    """Write ``preps`` in one transaction; return acks, chunk changes and the new high seq."""
    now = _dt.datetime.now(_dt.UTC)
    acks: dict[int, WriteAck] = {}
    changes: list[ChunkChange] = []
    high = state.high_seq
    msg_preps = [p for p in preps if p.kind == "messages"]
    doc_preps = [p for p in preps if p.kind == "documents"]
    chunk_preps = [p for p in preps if p.kind in ("chunks", "delete")]
    fix_preps = [p for p in preps if p.kind == "correct"]
    mesh_preps = [p for p in preps if p.kind == "mesh"]
    _exec(con, "BEGIN", "BEGIN TRANSACTION")
    try:
        if msg_preps:
            # Messages first: _insert_all_new may restart the transaction.
            acks.update(_write_messages(con, msg_preps, now, state))
        if fix_preps:
            # After the group's inserts: a correction queued with the ingest of its message
            # finds the row (the reverse order would only have answered "not found").
            acks.update(_correct_messages(con, fix_preps))
        if doc_preps:
            acks.update(_write_documents(con, doc_preps))
        if chunk_preps:
            chunk_acks, changes = _write_chunks(con, chunk_preps, high, state.limits.dim)
            acks.update(chunk_acks)
            if changes:
                high = max(c.seq for c in changes)
        if mesh_preps:
            acks.update(_write_mesh(con, mesh_preps, now))
        _exec(con, "COMMIT", "COMMIT")
    except BaseException:
        _rollback(con)
        raise
    return acks, changes, high


def _locate_column_error(p: _Prepared, column: str, cause: Exception) -> Failure:
    records: Sequence[Any]
    if p.kind == "messages":
        records = p.messages
    elif p.kind == "documents":
        records = p.documents
    elif p.kind == "chunks":
        records = p.chunks
    else:
        records = p.ids
    for i, record in enumerate(records):
        value = record if p.kind == "delete" else getattr(record, column, None)
        try:
            pa.array([value])
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
            return InvalidRecord(
                f"cannot be stored: {exc}", field=f"{p.root}[{i}].{column}"
            ).to_failure()
    return InvalidRecord(f"cannot be stored: {cause}", field=f"{p.root}.{column}").to_failure()


def _failure_for(exc: Exception, p: _Prepared) -> Failure:
    if isinstance(exc, SymbioteError):
        return exc.to_failure()
    if isinstance(exc, _ColumnError):
        return _locate_column_error(p, exc.column, exc.cause)
    if isinstance(exc, _StatementError):
        cause = exc.cause
        if isinstance(cause, duckdb.ConstraintException | duckdb.TransactionException):
            return WriteConflict(f"{exc.statement}: {cause}", field=p.root).to_failure()
        return QueryError(str(cause), field=exc.statement).to_failure()
    # A bug of ours or of a library, not a property of the input: keep the traceback in the log.
    log.error("unexpected error while writing request %d", p.index, exc_info=exc)
    return QueryError(f"internal error while writing: {exc!r}", field=p.root).to_failure()


def _apply_group(
    con: duckdb.DuckDBPyConnection,
    preps: list[_Prepared],
    state: StoreState,
    result: BatchResult,
) -> None:
    result.attempts += 1
    try:
        acks, changes, high = _attempt(con, preps, state)
    except _FATAL:
        raise
    except Exception as exc:
        # A merged group failed as a whole: take it apart so the bisection can find the
        # request at fault.
        preps = [q for p in preps for q in _split(p)]
        if len(preps) == 1:
            failure = _failure_for(exc, preps[0])
            log.info("write request %d failed: %s", preps[0].index, failure.message)
            result.outcomes[preps[0].index] = failure
            return
        log.debug("group of %d failed (%s); bisecting", len(preps), exc)
        mid = len(preps) // 2
        _apply_group(con, preps[:mid], state, result)
        _apply_group(con, preps[mid:], state, result)
        return
    state.high_seq = high
    result.high_seq = high
    result.commits += 1
    result.changes.extend(changes)
    for index, ack in acks.items():
        result.outcomes[index] = ack


def _prepare_messages_together(
    requests: Sequence[WriteRequest], limits: Limits
) -> _Prepared | None:
    """Validate and encode all the group's message requests in one pass, if they are all good.

    The per-request path costs a few microseconds of Python per request, which is most of the
    writer's time when requests carry one message each. Validating the concatenation first is
    the same check; if anything in it is wrong this returns nothing and every request is
    prepared on its own, so the error still names the request's own field path.
    """
    picked = [
        (i, r)
        for i, r in enumerate(requests)
        if type(r) is IngestMessages and type(r.messages) is tuple and r.messages
    ]
    if len(picked) < 2:
        return None
    msgs = [m for _, r in picked for m in r.messages]
    cap = limits.max_json_bytes
    try:
        for _, r in picked:
            if len(r.messages) > limits.max_rows_per_request:
                return None
        validate_messages(msgs, replace_rows_cap(limits, len(msgs)))
        attrs = _encode_json((m.attrs for m in msgs), cap, "messages", "attrs")
        pii = _encode_json((m.pii_flags for m in msgs), cap, "messages", "pii_flags")
    except SymbioteError:
        return None
    # One record for the whole group: building one per request was a third of the writer
    # thread's Python time with 1-message requests. It is split again only if it fails.
    return _Prepared(
        picked[0][0],
        "messages",
        messages=tuple(msgs),
        json_a=attrs,
        json_b=pii,
        parts=[(i, r.messages) for i, r in picked],
    )


def _split(p: _Prepared) -> list[_Prepared]:
    """A merged group as one prepared record per request (to isolate a failure)."""
    if p.parts is None:
        return [p]
    out: list[_Prepared] = []
    at = 0
    for index, messages in p.parts:
        n = len(messages)
        out.append(
            _Prepared(
                index,
                "messages",
                messages=messages,
                json_a=p.json_a[at : at + n],
                json_b=p.json_b[at : at + n],
            )
        )
        at += n
    return out


def replace_rows_cap(limits: Limits, rows: int) -> Limits:
    """``limits`` allowing at least ``rows`` records (for a merged check of many requests)."""
    if rows <= limits.max_rows_per_request:
        return limits
    return msgspec.structs.replace(limits, max_rows_per_request=rows)


def apply_batch(
    con: duckdb.DuckDBPyConnection,
    requests: Sequence[WriteRequest],
    state: StoreState,
    *,
    validate: bool = True,
) -> BatchResult:
    """Write ``requests`` as one transaction (isolating failures); return one outcome each.

    Each request is first validated on its own; an invalid one gets its
    :class:`~symbiote.schema.errors.Failure` and stays out of the transaction. The valid ones
    are merged column-wise into one Arrow table per target table and written in one
    transaction:

    * messages: appended to ``messages_hot`` (``INSERT``, or ``ON CONFLICT (event_id) DO
      NOTHING`` after a repeat was met), and a retry of a message already archived to Parquet
      is taken out again in the same transaction; a repeat is counted as a
      duplicate, not an error (idempotent retries);
    * documents and chunks: insert-or-replace on their key, the last version in the group wins;
      every chunk written gets a fresh ``seq``, every existing chunk deleted a tombstone;
    * corrections (:class:`CorrectMessage`): an ``UPDATE`` of the hot row, after the group's
      inserts; ``written=0`` when the message is not in the hot table.

    If the transaction fails it is rolled back and the group bisected until the failing
    request is alone; it then gets a typed failure (``WriteConflict`` for constraint and
    write-write conflicts, ``QueryError`` naming the statement otherwise).

    Raises (instead of answering) only on errors that leave the connection unusable
    (``duckdb.FatalException``, ``InternalException``, ``InterruptException``): the writer
    should then stop; its callers' requests are safe to retry because writes are idempotent.
    """
    placeholder = Failure(code="internal", message="not processed")
    result = BatchResult(
        outcomes=[placeholder] * len(requests), changes=[], high_seq=state.high_seq
    )
    preps: list[_Prepared] = []
    merged = _prepare_messages_together(requests, state.limits) if validate else None
    taken: set[int] = set()
    if merged is not None:
        preps.append(merged)
        taken = {index for index, _ in merged.parts or ()}
    for i, request in enumerate(requests):
        if i in taken:
            continue
        try:
            prep = prepare_request(i, request, state.limits, validate=validate)
        except SymbioteError as exc:
            result.outcomes[i] = exc.to_failure()
            continue
        if prep.size == 0:
            result.outcomes[i] = WriteAck(written=0)
        else:
            preps.append(prep)
    if preps:
        _apply_group(con, preps, state, result)
    return result
