"""The index actor and ``Runtime.search`` end to end, on real DuckDB files, under the loop guard."""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import trio

from symbiote.actors.index import default_index_dir
from symbiote.actors.search import compile_filter
from symbiote.runtime import Config, Runtime, open_runtime, start_blocking
from symbiote.runtime._guard import LoopGuard
from symbiote.schema.errors import BadArgument, ConfigError, InvalidRecord
from symbiote.schema.records import Chunk, Document
from symbiote.schema.search import SearchFilter, parse_filter
from tests.actors.index_data import DIM, chunk_for, vector

N = 4000  # chunks in the filter tests: 1,000 documents of 4 chunks


def _config(tmp_path: Path, **over: Any) -> Config:
    base = Config(db_path=str(tmp_path / "idx.duckdb"), dim=DIM, readers=2)
    return msgspec.structs.replace(base, **over)


async def db_high_water(rt: Runtime) -> int:
    rows = await rt.query("SELECT value FROM symbiote_meta WHERE key = 'chunk_seq'", fmt="records")
    return int(rows[0]["value"])


async def wait_indexed(rt: Runtime, limit_s: float = 5.0) -> None:
    """Until the index is built and has applied every committed chunk change."""
    await rt.wait_index_ready(timeout=limit_s)
    target = await db_high_water(rt)
    with trio.fail_after(limit_s):
        while (await rt.index_status()).highest_seq < target:  # noqa: ASYNC110 (polls actor state)
            await trio.sleep(0.01)


@pytest.fixture
async def rt(tmp_path: Path, loop_guard: LoopGuard) -> AsyncIterator[Runtime]:
    async with open_runtime(_config(tmp_path)) as runtime:
        yield runtime


# --------------------------------------------------------------------------- basics


async def test_search_finds_inserted_chunks(rt: Runtime) -> None:
    chunks = [chunk_for(i) for i in range(300)]
    await rt.upsert_chunks(chunks)
    await wait_indexed(rt)
    for i in range(0, 300, 7):
        hits = await rt.search(vector(i), k=3)
        assert hits.chunk_ids[0] == chunks[i].chunk_id
        assert hits.document_ids[0] == chunks[i].document_id
        assert hits.distances[0] == pytest.approx(0.0, abs=1e-5)
        assert hits.distances == sorted(hits.distances)
        assert hits.plan == "hnsw"
    assert rt._sup.ref("data/index").restarts == 0


async def test_acknowledged_upsert_is_searchable_within_a_second(rt: Runtime) -> None:
    await rt.upsert_chunks([chunk_for(i) for i in range(1000, 1500)])
    worst = 0.0
    for i in range(20):
        c = chunk_for(i)
        await rt.upsert_chunks([c])
        acked = trio.current_time()
        with trio.fail_after(1.0):
            while (await rt.search(vector(i), k=1)).chunk_ids != [c.chunk_id]:  # noqa: ASYNC110
                await trio.sleep(0.002)
        worst = max(worst, trio.current_time() - acked)
    assert worst < 1.0


async def test_update_moves_a_chunk(rt: Runtime) -> None:
    await rt.upsert_chunks([chunk_for(i) for i in range(200)])
    moved = msgspec.structs.replace(chunk_for(5), embedding=vector(10_000).tolist())
    await rt.upsert_chunks([moved])
    await wait_indexed(rt)
    near_new = await rt.search(vector(10_000), k=1)
    assert near_new.chunk_ids == [moved.chunk_id]
    assert near_new.distances[0] == pytest.approx(0.0, abs=1e-5)
    near_old = await rt.search(vector(5), k=5, ef=400)
    assert moved.chunk_id not in near_old.chunk_ids
    status = await rt.index_status()
    assert status.count == 200
    # Far below the size where the default ef starts to grow.
    assert status.default_ef == Config().index_ef_search


