"""The writer actor: its followers (what it logs and survives when one misses a notice) and
its batched ingest message."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest

from symbiote.actors.database import Database
from symbiote.actors.writer import Writer
from symbiote.runtime import Config, open_runtime
from symbiote.runtime._guard import LoopGuard
from symbiote.schema.errors import (
    ActorCrashed,
    ActorStopped,
    Busy,
    Failure,
    InvalidRecord,
    WrongMessage,
)
from symbiote.schema.messages import (
    ChunksCommitted,
    IngestBatch,
    IngestMessages,
    UpsertChunks,
    WriteAck,
    WriteAcks,
)
from symbiote.schema.records import Limits
from tests.actors.index_data import DIM, chunk_for

GROUP = 25  # max_batch_rows: one commit (and one commit notice) per queued message
QUEUED = 40


async def test_normal_stop_logs_no_missed_commit_warning(
    tmp_path: Path, loop_guard: LoopGuard, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="symbiote.writer")
    config = Config(db_path=str(tmp_path / "w.duckdb"), dim=DIM, readers=1, max_batch_rows=GROUP)
    async with open_runtime(config) as rt:
        await rt.upsert_chunks([chunk_for(i) for i in range(GROUP)])
        await rt.wait_index_ready(timeout=10.0)
        # Writes still queued when the runtime closes: the tree stops the index before the
        # writer, which finishes the group it is committing with no follower left to notify.
        writer = rt._sup.ref("data/writer")
        for m in range(1, QUEUED + 1):
            chunks = tuple(chunk_for(m * GROUP + j) for j in range(GROUP))
            writer.tell_nowait(UpsertChunks(chunks=chunks))

    missed = [r for r in caplog.records if "missed a commit notice" in r.getMessage()]
    # The stop raced the queued commits as intended (else this test proves nothing) ...
    assert missed, "no commit notice was published after the index stopped"
    # ... and a follower that stopped is not worth a warning: it catches up at its restart.
    assert [r for r in missed if r.levelno >= logging.WARNING] == []


class _GoneFollower:
    """A follower ref whose mailbox refuses, the way a dead incarnation's does."""

    name = "data/index"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def tell_nowait(self, msg: object) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (Busy("full"), logging.WARNING),
        (ActorStopped("stopped"), logging.DEBUG),
        (ActorCrashed("crashed"), logging.DEBUG),
    ],
)
def test_a_follower_that_refuses_a_notice_never_crashes_the_writer(
    error: Exception, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="symbiote.writer")
    follower = _GoneFollower(error)
    writer = Writer(Database(":memory:"), Limits(dim=DIM), subscribers=lambda: [follower])  # type: ignore[list-item]
    # After a successful commit: raising here would crash the writer and restart its readers.
    writer._publish(ChunksCommitted(changes=(), high_seq=7))
    assert writer.dropped_notifications == 1
    assert [r.levelno for r in caplog.records] == [level]


@pytest.mark.parametrize(("vacuum", "tasks"), [(False, "0"), (True, "100")])
async def test_checkpoints_do_not_vacuum_unless_asked(
    tmp_path: Path, vacuum: bool, tasks: str
) -> None:
    # Vacuuming checkpoints stalled single commits for tens of seconds with 768-d chunks
    # (docs/data-layer.md); the setting is the database's, so every connection reports it.
    config = Config(db_path=str(tmp_path / "v.duckdb"), dim=DIM, readers=1, db_vacuum=vacuum)
    async with open_runtime(config) as rt:
        rows = await rt.query(
            "SELECT value FROM duckdb_settings() WHERE name = 'max_vacuum_tasks'", fmt="records"
        )
    assert rows == [{"value": tasks}]


async def test_an_ingest_batch_answers_each_request_on_its_own(
    tmp_path: Path, loop_guard: LoopGuard
) -> None:
    from tests.scenarios.chat import message

    config = Config(db_path=str(tmp_path / "w.duckdb"), dim=DIM, readers=1)
    async with open_runtime(config) as rt:
        await rt.ingest([message(0)])
        naive = msgspec.structs.replace(message(2), ts=message(2).ts.replace(tzinfo=None))
        batch = IngestBatch(
            requests=(
                IngestMessages(messages=(message(1), message(3))),
                IngestMessages(messages=(naive,)),
                IngestMessages(messages=(message(0), message(4))),  # 0 is stored already
                IngestMessages(messages=()),
            )
        )
        acks = await rt._sup.ref("data/writer").ask(batch, timeout=10)
        assert isinstance(acks, WriteAcks)
        first, bad, repeat, empty = acks.outcomes
        assert first == WriteAck(written=2)
        assert isinstance(bad, Failure) and bad.field == "messages[0].ts"
        assert repeat == WriteAck(written=1, duplicates=1)
        assert empty == WriteAck(written=0)
        rows = await rt.query("SELECT event_id FROM messages ORDER BY event_id", fmt="records")
        assert [r["event_id"] for r in rows] == [message(i).event_id for i in (0, 1, 3, 4)]


@pytest.mark.parametrize(
    ("msg", "error", "field"),
    [
        (IngestBatch(requests=(IngestMessages(messages=()), "x")), WrongMessage, "requests[1]"),  # type: ignore[arg-type]
        (IngestBatch(requests=None), WrongMessage, "requests"),  # type: ignore[arg-type]
        (IngestMessages(messages=None), InvalidRecord, "messages"),  # type: ignore[arg-type]
        (UpsertChunks(chunks=5), InvalidRecord, "chunks"),  # type: ignore[arg-type]
    ],
)
async def test_a_malformed_write_from_another_sender_is_refused_and_harmless(
    tmp_path: Path, loop_guard: LoopGuard, msg: object, error: type[Exception], field: str
) -> None:
    # Structs do not check their field types when built: a sender other than the runtime may
    # put anything in them. The writer must answer with a typed error and stay up.
    from tests.scenarios.chat import message

    config = Config(db_path=str(tmp_path / "w.duckdb"), dim=DIM, readers=1)
    async with open_runtime(config) as rt:
        writer = rt._sup.ref("data/writer")
        with pytest.raises(error) as info:
            await writer.ask(msg, timeout=10)
        assert info.value.field == field  # type: ignore[attr-defined]
        assert (await rt.ingest([message(1)])).written == 1
        assert writer.restarts == 0
