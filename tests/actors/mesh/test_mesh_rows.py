"""HLC, signed rows, the bounded row log, the mesh DDL and EigenTrust: pure units."""

from __future__ import annotations

import duckdb
import msgspec
import numpy as np
import pytest

from symbiote.actors.mesh.hlc import MAX_LOGICAL, HybridClock
from symbiote.actors.mesh.identity import NodeIdentity, verify_with_key
from symbiote.actors.mesh.rows import ROW_CONTEXT, MemoryRowLog, digest_fingerprint, sign_row
from symbiote.actors.mesh.trust import TrustGraph, TrustPolicy, eigentrust
from symbiote.schema.errors import ConfigError
from symbiote.schema.mesh import (
    MESH_DDL,
    BadSignature,
    ClockSkew,
    Hlc,
    LogFull,
    MeshMessage,
    Row,
    RowBatch,
    RowGap,
    RowSyncConfig,
    TrustConfig,
)


class FakeWall:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- HLC ------------------------------------------------------------------------------------


def test_hlc_is_monotonic_and_follows_physical_time():
    wall = FakeWall()
    c = HybridClock(wall=wall)
    a = c.now()
    b = c.now()  # same millisecond: the logical counter orders them
    assert a < b and a.wall_ms == b.wall_ms and b.logical == a.logical + 1
    wall.t -= 5.0  # physical time goes backwards (NTP step): the HLC does not
    assert c.now() > b
    wall.t += 10.0
    assert c.now() == Hlc(int(wall.t * 1000), 0)


def test_hlc_update_orders_after_remote_and_bounds_skew():
    wall = FakeWall()
    c = HybridClock(wall=wall, max_skew=60.0)
    pt = int(wall.t * 1000)
    remote = Hlc(pt + 30_000, 7)  # 30 s ahead: within the bound
    merged = c.update(remote)
    assert merged > remote and c.now() > merged
    with pytest.raises(ClockSkew) as err:
        c.update(Hlc(pt + 61_000, 0))
    assert err.value.field == "hlc" and c.rejected == 1
    assert c.last < Hlc(pt + 61_000, 0)  # a refused reading is not absorbed


def test_hlc_logical_overflow_moves_wall_forward():
    wall = FakeWall()
    c = HybridClock(wall=wall)
    c.update(Hlc(int(wall.t * 1000), MAX_LOGICAL))
    nxt = c.now()
    assert nxt.logical <= MAX_LOGICAL and nxt > Hlc(int(wall.t * 1000), MAX_LOGICAL)


# -- rows and the log -----------------------------------------------------------------------


def make_rows(ident: NodeIdentity, n: int, start: int = 1) -> list[Row]:
    return [
        sign_row(ident, seq=s, hlc=Hlc(1000 + s), kind="doc", payload=b"p%d" % s)
        for s in range(start, start + n)
    ]


def test_row_signature_covers_every_field():
    ident = NodeIdentity.generate()
    row = make_rows(ident, 1)[0]
    verify_with_key(ident.public_key, row, row.signature, context=ROW_CONTEXT)
    for change in ({"payload": b"x"}, {"seq": 2}, {"kind": "grant"}, {"hlc": Hlc(1)}):
        forged = msgspec.structs.replace(row, **change)
        with pytest.raises(BadSignature):
            verify_with_key(ident.public_key, forged, forged.signature, context=ROW_CONTEXT)
    # A row signature is not valid in another context (domain separation).
    with pytest.raises(BadSignature):
        verify_with_key(ident.public_key, row, row.signature, context="key_rotation")


def test_row_roundtrips_inside_a_batch_frame():
    ident = NodeIdentity.generate()
    rows = make_rows(ident, 3)
    data = msgspec.msgpack.encode(RowBatch(1, rows, [], False))
    got = msgspec.msgpack.decode(data, type=MeshMessage)
    assert isinstance(got, RowBatch) and got.rows == rows


def test_log_holds_a_prefix_per_origin():
    ident = NodeIdentity.generate()
    rows = make_rows(ident, 5)
    log = MemoryRowLog()
    fp0 = log.fingerprint()
    log.append(rows[0])
    with pytest.raises(RowGap):
        log.append(rows[2])  # would leave a gap
    with pytest.raises(RowGap):
        log.append(rows[0])  # not head + 1 either
    for r in rows[1:]:
        log.append(r)
    assert log.head(ident.peer_id) == 5 and len(log) == 5
    assert log.heads() == {ident.peer_id: 5}
    assert log.fingerprint() != fp0 and log.fingerprint() == digest_fingerprint({ident.peer_id: 5})
    assert [r.seq for r in log.rows_after(ident.peer_id, 2, 2)] == [3, 4]
    assert log.rows_after(ident.peer_id, 5, 10) == [] and log.get(ident.peer_id, 6) is None


def test_log_limits_refuse_and_never_evict():
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    log = MemoryRowLog(max_rows=5, max_rows_per_origin=3, max_origins=1)
    for r in make_rows(a, 3):
        log.append(r)
    with pytest.raises(LogFull) as err:
        log.append(make_rows(a, 1, start=4)[0])
    assert err.value.field == "max_rows_per_origin"
    with pytest.raises(LogFull) as err:
        log.append(make_rows(b, 1)[0])
    assert err.value.field == "max_origins"
    assert log.refused_full == 2 and log.head(a.peer_id) == 3  # nothing was evicted