async def test_deletes_never_come_back(tmp_path: Path, loop_guard: LoopGuard) -> None:
    config = _config(tmp_path)
    gone = [chunk_for(i).chunk_id for i in range(0, 400, 2)]
    async with open_runtime(config) as rt:
        await rt.upsert_chunks([chunk_for(i) for i in range(400)])
        await rt.save_index()  # the snapshot still holds them ...
        await rt.delete_chunks(gone[:100])  # ... these deletes come after it
        await wait_indexed(rt)
        await _assert_absent(rt, gone[:100], range(0, 200, 2))
    # Restart with a snapshot that predates half of the deletes: catch-up replays them.
    async with open_runtime(config) as rt:
        info = await rt.wait_index_ready()
        assert info.loaded_snapshot and not info.rebuilt
        await _assert_absent(rt, gone[:100], range(0, 200, 2))
        await rt.delete_chunks(gone[100:])
        await wait_indexed(rt)
        await _assert_absent(rt, gone, range(0, 400, 2))
        assert (await rt.index_status()).count == 200
    # And once more from the snapshot taken at stop.
    async with open_runtime(config) as rt:
        await _assert_absent(rt, gone, range(0, 400, 2))
        # Re-inserting a deleted id brings back the new row, not the old vector.
        fresh = msgspec.structs.replace(chunk_for(0), embedding=vector(777_777).tolist())
        await rt.upsert_chunks([fresh])
        await wait_indexed(rt)
        assert (await rt.search(vector(777_777), k=1)).chunk_ids == [fresh.chunk_id]
        assert fresh.chunk_id not in (await rt.search(vector(0), k=3, ef=400)).chunk_ids


async def _assert_absent(rt: Runtime, ids: Sequence[str], vectors_of: range) -> None:
    banned = set(ids)
    for i in vectors_of:
        hits = await rt.search(vector(i), k=20, ef=400)
        assert not banned & set(hits.chunk_ids), f"deleted chunk came back for vector {i}"


async def test_damaged_snapshot_is_rebuilt_from_the_table(
    tmp_path: Path, loop_guard: LoopGuard
) -> None:
    config = _config(tmp_path)
    async with open_runtime(config) as rt:
        await rt.upsert_chunks([chunk_for(i) for i in range(300)])
        await wait_indexed(rt)
        before = [(await rt.search(vector(i), k=5, ef=400)).chunk_ids for i in range(0, 300, 10)]
    await trio.to_thread.run_sync(_truncate_snapshot, config)
    async with open_runtime(config) as rt:
        info = await rt.wait_index_ready()
        assert info.rebuilt and info.count == 300
        after = [(await rt.search(vector(i), k=5, ef=400)).chunk_ids for i in range(0, 300, 10)]
    assert after == before


def _truncate_snapshot(config: Config) -> None:
    index_dir = Path(default_index_dir(config.db_path) or "")
    (index_bin,) = index_dir.glob("snap-*/index.bin")
    index_bin.write_bytes(index_bin.read_bytes()[:-100])  # truncated: torn write or bad disk


async def test_notices_dropped_under_overload_are_caught_up(
    tmp_path: Path, loop_guard: LoopGuard
) -> None:
    # A one-slot mailbox: the writer drops most notices; the gap check and the poll recover.
    config = _config(tmp_path, index_mailbox=1, index_poll_s=0.1)
    async with open_runtime(config) as rt:
        async with trio.open_nursery() as nursery:
            for p in range(20):
                nursery.start_soon(rt.upsert_chunks, [chunk_for(p * 25 + j) for j in range(25)])
        await wait_indexed(rt)
        assert (await rt.index_status()).count == 500
        for i in range(0, 500, 25):
            assert (await rt.search(vector(i), k=1)).chunk_ids == [chunk_for(i).chunk_id]


# --------------------------------------------------------------------------- filters


Corpus = tuple[list[Document], list[Chunk], np.ndarray]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    # Built outside the trio loop (a sync fixture), so the loop guard measures the runtime.
    return _filter_corpus()


def _filter_corpus() -> Corpus:
    """1,000 documents x 4 chunks. doc_type 'rare' = 0.5% of chunks, 'some' = 5%;
    tenant t0 (chunk metadata) = 50%; tag 'x' on every tenth document."""
    docs = []
    for d in range(N // 4):
        kind = "rare" if d < 5 else "some" if d < 55 else "note"
        docs.append(
            Document(
                id=f"doc-{d}",
                doc_type=kind,
                tags=("x",) if d % 10 == 0 else ("y",),
                created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=d),
            )
        )
    chunks = [
        chunk_for(i, slots=N, metadata={"tenant_id": f"t{i % 2}", "thread_id": f"th{i % 3}"})
        for i in range(N)
    ]
    return docs, chunks, np.stack([vector(i) for i in range(N)])


