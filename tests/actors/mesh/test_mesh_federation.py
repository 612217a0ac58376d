"""Federated search over real TLS on loopback: grants, scope, redaction, citations, deadlines.

Each node is the real stack (TcpTransport + SwimNode + RowSync + Federation); grants travel
as signed rows by anti-entropy. A node's own search is a small exact numpy search over its
documents (the DuckDB path is covered in tests/scenarios/test_mesh_runtime.py), so these
tests run in about a second each.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import trio

from symbiote.actors.mesh.antientropy import RowSync
from symbiote.actors.mesh.federation import Federation, FederationConfig, LocalHit
from symbiote.actors.mesh.grants import GrantBook
from symbiote.actors.mesh.identity import NodeIdentity
from symbiote.actors.mesh.pki import MeshCA, NodeCredentials
from symbiote.actors.mesh.swim import SwimNode
from symbiote.actors.mesh.transport import TcpTransport
from symbiote.schema.errors import BadArgument, InvalidRecord
from symbiote.schema.mesh import (
    Grant,
    RowSyncConfig,
    TransportConfig,
    TrustConfig,
)
from symbiote.schema.search import SearchFilter
from tests.actors.mesh.timers import FAST_SWIM

DIM = 8
SWIM = FAST_SWIM
SYNC = RowSyncConfig(sync_interval=0.05, sync_timeout=1.0)
TRUST = TrustConfig(report_interval=None, recompute_interval=3600)

Search = Callable[[np.ndarray, int, SearchFilter | None, float], Awaitable[list[LocalHit]]]


@dataclass
class Doc:
    chunk_id: str
    vector: np.ndarray
    tags: list[str]
    authors: list[str]
    text: str
    metadata: dict[str, str]


def corpus(seed: int, n: int = 40) -> list[Doc]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        v = rng.normal(size=DIM).astype(np.float32)
        tags = ["ai"] if i % 3 == 0 else (["ml", "ai"] if i % 3 == 1 else ["private"])
        out.append(
            Doc(
                chunk_id=f"n{seed}-d{i}:0",
                vector=v / np.linalg.norm(v),
                tags=tags,
                authors=["Alice Martin"],
                text=f"Notes by alice martin on topic {i}",
                metadata={"email": "alice@example.org", "lang": "en"},
            )
        )
    return out


def numpy_search(docs: list[Doc], *, honour_filter: bool = True, delay: float = 0.0) -> Search:
    """Exact cosine top-k over ``docs``; tags filtered like DuckDB's ``list_has_any``."""
    mat = np.stack([d.vector for d in docs])

    async def search(
        vector: np.ndarray, k: int, flt: SearchFilter | None, timeout: float
    ) -> list[LocalHit]:
        if delay:
            await trio.sleep(delay)
        q = vector / np.linalg.norm(vector)
        dist = 1.0 - mat @ q
        allowed = None
        if honour_filter and flt is not None and flt.tags is not None:
            allowed = {flt.tags} if isinstance(flt.tags, str) else set(flt.tags)
        out = []
        for i in np.argsort(dist, kind="stable"):
            d = docs[int(i)]
            if allowed is not None and not allowed.intersection(d.tags):
                continue
            out.append(
                LocalHit(
                    chunk_id=d.chunk_id,
                    document_id=d.chunk_id.split(":")[0],
                    distance=float(dist[i]),
                    text=d.text,
                    title=f"By Alice Martin #{i}",
                    authors=d.authors,
                    tags=d.tags,
                    metadata=d.metadata,
                )
            )
            if len(out) == k:
                break
        return out

    return search


@dataclass
class Node:
    sync: RowSync
    grants: GrantBook
    fed: Federation

    @property
    def peer_id(self) -> str:
        return self.sync.peer_id


async def start_node(
    nursery: trio.Nursery,
    ca: MeshCA,
    i: int,
    search: Search | None,
    **fed: Any,
) -> Node:
    ident = NodeIdentity.generate()
    transport = TcpTransport(
        NodeCredentials.issue(ca, ident), TransportConfig(handshake_timeout=2.0)
    )
    swim = SwimNode(transport, SWIM, rng=random.Random(i))
    sync = RowSync(swim, ident, SYNC, trust_config=TRUST, rng=random.Random(i))
    grants = GrantBook(ident.peer_id)
    sync.on_row.append(grants.observe)
    federation = Federation(
        sync,
        grants,
        FederationConfig(dim=DIM, **fed),
        local=search,  # type: ignore[arg-type]
    )
    await nursery.start(transport.serve)
    await nursery.start(swim.run)
    await nursery.start(sync.run)
    await nursery.start(federation.run)
    return Node(sync, grants, federation)


