"""Partitioning benchmark: four layouts of ``messages`` on generated chat data, at two sizes.

    python bench/partition.py [--quick]

Layouts (each on its own files, same rows, same queries):

* ``single``: one table with Egregora's DDL (unique event_id, indexes on ts, thread_id,
  author_uuid), relying on DuckDB's row-group min/max pruning. The anchor of every ratio.
* ``buckets``: one table per month (same DDL each) behind a ``UNION ALL`` view.
* ``hot_parquet``: the last two months hot in DuckDB (same DDL), older months in
  Hive-partitioned Parquet ``month=/gen=/data_0.parquet`` (one file per month, sorted by
  tenant and time) behind a view, maintained by ``symbiote.actors._partition`` (the
  retention and corrections measured are that code). The chosen layout (docs/partitioning.md).
* ``hot_parquet_tenant``: the same with a directory per tenant, ``month=/gen=/tenant_id=``.
* ``ducklake``: a DuckLake table with a local DuckDB catalog, partitioned by tenant and month,
  the extension loaded offline from the ``duckdb-extension-ducklake`` wheel.

Data: a fixed seed, 2,500 messages a day arriving in order (so 10x the messages is 10x the
days, and "the last 24 h" holds the same number of rows at both sizes), 24 tenants with a
skewed share, threads born daily with skewed activity, skewed authors. Sizes 200k and 2M with
``--quick``; 1M and 10M otherwise.

Per layout and size: the bulk load, the ingest rate of 20,000 more rows in 1,000-row
transactions, "last 24 h of one thread", "one author over a year", a full-scan aggregate, the
disk size, a correction to an old message, and retention (drop the oldest month, at the
large size; a drop that takes seconds is sampled once). Figures are medians over repeats;
speed claims are ratios against ``single`` in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from _common import emit_json, print_table

from symbiote.actors import _partition as part
from symbiote.schema.ddl import MESSAGES_DDL

T_END = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
RATE_PER_DAY = 2_500
N_TENANTS = 24
APPEND_ROWS = 20_000
APPEND_BATCH = 1_000
WINNER = "hot_parquet"
SEED = 20240501
COLS = [
    "event_id", "tenant_id", "source", "thread_id", "msg_id", "ts", "author_raw",
    "author_uuid", "text", "media_url", "media_type", "attrs", "pii_flags", "created_at",
    "created_by_run",
]  # fmt: skip
CSV = ", ".join(COLS)


# --------------------------------------------------------------------------------------------
# data


def generate(n: int, seed: int = SEED) -> pa.Table:
    """``n`` chat messages in arrival order ending at T_END, vectorised (no per-row Python)."""
    g = np.random.default_rng(seed)
    span_us = n / RATE_PER_DAY * 86_400e6
    base = int(T_END.timestamp() * 1e6 - span_us)
    ts = base + (np.arange(n, dtype=np.float64) * (span_us / n)).astype(np.int64)
    ts += g.integers(0, 60_000_000, n)  # a minute of jitter: "roughly" in arrival order
    day = (ts - base) // 86_400_000_000
    # 40 threads open each day; a message goes to one opened in the last week, skewed.
    back = np.minimum(g.geometric(0.5, n) - 1, 6)
    slot = np.minimum(g.zipf(1.6, n) - 1, 39)
    thread = np.maximum(day - back, 0) * 40 + slot
    weights = 1.0 / np.arange(1, N_TENANTS + 1) ** 1.1
    tenant = np.searchsorted(np.cumsum(weights) / weights.sum(), (thread * 2654435761 % 997) / 997)
    n_auth = max(1_000, n // 200)
    author = (np.minimum(g.zipf(1.3, n) - 1, n_auth - 1) * 7919 + tenant) % n_auth
    texts = pa.array([f"message {i} " + "lorem ipsum " * (i % 6) for i in range(512)])
    tsa = pa.array(ts, pa.timestamp("us", tz="UTC"))

    def s(prefix: str, nums: np.ndarray) -> pa.Array:
        return pc.binary_join_element_wise(prefix, pc.cast(pa.array(nums), pa.string()), "")

    return pa.table(
        {
            "event_id": s("ev-", np.arange(n)),
            "tenant_id": s("tenant-", tenant),
            "source": pa.array(["bench"]).take(np.zeros(n, dtype=np.int32)),
            "thread_id": s("thread-", thread),
            "msg_id": pc.cast(pa.array(np.arange(n)), pa.string()),
            "ts": tsa,
            "author_raw": s("Author ", author),
            "author_uuid": s("uuid-", author),
            "text": texts.take(g.integers(0, 512, n)),
            "media_url": pa.nulls(n, pa.string()),
            "media_type": pa.nulls(n, pa.string()),
            "attrs": pa.nulls(n, pa.string()),
            "pii_flags": pa.nulls(n, pa.string()),
            "created_at": tsa,
            "created_by_run": pa.nulls(n, pa.string()),
        }
    )


def month_key(table: pa.Table) -> np.ndarray:
    """Month index (year*12+month-1) of each row, in UTC."""
    ts = table.column("ts")
    return np.asarray(pc.year(ts)) * 12 + np.asarray(pc.month(ts)) - 1


def period_of(key: int) -> part.Period:
    return part.Period(int(key) // 12, int(key) % 12 + 1)


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def hot_ddl(table: str) -> list[str]:
    """Egregora's messages DDL renamed to ``table`` (unique key and its three indexes)."""
    return [
        s.replace("CREATE TABLE messages", f"CREATE TABLE {table}")
        .replace("ON messages (", f"ON {table} (")
        .replace("INDEX messages_", f"INDEX {table}_")
        for s in MESSAGES_DDL
    ]


