"""DuckDB schema: the DDL of symbiote's tables and the migrations that create and evolve it.

The writer calls :func:`migrate` once at start, on its own connection, before it takes any
request. Migrations are an ordered tuple of :class:`Migration` with consecutive versions from 1;
:data:`CURRENT_VERSION` is the last one. A later issue adds its tables by appending a new
:class:`Migration` to :data:`MIGRATIONS` (for instance ``sql_migration(2, "mesh tables",
*MESH_DDL)``); an applied migration is never edited, because databases in the field already
recorded it as done.

Two bookkeeping tables sit outside the numbered migrations because they are the machinery that
runs them: ``schema_migrations`` (one row per applied version) and ``symbiote_meta`` (key/value
facts about the file, such as the embedding ``dim`` that ``chunks.embedding`` was created with
and the chunk commit-sequence high-water mark).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import duckdb

from .errors import ConfigError, SchemaTooNew
from .mesh import MESH_DDL

__all__ = [
    "CURRENT_VERSION",
    "MESSAGES_HOT_DDL",
    "META_CHUNK_SEQ",
    "META_DIM",
    "MIGRATIONS",
    "PARTITION_DDL",
    "Migration",
    "applied_version",
    "migrate",
    "read_meta",
    "sql_migration",
]

log = logging.getLogger(__name__)

META_DIM: Final = "dim"
META_CHUNK_SEQ: Final = "chunk_seq"

MigrationFn = Callable[[duckdb.DuckDBPyConnection, int], None]


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: ``apply(con, dim)`` runs inside the migration transaction."""

    version: int
    description: str
    apply: MigrationFn


def sql_migration(version: int, description: str, *statements: str) -> Migration:
    """A :class:`Migration` made of SQL statements; ``{dim}`` in them becomes the dimension."""

    def apply(con: duckdb.DuckDBPyConnection, dim: int) -> None:
        for statement in statements:
            con.execute(statement.format(dim=dim))

    return Migration(version, description, apply)


_BOOTSTRAP: Final = (
    """CREATE TABLE IF NOT EXISTS schema_migrations (
        version     INTEGER PRIMARY KEY,
        applied_at  TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
        description VARCHAR NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS symbiote_meta (
        key   VARCHAR PRIMARY KEY,
        value VARCHAR NOT NULL
    )""",
)

# Egregora's ingestion buffer. Columns and their order follow Egregora so that its rows move
# over unchanged; the writer inserts BY NAME, so order is not load-bearing for symbiote itself.
MESSAGES_DDL: Final = (
    """CREATE TABLE messages (
        event_id       VARCHAR NOT NULL UNIQUE,
        tenant_id      VARCHAR NOT NULL,
        source         VARCHAR NOT NULL,
        thread_id      VARCHAR NOT NULL,
        msg_id         VARCHAR NOT NULL,
        ts             TIMESTAMPTZ NOT NULL,
        author_raw     VARCHAR NOT NULL,
        author_uuid    VARCHAR NOT NULL,
        text           VARCHAR,
        media_url      VARCHAR,
        media_type     VARCHAR CHECK (media_type IN ('image', 'video', 'audio')),
        attrs          JSON,
        pii_flags      JSON,
        created_at     TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
        created_by_run VARCHAR
    )""",
    "CREATE INDEX messages_ts ON messages (ts)",
    "CREATE INDEX messages_thread_id ON messages (thread_id)",
    "CREATE INDEX messages_author_uuid ON messages (author_uuid)",
)

# One table for every document type, as in Egregora. The post rule (title, slug, status) is
# enforced by validation rather than a CHECK: it depends on doc_type and Egregora allows other
# types to leave those columns NULL.
DOCUMENTS_DDL: Final = (
    """CREATE TABLE documents (
        id              VARCHAR PRIMARY KEY,
        content         VARCHAR,
        created_at      TIMESTAMPTZ,
        source_checksum VARCHAR,
        title           VARCHAR,
        slug            VARCHAR,
        date            DATE,
        summary         VARCHAR,
        authors         VARCHAR[],
        tags            VARCHAR[],
        status          VARCHAR,
        subject_uuid    VARCHAR,
        alias           VARCHAR,
        avatar_url      VARCHAR,
        interests       VARCHAR[],
        filename        VARCHAR,
        mime_type       VARCHAR,
        media_type      VARCHAR,
        phash           VARCHAR,
        window_start    TIMESTAMPTZ,
        window_end      TIMESTAMPTZ,
        doc_type        VARCHAR NOT NULL,
        extensions      JSON
    )""",
)

