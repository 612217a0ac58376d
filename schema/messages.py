"""Protocol messages of the write path: the requests the writer accepts and what it answers.

Every request is a tagged, frozen msgspec struct, so a group of them can cross a mailbox or a
socket and be decoded as the :data:`WriteRequest` union. The writer answers each request with a
:class:`WriteAck` once the transaction holding it has committed, or with a
:class:`~symbiote.schema.errors.Failure` naming what was wrong with that request alone.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import Failure
from .mesh import (
    GrantRecord,
    PeerKeyRecord,
    PeerRecord,
    Row,
    TrustEdgeRecord,
    TrustScoreRecord,
)
from .records import Chunk, Document, Message, UTCDateTime

__all__ = [
    "ChunkChange",
    "ChunksCommitted",
    "CorrectMessage",
    "DeleteChunks",
    "IngestBatch",
    "IngestMessages",
    "PersistMesh",
    "UpsertChunks",
    "UpsertDocuments",
    "WriteAck",
    "WriteAcks",
    "WriteOutcome",
    "WriteRequest",
]


class IngestMessages(msgspec.Struct, frozen=True, kw_only=True, tag=True, gc=False):
    """Append messages; a message whose ``event_id`` is already stored is skipped (idempotent)."""

    messages: tuple[Message, ...]


class IngestBatch(msgspec.Struct, frozen=True, kw_only=True, tag=True, gc=False):
    """Several ingest requests in one message, each committed or refused on its own.

    What the runtime sends for concurrent ``ingest`` calls (one mailbox entry for the crowd,
    see :class:`~symbiote.runtime.Coalescer`); answered by :class:`WriteAcks`, one outcome per
    request in order. A request that fails a check or a constraint fails alone.
    """

    requests: tuple[IngestMessages, ...]


class UpsertDocuments(msgspec.Struct, frozen=True, kw_only=True, tag=True, gc=False):
    """Insert or replace documents by ``id``; within one commit the last version wins."""

    documents: tuple[Document, ...]


class UpsertChunks(msgspec.Struct, frozen=True, kw_only=True, tag=True, gc=False):
    """Insert or replace chunks by ``chunk_id``; each written chunk gets a new commit ``seq``."""

    chunks: tuple[Chunk, ...]


class DeleteChunks(msgspec.Struct, frozen=True, kw_only=True, tag=True, gc=False):
    """Delete chunks by id; each one that existed leaves a tombstone with a new ``seq``."""

    chunk_ids: tuple[str, ...]


class CorrectMessage(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Change correctable columns of one message still in the hot table (``messages_hot``).

    Answered with ``WriteAck(written=1)`` when the row was updated, ``written=0`` when no hot
    row has ``event_id`` (it may be archived: the runtime then asks the maintenance actor,
    which rewrites the month's file). See ``CORRECTABLE_MESSAGE_FIELDS``.
    """

    event_id: str
    changes: dict[str, Any]


class PersistMesh(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Store mesh state: replicated rows, grants, peers, keys and trust (the mesh actor's writes).

    Every list is idempotent on its table's key, so a retry after a crash never duplicates:
    ``rows`` on ``(origin, seq)`` (a re-signed copy of the same content replaces key id and
    signature; different content under a held key is ignored: the first version stays),
    ``grants`` on ``(granter, row_seq)``, ``peers`` on ``peer_id`` (``first_seen`` kept),
    ``peer_keys`` on ``(peer_id, key_id)``, ``trust_edges`` on ``(from_peer, to_peer)``.
    ``trust_scores``, when given, is one computation at ``scores_at`` and replaces the older
    ones (only the latest is kept: the table stays bounded).
    """

    rows: tuple[Row, ...] = ()
    grants: tuple[GrantRecord, ...] = ()
    peers: tuple[PeerRecord, ...] = ()
    peer_keys: tuple[PeerKeyRecord, ...] = ()
    trust_edges: tuple[TrustEdgeRecord, ...] = ()
    trust_scores: tuple[TrustScoreRecord, ...] = ()
    scores_at: UTCDateTime | None = None

    def size(self) -> int:
        """Records carried, all tables together (the unit of the writer's batch bound)."""
        return (
            len(self.rows)
            + len(self.grants)
            + len(self.peers)
            + len(self.peer_keys)
            + len(self.trust_edges)
            + len(self.trust_scores)
        )


#: What the writer accepts.
WriteRequest = (
    IngestMessages | UpsertDocuments | UpsertChunks | DeleteChunks | CorrectMessage | PersistMesh
)


class WriteAck(msgspec.Struct, frozen=True, kw_only=True, tag=True, gc=False):
    """A request committed.

    ``written`` counts rows this request inserted, replaced or deleted; ``duplicates`` counts
    rows that were already there (messages seen before, ids repeated within the request,
    deletes of ids that did not exist), so ``written + duplicates`` is the request's size.
    """

    written: int
    duplicates: int = 0


#: The answer to one request.
WriteOutcome = WriteAck | Failure


class WriteAcks(msgspec.Struct, frozen=True, kw_only=True, tag=True, gc=False):
    """The answer to an :class:`IngestBatch`: one outcome per request, in order."""

    outcomes: tuple[WriteOutcome, ...]


class ChunkChange(msgspec.Struct, frozen=True, array_like=True):
    """One committed change to ``chunks``: id, commit ``seq``, and whether it is a delete."""

    chunk_id: str
    seq: int
    deleted: bool = False


class ChunksCommitted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """What the writer tells the index actor after a COMMIT: changes in ``seq`` order.

    ``high_seq`` is the largest sequence committed so far; a follower that has applied
    everything up to it is current.
    """

    changes: tuple[ChunkChange, ...]
    high_seq: int