def _admitted(corpus: Corpus, where: dict[str, Any]) -> tuple[np.ndarray, set[str]]:
    docs, chunks, _ = corpus
    doc_type = {d.id: d.doc_type for d in docs}
    if "tenant_id" in where:
        keep = [bool(c.metadata and c.metadata["tenant_id"] == where["tenant_id"]) for c in chunks]
    else:
        keep = [doc_type[c.document_id] == where["doc_type"] for c in chunks]
    allowed = np.flatnonzero(keep)
    return allowed, {chunks[i].chunk_id for i in allowed}


def _exact(matrix: np.ndarray, allowed: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    dist = 1.0 - matrix[allowed] @ q
    order = np.argsort(dist, kind="stable")[:k]
    return [int(i) for i in allowed[order]]


@pytest.mark.parametrize(
    ("where", "selectivity", "exact_rows", "plan"),
    [
        ({"tenant_id": "t0"}, 0.5, 50, "hnsw+filter"),
        ({"doc_type": "some"}, 0.05, 50, "hnsw+filter"),
        ({"doc_type": "rare"}, 0.005, 50, "exact"),
        ({"doc_type": "rare"}, 0.005, 0, "hnsw+filter"),
    ],
    ids=["50%-metadata", "5%-document", "0.5%-exact-scan", "0.5%-overfetch"],
)
async def test_filtered_top_k_equals_exact_filtered_top_k(
    tmp_path: Path,
    loop_guard: LoopGuard,
    corpus: Corpus,
    where: dict[str, Any],
    selectivity: float,
    exact_rows: int,
    plan: str,
) -> None:
    docs, chunks, matrix = corpus
    # Plain Python over 4,000 records: off the loop, so the guard measures the runtime only.
    allowed, allowed_ids = await trio.to_thread.run_sync(_admitted, corpus, where)
    assert len(allowed) == round(N * selectivity)
    config = _config(tmp_path, search_exact_rows=exact_rows)
    k = 10
    async with open_runtime(config) as rt:
        await rt.upsert_documents(docs)
        await rt.upsert_chunks(chunks)
        await wait_indexed(rt)
        recalls = []
        rng = np.random.default_rng(7)
        for _ in range(30):
            q = rng.standard_normal(DIM).astype(np.float32)
            q /= np.linalg.norm(q)
            hits = await rt.search(q, k=k, where=where)
            assert hits.plan == plan
            truth = {chunks[i].chunk_id for i in _exact(matrix, allowed, q, k)}
            assert len(hits.chunk_ids) == k
            assert set(hits.chunk_ids) <= allowed_ids
            recalls.append(len(truth & set(hits.chunk_ids)) / k)
        assert float(np.mean(recalls)) >= 0.95


async def test_filter_fields_and_options(
    tmp_path: Path, loop_guard: LoopGuard, corpus: Corpus
) -> None:
    docs, chunks, _ = corpus
    async with open_runtime(_config(tmp_path, search_exact_rows=50)) as rt:
        await rt.upsert_documents(docs)
        await rt.upsert_chunks(chunks)
        await wait_indexed(rt)
        q = vector(3)
        cases: list[tuple[dict[str, Any], Any]] = [
            ({"tags": "x"}, lambda c, d: "x" in (d.tags or ())),
            (
                {"tags_all": ["y"], "thread_id": ["th1", "th2"]},
                lambda c, d: "y" in (d.tags or ()) and c.metadata["thread_id"] != "th0",
            ),
            ({"document_id": ["doc-3", "doc-700"]}, lambda c, d: d.id in ("doc-3", "doc-700")),
            ({"metadata": {"tenant_id": "t1"}}, lambda c, d: c.metadata["tenant_id"] == "t1"),
            (
                {
                    "created_after": dt.datetime(2026, 3, 1, tzinfo=dt.UTC),
                    "created_before": dt.datetime(2026, 4, 1, tzinfo=dt.UTC),
                },
                lambda c, d: (
                    dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
                    <= d.created_at
                    < dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
                ),
            ),
        ]
        doc_of = {d.id: d for d in docs}
        for where, admits in cases:
            hits = await rt.search(q, k=8, where=where, rerank=True)
            allowed = {c.chunk_id for c in chunks if admits(c, doc_of[c.document_id])}
            assert hits.chunk_ids and set(hits.chunk_ids) <= allowed, where
            assert hits.distances == sorted(hits.distances)
        one = await rt.search(q, k=10, one_per_document=True, with_rows=True)
        assert len(set(one.document_ids)) == 10
        assert one.rows is not None and [r.chunk_id for r in one.rows] == one.chunk_ids
        assert one.rows[0].metadata is not None and "tenant_id" in one.rows[0].metadata
        exact_one = await rt.search(q, k=3, where={"doc_type": "rare"}, one_per_document=True)
        assert exact_one.plan == "exact" and len(set(exact_one.document_ids)) == 3
        none = await rt.search(q, k=5, where={"doc_type": "nothing-has-this"})
        assert none.chunk_ids == [] and none.plan == "exact"


def test_compile_filter_binds_every_value() -> None:
    flt = parse_filter({"doc_type": ["a", "b"], "tenant_id": "t'; DROP TABLE chunks; --"})
    assert flt is not None
    sql, params = compile_filter(flt)
    assert "DROP" not in sql
    assert params == ["t'; DROP TABLE chunks; --", '["a","b"]']
    assert parse_filter({}) is None
    assert parse_filter(SearchFilter(status="draft")) == SearchFilter(status="draft")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "error", "field"),
    [
        (lambda: (np.ones(DIM + 1), {}), InvalidRecord, "vector"),
        (lambda: (np.r_[np.ones(DIM - 1), np.nan], {}), InvalidRecord, "vector"),
        (lambda: (np.r_[np.ones(DIM - 1), np.inf], {}), InvalidRecord, "vector"),
        (lambda: (np.zeros(DIM), {}), InvalidRecord, "vector"),
        (lambda: (["a"] * DIM, {}), InvalidRecord, "vector"),
        (lambda: (np.ones(DIM), {"k": 0}), BadArgument, "k"),
        (lambda: (np.ones(DIM), {"k": 1001}), BadArgument, "k"),
        (lambda: (np.ones(DIM), {"k": 2.5}), BadArgument, "k"),
        (lambda: (np.ones(DIM), {"ef": 0}), BadArgument, "ef"),
        (lambda: (np.ones(DIM), {"where": {"colour": "red"}}), BadArgument, "where.colour"),
        (lambda: (np.ones(DIM), {"where": {"doc_type": 5}}), BadArgument, "where.doc_type"),
        (lambda: (np.ones(DIM), {"where": {"tags": ["a", 1]}}), BadArgument, "where.tags"),
        (
            lambda: (np.ones(DIM), {"where": {"created_after": dt.datetime(2026, 1, 1)}}),
            BadArgument,
            "where.created_after",
        ),
        (
            lambda: (np.ones(DIM), {"where": {"metadata": {"a-b": 1}}}),
            BadArgument,
            "where.metadata",
        ),
        (lambda: (np.ones(DIM), {"where": "doc_type = 'post'"}), BadArgument, "where"),
        (lambda: (np.ones(DIM), {"rerank": "yes"}), BadArgument, "rerank"),
    ],
)
async def test_bad_input_is_typed_and_harmless(
    rt: Runtime, call: Any, error: type[Exception], field: str
) -> None:
    await rt.upsert_chunks([chunk_for(i) for i in range(50)])
    vec, kwargs = call()
    with pytest.raises(error) as info:
        await rt.search(vec, **kwargs)
    assert getattr(info.value, "field", None) == field
    # The index actor also refuses bad input sent to it directly, and stays up.
    from symbiote.actors.index import Knn

    if field == "vector":
        with pytest.raises(InvalidRecord):
            await rt._sup.ref("data/index").ask(Knn(vector=vec, k=3), timeout=5)
    await wait_indexed(rt)
    assert (await rt.search(vector(1), k=1)).chunk_ids == [chunk_for(1).chunk_id]
    assert rt._sup.ref("data/index").restarts == 0