# seq is the commit sequence the index actor follows: every upsert gives the row a new, larger
# seq, every delete appends a tombstone with its own seq, so "everything after seq N" is
# `chunks WHERE seq > N` plus `chunk_deletes WHERE seq > N`. No ART index on seq or
# document_id: seq grows with insertion order, so DuckDB's zone maps already prune the scan,
# and extra ART indexes make every upsert slower. No foreign key to documents either: DuckDB
# foreign keys forbid the upsert-then-delete patterns the writer relies on.
CHUNKS_DDL: Final = (
    """CREATE TABLE chunks (
        chunk_id    VARCHAR PRIMARY KEY,
        document_id VARCHAR NOT NULL,
        text        VARCHAR NOT NULL,
        embedding   FLOAT[{dim}] NOT NULL,
        metadata    JSON,
        seq         BIGINT NOT NULL
    )""",
    """CREATE TABLE chunk_deletes (
        chunk_id VARCHAR NOT NULL,
        seq      BIGINT NOT NULL
    )""",
)

# Partitioning (docs/partitioning.md): recent messages live in the hot table ``messages_hot``
# (Egregora's DDL: unique event_id, indexes on ts, thread_id, author_uuid), closed months in
# Parquet files, and readers query the view ``messages`` over both. The maintenance actor
# redefines the view whenever the archive changes; this first definition is the hot table
# alone. Text kept here, not derived from MESSAGES_DDL: an applied migration never changes.
MESSAGES_HOT_DDL: Final = (
    """CREATE TABLE messages_hot (
        event_id       VARCHAR NOT NULL UNIQUE,
        tenant_id      VARCHAR NOT NULL,
        source         VARCHAR NOT NULL,
        thread_id      VARCHAR NOT NULL,
        msg_id         VARCHAR NOT NULL,
        ts             TIMESTAMPTZ NOT NULL,
        author_raw     VARCHAR NOT NULL,
        author_uuid    VARCHAR NOT NULL,
        text           VARCHAR,
        media_url      VARCHAR,
        media_type     VARCHAR CHECK (media_type IN ('image', 'video', 'audio')),
        attrs          JSON,
        pii_flags      JSON,
        created_at     TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
        created_by_run VARCHAR
    )""",
    "CREATE INDEX messages_hot_ts ON messages_hot (ts)",
    "CREATE INDEX messages_hot_thread_id ON messages_hot (thread_id)",
    "CREATE INDEX messages_hot_author_uuid ON messages_hot (author_uuid)",
)

#: Bookkeeping of the hot/cold layout, shared by every partitioned relation (keyed by the
#: view's name). The single source of this text: ``symbiote.actors._partition`` imports it.
#: ``IF NOT EXISTS`` because the maintenance actor also runs it on files created before it.
PARTITION_DDL: Final = (
    # The manifest: which generation of each archived month the view reads.
    """CREATE TABLE IF NOT EXISTS symbiote_partitions (
        relation   VARCHAR NOT NULL,
        period     VARCHAR NOT NULL,
        gen        INTEGER NOT NULL,
        rows       BIGINT NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (relation, period)
    )""",
    # The journal: a row here means a move or rewrite started and has not committed.
    """CREATE TABLE IF NOT EXISTS symbiote_partition_jobs (
        relation   VARCHAR NOT NULL,
        period     VARCHAR NOT NULL,
        kind       VARCHAR NOT NULL,
        temp_dir   VARCHAR NOT NULL,
        final_dir  VARCHAR NOT NULL,
        started_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (relation, period)
    )""",
    # Directories no longer referenced by any view, deleted after not_before.
    """CREATE TABLE IF NOT EXISTS symbiote_partition_garbage (
        path       VARCHAR PRIMARY KEY,
        not_before TIMESTAMPTZ NOT NULL
    )""",
)

# DuckDB refuses ``ALTER TABLE messages RENAME`` while indexes depend on the table, so the
# rows are copied into the new hot table and the old table (indexes first) is dropped. It
# all runs in the migration's one transaction: a crash leaves version 2 untouched.
_PARTITION_MIGRATION: Final = (
    *MESSAGES_HOT_DDL,
    "INSERT INTO messages_hot SELECT * FROM messages",
    "DROP INDEX messages_ts",
    "DROP INDEX messages_thread_id",
    "DROP INDEX messages_author_uuid",
    "DROP TABLE messages",
    "CREATE VIEW messages AS SELECT * FROM messages_hot",
    *PARTITION_DDL,
)

# With any ART index on the wide ``chunks`` table (its primary key included), every DuckDB
# 1.5.5 checkpoint rewrote the whole table: 3.4 s at 100,000 x 768 after 1,000 new rows,
# against 0.03 s without an index, and it runs inside a commit (docs/vector-search.md). The
# key moves to the narrow ``chunk_keys``; the writer, the only one who writes, keeps
# ``chunk_id`` unique in ``chunks`` through it.
_CHUNK_KEYS_MIGRATION: Final = (
    """CREATE TABLE chunks_v4 (
        chunk_id    VARCHAR NOT NULL,
        document_id VARCHAR NOT NULL,
        text        VARCHAR NOT NULL,
        embedding   FLOAT[{dim}] NOT NULL,
        metadata    JSON,
        seq         BIGINT NOT NULL
    )""",
    "INSERT INTO chunks_v4 SELECT chunk_id, document_id, text, embedding, metadata, seq"
    " FROM chunks ORDER BY seq",
    "DROP TABLE chunks",
    "ALTER TABLE chunks_v4 RENAME TO chunks",
    """CREATE TABLE chunk_keys (
        chunk_id VARCHAR PRIMARY KEY,
        seq      BIGINT NOT NULL
    )""",
    "INSERT INTO chunk_keys SELECT chunk_id, seq FROM chunks",
)

