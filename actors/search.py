"""Vector search with filters: the planner between the index actor and DuckDB.

:class:`SearchPlanner` answers ``search(vector, k, where=...)`` with the TRUE filtered top-k,
using two things it is given as async callables: ``knn`` (the index actor: approximate top-n by
HNSW, no filter) and ``sql`` (a reader: any read-only statement). Plans:

* **no filter** -> ``"hnsw"``: one micro-batched index query (over-fetching only for
  ``one_per_document`` or ``rerank``). No DuckDB round trip, so it runs at index speed.
* **filter, not very selective** -> ``"hnsw+filter"``: estimate the selectivity ``s`` with a
  COUNT (cached for ``count_ttl_s``), fetch ``~2k/s`` candidates from the index, keep those the
  filter admits (one DuckDB query over the candidate ids), and grow the fetch 4x until ``k``
  survive, the index is exhausted, or ``max_fetch`` is reached.
* **filter, very selective** (``matched <= exact_rows``, or the fetch needed would exceed
  ``max_fetch``) -> ``"exact"``: ``array_cosine_distance`` ORDER BY ... LIMIT k inside DuckDB
  over the rows the filter admits. Exact by construction.

* **index not ready** (loading or building after a start: the index answers
  ``ready=False``) -> ``"hnsw+exact"``: the partial index's hits, kept if the table still
  has them at a ``seq`` the index covers (and the filter admits them), merged with an exact
  scan of the rows committed after that ``seq``. The scan is cheap once the build is far
  along (a crash-restart catching up from its last snapshot scans only the newer rows);
  while a snapshot is still loading nothing is indexed, and it is the exact scan of the
  whole table (``"exact"``, O(rows): ~1 s per query at a million 768-d rows).

The DuckDB check also makes the result follow the table exactly: a chunk deleted a moment
ago but not yet out of the index is dropped by the check. ``rerank=True`` recomputes the
distances of the candidates from the stored embeddings (the source of truth) and re-sorts.

Filter SQL is generated from :class:`~symbiote.schema.search.SearchFilter` with every value a
bound parameter; field names come from a fixed table, never from the caller.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import trio

from symbiote.actors.index import KnnHits
from symbiote.schema.errors import BadArgument, DeadlineExceeded, InvalidRecord
from symbiote.schema.search import ChunkRow, SearchFilter, SearchHits, parse_filter

__all__ = ["SearchPlanner", "check_query_vector", "compile_filter"]

F32Array = npt.NDArray[np.float32]

KnnFn = Callable[[F32Array, int, "int | None", float], Awaitable[KnnHits]]
SqlFn = Callable[[str, list[Any], float], Awaitable[pa.Table]]

#: Over-fetch factor on top of k / selectivity: HNSW candidates are not uniformly spread.
OVERFETCH: Final = 2.0
#: How much the fetch grows when too few candidates passed the filter.
GROWTH: Final = 4
_MAX_EF: Final = 100_000
_COUNT_CACHE: Final = 256
# Lists and vectors are bound as ONE JSON string and unpacked in SQL: the DuckDB Python
# client converts a bound Python list element by element (measured: 4,000 ids ~280 ms, a
# 768-float vector ~54 ms), while the JSON string binds in microseconds and json_transform
# unpacks it in ~1 ms. The float32 values round-trip exactly (shortest repr of the double).
_STR_LIST: Final = """json_transform(?, '["VARCHAR"]')"""
# ``chunk_id IN _ID_LIST`` scans ``chunks`` (it has no index on chunk_id, see migration 4 in
# schema/ddl.py). The no-op ``IS NOT NULL`` is what makes that scan cheap: DuckDB (1.5.5) pushes
# a Bloom filter from a semi-join's build side into the probe scan only when the build side
# has a filter (``JoinFilterPushdownInfo::build_side_has_filter``). With it the scan drops the
# non-matching rows before it reads the wide columns (text, metadata, the embedding of a
# rerank); without it every row that passes the other conditions is materialised first.
# Measured at 100,000 x 768, 100 ids: rows 17.1 -> 15.2 ms, check 13.7 -> 8.3 ms, check with
# rerank 58.6 -> 10.2 ms. Going through ``chunk_keys`` first was slower: DuckDB probes its ART
# only for a constant IN list (one bound parameter per id, ~75 us each to bind: 90 ms for
# 1,000 ids) and has no index join, so joined it scans chunk_keys too.
# tests/actors/test_search_plan.py pins the Bloom filter.
_ID_LIST: Final = f"(SELECT id FROM (SELECT unnest({_STR_LIST}) AS id) WHERE id IS NOT NULL)"
_encode = msgspec.json.Encoder().encode


def _json(value: Sequence[Any]) -> str:
    return _encode(value).decode()


def _vector_sql(dim: int) -> str:
    return f"""json_transform(?, '["FLOAT"]')::FLOAT[{dim}]"""


def check_query_vector(vector: object, dim: int) -> F32Array:
    """``vector`` as a float32 ``(dim,)`` array, or :class:`InvalidRecord` (field ``vector``).

    Refuses a wrong dimension, non-numbers, NaN/inf components and the all-zero vector (it has
    no direction under cosine).
    """
    if type(vector) is np.ndarray and vector.dtype == np.float32 and vector.shape == (dim,):
        # Fast path for the common case: one dot product checks finiteness and non-zero at
        # once (any NaN/inf makes it NaN/inf; only the zero vector gives 0).
        norm2 = float(np.dot(vector, vector))
        if math.isfinite(norm2) and norm2 > 0 and vector.flags.c_contiguous:
            return vector
    try:
        arr = np.asarray(vector)
    except (TypeError, ValueError) as exc:
        raise InvalidRecord(f"not an array of numbers ({exc})", field="vector") from None
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise InvalidRecord(f"must be real numbers, got dtype {arr.dtype}", field="vector")
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != (dim,):
        raise InvalidRecord(f"expected {dim} components, got shape {arr.shape}", field="vector")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InvalidRecord("has NaN or infinite components", field="vector")
    if not np.any(out):
        raise InvalidRecord("is all zeros, undefined under cosine", field="vector")
    return out


def _check_int(value: object, low: int, high: int, field: str) -> int:
    if type(value) is int and low <= value <= high:
        return value  # the common case, without the union isinstance below
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise BadArgument(f"must be an int, got {type(value).__name__}", field=field)
    if not low <= int(value) <= high:
        raise BadArgument(f"must be in [{low}, {high}], got {value}", field=field)
    return int(value)


def _check_flag(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadArgument(f"must be a bool, got {type(value).__name__}", field=field)
    return value


def _match(expr: str, value: str | list[str], out: list[tuple[str, list[Any]]]) -> None:
    if isinstance(value, str):
        out.append((f"{expr} = ?", [value]))
    else:
        out.append((f"list_contains({_STR_LIST}, {expr})", [_json(value)]))


def compile_filter(flt: SearchFilter) -> tuple[str, list[Any]]:
    """``flt`` as a SQL condition over ``chunks c`` and its positional parameters."""
    chunk: list[tuple[str, list[Any]]] = []
    doc: list[tuple[str, list[Any]]] = []
    if flt.document_id is not None:
        _match("c.document_id", flt.document_id, chunk)
    if flt.tenant_id is not None:
        _match("json_extract_string(c.metadata, '$.tenant_id')", flt.tenant_id, chunk)
    if flt.thread_id is not None:
        _match("json_extract_string(c.metadata, '$.thread_id')", flt.thread_id, chunk)
    if flt.metadata is not None:
        for key, value in sorted(flt.metadata.items()):
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            # The key is a checked identifier (parse_filter); it is still passed as a value.
            chunk.append(("json_extract_string(c.metadata, ?) = ?", [f"$.{key}", text]))
    if flt.doc_type is not None:
        _match("d.doc_type", flt.doc_type, doc)
    if flt.status is not None:
        _match("d.status", flt.status, doc)
    if flt.tags is not None:
        tags = [flt.tags] if isinstance(flt.tags, str) else flt.tags
        doc.append((f"list_has_any(d.tags, {_STR_LIST})", [_json(tags)]))
    if flt.tags_all is not None:
        doc.append((f"list_has_all(d.tags, {_STR_LIST})", [_json(flt.tags_all)]))
    if flt.created_after is not None:
        doc.append(("d.created_at >= ?", [flt.created_after]))
    if flt.created_before is not None:
        doc.append(("d.created_at < ?", [flt.created_before]))
    if doc:
        # A semi-join: chunks of the documents that match (no duplicates, no doc columns).
        inner = " AND ".join(sql for sql, _ in doc)
        chunk.append(
            (
                f"c.document_id IN (SELECT d.id FROM documents d WHERE {inner})",
                [p for _, ps in doc for p in ps],
            )
        )
    sql = " AND ".join(f"({s})" for s, _ in chunk) or "TRUE"
    params = [p for _, ps in chunk for p in ps]
    return sql, params


def _cache_key(clause: str, params: Sequence[Any]) -> tuple[Any, ...]:
    return (clause, *params)


class _Deadline:
    def __init__(self, timeout: float) -> None:
        self.at = trio.current_time() + timeout

    def left(self) -> float:
        left = self.at - trio.current_time()
        if left <= 0:
            raise DeadlineExceeded("search ran out of time")
        return left


Candidate = tuple[str, str, float]


def _pick(cands: Sequence[Candidate], k: int, one_per_document: bool) -> list[Candidate]:
    if not one_per_document:
        return list(cands[:k])
    seen: set[str] = set()
    out: list[Candidate] = []
    for cand in cands:
        if cand[1] not in seen:
            seen.add(cand[1])
            out.append(cand)
            if len(out) == k:
                break
    return out


class SearchPlanner:
    """Plans and runs one search at a time per call; holds only the COUNT cache.

    ``max_k`` caps what a caller may ask for; ``max_fetch`` caps one index query (and must not
    exceed the index's own ``max_k``).
    """

    def __init__(
        self,
        *,
        dim: int,
        knn: KnnFn,
        sql: SqlFn,
        max_k: int = 1000,
        max_fetch: int = 4096,
        exact_rows: int = 2000,
        count_ttl_s: float = 10.0,
    ) -> None:
        self.dim = dim
        self.max_k = max_k
        self.max_fetch = max(max_fetch, max_k)
        self.exact_rows = exact_rows
        self.count_ttl_s = count_ttl_s
        self._knn = knn
        self._sql = sql
        self._counts: collections.OrderedDict[tuple[Any, ...], tuple[float, int, int]] = (
            collections.OrderedDict()
        )
        #: How many searches took each plan (for introspection and tests).
        self.plans: collections.Counter[str] = collections.Counter()

    async def search(
        self,
        vector: object,
        k: int = 10,
        *,
        where: object = None,
        ef: int | None = None,
        rerank: bool = False,
        one_per_document: bool = False,
        with_rows: bool = False,
        timeout: float,
    ) -> SearchHits:
        """The filtered top-k of ``vector``; see the module docstring for the plans."""
        query = check_query_vector(vector, self.dim)
        kk = _check_int(k, 1, self.max_k, "k")
        ef_ = None if ef is None else _check_int(ef, 1, _MAX_EF, "ef")
        rerank = _check_flag(rerank, "rerank")
        one_per_document = _check_flag(one_per_document, "one_per_document")
        with_rows = _check_flag(with_rows, "with_rows")
        flt = parse_filter(where)
        deadline = _Deadline(timeout)
        if flt is None and not (rerank or one_per_document or with_rows):
            # The plain query, most of the traffic: the index's answer is the answer, so it
            # is passed on as it is (no candidate tuples, no re-picking).
            hits = await self._knn(query, kk, ef_, deadline.left())
            if hits.ready:
                self.plans["hnsw"] += 1
                return SearchHits(
                    chunk_ids=hits.chunk_ids,
                    document_ids=hits.document_ids,
                    distances=hits.distances,
                    plan="hnsw",
                    fetched=kk,
                )
            # Still building: complete the partial index's answer (without asking again).
            picked, plan = await self._while_building(
                query, kk, hits, "TRUE", [], False, False, deadline
            )
            fetched = len(hits.chunk_ids)
        elif flt is None:
            picked, plan, fetched = await self._unfiltered(
                query, kk, ef_, rerank, one_per_document, deadline
            )
        else:
            picked, plan, fetched = await self._filtered(
                query, kk, ef_, flt, rerank, one_per_document, deadline
            )
        self.plans[plan] += 1
        rows: list[ChunkRow] | None = None
        if with_rows and picked:
            picked, rows = await self._rows(picked, deadline)
        return SearchHits(
            chunk_ids=[c[0] for c in picked],
            document_ids=[c[1] for c in picked],
            distances=[c[2] for c in picked],
            plan=plan,
            fetched=fetched,
            rows=rows if with_rows else None,
        )

    # -- plans -----------------------------------------------------------------------------

    async def _unfiltered(
        self,
        query: F32Array,
        k: int,
        ef: int | None,
        rerank: bool,
        one_per_document: bool,
        deadline: _Deadline,
    ) -> tuple[list[Candidate], str, int]:
        fetch = k
        if one_per_document:
            fetch = min(self.max_fetch, GROWTH * k)
        if rerank:
            fetch = min(self.max_fetch, max(fetch, 2 * k))
        while True:
            hits = await self._knn(query, fetch, ef, deadline.left())
            if not hits.ready:
                picked, plan = await self._while_building(
                    query, k, hits, "TRUE", [], one_per_document, rerank, deadline
                )
                return picked, plan, len(hits.chunk_ids)
            cands = list(zip(hits.chunk_ids, hits.document_ids, hits.distances, strict=True))
            if rerank:
                cands = await self._check(cands, "TRUE", [], query, deadline)
            picked = _pick(cands, k, one_per_document)
            exhausted = len(hits.chunk_ids) < fetch or fetch >= hits.count
            if len(picked) >= k or exhausted or fetch >= self.max_fetch:
                return picked, "hnsw", fetch
            fetch = min(self.max_fetch, fetch * GROWTH)

    async def _filtered(
        self,
        query: F32Array,
        k: int,
        ef: int | None,
        flt: SearchFilter,
        rerank: bool,
        one_per_document: bool,
        deadline: _Deadline,
    ) -> tuple[list[Candidate], str, int]:
        clause, params = compile_filter(flt)
        matched, total = await self._estimate(clause, params, deadline)
        if matched == 0:
            return [], "exact", 0
        need = k * (GROWTH if one_per_document else 1)
        fetch = math.ceil(need * OVERFETCH * max(total, 1) / matched)
        if matched <= self.exact_rows or fetch > self.max_fetch:
            return (
                await self._exact(query, k, clause, params, one_per_document, deadline),
                "exact",
                0,
            )
        fetch = max(fetch, k)
        while True:
            hits = await self._knn(query, fetch, ef, deadline.left())
            if not hits.ready:
                picked, plan = await self._while_building(
                    query, k, hits, clause, params, one_per_document, rerank, deadline
                )
                return picked, plan, len(hits.chunk_ids)
            cands = list(zip(hits.chunk_ids, hits.document_ids, hits.distances, strict=True))
            kept = await self._check(cands, clause, params, query if rerank else None, deadline)
            picked = _pick(kept, k, one_per_document)
            exhausted = len(hits.chunk_ids) < fetch or fetch >= hits.count
            if len(picked) >= k or exhausted:
                return picked, "hnsw+filter", fetch
            if fetch >= self.max_fetch:
                # The filter is more selective among this query's neighbours than the
                # estimate said: only an exact scan can still give the true top-k.
                exact = await self._exact(query, k, clause, params, one_per_document, deadline)
                return exact, "exact", fetch
            fetch = min(self.max_fetch, fetch * GROWTH)

    async def _while_building(
        self,
        query: F32Array,
        k: int,
        hits: KnnHits,
        clause: str,
        params: list[Any],
        one_per_document: bool,
        rerank: bool,
        deadline: _Deadline,
    ) -> tuple[list[Candidate], str]:
        """The top-k while the index is still being built: what the partial index found
        among the rows it holds, merged with an exact scan of the rows committed after them.

        The partial index holds every chunk change up to ``hits.highest_seq`` (and perhaps a
        few newer ones of a round half applied). Its hits are kept only if the table still
        has that chunk at ``seq <= highest_seq`` (not changed or deleted since) and the filter
        admits it; every row with a newer ``seq`` is scored exactly in DuckDB. The two sets
        are disjoint, so the merge is a sort. With nothing indexed yet (a snapshot still
        loading) this is the exact scan of the whole table.
        """
        high = hits.highest_seq
        tail = await self._exact(
            query, k, f"({clause}) AND c.seq > ?", [*params, high], one_per_document, deadline
        )
        if not hits.chunk_ids:
            return tail, "exact"
        cands = list(zip(hits.chunk_ids, hits.document_ids, hits.distances, strict=True))
        held = await self._check(
            cands,
            f"({clause}) AND c.seq <= ?",
            [*params, high],
            query if rerank else None,
            deadline,
        )
        merged = sorted(held + tail, key=lambda c: (c[2], c[0]))
        return _pick(merged, k, one_per_document), "hnsw+exact"

    # -- DuckDB ----------------------------------------------------------------------------

    async def _estimate(
        self, clause: str, params: list[Any], deadline: _Deadline
    ) -> tuple[int, int]:
        """(chunks the filter admits, all chunks); cached per filter for ``count_ttl_s``."""
        key = _cache_key(clause, params)
        now = trio.current_time()
        hit = self._counts.get(key)
        if hit is not None and hit[0] > now:
            self._counts.move_to_end(key)
            return hit[1], hit[2]
        table = await self._sql(
            f"SELECT count(*) FILTER (WHERE {clause}) AS matched, count(*) AS total FROM chunks c",
            params,
            deadline.left(),
        )
        matched = int(table.column(0)[0].as_py() or 0)
        total = int(table.column(1)[0].as_py() or 0)
        self._counts[key] = (now + self.count_ttl_s, matched, total)
        self._counts.move_to_end(key)
        while len(self._counts) > _COUNT_CACHE:
            self._counts.popitem(last=False)
        return matched, total

    async def _check(
        self,
        cands: list[Candidate],
        clause: str,
        params: list[Any],
        query: F32Array | None,
        deadline: _Deadline,
    ) -> list[Candidate]:
        """The candidates the filter admits, in order; re-ranked by stored vectors if ``query``."""
        if not cands:
            return []
        ids = [c[0] for c in cands]
        dist_sql = ""
        args: list[Any] = []
        if query is not None:
            dist_sql = f", array_cosine_distance(c.embedding, {_vector_sql(self.dim)})"
            args.append(_json(query.tolist()))
        table = await self._sql(
            f"SELECT c.chunk_id{dist_sql} FROM chunks c"
            f" WHERE c.chunk_id IN {_ID_LIST} AND ({clause})",
            [*args, _json(ids), *params],
            deadline.left(),
        )
        admitted = table.column(0).to_pylist()
        if query is None:
            keep = set(admitted)
            return [c for c in cands if c[0] in keep]
        exact = dict(zip(admitted, table.column(1).to_pylist(), strict=True))
        out = [(c[0], c[1], float(exact[c[0]])) for c in cands if c[0] in exact]
        out.sort(key=lambda c: (c[2], c[0]))
        return out

    async def _exact(
        self,
        query: F32Array,
        k: int,
        clause: str,
        params: list[Any],
        one_per_document: bool,
        deadline: _Deadline,
    ) -> list[Candidate]:
        qualify = (
            " QUALIFY row_number() OVER"
            " (PARTITION BY c.document_id ORDER BY distance, c.chunk_id) = 1"
            if one_per_document
            else ""
        )
        table = await self._sql(
            "SELECT c.chunk_id, c.document_id,"
            f" array_cosine_distance(c.embedding, {_vector_sql(self.dim)}) AS distance"
            f" FROM chunks c WHERE {clause}{qualify}"
            " ORDER BY distance, c.chunk_id LIMIT ?",
            [_json(query.tolist()), *params, k],
            deadline.left(),
        )
        return list(
            zip(
                table.column(0).to_pylist(),
                table.column(1).to_pylist(),
                [float(d) for d in table.column(2).to_pylist()],
                strict=True,
            )
        )

    async def _rows(
        self, picked: list[Candidate], deadline: _Deadline
    ) -> tuple[list[Candidate], list[ChunkRow]]:
        table = await self._sql(
            "SELECT chunk_id, document_id, text, metadata, seq FROM chunks"
            f" WHERE chunk_id IN {_ID_LIST}",
            [_json([c[0] for c in picked])],
            deadline.left(),
        )
        found: dict[str, ChunkRow] = {}
        for cid, doc, text, meta, seq in zip(
            *(table.column(i).to_pylist() for i in range(5)), strict=True
        ):
            found[cid] = ChunkRow(
                chunk_id=cid,
                document_id=doc,
                text=text,
                metadata=None if meta is None else msgspec.json.decode(meta),
                seq=int(seq),
            )
        # A hit whose row vanished (deleted after the index answered) is dropped with it.
        kept = [c for c in picked if c[0] in found]
        return kept, [found[c[0]] for c in kept]
