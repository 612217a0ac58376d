"""symbiote.actors.mesh: the mesh between supervisors (issue 6).

- :mod:`~symbiote.actors.mesh.identity`: Ed25519 node identity, peer ids, rotation, signing.
- :mod:`~symbiote.actors.mesh.frames`: length-prefixed, size-capped MessagePack frames.
- :mod:`~symbiote.actors.mesh.pki`: the per-mesh CA (network key) and node certificates.
- :mod:`~symbiote.actors.mesh.transport`: TLS 1.3 over TCP on trio, bounded everywhere.
- :mod:`~symbiote.actors.mesh.memory`: an in-memory network for MockClock simulations.
- :mod:`~symbiote.actors.mesh.swim`: SWIM membership with Lifeguard suspicion.
- :mod:`~symbiote.actors.mesh.hlc`: hybrid logical clock with a clock-skew bound.
- :mod:`~symbiote.actors.mesh.rows`: signed rows and the bounded row log (:class:`RowLog`).
- :mod:`~symbiote.actors.mesh.antientropy`: Scuttlebutt anti-entropy of rows (:class:`RowSync`).
- :mod:`~symbiote.actors.mesh.trust`: EigenTrust and the trust policy.
- :mod:`~symbiote.actors.mesh.bootstrap`: ``.well-known/egregora-peers.json``.
- :mod:`~symbiote.actors.mesh.grants`: grants as signed rows, and their checks.
- :mod:`~symbiote.actors.mesh.federation`: federated search (asking, answering, redaction).
- :mod:`~symbiote.actors.mesh.store`: the row log persisted write-behind, and loading it.
- :mod:`~symbiote.actors.mesh.actor`: the mesh actor (import it from its module; the
  composition root wires it into the supervision tree).

Wire messages, records, configuration and errors live in :mod:`symbiote.schema.mesh`.
See docs/mesh.md.
"""

from symbiote.actors.mesh.antientropy import RowSync
from symbiote.actors.mesh.bootstrap import (
    BOOTSTRAP_PATH,
    Bootstrap,
    join_from_bootstrap,
    load_bootstrap,
    parse_bootstrap,
)
from symbiote.actors.mesh.broadcast import BroadcastQueue
from symbiote.actors.mesh.federation import (
    Federation,
    FederationConfig,
    LocalHit,
    LocalSearch,
    redact_hit,
)
from symbiote.actors.mesh.frames import FrameCodec, FrameReader, FrameStats, receive_frame
from symbiote.actors.mesh.grants import GrantBook
from symbiote.actors.mesh.hlc import HybridClock
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
from symbiote.actors.mesh.rows import (
    ROW_CONTEXT,
    MemoryRowLog,
    RowLog,
    digest_fingerprint,
    row_size,
    sign_row,
)
from symbiote.actors.mesh.store import PersistentRowLog
from symbiote.actors.mesh.suspicion import (
    Suspicion,
    expected_confirmations,
    push_pull_scale,
    retransmit_limit,
    suspicion_bounds,
)
from symbiote.actors.mesh.swim import Member, MemberEvent, SwimNode
from symbiote.actors.mesh.transport import TcpTransport, open_tcp_transport
from symbiote.actors.mesh.trust import TrustGraph, TrustPolicy, TrustScores, eigentrust

__all__ = [
    "BOOTSTRAP_PATH",
    "MAX_KEY_TRUST",
    "ROW_CONTEXT",
    "Bootstrap",
    "BroadcastQueue",
    "BucketTable",
    "Federation",
    "FederationConfig",
    "FrameCodec",
    "FrameReader",
    "FrameStats",
    "GrantBook",
    "HybridClock",
    "Inbound",
    "KeyRing",
    "LocalHit",
    "LocalSearch",
    "Member",
    "MemberEvent",
    "MemoryEndpoint",
    "MemoryNetwork",
    "MemoryRowLog",
    "MeshCA",
    "Network",
    "NodeCredentials",
    "NodeIdentity",
    "PeerAddr",
    "PeerKeys",
    "PersistentRowLog",
    "RowLog",
    "RowSync",
    "Suspicion",
    "SwimNode",
    "TcpTransport",
    "TokenBucket",
    "TrustGraph",
    "TrustPolicy",
    "TrustScores",
    "canonical_bytes",
    "digest_fingerprint",
    "eigentrust",
    "expected_confirmations",
    "join_from_bootstrap",
    "key_id_for",
    "load_bootstrap",
    "open_tcp_transport",
    "parse_addr",
    "parse_bootstrap",
    "peer_from_certificate",
    "peer_id_for",
    "push_pull_scale",
    "receive_frame",
    "redact_hit",
    "retransmit_limit",
    "row_size",
    "sign_row",
    "suspicion_bounds",
    "verify_with_key",
]