async def mesh_of(nursery: trio.Nursery, searches: list[Search | None], **fed: Any) -> list[Node]:
    ca = MeshCA.generate("fed-test")
    nodes = [await start_node(nursery, ca, i, s, **fed) for i, s in enumerate(searches)]
    for n in nodes[1:]:
        await n.sync.swim.join([nodes[0].sync.swim.addr])
    ids = {n.peer_id for n in nodes}
    with trio.fail_after(5):
        while not all(n.sync.swim.member_ids("alive") == ids - {n.peer_id} for n in nodes):  # noqa: ASYNC110 (polls protocol state)
            await trio.sleep(0.02)
    return nodes


def grant(granter: Node, to: Node, tags: list[str], **kw: object) -> None:
    g = Grant(
        grantee=to.peer_id,
        tags=tags,
        permissions=kw.pop("permissions", ["search"]),  # type: ignore[arg-type]
        expires_at=kw.pop("expires_at", int(time.time()) + 3600),  # type: ignore[arg-type]
        redact=kw.pop("redact", []),  # type: ignore[arg-type]
    )
    granter.sync.publish("grant", g)


async def until(pred: Callable[[], bool], limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not pred():  # noqa: ASYNC110 (polls protocol state)
            await trio.sleep(0.02)


def query(seed: int = 99) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32)


async def test_federated_search_respects_grants_redacts_and_cites():
    docs_b = corpus(1)
    docs_c = corpus(2)
    async with trio.open_nursery() as nursery:
        a, b, c = await mesh_of(nursery, [None, numpy_search(docs_b), numpy_search(docs_c)])
        grant(b, a, ["ai"], redact=["metadata.email"])
        grant(c, b, ["ai"])  # C grants someone else, not A
        await until(lambda: a.grants.latest(b.peer_id, a.peer_id) is not None)
        await until(lambda: a.grants.latest(c.peer_id, b.peer_id) is not None)
        assert a.fed.targets(["ai"]) == [b.peer_id]
        assert a.fed.targets(["private"]) == []

        res = await a.fed.search(query(), 10, tags=["ai"], deadline=2.0)
        assert res.asked == [b.peer_id]
        assert res.answered == [b.peer_id]  # A has no local search here
        assert res.missing == [] and res.refused == {}
        assert len(res.hits) == 10
        by_id = {d.chunk_id: d for d in docs_b}
        for h in res.hits:
            assert h.origin == b.peer_id  # cites the authenticated answering peer
            doc = by_id[h.chunk_id]
            assert "ai" in doc.tags  # nothing outside the grant's scope
            assert h.authors is None  # redacted by B's configuration ...
            assert h.text is not None and "alice martin" not in h.text.lower()
            assert "[redacted]" in h.text and "[redacted]" in (h.title or "")
            assert h.metadata == {"lang": "en"}  # ... and by the grant (metadata.email)
        # The merge is by distance, and it is the true top-10 of B's documents in scope.
        dists = [h.distance for h in res.hits]
        assert dists == sorted(dists)
        q = query() / np.linalg.norm(query())
        expect = sorted((1.0 - float(d.vector @ q), d.chunk_id) for d in docs_b if "ai" in d.tags)
        assert [h.chunk_id for h in res.hits] == [cid for _, cid in expect[:10]]
        assert res.redacted[b.peer_id] == ["authors", "metadata.email"]
        assert b.fed.stats["scope_dropped"] == 0

        # A local search that ignores its filter (a bug) still leaks nothing: the scope is
        # checked again on the hits before they leave.
        b.fed.local = numpy_search(docs_b, honour_filter=False)
        res = await a.fed.search(query(), 10, tags=["ai"], deadline=2.0)
        assert res.hits and all("ai" in by_id[h.chunk_id].tags for h in res.hits)
        assert b.fed.stats["scope_dropped"] > 0

        # Asking explicitly: C has no grant for A and refuses; B refuses tags out of scope.
        res = await a.fed.search(query(), 5, tags=["ai"], peers=[b.peer_id, c.peer_id])
        assert res.refused == {c.peer_id: "no_grant"}
        assert {h.origin for h in res.hits} == {b.peer_id}
        res = await a.fed.search(query(), 5, tags=["private"], peers=[b.peer_id])
        assert res.refused == {b.peer_id: "out_of_scope"} and res.hits == []
        # where.tags can only narrow the scope, never widen it.
        res = await a.fed.search(
            query(), 5, where={"tags": ["private"]}, peers=[b.peer_id], deadline=2.0
        )
        assert res.refused == {b.peer_id: "out_of_scope"}
        assert c.fed.stats["refused_no_grant"] == 1
        assert b.fed.stats["refused_out_of_scope"] == 2
        nursery.cancel_scope.cancel()


