"""Anti-entropy of signed rows on the in-memory network under MockClock.

Partition and heal (hashes equal), bounded gap-free batches, untrusted relays, forged rows,
expired keys, replays, clock skew, trust policy, and joining through a bootstrap file.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
import trio

from symbiote.actors.mesh.antientropy import RowSync
from symbiote.actors.mesh.bootstrap import join_from_bootstrap, parse_bootstrap
from symbiote.actors.mesh.identity import NodeIdentity
from symbiote.actors.mesh.memory import MemoryEndpoint, MemoryNetwork
from symbiote.actors.mesh.net import PeerAddr
from symbiote.actors.mesh.rows import MemoryRowLog, sign_row
from symbiote.actors.mesh.swim import SwimNode
from symbiote.schema.mesh import (
    Hlc,
    KeyChain,
    Row,
    RowBatch,
    RowSyncConfig,
    SwimConfig,
    TrustConfig,
    TrustReport,
)

SWIM = SwimConfig(push_pull_interval=5.0, reconnect_interval=2.0, join_timeout=1.0)
SYNC = RowSyncConfig(sync_interval=0.5, sync_timeout=1.0, max_batch_rows=64)
TRUST = TrustConfig(recompute_interval=2.0, report_interval=None)
#: Physical time follows virtual time from this Unix instant.
BASE = 1_700_000_000.0


def wall() -> float:
    return BASE + trio.current_time()


async def settle() -> None:
    for _ in range(5):
        await trio.lowlevel.checkpoint()


class Mesh:
    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        sync: RowSyncConfig = SYNC,
        trust: TrustConfig = TRUST,
        seed: int = 1,
    ) -> None:
        self.nursery = nursery
        self.net = MemoryNetwork(rng=random.Random(seed))
        self.sync_config = sync
        self.trust_config = trust
        self.seed = seed
        self.nodes: list[RowSync] = []
        self.eps: list[MemoryEndpoint] = []

    async def add(self, *, join: bool = True, identity: NodeIdentity | None = None) -> RowSync:
        i = len(self.nodes)
        ident = identity or NodeIdentity.generate(now=int(BASE))
        ep = self.net.endpoint(ident.peer_id, f"addr-{i:02d}")
        node = SwimNode(ep, SWIM, rng=random.Random(self.seed * 1000 + i))
        rs = RowSync(
            node,
            ident,
            self.sync_config,
            trust_config=self.trust_config,
            wall=wall,
            rng=random.Random(self.seed * 2000 + i),
        )
        await self.nursery.start(node.run)
        await self.nursery.start(rs.run)
        if join and self.nodes:
            await node.join([self.nodes[0].swim.addr])
        self.nodes.append(rs)
        self.eps.append(ep)
        return rs

    def hashes(self) -> set[str]:
        out = set()
        for n in self.nodes:
            assert isinstance(n.log, MemoryRowLog)
            out.add(n.log.content_hash())
        return out

    async def wait_same(self, limit: float = 60.0) -> float:
        start = trio.current_time()
        with trio.fail_after(limit):
            while len({n.fingerprint() for n in self.nodes}) != 1:  # noqa: ASYNC110 (polls protocol state)
                await trio.sleep(0.1)
        return trio.current_time() - start


def chain_of(rs: RowSync) -> KeyChain:
    i = rs.identity
    return KeyChain(i.peer_id, i.genesis_key, list(i.rotations))


async def test_rows_spread_to_every_node(autojump_clock):
    async with trio.open_nursery() as nursery:
        m = Mesh(nursery)
        for _ in range(5):
            await m.add()
        for n in m.nodes:
            for k in range(20):
                n.publish("doc", b"%s-%d" % (n.peer_id.encode(), k))
        took = await m.wait_same()
        assert took < 15.0
        assert all(len(n.log) == 100 for n in m.nodes)
        assert len(m.hashes()) == 1
        assert all(n.stats["bad_signature"] == 0 for n in m.nodes)
        nursery.cancel_scope.cancel()


async def test_partition_and_heal_rows_hash_the_same(autojump_clock):
    async with trio.open_nursery() as nursery:
        m = Mesh(nursery, seed=5)
        for _ in range(6):
            await m.add()
        for n in m.nodes:
            n.publish("doc", b"before")
        await m.wait_same()
        side_a = {n.swim.addr for n in m.nodes[:3]}
        side_b = {n.swim.addr for n in m.nodes[3:]}
        m.net.partition(side_a, side_b)
        # Both sides keep writing while cut off from each other.
        for step in range(10):
            for n in m.nodes:
                n.publish("doc", b"during-%d" % step)
            await trio.sleep(1.0)
        a_fp = {n.fingerprint() for n in m.nodes[:3]}
        b_fp = {n.fingerprint() for n in m.nodes[3:]}
        assert len(a_fp) == 1 and len(b_fp) == 1 and a_fp != b_fp  # each side agreed within
        m.net.heal()
        took = await m.wait_same(limit=120.0)
        assert took < 60.0
        hashes = m.hashes()
        assert len(hashes) == 1, hashes
        assert all(len(n.log) == 6 * 11 for n in m.nodes)
        nursery.cancel_scope.cancel()


async def test_batches_are_bounded_gap_free_and_continue_next_round(autojump_clock):
    cfg = RowSyncConfig(sync_interval=0.5, max_batch_rows=7, max_batch_bytes=70 * 1024)
    async with trio.open_nursery() as nursery:
        m = Mesh(nursery, sync=cfg, seed=2)
        a = await m.add()
        b = await m.add()
        seen: list[int] = []
        b.on_row.append(lambda r: seen.append(r.seq))
        for k in range(50):
            a.publish("doc", b"x" * 100 + b"%d" % k)
        # Byte bound too: 3 rows of ~64 KiB cannot share one 70 KiB batch.
        for _ in range(3):
            a.publish("blob", b"y" * (60 * 1024))
        await m.wait_same()
        assert seen == list(range(1, 54))  # in seq order, never a gap
        assert b.stats["gap"] == 0
        assert a.stats["batches_out"] >= 53 // 7
        assert b.stats["batches_in"] >= 53 // 7 + 2
        nursery.cancel_scope.cancel()


async def test_rows_travel_through_an_untrusted_relay(autojump_clock):
    async with trio.open_nursery() as nursery:
        m = Mesh(nursery, seed=3)
        a, relay, c = await m.add(), await m.add(), await m.add()
        m.net.partition({a.swim.addr}, {c.swim.addr})  # a and c never talk directly
        for k in range(10):
            a.publish("doc", b"%d" % k)
        await m.wait_same()
        assert c.log.head(a.peer_id) == 10
        # c verified a's rows with a's key, learnt from the chain relay forwarded.
        assert c.keyring.get(a.peer_id).current.public_key == a.identity.public_key
        assert relay.stats["rows_out"] >= 10
        nursery.cancel_scope.cancel()


async def test_forged_row_is_rejected_and_lowers_the_senders_trust(autojump_clock):
    async with trio.open_nursery() as nursery:
        m = Mesh(nursery, seed=4)
        honest, victim, forger, other = [await m.add() for _ in range(4)]
        honest.publish("doc", b"real")
        await m.wait_same()
        await trio.sleep(10.0)  # answered exchanges with everyone: satisfactory evidence
        before = victim.recompute_trust().scores[forger.peer_id]
        assert before > 0
        assert victim.policy.sync_from(forger.peer_id)
        # The forger relays a row "from" honest with a payload honest never signed.
        real = honest.log.get(honest.peer_id, 1)
        assert real is not None
        fake = msgspec.structs.replace(
            real, seq=2, payload=b"forged", hlc=Hlc(real.hlc.wall_ms + 1)
        )
        to = PeerAddr(victim.peer_id, victim.swim.addr)
        m.eps[2].send_nowait(to, RowBatch(99, [fake], [chain_of(honest)], False))
        await settle()
        assert victim.stats["bad_signature"] == 1
        assert victim.log.head(honest.peer_id) == 1  # not stored
        after = victim.recompute_trust().scores[forger.peer_id]
        assert after < before
        # Enough forgeries and the forger is neither synced from nor heard any more.
        for _ in range(5):
            m.eps[2].send_nowait(to, RowBatch(99, [fake], [], False))
            await settle()
        victim.recompute_trust()
        assert not victim.policy.sync_from(forger.peer_id)
        assert not victim.policy.accept_frames(forger.peer_id)
        dropped = victim.swim.stats["distrusted"]
        m.eps[2].send_nowait(to, RowBatch(99, [fake], [], False))
        await settle()
        assert victim.swim.stats["distrusted"] == dropped + 1
        assert victim.stats["bad_signature"] <= 6  # the last frame never reached the check
        # Honest peers are unaffected.
        assert victim.policy.sync_from(other.peer_id) and victim.policy.sync_from(honest.peer_id)
        nursery.cancel_scope.cancel()


async def test_rows_signed_by_an_expired_key_are_refused(autojump_clock):
    async with trio.open_nursery() as nursery:
        m = Mesh(nursery, seed=6)
        origin, holder = await m.add(), await m.add()
        old_row = origin.publish("doc", b"signed by the first key")
        await m.wait_same()
        old_key_id = origin.identity.key_id
        origin.rotate_key(grace=30)  # the first key is trusted 30 more seconds
        origin.publish("doc", b"signed by the second key")
        await m.wait_same()
        await trio.sleep(40.0)  # past the grace period
        # A row signed by the retired key now is refused, and not held against the sender.
        late = sign_row(origin.identity, seq=3, hlc=Hlc(int(wall() * 1000)), kind="d", payload=b"")
        late = msgspec.structs.replace(late, key_id=old_key_id)
        sender_edge = holder.trust.edges.get((holder.peer_id, origin.peer_id), [0, 0])[1]
        m.eps[0].send_nowait(
            PeerAddr(holder.peer_id, holder.swim.addr), RowBatch(7, [late], [], False)
        )
        await settle()
        assert holder.stats["expired_key"] == 1 and holder.log.head(origin.peer_id) == 2
        assert holder.trust.edges.get((holder.peer_id, origin.peer_id), [0, 0])[1] == sender_edge
        # A newcomer still gets row 1: the origin re-signed it with its new key on rotation,
        # and holder (whose copy carries the expired signature) does not forward it.
        assert old_row.key_id == old_key_id
        newcomer = await m.add()
        await m.wait_same()
        assert newcomer.log.head(origin.peer_id) == 2
        assert newcomer.stats["expired_key"] == 0 and newcomer.stats["gap"] == 0
        assert len(m.hashes()) == 1
        nursery.cancel_scope.cancel()


async def test_replayed_batch_is_ignored(autojump_clock):
    async with trio.open_nursery() as nursery:
        m = Mesh(nursery, seed=7)
        a, b = await m.add(), await m.add()
        rows = [a.publish("doc", b"%d" % k) for k in range(5)]
        await m.wait_same()
        h = m.hashes()
        seen: list[Row] = []
        b.on_row.append(seen.append)
        m.eps[0].send_nowait(
            PeerAddr(b.peer_id, b.swim.addr), RowBatch(1, rows, [chain_of(a)], False)
        )
        await settle()
        assert b.stats["duplicate"] >= 5 and seen == [] and m.hashes() == h
        assert b.stats["bad_signature"] == 0
        nursery.cancel_scope.cancel()


async def test_rows_from_too_far_in_the_future_are_refused_until_time_catches_up(autojump_clock):
    cfg = RowSyncConfig(sync_interval=0.5, max_skew=60.0)
    async with trio.open_nursery() as nursery:
        m = Mesh(nursery, sync=cfg, seed=8)
        a, b = await m.add(), await m.add()
        ahead = Hlc(int((wall() + 120.0) * 1000))  # a clock two minutes fast
        row = sign_row(a.identity, seq=1, hlc=ahead, kind="doc", payload=b"from the future")
        a.log.append(row)
        await trio.sleep(5.0)
        assert b.stats["skew"] >= 1 and b.log.head(a.peer_id) == 0
        assert b.clock.last < ahead  # b's clock was not dragged forward
        assert b.trust.edges.get((b.peer_id, a.peer_id), [0, 0])[1] == 0
        await trio.sleep(70.0)  # now it is within the bound
        assert b.log.head(a.peer_id) == 1
        nursery.cancel_scope.cancel()


async def test_trust_reports_replicate_and_feed_eigentrust(autojump_clock):
    async with trio.open_nursery() as nursery:
        m = Mesh(nursery, seed=9)
        a, b, c = await m.add(), await m.add(), await m.add()
        b.publish("doc", b"x")
        await trio.sleep(5.0)  # exchanges happened: evidence accumulated
        report = a.publish_trust_report()
        assert report is not None
        assert a.publish_trust_report() is None  # nothing changed: nothing to publish
        await m.wait_same()
        assert c.trust.reported.get(a.peer_id) == report.seq
        sent = msgspec.msgpack.decode(report.payload, type=TrustReport).edges
        assert c.trust.outgoing(a.peer_id) == sent and sent[b.peer_id][0] > 0
        scores = c.recompute_trust()
        assert sum(scores.scores.values()) == pytest.approx(1.0)
        nursery.cancel_scope.cancel()


async def test_join_through_a_bootstrap_file(autojump_clock):
    async with trio.open_nursery() as nursery:
        m = Mesh(nursery, seed=10)
        first = await m.add()
        second = await m.add()
        doc: dict[str, Any] = {
            "version": 1,
            "mesh": "default",
            "peers": [
                {
                    "peer_id": n.peer_id,
                    "addrs": [n.swim.addr.replace("addr-", "host-") + ":1", n.swim.addr],
                    "public_key": msgspec.json.encode(n.identity.genesis_key).decode().strip('"'),
                    "pretrusted": i == 0,
                }
                for i, n in enumerate((first, second))
            ],
        }
        # Addresses of the memory network are not host:port; make them so for validation.
        for p in doc["peers"]:
            p["addrs"] = [a if ":" in a else a + ":7000" for a in p["addrs"]]
        boot = parse_bootstrap(msgspec.json.encode(doc), mesh="default")
        assert boot.pretrusted == {first.peer_id}
        newcomer = await m.add(join=False)
        # The memory network is addressed by plain names: map file addresses back.
        boot_seeds = boot.seeds
        assert len(boot_seeds) == 4
        newcomer.swim.config = SWIM
        answered = await join_from_bootstrap(
            newcomer.swim, _memory_addrs(boot), keyring=newcomer.keyring
        )
        assert answered >= 1
        assert newcomer.keyring.get(first.peer_id).current.public_key == first.identity.public_key
        newcomer.pretrusted |= boot.pretrusted
        first.publish("doc", b"hello")
        await m.wait_same()
        assert newcomer.log.head(first.peer_id) == 1
        nursery.cancel_scope.cancel()


def _memory_addrs(boot):
    from symbiote.actors.mesh.bootstrap import Bootstrap

    peers = [
        msgspec.structs.replace(p, addrs=[a.removesuffix(":7000") for a in p.addrs])
        for p in boot.file.peers
    ]
    return Bootstrap(msgspec.structs.replace(boot.file, peers=peers))
