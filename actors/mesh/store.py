"""The mesh's durable state: a row log persisted write-behind, and loading it back at start.

:class:`PersistentRowLog` is the :class:`~symbiote.actors.mesh.rows.RowLog` the mesh actor
runs on: a bounded :class:`~symbiote.actors.mesh.rows.MemoryRowLog` (anti-entropy reads it on
the trio thread, synchronously, as it always did) plus a bounded **backlog** of rows not yet
in ``mesh_rows``. The mesh actor drains the backlog through the writer actor (a
:class:`~symbiote.schema.messages.PersistMesh` request, one group-committed transaction), in
append order. So:

* **durable set = a prefix of the append order**, hence per origin a prefix ``1..h`` of its
  seqs: what the database holds after a crash is a valid log, which the digests describe;
* a received row lost in a crash before its flush is fetched again by anti-entropy (the peers
  still have it; the node's digest says it lacks it);
* the backlog is bounded (``max_backlog``): when the writer cannot keep up, new rows are
  refused with :class:`~symbiote.schema.mesh.LogFull` (``field="persist_backlog"``), which
  anti-entropy already treats as "ask again later", and a publish fails with it;
* this node's **own** rows are different: a row of ours that reached a peer and was then lost
  would have its seq reused by our next publish, with other content (the mesh would hold two
  versions of one row). So the mesh actor stores its own rows *before* they enter the log
  (:meth:`PersistentRowLog.durable`), and a publish is acknowledged only after COMMIT.

Everything that reads the database here is plain data conversion (no DuckDB calls): the
mesh actor runs the SQL below on a reader actor, and converts the Arrow tables in a worker
thread with the functions of this module.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Final

import msgspec
import pyarrow as pa
import trio

from symbiote.actors.mesh.identity import key_id_for
from symbiote.actors.mesh.rows import MemoryRowLog, row_size
from symbiote.schema.mesh import (
    Hlc,
    KeyChain,
    KeyRotation,
    LogFull,
    PeerKeyRecord,
    Row,
    RowGap,
)

__all__ = [
    "LOAD_CHAINS_SQL",
    "LOAD_EDGES_SQL",
    "LOAD_PEERS_SQL",
    "LOAD_ROWS_SQL",
    "PersistentRowLog",
    "chain_records",
    "chains_from_table",
    "restore_log",
    "rows_from_table",
]

log = logging.getLogger(__name__)

#: Every stored row, in log order; the LIMIT (``max_rows`` + 1) bounds what a start reads.
LOAD_ROWS_SQL: Final = (
    "SELECT origin, seq, hlc_wall_ms, hlc_logical, kind, payload, key_id, signature"
    " FROM mesh_rows ORDER BY origin, seq LIMIT ?"
)
#: Key chains: the genesis key (rotation_seq 0) and each rotation record, in chain order.
LOAD_CHAINS_SQL: Final = (
    "SELECT peer_id, rotation_seq, public_key, rotation FROM peer_keys"
    " ORDER BY peer_id, rotation_seq LIMIT ?"
)
#: Peers seen most recently: extra seeds for rejoining after a restart.
LOAD_PEERS_SQL: Final = (
    "SELECT peer_id, addrs FROM peers WHERE status <> 'left' AND peer_id <> ?"
    " ORDER BY last_seen DESC LIMIT ?"
)
#: This node's own first-hand trust evidence.
LOAD_EDGES_SQL: Final = (
    "SELECT to_peer, satisfactory, unsatisfactory FROM trust_edges WHERE from_peer = ? LIMIT ?"
)

_ROTATION = msgspec.msgpack.Decoder(KeyRotation)
_ENCODER = msgspec.msgpack.Encoder()


class PersistentRowLog:
    """A bounded in-memory row log whose appends are persisted write-behind (module docstring)."""

    def __init__(
        self,
        *,
        max_rows: int = 1_000_000,
        max_rows_per_origin: int = 100_000,
        max_origins: int = 4096,
        max_backlog: int = 100_000,
        peer_id: str = "",
    ) -> None:
        if max_backlog < 1:
            raise ValueError("max_backlog must be >= 1")
        self.mem = MemoryRowLog(
            max_rows=max_rows,
            max_rows_per_origin=max_rows_per_origin,
            max_origins=max_origins,
            peer_id=peer_id,
        )
        self.max_backlog = max_backlog
        self._backlog: collections.deque[Row] = collections.deque()
        self._durable = False
        self._wake = trio.Event()
        #: Rows written to the database since start (by the flusher), and rows refused
        #: because the backlog was full.
        self.persisted = 0
        self.refused_backlog = 0
        self._extra = {"peer_id": peer_id}

    # -- the RowLog interface (reads go to memory) -----------------------------------------

    def __len__(self) -> int:
        return len(self.mem)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.mem)

    def head(self, origin: str) -> int:
        """Highest seq held for ``origin`` (0 if none)."""
        return self.mem.head(origin)

    def heads(self) -> dict[str, int]:
        """``{origin: head}``."""
        return self.mem.heads()

    def fingerprint(self) -> bytes:
        """Fingerprint of :meth:`heads`."""
        return self.mem.fingerprint()

    def get(self, origin: str, seq: int) -> Row | None:
        """The row ``(origin, seq)`` if held."""
        return self.mem.get(origin, seq)

    def rows_after(self, origin: str, seq: int, limit: int) -> list[Row]:
        """Up to ``limit`` rows of ``origin`` after ``seq``."""
        return self.mem.rows_after(origin, seq, limit)

    def content_hash(self) -> str:
        """See :meth:`MemoryRowLog.content_hash`."""
        return self.mem.content_hash()

    def append(self, row: Row) -> None:
        """Append and queue ``row`` for the database; LogFull when the backlog is full.

        Inside :meth:`durable` the row is already stored and is not queued.
        """
        if self._durable:
            self.mem.append(row)
            return
        if len(self._backlog) >= self.max_backlog:
            self.refused_backlog += 1
            if self.refused_backlog & (self.refused_backlog - 1) == 0:
                log.warning(
                    "persist backlog full (%d rows), refusing rows (count %d)",
                    self.max_backlog,
                    self.refused_backlog,
                    extra={**self._extra, "origin": row.origin},
                )
            raise LogFull(f"{self.max_backlog} rows wait for the database", field="persist_backlog")
        self.mem.append(row)
        self._backlog.append(row)
        self._wake.set()

    def replace(self, row: Row) -> None:
        """Replace a held row by a re-signed copy, and queue the copy for the database.

        Not refused at the backlog cap: replacements are this node's own rows after a key
        rotation, bounded by ``max_rows_per_origin``.
        """
        self.mem.replace(row)
        self._backlog.append(row)
        self._wake.set()

    # -- durability --------------------------------------------------------------------------

    @contextlib.contextmanager
    def durable(self) -> Iterator[None]:
        """Appends inside this block are already in the database: do not queue them."""
        self._durable = True
        try:
            yield
        finally:
            self._durable = False

    def check_room(self, origin: str) -> None:
        """Raise LogFull if the next row of ``origin`` would be refused (limits or backlog)."""
        self.mem.check_room(origin)
        if len(self._backlog) >= self.max_backlog:
            raise LogFull(f"{self.max_backlog} rows wait for the database", field="persist_backlog")

    def restore(self, row: Row) -> None:
        """Put back a row read from the database (not queued: it is stored)."""
        self.mem.append(row)

    @property
    def backlog(self) -> int:
        """Rows appended but not yet known to be in the database."""
        return len(self._backlog)

    def take(self, max_rows: int, max_bytes: int) -> list[Row]:
        """The oldest backlog rows, at most ``max_rows`` and about ``max_bytes`` (at least one).

        They stay in the backlog until :meth:`stored` says they are committed.
        """
        out: list[Row] = []
        size = 0
        for row in self._backlog:
            sz = row_size(row)
            if out and (len(out) >= max_rows or size + sz > max_bytes):
                break
            out.append(row)
            size += sz
        return out

    def stored(self, n: int) -> None:
        """The ``n`` oldest backlog rows are committed."""
        for _ in range(min(n, len(self._backlog))):
            self._backlog.popleft()
        self.persisted += n
        if not self._backlog:
            self._wake = trio.Event()

    async def wait_backlog(self) -> None:
        """Return when the backlog holds a row."""
        while not self._backlog:
            await self._wake.wait()
            if not self._backlog:
                self._wake = trio.Event()


# -- loading (runs in a worker thread: plain data conversion, no trio, no DuckDB) -----------


def rows_from_table(table: pa.Table) -> list[Row]:
    """Rows from the result of :data:`LOAD_ROWS_SQL`."""
    cols = [table.column(i).to_pylist() for i in range(8)]
    return [
        Row(
            origin, int(seq), Hlc(int(wall), int(logical)), kind, bytes(payload), key_id, bytes(sig)
        )
        for origin, seq, wall, logical, kind, payload, key_id, sig in zip(*cols, strict=True)
    ]


def restore_log(log_: PersistentRowLog, rows: list[Row]) -> list[Row]:
    """Put ``rows`` (ordered by origin, seq) back into ``log_``; the rows restored.

    An origin whose stored rows have a gap (a file edited by hand, or a bug) is restored up to
    the gap only; the rest comes back from peers. Rows beyond the log's limits are dropped
    (logged): the limits may have been lowered since they were stored.
    """
    restored: list[Row] = []
    skipped: dict[str, str] = {}
    for row in rows:
        if row.origin in skipped:
            continue
        try:
            log_.restore(row)
        except RowGap:
            skipped[row.origin] = "gap"
            continue
        except LogFull as exc:
            skipped[row.origin] = exc.field or "limit"
            continue
        restored.append(row)
    for origin, why in skipped.items():
        log.warning("stored rows of an origin not all restored (%s)", why, extra={"origin": origin})
    return restored


def chains_from_table(table: pa.Table) -> list[KeyChain]:
    """Key chains from the result of :data:`LOAD_CHAINS_SQL` (unverified: learn_chain checks)."""
    peers, seqs, keys, rotations = (table.column(i).to_pylist() for i in range(4))
    chains: dict[str, tuple[bytes, list[KeyRotation]]] = {}
    broken: set[str] = set()
    for peer, seq, key, blob in zip(peers, seqs, keys, rotations, strict=True):
        if peer in broken:
            continue
        if seq == 0:
            chains[peer] = (bytes(key), [])
            continue
        held = chains.get(peer)
        if held is None or blob is None or len(held[1]) != seq - 1:
            broken.add(peer)
            continue
        try:
            held[1].append(_ROTATION.decode(blob))
        except msgspec.DecodeError:
            broken.add(peer)
    # A chain with a missing or unreadable link is dropped whole: half a chain would vouch for
    # rows it cannot verify. The peer's chain comes back with its rows from peers.
    return [KeyChain(p, g, r) for p, (g, r) in chains.items() if p not in broken]


def chain_records(chain: KeyChain) -> list[PeerKeyRecord]:
    """``peer_keys`` rows for ``chain``: the genesis key, then one row per rotation."""
    out = [
        PeerKeyRecord(
            peer_id=chain.peer_id,
            key_id=key_id_for(chain.genesis_key),
            public_key=chain.genesis_key,
            rotation_seq=0,
            valid_from=0,
            expired_at=chain.rotations[0].old_key_valid_until if chain.rotations else None,
        )
    ]
    for i, rot in enumerate(chain.rotations):
        nxt = chain.rotations[i + 1] if i + 1 < len(chain.rotations) else None
        out.append(
            PeerKeyRecord(
                peer_id=chain.peer_id,
                key_id=key_id_for(rot.new_key),
                public_key=rot.new_key,
                rotation_seq=rot.seq,
                valid_from=rot.issued_at,
                expired_at=None if nxt is None else nxt.old_key_valid_until,
                rotation=_ENCODER.encode(rot),
            )
        )
    return out


def column(table: pa.Table, i: int) -> list[Any]:
    """Column ``i`` of ``table`` as Python values."""
    return list(table.column(i).to_pylist())
