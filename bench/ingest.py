"""Ingest benchmark: group commit through the writer actor against raw DuckDB anchors.

    python bench/ingest.py [--quick]

All figures come from one run, on the same Egregora-compatible messages schema (the hot table
``messages_hot`` behind the ``messages`` view, keyed by a unique ``event_id``; schema migration 5
dropped Egregora's three secondary indexes), each phase on a fresh database file:

* ``raw``: the anchor, one transaction inserting a prebuilt Arrow table of the rows (the
  median of three, each into a fresh file);
* ``per_row``: naive per-row ``INSERT`` with autocommit;
* ``1msg`` / ``10msg``: saturating ingest from 100 producers that each keep 20 requests in
  flight (pipelined), with 1-message and 10-message requests: each producer is one task that
  submits requests (``rt.submit_ingest_nowait``) and collects their acks from tickets;
* ``1msg_tasks`` (for information): the same 1-message load with a task per request in
  flight, each awaiting ``rt.ingest``;
* ``ack latency``: a steady offered 10,000 messages/s of 1-message requests (open loop);
* ``closed loop``: 100 producers each waiting for its ack before sending the next message,
  bounded by Little's law at 100 / ack latency (for information);
* ``loop lag``: how late a 1 ms ticker wakes while 4 readers run a heavy aggregate and the
  writer ingests a steady 10,000 messages/s, against the same aggregate called inline on the
  trio thread.

The last stdout line is the JSON record described in DESIGN.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shutil
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import trio
from _common import emit_json, percentile, print_table

from symbiote.runtime import Busy, Config, Runtime, Ticket, open_runtime
from symbiote.schema.ddl import migrate
from symbiote.schema.messages import WriteAck
from symbiote.schema.records import Message

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
THREADS: int | None = None
HEAVY = "SELECT count(*) FROM range(?) t WHERE hash(t.range) % 7 = 3"


def make_messages(n: int, prefix: str) -> list[Message]:
    return [
        Message(
            event_id=f"{prefix}-{i}",
            tenant_id=f"tenant-{i % 7}",
            source="bench",
            thread_id=f"thread-{i % 501}",
            msg_id=str(i),
            ts=T0 + dt.timedelta(milliseconds=i),
            author_raw=f"author {i % 97}",
            author_uuid=f"uuid-{i % 97}",
            text=f"message number {i} with a little text to make the row realistic",
            attrs={"n": i},
        )
        for i in range(n)
    ]


def arrow_of(messages: list[Message]) -> pa.Table:
    cols = [
        "event_id", "tenant_id", "source", "thread_id", "msg_id", "ts",
        "author_raw", "author_uuid", "text", "media_url", "media_type",
    ]  # fmt: skip
    data: dict[str, Any] = {c: [getattr(m, c) for m in messages] for c in cols}
    data["attrs"] = [None if m.attrs is None else str(m.attrs).replace("'", '"') for m in messages]
    data["pii_flags"] = [None] * len(messages)
    data["created_at"] = [T0] * len(messages)
    data["created_by_run"] = [None] * len(messages)
    return pa.table(data)


def fresh_db(root: Path, name: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(root / f"{name}.duckdb"))
    migrate(con, 8)
    return con


def bench_raw(root: Path, n: int, runs: int = 3) -> float:
    """The anchor: one transaction inserting a prebuilt Arrow table; the median of ``runs``.

    Each run takes a fresh file. One insert lasts well under a second, so a single run swings
    with the host's load as much as the figures compared with it; the median steadies the
    ratios without favouring either side.
    """
    table = arrow_of(make_messages(n, "raw"))
    cols = ", ".join(table.column_names)
    rates: list[float] = []
    for run in range(runs):
        con = fresh_db(root, f"raw{run}")
        con.register("prebuilt", table)
        t0 = time.perf_counter()
        con.execute("BEGIN")
        con.execute(f"INSERT INTO messages_hot ({cols}) SELECT {cols} FROM prebuilt")
        con.execute("COMMIT")
        rates.append(n / (time.perf_counter() - t0))
        con.close()
    return statistics.median(rates)


def bench_per_row(root: Path, n: int) -> float:
    rows = arrow_of(make_messages(n, "row")).to_pylist()
    con = fresh_db(root, "per_row")
    cols = list(rows[0])
    sql = f"INSERT INTO messages_hot ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    t0 = time.perf_counter()
    for row in rows:
        con.execute(sql, [row[c] for c in cols])
    took = time.perf_counter() - t0
    con.close()
    return n / took


def config_for(root: Path, name: str) -> Config:
    return Config(db_path=str(root / f"{name}.duckdb"), dim=8, readers=4, duckdb_threads=THREADS)


async def bench_saturating(root: Path, n: int, per_request: int, *, tickets: bool = True) -> float:
    """100 producers with 20 requests in flight each, until n messages are committed.

    With ``tickets`` each producer is one task: it submits requests without waiting for their
    commits (``submit_ingest_nowait``) and collects the answered tickets when its window is
    full. Without, each request in flight is a task of its own awaiting ``rt.ingest``.
    """
    messages = make_messages(n, f"sat{per_request}{'t' if tickets else 'c'}")
    requests = [messages[i : i + per_request] for i in range(0, n, per_request)]
    producers, in_flight = 100, 20
    written = 0

    async def produce(mine: list[list[Message]]) -> None:
        nonlocal written
        got = await _submit_all(rt, mine, in_flight)  # not `written += await`: a lost update
        written += got

    async with open_runtime(config_for(root, f"sat{per_request}")) as rt:
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for p in range(producers):
                mine = requests[p::producers]
                if tickets:
                    nursery.start_soon(produce, mine)
                else:
                    for lane in range(in_flight):
                        nursery.start_soon(_send_all, rt, mine[lane::in_flight])
        took = time.perf_counter() - t0
    if tickets and written != n:
        raise RuntimeError(f"{n} messages submitted, {written} acknowledged as written")
    return n / took


async def _submit_all(rt: Runtime, requests: list[list[Message]], window: int) -> int:
    """Submit ``requests`` keeping at most ``window`` unanswered; the rows written."""
    pending: deque[Ticket[WriteAck]] = deque()
    written = 0
    for request in requests:
        while len(pending) >= window:
            ticket = pending.popleft()
            written += (ticket.result() if ticket.done else await ticket.wait()).written
        try:
            pending.append(rt.submit_ingest_nowait(request, timeout=60))
        except Busy:
            pending.append(await rt.submit_ingest(request, timeout=60))
    for ticket in pending:
        written += (await ticket.wait()).written
    return written


async def _send_all(rt: Runtime, requests: list[list[Message]]) -> None:
    for request in requests:
        await rt.ingest(request, timeout=60)


async def bench_ack_latency(root: Path, rate: int, seconds: float) -> dict[str, float]:
    """Offer ``rate`` 1-message requests per second, open loop; measure each ack."""
    n = int(rate * seconds)
    messages = make_messages(n, "lat")
    latencies: list[float] = []
    async with open_runtime(config_for(root, "latency")) as rt:

        async def one(m: Message) -> None:
            t = time.perf_counter()
            await rt.ingest([m], timeout=60)
            latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            # Launch in 1 ms ticks, catching up on the schedule if a tick ran late.
            per_tick = rate // 1000
            sent = 0
            while sent < n:
                due = min(n, int((time.perf_counter() - t0) * rate) + per_tick)
                while sent < due:
                    nursery.start_soon(one, messages[sent])
                    sent += 1
                await trio.sleep(0.001)
        took = time.perf_counter() - t0
    return {
        "offered_per_s": rate,
        "achieved_per_s": n / took,
        "ack_p50_ms": percentile(latencies, 50) * 1e3,
        "ack_p99_ms": percentile(latencies, 99) * 1e3,
    }


async def bench_closed_loop(root: Path, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    count = 0
    async with open_runtime(config_for(root, "closed")) as rt:

        async def producer(p: int) -> None:
            nonlocal count
            i = 0
            while time.perf_counter() < end:
                m = make_messages(1, f"cl{p}-{i}")[0]
                t = time.perf_counter()
                await rt.ingest([m], timeout=60)
                latencies.append(time.perf_counter() - t)
                count += 1
                i += 1

        t0 = time.perf_counter()
        end = t0 + seconds
        async with trio.open_nursery() as nursery:
            for p in range(100):
                nursery.start_soon(producer, p)
        took = time.perf_counter() - t0
    p50 = percentile(latencies, 50)
    return {"rows_per_s": count / took, "ack_p50_ms": p50 * 1e3, "littles_bound": 100 / p50}


async def bench_loop_lag(root: Path, heavy_rows: int, rate: int) -> dict[str, float]:
    """Ticker lag while 4 readers aggregate and the writer ingests ``rate`` messages/s.

    The ingest is a steady offered load (10-message requests) for as long as the aggregates
    run, not a burst: a burst of thousands of runnable tasks delays the ticker by queueing,
    which says nothing about whether DuckDB blocks the loop.
    """
    lags: list[float] = []
    async with open_runtime(config_for(root, "lag")) as rt:
        done = trio.Event()

        async def ticker() -> None:
            while not done.is_set():
                t = time.perf_counter()
                await trio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        async def ingest_steadily() -> None:
            i = 0
            async with trio.open_nursery() as nursery:
                while not done.is_set():
                    nursery.start_soon(rt.ingest, make_messages(10, f"lag{i}"))
                    i += 1
                    await trio.sleep(10 / rate)

        async def aggregates() -> None:
            async with trio.open_nursery() as work:
                for _ in range(4):
                    work.start_soon(_heavy, rt, heavy_rows)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            nursery.start_soon(ingest_steadily)
            nursery.start_soon(aggregates)
        # The anchor: the same aggregate on the trio thread, blocking the loop throughout.
        con = duckdb.connect(str(root / "inline.duckdb"))
        t = time.perf_counter()
        con.execute(HEAVY, [heavy_rows]).fetchall()
        inline = time.perf_counter() - t
        con.close()
    return {
        "ingest_per_s": rate,
        "loop_lag_p50_ms": percentile(lags, 50) * 1e3,
        "loop_lag_p99_ms": percentile(lags, 99) * 1e3,
        "loop_lag_max_ms": max(lags) * 1e3,
        "inline_lag_ms": inline * 1e3,
    }


async def _heavy(rt: Runtime, rows: int) -> None:
    await rt.query(HEAVY, [rows], timeout=120)


async def run(quick: bool, root: Path) -> dict[str, Any]:
    n_raw = 200_000 if quick else 1_000_000
    n_row = 1_000 if quick else 5_000
    n_sat = 60_000 if quick else 400_000
    raw = bench_raw(root, n_raw)
    per_row = bench_per_row(root, n_row)
    one = await bench_saturating(root, n_sat, 1)
    ten = await bench_saturating(root, n_sat, 10)
    one_tasks = await bench_saturating(root, n_sat, 1, tickets=False)
    latency = await bench_ack_latency(root, 10_000, 3.0 if quick else 10.0)
    closed = await bench_closed_loop(root, 2.0 if quick else 10.0)
    lag = await bench_loop_lag(root, 150_000_000 if quick else 600_000_000, 10_000)

    print_table(
        [
            {"path": "raw: one Arrow insert, one transaction", "rows_per_s": raw, "vs_raw": 1.0},
            {
                "path": "naive per-row INSERT, autocommit",
                "rows_per_s": per_row,
                "vs_raw": per_row / raw,
            },
            {
                "path": "submit_ingest, 1-msg requests, 20 in flight per producer",
                "rows_per_s": one,
                "vs_raw": one / raw,
            },
            {
                "path": "submit_ingest, 10-msg requests, 20 in flight per producer",
                "rows_per_s": ten,
                "vs_raw": ten / raw,
            },
            {
                "path": "rt.ingest, 1-msg requests, a task per request in flight",
                "rows_per_s": one_tasks,
                "vs_raw": one_tasks / raw,
            },
            {
                "path": "rt.ingest, closed loop (100 producers)",
                "rows_per_s": closed["rows_per_s"],
                "vs_raw": closed["rows_per_s"] / raw,
            },
        ],
        title=f"ingest throughput ({n_raw:,} raw, {n_row:,} per-row, {n_sat:,} through ingest)",
    )
    print_table([latency], title="ack latency at a steady offered load (open loop, 1-msg requests)")
    print_table([closed], title="closed loop: 100 producers, one request each in flight")
    print_table(
        [lag], title="trio loop lag: 4 readers aggregating + writer ingesting, vs inline call"
    )
    return {
        "quick": quick,
        "raw_rows_per_s": raw,
        "per_row_rows_per_s": per_row,
        "rows_per_s_1msg": one,
        "ratio_1msg_vs_raw": one / raw,
        "ratio_1msg_vs_per_row": one / per_row,
        "rows_per_s_10msg": ten,
        "ratio_10msg_vs_raw": ten / raw,
        "rows_per_s_1msg_tasks": one_tasks,
        "ratio_1msg_tasks_vs_raw": one_tasks / raw,
        "ack_offered_per_s": latency["offered_per_s"],
        "ack_achieved_per_s": latency["achieved_per_s"],
        "ack_p50_ms": latency["ack_p50_ms"],
        "ack_p99_ms": latency["ack_p99_ms"],
        "closed_loop_rows_per_s": closed["rows_per_s"],
        "closed_loop_littles_bound": closed["littles_bound"],
        "loop_lag_p99_ms": lag["loop_lag_p99_ms"],
        "loop_lag_max_ms": lag["loop_lag_max_ms"],
        "inline_lag_ms": lag["inline_lag_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run, under 60 s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="symbiote-bench-ingest-"))
    try:
        figures = trio.run(run, args.quick, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    emit_json("ingest", figures)


if __name__ == "__main__":
    main()
