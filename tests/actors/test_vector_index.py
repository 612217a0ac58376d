"""The synchronous vector layer: correctness, deletes, snapshots, bad input, SQL helpers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from symbiote.actors._vector import (
    AUTO_EF_FROM,
    FORK_SAVES,
    Interrupted,
    MicroBatcher,
    SnapshotCorrupt,
    SnapshotIncompatible,
    SnapshotMissing,
    VectorChecks,
    VectorIndex,
    VectorParams,
    _write_in_child,
    ef_for_size,
)
from symbiote.actors._vector_sql import (
    create_hnsw_index_sql,
    explain_uses_hnsw,
    knn_sql,
    load_vss,
    set_ef_search_sql,
)
from symbiote.schema.errors import (
    ActorStopped,
    BadArgument,
    ConfigError,
    InvalidRecord,
    SymbioteError,
)

DIM = 64
N = 5_000
BACKENDS = ["hnswlib", "usearch"]


def clustered(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Clustered unit vectors with low intrinsic dimension (same model as bench/_common)."""
    world = np.random.default_rng(7)
    proj = world.standard_normal((16, dim)).astype(np.float32) / 4.0
    centres = world.standard_normal((20, 16)).astype(np.float32)
    gen = np.random.default_rng(seed)
    z = centres[gen.integers(0, 20, n)] + gen.standard_normal((n, 16)).astype(np.float32)
    x = z @ proj + 0.1 * gen.standard_normal((n, dim)).astype(np.float32)
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def exact_ids(base: np.ndarray, ids: list[str], queries: np.ndarray, k: int) -> list[set[str]]:
    sims = queries @ base.T
    top = np.argsort(-sims, axis=1)[:, :k]
    return [{ids[j] for j in row} for row in top]


