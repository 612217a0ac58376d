"""Node identity: an Ed25519 key, a stable peer id, key rotation and signing helpers.

Peer id
    ``peer_id = base32(sha256(b"symbiote-peer-id-v1\\0" + genesis_public_key)[:20])``, lower
    case without padding: 32 characters, 160 bits. The id is derived from the node's *first*
    (genesis) key and never changes; later keys are linked to it by a chain of
    :class:`~symbiote.schema.mesh.KeyRotation` records, each signed by the key it replaces.
    Anyone holding the genesis public key can check the id, so ids are self-certifying.

Trust horizon
    A verifier trusts a key no longer than ``min(valid_until, confirmed_at + 7 days)``: a key is
    confirmed when it is first learnt and again each time the peer proves it holds it (a
    handshake). A stolen old key therefore stops being accepted within a week even where the
    rotation that retired it never arrived.

Signatures
    A signature covers ``b"symbiote/sig/v1\\0" + context + b"\\0" + canonical(obj)`` where
    ``canonical`` is deterministic MessagePack (``order="deterministic"``) of the struct with its
    ``signature`` field, if it has one, blanked. The context string keeps a signature made for
    one purpose (a row, a rotation) from being replayed as another.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from symbiote.schema.mesh import (
    BadSignature,
    IdentityError,
    InsecureKeyFile,
    KeyExpired,
    KeyFile,
    KeyRotation,
    PeerKey,
    UnknownKey,
)

__all__ = [
    "MAX_KEY_TRUST",
    "KeyRing",
    "NodeIdentity",
    "PeerKeys",
    "canonical_bytes",
    "key_id_for",
    "peer_id_for",
    "verify_with_key",
]

log = logging.getLogger(__name__)

#: A verifier trusts a key at most this long (seconds) after it last confirmed it.
MAX_KEY_TRUST = 7 * 24 * 3600
#: Default life of a retired key after a rotation (seconds).
DEFAULT_ROTATION_GRACE = 7 * 24 * 3600

_ENCODER = msgspec.msgpack.Encoder(order="deterministic")
_SIG_DOMAIN = b"symbiote/sig/v1\x00"
_ROTATION_CONTEXT = "key_rotation"

S = TypeVar("S", bound=msgspec.Struct)


def _now() -> int:
    return int(time.time())


def _b32(digest: bytes) -> str:
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def peer_id_for(genesis_public_key: bytes) -> str:
    """The peer id that the genesis public key (32 raw bytes) derives."""
    return _b32(hashlib.sha256(b"symbiote-peer-id-v1\x00" + genesis_public_key).digest()[:20])


def key_id_for(public_key: bytes) -> str:
    """A short id (16 characters) naming one public key within its peer's key set."""
    return _b32(hashlib.sha256(b"symbiote-key-id-v1\x00" + public_key).digest()[:10])


def canonical_bytes(obj: Any) -> bytes:
    """Deterministic MessagePack of ``obj``, with a ``signature`` field (if any) blanked."""
    if isinstance(obj, msgspec.Struct) and "signature" in obj.__struct_fields__:
        obj = msgspec.structs.replace(obj, signature=b"")
    return _ENCODER.encode(obj)


def _payload(obj: Any, context: str) -> bytes:
    return _SIG_DOMAIN + context.encode() + b"\x00" + canonical_bytes(obj)


