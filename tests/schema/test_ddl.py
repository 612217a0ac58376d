"""Migrations: idempotent, atomic, extensible; refuse newer schemas and another dim."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from symbiote.schema.ddl import (
    CURRENT_VERSION,
    META_DIM,
    MIGRATIONS,
    Migration,
    applied_version,
    migrate,
    read_meta,
    sql_migration,
)
from symbiote.schema.errors import ConfigError, SchemaTooNew


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "s.duckdb")


def tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}


def views(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        r[0]
        for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    }


def test_fresh_database(db: str) -> None:
    con = duckdb.connect(db)
    assert applied_version(con) == 0
    assert migrate(con, 8) == CURRENT_VERSION
    assert {"messages_hot", "documents", "chunks", "chunk_deletes", "schema_migrations"} <= tables(
        con
    )
    assert {"symbiote_partitions", "symbiote_partition_jobs"} <= tables(con)
    # Readers query the view, whatever the partitioning did with the rows.
    assert views(con) >= {"messages"}
    assert read_meta(con, META_DIM) == "8"
    col = con.execute(
        "SELECT data_type FROM duckdb_columns() WHERE table_name = 'chunks'"
        " AND column_name = 'embedding'"
    ).fetchone()
    assert col == ("FLOAT[8]",)
    # Migration 5 dropped the secondary indexes (no read gain measured, slower ingest and
    # checkpoints); the unique event_id is the key and stays.
    indexes = {r[0] for r in con.execute("SELECT index_name FROM duckdb_indexes()").fetchall()}
    assert not {"messages_hot_ts", "messages_hot_thread_id", "messages_hot_author_uuid"} & indexes
    row = "('e1', 't', 's', 'th', 'm', TIMESTAMPTZ '2026-01-01 00:00:00+00', 'a', 'u')"
    insert = (
        "INSERT INTO messages_hot (event_id, tenant_id, source, thread_id, msg_id, ts,"
        f" author_raw, author_uuid) VALUES {row}"
    )
    con.execute(insert)
    with pytest.raises(duckdb.ConstraintException):
        con.execute(insert)


def test_migrate_is_idempotent_across_reopen(db: str) -> None:
    con = duckdb.connect(db)
    migrate(con, 8)
    con.execute("INSERT INTO symbiote_meta VALUES ('marker', 'kept')")
    con.close()
    con = duckdb.connect(db)
    assert migrate(con, 8) == CURRENT_VERSION
    assert migrate(con, 8) == CURRENT_VERSION
    rows = con.execute("SELECT version, description FROM schema_migrations").fetchall()
    assert [r[0] for r in rows] == list(range(1, CURRENT_VERSION + 1))
    assert read_meta(con, "marker") == "kept"


def test_schema_too_new_is_refused(db: str) -> None:
    con = duckdb.connect(db)
    migrate(con, 8)
    con.execute("INSERT INTO schema_migrations (version, description) VALUES (99, 'future')")
    with pytest.raises(SchemaTooNew) as ei:
        migrate(con, 8)
    assert "99" in ei.value.message and "upgrade" in ei.value.message
    # The refusal left the connection usable and the file unchanged.
    assert applied_version(con) == 99


def test_dim_mismatch_is_refused(db: str) -> None:
    con = duckdb.connect(db)
    migrate(con, 8)
    con.close()
    con = duckdb.connect(db)
    with pytest.raises(ConfigError) as ei:
        migrate(con, 16)
    assert ei.value.field == "dim"
    assert "8" in ei.value.message and "16" in ei.value.message


@pytest.mark.parametrize("dim", [0, -3, 70_000, "8; DROP TABLE x"])
def test_bad_dim(db: str, dim: object) -> None:
    with pytest.raises(ConfigError):
        migrate(duckdb.connect(db), dim)  # type: ignore[arg-type]


def test_later_migration_applies_on_existing_file(db: str) -> None:
    con = duckdb.connect(db)
    migrate(con, 8)
    extra = (
        *MIGRATIONS,
        sql_migration(CURRENT_VERSION + 1, "extra", "CREATE TABLE extra (id VARCHAR PRIMARY KEY)"),
    )
    assert migrate(con, 8, migrations=extra) == CURRENT_VERSION + 1
    assert "extra" in tables(con)
    assert migrate(con, 8, migrations=extra) == CURRENT_VERSION + 1
    # The older code now meets a newer file.
    with pytest.raises(SchemaTooNew):
        migrate(con, 8)


def test_failed_migration_rolls_back_everything(db: str) -> None:
    con = duckdb.connect(db)
    broken = (
        *MIGRATIONS,
        sql_migration(CURRENT_VERSION + 1, "ok part", "CREATE TABLE half (x INT)"),
        sql_migration(CURRENT_VERSION + 2, "broken", "CREATE TABLE oops (x NOPE)"),
    )
    with pytest.raises(duckdb.Error):
        migrate(con, 8, migrations=broken)
    assert applied_version(con) == 0
    assert tables(con) == set()
    assert migrate(con, 8) == CURRENT_VERSION


def test_migration_versions_must_be_consecutive(db: str) -> None:
    gap = (*MIGRATIONS, Migration(CURRENT_VERSION + 2, "gap", lambda con, dim: None))
    with pytest.raises(ConfigError):
        migrate(duckdb.connect(db), 8, migrations=gap)


def test_partition_migration_keeps_the_rows_of_a_version_2_file(db: str) -> None:
    """A file written before partitioning: its messages move into messages_hot, seen once."""
    con = duckdb.connect(db)
    migrate(con, 8, migrations=MIGRATIONS[:2])
    con.execute(
        "INSERT INTO messages (event_id, tenant_id, source, thread_id, msg_id, ts, author_raw,"
        " author_uuid, attrs) SELECT 'e' || range, 't', 's', 'th', 'm',"
        " TIMESTAMPTZ '2025-01-01' + to_hours(range), 'a', 'u', '{\"k\": 1}' FROM range(50)"
    )
    assert migrate(con, 8) == CURRENT_VERSION
    assert "messages" not in tables(con) and "messages" in views(con)
    row = con.execute(
        "SELECT count(*), count(DISTINCT event_id), max(attrs->>'k') FROM messages"
    ).fetchone()
    assert row == (50, 50, "1")
    # The hot table kept the unique key.
    with pytest.raises(duckdb.ConstraintException):
        con.execute("INSERT INTO messages_hot SELECT * FROM messages_hot LIMIT 1")


def test_chunks_keep_their_key_outside_the_wide_table(db: str) -> None:
    # Version 3 had chunk_id as chunks' primary key; version 4 moves it to chunk_keys, so no
    # ART index sits on the wide table (each DuckDB checkpoint rewrote the whole table).
    con = duckdb.connect(db)
    assert migrate(con, 8, migrations=MIGRATIONS[:3]) == 3
    con.execute(
        "INSERT INTO chunks VALUES ('a', 'd', 't', [1,0,0,0,0,0,0,0], NULL, 1),"
        " ('b', 'd', 't', [0,1,0,0,0,0,0,0], '{\"x\": 1}', 2)"
    )
    assert migrate(con, 8) == CURRENT_VERSION
    assert con.execute("SELECT chunk_id, seq FROM chunk_keys ORDER BY seq").fetchall() == [
        ("a", 1),
        ("b", 2),
    ]
    assert con.execute("SELECT chunk_id, metadata FROM chunks ORDER BY seq").fetchall() == [
        ("a", None),
        ("b", '{"x": 1}'),
    ]
    on_chunks = con.execute(
        "SELECT count(*) FROM duckdb_indexes() WHERE table_name = 'chunks'"
    ).fetchone()
    keys = con.execute(
        "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'chunks'"
        " AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')"
    ).fetchone()
    assert on_chunks == (0,) and keys == (0,)
