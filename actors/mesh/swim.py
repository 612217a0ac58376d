"""SWIM membership with Lifeguard's suspicion timeouts, over any :class:`Network`.

One :class:`SwimNode` runs five timer loops (probe, gossip, push/pull, reconnect, reap) and a
receive loop in its own nursery. It only ever *queues* messages (``send_nowait``) so a slow or
dead peer never stalls the protocol; lost messages are what SWIM is built to survive. All
timing uses trio's clock, so a whole mesh runs in virtual time under
``trio.testing.MockClock`` on :class:`~symbiote.actors.mesh.memory.MemoryNetwork`, and in real
time on :class:`~symbiote.actors.mesh.transport.TcpTransport`.

Precedence of updates about member M (SWIM paper, as memberlist applies it):

* ``Alive(M, i)`` wins over anything held at incarnation ``j < i``;
* ``Suspect(M, i)`` wins over ``Alive(M, j)`` with ``j <= i``;
* ``Dead(M, i)`` wins over ``Alive``/``Suspect`` at ``j <= i``;
* anything at an incarnation lower than held is a replay and is ignored (counted ``stale``).

Only M itself raises its incarnation: on hearing it is suspected or dead it *refutes* with
``Alive(M, i + 1)``.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from symbiote.actors.mesh.broadcast import BroadcastQueue
from symbiote.actors.mesh.net import Inbound, Network, PeerAddr
from symbiote.actors.mesh.suspicion import (
    Suspicion,
    expected_confirmations,
    push_pull_scale,
    retransmit_limit,
    suspicion_bounds,
)
from symbiote.schema.mesh import (
    Ack,
    Alive,
    Dead,
    Gossip,
    JoinFailed,
    MemberState,
    MemberStatus,
    MeshMessage,
    Ping,
    PingReq,
    PushPull,
    PushPullReply,
    Suspect,
    SwimConfig,
    Update,
)

__all__ = ["Member", "MemberEvent", "SwimNode"]

log = logging.getLogger(__name__)

#: Keys of :attr:`SwimNode.stats`, a closed set.
STAT_KEYS = (
    "probes",
    "probe_failed",
    "indirect_probes",
    "relays",
    "relays_dropped",
    "refutations",
    "stale",
    "ping_wrong_target",
    "members_dropped",
    "push_pulls",
    "reconnect_attempts",
    "send_dropped",
    "unexpected",
    "distrusted",
)


@dataclass(slots=True)
class Member:
    """What this node believes about one other member."""

    peer_id: str
    addr: str
    incarnation: int
    status: MemberStatus
    #: trio time of the last status change (used to forget long-dead members).
    changed_at: float


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A change of a member's status, as seen by this node."""

    peer_id: str
    status: MemberStatus
    incarnation: int
    at: float


