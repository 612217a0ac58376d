"""The mesh actor: this node's place in the mesh, as one child of the runtime's supervisor.

It owns a :class:`~symbiote.actors.mesh.transport.TcpTransport` (TLS 1.3), a
:class:`~symbiote.actors.mesh.swim.SwimNode` (membership), a
:class:`~symbiote.actors.mesh.antientropy.RowSync` (signed rows, trust) over a
:class:`~symbiote.actors.mesh.store.PersistentRowLog`, a
:class:`~symbiote.actors.mesh.grants.GrantBook` and a
:class:`~symbiote.actors.mesh.federation.Federation` (federated search). It holds no database
connection: it reads through a reader actor and writes through the writer actor, whose refs
the composition root hands it (:class:`MeshLinks`). Refs are stable across restarts, so a
restart of the data actors does not take the node off the network; writes then wait for the
new writer, and the flusher retries.

Life cycle:

* ``on_start``: load the node key (created with mode 0600 if missing), the CA certificate and
  the node certificate (issued here from the network key when one is configured), and the
  bootstrap file, in a worker thread; read back the stored rows, key chains, own trust
  evidence and recent peers through a reader; rebuild the log and the key ring.
* ``run``: serve the transport, SWIM, anti-entropy, federated search, and four loops:
  the **flusher** (backlog -> writer, in append order, retried with backoff), **state**
  (peers, own trust edges and the latest trust scores -> writer, every ``state_interval_s``
  when changed), **trust reports** (published durably when this node's evidence changed),
  and **join** (bootstrap seeds and the peers seen last, retried while no member is alive).
  Requests: :class:`MeshPublish`, :class:`MeshGrant`, :class:`MeshSearch` (run as tasks, at
  most ``max_outgoing`` at once), :class:`MeshMembers`, :class:`MeshStatus`,
  :class:`MeshJoin`, :class:`MeshFlush`.
* ``on_stop``: flush what is left of the backlog and the state, within the shutdown deadline.

Durability (see :mod:`~symbiote.actors.mesh.store`): a publish is acknowledged after its row
committed; received rows are committed write-behind, and a crash loses at most the unflushed
tail, which anti-entropy fetches again.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import pyarrow as pa
import trio

from symbiote.actors.mesh.antientropy import RowSync
from symbiote.actors.mesh.bootstrap import Bootstrap, load_bootstrap
from symbiote.actors.mesh.federation import Federation, FederationConfig, LocalHit, LocalSearch
from symbiote.actors.mesh.grants import GrantBook, decode_grant, grant_record
from symbiote.actors.mesh.identity import KeyRing, NodeIdentity
from symbiote.actors.mesh.pki import MeshCA, NodeCredentials
from symbiote.actors.mesh.store import (
    LOAD_CHAINS_SQL,
    LOAD_EDGES_SQL,
    LOAD_PEERS_SQL,
    LOAD_ROWS_SQL,
    PersistentRowLog,
    chain_records,
    chains_from_table,
    restore_log,
    rows_from_table,
)
from symbiote.actors.mesh.swim import SwimNode
from symbiote.actors.mesh.transport import TcpTransport
from symbiote.actors.search import SearchPlanner
from symbiote.runtime import Actor, Busy, Inbox, Request
from symbiote.schema.errors import (
    BadArgument,
    ConfigError,
    DeadlineExceeded,
    SymbioteError,
)
from symbiote.schema.mesh import (
    BadSignature,
    FederatedHits,
    Grant,
    IdentityError,
    InsecureKeyFile,
    JoinFailed,
    LogFull,
    MemberInfo,
    MeshInfo,
    PeerKeyRecord,
    PeerRecord,
    Published,
    Row,
    RowSyncConfig,
    SwimConfig,
    TransportConfig,
    TrustConfig,
    TrustEdgeRecord,
    TrustReport,
    TrustScoreRecord,
    check_grant,
)
from symbiote.schema.messages import PersistMesh, WriteAck

__all__ = [
    "Mesh",
    "MeshFlush",
    "MeshGrant",
    "MeshJoin",
    "MeshLinks",
    "MeshMembers",
    "MeshPublish",
    "MeshSearch",
    "MeshSettings",
    "MeshStatus",
    "local_search_via",
]

log = logging.getLogger("symbiote.mesh")

#: Row kinds only the mesh itself publishes (through grant() and the trust loop).
RESERVED_KINDS: Final = frozenset({"grant", "trust_report"})
#: Peers read back at start as extra join seeds.
_SEED_PEERS: Final = 64
_REPORT_DECODER = msgspec.msgpack.Decoder(TrustReport)


# --------------------------------------------------------------------------- settings, links


class MeshSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the mesh actor runs; built from the runtime Config by the composition root."""

    key_path: str
    ca_cert_path: str
    cert_path: str = ""
    ca_key_path: str = ""
    bootstrap_path: str = ""
    transport: TransportConfig = msgspec.field(default_factory=TransportConfig)
    swim: SwimConfig = msgspec.field(default_factory=SwimConfig)
    sync: RowSyncConfig = msgspec.field(default_factory=RowSyncConfig)
    trust: TrustConfig = msgspec.field(default_factory=TrustConfig)
    federation: FederationConfig = msgspec.field(default_factory=lambda: FederationConfig(dim=1))
    #: Flusher: rows and bytes per PersistMesh, and the pause that lets a group gather.
    persist_batch_rows: int = 1024
    persist_batch_bytes: int = 4 << 20
    persist_delay_s: float = 0.05
    #: Rows received but not yet committed; beyond, new rows are refused (LogFull).
    persist_backlog: int = 100_000
    #: Seconds between writes of peers, own trust edges and trust scores (when changed).
    state_interval_s: float = 5.0
    #: Seconds between join attempts while no member is alive.
    join_retry_s: float = 10.0
    #: Deadline of one request to the writer or a reader.
    io_timeout_s: float = 30.0
    max_grants: int = 65_536


