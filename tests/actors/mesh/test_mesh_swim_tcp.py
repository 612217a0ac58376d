"""SWIM on the real TLS transport over loopback: join, then detect a crashed node."""

from __future__ import annotations

import random

import trio

from symbiote.actors.mesh.identity import NodeIdentity
from symbiote.actors.mesh.pki import MeshCA, NodeCredentials
from symbiote.actors.mesh.swim import SwimNode
from symbiote.actors.mesh.transport import TcpTransport
from symbiote.schema.mesh import TransportConfig
from tests.actors.mesh.timers import FAST_SWIM

# Real time, so timers are scaled down (x 1/5 of the LAN profile) to keep the test short.
CFG = FAST_SWIM


async def test_three_nodes_join_and_detect_a_crash_over_tls():
    ca = MeshCA.generate("tcp-test")
    async with trio.open_nursery() as nursery:
        nodes: list[SwimNode] = []
        scopes: list[trio.CancelScope] = []
        for i in range(3):
            transport = TcpTransport(
                NodeCredentials.issue(ca, NodeIdentity.generate()),
                TransportConfig(handshake_timeout=2.0),
            )
            node = SwimNode(transport, CFG, rng=random.Random(i))
            scope = trio.CancelScope()

            async def run(
                transport=transport, node=node, scope=scope, task_status=trio.TASK_STATUS_IGNORED
            ):
                with scope:
                    async with trio.open_nursery() as inner:
                        await inner.start(transport.serve)
                        await inner.start(node.run)
                        task_status.started()

            await nursery.start(run)
            if nodes:
                await node.join([nodes[0].addr])
            nodes.append(node)
            scopes.append(scope)

        ids = {n.peer_id for n in nodes}
        with trio.fail_after(10):
            while not all(n.member_ids("alive") == ids - {n.peer_id} for n in nodes):  # noqa: ASYNC110 (polls protocol state)
                await trio.sleep(0.05)

        scopes[2].cancel()  # node 2 crashes: its sockets close, it answers nothing
        crashed = nodes[2].peer_id
        with trio.fail_after(10):
            while not all(n.member_ids("dead") == {crashed} for n in nodes[:2]):  # noqa: ASYNC110 (polls protocol state)
                await trio.sleep(0.05)
        assert all(n.member_ids("alive") == ids - {n.peer_id, crashed} for n in nodes[:2])
        nursery.cancel_scope.cancel()
