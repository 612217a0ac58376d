"""The readers' synchronous read path: run one SQL statement and shape its result.

A reader actor owns one connection made with ``writer_con.cursor()`` (a new connection on the
same database instance, with its own transaction context, so it sees what the writer has
committed) and calls these functions in a worker thread. DuckDB errors become typed symbiote
errors; a query stopped by ``con.interrupt()`` (the actor's cancel or deadline, called from
the event loop's thread while this one waits in DuckDB) becomes :class:`Interrupted`, distinct
from a failed query.

Reads are read-only by default: the writer must stay the only code that writes, and a reader's
connection could otherwise write to the shared instance.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, Literal, TypeVar, overload

import duckdb
import msgspec
import numpy as np
import pyarrow as pa

from symbiote.schema.errors import BadArgument, Interrupted, QueryError, SymbioteError

__all__ = [
    "Params",
    "QueryFormat",
    "convert_records",
    "iter_batches",
    "map_duckdb_error",
    "run_query",
]

log = logging.getLogger(__name__)

QueryFormat = Literal["arrow", "numpy", "records"]
#: Positional (``?``, ``$1``) or named (``$name``) parameters.
Params = Sequence[object] | Mapping[str, object] | None

_T = TypeVar("_T")

# Statement types a reader may run. DESCRIBE, SHOW, SUMMARIZE, PRAGMA table_info, FROM-first
# and VALUES all parse as SELECT.
_READ_ONLY_TYPES: Final = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})

# Substrings of DuckDB's InvalidInputException that are about the bound parameters.
_PARAM_MARKERS: Final = (
    "prepared statement parameters",
    "parameter argument/count mismatch",
    "parameter",
)


def map_duckdb_error(exc: BaseException, *, has_params: bool = False) -> SymbioteError:
    """The typed symbiote error for a DuckDB (or parameter-conversion) exception.

    * ``InterruptException`` -> :class:`Interrupted` (field ``sql``);
    * missing or wrong parameters, or a Python value DuckDB cannot bind ->
      :class:`BadArgument` (field ``params``);
    * parser, catalog (the message names the missing table), binder, conversion and other
      errors -> :class:`QueryError` (field ``sql``).
    """
    message = str(exc).strip()
    # Through an Arrow stream DuckDB errors arrive as pyarrow errors (OSError) that keep only
    # the text, hence the prefix check.
    if isinstance(exc, duckdb.InterruptException) or message.startswith("INTERRUPT Error"):
        return Interrupted("the query was interrupted", field="sql")
    if isinstance(exc, duckdb.InvalidInputException) and any(
        marker in message.lower() for marker in _PARAM_MARKERS
    ):
        return BadArgument(message, field="params")
    if isinstance(exc, duckdb.NotImplementedException) and "python value" in message.lower():
        return BadArgument(message, field="params")
    if isinstance(exc, TypeError | ValueError) and has_params:
        return BadArgument(f"cannot bind parameters: {message}", field="params")
    return QueryError(message, field="sql")


def _statement(sql: str, read_only: bool) -> duckdb.Statement | str:
    if not isinstance(sql, str):
        raise BadArgument(f"sql must be a str, got {type(sql).__name__}", field="sql")
    if not read_only:
        return sql
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise map_duckdb_error(exc) from None
    if len(statements) != 1:
        raise QueryError(f"expected exactly one SQL statement, got {len(statements)}", field="sql")
    statement = statements[0]
    if statement.type not in _READ_ONLY_TYPES:
        raise QueryError(
            f"a read query must be SELECT or EXPLAIN, got {statement.type.name}", field="sql"
        )
    # Executing the parsed statement spares DuckDB a second parse.
    return statement


def _execute(
    con: duckdb.DuckDBPyConnection, sql: str, params: Params, read_only: bool
) -> duckdb.DuckDBPyConnection:
    statement = _statement(sql, read_only)
    if params is not None and not isinstance(params, Sequence | Mapping):
        raise BadArgument(
            f"params must be a sequence or a mapping, got {type(params).__name__}",
            field="params",
        )
    if isinstance(params, str | bytes):
        raise BadArgument("params must be a sequence of values, not a string", field="params")
    try:
        return con.execute(statement, params)
    except (duckdb.Error, TypeError, ValueError) as exc:
        raise map_duckdb_error(exc, has_params=params is not None) from None


def _json_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    description = con.description or []
    return [str(d[0]) for d in description if str(d[1]) == "JSON"]


def _to_numpy(table: pa.Table) -> dict[str, np.ndarray[Any, Any]]:
    out: dict[str, np.ndarray[Any, Any]] = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        typ = column.type
        if pa.types.is_fixed_size_list(typ) and column.null_count == 0:
            # Embedding columns come out as one (n, dim) matrix instead of n small arrays.
            flat = column.combine_chunks()
            values = flat.values.to_numpy(zero_copy_only=False)
            out[name] = values.reshape(len(flat), typ.list_size)
        else:
            out[name] = column.to_numpy()
    return out


@overload
def run_query(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    params: Params = ...,
    fmt: Literal["arrow"] = ...,
    *,
    read_only: bool = ...,
) -> pa.Table: ...
@overload
def run_query(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    params: Params,
    fmt: Literal["numpy"],
    *,
    read_only: bool = ...,
) -> dict[str, np.ndarray[Any, Any]]: ...
@overload
def run_query(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    params: Params,
    fmt: Literal["records"],
    *,
    read_only: bool = ...,
) -> list[dict[str, Any]]: ...
def run_query(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    params: Params = None,
    fmt: QueryFormat = "arrow",
    *,
    read_only: bool = True,
) -> pa.Table | dict[str, np.ndarray[Any, Any]] | list[dict[str, Any]]:
    """Run one statement and return its whole result.

    ``fmt``: ``"arrow"`` a ``pyarrow.Table``; ``"numpy"`` a dict of column arrays (a
    ``FLOAT[dim]`` column without NULLs becomes one (n, dim) matrix; integer columns with NULLs
    become float with NaN, as pyarrow converts them); ``"records"`` a list of dicts (JSON columns
    decoded, timestamps as aware UTC datetimes). For large results use :func:`iter_batches`.

    ``read_only`` (default) refuses anything but one SELECT/EXPLAIN statement.

    Raises :class:`QueryError`, :class:`BadArgument` or :class:`Interrupted`, see
    :func:`map_duckdb_error`.
    """
    if fmt not in ("arrow", "numpy", "records"):
        raise BadArgument(f"fmt must be 'arrow', 'numpy' or 'records', got {fmt!r}", field="fmt")
    cursor = _execute(con, sql, params, read_only)
    try:
        table = cursor.to_arrow_table()
    except duckdb.Error as exc:
        raise map_duckdb_error(exc) from None
    if fmt == "arrow":
        return table
    if fmt == "numpy":
        return _to_numpy(table)
    rows: list[dict[str, Any]] = table.to_pylist()
    for name in _json_columns(con):
        # DuckDB hands JSON to Arrow as text; records should carry the values themselves.
        for row in rows:
            value = row.get(name)
            if value is not None:
                row[name] = msgspec.json.decode(value)
    return rows


def convert_records(rows: list[dict[str, Any]], record_type: type[_T]) -> list[_T]:
    """Convert ``run_query(..., fmt="records")`` rows into msgspec structs of ``record_type``.

    Raises :class:`QueryError` (field ``record_type``) if the rows do not fit the type.
    """
    try:
        return msgspec.convert(rows, list[record_type])  # type: ignore[valid-type]
    except msgspec.ValidationError as exc:
        raise QueryError(
            f"rows do not convert to {record_type.__name__}: {exc}", field="record_type"
        ) from None


def iter_batches(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    params: Params = None,
    batch_rows: int = 65_536,
    *,
    read_only: bool = True,
) -> Iterator[pa.RecordBatch]:
    """Run one statement and yield its result as Arrow record batches of at most ``batch_rows``.

    The result is produced incrementally: memory stays bounded by a batch, not the result.
    Statement errors are raised by this call; errors met while streaming by ``next()``. The
    connection is busy until the
    iterator is exhausted or closed; running another statement on it ends this one. Each
    ``next()`` is a blocking call (run it in the reader's worker thread), and
    ``con.interrupt()`` stops it like any query.
    """
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise BadArgument(
            f"batch_rows must be a positive integer, got {batch_rows!r}", field="batch_rows"
        )
    # Executed here, not lazily in the generator, so that a bad statement fails at the call.
    cursor = _execute(con, sql, params, read_only)
    try:
        reader = cursor.to_arrow_reader(batch_rows)
    except duckdb.Error as exc:
        raise map_duckdb_error(exc) from None
    return _batches(reader)


def _batches(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    try:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (duckdb.Error, pa.ArrowException, OSError) as exc:
                raise map_duckdb_error(exc) from None
            yield batch
    finally:
        reader.close()
