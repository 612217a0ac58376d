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

import datetime as _dt
import math
import re
from typing import Annotated, Any, Final, Literal

import msgspec

from symbiote.schema.errors import BadArgument, ConfigError, SymbioteError, TooLarge
from symbiote.schema.search import SearchFilter

__all__ = [
    "MESH_DDL",
    "PEER_ID_PATTERN",
    "PROTOCOL_VERSION",
    "REDACTABLE_FIELDS",
    "Ack",
    "Alive",
    "BadSignature",
    "BootstrapError",
    "BootstrapFile",
    "BootstrapPeer",
    "ClockSkew",
    "Dead",
    "FedHit",
    "FedHits",
    "FedRefused",
    "FedSearch",
    "FederatedHits",
    "FrameError",
    "FrameTooLarge",
    "FrameTruncated",
    "Gossip",
    "Grant",
    "GrantDenied",
    "GrantRecord",
    "HandshakeFailed",
    "Hello",
    "Hlc",
    "IdentityError",
    "InsecureKeyFile",
    "JoinFailed",
    "KeyChain",
    "KeyExpired",
    "KeyFile",
    "KeyRotation",
    "LogFull",
    "MalformedFrame",
    "MemberInfo",
    "MemberState",
    "MemberStatus",
    "MeshError",
    "MeshHit",
    "MeshInfo",
    "MeshMessage",
    "PeerKey",
    "PeerKeyRecord",
    "PeerMismatch",
    "PeerRecord",
    "Ping",
    "PingReq",
    "Published",
    "PushPull",
    "PushPullReply",
    "RefusalCode",
    "Row",
    "RowBatch",
    "RowDigest",
    "RowGap",
    "RowSyncConfig",
    "Suspect",
    "SwimConfig",
    "TransportConfig",
    "TrustConfig",
    "TrustEdgeRecord",
    "TrustReport",
    "TrustScoreRecord",
    "UnknownKey",
    "UnknownMessageType",
    "Update",
    "check_grant",
    "check_redact_fields",
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


class ClockSkew(MeshError):
    """A timestamp is further ahead of the local clock than the configured bound."""

    code = "clock_skew"


class RowGap(MeshError):
    """A row does not directly follow its origin's highest held seq (it would leave a gap)."""

    code = "row_gap"


class LogFull(MeshError):
    """The row log (or one origin's share of it) is at its limit; the row is refused."""

    code = "log_full"


class BootstrapError(MeshError):
    """A bootstrap file (``.well-known/egregora-peers.json``) is unreadable or invalid."""

    code = "bootstrap"


class GrantDenied(MeshError):
    """A grant does not allow what a peer asked; ``reason`` is a :data:`RefusalCode`."""

    code = "grant_denied"

    def __init__(self, message: str, *, reason: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.reason = reason


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


# --------------------------------------------------------------------------------------------
# Replicated rows and anti-entropy wire messages
# --------------------------------------------------------------------------------------------

#: Caps checked while decoding (msgspec refuses a longer list/map/string before building it).
MAX_BATCH_ROWS = 4096
MAX_DIGEST_ORIGINS = 65536
MAX_CHAIN = 64
MAX_KIND = 32


class Hlc(msgspec.Struct, frozen=True, array_like=True, order=True):
    """A hybrid logical clock reading: Unix milliseconds and a logical counter.

    Ordered as the tuple ``(wall_ms, logical)``. ``wall_ms`` stays within the configured skew of
    physical time, so an HLC reads as a timestamp while still ordering causally related events.
    """

    wall_ms: int
    logical: int = 0


class Row(msgspec.Struct, frozen=True, array_like=True):
    """One replicated row, signed by its origin; ``(origin, seq)`` identifies it mesh-wide.

    ``seq`` counts the origin's rows from 1 without gaps. The signature (context ``"row"``)
    covers every other field, ``key_id`` included, so a relay can change nothing.
    """

    origin: str
    seq: int
    hlc: Hlc
    kind: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KIND)]
    payload: bytes
    key_id: str
    signature: bytes = b""


