"""The writer's batch apply: one transaction per group, idempotence, isolation of bad requests."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from symbiote.actors import _partition as part
from symbiote.actors._store import StoreState, apply_batch
from symbiote.schema.ddl import migrate
from symbiote.schema.errors import Failure
from symbiote.schema.messages import (
    ChunkChange,
    CorrectMessage,
    DeleteChunks,
    IngestMessages,
    UpsertChunks,
    UpsertDocuments,
    WriteAck,
)
from symbiote.schema.records import Chunk, Document, Limits, Message

DIM = 4
NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    c = duckdb.connect(str(tmp_path / "s.duckdb"))
    migrate(c, DIM)
    yield c
    c.close()


@pytest.fixture
def state(con: duckdb.DuckDBPyConnection) -> StoreState:
    return StoreState.load(con, Limits(dim=DIM))


def message(i: int, **kw: Any) -> Message:
    fields: dict[str, Any] = dict(
        event_id=f"e{i}",
        tenant_id="t",
        source="s",
        thread_id="th",
        msg_id=str(i),
        ts=NOW,
        author_raw="a",
        author_uuid="u",
        attrs={"i": i},
    )
    fields.update(kw)
    return Message(**fields)


def ingest(*ids: int, **kw: Any) -> IngestMessages:
    return IngestMessages(messages=tuple(message(i, **kw) for i in ids))


def doc(id: str, title: str = "T", **kw: Any) -> Document:
    return Document(id=id, doc_type="post", title=title, slug=id, status="draft", **kw)


def chunk(chunk_id: str, x: float = 1.0, text: str = "t") -> Chunk:
    return Chunk(
        chunk_id=chunk_id,
        document_id=chunk_id.split(":")[0],
        text=text,
        embedding=[x, 0.5, 0.25, 0.125],
        metadata={"n": x},
    )


def count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def test_ingest_roundtrip_and_created_at(con: duckdb.DuckDBPyConnection, state: StoreState) -> None:
    paris = dt.timezone(dt.timedelta(hours=2))
    m = message(1, ts=dt.datetime(2024, 5, 1, 14, 0, tzinfo=paris), text="hé", media_type="image")
    result = apply_batch(con, [IngestMessages(messages=(m,))], state)
    assert result.outcomes == [WriteAck(written=1)]
    assert result.commits == 1
    row = con.execute(
        "SELECT epoch_us(ts), text, media_type, attrs->>'i', created_at IS NOT NULL FROM messages"
    ).fetchone()
    # Stored as the same instant: 14:00+02:00 is 12:00 UTC.
    assert row == (int(NOW.timestamp() * 1_000_000), "hé", "image", "1", True)


def test_timestamps_keep_their_instant_on_every_column_path(
    con: duckdb.DuckDBPyConnection, state: StoreState
) -> None:
    # A group all in UTC takes the ISO-string path; any other zone, pyarrow's own conversion
    # (an offset in seconds is one msgspec would round). Both must store the same instants.
    lmt = dt.timezone(dt.timedelta(hours=5, minutes=30, seconds=7))
    given = NOW - dt.timedelta(days=3, microseconds=17)
    utc_group = [message(1, ts=NOW.replace(microsecond=123456)), message(2, created_at=given)]
    mixed_group = [
        message(3, ts=NOW.astimezone(lmt)),
        message(4, ts=dt.datetime(1, 1, 1, tzinfo=dt.UTC)),
    ]
    for group in (utc_group, mixed_group):
        assert apply_batch(con, [IngestMessages(messages=tuple(group))], state).outcomes == [
            WriteAck(written=2)
        ]
    rows = con.execute(
        "SELECT event_id, epoch_us(ts), epoch_us(created_at) FROM messages ORDER BY event_id"
    ).fetchall()
    stored = {r[0]: (r[1], r[2]) for r in rows}

    def us(t: dt.datetime) -> int:
        return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)

    assert stored["e1"][0] == us(NOW.replace(microsecond=123456))
    assert stored["e3"][0] == us(NOW)
    assert stored["e4"][0] == us(dt.datetime(1, 1, 1, tzinfo=dt.UTC))
    assert stored["e2"][1] == us(given)
    # A message without created_at gets its commit's time.
    assert stored["e1"][1] > us(given) and stored["e3"][1] >= stored["e1"][1]


class _UnhashableUTC(dt.tzinfo):
    """A UTC zone with ``__eq__`` and no ``__hash__``, as dateutil's zones are."""

    def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def dst(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, when: dt.datetime | None) -> str:
        return "UTC"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _UnhashableUTC)

    __hash__ = None  # type: ignore[assignment]


