"""Identity: key file permissions, peer ids, signing, rotation and the 7-day trust horizon."""

from __future__ import annotations

import os
import stat

import msgspec
import pytest

from symbiote.actors.mesh.identity import (
    MAX_KEY_TRUST,
    KeyRing,
    NodeIdentity,
    PeerKeys,
    canonical_bytes,
    peer_id_for,
    verify_with_key,
)
from symbiote.schema.mesh import (
    BadSignature,
    IdentityError,
    InsecureKeyFile,
    KeyExpired,
    UnknownKey,
)

T0 = 1_700_000_000
DAY = 86_400


class Row(msgspec.Struct, frozen=True, kw_only=True):
    origin: str
    seq: int
    payload: dict[str, int]
    signature: bytes = b""


def test_key_file_created_owner_only_and_reloads(tmp_path):
    path = tmp_path / "node.key"
    ident = NodeIdentity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = NodeIdentity.load_or_create(path)
    assert again.peer_id == ident.peer_id
    assert again.public_key == ident.public_key
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_file_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "node.key"
    NodeIdentity.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(InsecureKeyFile) as err:
        NodeIdentity.load(path)
    assert "chmod 600" in str(err.value)
    assert err.value.code == "insecure_key_file"


def test_key_file_garbage_and_tampering(tmp_path):
    path = tmp_path / "node.key"
    path.write_bytes(b"not json")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError):
        NodeIdentity.load(path)
    with pytest.raises(IdentityError):
        NodeIdentity.load(tmp_path / "missing.key")
    # A key file whose peer id does not match its genesis key is refused.
    rec = NodeIdentity.generate().to_record()
    rec.peer_id = NodeIdentity.generate().peer_id
    path.write_bytes(msgspec.json.encode(rec))
    with pytest.raises(IdentityError):
        NodeIdentity.load(path)


def test_peer_id_is_stable_and_documented_shape():
    ident = NodeIdentity.generate()
    assert ident.peer_id == peer_id_for(ident.genesis_key)
    assert len(ident.peer_id) == 32
    assert ident.peer_id == ident.peer_id.lower()
    assert set(ident.peer_id) <= set("abcdefghijklmnopqrstuvwxyz234567")


def test_sign_and_verify_rows_canonically():
    ident = NodeIdentity.generate()
    row = ident.sign_record(Row(origin=ident.peer_id, seq=1, payload={"b": 2, "a": 1}))
    verify_with_key(ident.public_key, row, row.signature, context="row")
    # Dict order does not change the canonical bytes, so it does not break the signature.
    same = Row(origin=ident.peer_id, seq=1, payload={"a": 1, "b": 2}, signature=row.signature)
    assert canonical_bytes(same) == canonical_bytes(row)
    verify_with_key(ident.public_key, same, same.signature, context="row")
    forged = msgspec.structs.replace(row, seq=2)
    with pytest.raises(BadSignature):
        verify_with_key(ident.public_key, forged, forged.signature, context="row")
    # The context separates purposes: a row signature is not a rotation signature.
    with pytest.raises(BadSignature):
        verify_with_key(ident.public_key, row, row.signature, context="key_rotation")


def test_rotation_chain_verifies_and_survives_reload(tmp_path):
    ident = NodeIdentity.generate(now=T0)
    old_key_id = ident.key_id
    old_row = ident.sign_record(Row(origin=ident.peer_id, seq=1, payload={}))
    rot = ident.rotate(now=T0 + DAY, grace=2 * DAY)
    new_row = ident.sign_record(Row(origin=ident.peer_id, seq=2, payload={}))
    path = tmp_path / "node.key"
    ident.save(path)
    reloaded = NodeIdentity.load(path)
    assert reloaded.peer_id == ident.peer_id  # the id survives rotation
    assert reloaded.key_id == ident.key_id != old_key_id

    keys = PeerKeys.from_chain(ident.peer_id, ident.genesis_key, [rot], now=T0 + DAY)
    keys.verify(new_row, new_row.signature, ident.key_id, now=T0 + DAY + 1)
    keys.verify(old_row, old_row.signature, old_key_id, now=T0 + DAY + 1)
    # The retired key is refused after its grace period...
    with pytest.raises(KeyExpired):
        keys.verify(old_row, old_row.signature, old_key_id, now=T0 + 3 * DAY)
    # ... and a row signed by the old key cannot pass as signed by the new one.
    with pytest.raises(BadSignature):
        keys.verify(old_row, old_row.signature, ident.key_id, now=T0 + DAY + 1)


