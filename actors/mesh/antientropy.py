"""Scuttlebutt anti-entropy of signed rows, riding on a :class:`SwimNode`'s network.

Exchange (one per ``sync_interval``, with one random live member this node syncs from)::

    A -> B  RowDigest(fingerprint only, reply)        16 bytes of digest, whatever N is
    B -> A  RowDigest(fingerprint only)               equal fingerprints: in sync, done
       or   RowDigest(full {origin: head}, reply)     they differ
    A -> B  RowBatch(rows B lacks)                    bounded: max rows, max bytes
    A -> B  RowDigest(full, no reply)                 only if A lacks something B has
    B -> A  RowBatch(rows A lacks)

Rows go in seq order per origin starting right after the receiver's head, so a receiver never
holds a gap; what the bounds hold back goes in a later round (``RowBatch.more``). The order of
origins within a batch is shuffled each time so that one long backlog cannot starve the others.

Relays need not be trusted: every row is verified against its *origin's* key
(:class:`~symbiote.actors.mesh.identity.KeyRing`), learnt from a self-certifying
:class:`~symbiote.schema.mesh.KeyChain` that travels with the rows. On receipt:

- ``seq <= head``: a duplicate or a replay, ignored (counted ``duplicate``);
- a gap, a payload over ``max_payload``, an HLC further ahead than ``max_skew``, an unknown or
  expired key: refused (counted), and that origin's later rows in the batch skipped (they
  would leave a gap). Not held against the sender: an honest relay may hold a row whose key
  expired since, and clocks drift;
- a signature that does not verify: a forgery by the sender (an honest relay verified the
  row before storing it). The batch is dropped, counted ``bad_signature``, logged with the
  sender's id and recorded as ``forgery_penalty`` unsatisfactory interactions against it;
- a valid row: appended, the HLC absorbs it, subscribers (:attr:`RowSync.on_row`) see it.

Trust evidence for EigenTrust (:mod:`~symbiote.actors.mesh.trust`): an answered exchange
and a batch with new valid rows are satisfactory; a forgery and an exchange left unanswered
past ``sync_timeout`` are not. The policy decides whom to sync from, and the SwimNode's
``admit`` hook drops frames of peers below the drop threshold.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from symbiote.actors.mesh.hlc import HybridClock
from symbiote.actors.mesh.identity import KeyRing, NodeIdentity, PeerKeys
from symbiote.actors.mesh.net import Inbound, PeerAddr
from symbiote.actors.mesh.rows import ROW_CONTEXT, MemoryRowLog, RowLog, row_size, sign_row
from symbiote.actors.mesh.swim import SwimNode
from symbiote.actors.mesh.trust import TrustGraph, TrustPolicy, TrustScores
from symbiote.schema.errors import TooLarge
from symbiote.schema.mesh import (
    BadSignature,
    ClockSkew,
    KeyChain,
    KeyExpired,
    KeyRotation,
    LogFull,
    MeshMessage,
    Row,
    RowBatch,
    RowDigest,
    RowSyncConfig,
    TrustConfig,
    TrustReport,
    UnknownKey,
)

__all__ = ["RowSync"]

log = logging.getLogger(__name__)

#: Keys of :attr:`RowSync.stats`, a closed set.
STAT_KEYS = (
    "rounds",
    "digests_in",
    "in_sync",
    "batches_in",
    "batches_out",
    "rows_out",
    "rows_accepted",
    "duplicate",
    "gap",
    "too_large",
    "skew",
    "unknown_key",
    "expired_key",
    "bad_signature",
    "bad_chain",
    "log_full",
    "timeouts",
    "not_synced_distrusted",
    "bad_payload",
    "published",
    "send_dropped",
)

#: Encoded size of a chain without rotations, and per rotation (an upper estimate).
_CHAIN_BASE = 80
_CHAIN_PER_ROTATION = 260
_REPORT_DECODER = msgspec.msgpack.Decoder(TrustReport)
_ENCODER = msgspec.msgpack.Encoder()


class RowSync:
    """Signed rows for one node: publishing, the row log, anti-entropy and trust.

    Build it around a :class:`SwimNode` (it registers itself as a message handler and as
    the node's ``admit`` policy), then run it next to the node:
    ``await nursery.start(sync.run)`` after ``await nursery.start(node.run)``.
    """

    def __init__(
        self,
        swim: SwimNode,
        identity: NodeIdentity,
        config: RowSyncConfig | None = None,
        *,
        row_log: RowLog | None = None,
        trust_config: TrustConfig | None = None,
        keyring: KeyRing | None = None,
        pretrusted: set[str] | None = None,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.swim = swim
        self.identity = identity
        self.peer_id = identity.peer_id
        self.config = config if config is not None else RowSyncConfig()
        c = self.config
        self.log: RowLog = (
            row_log
            if row_log is not None
            else MemoryRowLog(
                max_rows=c.max_rows,
                max_rows_per_origin=c.max_rows_per_origin,
                max_origins=c.max_origins,
                peer_id=self.peer_id,
            )
        )
        self.keyring = keyring if keyring is not None else KeyRing(c.max_origins)
        self._wall = wall
        self.clock = HybridClock(wall=wall, max_skew=c.max_skew, peer_id=self.peer_id)
        self.trust_config = trust_config if trust_config is not None else TrustConfig()
        self.trust = TrustGraph(self.peer_id, self.trust_config)
        self.policy = TrustPolicy(self.trust_config, self_id=self.peer_id)
        #: Operator-chosen anchors of EigenTrust (from the bootstrap file); this node is added.
        self.pretrusted: set[str] = set(pretrusted or ())
        #: Called with every row accepted from a peer or published here, in log order (the
        #: mesh actor's hook to persist rows through the writer). Must not block.
        self.on_row: list[Callable[[Row], object]] = []
        self.stats: Counter[str] = Counter({k: 0 for k in STAT_KEYS})
        self._rng = rng if rng is not None else random.Random()
        self._chains: dict[str, KeyChain] = {}
        self._seq = 0
        #: seq -> (peer id, deadline) of digest exchanges awaiting an answer (bounded).
        self._pending: dict[int, tuple[str, float]] = {}
        self._reported: dict[str, tuple[int, int]] = {}
        self._extra: dict[str, Any] = {"peer_id": self.peer_id}
        own = PeerKeys.from_chain(self.peer_id, identity.genesis_key, identity.rotations)
        self.keyring.add(own)
        self._chains[self.peer_id] = self._own_chain()
        swim.handlers.append(self.handle)
        swim.admit = self.policy.accept_frames

    # -- public API ----------------------------------------------------------------------

    def fingerprint(self) -> bytes:
        """The row log's digest fingerprint (equal on two nodes ⇔ same heads)."""
        return self.log.fingerprint()

    def publish(self, kind: str, payload: bytes | msgspec.Struct) -> Row:
        """Sign and append this node's next row; it spreads with the next exchanges.

        A struct payload is encoded as MessagePack. Raises TooLarge over ``max_payload`` and
        LogFull at the log's limits.
        """
        row = self.sign_next(kind, payload)
        self.accept_own(row)
        return row

    def sign_next(self, kind: str, payload: bytes | msgspec.Struct) -> Row:
        """This node's next row, signed but not yet in the log (see :meth:`accept_own`).

        For a caller that must make the row durable before anyone can see it (the mesh
        actor): a row that reached a peer and was then lost in a crash would have its seq
        reused by the next publish, with other content. Raises TooLarge over ``max_payload``.
        """
        data = payload if isinstance(payload, bytes) else _ENCODER.encode(payload)
        if len(data) > self.config.max_payload:
            raise TooLarge(
                f"{len(data)} bytes > max_payload {self.config.max_payload}", field="payload"
            )
        seq = self.log.head(self.peer_id) + 1
        return sign_row(self.identity, seq=seq, hlc=self.clock.now(), kind=kind, payload=data)

    def accept_own(self, row: Row) -> None:
        """Append a row made by :meth:`sign_next`; it spreads with the next exchanges.

        Raises RowGap if another row of this node was appended since, LogFull at a limit.
        """
        self.log.append(row)
        self.stats["published"] += 1
        self._notify(row)

    def chain(self, origin: str) -> KeyChain | None:
        """The key chain held for ``origin`` (what a batch sends with its rows), if any."""
        return self._chains.get(origin)

    def absorb_restored(self, rows: list[Row]) -> None:
        """Take note of rows put back into the log at start (from the database).

        They were verified when they first arrived, so they are not verified again: the HLC
        moves past them (this node's readings stay increasing across a restart) and the
        ``on_row`` hooks and trust reports see them as they would a new row.
        """
        for row in rows:
            try:
                self.clock.update(row.hlc, sender=row.origin)
            except ClockSkew:
                pass  # a row stored ahead of a clock that went back: keep the local reading
            self._notify(row)

    def rotate_key(self, *, grace: int = 7 * 24 * 3600) -> KeyRotation:
        """Rotate this node's key, and re-sign its own rows with the new key.

        Peers learn the rotation from the key chain sent with this node's rows. Re-signing
        keeps this node's rows servable to newcomers after the old key expires (copies that
        relays hold keep the old signature and stop being forwarded at expiry).
        """
        rot = self.identity.rotate(now=int(self._wall()), grace=grace)
        self.keyring.get(self.peer_id).apply_rotation(rot, now=int(self._wall()))
        self._chains[self.peer_id] = self._own_chain()
        head = self.log.head(self.peer_id)
        for row in self.log.rows_after(self.peer_id, 0, head):
            fresh = msgspec.structs.replace(row, key_id=self.identity.key_id)
            self.log.replace(self.identity.sign_record(fresh, context=ROW_CONTEXT))
        return rot

    def learn_chain(self, chain: KeyChain) -> bool:
        """Verify ``chain`` and extend what the key ring holds; True if anything was new.

        Raises BadSignature if the chain does not verify (genesis key not deriving the peer
        id, a rotation not signed by the key it replaces, a fork from the chain held).
        """
        now = int(self._wall())
        try:
            held = self.keyring.get(chain.peer_id)
        except UnknownKey:
            keys = PeerKeys.from_chain(chain.peer_id, chain.genesis_key, chain.rotations, now=now)
            self.keyring.add(keys)
            self._remember_chain(chain)
            return True
        if len(chain.rotations) <= held.seq:
            return False
        for rot in chain.rotations[held.seq :]:
            held.apply_rotation(rot, now=now)
        self._remember_chain(chain)
        return True

    def recompute_trust(self) -> TrustScores:
        """Run EigenTrust over the current graph and install the result in the policy."""
        for m in self.swim.members.values():
            self.trust.add_peer(m.peer_id)
        scores = self.trust.compute(self.pretrusted, now=self._wall())
        self.policy.update(scores)
        return scores

    def publish_trust_report(self) -> Row | None:
        """Publish this node's interaction counts as a signed ``trust_report`` row (if changed)."""
        edges = self.trust.outgoing(self.peer_id)
        if edges == self._reported:
            return None
        self._reported = edges
        return self.publish("trust_report", TrustReport(edges))

    def sync_now(self) -> str | None:
        """Start one exchange with a random live member this node syncs from; its peer id."""
        self.stats["rounds"] += 1
        self._expire_pending()
        peers = [
            m
            for m in self.swim.members.values()
            if m.status == "alive" and self._may_sync(m.peer_id)
        ]
        if not peers:
            return None
        m = self._rng.choice(peers)
        self._seq += 1
        while len(self._pending) >= self.config.max_pending:
            del self._pending[next(iter(self._pending))]
        self._pending[self._seq] = (m.peer_id, trio.current_time() + self.config.sync_timeout)
        digest = RowDigest(self._seq, self.fingerprint(), {}, False, True)
        self._send(PeerAddr(m.peer_id, m.addr), digest)
        return m.peer_id

    # -- lifecycle -----------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[RowSync] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the sync, trust and report timers until cancelled (the SwimNode runs apart)."""
        if self.swim.peer_id and self.swim.peer_id != self.peer_id:
            raise ValueError("the SwimNode's network speaks for another peer id")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sync_loop)
            nursery.start_soon(self._trust_loop)
            if self.trust_config.report_interval is not None:
                nursery.start_soon(self._report_loop, self.trust_config.report_interval)
            task_status.started(self)

    async def _sync_loop(self) -> None:
        while True:
            # Jitter so that nodes started together do not sync in lock step.
            await trio.sleep(self.config.sync_interval * self._rng.uniform(0.9, 1.1))
            self.sync_now()

    async def _trust_loop(self) -> None:
        while True:
            await trio.sleep(self.trust_config.recompute_interval)
            self.recompute_trust()

    async def _report_loop(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            try:
                self.publish_trust_report()
            except (LogFull, TooLarge) as exc:
                log.warning("trust report not published: %s", exc, extra=self._extra)

    # -- receiving -----------------------------------------------------------------------

    def handle(self, item: Inbound) -> bool:
        """SwimNode handler: take RowDigest and RowBatch messages, leave the rest."""
        sender = item.sender
        match item.msg:
            case RowDigest() as d:
                if sender.peer_id is not None:
                    self._on_digest(sender, d)
                return True
            case RowBatch() as b:
                if sender.peer_id is not None:
                    self._on_batch(sender.peer_id, b)
                return True
        return False

    def _on_digest(self, sender: PeerAddr, d: RowDigest) -> None:
        peer = sender.peer_id
        assert peer is not None
        self.stats["digests_in"] += 1
        self._answered(d.seq, peer)
        mine = self.fingerprint()
        if not d.full:
            if d.fingerprint == mine:
                self.stats["in_sync"] += 1
                if d.reply:
                    self._send(sender, RowDigest(d.seq, mine, {}, False, False))
            elif d.reply:
                self._send(sender, RowDigest(d.seq, mine, self.log.heads(), True, True))
            return
        self._send_missing(sender, d.heads, d.seq)
        if d.reply and self._may_sync(peer) and self._lacks(d.heads):
            self._send(sender, RowDigest(d.seq, mine, self.log.heads(), True, False))

    def _lacks(self, heads: dict[str, int]) -> bool:
        return any(h > self.log.head(o) for o, h in heads.items())

    def _on_batch(self, peer: str, batch: RowBatch) -> None:
        self.stats["batches_in"] += 1
        if not self._may_sync(peer):
            self.stats["not_synced_distrusted"] += 1
            return
        for chain in batch.chains:
            try:
                self.learn_chain(chain)
            except BadSignature as exc:
                self.stats["bad_chain"] += 1
                self._forgery(peer, f"bad key chain for {chain.peer_id}: {exc}")
                return
        now = int(self._wall())
        blocked: set[str] = set()
        accepted = 0
        for row in batch.rows[: self.config.max_batch_rows]:
            if row.origin in blocked:
                continue
            head = self.log.head(row.origin)
            if row.seq <= head:
                self.stats["duplicate"] += 1
                continue
            reason = self._refuse(row, head, peer, now)
            if reason == "forged":
                return
            if reason is not None:
                self.stats[reason] += 1
                blocked.add(row.origin)
                continue
            try:
                self.log.append(row)
            except LogFull:
                self.stats["log_full"] += 1
                blocked.add(row.origin)
                continue
            self.clock.update(row.hlc, sender=peer)
            accepted += 1
            self._notify(row)
        if accepted:
            self.stats["rows_accepted"] += accepted
            self.trust.record(self.peer_id, peer, satisfactory=1)

    def _refuse(self, row: Row, head: int, peer: str, now: int) -> str | None:
        """Why ``row`` is refused (a STAT_KEYS key), "forged", or None if it is valid."""
        if row.seq != head + 1:
            return "gap"
        if len(row.payload) > self.config.max_payload:
            return "too_large"
        try:
            self.clock.check(row.hlc, sender=peer)
        except ClockSkew:
            return "skew"
        try:
            self.keyring.verify(
                row.origin, row, row.signature, row.key_id, context=ROW_CONTEXT, now=now
            )
        except KeyExpired:
            return "expired_key"
        except UnknownKey:
            return "unknown_key"
        except BadSignature:
            self.stats["bad_signature"] += 1
            self._forgery(peer, f"row {row.origin}:{row.seq} has a bad signature")
            return "forged"
        return None

    def _forgery(self, peer: str, what: str) -> None:
        log.warning("forgery from peer: %s", what, extra={**self._extra, "sender": peer})
        self.trust.record(self.peer_id, peer, unsatisfactory=self.trust_config.forgery_penalty)

    def _notify(self, row: Row) -> None:
        if row.kind == "trust_report" and row.origin != self.peer_id:
            try:
                report = _REPORT_DECODER.decode(row.payload)
            except msgspec.DecodeError:
                self.stats["bad_payload"] += 1
            else:
                self.trust.set_report(row.origin, row.seq, report.edges)
        for hook in self.on_row:
            hook(row)

    # -- sending -------------------------------------------------------------------------

    def _send(self, to: PeerAddr, msg: MeshMessage) -> None:
        if not self.swim.net.send_nowait(to, msg):
            self.stats["send_dropped"] += 1

    def _send_missing(self, to: PeerAddr, their: dict[str, int], seq: int) -> None:
        """Send ``to`` the rows it lacks, bounded; never a gap within an origin."""
        c = self.config
        now = int(self._wall())
        origins = [o for o, h in self.log.heads().items() if h > their.get(o, 0)]
        if not origins:
            return
        self._rng.shuffle(origins)
        rows: list[Row] = []
        chains: list[KeyChain] = []
        size = 0
        more = False
        for origin in origins:
            chain = self._chains.get(origin)
            try:
                keys = self.keyring.get(origin)
            except UnknownKey:
                continue  # evicted from the bounded key ring: cannot vouch for its rows
            if chain is None:
                continue
            chain_size = _CHAIN_BASE + _CHAIN_PER_ROTATION * len(chain.rotations)
            if rows and size + chain_size > c.max_batch_bytes:
                more = True
                break
            start, taken = their.get(origin, 0), 0
            full = False
            while not full:
                chunk = self.log.rows_after(origin, start, min(64, c.max_batch_rows - len(rows)))
                if not chunk:
                    break
                for row in chunk:
                    try:
                        horizon = keys.trusted_until(row.key_id)
                    except UnknownKey:
                        horizon = 0  # a key dropped from the bounded key set: cannot vouch
                    if horizon <= now:
                        # The receiver would refuse it (expired key); stop this origin here
                        # rather than send its later rows across a gap.
                        full = True
                        break
                    sz = row_size(row)
                    if len(rows) >= c.max_batch_rows or (
                        rows and size + chain_size + sz > c.max_batch_bytes
                    ):
                        more = full = True
                        break
                    rows.append(row)
                    size += sz
                    taken += 1
                    start = row.seq
            if taken:
                chains.append(chain)
                size += chain_size
            if more:
                break
        if rows:
            self.stats["batches_out"] += 1
            self.stats["rows_out"] += len(rows)
            self._send(to, RowBatch(seq, rows, chains, more))

    # -- helpers -------------------------------------------------------------------------

    def _may_sync(self, peer: str) -> bool:
        return self.policy.sync_from(peer)

    def _answered(self, seq: int, peer: str) -> None:
        entry = self._pending.get(seq)
        if entry is not None and entry[0] == peer:
            del self._pending[seq]
            self.trust.record(self.peer_id, peer, satisfactory=1)

    def _expire_pending(self) -> None:
        now = trio.current_time()
        for seq, (peer, deadline) in list(self._pending.items()):
            if now >= deadline:
                del self._pending[seq]
                self.stats["timeouts"] += 1
                m = self.swim.members.get(peer)
                # Only a peer SWIM still holds alive is judged: an unreachable one is a
                # network problem (a partition), not behaviour.
                if self.trust_config.timeout_penalty and m is not None and m.status == "alive":
                    self.trust.record(
                        self.peer_id, peer, unsatisfactory=self.trust_config.timeout_penalty
                    )

    def _own_chain(self) -> KeyChain:
        return KeyChain(self.peer_id, self.identity.genesis_key, list(self.identity.rotations))

    def _remember_chain(self, chain: KeyChain) -> None:
        self._chains.pop(chain.peer_id, None)
        self._chains[chain.peer_id] = chain
        while len(self._chains) > self.config.max_origins:
            oldest = next(iter(self._chains))
            if oldest == self.peer_id:
                self._chains[oldest] = self._chains.pop(oldest)  # keep our own: move to end
                oldest = next(iter(self._chains))
            del self._chains[oldest]
