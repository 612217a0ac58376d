"""DuckDB's own HNSW (the ``vss`` extension) as a supported SQL backend: DDL and query helpers.

The extension is loaded offline from the ``duckdb-extension-vss`` wheel (``INSTALL`` needs the
network). Caveats measured on duckdb 1.5.5 (docs/vector-search.md has the numbers):

* The planner rewrites ``ORDER BY array_cosine_distance(col, <vector>) LIMIT k`` into an
  ``HNSW_INDEX_SCAN`` only when ``<vector>`` is a constant *literal*. A bound parameter
  (``?::FLOAT[dim]``, or ``PREPARE``/``EXECUTE``) runs a full scan with ``TOP_N`` at execution,
  although ``EXPLAIN`` run with the parameter values shows the index scan: EXPLAIN is not
  proof. So :func:`knn_sql` inlines the vector as a literal.
* A ``WHERE`` clause is applied *after* the index returned its k rows: a selective filter
  returns fewer than k rows (0 of 10 with a 1% filter). Filtered search must over-fetch or
  scan exactly.
* An HNSW index in a file database needs ``SET hnsw_enable_experimental_persistence = true``;
  the extension calls it experimental (a crash can leave the index inconsistent with the WAL).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from symbiote.actors._vector import VectorParams
from symbiote.schema.errors import BadArgument, ConfigError, InvalidRecord

__all__ = [
    "DISTANCE_FUNCTIONS",
    "create_hnsw_index_sql",
    "drop_hnsw_index_sql",
    "explain_uses_hnsw",
    "knn_sql",
    "load_vss",
    "quote_ident",
    "set_ef_search_sql",
    "vector_literal",
    "vss_extension_path",
]

VSS_METRICS = {"cosine": "cosine", "ip": "ip", "l2": "l2sq"}
DISTANCE_FUNCTIONS = {
    "cosine": "array_cosine_distance",
    "ip": "array_negative_inner_product",
    "l2": "array_distance",
}


def vss_extension_path(duckdb_version: str | None = None) -> Path:
    """Where the ``duckdb-extension-vss`` wheel put the binary for this DuckDB version."""
    import duckdb

    try:
        import duckdb_extension_vss
    except ImportError:
        raise ConfigError(
            "the duckdb-extension-vss package is not installed", field="vss"
        ) from None
    version = duckdb_version or duckdb.__version__
    base = Path(duckdb_extension_vss.__file__).parent / "extensions" / f"v{version}"
    path = base / "vss.duckdb_extension"
    if not path.is_file():
        raise ConfigError(
            f"no vss extension for duckdb {version} at {path}; pin duckdb to the wheel's version",
            field="vss",
        )
    return path


def load_vss(con: Any, *, persistent: bool = False) -> None:
    """``LOAD`` the vss extension into ``con`` offline; ``persistent`` allows file indexes."""
    path = str(vss_extension_path()).replace("'", "''")
    con.execute(f"LOAD '{path}'")
    if persistent:
        con.execute("SET hnsw_enable_experimental_persistence = true")


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (a dotted name is quoted per part)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise BadArgument("must be a non-empty identifier", field="identifier")
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def _default_index_name(table: str, column: str) -> str:
    return f"{table.rsplit('.', 1)[-1]}_{column}_hnsw"


def create_hnsw_index_sql(
    params: VectorParams,
    *,
    table: str = "chunks",
    column: str = "embedding",
    name: str | None = None,
) -> str:
    """``CREATE INDEX ... USING HNSW`` for ``params`` (metric, M, ef_construction, ef_search)."""
    index_name = name or _default_index_name(table, column)
    return (
        f"CREATE INDEX IF NOT EXISTS {quote_ident(index_name)} ON {quote_ident(table)} "
        f"USING HNSW ({quote_ident(column)}) WITH (metric = '{VSS_METRICS[params.metric]}', "
        f"M = {int(params.M)}, ef_construction = {int(params.ef_construction)}, "
        f"ef_search = {int(params.ef_search)})"
    )


def drop_hnsw_index_sql(*, table: str = "chunks", column: str = "embedding") -> str:
    """``DROP INDEX`` for the index :func:`create_hnsw_index_sql` names by default."""
    return f"DROP INDEX IF EXISTS {quote_ident(_default_index_name(table, column))}"


def set_ef_search_sql(ef: int) -> str:
    """``SET hnsw_ef_search = ef`` (per connection; overrides the index's ef_search)."""
    if not isinstance(ef, int) or isinstance(ef, bool) or not 1 <= ef <= 100_000:
        raise BadArgument("must be an int in [1, 100000]", field="ef")
    return f"SET hnsw_ef_search = {ef}"


def vector_literal(vector: Any, dim: int) -> str:
    """``[x0, x1, ...]::FLOAT[dim]``: a constant the planner can push into the index.

    ``repr`` of each float32 value (as a Python float) round-trips exactly.
    """
    arr = np.asarray(vector, dtype=np.float64).reshape(-1)
    if arr.shape != (dim,):
        raise InvalidRecord(f"expected {dim} components, got {arr.shape[0]}", field="vector")
    values = arr.tolist()
    if not all(math.isfinite(v) for v in values):
        raise InvalidRecord("NaN or infinite component", field="vector")
    return "[" + ",".join(repr(v) for v in values) + f"]::FLOAT[{dim}]"


def knn_sql(
    params: VectorParams,
    vector: Any,
    k: int,
    *,
    table: str = "chunks",
    column: str = "embedding",
    select: str = "chunk_id",
) -> str:
    """A top-k query the planner answers with ``HNSW_INDEX_SCAN`` (vector inlined).

    Returns ``select`` columns plus ``distance``, nearest first. ``select`` is trusted SQL
    (column list written by us, not by a caller).
    """
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= params.max_k:
        raise BadArgument(f"must be in [1, {params.max_k}]", field="k")
    fn = DISTANCE_FUNCTIONS[params.metric]
    lit = vector_literal(vector, params.dim)
    return (
        f"SELECT {select}, {fn}({quote_ident(column)}, {lit}) AS distance "
        f"FROM {quote_ident(table)} ORDER BY distance LIMIT {k}"
    )


def explain_uses_hnsw(con: Any, sql: str, parameters: Any = None) -> bool:
    """Whether ``EXPLAIN sql`` shows ``HNSW_INDEX_SCAN``.

    Only meaningful for SQL without parameters: with parameter values EXPLAIN shows the
    index scan although the executed plan is a full scan (see the module docstring).
    """
    rows = (
        con.execute(f"EXPLAIN {sql}", parameters).fetchall()
        if parameters is not None
        else con.execute(f"EXPLAIN {sql}").fetchall()
    )
    return any("HNSW_INDEX_SCAN" in str(cell) for row in rows for cell in row)