class KeyChain(msgspec.Struct, frozen=True, array_like=True):
    """What a verifier needs for an origin's keys: its genesis key and rotation chain.

    Self-certifying (the genesis key derives the peer id, each rotation is signed by the key
    it replaces), so it may travel through untrusted relays with the rows.
    """

    peer_id: str
    genesis_key: bytes
    rotations: Annotated[list[KeyRotation], msgspec.Meta(max_length=MAX_CHAIN)] = msgspec.field(
        default_factory=list
    )


class RowDigest(msgspec.Struct, frozen=True, array_like=True, tag="row_digest"):
    """Scuttlebutt digest: ``{origin: highest contiguous seq}``, or only its fingerprint.

    ``full`` False = compact form (fingerprint only, ``heads`` empty): in steady state two
    nodes exchange 16 bytes of digest, whatever the mesh size. ``reply`` asks the receiver to
    answer with its own digest.
    """

    seq: int
    fingerprint: bytes
    heads: Annotated[dict[str, int], msgspec.Meta(max_length=MAX_DIGEST_ORIGINS)]
    full: bool
    reply: bool


class RowBatch(msgspec.Struct, frozen=True, array_like=True, tag="row_batch"):
    """Rows the receiver lacks, in seq order per origin, with the key chains to verify them.

    ``more`` says the sender held back rows because of the per-message bounds; they follow in
    a later round.
    """

    seq: int
    rows: Annotated[list[Row], msgspec.Meta(max_length=MAX_BATCH_ROWS)]
    chains: Annotated[list[KeyChain], msgspec.Meta(max_length=MAX_BATCH_ROWS)]
    more: bool


class TrustReport(msgspec.Struct, frozen=True, array_like=True, tag="trust_report"):
    """Payload of a ``trust_report`` row: the origin's interaction counts with other peers.

    ``edges`` maps a peer id to ``[satisfactory, unsatisfactory]``. The latest report of an
    origin replaces its earlier ones in every node's trust graph.
    """

    edges: dict[str, tuple[int, int]]


class Grant(msgspec.Struct, frozen=True, kw_only=True, tag="grant"):
    """Payload of a ``grant`` row: ``grantee`` may use ``permissions`` on rows tagged ``tags``.

    The row carrying it is signed by the granter (its origin); ``expires_at`` is Unix seconds.
    The latest grant row of a granter for a grantee replaces its earlier ones (publish one
    with ``permissions=[]`` to revoke). Checked with :func:`check_grant` before publishing;
    enforced by the granter when it answers a federated search (docs/mesh.md, "Grants").
    """

    grantee: str
    tags: list[str]
    permissions: list[Literal["search", "read"]]
    expires_at: int
    redact: list[str] = msgspec.field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Federated search wire messages
# --------------------------------------------------------------------------------------------

#: Caps checked while decoding search messages.
MAX_GRANT_TAGS = 64
MAX_TAG_CHARS = 200
MAX_FED_HITS = 1000
MAX_REDACT_FIELDS = 32
#: Fields a granter may redact from what it answers: whole fields, or one metadata key
#: (``metadata.<key>``). ``authors`` also blanks the authors' names inside text and title.
REDACTABLE_FIELDS: Final = frozenset({"authors", "title", "text", "metadata"})
_METADATA_FIELD = re.compile(r"^metadata\.[A-Za-z_][A-Za-z0-9_]{0,63}$")
PEER_ID_PATTERN: Final = "^[a-z2-7]{32}$"
_PEER_ID = re.compile(PEER_ID_PATTERN)


class FedSearch(msgspec.Struct, frozen=True, array_like=True, tag="fed_search"):
    """Ask a granter for its nearest chunks, within the tags it granted the asker.

    ``vector`` is the query as little-endian float32 (``dim`` x 4 bytes); ``tags`` narrows the
    grant's scope (empty: the whole grant); ``deadline_ms`` is how long the asker waits, which
    also bounds the answerer's own work. ``where`` narrows further (AND); it can never widen
    the scope, which the answerer imposes on ``tags`` itself.
    """

    qid: int
    vector: bytes
    k: int
    tags: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=MAX_TAG_CHARS)]],
        msgspec.Meta(max_length=MAX_GRANT_TAGS),
    ]
    deadline_ms: int
    where: SearchFilter | None = None


