"""Signed rows over the real TLS transport on loopback: three nodes converge to one hash."""

from __future__ import annotations

import random

import trio

from symbiote.actors.mesh.antientropy import RowSync
from symbiote.actors.mesh.identity import NodeIdentity
from symbiote.actors.mesh.pki import MeshCA, NodeCredentials
from symbiote.actors.mesh.rows import MemoryRowLog
from symbiote.actors.mesh.swim import SwimNode
from symbiote.actors.mesh.transport import TcpTransport
from symbiote.schema.mesh import RowSyncConfig, TransportConfig, TrustConfig
from tests.actors.mesh.timers import FAST_SWIM

SWIM = FAST_SWIM
SYNC = RowSyncConfig(sync_interval=0.05, sync_timeout=1.0, max_batch_rows=16)


async def test_rows_converge_over_tls_with_a_partitioned_pair():
    ca = MeshCA.generate("rows-tcp")
    nodes: list[RowSync] = []
    async with trio.open_nursery() as nursery:
        for i in range(3):
            ident = NodeIdentity.generate()
            transport = TcpTransport(
                NodeCredentials.issue(ca, ident), TransportConfig(handshake_timeout=2.0)
            )
            node = SwimNode(transport, SWIM, rng=random.Random(i))
            rs = RowSync(
                node,
                ident,
                SYNC,
                trust_config=TrustConfig(report_interval=None),
                rng=random.Random(i),
            )
            await nursery.start(transport.serve)
            await nursery.start(node.run)
            await nursery.start(rs.run)
            if nodes:
                await node.join([nodes[0].swim.addr])
            nodes.append(rs)
        for n in nodes:
            for k in range(40):  # 40 rows each, several bounded batches per origin
                n.publish("doc", b"%d" % k)
        with trio.fail_after(4):
            while len({n.fingerprint() for n in nodes}) != 1:  # noqa: ASYNC110 (polls protocol state)
                await trio.sleep(0.02)
        hashes = set()
        for n in nodes:
            assert isinstance(n.log, MemoryRowLog)
            assert len(n.log) == 120
            hashes.add(n.log.content_hash())
            assert n.stats["bad_signature"] == 0
        assert len(hashes) == 1
        nursery.cancel_scope.cancel()