WriteFn = Callable[[PersistMesh, float], Awaitable[WriteAck]]
SqlFn = Callable[[str, list[Any], float], Awaitable[pa.Table]]


@dataclass(frozen=True, slots=True)
class MeshLinks:
    """How the mesh actor reaches the rest of the runtime (given by the composition root).

    ``write`` asks the writer actor; ``sql`` runs a read-only statement on a reader actor;
    ``search`` is this node's own vector search (None when the index is off: the node then
    asks but does not answer federated searches).
    """

    write: WriteFn
    sql: SqlFn
    search: LocalSearch | None = None


# --------------------------------------------------------------------------- messages


class MeshPublish(msgspec.Struct, frozen=True, kw_only=True):
    """Publish a row of ``kind`` with ``payload``; answered by :class:`Published` after COMMIT."""

    kind: str
    payload: bytes


class MeshGrant(msgspec.Struct, frozen=True, kw_only=True):
    """Publish ``grant`` as a signed grant row; answered by :class:`Published`."""

    grant: Grant


class MeshSearch(msgspec.Struct, frozen=True, kw_only=True):
    """A federated search (see :meth:`Federation.search`); answered by :class:`FederatedHits`."""

    vector: Any
    k: int = 10
    tags: tuple[str, ...] = ()
    where: Any = None
    deadline_s: float = 1.0
    peers: tuple[str, ...] | None = None
    include_local: bool = True


class MeshMembers(msgspec.Struct, frozen=True):
    """Ask for the members this node knows; answered by ``list[MemberInfo]``."""


class MeshStatus(msgspec.Struct, frozen=True):
    """Ask for a :class:`MeshInfo`."""


class MeshJoin(msgspec.Struct, frozen=True, kw_only=True):
    """Join through ``addrs`` ("host:port"); answered by how many answered (JoinFailed if none)."""

    addrs: tuple[str, ...]


class MeshFlush(msgspec.Struct, frozen=True):
    """Commit the whole persist backlog now; answered by the number of rows committed."""


# --------------------------------------------------------------------------- local search

_DOCS_SQL: Final = (
    "SELECT id, title, authors, tags FROM documents"
    """ WHERE id IN (SELECT unnest(json_transform(?, '["VARCHAR"]')))"""
)
_json = msgspec.json.Encoder()