class FedHit(msgspec.Struct, frozen=True, array_like=True):
    """One hit of a federated answer, already redacted by the answering peer.

    A redacted field is None. The origin is not on the wire: the asker takes it from the
    authenticated connection the answer came on, so a peer cannot answer in another's name.
    """

    chunk_id: str
    document_id: str
    distance: float
    text: str | None = None
    title: str | None = None
    authors: list[str] | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None


class FedHits(msgspec.Struct, frozen=True, array_like=True, tag="fed_hits"):
    """A granter's answer to :class:`FedSearch` ``qid``: hits, nearest first, and redactions."""

    qid: int
    hits: Annotated[list[FedHit], msgspec.Meta(max_length=MAX_FED_HITS)]
    redacted: Annotated[list[str], msgspec.Meta(max_length=MAX_REDACT_FIELDS)] = msgspec.field(
        default_factory=list
    )


#: Reasons a peer refuses a federated search (``FedRefused.code``).
RefusalCode = Literal[
    "distrusted",
    "no_grant",
    "expired",
    "not_permitted",
    "out_of_scope",
    "bad_request",
    "busy",
    "unavailable",
]


class FedRefused(msgspec.Struct, frozen=True, array_like=True, tag="fed_refused"):
    """A peer will not answer :class:`FedSearch` ``qid``; ``code`` says why (``RefusalCode``)."""

    qid: int
    code: str
    message: str
    field: str | None = None


#: Every message a mesh connection may carry.
MeshMessage = (
    Hello
    | Ping
    | Ack
    | PingReq
    | Gossip
    | PushPull
    | PushPullReply
    | RowDigest
    | RowBatch
    | FedSearch
    | FedHits
    | FedRefused
)


def check_grant(grant: Grant, *, now: int, granter: str | None = None) -> None:
    """Refuse a grant that is malformed or already expired, with a BadArgument naming the field.

    Tags: 1..64 distinct non-empty strings of at most 200 characters. Permissions: at least
    one. ``redact``: names from :data:`REDACTABLE_FIELDS` or ``metadata.<key>``. The grantee
    must be a peer id other than ``granter``.
    """
    if not isinstance(grant.grantee, str) or not _PEER_ID.match(grant.grantee):
        raise BadArgument("must be a peer id (32 characters a-z, 2-7)", field="grantee")
    if granter is not None and grant.grantee == granter:
        raise BadArgument("a node cannot grant itself", field="grantee")
    if not grant.tags or len(grant.tags) > MAX_GRANT_TAGS:
        raise BadArgument(f"must list 1..{MAX_GRANT_TAGS} tags", field="tags")
    for i, tag in enumerate(grant.tags):
        if not isinstance(tag, str) or not tag or len(tag) > MAX_TAG_CHARS:
            raise BadArgument(
                f"must be a non-empty string of at most {MAX_TAG_CHARS} characters",
                field=f"tags[{i}]",
            )
    if len(set(grant.tags)) != len(grant.tags):
        raise BadArgument("lists a tag twice", field="tags")
    for i, perm in enumerate(grant.permissions):
        if perm not in ("search", "read"):
            raise BadArgument(f"unknown permission {perm!r:.40}", field=f"permissions[{i}]")
    if not isinstance(grant.expires_at, int) or grant.expires_at <= now:
        raise BadArgument("must be a Unix time (s) in the future", field="expires_at")
    if len(grant.redact) > MAX_REDACT_FIELDS:
        raise BadArgument(f"more than {MAX_REDACT_FIELDS} fields", field="redact")
    for i, name in enumerate(grant.redact):
        if name not in REDACTABLE_FIELDS and not _METADATA_FIELD.match(name):
            raise BadArgument(
                f"unknown field {name!r:.70}; expected one of "
                f"{', '.join(sorted(REDACTABLE_FIELDS))} or metadata.<key>",
                field=f"redact[{i}]",
            )


