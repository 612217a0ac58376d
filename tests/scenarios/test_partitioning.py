"""Partitioning through the runtime: moves, retention, corrections and retries of archived rows.

Months of 2026 before the current one are closed (the tests run after 2026-11): the
maintenance actor may move and drop them. Every check of "exactly once" counts rows and
distinct event ids through the view ``messages``.
"""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest
import trio
import trio.lowlevel

from symbiote.runtime import Config, ConfigError, Runtime
from symbiote.runtime._system import open_runtime
from symbiote.schema.errors import BadArgument, InvalidRecord, NotFound, PeriodOpen
from symbiote.schema.records import Message

MONTHS = ("2026-01", "2026-02", "2026-03")
PER_MONTH = 40
TOTAL = PER_MONTH * len(MONTHS)


def month_messages(period: str, n: int = PER_MONTH, *, prefix: str = "m") -> list[Message]:
    start = dt.datetime.strptime(period + "-01", "%Y-%m-%d").replace(tzinfo=dt.UTC)
    return [
        Message(
            event_id=f"{prefix}{period}-{i}",
            tenant_id=f"tenant-{i % 3}",
            source="test",
            thread_id=f"thread-{i % 4}",
            msg_id=str(i),
            ts=start + dt.timedelta(hours=i * 7),
            author_raw="author",
            author_uuid=f"uuid-{i % 2}",
            text=f"text {i}",
        )
        for i in range(n)
    ]


async def seen(rt: Runtime) -> tuple[int, int]:
    rows = await rt.query(
        "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM messages", fmt="records"
    )
    return int(rows[0]["n"]), int(rows[0]["d"])


async def fill(rt: Runtime) -> None:
    for period in MONTHS:
        ack = await rt.ingest(month_messages(period))
        assert ack.written == PER_MONTH