def _public_key(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise BadSignature("not a 32-byte Ed25519 public key", field="public_key") from exc


def verify_with_key(public_key: bytes, obj: Any, signature: bytes, *, context: str) -> None:
    """Check ``signature`` over ``obj`` with a raw Ed25519 key; raise BadSignature if wrong."""
    try:
        _public_key(public_key).verify(signature, _payload(obj, context))
    except InvalidSignature as exc:
        raise BadSignature(f"signature does not verify ({context})", field="signature") from exc


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


class NodeIdentity:
    """This node's signing identity: its current private key and its key history."""

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        *,
        genesis_key: bytes,
        keys: list[PeerKey],
        rotations: list[KeyRotation],
    ) -> None:
        self._private = private_key
        self.genesis_key = genesis_key
        self.peer_id = peer_id_for(genesis_key)
        self.public_key = _raw_public(private_key)
        self.key_id = key_id_for(self.public_key)
        #: Every public key this node has used, the current one last (``valid_until`` None).
        self.keys = list(keys)
        #: The rotation chain from the genesis key to the current key.
        self.rotations = list(rotations)

    # -- creation and storage ------------------------------------------------------------

    @classmethod
    def generate(cls, *, now: int | None = None) -> NodeIdentity:
        """A fresh identity with a new genesis key."""
        key = Ed25519PrivateKey.generate()
        pub = _raw_public(key)
        rec = PeerKey(key_id=key_id_for(pub), public_key=pub, valid_from=now or _now())
        return cls(key, genesis_key=pub, keys=[rec], rotations=[])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeIdentity:
        """Load a key file; refuse it if group or others may read or write it."""
        p = Path(path)
        try:
            st = p.stat()
        except OSError as exc:
            raise IdentityError(f"cannot read key file {p}: {exc}", field="key_file") from exc
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"{p} is not a regular file", field="key_file")
        if st.st_mode & 0o077:
            raise InsecureKeyFile(
                f"key file {p} has mode {stat.S_IMODE(st.st_mode):#o}; it must be accessible "
                f"by its owner only (run: chmod 600 {p})",
                field="key_file",
            )
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise InsecureKeyFile(
                f"key file {p} is owned by uid {st.st_uid}, not by this user", field="key_file"
            )
        try:
            data = msgspec.json.decode(p.read_bytes(), type=KeyFile)
        except (OSError, msgspec.DecodeError) as exc:
            raise IdentityError(f"key file {p} is unreadable: {exc}", field="key_file") from exc
        return cls._from_record(data, p)

    @classmethod
    def _from_record(cls, data: KeyFile, p: Path) -> NodeIdentity:
        if data.version != 1:
            raise IdentityError(f"unsupported key file version {data.version}", field="version")
        try:
            key = Ed25519PrivateKey.from_private_bytes(data.private_key)
        except ValueError as exc:
            raise IdentityError(f"{p}: not an Ed25519 private key", field="private_key") from exc
        ident = cls(key, genesis_key=data.genesis_key, keys=data.keys, rotations=data.rotations)
        if ident.peer_id != data.peer_id:
            raise IdentityError(f"{p}: peer id does not match the genesis key", field="peer_id")
        if not data.keys or data.keys[-1].public_key != ident.public_key:
            raise IdentityError(f"{p}: private key is not the current key", field="keys")
        # The stored chain must verify: a key file edited by hand must not yield an identity
        # that other nodes would refuse.
        PeerKeys.from_chain(ident.peer_id, ident.genesis_key, ident.rotations, now=0)
        return ident

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> NodeIdentity:
        """Load the key file at ``path``, creating it (mode 0600) if it does not exist."""
        p = Path(path)
        if p.exists():
            return cls.load(p)
        ident = cls.generate()
        ident.save(p)
        log.info("created node identity", extra={"peer_id": ident.peer_id, "path": str(p)})
        return ident

    def to_record(self) -> KeyFile:
        """The key file record (contains the private key)."""
        return KeyFile(
            peer_id=self.peer_id,
            genesis_key=self.genesis_key,
            private_key=_raw_private(self._private),
            keys=list(self.keys),
            rotations=list(self.rotations),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file atomically with mode 0600 (never visible with wider modes)."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        data = msgspec.json.encode(self.to_record())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # The umask can only narrow the mode; fchmod makes 0600 exact either way.
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, p)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- signing -------------------------------------------------------------------------

    def private_key(self) -> Ed25519PrivateKey:
        """The current private key (for the transport's certificate)."""
        return self._private

    def sign(self, obj: Any, *, context: str = "row") -> bytes:
        """Sign the canonical encoding of ``obj`` under ``context`` with the current key."""
        return self._private.sign(_payload(obj, context))

    def sign_record(self, record: S, *, context: str = "row") -> S:
        """A copy of ``record`` (a struct with a ``signature`` field) carrying its signature."""
        return msgspec.structs.replace(record, signature=self.sign(record, context=context))

    # -- rotation ------------------------------------------------------------------------

    def rotate(self, *, now: int | None = None, grace: int = DEFAULT_ROTATION_GRACE) -> KeyRotation:
        """Replace the current key by a new one; return the rotation record to publish.

        The old public key stays in :attr:`keys` with ``valid_until = now + grace`` so rows it
        signed stay verifiable for that long. The caller must :meth:`save` afterwards.
        """
        if grace < 0:
            raise IdentityError("grace must be >= 0", field="grace")
        t = now if now is not None else _now()
        new = Ed25519PrivateKey.generate()
        new_pub = _raw_public(new)
        rot = KeyRotation(
            peer_id=self.peer_id,
            seq=len(self.rotations) + 1,
            old_key=self.public_key,
            new_key=new_pub,
            issued_at=t,
            old_key_valid_until=t + grace,
        )
        rot = self.sign_record(rot, context=_ROTATION_CONTEXT)
        self.keys[-1] = msgspec.structs.replace(self.keys[-1], valid_until=t + grace)
        self.keys.append(PeerKey(key_id=key_id_for(new_pub), public_key=new_pub, valid_from=t))
        self.rotations.append(rot)
        self._private = new
        self.public_key = new_pub
        self.key_id = key_id_for(new_pub)
        log.info("rotated node key", extra={"peer_id": self.peer_id, "key_id": self.key_id})
        return rot


