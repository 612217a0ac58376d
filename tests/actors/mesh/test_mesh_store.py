"""Durable mesh state: the persisted row log, key chains, grants, redaction, PersistMesh.

Units, plus the writer's PersistMesh path on a real DuckDB file (apply_batch, as the writer
actor runs it in its worker thread).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import duckdb
import msgspec
import pyarrow as pa
import pytest

from symbiote.actors._store import StoreState, apply_batch
from symbiote.actors.mesh.federation import LocalHit, redact_hit
from symbiote.actors.mesh.grants import GrantBook
from symbiote.actors.mesh.identity import NodeIdentity, PeerKeys
from symbiote.actors.mesh.rows import sign_row
from symbiote.actors.mesh.store import (
    PersistentRowLog,
    chain_records,
    chains_from_table,
    restore_log,
    rows_from_table,
)
from symbiote.schema.ddl import migrate
from symbiote.schema.errors import BadArgument, TooLarge
from symbiote.schema.mesh import (
    Grant,
    GrantDenied,
    GrantRecord,
    Hlc,
    KeyChain,
    LogFull,
    PeerRecord,
    Row,
    TrustEdgeRecord,
    TrustScoreRecord,
    check_grant,
)
from symbiote.schema.messages import PersistMesh, WriteAck
from symbiote.schema.records import Limits

NOW = 1_700_000_000


def rows_of(ident: NodeIdentity, n: int, start: int = 1, kind: str = "doc") -> list[Row]:
    return [
        sign_row(ident, seq=s, hlc=Hlc(NOW * 1000 + s), kind=kind, payload=b"%d" % s)
        for s in range(start, start + n)
    ]


# -- the persisted row log -----------------------------------------------------------------


def test_backlog_is_bounded_ordered_and_skips_durable_rows():
    ident = NodeIdentity.generate()
    log = PersistentRowLog(max_backlog=3, peer_id=ident.peer_id)
    rows = rows_of(ident, 6)
    for r in rows[:3]:
        log.append(r)
    with pytest.raises(LogFull) as full:
        log.append(rows[3])  # the writer is behind: refused, never evicted
    assert full.value.field == "persist_backlog"
    assert log.head(ident.peer_id) == 3 and log.refused_backlog == 1
    with pytest.raises(LogFull):
        log.check_room(ident.peer_id)
    batch = log.take(max_rows=2, max_bytes=1 << 20)
    assert [r.seq for r in batch] == [1, 2]  # append order: the durable set stays a prefix
    log.stored(len(batch))
    assert log.backlog == 1 and log.persisted == 2
    log.append(rows[3])
    with log.durable():  # an own row already committed is not queued again
        log.append(rows[4])
    assert [r.seq for r in log.take(10, 1 << 20)] == [3, 4]
    assert log.head(ident.peer_id) == 5
    assert log.take(10, 1) == [rows[2]]  # at least one row, whatever the byte bound


def test_restore_keeps_a_prefix_per_origin_and_round_trips_the_table():
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    stored = rows_of(a, 4) + [r for r in rows_of(b, 5) if r.seq != 3]  # b has a gap at 3
    table = pa.table(
        {
            "origin": [r.origin for r in stored],
            "seq": [r.seq for r in stored],
            "hlc_wall_ms": [r.hlc.wall_ms for r in stored],
            "hlc_logical": [r.hlc.logical for r in stored],
            "kind": [r.kind for r in stored],
            "payload": [r.payload for r in stored],
            "key_id": [r.key_id for r in stored],
            "signature": [r.signature for r in stored],
        }
    )
    rows = rows_from_table(table)
    assert rows == stored
    log = PersistentRowLog()
    restored = restore_log(log, rows)
    assert log.head(a.peer_id) == 4 and log.head(b.peer_id) == 2
    assert len(restored) == 6 and log.backlog == 0  # restored rows are already stored


def test_key_chain_records_round_trip_and_verify():
    ident = NodeIdentity.generate(now=NOW)
    ident.rotate(now=NOW + 10, grace=100)
    ident.rotate(now=NOW + 20, grace=100)
    chain = KeyChain(ident.peer_id, ident.genesis_key, list(ident.rotations))
    recs = chain_records(chain)
    assert [r.rotation_seq for r in recs] == [0, 1, 2]
    assert recs[0].expired_at == NOW + 110 and recs[-1].expired_at is None
    table = pa.table(
        {
            "peer_id": [r.peer_id for r in recs],
            "rotation_seq": [r.rotation_seq for r in recs],
            "public_key": [r.public_key for r in recs],
            "rotation": [r.rotation for r in recs],
        }
    )
    (back,) = chains_from_table(table)
    assert back == chain
    keys = PeerKeys.from_chain(back.peer_id, back.genesis_key, back.rotations, now=NOW + 30)
    assert keys.current.public_key == ident.public_key
    # A chain with a missing link is dropped rather than half-trusted.
    assert chains_from_table(table.filter(pa.array([True, False, True]))) == []


# -- grants --------------------------------------------------------------------------------


def test_check_grant_names_the_field():
    me, other = NodeIdentity.generate().peer_id, NodeIdentity.generate().peer_id
    good = Grant(grantee=other, tags=["ai"], permissions=["search"], expires_at=NOW + 60)
    check_grant(good, now=NOW, granter=me)
    cases = {
        "grantee": msgspec.structs.replace(good, grantee="nope"),
        "tags": msgspec.structs.replace(good, tags=[]),
        "tags[1]": msgspec.structs.replace(good, tags=["ai", ""]),
        "expires_at": msgspec.structs.replace(good, expires_at=NOW),
        "redact[0]": msgspec.structs.replace(good, redact=["password"]),
    }
    for field, grant in cases.items():
        with pytest.raises(BadArgument) as err:
            check_grant(grant, now=NOW, granter=me)
        assert err.value.field == field
    with pytest.raises(BadArgument) as err:
        check_grant(msgspec.structs.replace(good, grantee=me), now=NOW, granter=me)
    assert err.value.field == "grantee"
    check_grant(msgspec.structs.replace(good, redact=["metadata.email", "text"]), now=NOW)


def test_grant_book_latest_wins_and_checks_expiry_and_scope():
    granter = NodeIdentity.generate()
    grantee = NodeIdentity.generate().peer_id
    book = GrantBook(granter.peer_id)

    def publish(seq: int, grant: Grant) -> None:
        payload = msgspec.msgpack.encode(grant)
        book.observe(sign_row(granter, seq=seq, hlc=Hlc(seq), kind="grant", payload=payload))

    publish(1, Grant(grantee=grantee, tags=["ai", "ml"], permissions=["search"], expires_at=NOW))
    g, scope = book.check(grantee, ["ai", "cooking"], now=NOW - 1)
    assert scope == ["ai"] and g.expires_at == NOW
    assert book.check(grantee, [], now=NOW - 1)[1] == ["ai", "ml"]  # no tags asked: the grant's
    reasons = {}
    for args in ((grantee, ["cooking"], NOW - 1), (grantee, ["ai"], NOW), ("x" * 32, [], 0)):
        with pytest.raises(GrantDenied) as err:
            book.check(args[0], args[1], now=args[2])
        reasons[err.value.reason] = True
    assert set(reasons) == {"out_of_scope", "expired", "no_grant"}
    publish(2, Grant(grantee=grantee, tags=["ai"], permissions=[], expires_at=NOW + 99))
    with pytest.raises(GrantDenied) as err:
        book.check(grantee, ["ai"], now=NOW)
    assert err.value.reason == "not_permitted"  # the later row revoked the search
    publish(1, Grant(grantee=grantee, tags=["ai"], permissions=["search"], expires_at=NOW + 9))
    held = book.latest(granter.peer_id, grantee)
    assert held is not None and held.permissions == []  # an older row never wins
    assert book.granted_to(grantee, ["ai"], now=NOW) == {}


def test_redaction_blanks_fields_and_author_names():
    hit = LocalHit(
        chunk_id="d1:0",
        document_id="d1",
        distance=0.1,
        text="ALICE Martin met Bob. " + "x" * 50,
        title="Alice Martin's diary",
        authors=["Alice Martin", " "],
        tags=["ai"],
        metadata={"email": "a@b.c", "lang": "en"},
    )
    out = redact_hit(hit, frozenset({"authors", "metadata.email"}), max_text=30)
    assert out.authors is None and out.metadata == {"lang": "en"}
    assert out.text == "[redacted] met Bob. xxxxxxxxxx" and len(out.text) == 30
    assert out.title == "[redacted]'s diary"
    bare = redact_hit(hit, frozenset({"text", "title", "metadata"}), max_text=1000)
    assert bare.text is None and bare.title is None and bare.metadata is None
    assert bare.authors == ["Alice Martin", " "]  # not asked: left alone


# -- the writer's PersistMesh path on a real file ---------------------------------------------


def test_persist_mesh_is_idempotent_and_first_content_wins(tmp_path: Path):
    path = tmp_path / "mesh.duckdb"
    ident = NodeIdentity.generate()
    rows = rows_of(ident, 3)
    now = dt.datetime.now(dt.UTC)
    g = GrantRecord(
        granter=ident.peer_id,
        grantee="b" * 32,
        row_seq=3,
        tags=["ai"],
        permissions=["search"],
        redact=[],
        expires_at=int(time.time()) + 60,
        signature=b"s",
    )
    peer = PeerRecord(
        peer_id="c" * 32,
        addrs=["127.0.0.1:1"],
        status="alive",
        incarnation=1,
        genesis_key=b"G" * 32,
        pretrusted=True,
        seen_at=now,
    )
    con = duckdb.connect(str(path))
    migrate(con, 4)
    state = StoreState.load(con, Limits(dim=4))
    first = PersistMesh(
        rows=tuple(rows),
        grants=(g,),
        peers=(peer,),
        peer_keys=tuple(chain_records(KeyChain(ident.peer_id, ident.genesis_key))),
        trust_edges=(
            TrustEdgeRecord(from_peer="a", to_peer="c" * 32, satisfactory=2, unsatisfactory=0),
        ),
        trust_scores=(TrustScoreRecord(peer_id="c" * 32, score=0.5),),
        scores_at=now,
    )
    assert apply_batch(con, [first, first], state).outcomes == [WriteAck(written=8)] * 2
    resigned = msgspec.structs.replace(rows[0], signature=b"new")
    forged = msgspec.structs.replace(rows[1], payload=b"other", signature=b"bad")
    later = msgspec.structs.replace(
        peer, status="dead", genesis_key=b"", seen_at=now + dt.timedelta(seconds=9)
    )
    second = PersistMesh(
        rows=(resigned, forged),
        peers=(later,),
        trust_scores=(TrustScoreRecord(peer_id="c" * 32, score=0.25),),
        scores_at=now + dt.timedelta(seconds=1),
    )
    assert apply_batch(con, [second], state).outcomes == [WriteAck(written=4)]
    con.close()

    con = duckdb.connect(str(path))  # what a restart reads back
    got = con.execute(
        "SELECT seq, payload, signature FROM mesh_rows WHERE origin = ? ORDER BY seq",
        [ident.peer_id],
    ).fetchall()
    assert got == [(1, b"1", b"new"), (2, b"2", rows[1].signature), (3, b"3", rows[2].signature)]
    assert con.execute(
        "SELECT status, genesis_key, first_seen < last_seen FROM peers"
    ).fetchall() == [("dead", b"G" * 32, True)]
    assert con.execute("SELECT peer_id, score FROM trust_scores").fetchall() == [("c" * 32, 0.25)]
    assert con.execute("SELECT count(*) FROM grants").fetchone() == (1,)
    assert con.execute("SELECT count(*) FROM peer_keys").fetchone() == (1,)
    con.close()


def test_persist_mesh_bad_input_is_typed():
    con = duckdb.connect(":memory:")
    migrate(con, 4)
    state = StoreState.load(con, Limits(dim=4, max_rows_per_request=2))
    ident = NodeIdentity.generate()
    (out,) = apply_batch(con, [PersistMesh(rows=tuple(rows_of(ident, 3)))], state).outcomes
    assert not isinstance(out, WriteAck) and out.code == TooLarge.code and out.field == "rows"
    bad = msgspec.structs.replace(rows_of(ident, 1)[0], seq=0)
    (out,) = apply_batch(con, [PersistMesh(rows=(bad,))], state).outcomes
    assert not isinstance(out, WriteAck) and out.field == "rows[0]"