def test_rotation_forged_or_out_of_order_is_refused():
    ident = NodeIdentity.generate(now=T0)
    other = NodeIdentity.generate(now=T0)
    rot1 = ident.rotate(now=T0 + 10)
    rot2 = ident.rotate(now=T0 + 20)
    keys = PeerKeys(ident.peer_id, ident.genesis_key, now=T0)
    with pytest.raises(BadSignature):
        keys.apply_rotation(rot2, now=T0 + 20)  # skips seq 1
    forged = other.sign_record(rot1, context="key_rotation")
    with pytest.raises(BadSignature):
        keys.apply_rotation(forged, now=T0 + 20)
    tampered = msgspec.structs.replace(rot1, new_key=other.public_key)
    with pytest.raises(BadSignature):
        keys.apply_rotation(tampered, now=T0 + 20)
    keys.apply_rotation(rot1, now=T0 + 20)
    keys.apply_rotation(rot2, now=T0 + 20)
    assert keys.current.public_key == ident.public_key
    with pytest.raises(BadSignature):
        PeerKeys(other.peer_id, ident.genesis_key)  # id does not derive from that key


def test_trust_is_capped_at_seven_days_unless_confirmed():
    ident = NodeIdentity.generate(now=T0)
    row = ident.sign_record(Row(origin=ident.peer_id, seq=1, payload={}))
    keys = PeerKeys(ident.peer_id, ident.genesis_key, now=T0)
    assert keys.trusted_until(ident.key_id) == T0 + MAX_KEY_TRUST
    keys.verify(row, row.signature, ident.key_id, now=T0 + MAX_KEY_TRUST - 1)
    with pytest.raises(KeyExpired):
        keys.verify(row, row.signature, ident.key_id, now=T0 + MAX_KEY_TRUST)
    # A fresh proof of possession (a handshake) extends the horizon by at most 7 days.
    keys.confirm(ident.public_key, now=T0 + 8 * DAY)
    keys.verify(row, row.signature, ident.key_id, now=T0 + 8 * DAY + 1)
    assert keys.trusted_until(ident.key_id) == T0 + 8 * DAY + MAX_KEY_TRUST
    with pytest.raises(UnknownKey):
        keys.confirm(NodeIdentity.generate().public_key, now=T0)


def test_retired_key_trust_is_min_of_valid_until_and_horizon():
    ident = NodeIdentity.generate(now=T0)
    old_id = ident.key_id
    # A long grace does not stretch trust beyond 7 days after the verifier learnt the key.
    rot = ident.rotate(now=T0 + 1, grace=30 * DAY)
    keys = PeerKeys.from_chain(ident.peer_id, ident.genesis_key, [rot], now=T0)
    assert keys.trusted_until(old_id) == T0 + MAX_KEY_TRUST
    # A short grace cuts it below the horizon.
    ident2 = NodeIdentity.generate(now=T0)
    old2 = ident2.key_id
    rot2 = ident2.rotate(now=T0 + 1, grace=60)
    keys2 = PeerKeys.from_chain(ident2.peer_id, ident2.genesis_key, [rot2], now=T0)
    assert keys2.trusted_until(old2) == T0 + 61


def test_key_ring_is_bounded_and_typed():
    ring = KeyRing(max_peers=2)
    idents = [NodeIdentity.generate(now=T0) for _ in range(3)]
    for i in idents:
        ring.add(PeerKeys(i.peer_id, i.genesis_key, now=T0))
    assert len(ring) == 2
    with pytest.raises(UnknownKey):
        ring.get(idents[0].peer_id)
    row = idents[2].sign_record(Row(origin=idents[2].peer_id, seq=1, payload={}))
    ring.verify(idents[2].peer_id, row, row.signature, idents[2].key_id, now=T0 + 1)
    with pytest.raises(UnknownKey):
        ring.verify(idents[2].peer_id, row, row.signature, "nope", now=T0 + 1)
