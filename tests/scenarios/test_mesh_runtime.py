"""The mesh actor inside the runtime: real DuckDB files, real TLS on loopback, the loop guard.

Two (or three) runtimes in one trio process, each with its own database file, node key and
certificate issued from one network key at start.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import trio

from symbiote.actors.mesh.pki import MeshCA
from symbiote.runtime import BadArgument, Config, ConfigError, Runtime, open_runtime
from symbiote.runtime._guard import LoopGuard
from symbiote.schema.mesh import RowSyncConfig, TrustConfig
from symbiote.schema.records import Chunk, Document
from tests.actors.mesh.timers import FAST_SWIM

DIM = 16
SWIM = FAST_SWIM


@pytest.fixture
def network_key(tmp_path: Path) -> tuple[Path, Path]:
    """The mesh CA: its certificate, and its key (mode 0600) for nodes to issue their own."""
    ca = MeshCA.generate("scenario")
    cert = tmp_path / "ca.crt"
    cert.write_bytes(ca.certificate_pem)
    key = tmp_path / "ca.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(ca.private_key_pem())
    return cert, key


def node_config(tmp_path: Path, name: str, network_key: tuple[Path, Path]) -> Config:
    return Config(
        db_path=str(tmp_path / f"{name}.duckdb"),
        dim=DIM,
        readers=1,
        partition_enabled=False,
        mesh_enabled=True,
        mesh_listen="127.0.0.1:0",
        mesh_ca_cert_path=str(network_key[0]),
        mesh_ca_key_path=str(network_key[1]),
        mesh_swim=SWIM,
        mesh_sync=RowSyncConfig(sync_interval=0.05, sync_timeout=1.0),
        mesh_trust=TrustConfig(recompute_interval=0.2, report_interval=None),
        mesh_state_interval_s=0.1,
        mesh_join_retry_s=0.5,
    )


async def until(pred: Callable[[], Awaitable[bool]], limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not await pred():  # noqa: ASYNC110 (polls actor state)
            await trio.sleep(0.02)


async def test_mesh_is_off_by_default(symbiote_runtime: Runtime) -> None:
    rt = symbiote_runtime
    assert Config().mesh_enabled is False
    assert [c.id for c in rt.tree().children] == ["data"]  # no mesh actor, no socket
    with pytest.raises(ConfigError) as err:
        await rt.federated_search(np.ones(DIM, np.float32))
    assert err.value.field == "mesh_enabled"


async def test_mesh_actor_in_the_tree_and_rows_survive_a_restart(
    tmp_path: Path, network_key: tuple[Path, Path], loop_guard: LoopGuard
) -> None:
    cfg_a = node_config(tmp_path, "a", network_key)
    cfg_b = node_config(tmp_path, "b", network_key)
    async with open_runtime(cfg_a) as a, open_runtime(cfg_b) as b:
        tree = a.tree()
        assert [c.id for c in tree.children] == ["data", "mesh"]
        assert tree.children[1].state == "running"
        ia, ib = await a.mesh_status(), await b.mesh_status()
        assert await b.mesh_join([ia.addr]) == 1
        published = [await a.publish("note", b"note %d" % i) for i in range(5)]
        assert [p.seq for p in published] == [1, 2, 3, 4, 5]
        assert all(p.origin == ia.peer_id for p in published)
        # Acknowledged = committed: A's own rows are in its file before anyone can see them.
        stored = await a.query("SELECT count(*) AS n FROM mesh_rows", fmt="records")
        assert stored == [{"n": 5}]

        async def b_has_all() -> bool:
            return (await b.mesh_status()).rows == 5

        await until(b_has_all)
        await b.mesh_flush()

        async def b_saved_a() -> bool:
            peers = await b.query(
                "SELECT octet_length(genesis_key) AS k FROM peers WHERE peer_id = ?",
                [ia.peer_id],
                fmt="records",
            )
            scores = await b.query("SELECT count(*) AS n FROM trust_scores", fmt="records")
            return peers == [{"k": 32}] and scores[0]["n"] >= 2

        await until(b_saved_a)
        members = await b.mesh_members()
        assert [(m.peer_id, m.status) for m in members] == [(ia.peer_id, "alive")]

    # B alone again, on the same file: its rows come back from DuckDB, not from a peer.
    async with open_runtime(cfg_b) as b2:
        st = await b2.mesh_status()
        assert (st.peer_id, st.rows, st.origins) == (ib.peer_id, 5, 1)
        assert st.members_alive == 0
        rows = await b2.query(
            "SELECT origin, seq, payload FROM mesh_rows ORDER BY seq", fmt="records"
        )
        assert [(r["origin"], r["seq"], r["payload"]) for r in rows] == [
            (ia.peer_id, i + 1, b"note %d" % i) for i in range(5)
        ]
        edges = await b2.query(
            "SELECT satisfactory FROM trust_edges WHERE from_peer = ? AND to_peer = ?",
            [ib.peer_id, ia.peer_id],
            fmt="records",
        )
        assert edges and edges[0]["satisfactory"] > 0
    # A restarted continues its own sequence: a seq is never reused.
    async with open_runtime(cfg_a) as a2:
        assert (await a2.publish("note", b"after restart")).seq == 6


def post(i: int, tags: list[str]) -> Document:
    return Document(
        id=f"doc-{i}",
        doc_type="post",
        title=f"Alice Martin on topic {i}",
        slug=f"doc-{i}",
        status="published",
        authors=("Alice Martin",),
        tags=tuple(tags),
    )


def chunks_for(i: int) -> list[Chunk]:
    rng = np.random.default_rng(i)
    out = []
    for j in range(3):
        v = rng.standard_normal(DIM).astype(np.float32)
        out.append(
            Chunk(
                chunk_id=f"doc-{i}:{j}",
                document_id=f"doc-{i}",
                text=f"alice martin wrote part {j} of {i}",
                embedding=(v / np.linalg.norm(v)).tolist(),
                metadata={"email": "alice@example.org", "lang": "en"},
            )
        )
    return out


async def test_federated_search_between_runtimes_respects_grants_and_redacts(
    tmp_path: Path, network_key: tuple[Path, Path], loop_guard: LoopGuard
) -> None:
    cfg_a = node_config(tmp_path, "a", network_key)
    cfg_b = node_config(tmp_path, "b", network_key)
    async with open_runtime(cfg_a) as a, open_runtime(cfg_b) as b:
        ia, ib = await a.mesh_status(), await b.mesh_status()
        docs = [post(i, ["ai"] if i % 2 == 0 else ["private"]) for i in range(20)]
        await b.upsert_documents(docs)
        await b.upsert_chunks([c for i in range(20) for c in chunks_for(i)])
        await a.mesh_join([ib.addr])

        with pytest.raises(BadArgument) as err:
            await b.grant("not-a-peer", ["ai"])
        assert err.value.field == "grantee"
        with pytest.raises(BadArgument) as err:
            await b.grant(ia.peer_id, [])
        assert err.value.field == "tags"
        with pytest.raises(BadArgument) as err:
            await b.publish("grant", b"forged")  # grants only through grant()
        assert err.value.field == "kind"

        await b.grant(ia.peer_id, ["ai"], redact=["metadata.email"])

        async def granted() -> bool:
            return (await a.mesh_status()).grants_to_me == [ib.peer_id]

        await until(granted)
        q = np.random.default_rng(7).standard_normal(DIM).astype(np.float32)
        res = await a.federated_search(q, 6, tags=["ai"], deadline=2.0)
        assert res.asked == [ib.peer_id] and res.missing == [] and res.refused == {}
        assert len(res.hits) == 6 and all(h.origin == ib.peer_id for h in res.hits)
        # Exactly B's own filtered top-6 (the grant's scope, through B's planner and DuckDB).
        own = await b.search(q, 6, where={"tags": ["ai"]})
        assert [h.chunk_id for h in res.hits] == own.chunk_ids
        assert [h.distance for h in res.hits] == pytest.approx(own.distances, abs=1e-6)
        for h in res.hits:
            assert h.tags == ["ai"]
            assert h.authors is None and h.metadata == {"lang": "en"}
            assert h.text is not None and "alice martin" not in h.text.lower()
            assert h.title is not None and h.title.startswith("[redacted] on topic")
        # Nothing tagged "private" is reachable, even when asked for by name.
        res = await a.federated_search(q, 6, tags=["private"], peers=[ib.peer_id], deadline=2.0)
        assert res.refused == {ib.peer_id: "out_of_scope"} and res.hits == []
        # B cannot search A: A never granted it anything.
        res = await b.federated_search(q, 3, peers=[ia.peer_id], include_local=False)
        assert res.refused == {ia.peer_id: "no_grant"}
        info = await a.mesh_status()
        assert info.stats["fed.refused_no_grant"] == 1


async def test_a_misconfigured_mesh_fails_the_start_with_the_field(
    tmp_path: Path, network_key: tuple[Path, Path]
) -> None:
    import msgspec

    from symbiote.schema.mesh import InsecureKeyFile

    good = node_config(tmp_path, "a", network_key)
    missing = msgspec.structs.replace(good, mesh_ca_cert_path=str(tmp_path / "nope.crt"))
    with pytest.raises(ConfigError) as err:
        async with open_runtime(missing):
            pass
    assert err.value.field == "mesh_ca_cert_path"
    network_key[1].chmod(0o644)  # the network key readable by others: refused, not used
    with pytest.raises(InsecureKeyFile) as insecure:
        async with open_runtime(good):
            pass
    assert insecure.value.field == "mesh_ca_key_path"
    with pytest.raises(ConfigError) as err:
        Config(mesh_enabled=True)
    assert err.value.field == "mesh_ca_cert_path"


async def test_a_taken_listen_port_fails_the_start_and_leaves_the_database_usable(
    tmp_path: Path, network_key: tuple[Path, Path], loop_guard: LoopGuard
) -> None:
    import msgspec

    squatter = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = squatter.socket.getsockname()[1]
    cfg = msgspec.structs.replace(
        node_config(tmp_path, "a", network_key), mesh_listen=f"127.0.0.1:{port}"
    )
    try:
        with trio.fail_after(30), pytest.raises(ConfigError) as err:
            async with open_runtime(cfg):
                pass
        assert err.value.field == "mesh_listen"
        assert str(port) in err.value.message
    finally:
        await squatter.aclose()
    # Nothing half-started is left behind: the same file and the freed port start cleanly.
    async with open_runtime(cfg) as rt:
        await rt.ingest([])
        assert [c.id for c in rt.tree().children] == ["data", "mesh"]
