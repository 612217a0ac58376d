"""Mutually authenticated, encrypted TCP between mesh nodes: TLS 1.3 on trio.

Every connection:

1. TCP connect (bounded by ``dial_timeout``) or accept (refused at once beyond
   ``max_connections``);
2. TLS 1.3 handshake, both sides presenting a node certificate that OpenSSL verifies against
   the mesh CA (the network key): a node of another mesh fails here;
3. the peer id is read from the verified certificate and checked against its key
   (:func:`~symbiote.actors.mesh.pki.peer_from_certificate`);
4. both sides send a :class:`~symbiote.schema.mesh.Hello` (protocol version, peer id, advertised
   address, mesh name) and check the other's. In TLS 1.3 the client learns that the server
   refused its certificate only on its first read, so waiting for Hello also makes a refused
   client fail inside the handshake deadline instead of later.

Steps 1 to 4 all run under ``handshake_timeout``. Then a writer task drains the connection's
bounded send queue and a reader task delivers frames to the shared bounded inbound channel,
after the per-peer token bucket. TLS authenticates every record, so a flipped byte surfaces as
an SSL error and the connection is closed.

Drops (full queues, rate limit) are counted in :attr:`TcpTransport.stats` and logged sampled
(at counts 1, 2, 4, 8...) so a flood cannot flood the log.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from symbiote.actors.mesh.frames import FrameCodec, FrameReader, FrameStats, receive_frame
from symbiote.actors.mesh.identity import KeyRing
from symbiote.actors.mesh.net import Inbound, PeerAddr, parse_addr
from symbiote.actors.mesh.pki import NodeCredentials, peer_from_certificate
from symbiote.actors.mesh.ratelimit import BucketTable
from symbiote.schema.errors import ConfigError
from symbiote.schema.mesh import (
    PROTOCOL_VERSION,
    FrameError,
    FrameTooLarge,
    HandshakeFailed,
    Hello,
    MalformedFrame,
    MeshMessage,
    PeerMismatch,
    TransportConfig,
)

__all__ = ["TcpTransport", "open_tcp_transport"]

log = logging.getLogger(__name__)

#: Keys of :attr:`TcpTransport.stats`, a closed set.
STAT_KEYS = (
    "accepted",
    "dialed",
    "dial_failed",
    "rejected_full",
    "handshake_failed",
    "established",
    "closed",
    "closed_broken",
    "closed_bad_frame",
    "closed_idle",
    "rate_limited",
    "dropped_send_queue",
    "dropped_inbound",
    "dropped_unroutable",
)


def _sampled(n: int) -> bool:
    return n & (n - 1) == 0


class _Conn:
    """One TCP connection and its bounded send queue."""

    __slots__ = ("addr", "expected", "last_active", "outbound", "peer_id", "rx", "scope", "tx")

    def __init__(self, addr: str, expected: str | None, *, outbound: bool, queue: int) -> None:
        self.addr = addr
        self.expected = expected
        self.outbound = outbound
        self.peer_id: str | None = None
        self.tx, self.rx = trio.open_memory_channel[bytes](queue)
        self.scope = trio.CancelScope()
        self.last_active = trio.current_time()


class TcpTransport:
    """The mesh :class:`~symbiote.actors.mesh.net.Network` over TLS 1.3 on TCP.

    Start it with :func:`open_tcp_transport` (or ``await nursery.start(transport.serve)``).
    """

    def __init__(
        self,
        credentials: NodeCredentials,
        config: TransportConfig | None = None,
        *,
        keyring: KeyRing | None = None,
    ) -> None:
        self.config = config if config is not None else TransportConfig()
        self.credentials = credentials
        self.peer_id = credentials.identity.peer_id
        self._keyring = keyring
        self._server_ctx = credentials.ssl_context(server_side=True)
        self._client_ctx = credentials.ssl_context(server_side=False)
        self.frame_stats = FrameStats()
        self._codec: FrameCodec[MeshMessage] = FrameCodec(
            MeshMessage, max_frame=self.config.max_frame, stats=self.frame_stats
        )
        self._in_tx, self._in_rx = trio.open_memory_channel[Inbound](self.config.inbound_queue)
        self._conns: set[_Conn] = set()
        self._by_peer: dict[str, _Conn] = {}
        self._by_addr: dict[str, _Conn] = {}
        self._dialing: dict[str, _Conn] = {}
        self._buckets = BucketTable(
            self.config.rate_per_s, self.config.rate_burst, max_keys=2 * self.config.max_connections
        )
        self._nursery: trio.Nursery | None = None
        self._local: PeerAddr | None = None
        self._listeners: list[trio.SocketListener] | None = None
        #: Counters, keys in ``STAT_KEYS``.
        self.stats: Counter[str] = Counter({k: 0 for k in STAT_KEYS})

    # -- Network protocol ----------------------------------------------------------------

    @property
    def local(self) -> PeerAddr:
        """This node's peer id and advertised address (valid once serving)."""
        if self._local is None:
            raise RuntimeError("transport is not serving yet")
        return self._local

    @property
    def inbound(self) -> trio.MemoryReceiveChannel[Inbound]:
        """Authenticated messages from peers."""
        return self._in_rx

    def connected_peers(self) -> set[str]:
        """Peer ids with an established connection."""
        return set(self._by_peer)

    def send_nowait(self, to: PeerAddr, msg: MeshMessage) -> bool:
        """Queue ``msg`` for ``to``, dialing if needed; False (and counted) if dropped."""
        try:
            frame = self._codec.encode(msg)
        except FrameTooLarge:
            log.warning("message too large to send", extra={"peer_id": to.peer_id})
            return False
        conn = self._route(to)
        if conn is None:
            self._count_drop("dropped_unroutable", to.peer_id)
            return False
        try:
            conn.tx.send_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._count_drop("dropped_send_queue", to.peer_id)
            return False
        return True

    def _route(self, to: PeerAddr) -> _Conn | None:
        if to.peer_id is not None and to.peer_id == self.peer_id:
            return None
        conn = self._by_peer.get(to.peer_id) if to.peer_id is not None else None
        if conn is None:
            conn = self._by_addr.get(to.addr) or self._dialing.get(to.addr)
        if conn is not None:
            return conn
        if self._nursery is None or len(self._conns) >= self.config.max_connections:
            return None
        conn = _Conn(to.addr, to.peer_id, outbound=True, queue=self.config.send_queue)
        self._conns.add(conn)
        self._dialing[to.addr] = conn
        self.stats["dialed"] += 1
        self._nursery.start_soon(self._dial, conn)
        return conn

    def _count_drop(self, key: str, peer_id: str | None) -> None:
        self.stats[key] += 1
        if _sampled(self.stats[key]):
            log.warning("mesh %s (count %d)", key, self.stats[key], extra={"peer_id": peer_id})

    # -- lifecycle -----------------------------------------------------------------------

    async def bind(self) -> None:
        """Open the listening sockets now (``serve`` uses them); idempotent.

        Raises :class:`~symbiote.schema.errors.ConfigError` (field ``listen``) when the
        address cannot be bound, e.g. the port is taken: the owner can then fail its start
        cleanly instead of crashing once it runs.
        """
        if self._listeners is not None:
            return
        try:
            self._listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        except OSError as exc:
            where = f"{self.config.host}:{self.config.port}"
            raise ConfigError(
                f"cannot listen on {where}: {exc.strerror or exc}", field="listen"
            ) from exc

    async def aclose_listeners(self) -> None:
        """Close sockets from :meth:`bind` that ``serve`` never took over."""
        listeners, self._listeners = self._listeners, None
        for listener in listeners or ():
            await listener.aclose()

    async def serve(
        self, *, task_status: trio.TaskStatus[TcpTransport] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen (on the sockets of :meth:`bind`, if called) and run connections until
        cancelled."""
        async with trio.open_nursery() as nursery:
            await self.bind()
            listeners, self._listeners = self._listeners, None
            assert listeners is not None
            host, port = listeners[0].socket.getsockname()[:2]
            advertise = self.config.advertise or (
                f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            )
            self._local = PeerAddr(self.peer_id, advertise)
            self._nursery = nursery
            await nursery.start(trio.serve_listeners, self._on_accept, listeners)
            log.info("mesh transport listening on %s", advertise, extra={"peer_id": self.peer_id})
            task_status.started(self)

    async def _on_accept(self, tcp: trio.SocketStream) -> None:
        if len(self._conns) >= self.config.max_connections:
            self._count_drop("rejected_full", None)
            await trio.aclose_forcefully(tcp)
            return
        try:
            host, port = tcp.socket.getpeername()[:2]
            remote = f"{host}:{port}"
        except OSError:
            remote = "?"
        conn = _Conn(remote, None, outbound=False, queue=self.config.send_queue)
        self._conns.add(conn)
        self.stats["accepted"] += 1
        try:
            await self._run(conn, tcp, server_side=True)
        finally:
            self._forget(conn)

    async def _dial(self, conn: _Conn) -> None:
        try:
            host, port = parse_addr(conn.addr)
            with trio.fail_after(self.config.dial_timeout):
                tcp = await trio.open_tcp_stream(host, port)
        except (OSError, ValueError, trio.TooSlowError) as exc:
            self._forget(conn)
            self._count_drop("dial_failed", conn.expected)
            log.debug("dial %s failed: %r", conn.addr, exc, extra={"peer_id": conn.expected})
            return
        try:
            await self._run(conn, tcp, server_side=False)
        finally:
            self._forget(conn)

    # -- one connection ------------------------------------------------------------------

    async def _run(self, conn: _Conn, tcp: trio.SocketStream, *, server_side: bool) -> None:
        ctx = self._server_ctx if server_side else self._client_ctx
        stream = trio.SSLStream(tcp, ctx, server_side=server_side)
        reader = FrameReader(self._codec)
        try:
            with conn.scope:
                try:
                    with trio.fail_after(self.config.handshake_timeout):
                        hello = await self._handshake(conn, stream, reader)
                except (
                    HandshakeFailed,
                    FrameError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    trio.TooSlowError,
                ) as exc:
                    self.stats["handshake_failed"] += 1
                    log.warning(
                        "mesh handshake with %s failed: %r",
                        conn.addr,
                        exc.__cause__ or exc,
                        extra={"peer_id": conn.peer_id or conn.expected},
                    )
                    return
                self._register(conn, hello)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, conn, stream, nursery.cancel_scope)
                    nursery.start_soon(self._watchdog, conn, nursery.cancel_scope)
                    nursery.start_soon(self._reader, conn, stream, reader, nursery.cancel_scope)
        finally:
            self.stats["closed"] += 1
            await trio.aclose_forcefully(stream)

    async def _handshake(
        self,
        conn: _Conn,
        stream: trio.SSLStream[trio.SocketStream],
        reader: FrameReader[MeshMessage],
    ) -> Hello:
        await stream.do_handshake()
        peer_id, _key = peer_from_certificate(stream.getpeercert(binary_form=True), self._keyring)
        conn.peer_id = peer_id
        if conn.expected is not None and conn.expected != peer_id:
            raise PeerMismatch(f"expected {conn.expected}, reached {peer_id}", field="peer_id")
        if peer_id == self.peer_id:
            raise PeerMismatch("connected to itself", field="peer_id")
        await stream.send_all(
            self._codec.encode(
                Hello(PROTOCOL_VERSION, self.peer_id, self.local.addr, self.config.mesh)
            )
        )
        hello = await receive_frame(stream, reader)
        if not isinstance(hello, Hello):
            raise HandshakeFailed("peer did not start with hello", field="hello")
        if hello.version != PROTOCOL_VERSION:
            raise HandshakeFailed(f"protocol version {hello.version}", field="version")
        if hello.mesh != self.config.mesh:
            raise HandshakeFailed(f"peer is in mesh {hello.mesh[:64]!r}", field="mesh")
        if hello.peer_id != peer_id:
            raise PeerMismatch("hello peer id differs from certificate", field="peer_id")
        try:
            parse_addr(hello.addr)
        except ValueError as exc:
            raise HandshakeFailed(str(exc), field="addr") from exc
        return hello

    def _register(self, conn: _Conn, hello: Hello) -> None:
        assert conn.peer_id is not None
        if self._dialing.get(conn.addr) is conn:
            del self._dialing[conn.addr]
        conn.addr = hello.addr
        self.stats["established"] += 1
        old = self._by_peer.get(conn.peer_id)
        if old is None or self._preferred(conn, old):
            self._by_peer[conn.peer_id] = conn
            self._by_addr[conn.addr] = conn
        log.debug(
            "mesh connection up (%s)",
            "out" if conn.outbound else "in",
            extra={"peer_id": conn.peer_id},
        )

    def _preferred(self, new: _Conn, old: _Conn) -> bool:
        # Two nodes that dial each other at once end with two connections. Both sides send on
        # the one dialed by the smaller peer id, so they agree without a message; the other
        # falls idle and the watchdog closes it.
        if new.outbound == old.outbound:
            return True
        assert new.peer_id is not None
        return new.outbound == (self.peer_id < new.peer_id)

    def _forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        conn.tx.close()
        if self._dialing.get(conn.addr) is conn:
            del self._dialing[conn.addr]
        if self._by_addr.get(conn.addr) is conn:
            del self._by_addr[conn.addr]
        if conn.peer_id is not None and self._by_peer.get(conn.peer_id) is conn:
            del self._by_peer[conn.peer_id]
            for other in self._conns:  # promote a surviving duplicate, if any
                if other.peer_id == conn.peer_id and other not in self._dialing.values():
                    self._by_peer[conn.peer_id] = other
                    self._by_addr[other.addr] = other
                    break

    async def _writer(
        self, conn: _Conn, stream: trio.SSLStream[trio.SocketStream], done: trio.CancelScope
    ) -> None:
        try:
            async for frame in conn.rx:
                await stream.send_all(frame)
                conn.last_active = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.stats["closed_broken"] += 1
        finally:
            done.cancel()

    async def _watchdog(self, conn: _Conn, done: trio.CancelScope) -> None:
        idle = self.config.idle_timeout
        while True:
            await trio.sleep(idle / 4)
            if trio.current_time() - conn.last_active >= idle:
                self.stats["closed_idle"] += 1
                log.debug("closing idle connection", extra={"peer_id": conn.peer_id})
                done.cancel()
                return

    async def _reader(
        self,
        conn: _Conn,
        stream: trio.SSLStream[trio.SocketStream],
        reader: FrameReader[MeshMessage],
        done: trio.CancelScope,
    ) -> None:
        peer_id = conn.peer_id
        assert peer_id is not None
        try:
            while True:
                msg = await receive_frame(stream, reader)
                if msg is None:
                    return
                now = trio.current_time()
                conn.last_active = now
                if isinstance(msg, Hello):
                    raise self.frame_stats.count_error(
                        MalformedFrame("hello after the handshake", field="type")
                    )
                if not self._buckets.take(peer_id, now):
                    self._count_drop("rate_limited", peer_id)
                    continue
                try:
                    self._in_tx.send_nowait(Inbound(PeerAddr(peer_id, conn.addr), msg))
                except trio.WouldBlock:
                    self._count_drop("dropped_inbound", peer_id)
        except FrameError as exc:
            self.stats["closed_bad_frame"] += 1
            log.warning("closing connection on bad frame: %s", exc, extra={"peer_id": peer_id})
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # A TLS record that fails authentication (a flipped byte) lands here.
            self.stats["closed_broken"] += 1
            log.warning("connection broken: %r", exc.__cause__ or exc, extra={"peer_id": peer_id})
        finally:
            done.cancel()


@asynccontextmanager
async def open_tcp_transport(
    credentials: NodeCredentials,
    config: TransportConfig | None = None,
    *,
    keyring: KeyRing | None = None,
) -> AsyncIterator[TcpTransport]:
    """Run a :class:`TcpTransport` for the duration of the block."""
    transport = TcpTransport(credentials, config, keyring=keyring)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve)
        try:
            yield transport
        finally:
            nursery.cancel_scope.cancel()
