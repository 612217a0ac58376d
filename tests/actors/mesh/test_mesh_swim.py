"""SWIM on the in-memory network under MockClock: joins, crashes, refutation, replays."""

from __future__ import annotations

import math
import random

import pytest
import trio

from symbiote.actors.mesh.broadcast import BroadcastQueue
from symbiote.actors.mesh.memory import MemoryEndpoint, MemoryNetwork
from symbiote.actors.mesh.net import PeerAddr
from symbiote.actors.mesh.suspicion import (
    Suspicion,
    expected_confirmations,
    push_pull_scale,
    retransmit_limit,
    suspicion_bounds,
)
from symbiote.actors.mesh.swim import SwimNode
from symbiote.schema.errors import ConfigError
from symbiote.schema.mesh import Alive, Dead, Gossip, JoinFailed, Suspect, SwimConfig, Update

CFG = SwimConfig(push_pull_interval=5.0, reconnect_interval=2.0, join_timeout=1.0)


# -- pure helpers ---------------------------------------------------------------------------


def test_lan_defaults_and_validation():
    c = SwimConfig()
    assert (c.probe_interval, c.probe_timeout, c.indirect_checks) == (1.0, 0.5, 3)
    assert (c.suspicion_mult, c.gossip_interval, c.gossip_nodes) == (4.0, 0.2, 3)
    assert c.push_pull_interval == 30.0
    with pytest.raises(ConfigError) as err:
        SwimConfig(probe_interval=0.5, probe_timeout=0.5)
    assert err.value.field == "probe_timeout"
    with pytest.raises(ConfigError):
        SwimConfig(gossip_nodes=0)


def test_suspicion_timeout_formula_and_shrinking():
    c = SwimConfig()
    lo, hi = suspicion_bounds(c, 50)
    assert hi == pytest.approx(4 * math.log10(50) * 1.0)  # 6.8 s, as in memberlist
    assert suspicion_bounds(c, 5)[1] == 4.0  # max(1, log10 N) floors small meshes
    assert lo == pytest.approx(hi * c.suspicion_min_fraction)
    k = expected_confirmations(c, 50)
    assert k == 2 and expected_confirmations(c, 3) == 0
    s = Suspicion(source="a", incarnation=0, start=10.0, k=k, t_min=lo, t_max=hi)
    assert s.deadline() == pytest.approx(10.0 + hi)  # starts at the maximum
    assert not s.confirm("a")  # the first suspecter is not its own confirmation
    assert s.confirm("b")
    mid = s.timeout()
    assert lo < mid < hi
    assert s.confirm("c") and s.timeout() == pytest.approx(lo)
    assert not s.confirm("d")  # beyond k, nothing changes


def test_retransmits_and_push_pull_scaling():
    c = SwimConfig()
    assert retransmit_limit(c, 1) == 3 and retransmit_limit(c, 10) == 10
    assert retransmit_limit(c, 50) == 16  # memberlist's mult x ceil(log10(N + 1)) gives 8
    for n in range(2, c.max_members + 1):
        # Each member gets ~Poisson(limit) copies of an update; the chance that some member
        # gets none, ~(N - 1) x e^-limit, stays below N^(1 - mult) at every size.
        assert (n - 1) * math.exp(-retransmit_limit(c, n)) < n ** (1 - c.retransmit_mult)
    assert push_pull_scale(30.0, 32) == 30.0 and push_pull_scale(30.0, 64) == 60.0


def test_broadcast_queue_bounded_newest_first_and_retired():
    q = BroadcastQueue(max_size=2)
    q.add(Alive("a", 0, "x"))
    q.add(Suspect("a", 0, "me"))  # replaces what was queued about "a"
    assert q.take(10, retransmits=2) == [Suspect("a", 0, "me")]
    q.add(Alive("b", 0, "x"))
    q.add(Alive("c", 0, "x"))  # over the cap: the most sent ("a") goes
    assert len(q) == 2 and q.evicted == 1
    assert {u.peer_id for u in q.take(10, retransmits=2)} == {"b", "c"}
    q.take(10, retransmits=2)
    assert len(q) == 0  # each sent twice: retired


# -- cluster harness ------------------------------------------------------------------------


async def settle() -> None:
    # Let tasks made runnable by an injected message run, without virtual time passing (the
    # autojump clock only advances once every task is blocked).
    for _ in range(3):
        await trio.lowlevel.checkpoint()