def test_a_zone_that_cannot_be_hashed_is_stored_like_any_other(
    con: duckdb.DuckDBPyConnection, state: StoreState
) -> None:
    zone = _UnhashableUTC()
    m = message(1, ts=NOW.replace(tzinfo=zone), created_at=NOW.replace(tzinfo=zone))
    assert apply_batch(con, [IngestMessages(messages=(m, message(2)))], state).outcomes == [
        WriteAck(written=2)
    ]
    row = con.execute(
        "SELECT epoch_us(ts), epoch_us(created_at) FROM messages WHERE event_id = 'e1'"
    ).fetchone()
    assert row == (int(NOW.timestamp() * 1_000_000),) * 2


def test_ingest_is_idempotent(con: duckdb.DuckDBPyConnection, state: StoreState) -> None:
    assert apply_batch(con, [ingest(1, 2, 3)], state).outcomes == [WriteAck(written=3)]
    result = apply_batch(con, [ingest(2, 3, 4), ingest(4, 5), ingest(1)], state)
    assert result.outcomes == [
        WriteAck(written=1, duplicates=2),
        WriteAck(written=1, duplicates=1),  # e4 was credited to the first request
        WriteAck(written=0, duplicates=1),
    ]
    assert result.commits == 1
    assert count(con, "messages") == 5


def test_first_message_version_wins(con: duckdb.DuckDBPyConnection, state: StoreState) -> None:
    apply_batch(con, [ingest(1, text="first"), ingest(1, text="second")], state)
    apply_batch(con, [ingest(1, text="third")], state)
    assert con.execute("SELECT text FROM messages").fetchall() == [("first",)]


def test_document_upsert_last_wins(con: duckdb.DuckDBPyConnection, state: StoreState) -> None:
    result = apply_batch(
        con,
        [
            UpsertDocuments(documents=(doc("a", "v1"), doc("b"), doc("a", "v2"))),
            UpsertDocuments(documents=(doc("a", "v3", tags=("x", "y")),)),
        ],
        state,
    )
    assert result.outcomes == [WriteAck(written=2, duplicates=1), WriteAck(written=1)]
    apply_batch(con, [UpsertDocuments(documents=(doc("b", "b2"),))], state)
    rows = con.execute("SELECT id, title, tags FROM documents ORDER BY id").fetchall()
    assert rows == [("a", "v3", ["x", "y"]), ("b", "b2", None)]


def test_chunks_get_increasing_seq_and_tombstones(
    con: duckdb.DuckDBPyConnection, state: StoreState
) -> None:
    r1 = apply_batch(con, [UpsertChunks(chunks=(chunk("d:0"), chunk("d:1")))], state)
    assert r1.changes == [ChunkChange("d:0", 1), ChunkChange("d:1", 2)]
    assert r1.high_seq == 2
    assert r1.chunks_committed() is not None
    r2 = apply_batch(
        con,
        [
            UpsertChunks(chunks=(chunk("d:0", 2.0, "new"),)),
            DeleteChunks(chunk_ids=("d:1", "missing")),
            UpsertChunks(chunks=(chunk("d:2"),)),
            DeleteChunks(chunk_ids=("d:2",)),  # upserted then deleted in one group
        ],
        state,
    )
    assert r2.outcomes[1] == WriteAck(written=1, duplicates=1)
    assert r2.outcomes[3] == WriteAck(written=0, duplicates=1)
    assert [c.seq for c in r2.changes] == [3, 4]
    assert r2.changes == [ChunkChange("d:0", 3), ChunkChange("d:1", 4, True)]
    rows = con.execute("SELECT chunk_id, text, embedding, seq FROM chunks").fetchall()
    assert rows == [("d:0", "new", (2.0, 0.5, 0.25, 0.125), 3)]
    assert con.execute("SELECT * FROM chunk_deletes").fetchall() == [("d:1", 4)]
    # The key table follows: one row per live chunk, with its current seq.
    assert con.execute("SELECT * FROM chunk_keys").fetchall() == [("d:0", 3)]
    # The sequence survives a restart of the writer.
    assert StoreState.load(con, state.limits).high_seq == 4


def test_upsert_same_chunk_twice_in_group(
    con: duckdb.DuckDBPyConnection, state: StoreState
) -> None:
    result = apply_batch(
        con,
        [
            UpsertChunks(chunks=(chunk("d:0", 1.0), chunk("d:0", 2.0))),
            UpsertChunks(chunks=(chunk("d:0", 3.0),)),
        ],
        state,
    )
    assert all(isinstance(o, WriteAck) for o in result.outcomes)
    assert result.changes == [ChunkChange("d:0", 1)]
    emb = con.execute("SELECT embedding[1] FROM chunks").fetchall()
    assert emb == [(3.0,)]