def check_redact_fields(fields: list[str] | tuple[str, ...], field: str) -> None:
    """Refuse a redaction list with unknown names (see :data:`REDACTABLE_FIELDS`)."""
    for name in fields:
        if name not in REDACTABLE_FIELDS and not _METADATA_FIELD.match(name):
            raise ConfigError(
                f"unknown field {name!r:.70}; expected one of "
                f"{', '.join(sorted(REDACTABLE_FIELDS))} or metadata.<key>",
                field=field,
            )


# --------------------------------------------------------------------------------------------
# What the mesh answers to callers of the runtime
# --------------------------------------------------------------------------------------------


class MeshHit(msgspec.Struct, frozen=True, kw_only=True):
    """One hit of a federated search, with the peer it came from (``origin``).

    ``origin`` is the authenticated peer that answered (this node's own id for local hits).
    Fields the origin redacted are None.
    """

    origin: str
    chunk_id: str
    document_id: str
    distance: float
    text: str | None = None
    title: str | None = None
    authors: list[str] | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None


class FederatedHits(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a federated search: hits from every peer that answered, merged by distance.

    ``asked``: peers the query went to. ``answered``: those that answered in time (this node
    included when it searched locally). ``missing``: asked, no answer by the deadline (not
    waited for). ``refused``: peer -> reason (a ``RefusalCode``, or ``unreachable``).
    ``redacted``: peer -> fields it redacted. ``elapsed_ms``: wall time of the whole search.
    """

    hits: list[MeshHit]
    asked: list[str]
    answered: list[str]
    missing: list[str]
    refused: dict[str, str]
    redacted: dict[str, list[str]]
    elapsed_ms: float

    def __len__(self) -> int:
        return len(self.hits)


class Published(msgspec.Struct, frozen=True, kw_only=True):
    """A row this node published: its id in the mesh (``origin``, ``seq``) and its HLC."""

    origin: str
    seq: int
    kind: str
    hlc: Hlc


class MemberInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One member as this node sees it; ``trust`` is its EigenTrust score x N (None: unknown)."""

    peer_id: str
    addr: str
    status: MemberStatus
    incarnation: int
    trust: float | None = None


class MeshInfo(msgspec.Struct, frozen=True, kw_only=True):
    """This node in the mesh: identity, address, counts and counters."""

    peer_id: str
    addr: str
    mesh: str
    members_alive: int
    rows: int
    origins: int
    persist_backlog: int
    rows_persisted: int
    grants_to_me: list[str]
    stats: dict[str, int]


# --------------------------------------------------------------------------------------------
# Records the mesh actor persists through the writer (schema.messages.PersistMesh)
# --------------------------------------------------------------------------------------------


class PeerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A row of ``peers``. ``genesis_key`` is empty until the peer's key chain is known."""

    peer_id: str
    addrs: list[str]
    status: Literal["alive", "suspect", "dead", "left"]
    incarnation: int
    genesis_key: bytes
    pretrusted: bool
    seen_at: _dt.datetime


class PeerKeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A row of ``peer_keys``: one key of a peer's chain (``rotation_seq`` 0 = the genesis key).

    ``rotation`` is the MessagePack of the :class:`KeyRotation` that introduced the key (None
    for the genesis key): enough to rebuild and re-verify the chain at start.
    """

    peer_id: str
    key_id: str
    public_key: bytes
    rotation_seq: int
    valid_from: int
    expired_at: int | None = None
    rotation: bytes | None = None


class TrustEdgeRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A row of ``trust_edges``: this node's first-hand interaction counts with a peer."""

    from_peer: str
    to_peer: str
    satisfactory: int
    unsatisfactory: int


class TrustScoreRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A row of ``trust_scores`` (the latest computation replaces the earlier ones)."""

    peer_id: str
    score: float


class GrantRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A row of ``grants``: a grant row decoded, with the signature of the row carrying it."""

    granter: str
    grantee: str
    row_seq: int
    tags: list[str]
    permissions: list[str]
    redact: list[str]
    expires_at: int
    signature: bytes


# --------------------------------------------------------------------------------------------
# Bootstrap file: .well-known/egregora-peers.json
# --------------------------------------------------------------------------------------------

_PEER_ID_PATTERN = PEER_ID_PATTERN


class BootstrapPeer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One entry of a bootstrap file."""

    #: 32 lower-case base32 characters (see docs/mesh.md, "Identity").
    peer_id: Annotated[str, msgspec.Meta(pattern=_PEER_ID_PATTERN)]
    #: "host:port" addresses to try, in order.
    addrs: Annotated[list[str], msgspec.Meta(min_length=1, max_length=8)]
    #: The genesis public key (32 bytes, base64). When present it must derive ``peer_id``.
    public_key: bytes | None = None
    #: Operator's choice: anchor EigenTrust in this peer.
    pretrusted: bool = False
    name: Annotated[str, msgspec.Meta(max_length=200)] = ""


class BootstrapFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``.well-known/egregora-peers.json``: who to contact first, and whom to trust a priori."""

    version: Literal[1]
    #: Must equal the transport's mesh name.
    mesh: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    peers: Annotated[list[BootstrapPeer], msgspec.Meta(min_length=1, max_length=1024)]


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
    #: Times each member sends one update = ceil(mult x ln(N + 1)): 16 at N = 50, where some
    #: member misses an update with probability ~N^(1 - mult) (see ``retransmit_limit``).
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


class RowSyncConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Anti-entropy timers and bounds, the row log's limits and the HLC skew bound."""

    #: Every this many seconds, start one digest exchange with one random live member.
    sync_interval: float = 1.0
    #: No answer to a digest within this ⇒ a timeout, recorded as trust evidence.
    sync_timeout: float = 2.0
    #: Per message: at most this many rows and (estimated encoded) bytes; the rest next round.
    max_batch_rows: int = 256
    max_batch_bytes: int = 256 * 1024
    #: Largest payload a row may carry (refused on publish and on receipt).
    max_payload: int = 64 * 1024
    #: Rows whose HLC is further ahead of local physical time than this are refused.
    max_skew: float = 60.0
    #: Row log limits: total rows, rows per origin, distinct origins. At a limit new rows are
    #: refused (counted ``log_full``) and the sender's digest keeps asking for them later.
    max_rows: int = 1_000_000
    max_rows_per_origin: int = 100_000
    max_origins: int = 4096
    #: Digest exchanges awaiting an answer (one per round is started; older ones expire).
    max_pending: int = 64

    def __post_init__(self) -> None:
        for name in ("sync_interval", "sync_timeout", "max_skew"):
            _positive(getattr(self, name), name)
        if not 1 <= self.max_batch_rows <= MAX_BATCH_ROWS:
            raise ConfigError(f"must be in 1..{MAX_BATCH_ROWS}", field="max_batch_rows")
        for name in (
            "max_batch_bytes",
            "max_payload",
            "max_rows",
            "max_rows_per_origin",
            "max_origins",
            "max_pending",
        ):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", field=name)
        if self.max_payload + 512 > self.max_batch_bytes:
            raise ConfigError("must leave room for one row of max_payload", field="max_batch_bytes")


class TrustConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """EigenTrust parameters and the two policy thresholds.

    Thresholds are relative to the uniform score ``1/N`` (1.0 = an average peer), so they mean
    the same in a mesh of 10 and of 1,000. They only apply to peers with at least
    ``min_evidence`` interactions reported about them: a newcomer nobody has dealt with yet is
    neither trusted nor distrusted.
    """

    #: Weight of the pre-trusted distribution in every iteration (EigenTrust's ``a``).
    pretrust_weight: float = 0.15
    epsilon: float = 1e-6
    max_iterations: int = 1000
    #: Below this (x 1/N) a peer is no longer synced from.
    sync_threshold: float = 0.05
    #: Below this (x 1/N) a peer's frames are dropped.
    drop_threshold: float = 0.005
    min_evidence: int = 1
    #: Unsatisfactory interactions recorded for one forged signature.
    forgery_penalty: int = 10
    #: ... for one exchange left unanswered while SWIM still held the peer alive. 0 by
    #: default: across a partition every honest peer times out before SWIM notices, and
    #: letting that lower trust turned a healed partition into a permanent split (both sides
    #: dropping each other's frames) in the partition test. Raise it to punish free riders.
    timeout_penalty: int = 0
    #: Peers in the trust graph (a dense N x N float64 matrix: 1,024 peers = 8 MiB).
    max_peers: int = 1024
    #: Seconds between recomputations inside a running replicator.
    recompute_interval: float = 10.0
    #: Seconds between this node's signed trust reports (only sent when its counts changed);
    #: None: never publish.
    report_interval: float | None = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.pretrust_weight < 1:
            raise ConfigError("must be in (0, 1)", field="pretrust_weight")
        if not 0 < self.epsilon < 1:
            raise ConfigError("must be in (0, 1)", field="epsilon")
        if not 0 <= self.drop_threshold <= self.sync_threshold:
            raise ConfigError("must be in [0, sync_threshold]", field="drop_threshold")
        for name in ("max_iterations", "max_peers", "forgery_penalty"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", field=name)
        if self.min_evidence < 0 or self.timeout_penalty < 0:
            raise ConfigError("must be >= 0", field="min_evidence")
        _positive(self.recompute_interval, "recompute_interval")
        if self.report_interval is not None:
            _positive(self.report_interval, "report_interval")


# --------------------------------------------------------------------------------------------
# DuckDB tables (registered as a migration by the writer's owner; see docs/mesh.md)
# --------------------------------------------------------------------------------------------

#: DDL of the mesh tables, in order. Idempotent (``IF NOT EXISTS``). Times are TIMESTAMPTZ
#: (UTC); an HLC is stored as its two integers so that ``ORDER BY hlc_wall_ms, hlc_logical``
#: is its order.
MESH_DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS peers (
    peer_id VARCHAR PRIMARY KEY,
    addrs VARCHAR[] NOT NULL,
    status VARCHAR NOT NULL CHECK (status IN ('alive', 'suspect', 'dead', 'left')),
    incarnation BIGINT NOT NULL DEFAULT 0,
    genesis_key BLOB NOT NULL,
    pretrusted BOOLEAN NOT NULL DEFAULT false,
    first_seen TIMESTAMPTZ NOT NULL,
    last_seen TIMESTAMPTZ NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS peer_keys (
    peer_id VARCHAR NOT NULL,
    key_id VARCHAR NOT NULL,
    public_key BLOB NOT NULL,
    rotation_seq INTEGER NOT NULL,
    valid_from TIMESTAMPTZ NOT NULL,
    expired_at TIMESTAMPTZ,
    rotation BLOB,
    PRIMARY KEY (peer_id, key_id)
)""",
    """CREATE TABLE IF NOT EXISTS trust_edges (
    from_peer VARCHAR NOT NULL,
    to_peer VARCHAR NOT NULL,
    satisfactory BIGINT NOT NULL DEFAULT 0 CHECK (satisfactory >= 0),
    unsatisfactory BIGINT NOT NULL DEFAULT 0 CHECK (unsatisfactory >= 0),
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (from_peer, to_peer)
)""",
    """CREATE TABLE IF NOT EXISTS trust_scores (
    peer_id VARCHAR NOT NULL,
    score DOUBLE NOT NULL CHECK (score >= 0 AND score <= 1),
    computed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (peer_id, computed_at)
)""",
    """CREATE TABLE IF NOT EXISTS grants (
    granter VARCHAR NOT NULL,
    grantee VARCHAR NOT NULL,
    row_seq BIGINT NOT NULL,
    tags VARCHAR[] NOT NULL,
    permissions VARCHAR[] NOT NULL,
    redact VARCHAR[] NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (granter, row_seq)
)""",
    """CREATE TABLE IF NOT EXISTS mesh_rows (
    origin VARCHAR NOT NULL,
    seq BIGINT NOT NULL CHECK (seq >= 1),
    hlc_wall_ms BIGINT NOT NULL,
    hlc_logical INTEGER NOT NULL,
    kind VARCHAR NOT NULL,
    payload BLOB NOT NULL,
    key_id VARCHAR NOT NULL,
    signature BLOB NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (origin, seq)
)""",
    "CREATE INDEX IF NOT EXISTS mesh_rows_kind ON mesh_rows (kind)",
    "CREATE INDEX IF NOT EXISTS grants_grantee ON grants (grantee)",
)