async def test_search_when_the_index_is_off(tmp_path: Path, loop_guard: LoopGuard) -> None:
    async with open_runtime(_config(tmp_path, index_enabled=False)) as rt:
        with pytest.raises(ConfigError) as info:
            await rt.search(vector(1))
        assert info.value.field == "index_enabled"


def test_blocking_search(tmp_path: Path) -> None:
    with start_blocking(_config(tmp_path)) as rt:
        rt.upsert_chunks([chunk_for(i) for i in range(100)])
        for _ in range(200):
            hits = rt.search(vector(42), k=2, with_rows=True)
            if hits.chunk_ids and hits.chunk_ids[0] == chunk_for(42).chunk_id:
                break
            time.sleep(0.01)
        assert hits.chunk_ids[0] == chunk_for(42).chunk_id
        assert hits.rows is not None and hits.rows[0].text == "chunk 42"
        assert rt.wait_index_ready().ready
        for _ in range(200):
            if rt.index_status().count == 100:
                break
            time.sleep(0.01)
        assert rt.index_status().count == 100


async def test_many_concurrent_searches_share_batches(rt: Runtime) -> None:
    await rt.upsert_chunks([chunk_for(i) for i in range(500)])
    await wait_indexed(rt)
    found: dict[int, str] = {}

    async def one(i: int) -> None:
        found[i] = (await rt.search(vector(i), k=1)).chunk_ids[0]

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert found == {i: chunk_for(i).chunk_id for i in range(200)}
    info = await rt.index_status()
    assert info.batches < info.searches  # queries were stacked into shared library calls