class Cluster:
    def __init__(
        self, nursery: trio.Nursery, config: SwimConfig = CFG, seed: int = 1, loss: float = 0.0
    ) -> None:
        self.nursery = nursery
        self.net = MemoryNetwork(loss=loss, rng=random.Random(seed))
        self.config = config
        self.seed = seed
        self.nodes: dict[str, SwimNode] = {}
        self.eps: dict[str, MemoryEndpoint] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.crashed: set[str] = set()

    async def add(self, seeds: list[str] | None = None) -> SwimNode:
        pid = f"n{len(self.nodes):02d}"
        ep = self.net.endpoint(pid, f"addr-{pid}")
        node = SwimNode(ep, self.config, rng=random.Random(self.seed * 1000 + len(self.nodes)))
        scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await node.run(task_status=task_status)

        await self.nursery.start(run)
        self.nodes[pid], self.eps[pid], self.scopes[pid] = node, ep, scope
        if seeds:
            await node.join(seeds)
        return node

    def crash(self, pid: str) -> None:
        self.net.crash(self.nodes[pid].addr)
        self.scopes[pid].cancel()
        self.crashed.add(pid)

    def live(self) -> list[SwimNode]:
        return [n for p, n in self.nodes.items() if p not in self.crashed]

    def converged(self) -> bool:
        live_ids = {n.peer_id for n in self.live()}
        for n in self.live():
            if n.member_ids("alive") != live_ids - {n.peer_id}:
                return False
            if n.member_ids("dead") != self.crashed:
                return False
        return True

    async def wait_converged(self, limit: float) -> float:
        start = trio.current_time()
        with trio.fail_after(limit):
            while not self.converged():  # noqa: ASYNC110 (polls protocol state)
                await trio.sleep(0.1)
        return trio.current_time() - start

    def false_deaths(self) -> list[tuple[str, str]]:
        return [
            (n.peer_id, e.peer_id)
            for n in self.live()
            for e in n.events
            if e.status == "dead" and e.peer_id not in self.crashed
        ]


@pytest.mark.parametrize("size", [5, 20])
async def test_join_converges(autojump_clock, size):
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, seed=size)
        rng = random.Random(size)
        await c.add()
        for _ in range(size - 1):
            # Join through any member, not a fixed seed.
            seed = rng.choice(list(c.nodes.values()))
            await c.add([seed.addr])
        took = await c.wait_converged(limit=30.0)
        assert took < 3 * CFG.push_pull_interval
        assert c.false_deaths() == []
        assert all(n.member_ids("suspect", "dead") == set() for n in c.live())
        nursery.cancel_scope.cancel()


async def test_every_update_reaches_every_member_by_gossip(autojump_clock):
    # 12 batches of 25 simultaneous refutations (300 updates) at 50 nodes, with LAN timers:
    # each must reach all 49 others by gossip within 12 rounds. A member that gossip misses
    # waits for push/pull (60 s at 50 nodes, 300 rounds). With memberlist's retransmit count
    # (8 at N = 50) ~1.3 % of updates missed a member, and this test failed 8 runs of 8;
    # with ceil(4 ln 51) = 16 the chance of a miss here is ~1e-3 (300 x 49 x e^-16.3), and
    # the slowest batch took ~8 rounds.
    config = SwimConfig(join_timeout=1.0)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, config, seed=11)
        first = await c.add()
        for _ in range(49):
            await c.add([first.addr])
        await c.wait_converged(limit=60.0)
        rng = random.Random(11)
        nodes = list(c.nodes.values())
        slowest = 0.0
        for _ in range(12):
            sources = rng.sample(nodes, 25)
            for src in sources:
                src._refute(src.incarnation)
            want = {src.peer_id: src.incarnation for src in sources}

            def spread(want: dict[str, int] = want) -> bool:
                return all(
                    n.members[p].incarnation >= inc
                    for n in nodes
                    for p, inc in want.items()
                    if p != n.peer_id
                )

            start = trio.current_time()
            with trio.move_on_after(12 * config.gossip_interval):
                while not spread():  # noqa: ASYNC110 (polls protocol state)
                    await trio.sleep(config.gossip_interval / 4)
            missed = [
                (n.peer_id, p)
                for n in nodes
                for p, inc in want.items()
                if p != n.peer_id and n.members[p].incarnation < inc
            ]
            assert missed == [], f"gossip missed (member, update about): {missed}"
            slowest = max(slowest, trio.current_time() - start)
            await trio.sleep(1.0)
        assert slowest <= 12 * config.gossip_interval
        assert all(n._broadcasts.evicted == 0 for n in nodes)
        assert c.false_deaths() == []
        nursery.cancel_scope.cancel()


