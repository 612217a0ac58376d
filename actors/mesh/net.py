"""What the membership protocol needs from a network, so one protocol runs on two networks.

:class:`~symbiote.actors.mesh.swim.SwimNode` talks to a :class:`Network`: the real
:class:`~symbiote.actors.mesh.transport.TcpTransport` or the in-memory
:class:`~symbiote.actors.mesh.memory.MemoryNetwork` used under ``trio.testing.MockClock``.
Sending never blocks the protocol: a message that cannot be queued is dropped and counted,
which SWIM tolerates by design (probes time out, gossip is repeated, push/pull repairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from symbiote.schema.mesh import MeshMessage

__all__ = ["Inbound", "Network", "PeerAddr", "parse_addr"]


@dataclass(frozen=True, slots=True)
class PeerAddr:
    """A peer as the network knows it: its id (None before the first contact) and address."""

    peer_id: str | None
    addr: str


@dataclass(frozen=True, slots=True)
class Inbound:
    """A received message; ``sender.peer_id`` is authenticated by the network."""

    sender: PeerAddr
    msg: MeshMessage


class Network(Protocol):
    """The send/receive surface of a mesh network."""

    @property
    def local(self) -> PeerAddr:
        """This node's peer id and advertised address."""
        ...

    @property
    def inbound(self) -> trio.MemoryReceiveChannel[Inbound]:
        """Messages received from peers (bounded; overflow is dropped and counted)."""
        ...

    def send_nowait(self, to: PeerAddr, msg: MeshMessage) -> bool:
        """Queue ``msg`` for ``to`` without waiting; False if it was dropped."""
        ...


def parse_addr(addr: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port") into host and port; ValueError if malformed."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port address: {addr!r}")
    return host.strip("[]"), int(port)
