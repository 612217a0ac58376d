"""Data contracts of the mesh: wire messages, identity records, configuration and errors.

Everything that crosses a mesh connection is one of the tagged msgspec structs in
:data:`MeshMessage`. Structs are ``array_like`` (encoded as MessagePack arrays whose first
element is the tag) because gossip is sent many times a second to many peers: field names on
the wire would roughly double the size of a probe. New fields may only be appended, with a
default, so that older nodes keep decoding newer frames.

Times in identity records are whole Unix seconds (int) so that their canonical encoding, which
is what gets signed, does not depend on float formatting.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from symbiote.schema.errors import ConfigError, SymbioteError, TooLarge

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Alive",
    "BadSignature",
    "Dead",
    "FrameError",
    "FrameTooLarge",
    "FrameTruncated",
    "Gossip",
    "HandshakeFailed",
    "Hello",
    "IdentityError",
    "InsecureKeyFile",
    "JoinFailed",
    "KeyExpired",
    "KeyFile",
    "KeyRotation",
    "MalformedFrame",
    "MemberState",
    "MemberStatus",
    "MeshError",
    "MeshMessage",
    "PeerKey",
    "PeerMismatch",
    "Ping",
    "PingReq",
    "PushPull",
    "PushPullReply",
    "Suspect",
    "SwimConfig",
    "TransportConfig",
    "UnknownKey",
    "UnknownMessageType",
    "Update",
]

#: Version of the mesh wire protocol, exchanged in :class:`Hello`.
PROTOCOL_VERSION = 1


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class MeshError(SymbioteError):
    """Base of every mesh error."""

    code = "mesh"


class IdentityError(MeshError):
    """A node key or key file cannot be used (unreadable, wrong format, wrong key type)."""

    code = "identity"


class InsecureKeyFile(IdentityError):
    """A private key file is readable or writable by group or others; it is refused."""

    code = "insecure_key_file"


class BadSignature(MeshError):
    """A signature does not verify against the key it claims."""

    code = "bad_signature"


class UnknownKey(BadSignature):
    """A signature names a key that is not known for its peer."""

    code = "unknown_key"


class KeyExpired(BadSignature):
    """A signature was checked against a key past its trust horizon."""

    code = "key_expired"


class FrameError(MeshError):
    """A frame from the network could not be turned into a message; the connection closes."""

    code = "frame"


class FrameTooLarge(FrameError, TooLarge):
    """A frame's declared length exceeds the cap; detected before the body is read."""

    code = "frame_too_large"


class FrameTruncated(FrameError):
    """The stream ended (or the body ran out) in the middle of a frame."""

    code = "frame_truncated"


class MalformedFrame(FrameError):
    """A frame's body is not valid MessagePack or does not match its message type."""

    code = "malformed_frame"


class UnknownMessageType(FrameError):
    """A frame carries a message tag this node does not know."""

    code = "unknown_message"


class HandshakeFailed(MeshError):
    """A connection could not be authenticated (wrong network key, bad certificate...)."""

    code = "handshake_failed"


class PeerMismatch(HandshakeFailed):
    """The authenticated peer is not the peer that was expected or claimed."""

    code = "peer_mismatch"


class JoinFailed(MeshError):
    """No seed address answered a join within the deadline."""

    code = "join_failed"


# --------------------------------------------------------------------------------------------
# Identity records
# --------------------------------------------------------------------------------------------


class PeerKey(msgspec.Struct, frozen=True, kw_only=True):
    """One public key of a peer with its validity window (``valid_until`` None = current key)."""

    key_id: str
    public_key: bytes
    valid_from: int
    valid_until: int | None = None


class KeyRotation(msgspec.Struct, frozen=True, kw_only=True, tag="key_rotation"):
    """A peer replaces ``old_key`` by ``new_key``; signed by the old key.

    ``seq`` counts rotations of this peer from 1, so that a verifier can refuse a rotation
    that does not extend the chain it holds. ``old_key_valid_until`` is when the old key stops
    being trusted for anything it signed (rows signed before the rotation stay verifiable
    until then).
    """

    peer_id: str
    seq: int
    old_key: bytes
    new_key: bytes
    issued_at: int
    old_key_valid_until: int
    signature: bytes = b""


class KeyFile(msgspec.Struct, kw_only=True):
    """On-disk format of a node identity (JSON; bytes are base64). Kept with mode 0600."""

    version: int = 1
    peer_id: str
    genesis_key: bytes
    private_key: bytes
    keys: list[PeerKey] = msgspec.field(default_factory=list)
    rotations: list[KeyRotation] = msgspec.field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Membership (SWIM) wire messages
# --------------------------------------------------------------------------------------------

MemberStatus = Literal["alive", "suspect", "dead"]


class MemberState(msgspec.Struct, frozen=True, array_like=True):
    """One row of a full state exchange (push/pull)."""

    peer_id: str
    addr: str
    incarnation: int
    status: MemberStatus


class Alive(msgspec.Struct, frozen=True, array_like=True, tag="a"):
    """``peer_id`` is alive at ``incarnation`` and reachable at ``addr``."""

    peer_id: str
    incarnation: int
    addr: str


class Suspect(msgspec.Struct, frozen=True, array_like=True, tag="s"):
    """``source`` suspects ``peer_id`` at ``incarnation`` (it missed a probe)."""

    peer_id: str
    incarnation: int
    source: str