def recall(found: np.ndarray, truth: list[set[str]]) -> float:
    k = found.shape[1]
    return float(np.mean([len(set(row) & t) / k for row, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[str], np.ndarray]:
    return clustered(N, seed=1), [f"doc{i // 4}:{i % 4}" for i in range(N)], clustered(200, 2)


@pytest.fixture(scope="module", params=BACKENDS)
def built(request, data) -> VectorIndex:
    base, ids, _ = data
    idx = VectorIndex(VectorParams(dim=DIM, backend=request.param, initial_capacity=100))
    idx.add(ids[:2_000], base[:2_000], seq=1)
    idx.add(ids[2_000:], base[2_000:], seq=2)  # grows past the initial capacity twice
    return idx


def fresh(backend: str = "hnswlib", **kw) -> VectorIndex:
    return VectorIndex(VectorParams(dim=DIM, backend=backend, **kw))  # type: ignore[arg-type]


def test_recall_against_exact(built: VectorIndex, data) -> None:
    base, ids, queries = data
    assert len(built) == N and built.highest_seq == 2 and built.capacity >= N
    res = built.search(queries, k=10)
    assert res.ids.shape == (200, 10) and res.distances.shape == (200, 10)
    assert recall(res.ids, exact_ids(base, ids, queries, 10)) >= 0.95
    # Cosine distance, sorted ascending, and equal to 1 - dot for unit vectors.
    assert np.all(np.diff(res.distances, axis=1) >= -1e-6)
    j = ids.index(res.ids[0, 0])
    assert res.distances[0, 0] == pytest.approx(1 - float(queries[0] @ base[j]), abs=1e-4)


def test_single_vector_and_small_k(built: VectorIndex, data) -> None:
    base, ids, _ = data
    res = built.search(base[17], k=1)
    assert res.ids.shape == (1, 1) and res.ids[0, 0] == ids[17]


@pytest.mark.parametrize("backend", BACKENDS)
def test_deletes_never_return_even_after_reload(backend: str, data, tmp_path: Path) -> None:
    base, ids, _ = data
    idx = fresh(backend)
    idx.add(ids[:1_000], base[:1_000], seq=5)
    gone = ids[:300]
    assert idx.delete([*gone, "never-existed"], seq=6) == 300
    assert idx.delete(gone) == 0  # idempotent
    probe = base[:300]
    assert not set(idx.search(probe, k=20).ids.ravel()) & set(gone)
    # Other vectors go into new slots (300 deleted is under the garbage allowance); the
    # reuse path is covered by the next test.
    idx.add(ids[1_000:1_300], base[1_000:1_300], seq=7)
    assert len(idx) == 1_000 and idx.highest_seq == 7
    assert not set(idx.search(probe, k=20).ids.ravel()) & set(gone)
    idx.save(tmp_path)
    again = VectorIndex.load(tmp_path)
    assert len(again) == 1_000 and again.highest_seq == 7
    assert not set(again.search(probe, k=20).ids.ravel()) & set(gone)
    assert all(g not in again for g in gone)
    # A later insert after reload must not resurrect anything either.
    again.add(["new"], base[5:6])
    assert not set(again.search(probe, k=20).ids.ravel()) & set(gone)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deleted_slots_are_reused_only_past_the_garbage_allowance(
    backend: str, data, tmp_path: Path
) -> None:
    base, ids, _ = data
    idx = fresh(backend)
    idx.add(ids[:2_000], base[:2_000])
    idx.delete(ids[:200])
    # 200 deleted <= max(1,024, 25% of 1,800): new vectors are appended (hnswlib's slot
    # reuse costs ~3.5x an insert), so a burst of churn runs at insert speed.
    idx.add(ids[2_000:2_100], base[2_000:2_100])
    assert idx.free_slots == 200 and len(idx) == 1_900
    idx.delete(ids[200:1_700])
    # 1,700 deleted > max(1,024, 25% of 400): the next inserts take deleted slots.
    idx.add(ids[2_100:2_600], base[2_100:2_600])
    assert idx.free_slots == 1_200 and len(idx) == 900
    gone = set(ids[:1_700])
    assert not set(idx.search(base[:1_700:7], k=20).ids.ravel()) & gone
    # The reused slots are searchable (approximate: nearly every vector finds itself).
    own = idx.search(base[2_100:2_600], k=1).ids[:, 0]
    assert np.mean(own == np.asarray(ids[2_100:2_600], dtype=object)) >= 0.98
    idx.save(tmp_path)
    again = VectorIndex.load(tmp_path)
    assert again.free_slots == 1_200 and len(again) == 900
    again.add(ids[2_600:3_000], base[2_600:3_000])
    assert again.free_slots == 800
    assert not set(again.search(base[:1_700:7], k=20).ids.ravel()) & gone


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_replaces_vector(backend: str, data) -> None:
    base, ids, _ = data
    idx = fresh(backend)
    idx.add(ids[:500], base[:500])
    idx.update([ids[0]], base[400:401])  # ids[0] now carries vector 400
    res = idx.search(base[0:1], k=5)
    assert ids[0] not in set(res.ids[0][res.distances[0] < 1e-4])
    near = idx.search(base[400:401], k=2).ids[0]
    assert ids[0] in near and len(idx) == 500
    idx.add(ids[:500], base[:500])  # replaying the same commit is harmless
    assert len(idx) == 500 and idx.search(base[0:1], k=1).ids[0, 0] == ids[0]


def test_k_above_count_and_empty_index() -> None:
    idx = fresh()
    assert idx.search(np.ones((2, DIM), np.float32), k=5).ids.shape == (2, 0)
    idx.add(["a", "b"], clustered(2, 3))
    res = idx.search(clustered(3, 4), k=5)
    assert res.ids.shape == (3, 2) and {"a", "b"} == set(res.ids[0])


def test_snapshot_round_trip(built: VectorIndex, data, tmp_path: Path) -> None:
    _, _, queries = data
    backend = built.params.backend
    before = built.search(queries, k=10)
    built.save(tmp_path)
    second = built.save(tmp_path)  # the older snapshot is removed after the switch
    assert [p.name for p in tmp_path.glob("snap-*")] == [second.name]
    loaded = VectorIndex.load(tmp_path, VectorParams(dim=DIM, backend=backend, ef_search=64))
    after = loaded.search(queries, k=10)
    assert loaded.highest_seq == built.highest_seq and len(loaded) == len(built)
    assert np.array_equal(before.ids, after.ids)
    assert np.allclose(before.distances, after.distances)


needs_fork = pytest.mark.skipif(
    not FORK_SAVES,
    reason="snapshot files are written by a forked child only on Linux; elsewhere the save"
    " runs in this process, which the other snapshot tests cover",
)


@needs_fork
def test_a_snapshot_written_by_a_child_process_equals_one_written_here(
    built: VectorIndex, tmp_path: Path
) -> None:
    child = VectorIndex.read_manifest(built.save(tmp_path / "child", in_child=True).parent)
    here = VectorIndex.read_manifest(built.save(tmp_path / "here", in_child=False).parent)
    assert child.files == here.files  # same sizes, same sha256: byte-identical files
    assert child.highest_seq == here.highest_seq and child.count == here.count


@needs_fork
def test_changes_after_the_fork_do_not_reach_the_snapshot(data, tmp_path: Path) -> None:
    base, ids, _ = data
    idx = fresh()
    idx.add(ids[:300], base[:300], seq=1)

    def change_while_the_child_writes() -> None:
        idx.add(ids[300:600], base[300:600], seq=2)
        idx.delete(ids[:10], seq=3)

    idx.save(tmp_path, in_child=True, on_image=change_while_the_child_writes)
    assert len(idx) == 590 and idx.highest_seq == 3  # the live index moved on
    manifest = VectorIndex.read_manifest(tmp_path)
    assert (manifest.highest_seq, manifest.count) == (1, 300)
    loaded = VectorIndex.load(tmp_path)
    # The snapshot is the index as of the fork, files and manifest alike.
    assert (loaded.highest_seq, len(loaded)) == (1, 300)
    found = set(loaded.search(base[:10], k=1).ids[:, 0])
    assert found == set(ids[:10])


@needs_fork
def test_a_failed_child_write_raises_and_keeps_the_previous_snapshot(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, ids, _ = data
    idx = fresh()
    idx.add(ids[:300], base[:300], seq=1)
    first = idx.save(tmp_path)
    idx.add(ids[300:600], base[300:600], seq=2)

    def broken_disk(path: Path) -> None:
        raise OSError(28, "No space left on device")

    # The child inherits the patched library object: its write fails there.
    monkeypatch.setattr(idx._backend, "save", broken_disk)
    with pytest.raises(OSError, match="No space left"):
        idx.save(tmp_path)
    assert [p.name for p in tmp_path.glob("snap-*")] == [first.name]
    assert len(VectorIndex.load(tmp_path)) == 300


@needs_fork
def test_a_stop_kills_the_snapshot_writer_process() -> None:
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        _write_in_child(lambda: time.sleep(30), should_stop=lambda: time.monotonic() - t0 > 0.2)
    assert time.monotonic() - t0 < 5


@needs_fork
def test_a_snapshot_writer_that_never_ends_is_killed_at_its_limit() -> None:
    t0 = time.monotonic()
    with pytest.raises(OSError, match="did not finish within"):
        _write_in_child(lambda: time.sleep(30), limit_s=0.2)
    assert time.monotonic() - t0 < 5


def _ticks_while(target: Callable[[], object]) -> int:
    """How many 1 ms sleeps this thread completes while ``target`` runs in another thread."""
    ticks = 0
    worker = threading.Thread(target=target)
    worker.start()
    while worker.is_alive():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    return ticks


@needs_fork
def test_the_parent_keeps_running_python_while_the_child_writes() -> None:
    def hold_the_gil() -> None:
        # One long C call that never releases the GIL, like hnswlib's save_index.
        sum(range(40_000_000))

    in_process = _ticks_while(hold_the_gil)
    in_child = _ticks_while(lambda: _write_in_child(hold_the_gil))
    # In this process the call stops every other Python thread; in a child it stops none.
    assert in_process < 20
    assert in_child > 100


def test_missing_and_damaged_snapshots(data, tmp_path: Path) -> None:
    base, ids, _ = data
    with pytest.raises(SnapshotMissing):
        VectorIndex.load(tmp_path)
    idx = fresh()
    idx.add(ids[:200], base[:200], seq=3)
    snap = idx.save(tmp_path)
    index_file = snap / "index.bin"
    good = index_file.read_bytes()

    index_file.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(SnapshotCorrupt, match="bytes"):
        VectorIndex.load(tmp_path)

    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0xFF  # same size, one bit pattern changed
    index_file.write_bytes(bytes(flipped))
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        VectorIndex.load(tmp_path)

    index_file.write_bytes(good)
    assert len(VectorIndex.load(tmp_path)) == 200
    with pytest.raises(SnapshotIncompatible):
        VectorIndex.load(tmp_path, VectorParams(dim=DIM, M=8))

    (snap / "ids.msgpack").unlink()
    with pytest.raises(SnapshotCorrupt):
        VectorIndex.load(tmp_path)

    (tmp_path / "CURRENT.json").write_text('{"format": 1, "directory": "x"')  # partial write
    with pytest.raises(SnapshotCorrupt):
        VectorIndex.load(tmp_path)


def test_manifest_records_seq_and_params(data, tmp_path: Path) -> None:
    base, ids, _ = data
    idx = fresh(M=8)
    idx.add(ids[:10], base[:10], seq=41)
    idx.advance_seq(42)
    idx.save(tmp_path)
    manifest = json.loads((tmp_path / "CURRENT.json").read_text())
    assert manifest["highest_seq"] == 42 and manifest["params"]["M"] == 8
    assert set(manifest["files"]) == {"index.bin", "ids.msgpack"}


BAD_QUERIES = [
    (np.ones((1, DIM + 1), np.float32), "queries", "shape"),
    (np.ones((2, 2, DIM), np.float32), "queries", "shape"),
    (np.array([[np.nan] * DIM], np.float32), "queries", "NaN"),
    (np.array([[np.inf] + [0.0] * (DIM - 1)]), "queries", "infinite"),
    (np.zeros((1, DIM)), "queries", "all-zero"),
    (np.array([["x"] * DIM]), "queries", "real numbers"),
    # float32 C-contiguous matrices take the one-pass fast path first; a bad row must still
    # be refused and named.
    (
        np.vstack([np.ones(DIM), np.r_[np.ones(DIM - 1), np.nan]]).astype(np.float32),
        "queries",
        "row 1 has NaN",
    ),
    (
        np.vstack([np.ones(DIM), np.zeros(DIM)]).astype(np.float32),
        "queries",
        "row 1 is an all-zero",
    ),
]


def test_the_fast_check_never_refuses_a_valid_row() -> None:
    # Finite components whose squares overflow float32: the one-pass dot product is inf, so
    # the fast path must hand over to the full check, which accepts them (l2 has no norm
    # condition); under cosine the same row is a valid direction too.
    big = np.full((2, 8), 1e30, np.float32)
    for metric in ("l2", "cosine"):
        checks = VectorChecks(VectorParams(dim=8, metric=metric))
        out = checks.check_vectors(big)
        assert out.shape == (2, 8)


@pytest.mark.parametrize(("queries", "field", "match"), BAD_QUERIES)
def test_bad_queries_raise_typed_errors(built: VectorIndex, queries, field, match) -> None:
    with pytest.raises(InvalidRecord, match=match) as info:
        built.search(queries, k=10)
    assert info.value.field == field


@pytest.mark.parametrize(("k", "ef"), [(0, None), (-1, None), (1001, None), (2.5, None), (10, 0)])
def test_bad_k_and_ef(built: VectorIndex, data, k, ef) -> None:
    with pytest.raises(BadArgument) as info:
        built.search(data[2][:1], k=k, ef=ef)
    assert info.value.field == ("k" if ef is None else "ef")


def test_bad_mutations_leave_index_untouched(data) -> None:
    base, ids, _ = data
    idx = fresh()
    idx.add(ids[:100], base[:100], seq=1)
    before = idx.search(base[:5], k=5)
    bad_rows = base[100:103].copy()
    bad_rows[2, 7] = np.nan
    cases: list[tuple[Callable[[], object], type[SymbioteError], str]] = [
        (lambda: idx.add(ids[100:103], bad_rows, seq=2), InvalidRecord, "vectors"),
        (lambda: idx.add(ids[100:102], base[100:103]), InvalidRecord, "ids"),
        (lambda: idx.add(["a", "a"], base[100:102]), InvalidRecord, "ids"),
        (lambda: idx.add(["a", ""], base[100:102]), InvalidRecord, "ids"),
        (lambda: idx.add("ab", base[100:102]), InvalidRecord, "ids"),
        (lambda: idx.add(["a"], np.zeros((1, DIM))), InvalidRecord, "vectors"),
        (lambda: idx.add(["a"], base[100:101, :10]), InvalidRecord, "vectors"),
        (lambda: idx.add(["a"], base[100:101], seq=-1), BadArgument, "seq"),
        (lambda: idx.delete([1, 2]), InvalidRecord, "ids"),  # type: ignore[list-item]
    ]
    for call, exc, field in cases:
        with pytest.raises(exc) as info:
            call()
        assert info.value.field == field
    assert len(idx) == 100 and idx.highest_seq == 1 and "a" not in idx
    after = idx.search(base[:5], k=5)
    assert np.array_equal(before.ids, after.ids)


def test_default_ef_grows_with_each_doubling_of_the_index_past_the_threshold() -> None:
    auto = VectorParams(dim=DIM, ef_search=64)
    assert ef_for_size(auto, 0) == 64
    assert ef_for_size(auto, AUTO_EF_FROM) == 64
    assert ef_for_size(auto, AUTO_EF_FROM + 1) == 96
    assert ef_for_size(auto, 2 * AUTO_EF_FROM) == 96
    assert ef_for_size(auto, 2 * AUTO_EF_FROM + 1) == 144
    # Capped at 8x the configured value, however large the index grows.
    assert ef_for_size(auto, 10**12) == 8 * 64
    fixed = VectorParams(dim=DIM, ef_search=64, ef_auto=False)
    assert ef_for_size(fixed, 10**9) == 64


def test_search_without_ef_uses_the_size_scaled_default(data) -> None:
    base, ids, _ = data
    index = VectorIndex(VectorParams(dim=DIM, ef_search=16))
    index.add(ids, base, seq=1)
    assert index.check_ef(None, len(index)) == 16
    big = AUTO_EF_FROM * 3
    assert index.check_ef(None, big) == 36
    # An explicit ef is taken as given, whatever the size.
    assert index.check_ef(40, big) == 40


def test_params_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        VectorParams(dim=0)
    assert info.value.field == "dim"
    with pytest.raises(ConfigError):
        VectorParams(dim=8, M=1)


async def test_micro_batcher_batches_concurrent_callers(data) -> None:
    base, ids, queries = data
    idx = fresh()
    idx.add(ids[:2_000], base[:2_000])
    batcher = MicroBatcher(idx, max_batch=64)
    expected = idx.search(queries[:64], k=5).ids
    got: dict[int, np.ndarray] = {}

    async def caller(i: int) -> None:
        got[i] = (await batcher.search(queries[i], k=5 if i % 2 else 3)).ids[0]

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.serve)
        async with trio.open_nursery() as callers:
            for i in range(64):
                callers.start_soon(caller, i)
        with pytest.raises(InvalidRecord):  # a bad query fails alone, the loop lives on
            await batcher.search(np.zeros(DIM), k=5)
        assert (await batcher.search(queries[0], k=5)).ids.shape == (1, 5)
        nursery.cancel_scope.cancel()
    for i in range(64):
        assert list(got[i]) == list(expected[i][: len(got[i])])
    assert batcher.batches < 64 and batcher.mean_batch > 1


async def test_micro_batcher_stop_answers_waiting_callers(data) -> None:
    base, ids, queries = data
    idx = fresh()
    idx.add(ids[:100], base[:100])
    limiter = trio.CapacityLimiter(1)
    batcher = MicroBatcher(idx, limiter=limiter)
    errors: list[BaseException] = []

    async def caller(i: int) -> None:
        try:
            await batcher.search(queries[i], k=3)
        except ActorStopped as exc:
            errors.append(exc)

    async with trio.open_nursery() as callers:
        for i in range(8):
            callers.start_soon(caller, i)
        await trio.testing.wait_all_tasks_blocked()
        async with limiter, trio.open_nursery() as nursery:
            # The index is busy (a mutation holds its limiter) when the loop is stopped: the
            # taken batch and anything still queued must be answered, not left hanging.
            await nursery.start(batcher.serve)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert len(errors) == 8
    with pytest.raises(ActorStopped):
        await batcher.search(queries[0], k=3)


def test_vss_sql_helpers(data) -> None:
    duckdb = pytest.importorskip("duckdb")
    base, ids, _ = data
    params = VectorParams(dim=DIM, M=8, ef_construction=32)
    con = duckdb.connect()
    load_vss(con)
    con.execute(f"CREATE TABLE chunks (chunk_id VARCHAR, embedding FLOAT[{DIM}])")
    con.executemany(
        "INSERT INTO chunks VALUES (?, ?)", list(zip(ids[:300], base[:300].tolist(), strict=True))
    )
    ddl = create_hnsw_index_sql(params)
    assert "USING HNSW" in ddl and "metric = 'cosine'" in ddl and "M = 8" in ddl
    con.execute(ddl)
    con.execute(set_ef_search_sql(64))
    sql = knn_sql(params, base[3], 5)
    assert explain_uses_hnsw(con, sql)
    assert con.execute(sql).fetchall()[0][0] == ids[3]
    with pytest.raises(BadArgument):
        knn_sql(params, base[3], 0)
    with pytest.raises(InvalidRecord):
        knn_sql(params, base[3, :5], 5)