def local_search_via(planner: SearchPlanner, sql: SqlFn) -> LocalSearch:
    """This node's search for federated answers: the planner, then the hits' documents."""

    async def search(vector: Any, k: int, flt: Any, timeout: float) -> list[LocalHit]:
        deadline = trio.current_time() + timeout
        hits = await planner.search(vector, k, where=flt, with_rows=True, timeout=timeout)
        if not hits.chunk_ids:
            return []
        left = deadline - trio.current_time()
        if left <= 0:
            raise DeadlineExceeded("no time left to read the hits' documents")
        ids = sorted(set(hits.document_ids))
        table = await sql(_DOCS_SQL, [_json.encode(ids).decode()], left)
        docs = {
            doc_id: (title, authors, tags)
            for doc_id, title, authors, tags in zip(
                *(table.column(i).to_pylist() for i in range(4)), strict=True
            )
        }
        rows = {r.chunk_id: r for r in hits.rows or ()}
        out: list[LocalHit] = []
        for cid, did, dist in zip(hits.chunk_ids, hits.document_ids, hits.distances, strict=True):
            row = rows.get(cid)
            title, authors, tags = docs.get(did, (None, None, None))
            out.append(
                LocalHit(
                    chunk_id=cid,
                    document_id=did,
                    distance=float(dist),
                    text=None if row is None else row.text,
                    title=title,
                    authors=authors,
                    tags=tags,
                    metadata=None if row is None else row.metadata,
                )
            )
        return out

    return search


# --------------------------------------------------------------------------- files


def _read_file(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}", field=field) from None