class SwimNode:
    """The SWIM protocol for one node. Run it with ``await nursery.start(node.run)``."""

    def __init__(
        self,
        net: Network,
        config: SwimConfig | None = None,
        *,
        rng: random.Random | None = None,
        max_events: int = 4096,
    ) -> None:
        self.net = net
        self.config = config if config is not None else SwimConfig()
        #: This node's id and advertised address, read from the network when it starts
        #: (a TCP transport only knows its address once it listens).
        self.peer_id = ""
        self.addr = ""
        self.incarnation = 0
        self.members: dict[str, Member] = {}
        #: Recent status changes, oldest dropped first.
        self.events: deque[MemberEvent] = deque(maxlen=max_events)
        self.stats: Counter[str] = Counter({k: 0 for k in STAT_KEYS})
        self._rng = rng if rng is not None else random.Random()
        self._broadcasts = BroadcastQueue(self.config.max_broadcasts)
        self._seq = 0
        self._acks: dict[int, trio.Event] = {}
        self._pushpulls: dict[int, trio.Event] = {}
        self._suspicions: dict[str, tuple[Suspicion, trio.CancelScope]] = {}
        self._probe_order: list[str] = []
        self._relays = 0
        self._nursery: trio.Nursery | None = None
        self._log: dict[str, str] = {}
        #: Handlers for messages that are not SWIM's (anti-entropy rides on the same network
        #: and the same receive loop); each returns True if it took the message.
        self.handlers: list[Callable[[Inbound], bool]] = []
        #: Trust policy hook: frames from a sender for which this returns False are dropped
        #: (counted ``distrusted``) before anything else looks at them.
        self.admit: Callable[[str], bool] | None = None

    # -- public view ---------------------------------------------------------------------

    def member_ids(self, *statuses: MemberStatus) -> set[str]:
        """Ids of other members with one of ``statuses`` (all statuses if none given)."""
        return {m.peer_id for m in self.members.values() if not statuses or m.status in statuses}

    def live_count(self) -> int:
        """N: this node plus the members not known dead."""
        return 1 + sum(1 for m in self.members.values() if m.status != "dead")

    def state(self) -> list[MemberState]:
        """The full state this node would send in a push/pull, itself first."""
        out = [MemberState(self.peer_id, self.addr, self.incarnation, "alive")]
        out.extend(
            MemberState(m.peer_id, m.addr, m.incarnation, m.status) for m in self.members.values()
        )
        return out

    # -- lifecycle -----------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[SwimNode] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the protocol until cancelled; the network must already be serving."""
        local = self.net.local
        if local.peer_id is None:
            raise ValueError("the network must know this node's peer id")
        self.peer_id, self.addr = local.peer_id, local.addr
        self._log = {"peer_id": self.peer_id}
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_loop)
            nursery.start_soon(self._probe_loop)
            nursery.start_soon(self._gossip_loop)
            nursery.start_soon(self._push_pull_loop)
            nursery.start_soon(self._reconnect_loop)
            nursery.start_soon(self._reap_loop)
            task_status.started(self)

    async def join(self, seeds: Sequence[str], *, attempts: int = 3) -> int:
        """Full-state sync with each seed address; the number that answered in time.

        Unanswered seeds are asked again, ``attempts`` times within ``join_timeout`` (a lost
        message must not fail a join). Raises JoinFailed if no seed answered. Any member of
        the mesh can be a seed.
        """
        targets = {addr: trio.Event() for addr in seeds if addr != self.addr}
        seqs: list[int] = []
        per_try = self.config.join_timeout / max(1, attempts)
        try:
            for _ in range(max(1, attempts)):
                waiting = [(a, ev) for a, ev in targets.items() if not ev.is_set()]
                if not waiting:
                    break
                for addr, ev in waiting:
                    seq = self._next_seq()
                    seqs.append(seq)
                    self._pushpulls[seq] = ev
                    self._send(PeerAddr(None, addr), PushPull(seq, True, self.state()))
                with trio.move_on_after(per_try):
                    for _addr, ev in waiting:
                        await ev.wait()
        finally:
            for seq in seqs:
                self._pushpulls.pop(seq, None)
        answered = sum(ev.is_set() for ev in targets.values())
        if not answered:
            raise JoinFailed(f"no seed answered out of {len(targets)}", field="seeds")
        log.info("joined via %d of %d seeds", answered, len(targets), extra=self._log)
        if self._nursery is not None:
            self._nursery.start_soon(self._settle_after_join)
        return answered

    async def _settle_after_join(self) -> None:
        """One more push/pull, with a random member, about a probe interval after joining.

        Members that joined at the same time as this node are missing from the seed's answer,
        and their Alive updates may have used up their retransmissions before anyone knew
        this node to gossip to: without this the node waited for the periodic push/pull (30 s,
        60 s at 50 nodes) to learn them. Measured: 2 of 6 simultaneous joins of 50 nodes took
        150 gossip rounds to converge. The lasting cause was the retransmit count (see
        ``retransmit_limit``: 3 of 340 such joins still stalled with only this push/pull, none
        of 640 with both); this push/pull still shortens a join (median 5 rounds, 6 without).
        """
        await trio.sleep(self.config.probe_interval * self._rng.uniform(0.5, 1.0))
        peers = [m for m in self.members.values() if m.status == "alive"]
        if peers:
            m = self._rng.choice(peers)
            self.stats["push_pulls"] += 1
            self._send(PeerAddr(m.peer_id, m.addr), PushPull(self._next_seq(), False, self.state()))

    # -- sending -------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, to: PeerAddr, msg: MeshMessage) -> None:
        if not self.net.send_nowait(to, msg):
            self.stats["send_dropped"] += 1

    def _piggyback(self) -> list[Update]:
        return self._broadcasts.take(
            self.config.max_piggyback, retransmit_limit(self.config, self.live_count())
        )

    def _broadcast(self, update: Update) -> None:
        self._broadcasts.add(update)

    # -- timer loops ---------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        while True:
            tick = trio.current_time() + self.config.probe_interval
            target = self._next_probe_target()
            if target is not None:
                await self._probe(target, tick)
            await trio.sleep_until(tick)

    def _next_probe_target(self) -> Member | None:
        # Randomised round robin (SWIM 4.3): every member is probed once per sweep, which
        # bounds the time to first detection, unlike picking at random each period.
        while True:
            if not self._probe_order:
                self._probe_order = [p for p, m in self.members.items() if m.status != "dead"]
                if not self._probe_order:
                    return None
                self._rng.shuffle(self._probe_order)
            m = self.members.get(self._probe_order.pop())
            if m is not None and m.status != "dead":
                return m

    async def _probe(self, target: Member, period_end: float) -> None:
        self.stats["probes"] += 1
        seq = self._next_seq()
        ack = self._acks[seq] = trio.Event()
        try:
            to = PeerAddr(target.peer_id, target.addr)
            self._send(to, Ping(seq, target.peer_id, self._piggyback()))
            with trio.move_on_after(self.config.probe_timeout):
                await ack.wait()
            if ack.is_set():
                return
            helpers = [
                m
                for m in self.members.values()
                if m.status == "alive" and m.peer_id != target.peer_id
            ]
            for h in self._rng.sample(helpers, min(self.config.indirect_checks, len(helpers))):
                self.stats["indirect_probes"] += 1
                self._send(
                    PeerAddr(h.peer_id, h.addr),
                    PingReq(seq, target.peer_id, target.addr, self._piggyback()),
                )
            with trio.move_on_at(period_end):
                await ack.wait()
            if ack.is_set():
                return
        finally:
            del self._acks[seq]
        self.stats["probe_failed"] += 1
        current = self.members.get(target.peer_id)
        if current is not None and current.status == "alive":
            log.info("probe failed, suspecting", extra={**self._log, "target": target.peer_id})
            self._on_suspect(Suspect(current.peer_id, current.incarnation, self.peer_id))

    async def _gossip_loop(self) -> None:
        while True:
            await trio.sleep(self.config.gossip_interval)
            if not len(self._broadcasts):
                continue
            peers = [m for m in self.members.values() if m.status != "dead"]
            for m in self._rng.sample(peers, min(self.config.gossip_nodes, len(peers))):
                updates = self._piggyback()
                if not updates:
                    break
                self._send(PeerAddr(m.peer_id, m.addr), Gossip(updates))

    async def _push_pull_loop(self) -> None:
        while True:
            n = self.live_count()
            await trio.sleep(push_pull_scale(self.config.push_pull_interval, n))
            peers = [m for m in self.members.values() if m.status != "dead"]
            if peers:
                m = self._rng.choice(peers)
                self.stats["push_pulls"] += 1
                self._send(
                    PeerAddr(m.peer_id, m.addr), PushPull(self._next_seq(), False, self.state())
                )

    async def _reconnect_loop(self) -> None:
        # A push/pull towards a member believed dead: if it is in fact alive (a healed
        # partition), it learns it was declared dead and refutes, and both sides resync.
        while True:
            await trio.sleep(self.config.reconnect_interval)
            dead = [m for m in self.members.values() if m.status == "dead"]
            if dead:
                m = self._rng.choice(dead)
                self.stats["reconnect_attempts"] += 1
                self._send(
                    PeerAddr(m.peer_id, m.addr), PushPull(self._next_seq(), False, self.state())
                )

    async def _reap_loop(self) -> None:
        horizon = self.config.dead_reclaim_time
        while True:
            await trio.sleep(horizon / 4)
            now = trio.current_time()
            for pid in [
                p
                for p, m in self.members.items()
                if m.status == "dead" and now - m.changed_at >= horizon
            ]:
                del self.members[pid]

    # -- receiving -----------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        async for item in self.net.inbound:
            self._handle(item)

    def _handle(self, item: Inbound) -> None:
        msg, sender = item.msg, item.sender
        if self.admit is not None and sender.peer_id is not None and not self.admit(sender.peer_id):
            self.stats["distrusted"] += 1
            if self.stats["distrusted"] & (self.stats["distrusted"] - 1) == 0:
                log.warning(
                    "dropping frames of a distrusted peer (count %d)",
                    self.stats["distrusted"],
                    extra={**self._log, "sender": sender.peer_id},
                )
            return
        match msg:
            case Ping():
                self._apply(msg.updates)
                if msg.target != self.peer_id:
                    self.stats["ping_wrong_target"] += 1
                    return
                self._send(sender, Ack(msg.seq, self._piggyback()))
            case Ack():
                self._apply(msg.updates)
                ev = self._acks.get(msg.seq)
                if ev is not None:
                    ev.set()
            case PingReq():
                self._apply(msg.updates)
                self._start_relay(sender, msg)
            case Gossip():
                self._apply(msg.updates)
            case PushPull():
                self._merge(msg.members, sender)
                self._send(sender, PushPullReply(msg.seq, self.state()))
            case PushPullReply():
                self._merge(msg.members, sender)
                ev = self._pushpulls.get(msg.seq)
                if ev is not None:
                    ev.set()
            case _:
                for handler in self.handlers:
                    if handler(item):
                        return
                self.stats["unexpected"] += 1

    def _start_relay(self, requester: PeerAddr, req: PingReq) -> None:
        if self._nursery is None or self._relays >= self.config.max_relays:
            self.stats["relays_dropped"] += 1
            return
        self._relays += 1
        self._nursery.start_soon(self._relay, requester, req)

    async def _relay(self, requester: PeerAddr, req: PingReq) -> None:
        self.stats["relays"] += 1
        seq = self._next_seq()
        ack = self._acks[seq] = trio.Event()
        try:
            self._send(PeerAddr(req.target, req.target_addr), Ping(seq, req.target))
            with trio.move_on_after(self.config.probe_timeout):
                await ack.wait()
            if ack.is_set():
                self._send(requester, Ack(req.seq, self._piggyback()))
        finally:
            del self._acks[seq]
            self._relays -= 1

    def _apply(self, updates: list[Update]) -> None:
        for u in updates[: self.config.max_piggyback]:
            match u:
                case Alive():
                    self._on_alive(u)
                case Suspect():
                    self._on_suspect(u)
                case Dead():
                    self._on_dead(u)

    def _merge(self, states: list[MemberState], sender: PeerAddr) -> None:
        source = sender.peer_id or "?"
        for s in states[: self.config.max_members + 1]:
            if s.status == "alive":
                self._on_alive(Alive(s.peer_id, s.incarnation, s.addr))
            elif s.peer_id == self.peer_id:
                if s.incarnation >= self.incarnation:
                    self._refute(s.incarnation)
            else:
                # memberlist's rule: a remote "dead" only makes us suspect; our own probes and
                # the suspicion timer decide, so one peer's stale view cannot kill a member.
                self._on_suspect(Suspect(s.peer_id, s.incarnation, source))

    # -- state transitions ---------------------------------------------------------------

    def _event(self, m: Member) -> None:
        m.changed_at = trio.current_time()
        self.events.append(MemberEvent(m.peer_id, m.status, m.incarnation, m.changed_at))
        log.info(
            "member %s is %s (incarnation %d)", m.peer_id, m.status, m.incarnation, extra=self._log
        )

    def _refute(self, incarnation: int) -> None:
        self.incarnation = max(self.incarnation, incarnation) + 1
        self.stats["refutations"] += 1
        log.info("refuting suspicion, incarnation %d", self.incarnation, extra=self._log)
        self._broadcast(Alive(self.peer_id, self.incarnation, self.addr))

    def _on_alive(self, a: Alive) -> None:
        if a.peer_id == self.peer_id:
            # Someone holds a newer incarnation of us (we restarted): outbid it.
            if a.incarnation > self.incarnation:
                self._refute(a.incarnation)
            return
        m = self.members.get(a.peer_id)
        if m is None:
            if len(self.members) >= self.config.max_members:
                self.stats["members_dropped"] += 1
                return
            m = self.members[a.peer_id] = Member(a.peer_id, a.addr, a.incarnation, "alive", 0.0)
            self._probe_order.insert(self._rng.randint(0, len(self._probe_order)), a.peer_id)
            self._event(m)
            self._broadcast(a)
            return
        if a.incarnation <= m.incarnation:
            if a.incarnation < m.incarnation or m.status != "alive":
                self.stats["stale"] += 1
            return
        was = m.status
        m.incarnation, m.addr, m.status = a.incarnation, a.addr, "alive"
        self._end_suspicion(a.peer_id)
        if was != "alive":
            self._event(m)
        self._broadcast(a)

    def _on_suspect(self, s: Suspect) -> None:
        if s.peer_id == self.peer_id:
            if s.incarnation >= self.incarnation:
                self._refute(s.incarnation)
            return
        m = self.members.get(s.peer_id)
        if m is None:
            return
        if s.incarnation < m.incarnation or m.status == "dead":
            self.stats["stale"] += 1
            return
        if m.status == "suspect":
            m.incarnation = s.incarnation
            entry = self._suspicions.get(s.peer_id)
            if entry is not None and entry[0].confirm(s.source):
                susp, scope = entry
                scope.deadline = susp.deadline()
                self._broadcast(s)  # confirmations travel too: others shrink their timers
            return
        m.incarnation, m.status = s.incarnation, "suspect"
        self._event(m)
        self._broadcast(s)
        self._start_suspicion(m, s.source)

    def _on_dead(self, d: Dead) -> None:
        if d.peer_id == self.peer_id:
            if d.incarnation >= self.incarnation:
                self._refute(d.incarnation)
            return
        m = self.members.get(d.peer_id)
        if m is None:
            return
        if d.incarnation < m.incarnation or m.status == "dead":
            self.stats["stale"] += 1
            return
        m.incarnation, m.status = d.incarnation, "dead"
        self._end_suspicion(d.peer_id)
        self._event(m)
        self._broadcast(d)

    def _start_suspicion(self, m: Member, source: str) -> None:
        if self._nursery is None:
            return
        n = self.live_count()
        t_min, t_max = suspicion_bounds(self.config, n)
        susp = Suspicion(
            source=source,
            incarnation=m.incarnation,
            start=trio.current_time(),
            k=expected_confirmations(self.config, n),
            t_min=t_min,
            t_max=t_max,
        )
        scope = trio.CancelScope(deadline=susp.deadline())
        self._end_suspicion(m.peer_id)
        self._suspicions[m.peer_id] = (susp, scope)
        self._nursery.start_soon(self._suspicion_timer, m.peer_id, susp, scope)

    def _end_suspicion(self, peer_id: str) -> None:
        entry = self._suspicions.pop(peer_id, None)
        if entry is not None:
            entry[0].withdrawn = True
            entry[1].cancel()

    async def _suspicion_timer(
        self, peer_id: str, susp: Suspicion, scope: trio.CancelScope
    ) -> None:
        with scope:
            await trio.sleep_forever()
        if susp.withdrawn:
            return
        if self._suspicions.get(peer_id, (None,))[0] is susp:
            del self._suspicions[peer_id]
        m = self.members.get(peer_id)
        if m is not None and m.status == "suspect":
            log.info(
                "suspicion timed out after %.2fs",
                susp.timeout(),
                extra={**self._log, "target": peer_id},
            )
            self._on_dead(Dead(peer_id, m.incarnation, self.peer_id))
