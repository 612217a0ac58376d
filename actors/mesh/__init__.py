"""symbiote.actors.mesh: the mesh between supervisors (foundations of issue 6).

- :mod:`~symbiote.actors.mesh.identity`: Ed25519 node identity, peer ids, rotation, signing.
- :mod:`~symbiote.actors.mesh.frames`: length-prefixed, size-capped MessagePack frames.
- :mod:`~symbiote.actors.mesh.pki`: the per-mesh CA (network key) and node certificates.
- :mod:`~symbiote.actors.mesh.transport`: TLS 1.3 over TCP on trio, bounded everywhere.
- :mod:`~symbiote.actors.mesh.memory`: an in-memory network for MockClock simulations.
- :mod:`~symbiote.actors.mesh.swim`: SWIM membership with Lifeguard suspicion.

Wire messages, records, configuration and errors live in :mod:`symbiote.schema.mesh`.
See docs/mesh.md.
"""

from symbiote.actors.mesh.broadcast import BroadcastQueue
from symbiote.actors.mesh.frames import FrameCodec, FrameReader, FrameStats, receive_frame
from symbiote.actors.mesh.identity import (
    MAX_KEY_TRUST,
    KeyRing,
    NodeIdentity,
    PeerKeys,
    canonical_bytes,
    key_id_for,
    peer_id_for,
    verify_with_key,
)
from symbiote.actors.mesh.memory import MemoryEndpoint, MemoryNetwork
from symbiote.actors.mesh.net import Inbound, Network, PeerAddr, parse_addr
from symbiote.actors.mesh.pki import MeshCA, NodeCredentials, peer_from_certificate
from symbiote.actors.mesh.ratelimit import BucketTable, TokenBucket
from symbiote.actors.mesh.suspicion import (
    Suspicion,
    expected_confirmations,
    push_pull_scale,
    retransmit_limit,
    suspicion_bounds,
)
from symbiote.actors.mesh.swim import Member, MemberEvent, SwimNode
from symbiote.actors.mesh.transport import TcpTransport, open_tcp_transport

__all__ = [
    "MAX_KEY_TRUST",
    "BroadcastQueue",
    "BucketTable",
    "FrameCodec",
    "FrameReader",
    "FrameStats",
    "Inbound",
    "KeyRing",
    "Member",
    "MemberEvent",
    "MemoryEndpoint",
    "MemoryNetwork",
    "MeshCA",
    "Network",
    "NodeCredentials",
    "NodeIdentity",
    "PeerAddr",
    "PeerKeys",
    "Suspicion",
    "SwimNode",
    "TcpTransport",
    "TokenBucket",
    "canonical_bytes",
    "expected_confirmations",
    "key_id_for",
    "open_tcp_transport",
    "parse_addr",
    "peer_from_certificate",
    "peer_id_for",
    "push_pull_scale",
    "receive_frame",
    "retransmit_limit",
    "suspicion_bounds",
    "verify_with_key",
]
