"""Signed replicated rows and the per-node row log.

A row (:class:`~symbiote.schema.mesh.Row`) is ``(origin, seq, hlc, kind, payload, key_id,
signature)``, signed by its origin under the context ``"row"``. ``seq`` counts an origin's
rows from 1 and a log only ever holds a *prefix* of each origin's sequence: row ``seq`` is
accepted only right after ``seq - 1``. So ``{origin: highest seq}`` describes a log's content
exactly, which is what makes Scuttlebutt digests work (see
:mod:`~symbiote.actors.mesh.antientropy`).

:class:`RowLog` is the interface the anti-entropy needs; :class:`MemoryRowLog` implements it
in memory with hard limits; :class:`~symbiote.actors.mesh.store.PersistentRowLog` wraps it
with write-behind persistence to ``mesh_rows`` through the writer actor.

At a limit (``max_rows`` in all, ``max_rows_per_origin``, ``max_origins``) the log *refuses*
new rows with :class:`~symbiote.schema.mesh.LogFull`; it never evicts. Evicting would punch a
hole in an origin's prefix, which the digest cannot describe; refusing keeps the log
consistent, the origin's head stops advancing, and anti-entropy asks again later (after an
operator raised the limit, or the durable log took over). The per-origin cap keeps one noisy
(or hostile) origin from filling the log for everyone else.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Protocol

import msgspec

from symbiote.actors.mesh.identity import NodeIdentity
from symbiote.schema.mesh import Hlc, LogFull, Row, RowGap

__all__ = ["ROW_CONTEXT", "MemoryRowLog", "RowLog", "digest_fingerprint", "row_size", "sign_row"]

log = logging.getLogger(__name__)

#: Signature context of rows (keeps a row signature from being valid as anything else).
ROW_CONTEXT = "row"

_ENCODER = msgspec.msgpack.Encoder()


def sign_row(identity: NodeIdentity, *, seq: int, hlc: Hlc, kind: str, payload: bytes) -> Row:
    """A row of ``identity`` signed with its current key."""
    row = Row(identity.peer_id, seq, hlc, kind, payload, identity.key_id)
    return identity.sign_record(row, context=ROW_CONTEXT)


def row_size(row: Row) -> int:
    """Encoded size of ``row`` on the wire, in bytes (what the batch byte bound counts)."""
    return len(_ENCODER.encode(row))


def digest_fingerprint(heads: dict[str, int]) -> bytes:
    """16 bytes that differ (with overwhelming probability) whenever two digests differ."""
    h = hashlib.sha256(b"symbiote/digest/v1\x00")
    for origin in sorted(heads):
        h.update(origin.encode())
        h.update(heads[origin].to_bytes(8, "big"))
    return h.digest()[:16]


class RowLog(Protocol):
    """What anti-entropy needs from a row log; the in-memory and the DuckDB logs implement it.

    Invariant: for every origin the log holds exactly the rows ``1..head(origin)``.
    """

    def head(self, origin: str) -> int:
        """Highest seq held for ``origin`` (0 if none)."""
        ...

    def heads(self) -> dict[str, int]:
        """``{origin: head}`` for every origin held: the Scuttlebutt digest."""
        ...

    def fingerprint(self) -> bytes:
        """:func:`digest_fingerprint` of :meth:`heads` (implementations may cache it)."""
        ...

    def get(self, origin: str, seq: int) -> Row | None:
        """The row ``(origin, seq)`` if held."""
        ...

    def append(self, row: Row) -> None:
        """Add the next row of its origin. RowGap if it is not ``head + 1``; LogFull at a limit.

        The caller verifies the signature first: the log stores, it does not judge.
        """
        ...

    def replace(self, row: Row) -> None:
        """Replace a held row by a re-signed copy (same origin, seq and content)."""
        ...

    def rows_after(self, origin: str, seq: int, limit: int) -> list[Row]:
        """Up to ``limit`` rows of ``origin`` with seq > ``seq``, in seq order."""
        ...

    def __len__(self) -> int:
        """Rows held, all origins together."""
        ...


class MemoryRowLog:
    """A bounded in-memory :class:`RowLog` (see the module docstring for the limits)."""

    def __init__(
        self,
        *,
        max_rows: int = 1_000_000,
        max_rows_per_origin: int = 100_000,
        max_origins: int = 4096,
        peer_id: str = "",
    ) -> None:
        if min(max_rows, max_rows_per_origin, max_origins) < 1:
            raise ValueError("log limits must be >= 1")
        self.max_rows = max_rows
        self.max_rows_per_origin = max_rows_per_origin
        self.max_origins = max_origins
        # Per origin, rows in seq order: row seq s sits at index s - 1 (prefix invariant).
        self._rows: dict[str, list[Row]] = {}
        self._count = 0
        self._fp: bytes | None = None
        #: Rows refused because a limit was reached.
        self.refused_full = 0
        self._log = {"peer_id": peer_id}

    def __len__(self) -> int:
        return self._count

    def head(self, origin: str) -> int:
        """Highest seq held for ``origin`` (0 if none)."""
        rows = self._rows.get(origin)
        return len(rows) if rows else 0

    def heads(self) -> dict[str, int]:
        """``{origin: head}``."""
        return {o: len(r) for o, r in self._rows.items()}

    def fingerprint(self) -> bytes:
        """Fingerprint of :meth:`heads`, cached until the next append."""
        if self._fp is None:
            self._fp = digest_fingerprint(self.heads())
        return self._fp

    def get(self, origin: str, seq: int) -> Row | None:
        """The row ``(origin, seq)`` if held."""
        rows = self._rows.get(origin)
        if rows is None or not 1 <= seq <= len(rows):
            return None
        return rows[seq - 1]

    def append(self, row: Row) -> None:
        """Add the next row of its origin (RowGap / LogFull otherwise)."""
        rows = self._rows.get(row.origin)
        head = len(rows) if rows else 0
        if row.seq != head + 1:
            raise RowGap(f"seq {row.seq} does not follow {head} for {row.origin}", field="seq")
        self.check_room(row.origin)
        if rows is None:
            rows = self._rows[row.origin] = []
        rows.append(row)
        self._count += 1
        self._fp = None

    def check_room(self, origin: str) -> None:
        """Raise LogFull (and count it) if the next row of ``origin`` would pass a limit."""
        rows = self._rows.get(origin)
        if rows is None and len(self._rows) >= self.max_origins:
            self._full("max_origins", origin)
        if rows is not None and len(rows) >= self.max_rows_per_origin:
            self._full("max_rows_per_origin", origin)
        if self._count >= self.max_rows:
            self._full("max_rows", origin)

    def _full(self, limit: str, origin: str) -> None:
        self.refused_full += 1
        if self.refused_full & (self.refused_full - 1) == 0:
            log.warning(
                "row log at %s, refusing rows (count %d)",
                limit,
                self.refused_full,
                extra={**self._log, "origin": origin},
            )
        raise LogFull(f"row log reached {limit}", field=limit)

    def replace(self, row: Row) -> None:
        """Replace a held row by a re-signed copy; ValueError if the content differs."""
        old = self.get(row.origin, row.seq)
        if old is None:
            raise RowGap(f"row {row.seq} of {row.origin} is not held", field="seq")
        if (old.hlc, old.kind, old.payload) != (row.hlc, row.kind, row.payload):
            raise ValueError("a replacement must carry the same content")
        self._rows[row.origin][row.seq - 1] = row

    def rows_after(self, origin: str, seq: int, limit: int) -> list[Row]:
        """Up to ``limit`` rows of ``origin`` after ``seq``."""
        rows = self._rows.get(origin)
        if not rows or limit < 1:
            return []
        start = max(0, seq)
        return rows[start : start + limit]

    def __iter__(self) -> Iterator[Row]:
        """Every row, by origin then seq."""
        for origin in sorted(self._rows):
            yield from self._rows[origin]

    def content_hash(self) -> str:
        """SHA-256 over every row's content in (origin, seq) order.

        Two logs with the same hash hold the same rows: what the partition tests compare.
        Content is (origin, seq, hlc, kind, payload): not the key id and signature, which an
        origin may renew (re-signing after a key rotation) without changing the row.
        """
        h = hashlib.sha256()
        for row in self:
            data = _ENCODER.encode((row.origin, row.seq, row.hlc, row.kind, row.payload))
            h.update(len(data).to_bytes(4, "big"))
            h.update(data)
        return h.hexdigest()
