"""The bootstrap file ``.well-known/egregora-peers.json``: parse, validate, join through it.

Format (:class:`~symbiote.schema.mesh.BootstrapFile`, documented in docs/mesh.md)::

    {"version": 1, "mesh": "egregora",
     "peers": [{"peer_id": "<32 base32>", "addrs": ["host:port"],
                "public_key": "<base64 genesis key>", "pretrusted": true, "name": "..."}]}

Every problem is a :class:`~symbiote.schema.mesh.BootstrapError` whose ``field`` is the JSON
path of the culprit (``peers[2].addrs[0]``), checked in this order: size cap (before parsing),
JSON syntax, schema (types, unknown fields, peer id pattern, list lengths), then meaning
(addresses parse, the public key derives the peer id, no duplicate peer, the mesh name).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec

from symbiote.actors.mesh.identity import KeyRing, PeerKeys, peer_id_for
from symbiote.actors.mesh.net import parse_addr
from symbiote.actors.mesh.swim import SwimNode
from symbiote.schema.mesh import BadSignature, BootstrapError, BootstrapFile, JoinFailed

__all__ = [
    "BOOTSTRAP_PATH",
    "MAX_BOOTSTRAP_BYTES",
    "Bootstrap",
    "join_from_bootstrap",
    "load_bootstrap",
    "parse_bootstrap",
]

log = logging.getLogger(__name__)

#: Where the file lives, relative to a site root or a data directory.
BOOTSTRAP_PATH = ".well-known/egregora-peers.json"
#: The file is refused above this size, before it is parsed.
MAX_BOOTSTRAP_BYTES = 1 << 20

_DECODER = msgspec.json.Decoder(BootstrapFile)
# msgspec ends its messages with "- at `$.peers[0].addrs`": the path becomes the field.
_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """A validated bootstrap file, with what the mesh needs from it."""

    file: BootstrapFile

    @property
    def seeds(self) -> list[str]:
        """Every address of every peer, in file order (join tries them all)."""
        return [a for p in self.file.peers for a in p.addrs]

    @property
    def pretrusted(self) -> set[str]:
        """Peer ids the operator marked ``pretrusted`` (EigenTrust's anchors)."""
        return {p.peer_id for p in self.file.peers if p.pretrusted}

    def add_keys(self, keyring: KeyRing) -> int:
        """Add the listed genesis keys to ``keyring`` (for peers not held yet); how many."""
        added = 0
        for p in self.file.peers:
            if p.public_key is None:
                continue
            try:
                keyring.get(p.peer_id)
            except BadSignature:
                keyring.add(PeerKeys(p.peer_id, p.public_key))
                added += 1
        return added


def parse_bootstrap(data: bytes, *, mesh: str | None = None) -> Bootstrap:
    """Validate a bootstrap file's bytes; BootstrapError naming the field if anything is wrong.

    ``mesh``, when given, must equal the file's ``mesh`` (a file for another mesh is refused).
    """
    if len(data) > MAX_BOOTSTRAP_BYTES:
        raise BootstrapError(f"{len(data)} bytes > {MAX_BOOTSTRAP_BYTES}", field="file")
    try:
        bf = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = _PATH.search(msg)
        field = m.group(1) if m and m.group(1) else "file"
        raise BootstrapError(msg[: m.start()] if m else msg, field=field) from exc
    except msgspec.DecodeError as exc:
        raise BootstrapError(f"not valid JSON: {exc}", field="file") from exc
    if mesh is not None and bf.mesh != mesh:
        raise BootstrapError(f"file is for mesh {bf.mesh!r}, not {mesh!r}", field="mesh")
    seen: set[str] = set()
    for i, p in enumerate(bf.peers):
        where = f"peers[{i}]"
        if p.peer_id in seen:
            raise BootstrapError(f"duplicate peer {p.peer_id}", field=f"{where}.peer_id")
        seen.add(p.peer_id)
        for j, addr in enumerate(p.addrs):
            try:
                parse_addr(addr)
            except ValueError as exc:
                raise BootstrapError(str(exc), field=f"{where}.addrs[{j}]") from exc
        if p.public_key is not None:
            if len(p.public_key) != 32:
                raise BootstrapError(
                    f"must be 32 bytes (base64), got {len(p.public_key)}",
                    field=f"{where}.public_key",
                )
            if peer_id_for(p.public_key) != p.peer_id:
                raise BootstrapError("does not derive this peer id", field=f"{where}.public_key")
    return Bootstrap(bf)


def load_bootstrap(path: str | os.PathLike[str], *, mesh: str | None = None) -> Bootstrap:
    """Read and validate a bootstrap file (size checked before reading it whole)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_BOOTSTRAP_BYTES + 1)
    except OSError as exc:
        raise BootstrapError(f"cannot read {p}: {exc}", field="file") from exc
    return parse_bootstrap(data, mesh=mesh)


async def join_from_bootstrap(
    node: SwimNode, bootstrap: Bootstrap, *, keyring: KeyRing | None = None
) -> int:
    """Join the mesh through the file's addresses; the number of seeds that answered.

    The node's own entry (a file shared by every member lists them all) is skipped. Raises
    JoinFailed if none answered.
    """
    if keyring is not None:
        bootstrap.add_keys(keyring)
    seeds = [a for p in bootstrap.file.peers if p.peer_id != node.peer_id for a in p.addrs]
    if not seeds:
        raise JoinFailed("the bootstrap file lists no other peer", field="peers")
    answered = await node.join(seeds)
    log.info(
        "joined through the bootstrap file: %d of %d addresses answered",
        answered,
        len(seeds),
        extra={"peer_id": node.peer_id},
    )
    return answered
