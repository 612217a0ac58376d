"""The planner's lookups by chunk_id (the DuckDB check of candidates, the rows of hits).

``chunks`` has no index on ``chunk_id`` (schema migration 4), so these lookups scan it. They
must still filter before they read the wide columns: DuckDB pushes a Bloom filter of the
looked-up ids into the scan (see ``_ID_LIST`` in actors/search.py). These tests pin the
answers against a brute-force truth and that plan, so a DuckDB upgrade that loses it shows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from symbiote.actors.index import KnnHits
from symbiote.actors.search import SearchPlanner
from symbiote.schema.ddl import migrate

DIM = 8
N = 4000  # 1,000 documents of 4 chunks; tenant t0..t4 round robin
GONE = "gone:0"  # an id the index still returns after its row was deleted


def _vectors() -> np.ndarray:
    v = np.random.default_rng(7).standard_normal((N, DIM)).astype(np.float32)
    out: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


VECTORS = _vectors()
IDS = [f"doc-{i // 4}:{i % 4}" for i in range(N)]
TENANTS = [f"t{i % 5}" for i in range(N)]


@pytest.fixture
def con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(str(tmp_path / "plan.duckdb"))
    migrate(con, DIM)
    # Seqs out of id order, as after updates: the lookups must not depend on the layout.
    seqs = np.random.default_rng(3).permutation(N).astype(np.int64) + 1
    table = pa.table(
        {
            "chunk_id": IDS,
            "document_id": [i.split(":")[0] for i in IDS],
            "text": [f"text {i}" for i in range(N)],
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(VECTORS.reshape(-1), pa.float32()), DIM
            ),
            "metadata": [json.dumps({"tenant_id": t}) for t in TENANTS],
            "seq": seqs,
        }
    )
    con.register("_rows", table)
    con.execute("INSERT INTO chunks BY NAME SELECT * FROM _rows")
    con.execute("INSERT INTO chunk_keys BY NAME SELECT chunk_id, seq FROM _rows")
    con.unregister("_rows")
    con.execute("CHECKPOINT")
    yield con
    con.close()


def _planner(con: duckdb.DuckDBPyConnection, seen: list[tuple[str, list[Any]]]) -> SearchPlanner:
    async def knn(query: np.ndarray, k: int, ef: int | None, timeout: float) -> KnnHits:
        # An exact stand-in for the index, plus one hit whose row is gone from the table.
        dist = 1.0 - VECTORS @ query / np.linalg.norm(query)
        order = np.argsort(dist, kind="stable")[: k - 1]
        ids = [GONE, *(IDS[i] for i in order)]
        return KnnHits(
            chunk_ids=ids,
            document_ids=[i.split(":")[0] for i in ids],
            distances=[0.0, *(float(dist[i]) for i in order)],
            count=N + 1,
            highest_seq=N,
        )

    async def sql(text: str, params: list[Any], timeout: float) -> pa.Table:
        seen.append((text, params))
        return con.execute(text, params).to_arrow_table()

    return SearchPlanner(dim=DIM, knn=knn, sql=sql, exact_rows=10)


def _truth(query: np.ndarray, k: int, tenant: str | None) -> list[str]:
    dist = 1.0 - VECTORS @ query / np.linalg.norm(query)
    keep = [i for i in np.argsort(dist, kind="stable") if tenant is None or TENANTS[i] == tenant]
    return [IDS[i] for i in keep[:k]]


@pytest.mark.parametrize("rerank", [False, True])
async def test_filtered_search_with_rows_answers_from_the_table(
    con: duckdb.DuckDBPyConnection, rerank: bool
) -> None:
    seen: list[tuple[str, list[Any]]] = []
    planner = _planner(con, seen)
    query = np.random.default_rng(11).standard_normal(DIM).astype(np.float32)
    hits = await planner.search(
        query, k=10, where={"tenant_id": "t2"}, rerank=rerank, with_rows=True, timeout=10.0
    )
    assert hits.plan == "hnsw+filter"
    assert hits.chunk_ids == _truth(query, 10, "t2")
    assert hits.rows is not None
    assert [r.chunk_id for r in hits.rows] == hits.chunk_ids
    for row in hits.rows:
        i = IDS.index(row.chunk_id)
        assert row.document_id == row.chunk_id.split(":")[0]
        assert row.text == f"text {i}"
        assert row.metadata == {"tenant_id": "t2"}


async def test_rows_of_unfiltered_hits_drop_a_deleted_chunk(
    con: duckdb.DuckDBPyConnection,
) -> None:
    planner = _planner(con, [])
    query = VECTORS[42]
    hits = await planner.search(query, k=5, with_rows=True, timeout=10.0)
    # The index answered GONE first; its row is not in the table, so it is dropped.
    assert GONE not in hits.chunk_ids
    assert hits.chunk_ids == _truth(query, 4, None)
    assert hits.rows is not None
    assert [r.chunk_id for r in hits.rows] == hits.chunk_ids


def _chunk_scans(node: dict[str, Any], out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    extra = node.get("extra_info") or {}
    if isinstance(extra, dict) and str(extra.get("Table", "")).endswith(".chunks"):
        out.append(extra)
    for child in node.get("children", []):
        _chunk_scans(child, out)
    return out


async def test_lookups_by_chunk_id_filter_the_scan_with_a_bloom_filter(
    con: duckdb.DuckDBPyConnection,
) -> None:
    seen: list[tuple[str, list[Any]]] = []
    planner = _planner(con, seen)
    query = np.random.default_rng(5).standard_normal(DIM).astype(np.float32)
    await planner.search(query, k=10, where={"tenant_id": "t1"}, with_rows=True, timeout=10.0)
    await planner.search(
        query, k=10, where={"tenant_id": "t1"}, rerank=True, with_rows=True, timeout=10.0
    )
    lookups = [(text, params) for text, params in seen if "chunk_id IN" in text]
    assert len(lookups) >= 4  # check, rows; check with rerank, rows
    for text, params in lookups:
        plan = json.loads(
            con.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + text, params).fetchall()[0][1]
        )
        scans = _chunk_scans(plan, [])
        assert len(scans) == 1, text
        assert "BF(" in str(scans[0].get("Dynamic Filters", "")), (text, scans[0])