def test_content_hash_ignores_resigning_but_not_content():
    ident = NodeIdentity.generate()
    rows = make_rows(ident, 2)
    l1, l2 = MemoryRowLog(), MemoryRowLog()
    for r in rows:
        l1.append(r)
        l2.append(r)
    assert l1.content_hash() == l2.content_hash()
    ident.rotate()
    l2.replace(ident.sign_record(msgspec.structs.replace(rows[0], key_id=ident.key_id)))
    assert l1.content_hash() == l2.content_hash()
    with pytest.raises(ValueError):
        l2.replace(msgspec.structs.replace(rows[1], payload=b"other"))


def test_mesh_ddl_applies_to_duckdb_twice():
    con = duckdb.connect()
    for _ in range(2):  # idempotent, as a migration must be
        for stmt in MESH_DDL:
            con.execute(stmt)
    tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert {"peers", "peer_keys", "trust_edges", "trust_scores", "grants", "mesh_rows"} <= tables
    con.execute(
        "INSERT INTO mesh_rows VALUES ('o', 1, 5, 0, 'doc', 'x'::BLOB, 'k', 's'::BLOB, now())"
    )
    with pytest.raises(duckdb.ConstraintException):
        con.execute(
            "INSERT INTO mesh_rows VALUES ('o', 1, 5, 0, 'doc', 'x'::BLOB, 'k', 's'::BLOB, now())"
        )


def test_configs_validate_with_field_names():
    with pytest.raises(ConfigError) as err:
        RowSyncConfig(max_batch_rows=0)
    assert err.value.field == "max_batch_rows"
    with pytest.raises(ConfigError) as err:
        RowSyncConfig(max_payload=1 << 20, max_batch_bytes=1 << 16)
    assert err.value.field == "max_batch_bytes"
    with pytest.raises(ConfigError) as err:
        TrustConfig(drop_threshold=0.5, sync_threshold=0.1)
    assert err.value.field == "drop_threshold"


# -- EigenTrust -----------------------------------------------------------------------------


def sybil_world(n_honest: int = 8, n_sybil: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_honest + n_sybil
    local = np.zeros((n, n))
    # Honest peers rate each other (random positive counts), sometimes rate nobody.
    local[:n_honest, :n_honest] = rng.integers(0, 20, size=(n_honest, n_honest))
    # The Sybil ring rates itself highly and rates honest peers too: no honest in-edge.
    local[n_honest:, n_honest:] = 1000
    local[n_honest:, :n_honest] = 5
    p = np.zeros(n)
    p[:2] = 1.0  # two pre-trusted honest peers
    return local, p


def test_eigentrust_sums_to_one_and_converges():
    local, p = sybil_world()
    t, iters = eigentrust(local, p, a=0.15, epsilon=1e-6)
    assert t.sum() == pytest.approx(1.0, abs=1e-9)
    assert (t >= 0).all() and 1 < iters < 1000
    # Converged: one more iteration changes the vector by less than epsilon.
    t2, _ = eigentrust(local, p, a=0.15, epsilon=1e-12)
    assert np.abs(t - t2).sum() < 1e-5


def test_sybil_ring_without_honest_in_edges_gets_about_zero():
    local, p = sybil_world(n_honest=8, n_sybil=20)
    t, _ = eigentrust(local, p, a=0.15)
    assert t[8:].sum() < 1e-9
    assert t[:8].sum() == pytest.approx(1.0)


def test_pretrusted_peers_keep_their_floor():
    local, p = sybil_world()
    local[:, :2] = 0  # nobody rates the pre-trusted peers at all
    a = 0.15
    t, _ = eigentrust(local, p, a=a)
    floor = a * p / p.sum()
    assert (t[:2] >= floor[:2] - 1e-12).all()


def test_eigentrust_rejects_bad_input():
    with pytest.raises(ValueError):
        eigentrust(np.ones((2, 3)), np.ones(2))
    with pytest.raises(ValueError):
        eigentrust(-np.ones((2, 2)), np.ones(2))
    with pytest.raises(ValueError):
        eigentrust(np.ones((2, 2)), np.zeros(2))


def test_trust_graph_reports_policy_and_forgery_evidence():
    g = TrustGraph("me", TrustConfig(forgery_penalty=10))
    for peer in ("a", "b", "c"):
        g.record("me", peer, satisfactory=5)
    g.set_report("a", 1, {"b": (3, 0), "c": (3, 0)})
    assert not g.set_report("a", 1, {"b": (100, 0)})  # not newer: ignored
    assert not g.set_report("me", 9, {})  # own edges are live evidence, never replaced
    # A Sybil ring reports about itself: nobody honest rates it.
    g.set_report("s1", 1, {"s2": (1000, 0)})
    g.set_report("s2", 1, {"s1": (1000, 0)})
    policy = TrustPolicy(g.config, self_id="me")
    assert policy.sync_from("s1")  # before any computation: benefit of the doubt
    before = g.compute(set())
    policy.update(before)
    assert sum(before.scores.values()) == pytest.approx(1.0)
    assert before.scores["s1"] < 1e-9 and before.scores["s2"] < 1e-9
    assert not policy.sync_from("s1") and not policy.accept_frames("s1")
    assert policy.sync_from("c") and policy.accept_frames("c")
    assert policy.sync_from("newcomer")  # no evidence about it: not judged
    g.record("me", "c", unsatisfactory=10)  # a forged row from c
    after = g.compute(set())
    assert after.scores["c"] < before.scores["c"]
    assert after.scores["me"] >= g.config.pretrust_weight - 1e-12  # the anchor's floor
    small = TrustGraph("me", TrustConfig(max_peers=3))
    small.record("me", "a", satisfactory=1)
    small.record("me", "b", satisfactory=1)
    small.record("me", "c", satisfactory=1)  # a 4th peer: refused, bounded
    assert small.peers() == {"me", "a", "b"} and small.refused == 1