class Dead(msgspec.Struct, frozen=True, array_like=True, tag="d"):
    """``source`` declares ``peer_id`` dead at ``incarnation``."""

    peer_id: str
    incarnation: int
    source: str


#: A membership update, piggybacked on probes and gossip.
Update = Alive | Suspect | Dead


class Hello(msgspec.Struct, frozen=True, array_like=True, tag="hello"):
    """First frame each side sends on a new connection, after the TLS handshake."""

    version: int
    peer_id: str
    addr: str
    mesh: str


class Ping(msgspec.Struct, frozen=True, array_like=True, tag="ping"):
    """Direct probe of ``target``; answered by an :class:`Ack` with the same ``seq``."""

    seq: int
    target: str
    updates: list[Update] = msgspec.field(default_factory=list)


class Ack(msgspec.Struct, frozen=True, array_like=True, tag="ack"):
    """Answer to a :class:`Ping` (or, relayed, to a :class:`PingReq`)."""

    seq: int
    updates: list[Update] = msgspec.field(default_factory=list)


class PingReq(msgspec.Struct, frozen=True, array_like=True, tag="ping_req"):
    """Ask the receiver to probe ``target`` and relay its ack under ``seq``."""

    seq: int
    target: str
    target_addr: str
    updates: list[Update] = msgspec.field(default_factory=list)


class Gossip(msgspec.Struct, frozen=True, array_like=True, tag="gossip"):
    """Updates pushed on the gossip timer, without a probe."""

    updates: list[Update]


class PushPull(msgspec.Struct, frozen=True, array_like=True, tag="push_pull"):
    """Full state sync request; ``join`` marks the first one a new node sends."""

    seq: int
    join: bool
    members: list[MemberState]


class PushPullReply(msgspec.Struct, frozen=True, array_like=True, tag="push_pull_reply"):
    """The receiver's full state, answering a :class:`PushPull`."""

    seq: int
    members: list[MemberState]


#: Every message a mesh connection may carry.
MeshMessage = Hello | Ping | Ack | PingReq | Gossip | PushPull | PushPullReply


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _positive(value: float, field: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"must be a finite number > 0, got {value!r}", field=field)


class TransportConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Limits and addresses of the TCP transport. Every buffer it implies is bounded here."""

    host: str = "127.0.0.1"
    port: int = 0
    #: "host:port" announced to peers; defaults to the bound address.
    advertise: str | None = None
    #: Mesh name exchanged in Hello; a mismatch fails the connection.
    mesh: str = "default"
    max_frame: int = 1 << 20
    max_connections: int = 256
    send_queue: int = 128
    inbound_queue: int = 1024
    handshake_timeout: float = 5.0
    dial_timeout: float = 3.0
    #: A connection with no traffic either way for this long is closed.
    idle_timeout: float = 120.0
    #: Per-peer token bucket: sustained frames per second and burst size.
    rate_per_s: float = 500.0
    rate_burst: int = 1000

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("must be in 0..65535", field="port")
        if not 64 <= self.max_frame <= 64 << 20:
            raise ConfigError("must be in 64 B..64 MiB", field="max_frame")
        for name in ("max_connections", "send_queue", "inbound_queue", "rate_burst"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", field=name)
        for name in ("handshake_timeout", "dial_timeout", "idle_timeout", "rate_per_s"):
            _positive(getattr(self, name), name)


class SwimConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Timers and limits of SWIM membership; defaults are memberlist's LAN profile."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    #: k: members asked to probe indirectly when a direct probe fails.
    indirect_checks: int = 3
    #: Suspicion timeout at its maximum = mult x max(1, log10 N) x probe_interval.
    suspicion_mult: float = 4.0
    #: Lifeguard: with enough independent confirmations the timeout shrinks to max x this.
    suspicion_min_fraction: float = 0.25
    #: Retransmits per update = mult x ceil(log10(N + 1)).
    retransmit_mult: int = 4
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    push_pull_interval: float = 30.0
    #: Every this many seconds, try a push/pull with one dead member so partitions heal.
    reconnect_interval: float = 10.0
    #: Dead members are forgotten (and no longer retried) after this many seconds.
    dead_reclaim_time: float = 3600.0
    join_timeout: float = 5.0
    #: Hard caps: members tracked, updates per message, queued broadcasts, relayed probes.
    max_members: int = 4096
    max_piggyback: int = 16
    max_broadcasts: int = 4096
    max_relays: int = 64

    def __post_init__(self) -> None:
        for name in (
            "probe_interval",
            "probe_timeout",
            "suspicion_mult",
            "gossip_interval",
            "push_pull_interval",
            "reconnect_interval",
            "dead_reclaim_time",
            "join_timeout",
        ):
            _positive(getattr(self, name), name)
        if self.probe_timeout >= self.probe_interval:
            raise ConfigError("must be shorter than probe_interval", field="probe_timeout")
        if not 0 < self.suspicion_min_fraction <= 1:
            raise ConfigError("must be in (0, 1]", field="suspicion_min_fraction")
        for name in (
            "indirect_checks",
            "retransmit_mult",
            "gossip_nodes",
            "max_members",
            "max_piggyback",
            "max_broadcasts",
            "max_relays",
        ):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", field=name)