async def test_concurrent_searches_reach_the_index_as_shared_messages(rt: Runtime) -> None:
    await rt.upsert_chunks([chunk_for(i) for i in range(300)])
    await wait_indexed(rt)
    calls = rt._knn_calls
    assert calls is not None
    index = rt._sup.ref("data/index")
    before = (calls.batches, calls.items, index.processed)
    found: dict[int, str] = {}

    async def one(i: int) -> None:
        found[i] = (await rt.search(vector(i), k=1)).chunk_ids[0]

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(one, i)
    assert found == {i: chunk_for(i).chunk_id for i in range(100)}
    batches, items = calls.batches - before[0], calls.items - before[1]
    assert items == 100 and batches < 10  # one KnnBatch per turn, not one Knn per query
    assert index.processed - before[2] == batches  # and the index actor saw only those


async def test_a_bad_query_among_concurrent_ones_fails_alone(rt: Runtime) -> None:
    await rt.upsert_chunks([chunk_for(i) for i in range(100)])
    await wait_indexed(rt)
    out: dict[int, object] = {}

    async def one(i: int, vec: Any) -> None:
        try:
            out[i] = (await rt.search(vec, k=1)).chunk_ids[0]
        except InvalidRecord as exc:
            out[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(20):
            bad = np.r_[np.ones(DIM - 1), np.nan].astype(np.float32)
            nursery.start_soon(one, i, bad if i == 7 else vector(i))
    assert isinstance(out.pop(7), InvalidRecord)
    assert out == {i: chunk_for(i).chunk_id for i in range(20) if i != 7}


async def test_a_knn_batch_answers_each_row_as_a_knn_would(rt: Runtime) -> None:
    from symbiote.actors.index import Knn, KnnBatch, KnnBatchHits

    await rt.upsert_chunks([chunk_for(i) for i in range(200)])
    await wait_indexed(rt)
    ref = rt._sup.ref("data/index")
    picks = (3, 50, 120)
    vecs = np.stack([vector(i) for i in picks])
    batch = await ref.ask(KnnBatch(vectors=vecs, k=4), timeout=5)
    assert isinstance(batch, KnnBatchHits)
    singles = [await ref.ask(Knn(vector=v, k=4), timeout=5) for v in vecs]
    assert batch.rows == singles
    assert [r.chunk_ids[0] for r in batch.rows] == [chunk_for(i).chunk_id for i in picks]
    assert all(len(r.chunk_ids) == 4 and r.ready for r in batch.rows)


@pytest.mark.parametrize(
    ("vectors", "error", "match"),
    [
        (np.vstack([np.ones(DIM), np.zeros(DIM)]).astype(np.float32), InvalidRecord, "row 1"),
        (np.vstack([np.ones(DIM), np.full(DIM, np.nan)]).astype(np.float32), InvalidRecord, "NaN"),
        (np.ones((2, DIM + 1), np.float32), InvalidRecord, "shape"),
        (np.ones((257, DIM), np.float32), BadArgument, "1 to 256"),
        (np.ones((0, DIM), np.float32), BadArgument, "1 to 256"),
    ],
)
async def test_a_bad_knn_batch_is_refused_whole_and_harmless(
    rt: Runtime, vectors: np.ndarray, error: type[Exception], match: str
) -> None:
    from symbiote.actors.index import KnnBatch

    await rt.upsert_chunks([chunk_for(i) for i in range(50)])
    await wait_indexed(rt)
    ref = rt._sup.ref("data/index")
    with pytest.raises(error, match=match) as info:
        await ref.ask(KnnBatch(vectors=vectors, k=3), timeout=5)
    assert getattr(info.value, "field", None) == "vectors"
    assert (await rt.search(vector(1), k=1)).chunk_ids == [chunk_for(1).chunk_id]
    assert ref.restarts == 0


async def test_a_partial_index_is_completed_by_the_table(rt: Runtime) -> None:
    # A stale partial index (what the index actor answers while it builds: ready=False, with
    # the highest_seq it covers) against a table that moved on: a chunk updated, one
    # deleted, one added after that seq. The planner must answer from the table's current
    # state: no deleted chunk, the updated one at its new place, the new one found.
    from symbiote.actors.index import KnnHits
    from symbiote.actors.search import SearchPlanner

    await rt.upsert_chunks([chunk_for(i) for i in range(200)])
    high = await db_high_water(rt)
    stale = {chunk_for(i).chunk_id: (chunk_for(i).document_id, vector(i)) for i in range(200)}
    updated = msgspec.structs.replace(chunk_for(5), embedding=vector(1005).tolist())
    added = msgspec.structs.replace(chunk_for(2999), embedding=vector(2000).tolist())
    await rt.upsert_chunks([updated, added])
    await rt.delete_chunks([chunk_for(7).chunk_id])

    ids = list(stale)
    matrix = np.stack([stale[c][1] for c in ids])

    async def partial_index(query: Any, k: int, ef: int | None, timeout: float) -> KnnHits:
        dist = 1.0 - matrix @ np.asarray(query, np.float32)
        top = np.argsort(dist)[:k]
        return KnnHits(
            chunk_ids=[ids[i] for i in top],
            document_ids=[stale[ids[i]][0] for i in top],
            distances=[float(dist[i]) for i in top],
            count=len(ids),
            highest_seq=high,
            ready=False,
        )

    planner = SearchPlanner(dim=DIM, knn=partial_index, sql=rt._sql)

    def search(q: np.ndarray, **kw: Any) -> Any:
        return planner.search(q, 5, timeout=10.0, **kw)

    moved = await search(vector(1005))
    assert moved.plan == "hnsw+exact"
    assert moved.chunk_ids[0] == updated.chunk_id and moved.distances[0] < 1e-5
    assert len(set(moved.chunk_ids)) == len(moved.chunk_ids)
    old_place = await search(vector(5))
    assert updated.chunk_id not in old_place.chunk_ids[:1]  # not at its old vector any more
    gone = await search(vector(7))
    assert chunk_for(7).chunk_id not in gone.chunk_ids
    new = await search(vector(2000))
    assert new.chunk_ids[0] == added.chunk_id
    kept = await search(vector(42), one_per_document=True, rerank=True)
    assert kept.chunk_ids[0] == chunk_for(42).chunk_id and kept.distances[0] < 1e-5
    assert len(set(kept.document_ids)) == len(kept.document_ids)
    filtered = await search(vector(2000), where={"document_id": [added.document_id]})
    assert filtered.chunk_ids[0] == added.chunk_id
    assert set(filtered.document_ids) == {added.document_id}


def test_index_dir_default() -> None:
    assert default_index_dir("/data/x.duckdb") == "/data/x.duckdb.index"
    assert default_index_dir(":memory:") is None
    shutil.rmtree("/nonexistent", ignore_errors=True)