def test_invalid_request_fails_alone(con: duckdb.DuckDBPyConnection, state: StoreState) -> None:
    bad_chunk = Chunk(chunk_id="d:9", document_id="d", text="x", embedding=[0.0] * DIM)
    result = apply_batch(
        con,
        [ingest(1), UpsertChunks(chunks=(chunk("d:0"), bad_chunk)), ingest(2), "nonsense"],  # type: ignore[list-item]
        state,
    )
    ok, bad, ok2, wrong = result.outcomes
    assert ok == WriteAck(written=1) and ok2 == WriteAck(written=1)
    assert isinstance(bad, Failure) and bad.code == "invalid_record"
    assert bad.field == "chunks[1].embedding"
    assert isinstance(wrong, Failure) and wrong.code == "wrong_message"
    assert result.attempts == 1 and result.commits == 1
    assert count(con, "messages") == 2 and count(con, "chunks") == 0


def test_unencodable_json_names_the_field(
    con: duckdb.DuckDBPyConnection, state: StoreState
) -> None:
    result = apply_batch(con, [ingest(1), ingest(2, 3, attrs={"x": object()})], state)
    failure = result.outcomes[1]
    assert isinstance(failure, Failure) and failure.field == "messages[0].attrs"
    limits = Limits(dim=DIM, max_json_bytes=10)
    result = apply_batch(con, [ingest(4, attrs={"k": "x" * 20})], StoreState(limits))
    failure = result.outcomes[0]
    assert isinstance(failure, Failure) and failure.code == "too_large"


def test_database_failure_is_isolated_by_bisection(
    con: duckdb.DuckDBPyConnection, state: StoreState
) -> None:
    # A lone surrogate passes the type checks but cannot be encoded as UTF-8: the group fails
    # in Arrow, is bisected, and only the request that carries it is answered with an error.
    requests = [ingest(i) for i in range(8)]
    requests[5] = IngestMessages(messages=(message(50), message(51, text="bad \ud800")))
    result = apply_batch(con, requests, state)
    failure = result.outcomes[5]
    assert isinstance(failure, Failure)
    assert failure.code == "invalid_record" and failure.field == "messages[1].text"
    assert all(isinstance(o, WriteAck) for i, o in enumerate(result.outcomes) if i != 5)
    assert result.attempts > result.commits > 1
    assert count(con, "messages") == 7


def test_constraint_error_from_database_is_write_conflict(
    con: duckdb.DuckDBPyConnection, state: StoreState
) -> None:
    # With validation skipped, a NULL key reaches DuckDB and trips NOT NULL.
    bad = IngestMessages(messages=(message(9, event_id=None),))
    result = apply_batch(con, [ingest(1), bad, ingest(2)], state, validate=False)
    failure = result.outcomes[1]
    assert isinstance(failure, Failure) and failure.code == "write_conflict"
    assert failure.field == "messages" and "INSERT INTO messages" in failure.message
    assert result.outcomes[0] == WriteAck(written=1) == result.outcomes[2]


def test_write_write_conflict_with_open_transaction(
    con: duckdb.DuckDBPyConnection, state: StoreState
) -> None:
    # Another connection of the same instance holds an uncommitted row with the same key.
    other = con.cursor()
    other.execute("BEGIN TRANSACTION")
    other.execute("UPDATE symbiote_meta SET value = 'x' WHERE key = 'chunk_seq'")
    result = apply_batch(con, [ingest(1), UpsertChunks(chunks=(chunk("d:0"),)), ingest(2)], state)
    failure = result.outcomes[1]
    assert isinstance(failure, Failure) and failure.code == "write_conflict"
    assert failure.field == "chunks" and "UPDATE symbiote_meta" in failure.message
    assert result.outcomes[0] == WriteAck(written=1) == result.outcomes[2]
    other.execute("ROLLBACK")
    assert count(con, "chunks") == 0 and state.high_seq == 0


def test_duckdb_list_column_update_misses_conflicts(con: duckdb.DuckDBPyConnection) -> None:
    """Pins a DuckDB 1.5.5 hazard: an update that rewrites a LIST/ARRAY column is not checked
    for write-write conflicts, so two transactions updating one row both commit and one update
    is lost. symbiote is safe only because the writer is the single writing connection."""
    con.execute("INSERT INTO documents (id, doc_type, title) VALUES ('a', 'post', 'T')")
    other = con.cursor()
    other.execute("BEGIN TRANSACTION")
    other.execute("UPDATE documents SET title = 'other' WHERE id = 'a'")
    con.execute("UPDATE documents SET title = 'mine', tags = ['x'] WHERE id = 'a'")
    other.execute("COMMIT")
    assert con.execute("SELECT title FROM documents").fetchall() == [("mine",)]


