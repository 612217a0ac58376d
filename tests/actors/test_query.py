"""The readers' query path: formats, typed errors, bounded batches, interrupt, cursor visibility."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import msgspec
import numpy as np
import pyarrow as pa
import pytest

from symbiote.actors._query import convert_records, iter_batches, run_query
from symbiote.schema.ddl import migrate
from symbiote.schema.errors import BadArgument, Interrupted, QueryError

# Endless unless interrupted: DuckDB does not fold a count over a cross join of ranges.
ENDLESS = "SELECT count(*) FROM range(1000000000) a, range(1000000000) b"


@pytest.fixture
def con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    c = duckdb.connect(str(tmp_path / "q.duckdb"))
    migrate(c, 3)
    c.execute(
        "CREATE TABLE t AS SELECT range AS i, 'r' || range AS s, [1.0, 2.0, range + 1]::FLOAT[3]"
        " AS e, json_object('i', range) AS j FROM range(10)"
    )
    yield c
    c.close()


def test_formats(con: duckdb.DuckDBPyConnection) -> None:
    sql = "SELECT i, s, e, j FROM t WHERE i < ? ORDER BY i"
    table = run_query(con, sql, [3])
    assert isinstance(table, pa.Table) and table.num_rows == 3
    arrays = run_query(con, sql, [3], "numpy")
    assert arrays["i"].tolist() == [0, 1, 2]
    assert arrays["e"].shape == (3, 3) and arrays["e"].dtype == np.float32
    records = run_query(con, sql, [3], "records")
    assert records[2] == {"i": 2, "s": "r2", "e": [1.0, 2.0, 3.0], "j": {"i": 2}}


def test_named_params_and_convert_records(con: duckdb.DuckDBPyConnection) -> None:
    class Row(msgspec.Struct):
        i: int
        s: str

    rows = run_query(con, "SELECT i, s FROM t WHERE i = $n", {"n": 4}, "records")
    assert convert_records(rows, Row) == [Row(4, "r4")]
    with pytest.raises(QueryError) as ei:
        convert_records([{"i": "x", "s": "y"}], Row)
    assert ei.value.field == "record_type"


def test_syntax_error(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(QueryError) as ei:
        run_query(con, "SELEC 1")
    assert ei.value.field == "sql" and "syntax error" in ei.value.message


def test_missing_table_is_named(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(QueryError) as ei:
        run_query(con, "SELECT * FROM no_such_table")
    assert ei.value.field == "sql" and "no_such_table" in ei.value.message


def test_missing_column(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(QueryError) as ei:
        run_query(con, "SELECT nope FROM t")
    assert "nope" in ei.value.message


@pytest.mark.parametrize(
    "params",
    [None, [], [1, 2], {"m": 1}, [object()], "1"],
    ids=["none", "too-few", "too-many", "wrong-name", "unbindable", "string"],
)
def test_bad_params(con: duckdb.DuckDBPyConnection, params: object) -> None:
    sql = "SELECT $n::INT" if isinstance(params, dict) else "SELECT ?"
    with pytest.raises(BadArgument) as ei:
        run_query(con, sql, params)  # type: ignore[call-overload]
    assert ei.value.field == "params"


def test_runtime_error_is_query_error(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(QueryError):
        run_query(con, "SELECT 'abc'::INTEGER")


def test_reads_are_read_only(con: duckdb.DuckDBPyConnection) -> None:
    for sql in ["DELETE FROM t", "CREATE TABLE x (i INT)", "SELECT 1; DELETE FROM t"]:
        with pytest.raises(QueryError) as ei:
            run_query(con, sql)
        assert ei.value.field == "sql"
    assert run_query(con, "SELECT count(*) AS n FROM t").to_pylist() == [{"n": 10}]
    for sql in ["DESCRIBE t", "EXPLAIN SELECT * FROM t", "FROM t LIMIT 1", "SHOW TABLES"]:
        run_query(con, sql)
    run_query(con, "CREATE TABLE x (i INT)", read_only=False)


def test_bad_format(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(BadArgument) as ei:
        run_query(con, "SELECT 1", None, "csv")  # type: ignore[call-overload]
    assert ei.value.field == "fmt"


def test_batches_are_bounded(con: duckdb.DuckDBPyConnection) -> None:
    batches = list(iter_batches(con, "SELECT range AS i FROM range(?)", [10_000], 3_000))
    sizes = [b.num_rows for b in batches]
    assert sum(sizes) == 10_000 and max(sizes) <= 3_000
    values = np.concatenate([b.column("i").to_numpy() for b in batches])
    assert (values == np.arange(10_000)).all()


def test_batch_errors_raise_at_call(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(QueryError):
        iter_batches(con, "SELECT * FROM nowhere")
    with pytest.raises(BadArgument):
        iter_batches(con, "SELECT 1", None, 0)


def _interrupt_until(con: duckdb.DuckDBPyConnection, done: threading.Event) -> threading.Thread:
    # Keep interrupting: a call that lands before the query starts is not remembered.
    def loop() -> None:
        time.sleep(0.1)
        while not done.is_set():
            con.interrupt()
            done.wait(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_interrupt_stops_a_running_query(con: duckdb.DuckDBPyConnection) -> None:
    reader = con.cursor()
    done = threading.Event()
    thread = _interrupt_until(reader, done)
    start = time.monotonic()
    try:
        with pytest.raises(Interrupted) as ei:
            run_query(reader, ENDLESS)
    finally:
        done.set()
        thread.join()
    assert time.monotonic() - start < 10
    assert ei.value.code == "interrupted" and not isinstance(ei.value, QueryError)
    # The connection is usable afterwards.
    assert run_query(reader, "SELECT 42 AS x").to_pylist() == [{"x": 42}]


def test_interrupt_stops_a_stream(con: duckdb.DuckDBPyConnection) -> None:
    reader = con.cursor()
    # Rows come fast but never end: while the consumer pulls batches, the interrupt ends it.
    batches = iter_batches(reader, "SELECT range AS i FROM range(1000000000000)", None, 4096)
    assert next(batches).num_rows == 4096
    done = threading.Event()
    thread = _interrupt_until(reader, done)
    start = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            for _ in batches:
                assert time.monotonic() - start < 10, "interrupt was ignored"
    finally:
        done.set()
        thread.join()


def test_interrupt_while_executing_a_stream(con: duckdb.DuckDBPyConnection) -> None:
    reader = con.cursor()
    done = threading.Event()
    thread = _interrupt_until(reader, done)
    try:
        with pytest.raises(Interrupted):
            # No row qualifies early, so DuckDB is still looking when interrupted.
            list(iter_batches(reader, "SELECT range FROM range(1000000000000) WHERE range < 0"))
    finally:
        done.set()
        thread.join()


def test_cursor_sees_committed_writes_only(con: duckdb.DuckDBPyConnection) -> None:
    reader = con.cursor()
    assert reader is not con
    con.execute("BEGIN TRANSACTION")
    con.execute("INSERT INTO t (i, s) VALUES (100, 'new')")
    # Its own transaction context: the writer's uncommitted row is invisible to the reader.
    assert run_query(reader, "SELECT count(*) AS n FROM t").to_pylist() == [{"n": 10}]
    con.execute("COMMIT")
    assert run_query(reader, "SELECT count(*) AS n FROM t").to_pylist() == [{"n": 11}]


def test_cursors_run_in_parallel(con: duckdb.DuckDBPyConnection) -> None:
    # Two readers of one instance can both be inside DuckDB at once (each has its own lock).
    readers = [con.cursor(), con.cursor()]
    done = threading.Event()
    thread = _interrupt_until(readers[0], done)
    try:
        started = time.monotonic()
        with pytest.raises(Interrupted):
            run_query(readers[0], ENDLESS)
        assert run_query(readers[1], "SELECT 1 AS x").to_pylist() == [{"x": 1}]
        assert time.monotonic() - started < 10
    finally:
        done.set()
        thread.join()


def test_stream_runtime_error_is_query_error(con: duckdb.DuckDBPyConnection) -> None:
    sql = "SELECT CASE WHEN range > 50000 THEN 'x'::INT ELSE range END AS v FROM range(100000)"
    with pytest.raises(QueryError) as ei:
        list(iter_batches(con, sql, None, 100))
    assert "Conversion" in ei.value.message
