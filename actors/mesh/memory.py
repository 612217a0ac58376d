"""An in-memory :class:`~symbiote.actors.mesh.net.Network` for simulations and unit tests.

Delivery is immediate and ordered, so under ``trio.testing.MockClock(autojump_threshold=0)``
a whole mesh runs in virtual time: protocol timers decide everything, never CPU speed.
Crashes and partitions are simulated by dropping messages.
"""

from __future__ import annotations

import logging
import random

import msgspec
import trio

from symbiote.actors.mesh.net import Inbound, PeerAddr
from symbiote.schema.mesh import MeshMessage

__all__ = ["MemoryEndpoint", "MemoryNetwork"]

log = logging.getLogger(__name__)


class MemoryEndpoint:
    """One node's attachment to a :class:`MemoryNetwork`."""

    def __init__(self, net: MemoryNetwork, peer_id: str, addr: str, queue: int) -> None:
        self._net = net
        self._local = PeerAddr(peer_id, addr)
        self._tx, self._rx = trio.open_memory_channel[Inbound](queue)
        self.sent = 0
        self.dropped = 0
        #: Bytes this endpoint sent (only counted when the network has ``measure_bytes``).
        self.bytes_sent = 0

    @property
    def local(self) -> PeerAddr:
        """This endpoint's peer id and address."""
        return self._local

    @property
    def inbound(self) -> trio.MemoryReceiveChannel[Inbound]:
        """Messages delivered to this endpoint."""
        return self._rx

    def send_nowait(self, to: PeerAddr, msg: MeshMessage) -> bool:
        """Deliver ``msg`` at once, unless the target is down, cut off or full."""
        ok = self._net._deliver(self._local, to, msg)
        if ok:
            self.sent += 1
            if self._net.measure_bytes:
                # What the TCP transport would put on the wire: 4-byte length + MessagePack
                # (TLS record overhead, ~22 bytes per record, is not included).
                self.bytes_sent += 4 + len(self._net._encoder.encode(msg))
        else:
            self.dropped += 1
        return ok

    def _put(self, item: Inbound) -> bool:
        try:
            self._tx.send_nowait(item)
        except trio.WouldBlock:
            return False
        return True


class MemoryNetwork:
    """A switch between endpoints, addressed by ``addr``; with crash and partition controls."""

    def __init__(
        self,
        *,
        queue: int = 1024,
        loss: float = 0.0,
        rng: random.Random | None = None,
        measure_bytes: bool = False,
    ) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        self._queue = queue
        #: Count encoded bytes per endpoint (costs an encode per message; benchmarks only).
        self.measure_bytes = measure_bytes
        self._encoder = msgspec.msgpack.Encoder()
        #: Probability that any one message is lost (a lossy LAN).
        self.loss = loss
        self._rng = rng if rng is not None else random.Random()
        self.lost = 0
        self._by_addr: dict[str, MemoryEndpoint] = {}
        self._down: set[str] = set()
        self._cut: set[frozenset[str]] = set()
        self.messages = 0

    def endpoint(self, peer_id: str, addr: str) -> MemoryEndpoint:
        """Attach (or re-attach, after a restart) a node at ``addr``."""
        ep = MemoryEndpoint(self, peer_id, addr, self._queue)
        self._by_addr[addr] = ep
        self._down.discard(addr)
        return ep

    def crash(self, addr: str) -> None:
        """The node at ``addr`` neither sends nor receives any more."""
        self._down.add(addr)

    def partition(self, side_a: set[str], side_b: set[str]) -> None:
        """Drop all traffic between the two sets of addresses."""
        for a in side_a:
            for b in side_b:
                self._cut.add(frozenset((a, b)))

    def heal(self) -> None:
        """Remove every partition."""
        self._cut.clear()

    def _deliver(self, src: PeerAddr, to: PeerAddr, msg: MeshMessage) -> bool:
        if src.addr in self._down or to.addr in self._down:
            return False
        if frozenset((src.addr, to.addr)) in self._cut:
            return False
        if self.loss and self._rng.random() < self.loss:
            self.lost += 1
            return True  # lost in flight: the sender cannot tell
        ep = self._by_addr.get(to.addr)
        if ep is None or (to.peer_id is not None and to.peer_id != ep.local.peer_id):
            return False
        self.messages += 1
        return ep._put(Inbound(src, msg))