async def test_expired_and_revoked_grants_are_refused():
    async with trio.open_nursery() as nursery:
        a, b, c = await mesh_of(nursery, [None, numpy_search(corpus(1)), numpy_search(corpus(2))])
        grant(b, a, ["ai"], expires_at=int(time.time()) - 5)  # already expired
        grant(c, a, ["ai"])
        grant(c, a, ["ai"], permissions=[])  # the latest grant replaces it: a revocation
        await until(lambda: a.grants.latest(b.peer_id, a.peer_id) is not None)
        await until(
            lambda: (g := a.grants.latest(c.peer_id, a.peer_id)) is not None and not g.permissions
        )
        assert a.fed.targets(["ai"]) == []  # the asker does not even ask
        res = await a.fed.search(query(), 5, tags=["ai"])
        assert res.asked == [] and [h.origin for h in res.hits] == []
        # Asked anyway, each granter enforces its own view of the grant.
        res = await a.fed.search(query(), 5, tags=["ai"], peers=[b.peer_id, c.peer_id])
        assert res.refused == {b.peer_id: "expired", c.peer_id: "not_permitted"}
        assert res.hits == [] and res.answered == []
        nursery.cancel_scope.cancel()


async def test_slow_peer_is_reported_missing_and_the_search_returns_on_time():
    async with trio.open_nursery() as nursery:
        a, fast, slow = await mesh_of(
            nursery,
            [None, numpy_search(corpus(1)), numpy_search(corpus(2), delay=5.0)],
            inflight_per_peer=1,
        )
        grant(fast, a, ["ai"])
        grant(slow, a, ["ai"])
        await until(lambda: len(a.fed.targets(["ai"])) == 2)
        t0 = time.perf_counter()
        res = await a.fed.search(query(), 5, tags=["ai"], deadline=0.4)
        took = time.perf_counter() - t0
        assert 0.35 <= took < 0.9, took  # about the deadline, nowhere near the slow peer's 5 s
        assert res.missing == [slow.peer_id]
        assert res.answered == [fast.peer_id]
        assert res.hits and {h.origin for h in res.hits} == {fast.peer_id}
        # The answerer gave up with the asker (its work is bounded by the asker's deadline).
        await until(lambda: slow.fed.stats["answer_late"] == 1)

        # While the slow peer works on one search of A (inflight_per_peer=1), a second one is
        # refused with a typed "busy" at once, not left to time out.
        first: list[object] = []

        async def long_search() -> None:
            first.append(await a.fed.search(query(), 5, peers=[slow.peer_id], deadline=1.0))

        nursery.start_soon(long_search)
        await until(lambda: slow.fed.stats["requests_in"] == 2)
        res = await a.fed.search(query(), 5, tags=["ai"], peers=[slow.peer_id], deadline=2.0)
        assert res.refused == {slow.peer_id: "busy"}
        assert res.elapsed_ms < 500
        await until(lambda: bool(first))
        nursery.cancel_scope.cancel()


async def test_distrusted_peers_and_bad_requests_are_refused():
    from symbiote.actors.mesh.trust import TrustScores

    async with trio.open_nursery() as nursery:
        a, b = await mesh_of(nursery, [numpy_search(corpus(3)), numpy_search(corpus(1))])
        grant(b, a, ["ai"])
        await until(lambda: a.fed.targets(["ai"]) == [b.peer_id])
        # Input checks at the asker name the field.
        with pytest.raises(InvalidRecord) as bad_vec:
            await a.fed.search(np.zeros(DIM, np.float32), 5)
        assert bad_vec.value.field == "vector"
        with pytest.raises(BadArgument) as bad_k:
            await a.fed.search(query(), 0)
        assert bad_k.value.field == "k"
        with pytest.raises(BadArgument) as bad_tags:
            await a.fed.search(query(), 5, tags=[""])
        assert bad_tags.value.field == "tags[0]"
        with pytest.raises(BadArgument) as bad_deadline:
            await a.fed.search(query(), 5, deadline=0)
        assert bad_deadline.value.field == "deadline"
        with pytest.raises(BadArgument) as bad_where:
            await a.fed.search(query(), 5, where={"nope": 1})
        assert bad_where.value.field == "where.nope"
        # A peer below the sync threshold (but above the frame drop threshold) is refused.
        b.sync.policy.update(
            TrustScores({a.peer_id: 0.01, b.peer_id: 0.99}, {a.peer_id: 50, b.peer_id: 50})
        )
        res = await a.fed.search(query(), 5, tags=["ai"], peers=[b.peer_id])
        assert res.refused == {b.peer_id: "distrusted"}
        assert b.fed.stats["refused_distrusted"] == 1
        # The local part still answered, from this node's own rows (no grant needed).
        assert res.answered == [a.peer_id] and {h.origin for h in res.hits} == {a.peer_id}
        nursery.cancel_scope.cancel()