async def test_join_with_no_reachable_seed_fails(autojump_clock):
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        node = await c.add()
        with pytest.raises(JoinFailed):
            await node.join(["addr-nowhere"])
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("loss", [0.0, 0.1])
async def test_crash_detected_with_zero_false_deaths(autojump_clock, loss):
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, seed=7)
        first = await c.add()
        for _ in range(19):
            await c.add([first.addr])
        await c.wait_converged(limit=30.0)
        c.net.loss = loss  # a lossy LAN from here on: probes fail, suspicions get refuted
        await trio.sleep(5.0)  # steady state before the crash
        c.crash("n03")
        c.crash("n11")
        start = trio.current_time()
        took = await c.wait_converged(limit=60.0)
        # First detection ~1.6 probe periods, then a suspicion of at most ~5.2 s at N = 20,
        # then gossip: well under 20 s of protocol time.
        assert took < 20.0, took
        await trio.sleep(10.0)  # and nothing goes wrong afterwards
        # Under loss a live member may be briefly suspect (and then refute), never dead.
        assert all(n.member_ids("dead") == c.crashed for n in c.live())
        assert c.false_deaths() == []
        if loss:
            assert c.net.lost > 0  # the lossy run did lose messages, and still no false death
        # Every live node saw the crashed ones die.
        for n in c.live():
            seen = [(e.peer_id, e.status) for e in n.events if e.at >= start]
            assert ("n03", "dead") in seen
        nursery.cancel_scope.cancel()


async def test_refutation_of_a_false_suspicion(autojump_clock):
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, seed=3)
        first = await c.add()
        for _ in range(4):
            await c.add([first.addr])
        await c.wait_converged(limit=30.0)
        victim = c.nodes["n00"]
        assert victim.incarnation == 0
        # n01 falsely accuses n00 to n02; the rumour spreads and reaches n00, which refutes.
        c.eps["n01"].send_nowait(PeerAddr("n02", "addr-n02"), Gossip([Suspect("n00", 0, "n01")]))
        await settle()
        assert c.nodes["n02"].members["n00"].status == "suspect"
        with trio.fail_after(10.0):
            while not (  # noqa: ASYNC110 (polls protocol state)
                victim.incarnation == 1
                and all(n.members["n00"].incarnation == 1 for n in c.live() if n is not victim)
                and c.converged()
            ):
                await trio.sleep(0.1)
        assert victim.stats["refutations"] == 1
        assert c.false_deaths() == []
        nursery.cancel_scope.cancel()


async def test_replayed_old_alive_and_dead_are_ignored(autojump_clock):
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, seed=4)
        first = await c.add()
        for _ in range(2):
            await c.add([first.addr])
        await c.wait_converged(limit=30.0)
        n00, n02 = c.nodes["n00"], c.nodes["n02"]
        n00._refute(0)  # n00 is now at incarnation 1 and says so
        with trio.fail_after(10.0):
            while n02.members["n00"].incarnation != 1:  # noqa: ASYNC110 (polls protocol state)
                await trio.sleep(0.1)
        stale_before = n02.stats["stale"]
        replay: list[Update] = [
            Dead("n00", 0, "n01"),
            Alive("n00", 0, "addr-evil"),
            Suspect("n00", 0, "n01"),
        ]
        c.eps["n01"].send_nowait(PeerAddr("n02", "addr-n02"), Gossip(replay))
        await settle()
        m = n02.members["n00"]
        assert (m.status, m.incarnation, m.addr) == ("alive", 1, "addr-n00")
        assert n02.stats["stale"] - stale_before == 3
        # An old "dead" about itself does not even make n00 refute again.
        c.eps["n01"].send_nowait(PeerAddr("n00", "addr-n00"), Gossip([Dead("n00", 0, "n01")]))
        await settle()
        assert n00.incarnation == 1
        nursery.cancel_scope.cancel()


async def test_partition_heals_through_reconnect(autojump_clock):
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, seed=5)
        first = await c.add()
        for _ in range(5):
            await c.add([first.addr])
        await c.wait_converged(limit=30.0)
        side_a = {n.addr for p, n in c.nodes.items() if p in ("n00", "n01", "n02")}
        side_b = {n.addr for p, n in c.nodes.items() if p not in ("n00", "n01", "n02")}
        c.net.partition(side_a, side_b)
        with trio.fail_after(60.0):
            while c.nodes["n00"].member_ids("dead") != {"n03", "n04", "n05"}:  # noqa: ASYNC110 (polls protocol state)
                await trio.sleep(0.5)
        c.net.heal()
        took = await c.wait_converged(limit=60.0)
        assert took < 30.0
        assert all(n.incarnation >= 1 for n in c.live())  # each refuted its own death
        nursery.cancel_scope.cancel()
