"""A reader accepts an Ibis expression, compiles it for DuckDB and runs it like SQL."""

from __future__ import annotations

import ibis
import pytest

from symbiote.runtime import Runtime
from symbiote.schema.errors import BadArgument
from tests.scenarios.chat import message

MESSAGES = ibis.table(
    {"event_id": "string", "thread_id": "string", "author_uuid": "string", "text": "string"},
    name="messages",
)


async def test_ibis_expression_runs_like_sql(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    await rt.ingest([message(i) for i in range(50)])
    expr = (
        MESSAGES.filter(MESSAGES.thread_id == "thread-1")
        .group_by("author_uuid")
        .agg(n=ibis._.count())
        .order_by("author_uuid")
    )
    via_ibis = await rt.query(expr, fmt="records")
    via_sql = await rt.query(
        "SELECT author_uuid, count(*) AS n FROM messages WHERE thread_id = ? "
        "GROUP BY author_uuid ORDER BY author_uuid",
        ["thread-1"],
        fmt="records",
    )
    assert via_ibis == via_sql and sum(r["n"] for r in via_ibis) == 10
    async with rt.stream(MESSAGES.select("event_id"), batch_rows=20) as batches:
        rows = [row async for batch in batches for row in batch.to_pylist()]
    assert len(rows) == 50


async def test_something_else_is_refused(symbiote_runtime: Runtime) -> None:
    with pytest.raises(BadArgument) as info:
        await symbiote_runtime.query(42)  # type: ignore[arg-type]
    assert info.value.field == "sql"
