"""The one DuckDB instance of a runtime, shared by its writer (owner) and its readers.

DuckDB lets one process hold a database file open once; every connection of the process
comes from that instance. The writer opens it and owns the read-write connection; each reader
takes its own connection from the instance with ``cursor()``. A :class:`Database` is the
handle they share: the writer fills it in when it starts and empties it when it stops, and a
reader asks it for a fresh connection when it starts. Readers start after the writer and are
restarted after it (``rest_for_one``), so they never hold a connection of a closed instance.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb

from symbiote.actors._threads import lower_new_threads
from symbiote.schema.errors import ActorStopped, ConfigError

__all__ = ["Database"]

log = logging.getLogger("symbiote.database")


class Database:
    """Where the DuckDB file is and, while the writer runs, its connection."""

    def __init__(
        self,
        path: str,
        *,
        threads: int | None = None,
        checkpoint_threshold: str | None = None,
        vacuum: bool = False,
    ) -> None:
        self.path = path
        self.threads = threads
        self.checkpoint_threshold = checkpoint_threshold
        #: Whether DuckDB's checkpoints may merge row groups (``max_vacuum_tasks``); off by
        #: default: see Config.db_vacuum.
        self.vacuum = vacuum
        self._con: duckdb.DuckDBPyConnection | None = None

    def open(self) -> duckdb.DuckDBPyConnection:
        """Open the file (blocking: call it from a worker thread). For the writer only."""
        if self._con is not None:
            raise ConfigError("the database is already open", field="db_path")
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        config: dict[str, str | bool | int | float | list[str]] = {}
        if self.threads is not None:
            config["threads"] = self.threads
        if self.checkpoint_threshold is not None:
            config["checkpoint_threshold"] = self.checkpoint_threshold
        if not self.vacuum:
            config["max_vacuum_tasks"] = 0
        try:
            # DuckDB starts its worker threads here; they run below the trio loop's priority.
            self._con = lower_new_threads(lambda: duckdb.connect(self.path, config=config))
        except duckdb.IOException as exc:
            # Typically the file is held by another process: DuckDB allows one writer.
            raise ConfigError(f"cannot open {self.path}: {exc}", field="db_path") from None
        log.info("database opened", extra={"path": self.path})
        return self._con

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new connection on the open instance (blocking; a reader's own connection)."""
        if self._con is None:
            raise ActorStopped("the database is not open (the writer is not running)")
        return self._con.cursor()

    def close(self) -> None:
        """Close the writer's connection and with it the instance (blocking)."""
        con, self._con = self._con, None
        if con is not None:
            con.close()
            log.info("database closed", extra={"path": self.path})