def bulk_into(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    """Create ``table`` with the DDL and load ``rows``: insert first, index after (faster)."""
    ddl = hot_ddl(table)
    con.execute(ddl[0].replace("NOT NULL UNIQUE", "NOT NULL"))
    con.register("_rows", rows)
    con.execute(f"INSERT INTO {table} ({CSV}) SELECT {CSV} FROM _rows")
    con.unregister("_rows")
    con.execute(f"CREATE UNIQUE INDEX {table}_event_id ON {table} (event_id)")
    for statement in ddl[1:]:
        con.execute(statement)


# --------------------------------------------------------------------------------------------
# layouts: each offers load / append / correct / drop_month and a connection for queries


class Layout:
    name = ""

    def __init__(self, root: Path) -> None:
        self.root = root / self.name
        self.root.mkdir(parents=True)
        self.con = duckdb.connect(str(self.root / "db.duckdb"))

    def load(self, rows: pa.Table) -> None:
        raise NotImplementedError

    def append(self, batch: pa.Table) -> None:
        raise NotImplementedError

    def correct(self, event_id: str, ts: dt.datetime, tenant: str) -> None:
        raise NotImplementedError

    def drop_month(self, period: part.Period) -> None:
        raise NotImplementedError

    def size(self) -> int:
        self.con.execute("CHECKPOINT")
        return disk_bytes(self.root)

    def close(self) -> None:
        self.con.close()


class Single(Layout):
    name = "single"

    def load(self, rows: pa.Table) -> None:
        bulk_into(self.con, "messages", rows)

    def append(self, batch: pa.Table) -> None:
        self.con.register("_b", batch)
        self.con.execute("BEGIN")
        self.con.execute(
            f"INSERT INTO messages ({CSV}) SELECT {CSV} FROM _b ON CONFLICT (event_id) DO NOTHING"
        )
        self.con.execute("COMMIT")
        self.con.unregister("_b")

    def correct(self, event_id: str, ts: dt.datetime, tenant: str) -> None:
        self.con.execute("UPDATE messages SET text = 'corrected' WHERE event_id = ?", [event_id])

    def drop_month(self, period: part.Period) -> None:
        self.con.execute(
            "DELETE FROM messages WHERE ts >= ? AND ts < ?", [period.start, period.end]
        )


class Buckets(Layout):
    name = "buckets"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.months: set[int] = set()

    def _table(self, key: int) -> str:
        p = period_of(key)
        return f"messages_{p.year}_{p.month:02d}"

    def _view(self) -> None:
        parts = " UNION ALL ".join(
            f"SELECT {CSV} FROM {self._table(k)}" for k in sorted(self.months)
        )
        self.con.execute(f"CREATE OR REPLACE VIEW messages AS {parts}")

    def load(self, rows: pa.Table) -> None:
        keys = month_key(rows)
        for k in np.unique(keys):
            bulk_into(self.con, self._table(int(k)), rows.filter(pa.array(keys == k)))
            self.months.add(int(k))
        self._view()

    def append(self, batch: pa.Table) -> None:
        keys = month_key(batch)
        self.con.execute("BEGIN")
        for k in np.unique(keys):
            k = int(k)
            if k not in self.months:
                for statement in hot_ddl(self._table(k)):
                    self.con.execute(statement)
                self.months.add(k)
                self._view()
            self.con.register("_b", batch.filter(pa.array(keys == k)))
            self.con.execute(
                f"INSERT INTO {self._table(k)} ({CSV}) SELECT {CSV} FROM _b"
                " ON CONFLICT (event_id) DO NOTHING"
            )
            self.con.unregister("_b")
        self.con.execute("COMMIT")

    def correct(self, event_id: str, ts: dt.datetime, tenant: str) -> None:
        p = part.Period.of(ts)
        table = self._table(p.year * 12 + p.month - 1)
        self.con.execute(f"UPDATE {table} SET text = 'corrected' WHERE event_id = ?", [event_id])

    def drop_month(self, period: part.Period) -> None:
        k = period.year * 12 + period.month - 1
        self.con.execute("BEGIN")
        self.months.discard(k)
        self._view()
        self.con.execute(f"DROP TABLE {self._table(k)}")
        self.con.execute("COMMIT")


class HotParquet(Layout):
    name = "hot_parquet"
    tenant_dirs = False

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.spec = part.PartitionSpec(
            archive_dir=self.root / "archive", grace=dt.timedelta(0), tenant_dirs=self.tenant_dirs
        )
        self.now = T_END + dt.timedelta(days=60)

    def load(self, rows: pa.Table) -> None:
        keys = month_key(rows)
        hot_from = int(keys.max()) - 1  # the current and the previous month stay hot
        bulk_into(self.con, "messages_hot", rows.filter(pa.array(keys >= hot_from)))
        part.ensure_partitioning(self.con, self.spec)
        # Cold months are written the way a move writes them, then recorded in the manifest.
        cold = rows.filter(pa.array(keys < hot_from))
        cold_keys = keys[keys < hot_from]
        self.con.register("_cold", cold)
        # One COPY writes every month as generation 1, in the layout a move writes.
        split = "month, gen, tenant_id" if self.tenant_dirs else "month, gen"
        self.con.execute(
            "COPY (SELECT *, strftime(ts AT TIME ZONE 'UTC', '%Y-%m') AS month, 1 AS gen"
            f" FROM _cold ORDER BY tenant_id, ts) TO '{self.spec.archive_dir}'"
            f" (FORMAT parquet, PARTITION_BY ({split}), COMPRESSION zstd, OVERWRITE_OR_IGNORE)"
        )
        for k in np.unique(cold_keys):
            p = period_of(int(k))
            self.con.execute(
                "INSERT INTO symbiote_partitions VALUES ('messages', ?, 1, ?, now())",
                [str(p), int((cold_keys == k).sum())],
            )
        self.con.unregister("_cold")
        self.con.execute("BEGIN")
        part.rebuild_view(self.con, self.spec)
        self.con.execute("COMMIT")

    def append(self, batch: pa.Table) -> None:
        self.con.register("_b", batch)
        self.con.execute("BEGIN")
        self.con.execute(
            f"INSERT INTO messages_hot ({CSV}) SELECT {CSV} FROM _b"
            " ON CONFLICT (event_id) DO NOTHING"
        )
        self.con.execute("COMMIT")
        self.con.unregister("_b")

    def correct(self, event_id: str, ts: dt.datetime, tenant: str) -> None:
        archived = {i.period for i in part.list_periods(self.con, self.spec) if i.gen}
        if str(part.Period.of(ts)) not in archived:  # still hot: the writer's plain UPDATE
            self.con.execute(
                "UPDATE messages_hot SET text = 'corrected' WHERE event_id = ?", [event_id]
            )
            return
        part.correct_archived(
            self.con,
            self.spec,
            event_id,
            {"text": "corrected"},
            period=part.Period.of(ts),
            tenant=tenant,
            now=self.now,
        )

    def drop_month(self, period: part.Period) -> None:
        part.drop_period(self.con, self.spec, period, now=self.now, purge=True)


class HotParquetTenant(HotParquet):
    """The same, with one directory per tenant inside each month (hive tenant/month)."""

    name = "hot_parquet_tenant"
    tenant_dirs = True


def ducklake_path() -> Path:
    import duckdb_extension_ducklake

    base = Path(duckdb_extension_ducklake.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    return base / "ducklake.duckdb_extension"


class DuckLake(Layout):
    name = "ducklake"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.con.execute(f"LOAD '{ducklake_path()}'")
        self.con.execute(
            f"ATTACH 'ducklake:{self.root / 'catalog.ducklake'}' AS lake"
            f" (DATA_PATH '{self.root / 'data'}/')"
        )
        self.con.execute(
            hot_ddl("messages")[0]
            .replace("UNIQUE", "")
            .replace("CHECK (media_type IN ('image', 'video', 'audio'))", "")
            .replace("messages", "lake.messages", 1)
        )
        self.con.execute(
            "ALTER TABLE lake.messages SET PARTITIONED BY (tenant_id, year(ts), month(ts))"
        )
        self.con.execute("CREATE VIEW messages AS SELECT * FROM lake.messages")

    def load(self, rows: pa.Table) -> None:
        self.con.register("_rows", rows)
        self.con.execute(f"INSERT INTO lake.messages ({CSV}) SELECT {CSV} FROM _rows")
        self.con.unregister("_rows")

    def append(self, batch: pa.Table) -> None:
        # No unique constraints in DuckLake: idempotency would need an anti-join first.
        self.con.register("_b", batch)
        self.con.execute("BEGIN")
        self.con.execute(f"INSERT INTO lake.messages ({CSV}) SELECT {CSV} FROM _b")
        self.con.execute("COMMIT")
        self.con.unregister("_b")

    def correct(self, event_id: str, ts: dt.datetime, tenant: str) -> None:
        self.con.execute(
            "UPDATE lake.messages SET text = 'corrected'"
            " WHERE event_id = ? AND tenant_id = ? AND ts = ?",
            [event_id, tenant, ts],
        )

    def drop_month(self, period: part.Period) -> None:
        self.con.execute(
            "DELETE FROM lake.messages WHERE ts >= ? AND ts < ?", [period.start, period.end]
        )

    def size(self) -> int:
        return disk_bytes(self.root)


LAYOUTS: tuple[type[Layout], ...] = (Single, Buckets, HotParquetTenant, HotParquet, DuckLake)

RECENT = (
    "SELECT event_id, ts, author_uuid, text FROM messages"
    " WHERE thread_id = ? AND ts >= ? ORDER BY ts"
)
AUTHOR = "SELECT ts, thread_id, text FROM messages WHERE author_uuid = ? AND ts >= ? ORDER BY ts"
FULL = (
    "SELECT tenant_id, count(*), count(DISTINCT author_uuid), sum(length(text))"
    " FROM messages GROUP BY tenant_id"
)


# --------------------------------------------------------------------------------------------
# one size


def measure(
    kind: type[Layout], root: Path, data: pa.Table, n: int, quick: bool, min_n: int
) -> dict[str, Any]:
    base, extra = data.slice(0, n - APPEND_ROWS), data.slice(n - APPEND_ROWS)
    ts = data.column("ts")
    now = ts[-1].as_py()
    # The hottest thread of the last day and a busy (not the busiest) author of the last year.
    last_day = data.filter(pc.greater_equal(ts, pa.scalar(now - dt.timedelta(days=1), ts.type)))
    day_counts = pc.value_counts(last_day.column("thread_id"))
    thread = day_counts.field("values")[int(np.argmax(day_counts.field("counts")))].as_py()
    authors = pc.value_counts(data.column("author_uuid"))
    order = np.argsort(-np.asarray(authors.field("counts")))
    author = authors.field("values")[int(order[min(10, len(order) - 1)])].as_py()
    old = data.slice(n // 50, 1).to_pylist()[0]  # in the oldest (partial, archived) month

    try:
        layout = kind(root)
    except Exception as exc:  # DuckLake not usable offline: say so, with the error
        return {"layout": kind.name, "error": f"{type(exc).__name__}: {exc}"}
    t0 = time.perf_counter()
    layout.load(base)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, APPEND_ROWS, APPEND_BATCH):
        layout.append(extra.slice(i, APPEND_BATCH))
    ingest = APPEND_ROWS / (time.perf_counter() - t0)
    con = layout.con
    recent_ms = median_ms(
        lambda: con.execute(RECENT, [thread, now - dt.timedelta(days=1)]).arrow(), 7
    )
    author_ms = median_ms(
        lambda: con.execute(AUTHOR, [author, now - dt.timedelta(days=365)]).arrow(), 3
    )
    full_ms = median_ms(lambda: con.execute(FULL).arrow(), 3)
    got = con.execute("SELECT count(*), count(DISTINCT event_id) FROM messages").fetchone()
    assert got is not None and got[0] == n == got[1], (kind.name, got, n)
    size = layout.size()
    correct_ms = median_ms(lambda: layout.correct(old["event_id"], old["ts"], old["tenant_id"]), 1)
    first = part.Period.of(ts[0].as_py()).next()  # the oldest whole month
    newest = part.Period.of(now)
    drops = []
    p = first.prev()
    # Retention is measured at the large size only (two or three months): at the small size
    # the oldest whole months are still hot in hot_parquet, and the seconds a DELETE from an
    # indexed table costs would push --quick past its 60 s.
    for _ in range(0 if n == min_n else (2 if quick else 3)):
        p = p.next()
        if p >= newest:  # never the month being written
            break
        t0 = time.perf_counter()
        layout.drop_month(p)
        drops.append((time.perf_counter() - t0) * 1e3)
        if drops[-1] > 1_000:  # seconds per drop: one sample says enough, and keeps --quick short
            break
    layout.close()
    shutil.rmtree(layout.root, ignore_errors=True)
    return {
        "layout": kind.name,
        "load_s": load_s,
        "ingest_rows_per_s": ingest,
        "recent_ms": recent_ms,
        "author_year_ms": author_ms,
        "full_scan_ms": full_ms,
        "disk_mb": size / 1e6,
        "correct_old_ms": correct_ms,
        "drop_month_ms": statistics.median(drops) if drops else None,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    anchor = next(r for r in rows if r["layout"] == "single")
    for r in rows:
        if "error" in r:
            continue
        r["ingest_vs_single"] = r["ingest_rows_per_s"] / anchor["ingest_rows_per_s"]
        r["recent_vs_single"] = r["recent_ms"] / anchor["recent_ms"]
        r["author_vs_single"] = r["author_year_ms"] / anchor["author_year_ms"]
        r["full_vs_single"] = r["full_scan_ms"] / anchor["full_scan_ms"]
        r["disk_vs_single"] = r["disk_mb"] / anchor["disk_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k and 2M rows, under 60 s")
    parser.add_argument("--sizes", type=int, nargs=2, help="override the two sizes (development)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sizes = (200_000, 2_000_000) if args.quick else (1_000_000, 10_000_000)
    if args.sizes:
        sizes = (args.sizes[0], args.sizes[1])
    root = Path(tempfile.mkdtemp(prefix="symbiote-bench-partition-"))
    started = time.perf_counter()
    results: dict[int, list[dict[str, Any]]] = {}
    try:
        for n in sizes:
            t0 = time.perf_counter()
            data = generate(n)
            gen_s = time.perf_counter() - t0
            rows = [measure(kind, root, data, n, args.quick, min(sizes)) for kind in LAYOUTS]
            add_ratios(rows)
            results[n] = rows
            print_table(
                rows,
                [
                    "layout",
                    "load_s",
                    "ingest_rows_per_s",
                    "ingest_vs_single",
                    "recent_ms",
                    "recent_vs_single",
                    "author_year_ms",
                    "author_vs_single",
                    "full_scan_ms",
                    "full_vs_single",
                    "disk_mb",
                    "correct_old_ms",
                    "drop_month_ms",
                    "error",
                ],
                title=f"{n:,} messages over {n / RATE_PER_DAY:,.0f} days"
                f" (generated in {gen_s:.1f} s)",
            )
            del data
    finally:
        shutil.rmtree(root, ignore_errors=True)
    small, large = (results[n] for n in sizes)

    def pick(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
        return next(r for r in rows if r["layout"] == name)

    flat = [
        {
            "layout": r["layout"],
            "recent_ms_small": r.get("recent_ms"),
            "recent_ms_large": pick(large, r["layout"]).get("recent_ms"),
            "recent_ratio_large_vs_small": (
                pick(large, r["layout"])["recent_ms"] / r["recent_ms"] if "recent_ms" in r else None
            ),
        }
        for r in small
    ]
    print_table(flat, title="recent-window query as volume grows 10x (goal <= 1.5)")
    w_small, w_large = pick(small, WINNER), pick(large, WINNER)
    figures: dict[str, Any] = {
        "quick": args.quick,
        "sizes": list(sizes),
        "winner": WINNER,
        "recent_ms_small": w_small["recent_ms"],
        "recent_ms_large": w_large["recent_ms"],
        "recent_ratio_large_vs_small": w_large["recent_ms"] / w_small["recent_ms"],
        "full_scan_ratio_vs_single_table": w_large["full_vs_single"],
        "retention_drop_month_ms": w_large["drop_month_ms"],
        "correct_old_ms": w_large["correct_old_ms"],
        "ingest_ratio_vs_single_table": w_large["ingest_vs_single"],
        "author_year_ratio_vs_single_table": w_large["author_vs_single"],
        "disk_ratio_vs_single_table": w_large["disk_vs_single"],
        "elapsed_s": time.perf_counter() - started,
        "layouts": {
            str(n): {r["layout"]: {k: v for k, v in r.items() if k != "layout"} for r in results[n]}
            for n in sizes
        },
    }
    emit_json("partition", figures)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