def _read_private(path: str, field: str) -> bytes:
    """A private key file's bytes; refused if group or others may read or write it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}", field=field) from None
    if st.st_mode & 0o077:
        raise InsecureKeyFile(
            f"{path} has mode {stat.S_IMODE(st.st_mode):#o}; it must be accessible by its "
            f"owner only (run: chmod 600 {path})",
            field=field,
        )
    return _read_file(path, field)


def _write_public(path: str, data: bytes) -> None:
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)


# --------------------------------------------------------------------------- the actor


class Mesh(Actor):
    """This node in the mesh; see the module docstring."""

    accepts = (MeshPublish, MeshGrant, MeshSearch, MeshMembers, MeshStatus, MeshJoin, MeshFlush)

    def __init__(self, settings: MeshSettings, links: MeshLinks) -> None:
        self.settings = settings
        self.links = links
        self.peer_id = ""
        self.stats: Counter[str] = Counter()
        self._started = False
        self._publish_lock = trio.Lock()
        self._own_uncertain = False
        self._searching = 0
        self._joining = False
        self._seeds: list[str] = []
        self._reported: dict[str, tuple[int, int]] = {}
        # What the database already holds, so the state loop writes only changes (bounded by
        # the members, peers and origins the node tracks).
        self._chain_saved: dict[str, int] = {}
        self._peer_saved: dict[str, tuple[str, int, str, bool]] = {}
        self._edges_saved: dict[str, tuple[int, int]] = {}
        self._scores_saved = 0.0
        self._extra: dict[str, Any] = {}

    # -- start ---------------------------------------------------------------------------

    async def on_start(self) -> None:
        s = self.settings
        identity, creds, boot = await trio.to_thread.run_sync(self._load_files)
        self.identity = identity
        self.peer_id = identity.peer_id
        self._extra = {"peer_id": self.peer_id}
        t = s.io_timeout_s
        rows_t = await self.links.sql(LOAD_ROWS_SQL, [s.sync.max_rows + 1], t)
        chains_t = await self.links.sql(LOAD_CHAINS_SQL, [s.sync.max_origins * 65], t)
        peers_t = await self.links.sql(LOAD_PEERS_SQL, [self.peer_id, _SEED_PEERS], t)
        edges_t = await self.links.sql(LOAD_EDGES_SQL, [self.peer_id, s.trust.max_peers], t)
        row_log, restored = await trio.to_thread.run_sync(self._build_log, rows_t)
        chains = await trio.to_thread.run_sync(chains_from_table, chains_t)

        keyring = KeyRing(s.sync.max_origins)
        self.log = row_log
        self.transport = TcpTransport(creds, s.transport, keyring=keyring)
        self.swim = SwimNode(self.transport, s.swim)
        # Trust reports go through the durable publish path of this actor (_report_loop).
        trust = msgspec.structs.replace(s.trust, report_interval=None)
        self.sync = RowSync(
            self.swim,
            identity,
            s.sync,
            row_log=row_log,
            trust_config=trust,
            keyring=keyring,
            pretrusted=boot.pretrusted if boot is not None else set(),
        )
        for chain in chains:
            try:
                self.sync.learn_chain(chain)
                self._chain_saved[chain.peer_id] = len(chain.rotations)
            except BadSignature as exc:
                log.warning("stored key chain refused: %s", exc, extra=self._extra)
        if boot is not None:
            boot.add_keys(keyring)
        self.grants = GrantBook(self.peer_id, max_grants=s.max_grants)
        self.sync.on_row.append(self._on_row)
        for i in range(0, len(restored), 2000):
            # Slices with a checkpoint between them: a large log must not block the loop.
            self.sync.absorb_restored(restored[i : i + 2000])
            await trio.lowlevel.checkpoint()
        for to, sat, unsat in zip(*(edges_t.column(i).to_pylist() for i in range(3)), strict=True):
            self.sync.trust.record(self.peer_id, to, satisfactory=sat, unsatisfactory=unsat)
            self._edges_saved[to] = (sat, unsat)
        self.federation = Federation(self.sync, self.grants, s.federation, local=self.links.search)
        seeds = list(boot.seeds) if boot is not None else []
        for addrs in peers_t.column(1).to_pylist():
            seeds.extend(a for a in addrs or () if a not in seeds)
        self._seeds = seeds
        # Bound here, not in run(): a taken port then fails the start (open_runtime raises
        # ConfigError naming mesh_listen) instead of crashing the running actor again and
        # again until its supervisor gives up.
        try:
            await self.transport.bind()
        except ConfigError as exc:
            raise ConfigError(exc.message, field="mesh_listen") from exc
        self._started = True
        log.info(
            "mesh node ready",
            extra={**self._extra, "rows": len(row_log), "origins": len(row_log.heads())},
        )

    def _load_files(self) -> tuple[NodeIdentity, NodeCredentials, Bootstrap | None]:
        """Key, certificates and bootstrap file (blocking file I/O: runs in a worker thread)."""
        s = self.settings
        key_dir = Path(s.key_path).parent
        if not key_dir.exists():
            key_dir.mkdir(mode=0o700, parents=True)
        identity = NodeIdentity.load_or_create(s.key_path)
        ca_pem = _read_file(s.ca_cert_path, "mesh_ca_cert_path")
        creds: NodeCredentials | None = None
        if s.cert_path and Path(s.cert_path).exists():
            try:
                creds = NodeCredentials(identity, _read_file(s.cert_path, "mesh_cert_path"), ca_pem)
            except IdentityError:
                if not s.ca_key_path:
                    raise
                log.info("node certificate is for another key: issuing a new one")
        if creds is None:
            if not s.ca_key_path:
                raise ConfigError(
                    "no node certificate: set mesh_cert_path to an existing certificate, or "
                    "mesh_ca_key_path to the network key to issue one",
                    field="mesh_cert_path",
                )
            ca_key = _read_private(s.ca_key_path, "mesh_ca_key_path")
            try:
                ca = MeshCA.from_pem(ca_key, ca_pem)
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"unreadable network key: {exc}", field="mesh_ca_key_path"
                ) from None
            creds = NodeCredentials.issue(ca, identity)
            if s.cert_path:
                _write_public(s.cert_path, creds.certificate_pem)
        boot = load_bootstrap(s.bootstrap_path, mesh=s.transport.mesh) if s.bootstrap_path else None
        return identity, creds, boot

    def _build_log(self, rows_t: pa.Table) -> tuple[PersistentRowLog, list[Row]]:
        c = self.settings.sync
        row_log = PersistentRowLog(
            max_rows=c.max_rows,
            max_rows_per_origin=c.max_rows_per_origin,
            max_origins=c.max_origins,
            max_backlog=self.settings.persist_backlog,
            peer_id=self.peer_id,
        )
        return row_log, restore_log(row_log, rows_from_table(rows_t))

    # -- run -------------------------------------------------------------------------------

    async def run(self, inbox: Inbox) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.transport.serve)
            await nursery.start(self.swim.run)
            await nursery.start(self.sync.run)
            await nursery.start(self.federation.run)
            nursery.start_soon(self._flush_loop)
            nursery.start_soon(self._state_loop)
            if self.settings.trust.report_interval is not None:
                nursery.start_soon(self._report_loop, self.settings.trust.report_interval)
            if self._seeds:
                nursery.start_soon(self._join_loop)
            log.info("mesh listening on %s", self.transport.local.addr, extra=self._extra)
            async for request in inbox:
                msg = request.msg
                if isinstance(msg, MeshSearch):
                    self._start_search(nursery, inbox, request)
                elif isinstance(msg, MeshJoin):
                    self._start_join(nursery, inbox, request)
                else:
                    await inbox.serve(request, self.handle)
            nursery.cancel_scope.cancel()

    def _start_search(self, nursery: trio.Nursery, inbox: Inbox, request: Request) -> None:
        if self._searching >= self.settings.federation.max_outgoing:
            request.fail(Busy("too many federated searches running"))
            return
        self._searching += 1

        async def one() -> None:
            try:
                await inbox.serve(request, self._search)
            finally:
                self._searching -= 1

        nursery.start_soon(one)

    def _start_join(self, nursery: trio.Nursery, inbox: Inbox, request: Request) -> None:
        if self._joining:
            request.fail(Busy("a join is already running"))
            return
        self._joining = True

        async def one() -> None:
            try:
                await inbox.serve(request, self._join)
            finally:
                self._joining = False

        nursery.start_soon(one)

    async def handle(self, msg: Any) -> Any:
        if isinstance(msg, MeshPublish):
            return await self._publish_checked(msg.kind, msg.payload)
        if isinstance(msg, MeshGrant):
            check_grant(msg.grant, now=int(time.time()), granter=self.peer_id)
            return await self._publish("grant", msg.grant)
        if isinstance(msg, MeshMembers):
            return self.members()
        if isinstance(msg, MeshStatus):
            return self.info()
        if isinstance(msg, MeshFlush):
            return await self._flush_all()
        return await super().handle(msg)

    async def _search(self, msg: MeshSearch) -> FederatedHits:
        return await self.federation.search(
            msg.vector,
            msg.k,
            tags=msg.tags,
            where=msg.where,
            deadline=msg.deadline_s,
            peers=msg.peers,
            include_local=msg.include_local,
        )

    async def _join(self, msg: MeshJoin) -> int:
        if not msg.addrs or len(msg.addrs) > 64:
            raise BadArgument("must list 1..64 addresses", field="addrs")
        return await self.swim.join(list(msg.addrs))

    # -- publishing (durable first) --------------------------------------------------------

    async def _publish_checked(self, kind: str, payload: bytes) -> Published:
        if not isinstance(kind, str) or not 1 <= len(kind) <= 32:
            raise BadArgument("must be 1..32 characters", field="kind")
        if kind in RESERVED_KINDS:
            raise BadArgument(f"{kind!r} rows are published by the mesh itself", field="kind")
        if not isinstance(payload, bytes):
            raise BadArgument("must be bytes", field="payload")
        return await self._publish(kind, payload)

    async def _publish(self, kind: str, payload: bytes | msgspec.Struct) -> Published:
        """Sign this node's next row, commit it, then let anti-entropy see it."""
        async with self._publish_lock:
            if self._own_uncertain:
                await self._reconcile_own()
            self.log.check_room(self.peer_id)
            row = self.sync.sign_next(kind, payload)
            grant = decode_grant(row) if kind == "grant" else None
            saved = self._chain_saved.get(self.peer_id)
            chain = self.sync.chain(self.peer_id)
            keys: list[PeerKeyRecord] = []
            if chain is not None and saved != len(chain.rotations):
                keys = chain_records(chain)
            request = PersistMesh(
                rows=(row,),
                grants=(grant_record(row, grant),) if grant is not None else (),
                peer_keys=tuple(keys),
            )
            try:
                await self.links.write(request, self.settings.io_timeout_s)
            except BaseException:
                # The write may still have committed (a deadline can pass during COMMIT):
                # before the next publish, read back what the database holds of ours, so a
                # seq is never reused with other content.
                self._own_uncertain = True
                raise
            if chain is not None:
                self._chain_saved[self.peer_id] = len(chain.rotations)
            # No checkpoint between the COMMIT and the append: nothing can interleave.
            with self.log.durable():
                self.sync.accept_own(row)
            self.stats["published"] += 1
            return Published(origin=row.origin, seq=row.seq, kind=row.kind, hlc=row.hlc)

    async def _reconcile_own(self) -> None:
        head = self.log.head(self.peer_id)
        table = await self.links.sql(
            "SELECT origin, seq, hlc_wall_ms, hlc_logical, kind, payload, key_id, signature"
            " FROM mesh_rows WHERE origin = ? AND seq > ? ORDER BY seq",
            [self.peer_id, head],
            self.settings.io_timeout_s,
        )
        rows = rows_from_table(table)
        for row in rows:
            with self.log.durable():
                self.sync.accept_own(row)
        if rows:
            log.warning(
                "a publish whose answer was lost had committed: %d rows restored",
                len(rows),
                extra=self._extra,
            )
        self._own_uncertain = False

    def _on_row(self, row: Row) -> None:
        self.grants.observe(row)
        if row.kind == "trust_report" and row.origin == self.peer_id:
            try:
                self._reported = dict(_REPORT_DECODER.decode(row.payload).edges)
            except msgspec.DecodeError:
                pass

    # -- loops -----------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        backoff = 0.1
        while True:
            await self.log.wait_backlog()
            await trio.sleep(self.settings.persist_delay_s)  # let a group gather
            if await self._flush_once():
                backoff = 0.1
            else:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _flush_once(self) -> bool:
        s = self.settings
        rows = self.log.take(s.persist_batch_rows, s.persist_batch_bytes)
        if not rows:
            return True
        grants = []
        for row in rows:
            if row.kind == "grant":
                g = decode_grant(row)
                if g is not None:
                    grants.append(grant_record(row, g))
        keys: list[PeerKeyRecord] = []
        chain_lens: dict[str, int] = {}
        for origin in {r.origin for r in rows}:
            chain = self.sync.chain(origin)
            if chain is not None and self._chain_saved.get(origin) != len(chain.rotations):
                keys.extend(chain_records(chain))
                chain_lens[origin] = len(chain.rotations)
        request = PersistMesh(rows=tuple(rows), grants=tuple(grants), peer_keys=tuple(keys))
        try:
            await self.links.write(request, s.io_timeout_s)
        except SymbioteError as exc:
            self.stats["persist_failed"] += 1
            n = self.stats["persist_failed"]
            if n & (n - 1) == 0:
                log.warning(
                    "mesh rows not persisted yet (%s); retrying (count %d)",
                    exc,
                    n,
                    extra=self._extra,
                )
            return False
        self.log.stored(len(rows))
        self._chain_saved.update(chain_lens)
        self.stats["rows_persisted"] += len(rows)
        return True

    async def _flush_all(self) -> int:
        done = 0
        while self.log.backlog:
            before = self.log.persisted
            if not await self._flush_once():
                raise DeadlineExceeded("the writer did not take the mesh rows; retrying later")
            done += self.log.persisted - before
        return done

    async def _state_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.state_interval_s)
            await self._save_state()

    async def _save_state(self) -> None:
        now = _dt.datetime.now(_dt.UTC)
        peers: list[PeerRecord] = []
        marks: dict[str, tuple[str, int, str, bool]] = {}
        for m in self.swim.members.values():
            chain = self.sync.chain(m.peer_id)
            known = chain is not None
            mark = (m.status, m.incarnation, m.addr, known)
            if self._peer_saved.get(m.peer_id) == mark:
                continue
            marks[m.peer_id] = mark
            peers.append(
                PeerRecord(
                    peer_id=m.peer_id,
                    addrs=[m.addr],
                    status=m.status,
                    incarnation=m.incarnation,
                    genesis_key=chain.genesis_key if chain is not None else b"",
                    pretrusted=m.peer_id in self.sync.pretrusted,
                    seen_at=now,
                )
            )
        edges = self.sync.trust.outgoing(self.peer_id)
        edge_recs = [
            TrustEdgeRecord(from_peer=self.peer_id, to_peer=to, satisfactory=s, unsatisfactory=u)
            for to, (s, u) in edges.items()
            if self._edges_saved.get(to) != (s, u)
        ]
        scores = self.sync.policy.scores
        score_recs: list[TrustScoreRecord] = []
        scores_at = None
        if scores is not None and scores.computed_at != self._scores_saved:
            score_recs = [
                TrustScoreRecord(peer_id=p, score=min(max(v, 0.0), 1.0))
                for p, v in scores.scores.items()
            ]
            scores_at = _dt.datetime.fromtimestamp(scores.computed_at, _dt.UTC)
        if not (peers or edge_recs or score_recs):
            return
        request = PersistMesh(
            peers=tuple(peers),
            trust_edges=tuple(edge_recs),
            trust_scores=tuple(score_recs),
            scores_at=scores_at,
        )
        try:
            await self.links.write(request, self.settings.io_timeout_s)
        except SymbioteError as exc:
            log.warning("mesh state not persisted: %s", exc, extra=self._extra)
            return
        self._peer_saved.update(marks)
        for gone in set(self._peer_saved) - set(self.swim.members):
            del self._peer_saved[gone]  # reaped members: keep the map bounded
        self._edges_saved = dict(edges)
        if scores is not None:
            self._scores_saved = scores.computed_at

    async def _report_loop(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            edges = self.sync.trust.outgoing(self.peer_id)
            if edges == self._reported:
                continue
            try:
                await self._publish("trust_report", TrustReport(edges))
            except (LogFull, SymbioteError) as exc:
                log.warning("trust report not published: %s", exc, extra=self._extra)

    async def _join_loop(self) -> None:
        while True:
            if not self.swim.member_ids("alive") and not self._joining:
                self._joining = True
                try:
                    await self.swim.join(self._seeds)
                except JoinFailed as exc:
                    log.info("mesh join failed, retrying: %s", exc, extra=self._extra)
                finally:
                    self._joining = False
            await trio.sleep(self.settings.join_retry_s)

    # -- views -----------------------------------------------------------------------------

    def members(self) -> list[MemberInfo]:
        """Every member this node knows, with its relative trust."""
        scores = self.sync.policy.scores
        return [
            MemberInfo(
                peer_id=m.peer_id,
                addr=m.addr,
                status=m.status,
                incarnation=m.incarnation,
                trust=None if scores is None else scores.relative(m.peer_id),
            )
            for m in sorted(self.swim.members.values(), key=lambda m: m.peer_id)
        ]

    def info(self) -> MeshInfo:
        """This node's identity, address and counters."""
        stats: dict[str, int] = {}
        for prefix, counter in (
            ("sync.", self.sync.stats),
            ("swim.", self.swim.stats),
            ("fed.", self.federation.stats),
            ("transport.", self.transport.stats),
            ("mesh.", self.stats),
        ):
            stats.update({prefix + k: int(v) for k, v in counter.items() if v})
        return MeshInfo(
            peer_id=self.peer_id,
            addr=self.transport.local.addr,
            mesh=self.settings.transport.mesh,
            members_alive=len(self.swim.member_ids("alive")),
            rows=len(self.log),
            origins=len(self.log.heads()),
            persist_backlog=self.log.backlog,
            rows_persisted=self.log.persisted,
            grants_to_me=sorted(self.grants.granted_to(self.peer_id, [], now=time.time())),
            stats=stats,
        )

    # -- stop ------------------------------------------------------------------------------

    async def on_stop(self) -> None:
        if not self._started:
            return
        # Sockets bound by on_start that run() never took over (a stop right after start).
        await self.transport.aclose_listeners()
        # Within the shutdown deadline (the supervisor's scope): what is left of the backlog,
        # then the state. What does not make it is fetched again from peers after a restart.
        try:
            await self._flush_all()
            await self._save_state()
        except SymbioteError as exc:
            log.warning(
                "mesh stopped with %d rows not persisted: %s",
                self.log.backlog,
                exc,
                extra=self._extra,
            )
