"""The runtime end to end on a real DuckDB file, under the loop-block guard."""

from __future__ import annotations

import duckdb
import msgspec
import pytest
import trio

from symbiote.runtime import (
    ActorCrashed,
    ActorStopped,
    BadArgument,
    Config,
    DeadlineExceeded,
    Runtime,
    open_runtime,
)
from symbiote.runtime._guard import LoopGuard
from symbiote.schema.errors import InvalidRecord, QueryError, TooLarge
from symbiote.schema.messages import WriteAck
from tests.scenarios.chat import chunk, message, post

HEAVY = "SELECT count(*) FROM range(2000000000) a WHERE a.range % 7 = 3"


async def test_ack_means_every_reader_sees_it(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    ack = await rt.ingest([message(i) for i in range(100)])
    assert (ack.written, ack.duplicates) == (100, 0)
    for reader in rt._readers:
        table = await reader.ask(_count("messages"), timeout=10)
        assert table.column(0).to_pylist() == [100]


async def test_ingest_is_idempotent_on_event_id(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    await rt.ingest([message(i) for i in range(10)])
    ack = await rt.ingest([message(i) for i in range(5, 15)])
    assert (ack.written, ack.duplicates) == (5, 5)
    rows = await rt.query(
        "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM messages", fmt="records"
    )
    assert rows == [{"n": 15, "d": 15}]


async def test_concurrent_requests_share_commits(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    async with trio.open_nursery() as nursery:
        for p in range(50):
            nursery.start_soon(_ingest_range, rt, p * 20, 20)
    # The 1,000 calls reached the writer as a few IngestBatch messages (one per turn of
    # the loop), each committed as part of a group.
    calls = rt._ingest_calls
    assert calls.items == 50 * 20
    assert calls.batches <= 50 * 20 // 10
    assert rt._sup.ref("data/writer").processed == calls.batches
    rows = await rt.query("SELECT count(*) AS n FROM messages", fmt="records")
    assert rows == [{"n": 1000}]


async def test_a_bad_ingest_among_concurrent_ones_fails_alone(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    out: dict[int, object] = {}
    repeats: list[WriteAck] = []

    async def one(i: int) -> None:
        msg = message(i)
        if i == 13:
            msg = msgspec.structs.replace(msg, ts=msg.ts.replace(tzinfo=None))
        if i == 21:
            msg = msgspec.structs.replace(msg, media_type="gif")  # type: ignore[arg-type]
        try:
            ack = await rt.ingest([msg])
        except InvalidRecord as exc:
            out[i] = exc.field
        else:
            if i == 5:
                repeats.append(ack)
            out[i] = ack

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one, i)
        nursery.start_soon(one, 5)  # a repeat in the same batch: a duplicate, not an error
    assert out.pop(13) == "messages[0].ts"
    assert out.pop(21) == "messages[0].media_type"
    assert all(isinstance(a, WriteAck) for a in out.values())
    assert sorted((a.written, a.duplicates) for a in repeats) == [(0, 1), (1, 0)]
    assert rt._ingest_calls.batches < 10
    rows = await rt.query("SELECT count(*) AS n FROM messages", fmt="records")
    assert rows == [{"n": 38}]
    assert rt._sup.ref("data/writer").restarts == 0


async def test_submitted_ingests_are_committed_and_answered_one_by_one(
    symbiote_runtime: Runtime,
) -> None:
    rt = symbiote_runtime
    naive = message(7)
    naive = msgspec.structs.replace(naive, ts=naive.ts.replace(tzinfo=None))
    requests = [[message(i)] for i in range(300)]
    requests[7] = [naive]
    requests.append([message(3)])  # a repeat: a duplicate, not an error
    # A producer's window, submitted without a task per request: a handful of batches.
    tickets = [rt.submit_ingest_nowait(r) for r in requests[:200]]
    tickets += [await rt.submit_ingest(r) for r in requests[200:]]
    with pytest.raises(InvalidRecord) as info:
        await tickets[7].wait()
    assert info.value.field == "messages[0].ts"
    acks = [await t.wait() for i, t in enumerate(tickets) if i != 7]
    assert sum(a.written for a in acks) == 299 and sum(a.duplicates for a in acks) == 1
    assert rt._ingest_calls.batches < 150
    rows = await rt.query("SELECT count(DISTINCT event_id) AS n FROM messages", fmt="records")
    assert rows == [{"n": 299}]


async def test_bad_request_fails_alone_in_its_batch(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    outcomes: dict[str, str] = {}

    async def good(i: int) -> None:
        await rt.ingest([message(i)])
        outcomes[f"good{i}"] = "ok"

    async def bad() -> None:
        wrong = chunk(0, rt.config.dim + 1)
        with pytest.raises(InvalidRecord) as info:
            await rt.upsert_chunks([wrong])
        outcomes["bad"] = info.value.field or ""

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(good, i)
        nursery.start_soon(bad)
        for i in range(20, 40):
            nursery.start_soon(good, i)
    assert outcomes.pop("bad") == "chunks[0].embedding"
    assert len(outcomes) == 40
    rows = await rt.query("SELECT count(*) AS n FROM messages", fmt="records")
    assert rows == [{"n": 40}]
    assert rt._sup.ref("data/writer").restarts == 0


@pytest.mark.parametrize(
    ("make", "field", "error"),
    [
        (
            lambda dim: [msgspec.structs.replace(chunk(1, dim), embedding=[float("nan")] * dim)],
            "chunks[0].embedding",
            InvalidRecord,
        ),
        (
            lambda dim: [msgspec.structs.replace(chunk(1, dim), embedding=[0.0] * dim)],
            "chunks[0].embedding",
            InvalidRecord,
        ),
        (
            lambda dim: [
                chunk(1, dim),
                msgspec.structs.replace(chunk(2, dim), text="x" * 2_000_000),
            ],
            "chunks[1].text",
            TooLarge,
        ),
    ],
)
async def test_bad_chunks_are_typed(symbiote_runtime: Runtime, make, field, error) -> None:  # type: ignore[no-untyped-def]
    rt = symbiote_runtime
    with pytest.raises(error) as info:
        await rt.upsert_chunks(make(rt.config.dim))
    assert info.value.field == field
    rows = await rt.query("SELECT count(*) AS n FROM chunks", fmt="records")
    assert rows == [{"n": 0}]


async def test_naive_timestamp_is_refused(symbiote_runtime: Runtime) -> None:
    naive = msgspec.structs.replace(message(1), ts=message(1).ts.replace(tzinfo=None))
    with pytest.raises(InvalidRecord) as info:
        await symbiote_runtime.ingest([message(0), naive])
    assert info.value.field == "messages[1].ts"


async def test_documents_and_chunks_upsert(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    await rt.upsert_documents([post("doc-1")])
    await rt.upsert_documents([msgspec.structs.replace(post("doc-1"), status="published")])
    await rt.upsert_chunks([chunk(i, rt.config.dim) for i in range(3)])
    await rt.upsert_chunks([chunk(1, rt.config.dim)])
    rows = await rt.query("SELECT status FROM documents", fmt="records")
    assert rows == [{"status": "published"}]
    seqs = await rt.query("SELECT chunk_id, seq FROM chunks ORDER BY chunk_id", fmt="records")
    assert [r["chunk_id"] for r in seqs] == ["doc-1:0", "doc-1:1", "doc-1:2"]
    assert seqs[1]["seq"] > seqs[2]["seq"]  # the rewrite of chunk 1 got a newer sequence
    ack = await rt.delete_chunks(["doc-1:0", "missing"])
    assert (ack.written, ack.duplicates) == (1, 1)


async def test_sql_errors_are_typed_and_harmless(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    with pytest.raises(QueryError, match="no_such_table"):
        await rt.query("SELECT * FROM no_such_table")
    with pytest.raises(QueryError):
        await rt.query("SELEC 1")
    with pytest.raises(BadArgument) as info:
        await rt.query("SELECT ? + ?", [1])
    assert info.value.field == "params"
    with pytest.raises(QueryError):
        await rt.query("DELETE FROM messages")  # readers are read-only
    assert await rt.query("SELECT 42 AS x", fmt="records") == [{"x": 42}]
    assert all(node.restarts == 0 for node in _actors(rt))


async def test_deadline_interrupts_a_running_query(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    t0 = trio.current_time()
    with pytest.raises(DeadlineExceeded):
        await rt.query(HEAVY, timeout=0.3)
    assert trio.current_time() - t0 < 1.0
    # The reader was interrupted, not killed, and is free again at once.
    with trio.fail_after(5):
        for _ in range(rt.config.readers):
            assert await rt.query("SELECT 1 AS one", fmt="records") == [{"one": 1}]
    assert all(node.restarts == 0 for node in _actors(rt))


async def test_cancelled_caller_interrupts_its_query(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    with trio.move_on_after(0.3):
        await rt.query(HEAVY, timeout=60)
    with trio.fail_after(5):
        for _ in range(rt.config.readers):
            assert await rt.query("SELECT 1 AS one", fmt="records") == [{"one": 1}]


async def test_stream_is_bounded_and_can_stop_early(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    sizes = []
    async with rt.stream("SELECT range AS i FROM range(25000)", batch_rows=5000) as batches:
        async for batch in batches:
            sizes.append(batch.num_rows)
    assert sum(sizes) == 25000 and max(sizes) <= 5000
    async with rt.stream("SELECT range AS i FROM range(100000000)", batch_rows=1000) as batches:
        async for batch in batches:
            assert batch.num_rows <= 1000
            break
    with trio.fail_after(5):
        for _ in range(rt.config.readers):
            assert await rt.query("SELECT 1 AS one", fmt="records") == [{"one": 1}]
    with pytest.raises(QueryError):
        async with rt.stream("SELECT * FROM nowhere") as batches:
            async for _ in batches:
                pass


async def test_writer_crash_restarts_readers_after_it(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    await rt.ingest([message(i) for i in range(10)])
    writer = rt._sup.ref("data/writer")
    db = rt._db
    # Pull the connection out from under the writer: its next commit fails fatally.
    await trio.to_thread.run_sync(db.close)
    with pytest.raises(ActorCrashed):
        await rt.ingest([message(99)], timeout=10)
    with trio.fail_after(10):
        while True:
            try:
                ack = await rt.ingest([message(100)])
                break
            except ActorCrashed:
                await trio.sleep(0.05)
    assert ack.written == 1
    assert writer.restarts == 1
    assert all(r.restarts == 1 for r in rt._readers)
    rows = await rt.query("SELECT count(*) AS n FROM messages", fmt="records")
    assert rows == [{"n": 11}]


async def test_runtime_config_rejects_bad_values() -> None:
    from symbiote.runtime import Config, ConfigError

    with pytest.raises(ConfigError) as info:
        Config(readers=0)
    assert info.value.field == "readers"
    with pytest.raises(ConfigError) as info:
        Config.load(env={"SYMBIOTE_DIM": "many"})
    assert info.value.field == "dim"
    assert Config.load(env={"SYMBIOTE_READERS": "2"}).readers == 2
    with pytest.raises(ConfigError) as info:
        Config(checkpoint_threshold="lots")
    assert info.value.field == "checkpoint_threshold"


def _count(table: str):  # type: ignore[no-untyped-def]
    from symbiote.actors.reader import Query

    return Query(sql=f"SELECT count(*) FROM {table}")


def _actors(rt: Runtime) -> list:  # type: ignore[type-arg]
    out = []

    def walk(node) -> None:  # type: ignore[no-untyped-def]
        if node.kind == "actor":
            out.append(node)
        for child in node.children:
            walk(child)

    walk(rt.tree())
    return out


async def _ingest_range(rt: Runtime, start: int, n: int) -> None:
    for i in range(start, start + n):
        await rt.ingest([message(i)])


async def test_stopping_with_ingests_in_flight_answers_every_committed_write(
    symbiote_config: Config, loop_guard: LoopGuard
) -> None:
    # The runtime closes while an IngestBatch is being committed: its callers must hear
    # that their rows are stored (the durability promise), and a caller told ActorStopped
    # must not find its row stored.
    outcome: dict[int, object] = {}
    async with trio.open_nursery() as callers:
        async with open_runtime(symbiote_config) as rt:

            async def one(i: int) -> None:
                try:
                    outcome[i] = await rt.ingest([message(i)], timeout=30)
                except ActorStopped:
                    outcome[i] = "stopped"

            for i in range(2000):
                callers.start_soon(one, i)
            writer = rt._sup.ref("data/writer")
            with trio.fail_after(10):
                # Until a batch is in flight and the writer has taken it (it is committing).
                while not rt._ingest_calls._in_flight or writer.depth:
                    await trio.lowlevel.checkpoint()
    stored = await trio.to_thread.run_sync(_stored_event_ids, symbiote_config.db_path)
    acked = {message(i).event_id for i, o in outcome.items() if isinstance(o, WriteAck)}
    stopped = {message(i).event_id for i, o in outcome.items() if o == "stopped"}
    assert len(outcome) == 2000
    assert acked, f"no batch was committing at the close: {set(map(type, outcome.values()))}"
    assert acked <= stored
    assert not stopped & stored


def _stored_event_ids(db_path: str) -> set[str]:
    con = duckdb.connect(db_path, read_only=True)
    try:
        return {row[0] for row in con.execute("SELECT event_id FROM messages").fetchall()}
    finally:
        con.close()