def test_empty_requests_do_not_open_a_transaction(
    con: duckdb.DuckDBPyConnection, state: StoreState
) -> None:
    result = apply_batch(con, [IngestMessages(messages=()), DeleteChunks(chunk_ids=())], state)
    assert result.outcomes == [WriteAck(written=0), WriteAck(written=0)]
    assert result.attempts == 0


def test_acked_writes_survive_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "d.duckdb")
    c = duckdb.connect(path)
    migrate(c, DIM)
    emb: Any = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)  # numpy is accepted too
    chunks = (Chunk(chunk_id="d:0", document_id="d", text="x", embedding=emb),)
    apply_batch(c, [ingest(1), UpsertChunks(chunks=chunks)], StoreState.load(c, Limits(dim=DIM)))
    c.close()
    c = duckdb.connect(path)
    assert count(c, "messages") == 1
    row = c.execute("SELECT embedding FROM chunks").fetchone()
    assert row is not None
    np.testing.assert_allclose(row[0], emb)


# -- partitioning: the hot table, archived months, corrections ---------------------------------

LATER = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)  # May and June 2024 are long closed


def test_retry_of_an_archived_message_stays_a_duplicate(
    con: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    spec = part.PartitionSpec(archive_dir=tmp_path / "archive")
    state = StoreState.load(con, Limits(dim=DIM), spec)
    june = NOW + dt.timedelta(days=31)
    apply_batch(con, [ingest(1, 2, 3), ingest(4, ts=june)], state)
    maintenance = con.cursor()  # the maintenance actor's own connection
    part.ensure_partitioning(maintenance, spec)
    assert spec.fence.end is None  # nothing archived yet: the writer never looks
    moved = part.archive_period(maintenance, spec, "2024-05", now=LATER)
    assert moved.rows == 3
    assert spec.fence.end == dt.datetime(2024, 6, 1, tzinfo=dt.UTC)

    # e1 and e2 are archived, e4 hot, e5 new (late, for the archived month), e6 new in June.
    result = apply_batch(con, [ingest(1, 5), ingest(2), ingest(4, 6, ts=june)], state)
    assert result.outcomes == [
        WriteAck(written=1, duplicates=1),
        WriteAck(written=0, duplicates=1),
        WriteAck(written=1, duplicates=1),
    ]
    assert result.commits == 1
    row = con.execute("SELECT count(*), count(DISTINCT event_id) FROM messages").fetchone()
    assert row == (6, 6)
    assert count(con, "messages_hot") == 3  # e4, e5 (late), e6


def test_fence_is_loaded_from_the_manifest_at_start(
    con: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    spec = part.PartitionSpec(archive_dir=tmp_path / "archive")
    apply_batch(con, [ingest(1, 2)], StoreState.load(con, Limits(dim=DIM)))
    part.ensure_partitioning(con, spec)
    part.archive_period(con, spec, "2024-05", now=LATER)
    # A restarted writer: a fresh spec (fence unset) reads the newest archived month.
    fresh = part.PartitionSpec(archive_dir=tmp_path / "archive")
    state = StoreState.load(con, Limits(dim=DIM), fresh)
    assert fresh.fence.end == dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
    assert apply_batch(con, [ingest(1, 2)], state).outcomes == [WriteAck(written=0, duplicates=2)]


def test_correct_a_hot_message(con: duckdb.DuckDBPyConnection, state: StoreState) -> None:
    apply_batch(con, [ingest(1, 2)], state)
    fix = CorrectMessage(event_id="e1", changes={"text": "fixed", "attrs": {"v": 2}})
    result = apply_batch(con, [fix, CorrectMessage(event_id="nope", changes={"text": "x"})], state)
    assert result.outcomes == [WriteAck(written=1), WriteAck(written=0)]
    rows = con.execute("SELECT event_id, text, attrs->>'v' FROM messages ORDER BY 1").fetchall()
    assert rows == [("e1", "fixed", "2"), ("e2", None, None)]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({}, "changes"),
        ({"ts": NOW}, "changes"),
        ({"event_id": "e9"}, "changes"),
        ({"media_type": "pdf"}, "changes.media_type"),
        ({"author_raw": None}, "changes.author_raw"),
        ({"text": 3}, "changes.text"),
        ({"attrs": {"x": object()}}, "changes.attrs"),
    ],
)
def test_bad_correction_is_refused_and_changes_nothing(
    con: duckdb.DuckDBPyConnection, state: StoreState, changes: dict[str, Any], field: str
) -> None:
    apply_batch(con, [ingest(1)], state)
    result = apply_batch(con, [CorrectMessage(event_id="e1", changes=changes)], state)
    [failure] = result.outcomes
    assert isinstance(failure, Failure) and failure.field == field
    assert result.attempts == 0
    assert con.execute("SELECT text FROM messages").fetchall() == [(None,)]