# Egregora's DDL indexes ts, thread_id and author_uuid. Measured on messages_hot with
# 1,000,000 rows (DuckDB 1.5.5, median of 20): thread_id = ? 1.96 ms with the index, 2.25 ms
# without; author_uuid = ? 3.25 / 2.26; a one-minute ts range 0.89 / 0.90 (zone maps do it);
# a thread's latest 50 rows 2.88 / 2.85. Meanwhile they made grouped ingest 1.49x slower
# (136,000 against 203,000 rows/s) and every checkpoint longer as the table grew (249 ->
# 445 ms by 800,000 rows, against 227-288 ms). The unique event_id stays: it is the key.
_DROP_SECONDARY_INDEXES: Final = (
    "DROP INDEX IF EXISTS messages_hot_ts",
    "DROP INDEX IF EXISTS messages_hot_thread_id",
    "DROP INDEX IF EXISTS messages_hot_author_uuid",
)

#: Every migration, in order. Append only; never edit or reorder an entry.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    sql_migration(
        1,
        "messages, documents, chunks and chunk_deletes",
        *MESSAGES_DDL,
        *DOCUMENTS_DDL,
        *CHUNKS_DDL,
    ),
    sql_migration(
        2,
        "mesh: peers, peer_keys, trust_edges, trust_scores, grants, mesh_rows",
        *MESH_DDL,
    ),
    sql_migration(
        3,
        "partitioning: messages_hot table, messages view, partition bookkeeping",
        *_PARTITION_MIGRATION,
    ),
    sql_migration(
        4,
        "chunks without an index; chunk_keys holds the key",
        *_CHUNK_KEYS_MIGRATION,
    ),
    sql_migration(
        5,
        "messages_hot keeps only its unique event_id (no ts, thread_id, author_uuid indexes)",
        *_DROP_SECONDARY_INDEXES,
    ),
)


def _check_order(migrations: Sequence[Migration]) -> int:
    for expected, m in enumerate(migrations, start=1):
        if m.version != expected:
            raise ConfigError(
                f"migration versions must run 1, 2, 3...; found {m.version} at position {expected}",
                field="migrations",
            )
    return len(migrations)


#: The schema version this code writes.
CURRENT_VERSION: Final = _check_order(MIGRATIONS)


def _table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' AND table_name = ?",
        [name],
    ).fetchone()
    return bool(row and row[0])


def applied_version(con: duckdb.DuckDBPyConnection) -> int:
    """The highest migration recorded in the database (0 for a new file)."""
    if not _table_exists(con, "schema_migrations"):
        return 0
    row = con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def read_meta(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    """The value stored under ``key`` in ``symbiote_meta``, or None."""
    if not _table_exists(con, "symbiote_meta"):
        return None
    row = con.execute("SELECT value FROM symbiote_meta WHERE key = ?", [key]).fetchone()
    return None if row is None else str(row[0])


def migrate(
    con: duckdb.DuckDBPyConnection,
    dim: int,
    *,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> int:
    """Bring the database up to the last of ``migrations``; return the resulting version.

    All missing migrations run in one transaction, so a failure leaves the file as it was.
    Running it again on an up-to-date database changes nothing.

    Raises:
        SchemaTooNew: the file records a version newer than this code knows.
        ConfigError: the file was created with another embedding ``dim`` (field ``dim``).
    """
    if not (isinstance(dim, int) and 1 <= dim <= 65_535):
        # dim is formatted into DDL, so it must be a plain bounded integer.
        raise ConfigError(f"dim must be an integer in [1, 65535], got {dim!r}", field="dim")
    target = _check_order(migrations)
    con.execute("BEGIN TRANSACTION")
    try:
        for statement in _BOOTSTRAP:
            con.execute(statement)
        current = applied_version(con)
        if current > target:
            raise SchemaTooNew(
                f"the database is at schema version {current} but this symbiote only knows "
                f"versions up to {target}; upgrade symbiote to open it",
                field="schema_version",
            )
        stored_dim = read_meta(con, META_DIM)
        if stored_dim is None:
            con.execute("INSERT INTO symbiote_meta VALUES (?, ?)", [META_DIM, str(dim)])
            con.execute("INSERT INTO symbiote_meta VALUES (?, ?)", [META_CHUNK_SEQ, "0"])
        elif int(stored_dim) != dim:
            raise ConfigError(
                f"the database was created with embedding dim {stored_dim}, "
                f"but dim {dim} was configured",
                field="dim",
            )
        for m in migrations[current:]:
            log.info("applying schema migration %d: %s", m.version, m.description)
            m.apply(con, dim)
            con.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (?, ?)",
                [m.version, m.description],
            )
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            # The failed statement may already have ended the transaction.
            pass
        raise
    return target