async def test_moves_keep_every_message_readable_exactly_once(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    await fill(rt)
    observed: list[tuple[int, int]] = []
    done = trio.Event()

    async def watch() -> None:
        # Readers query the view while months move under them.
        while not done.is_set():
            observed.append(await seen(rt))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        moved = await rt.move_period("2026-01")
        assert (moved.period, moved.rows, moved.gen) == ("2026-01", PER_MONTH, 1)
        # The scheduled round moves the remaining closed months (keep_hot_months = 1).
        report = await rt.run_maintenance()
        assert [m.period for m in report.moved] == ["2026-02", "2026-03"]
        done.set()
    assert observed and set(observed) == {(TOTAL, TOTAL)}
    assert await seen(rt) == (TOTAL, TOTAL)
    infos = await rt.periods()
    assert [(i.period, i.hot_rows, i.archived_rows) for i in infos] == [
        (p, 0, PER_MONTH) for p in MONTHS
    ]
    hot = await rt.query("SELECT count(*) AS n FROM messages_hot", fmt="records")
    assert hot == [{"n": 0}]


async def test_a_retry_of_an_archived_message_is_a_duplicate(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    await fill(rt)
    await rt.move_period("2026-02")
    retry = month_messages("2026-02", 5)
    late = month_messages("2026-02", 2, prefix="late")
    ack = await rt.ingest([*retry, *late])
    assert (ack.written, ack.duplicates) == (2, 5)
    assert await seen(rt) == (TOTAL + 2, TOTAL + 2)
    # The late rows are hot until the month moves again, into a new generation.
    again = await rt.move_period("2026-02")
    assert (again.rows, again.gen, again.total_rows) == (2, 2, PER_MONTH + 2)
    assert (await rt.ingest(late)).duplicates == 2
    assert await seen(rt) == (TOTAL + 2, TOTAL + 2)


async def test_retention_is_one_call_and_bad_input_deletes_nothing(
    symbiote_runtime: Runtime,
) -> None:
    rt = symbiote_runtime
    await fill(rt)
    await rt.move_period("2026-01")
    current = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    await rt.ingest(month_messages(current, 3, prefix="now"))
    bad: list[tuple[str, str | None, type[BadArgument], str]] = [
        ("2025-07", None, NotFound, "period"),  # no such month
        (current, None, PeriodOpen, "period"),  # still receiving writes
        ("2026-01", "tenant-9", NotFound, "tenant"),  # archived month, unknown tenant
        ("2026-02", "tenant-9", NotFound, "tenant"),  # hot month, unknown tenant
        ("January", None, BadArgument, "period"),
        ("2026-13", None, BadArgument, "period"),
    ]
    for period, tenant, error, field in bad:
        with pytest.raises(error) as info:
            await rt.drop_period(period, tenant)
        assert info.value.field == field, (period, tenant)
    assert await seen(rt) == (TOTAL + 3, TOTAL + 3)

    # One tenant of an archived month, then whole months (archived and hot).
    one = await rt.drop_period("2026-01", "tenant-0")
    assert (one.hot_rows, one.archived_rows) == (0, 14)
    whole = await rt.drop_period("2026-01")
    assert (whole.hot_rows, whole.archived_rows) == (0, PER_MONTH - 14)
    hot = await rt.drop_period("2026-02", purge=True)
    assert (hot.hot_rows, hot.archived_rows) == (PER_MONTH, 0)
    assert await seen(rt) == (PER_MONTH + 3, PER_MONTH + 3)
    assert [i.period for i in await rt.periods()] == ["2026-03", current]
    with pytest.raises(NotFound):
        await rt.drop_period("2026-01")


async def test_corrections_reach_hot_and_archived_messages(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    await fill(rt)
    await rt.move_period("2026-01")
    hot = await rt.correct_message("m2026-03-4", {"text": "fixed hot", "attrs": {"v": 1}})
    assert (hot.archived, hot.period) == (False, None)
    cold = await rt.correct_message("m2026-01-7", {"text": "fixed cold", "media_type": "image"})
    assert (cold.archived, cold.period) == (True, "2026-01")
    rows = await rt.query(
        "SELECT event_id, text, media_type, attrs->>'v' AS v FROM messages"
        " WHERE event_id IN ('m2026-03-4', 'm2026-01-7') ORDER BY event_id",
        fmt="records",
    )
    assert rows == [
        {"event_id": "m2026-01-7", "text": "fixed cold", "media_type": "image", "v": None},
        {"event_id": "m2026-03-4", "text": "fixed hot", "media_type": None, "v": "1"},
    ]
    assert await seen(rt) == (TOTAL, TOTAL)
    with pytest.raises(NotFound) as info:
        await rt.correct_message("nobody", {"text": "x"})
    assert info.value.field == "event_id"
    with pytest.raises(InvalidRecord) as bad:
        await rt.correct_message("m2026-01-7", {"ts": "2026-01-01"})
    assert bad.value.field == "changes"
    with pytest.raises(InvalidRecord) as bad:
        await rt.correct_message("m2026-01-7", {"media_type": "pdf"})
    assert bad.value.field == "changes.media_type"


async def test_partitioning_off(symbiote_config: Config) -> None:
    config = msgspec.structs.replace(symbiote_config, partition_enabled=False)
    async with open_runtime(config) as rt:
        await rt.ingest(month_messages("2026-01", 3))
        with pytest.raises(ConfigError) as info:
            await rt.periods()
        assert info.value.field == "partition_enabled"
        # Hot messages are still corrected by the writer.
        assert not (await rt.correct_message("m2026-01-1", {"text": "x"})).archived


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"garbage_delay_s": 5.0}, "garbage_delay_s"),  # below default_timeout_s
        ({"retain_months": 1}, "retain_months"),  # not more than keep_hot_months
        ({"keep_hot_months": -1}, "keep_hot_months"),
        ({"maintenance_interval_s": 0.0}, "maintenance_interval_s"),
        ({"max_moves_per_round": 0}, "max_moves_per_round"),
    ],
)
def test_partition_config_is_validated(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**changes)  # type: ignore[arg-type]
    assert info.value.field == field
