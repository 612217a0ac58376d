"""Transport on real loopback TCP: TLS 1.3 mutual auth, network key, tampering, limits."""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import pytest
import trio

from symbiote.actors.mesh.identity import NodeIdentity
from symbiote.actors.mesh.net import PeerAddr
from symbiote.actors.mesh.pki import MeshCA, NodeCredentials, peer_from_certificate
from symbiote.actors.mesh.transport import TcpTransport, open_tcp_transport
from symbiote.schema.mesh import (
    Ack,
    Alive,
    Gossip,
    HandshakeFailed,
    IdentityError,
    PeerMismatch,
    TransportConfig,
)


def cfg(**kw: Any) -> TransportConfig:
    return TransportConfig(handshake_timeout=3.0, dial_timeout=2.0, **kw)


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA.generate("test")


def creds(ca: MeshCA) -> NodeCredentials:
    return NodeCredentials.issue(ca, NodeIdentity.generate())


async def wait_for(pred, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():  # noqa: ASYNC110 (polls protocol state)
            await trio.sleep(0.01)


async def test_handshake_and_both_directions(ca):
    async with (
        open_tcp_transport(creds(ca), cfg()) as a,
        open_tcp_transport(creds(ca), cfg()) as b,
    ):
        assert a.send_nowait(PeerAddr(None, b.local.addr), Ack(seq=1))
        with trio.fail_after(5):
            got = await b.inbound.receive()
        assert got.msg == Ack(seq=1)
        assert got.sender == a.local  # authenticated id plus advertised address
        # The reply rides the connection A opened, found by peer id.
        assert b.send_nowait(PeerAddr(a.peer_id, a.local.addr), Ack(seq=2))
        with trio.fail_after(5):
            back = await a.inbound.receive()
        assert back.msg == Ack(seq=2) and back.sender.peer_id == b.peer_id
        assert a.connected_peers() == {b.peer_id}
        assert a.stats["established"] == 1 and b.stats["established"] == 1


async def test_wrong_network_key_fails_handshake(ca):
    other_mesh = MeshCA.generate("test")  # same mesh name, different network key
    async with (
        open_tcp_transport(creds(ca), cfg()) as a,
        open_tcp_transport(creds(other_mesh), cfg()) as c,
    ):
        assert a.send_nowait(PeerAddr(None, c.local.addr), Ack(seq=1))
        await wait_for(lambda: a.stats["handshake_failed"] and c.stats["handshake_failed"])
        assert a.stats["established"] == 0 and c.stats["established"] == 0
        assert a.connected_peers() == set() == c.connected_peers()
        with pytest.raises(trio.WouldBlock):
            c.inbound.receive_nowait()


async def test_dialing_an_address_that_is_another_peer_fails(ca):
    async with (
        open_tcp_transport(creds(ca), cfg()) as a,
        open_tcp_transport(creds(ca), cfg()) as b,
    ):
        impostor = NodeIdentity.generate().peer_id
        a.send_nowait(PeerAddr(impostor, b.local.addr), Ack(seq=1))
        await wait_for(lambda: a.stats["handshake_failed"] == 1)
        with pytest.raises(trio.WouldBlock):
            b.inbound.receive_nowait()


async def test_mesh_name_mismatch_fails(ca):
    async with (
        open_tcp_transport(creds(ca), cfg(mesh="blue")) as a,
        open_tcp_transport(creds(ca), cfg(mesh="green")) as b,
    ):
        a.send_nowait(PeerAddr(None, b.local.addr), Ack(seq=1))
        await wait_for(lambda: a.stats["handshake_failed"] and b.stats["handshake_failed"])


def test_certificate_must_match_claimed_peer_id(ca):
    ident, other = NodeIdentity.generate(), NodeIdentity.generate()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(ca.issue(ident)).public_bytes(serialization.Encoding.DER)
    assert peer_from_certificate(der) == (ident.peer_id, ident.public_key)
    # A CA-signed certificate naming another node's id over this node's key is refused.
    ident.peer_id = other.peer_id
    forged = x509.load_pem_x509_certificate(ca.issue(ident)).public_bytes(
        serialization.Encoding.DER
    )
    with pytest.raises(PeerMismatch):
        peer_from_certificate(forged)
    with pytest.raises(HandshakeFailed):
        peer_from_certificate(None)
    with pytest.raises(IdentityError):
        NodeCredentials(NodeIdentity.generate(), ca.issue(other), ca.certificate_pem)


async def _pump(src: trio.abc.Stream, dst: trio.abc.Stream, flip: dict[str, bool]) -> None:
    try:
        while data := await src.receive_some(65536):
            if flip.get("armed"):
                flip["armed"] = False
                # The last byte of a TLS record is in its AEAD tag: the record can no longer
                # authenticate, and the length fields stay intact.
                data = data[:-1] + bytes([data[-1] ^ 0x01])
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(dst)


async def test_flipped_byte_closes_the_connection(ca):
    flip: dict[str, bool] = {}
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_tcp_transport(creds(ca), cfg()))
        b = await stack.enter_async_context(open_tcp_transport(creds(ca), cfg()))
        nursery = await stack.enter_async_context(trio.open_nursery())

        async def proxy(client: trio.SocketStream) -> None:
            host, port = b.local.addr.rsplit(":", 1)
            upstream = await trio.open_tcp_stream(host, int(port))
            async with trio.open_nursery() as n:
                n.start_soon(_pump, client, upstream, flip)
                n.start_soon(_pump, upstream, client, {})

        listeners = await nursery.start(partial(trio.serve_tcp, proxy, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        a.send_nowait(PeerAddr(None, f"127.0.0.1:{port}"), Ack(seq=1))
        with trio.fail_after(5):
            assert (await b.inbound.receive()).msg == Ack(seq=1)
        flip["armed"] = True
        assert a.send_nowait(PeerAddr(b.peer_id, b.local.addr), Ack(seq=2))
        await wait_for(lambda: b.stats["closed_broken"] >= 1)
        await wait_for(lambda: a.connected_peers() == set())
        with pytest.raises(trio.WouldBlock):
            b.inbound.receive_nowait()  # the tampered frame was never delivered
        nursery.cancel_scope.cancel()


async def test_rate_limit_drops_excess_frames(ca):
    async with (
        open_tcp_transport(creds(ca), cfg(send_queue=128)) as a,
        open_tcp_transport(creds(ca), cfg(rate_per_s=5.0, rate_burst=5)) as b,
    ):
        start = trio.current_time()
        for i in range(100):
            assert a.send_nowait(PeerAddr(None, b.local.addr), Ack(seq=i))
        await wait_for(lambda: b.stats["rate_limited"] + b.stats["dropped_inbound"] >= 1)
        await wait_for(lambda: b.frame_stats.frames_in >= 101)  # hello + 100 acks read
        elapsed = trio.current_time() - start
        delivered = 0
        while True:
            try:
                b.inbound.receive_nowait()
            except trio.WouldBlock:
                break
            delivered += 1
        assert delivered <= 5 + 5 * elapsed + 1
        assert b.stats["rate_limited"] == 100 - delivered


async def test_oversize_frame_closes_connection(ca):
    async with (
        open_tcp_transport(creds(ca), cfg()) as a,
        open_tcp_transport(creds(ca), cfg(max_frame=256)) as b,
    ):
        a.send_nowait(PeerAddr(None, b.local.addr), Ack(seq=1))
        with trio.fail_after(5):
            await b.inbound.receive()
        big = Gossip(updates=[Alive("p" * 32, i, "127.0.0.1:1") for i in range(20)])
        a.send_nowait(PeerAddr(b.peer_id, b.local.addr), big)
        await wait_for(lambda: b.stats["closed_bad_frame"] == 1)
        assert b.frame_stats.errors["frame_too_large"] == 1


async def test_connection_cap(ca):
    async with AsyncExitStack() as stack:
        b = await stack.enter_async_context(open_tcp_transport(creds(ca), cfg(max_connections=1)))
        others: list[TcpTransport] = [
            await stack.enter_async_context(open_tcp_transport(creds(ca), cfg())) for _ in range(2)
        ]
        others[0].send_nowait(PeerAddr(None, b.local.addr), Ack(seq=1))
        with trio.fail_after(5):
            await b.inbound.receive()
        others[1].send_nowait(PeerAddr(None, b.local.addr), Ack(seq=2))
        await wait_for(lambda: b.stats["rejected_full"] == 1)
        await wait_for(lambda: others[1].stats["handshake_failed"] == 1)