class _Trusted(msgspec.Struct):
    key: PeerKey
    trusted_until: int


class PeerKeys:
    """A verifier's view of one peer's keys: the chain from its genesis key, with horizons."""

    #: Retired keys kept per peer; the oldest are dropped beyond this.
    MAX_KEYS = 16

    def __init__(self, peer_id: str, genesis_key: bytes, *, now: int | None = None) -> None:
        if peer_id_for(genesis_key) != peer_id:
            raise BadSignature("genesis key does not derive this peer id", field="peer_id")
        _public_key(genesis_key)
        t = now if now is not None else _now()
        self.peer_id = peer_id
        self.seq = 0
        self._keys: dict[str, _Trusted] = {}
        self.current = self._add(
            PeerKey(key_id=key_id_for(genesis_key), public_key=genesis_key, valid_from=0), t
        )

    @classmethod
    def from_chain(
        cls,
        peer_id: str,
        genesis_key: bytes,
        rotations: list[KeyRotation],
        *,
        now: int | None = None,
    ) -> PeerKeys:
        """Build a peer's key set from its genesis key and its rotation chain."""
        keys = cls(peer_id, genesis_key, now=now)
        for rot in rotations:
            keys.apply_rotation(rot, now=now)
        return keys

    def _add(self, key: PeerKey, now: int) -> PeerKey:
        until = now + MAX_KEY_TRUST
        if key.valid_until is not None:
            until = min(until, key.valid_until)
        self._keys[key.key_id] = _Trusted(key=key, trusted_until=until)
        while len(self._keys) > self.MAX_KEYS:
            oldest = min(
                (k for k in self._keys if k != key.key_id),
                key=lambda k: self._keys[k].trusted_until,
            )
            del self._keys[oldest]
        return key

    def apply_rotation(self, rot: KeyRotation, *, now: int | None = None) -> None:
        """Verify and apply the next rotation of the chain; raise BadSignature if it is not."""
        t = now if now is not None else _now()
        if rot.peer_id != self.peer_id:
            raise BadSignature("rotation is for another peer", field="peer_id")
        if rot.seq != self.seq + 1:
            raise BadSignature(f"rotation seq {rot.seq} does not follow {self.seq}", field="seq")
        if rot.old_key != self.current.public_key:
            raise BadSignature("rotation does not start from the current key", field="old_key")
        verify_with_key(rot.old_key, rot, rot.signature, context=_ROTATION_CONTEXT)
        _public_key(rot.new_key)
        old = self._keys[self.current.key_id]
        retired = msgspec.structs.replace(old.key, valid_until=rot.old_key_valid_until)
        old.key = retired
        old.trusted_until = min(old.trusted_until, rot.old_key_valid_until)
        self.seq = rot.seq
        self.current = self._add(
            PeerKey(
                key_id=key_id_for(rot.new_key), public_key=rot.new_key, valid_from=rot.issued_at
            ),
            t,
        )

    def confirm(self, public_key: bytes, *, now: int | None = None) -> None:
        """The peer proved it holds ``public_key`` (its current key): extend its horizon."""
        if public_key != self.current.public_key:
            raise UnknownKey("not the current key of this peer", field="public_key")
        t = now if now is not None else _now()
        entry = self._keys[self.current.key_id]
        entry.trusted_until = t + MAX_KEY_TRUST

    def trusted_until(self, key_id: str) -> int:
        """Until when (Unix seconds) ``key_id`` is trusted; raise UnknownKey if unknown."""
        entry = self._keys.get(key_id)
        if entry is None:
            raise UnknownKey(f"key {key_id} is not known for {self.peer_id}", field="key_id")
        return entry.trusted_until

    def key(self, key_id: str, *, now: int | None = None) -> bytes:
        """The raw public key ``key_id`` if it is trusted at ``now``."""
        t = now if now is not None else _now()
        entry = self._keys.get(key_id)
        if entry is None:
            raise UnknownKey(f"key {key_id} is not known for {self.peer_id}", field="key_id")
        if t >= entry.trusted_until:
            raise KeyExpired(
                f"key {key_id} of {self.peer_id} is past its trust horizon", field="key_id"
            )
        if t < entry.key.valid_from:
            raise KeyExpired(f"key {key_id} is not valid yet", field="key_id")
        return entry.key.public_key

    def verify(
        self,
        obj: Any,
        signature: bytes,
        key_id: str,
        *,
        context: str = "row",
        now: int | None = None,
    ) -> None:
        """Check a signature by this peer's key ``key_id``, trusted at ``now``."""
        verify_with_key(self.key(key_id, now=now), obj, signature, context=context)


class KeyRing:
    """Key sets of many peers, bounded; the least recently added peer is evicted first."""

    def __init__(self, max_peers: int = 4096) -> None:
        if max_peers < 1:
            raise IdentityError("must be >= 1", field="max_peers")
        self._max = max_peers
        self._peers: dict[str, PeerKeys] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def add(self, keys: PeerKeys) -> None:
        """Add or replace a peer's key set."""
        self._peers.pop(keys.peer_id, None)
        self._peers[keys.peer_id] = keys
        while len(self._peers) > self._max:
            del self._peers[next(iter(self._peers))]

    def get(self, peer_id: str) -> PeerKeys:
        """The key set of ``peer_id``; raise UnknownKey if none is held."""
        keys = self._peers.get(peer_id)
        if keys is None:
            raise UnknownKey(f"no keys known for peer {peer_id}", field="peer_id")
        return keys

    def verify(
        self,
        peer_id: str,
        obj: Any,
        signature: bytes,
        key_id: str,
        *,
        context: str = "row",
        now: int | None = None,
    ) -> None:
        """Check a signature by ``peer_id``'s key ``key_id``."""
        self.get(peer_id).verify(obj, signature, key_id, context=context, now=now)
