"""The runtime's configuration: one msgspec Struct, from defaults, TOML and environment.

Precedence, lowest first: the defaults below, a TOML file (``symbiote.toml`` by default, if
it exists), then ``SYMBIOTE_<FIELD>`` environment variables (``SYMBIOTE_DB_PATH``,
``SYMBIOTE_READERS``...). Every value is validated; a bad one raises :class:`ConfigError`
naming the field.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from symbiote.schema.errors import ConfigError
from symbiote.schema.mesh import (
    MAX_FED_HITS,
    RowSyncConfig,
    SwimConfig,
    TransportConfig,
    TrustConfig,
    check_redact_fields,
)

__all__ = ["Config"]

ENV_PREFIX = "SYMBIOTE_"


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the runtime needs to start; every field has a sane default."""

    #: The DuckDB file. The runtime is its only writer (DuckDB allows one writing process).
    db_path: str = "symbiote.duckdb"
    #: Embedding dimension of ``chunks.embedding``; fixed per database once created.
    dim: int = 768
    #: Reader actors, each with its own connection on the same database instance.
    readers: int = 4
    #: DuckDB worker threads for the whole instance (None: DuckDB's default, the core count).
    duckdb_threads: int | None = None
    #: WAL size at which a commit also checkpoints the file (DuckDB's default is 16MB). A
    #: checkpoint runs inside the writer's commit and its cost grows with the table: with
    #: 30,000 x 768 chunks and 1,000 chunk upserts/s the writer's slowest ack was 1.7 s at 16MB,
    #: 0.32 s at 256MB; at 100,000 chunks 16MB stalled it past 120 s. Larger means a longer
    #: replay of the WAL after a crash.
    checkpoint_threshold: str = "256MB"
    #: Let DuckDB's checkpoints vacuum (merge row groups; ``max_vacuum_tasks``). Off by
    #: default: loading 768-d chunks into a runtime whose index was catching up, vacuuming
    #: checkpoints stalled single commits for 20-63 s past 400,000 chunks (3.5-8.7 s without),
    #: and loading 300,000 chunks alone took 49 s against 19 s. The price: space of chunks
    #: replaced or deleted here and there is not reclaimed (+136 MB per 50,000 updated 768-d
    #: chunks, measured); deleting whole months from messages_hot frees it either way.
    db_vacuum: bool = False
    #: How much lower (Unix ``nice``) database threads run than the trio loop's thread, so
    #: heavy queries on few cores do not delay the loop; 0 leaves priorities alone.
    db_thread_nice: int = 10
    #: CPython's thread switch interval while the runtime is open, in milliseconds (the
    #: interpreter's default is 5). A worker thread running Python holds the GIL that long
    #: before the trio thread may take it back, which showed up as loop lag; restored when
    #: the last runtime closes. None leaves the interpreter's setting alone.
    gil_switch_interval_ms: float | None = 1.0
    #: Call ``gc.freeze()`` once the runtime has started: what is alive then (modules,
    #: libraries, the host's start-up state) is left out of later collections, so a full
    #: collection scans only newer objects. At 10,000 msg/s of ingest full collections took
    #: 20-50 ms without it (the ack p99), ~2 ms with it. The cost: cyclic garbage that exists
    #: at that moment is never reclaimed; turn it off if the host relies on that.
    gc_freeze: bool = True
    #: Mailbox sizes: the bound on requests queued at each actor.
    writer_mailbox: int = 4096
    reader_mailbox: int = 64
    #: Group commit: most rows one transaction takes in.
    max_batch_rows: int = 50_000
    #: Most concurrent ``ingest`` calls sent to the writer as one message (an IngestBatch;
    #: each call is still committed or refused on its own).
    ingest_max_batch: int = 4096
    #: Group commit: how long the writer waits for more requests when its mailbox is empty.
    #: 0 takes only what is already queued; requests that arrive during a commit form the
    #: next group by themselves, which is what makes groups grow under load.
    batch_window_s: float = 0.0
    #: Largest text accepted in one message, document or chunk, in bytes (UTF-8).
    max_text_bytes: int = 1_000_000
    #: Rows per Arrow batch when streaming a large result.
    stream_batch_rows: int = 10_000
    #: Deadline of a public call when the caller gives none, in seconds.
    default_timeout_s: float = 30.0
    #: Restart budget of the data supervisor (OTP's intensity within period).
    restart_intensity: int = 5
    restart_period_s: float = 10.0
    #: Longest shutdown a child is given, in seconds.
    shutdown_s: float = 10.0
    log_level: str = "INFO"

    # -- vector search (the index actor; docs/vector-search.md) ---------------------------
    #: Run the HNSW index actor (search needs it; a host that never searches may save the RAM).
    index_enabled: bool = True
    #: Snapshot folder; empty means ``<db_path>.index`` (none for an in-memory database).
    index_dir: str = ""
    #: HNSW graph shape (fixed per snapshot: changing them rebuilds the index at start).
    index_backend: Literal["hnswlib", "usearch"] = "hnswlib"
    index_m: int = 16
    index_ef_construction: int = 128
    #: Default search breadth (per call: ``search(..., ef=)``); raised to k automatically.
    index_ef_search: int = 64
    #: Past 500,000 vectors, raise the default ef 1.5x for each doubling of the index (at
    #: most 8x): recall at a fixed ef falls as the graph grows (docs/vector-search.md).
    index_ef_auto: bool = True
    #: Library threads for batch builds and searches (0: one per core).
    index_threads: int = 0
    index_mailbox: int = 1024
    #: Snapshot after this many changes, or this long after the first unsaved change.
    index_snapshot_every_changes: int = 50_000
    index_snapshot_interval_s: float = 300.0
    #: Most changes read from the table per catch-up round (bounds memory in a rebuild).
    index_catchup_rows: int = 20_000
    #: How often the index checks the table for commits whose notice was dropped.
    index_poll_s: float = 1.0
    #: Most queries stacked into one library call.
    index_max_batch: int = 256
    #: Largest k a caller may ask for.
    search_max_k: int = 1000
    #: Largest over-fetch of one filtered search before it falls back to an exact scan.
    search_max_fetch: int = 4096
    #: A filter admitting at most this many chunks is answered by an exact scan in DuckDB.
    search_exact_rows: int = 2000
    #: How long a filter's selectivity estimate (a COUNT) is reused, in seconds.
    search_count_ttl_s: float = 10.0

    # -- partitioning of messages (the maintenance actor; docs/partitioning.md) ----------
    #: Move closed months of ``messages`` to Parquet on a schedule, and serve retention and
    #: corrections of archived months. On by default: the view ``messages`` reads the same
    #: rows either way, and the hot table's indexes stay small as the years pile up.
    partition_enabled: bool = True
    #: Archive folder; empty means ``<db_path>.archive`` (for an in-memory database,
    #: partitioning is off unless a folder is given).
    archive_dir: str = ""
    #: Seconds between maintenance rounds (move closed months, apply retention, delete garbage).
    maintenance_interval_s: float = 3_600.0
    #: Seconds from start to the first round, so a process restarted more often than the
    #: interval still moves its closed months.
    maintenance_first_round_s: float = 60.0
    #: Months kept in the hot table besides the current one (1: the current and the last).
    keep_hot_months: int = 1
    #: Months kept at all, the current one included; older ones are dropped by the
    #: maintenance round. None keeps everything (retention is then one call: drop_period).
    retain_months: int | None = None
    #: How long after its end a month may still receive late messages; only then is it
    #: moved or droppable (a later straggler still lands, hot, and is merged on the next move).
    partition_grace_s: float = 2 * 86_400.0
    #: How long files of a superseded archive generation are kept for queries that bound the
    #: old view; at least ``default_timeout_s`` (a longer per-call timeout may then fail).
    garbage_delay_s: float = 600.0
    #: Months moved per round at most (bounds a round after a long downtime).
    max_moves_per_round: int = 2
    maintenance_mailbox: int = 64

    # -- the mesh (the mesh actor; docs/mesh.md) ------------------------------------------
    #: Join a mesh of supervisors. Off by default: ``symbiote run`` is then a purely local,
    #: embedded database with no socket open.
    mesh_enabled: bool = False
    #: Mesh name exchanged in the handshake (and checked against the bootstrap file).
    mesh_name: str = "default"
    #: "host:port" to listen on (port 0: any free port); "[v6]:port" for IPv6.
    mesh_listen: str = "127.0.0.1:7946"
    #: "host:port" announced to peers; empty: the bound address.
    mesh_advertise: str = ""
    #: This node's Ed25519 key file (created with mode 0600 if missing); empty means
    #: ``<db_path>.mesh/node.key``.
    mesh_key_path: str = ""
    #: The mesh CA certificate (PEM): peers must hold a certificate it signed.
    mesh_ca_cert_path: str = ""
    #: This node's certificate (PEM); empty means ``<db_path>.mesh/node.crt``. Issued at
    #: start from ``mesh_ca_key_path`` when missing or for another key.
    mesh_cert_path: str = ""
    #: The network key (the CA's private key, PEM, mode 0600). Only needed to issue this
    #: node's certificate; keep it off nodes that have theirs.
    mesh_ca_key_path: str = ""
    #: ``.well-known/egregora-peers.json``: seeds, their keys, the pre-trusted peers.
    mesh_bootstrap_path: str = ""
    #: Fields this node blanks from every federated answer (grants may add more):
    #: ``authors`` (also their names in text and title), ``title``, ``text``, ``metadata``,
    #: ``metadata.<key>``. Environment: comma-separated.
    mesh_redact: tuple[str, ...] = ("authors",)
    #: Default deadline of a federated search; peers slower than this are reported missing.
    mesh_fed_deadline_s: float = 1.0
    #: Largest k of a federated search, asked or answered.
    mesh_fed_max_hits: int = 50
    #: Most peers one federated search asks.
    mesh_fed_max_peers: int = 16
    #: Federated searches answered at once for one peer and for all peers (beyond: busy).
    mesh_fed_inflight_per_peer: int = 4
    mesh_fed_inflight: int = 32
    #: Federated searches this node runs at once (beyond: Busy).
    mesh_fed_max_outgoing: int = 64
    #: Chunk text in a federated answer is cut to this many characters.
    mesh_fed_max_text_chars: int = 2000
    mesh_mailbox: int = 256
    #: Received rows waiting to be committed; beyond, new rows are refused until the writer
    #: catches up (anti-entropy asks again).
    mesh_persist_backlog: int = 100_000
    #: Seconds between writes of peers and trust state (when changed).
    mesh_state_interval_s: float = 5.0
    #: Seconds between join attempts while no member is alive.
    mesh_join_retry_s: float = 10.0
    #: Protocol timers and bounds (TOML tables ``[mesh_swim]`` etc.; see schema.mesh). The
    #: transport's host, port, advertise and mesh come from the fields above.
    mesh_swim: SwimConfig = msgspec.field(default_factory=SwimConfig)
    mesh_sync: RowSyncConfig = msgspec.field(default_factory=RowSyncConfig)
    mesh_trust: TrustConfig = msgspec.field(default_factory=TrustConfig)
    mesh_transport: TransportConfig = msgspec.field(default_factory=TransportConfig)

    def __post_init__(self) -> None:
        _at_least(self.dim, 1, "dim")
        _at_least(self.readers, 1, "readers")
        _at_least(self.writer_mailbox, 1, "writer_mailbox")
        _at_least(self.reader_mailbox, 1, "reader_mailbox")
        _at_least(self.max_batch_rows, 1, "max_batch_rows")
        _at_least(self.ingest_max_batch, 1, "ingest_max_batch")
        _at_least(self.max_text_bytes, 1, "max_text_bytes")
        _at_least(self.stream_batch_rows, 1, "stream_batch_rows")
        _at_least(self.restart_intensity, 0, "restart_intensity")
        if not isinstance(self.db_thread_nice, int) or not 0 <= self.db_thread_nice <= 19:
            raise ConfigError(
                f"must be an integer in [0, 19], got {self.db_thread_nice!r}",
                field="db_thread_nice",
            )
        for name, low in (
            ("index_m", 2),
            ("index_ef_construction", 1),
            ("index_ef_search", 1),
            ("index_threads", 0),
            ("index_mailbox", 1),
            ("index_snapshot_every_changes", 1),
            ("index_catchup_rows", 1),
            ("index_max_batch", 1),
            ("search_max_k", 1),
            ("search_max_fetch", 1),
            ("search_exact_rows", 0),
        ):
            _at_least(getattr(self, name), low, name)
        if self.search_max_k > 100_000 or self.search_max_fetch > 100_000:
            raise ConfigError("must be at most 100000", field="search_max_fetch")
        if self.index_backend not in ("hnswlib", "usearch"):
            raise ConfigError(f"unknown backend {self.index_backend!r}", field="index_backend")
        if self.duckdb_threads is not None:
            _at_least(self.duckdb_threads, 1, "duckdb_threads")
        gil = self.gil_switch_interval_ms
        if gil is not None and not (
            isinstance(gil, int | float) and math.isfinite(gil) and 0.01 <= gil <= 100
        ):
            raise ConfigError(
                f"must be within [0.01, 100] milliseconds or null, got {gil!r}",
                field="gil_switch_interval_ms",
            )
        if not 0 <= self.batch_window_s <= 1:
            raise ConfigError(
                f"must be within [0, 1] seconds, got {self.batch_window_s!r}",
                field="batch_window_s",
            )
        for name in (
            "default_timeout_s",
            "restart_period_s",
            "shutdown_s",
            "index_snapshot_interval_s",
            "index_poll_s",
            "search_count_ttl_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"must be > 0, got {getattr(self, name)!r}", field=name)
        if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)", self.checkpoint_threshold):
            raise ConfigError(
                f"must be a size such as '256MB', got {self.checkpoint_threshold!r}",
                field="checkpoint_threshold",
            )
        if not self.db_path:
            raise ConfigError("must name a file", field="db_path")
        self._check_partitioning()
        self._check_mesh()

    def _check_mesh(self) -> None:
        for name in ("mesh_listen", "mesh_advertise"):
            value = getattr(self, name)
            if value or name == "mesh_listen":
                _check_addr(value, name)
        if not 1 <= len(self.mesh_name) <= 200:
            raise ConfigError("must be 1..200 characters", field="mesh_name")
        check_redact_fields(self.mesh_redact, "mesh_redact")
        for name in (
            "mesh_fed_max_peers",
            "mesh_fed_inflight_per_peer",
            "mesh_fed_inflight",
            "mesh_fed_max_outgoing",
            "mesh_fed_max_text_chars",
            "mesh_mailbox",
            "mesh_persist_backlog",
        ):
            _at_least(getattr(self, name), 1, name)
        if not isinstance(self.mesh_fed_max_hits, int) or not (
            1 <= self.mesh_fed_max_hits <= MAX_FED_HITS
        ):
            raise ConfigError(f"must be in 1..{MAX_FED_HITS}", field="mesh_fed_max_hits")
        for name in ("mesh_fed_deadline_s", "mesh_state_interval_s", "mesh_join_retry_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"must be a finite number > 0, got {value!r}", field=name)
        if self.mesh_fed_deadline_s > 30:
            raise ConfigError("must be at most 30 s", field="mesh_fed_deadline_s")
        if not self.mesh_enabled:
            return
        if not self.mesh_ca_cert_path:
            raise ConfigError(
                "the mesh needs its CA certificate (the network's public key)",
                field="mesh_ca_cert_path",
            )
        if self.db_path.startswith(":memory:") and not self.mesh_key_path:
            raise ConfigError(
                "an in-memory database needs an explicit node key file", field="mesh_key_path"
            )

    def _check_partitioning(self) -> None:
        _at_least(self.keep_hot_months, 0, "keep_hot_months")
        _at_least(self.max_moves_per_round, 1, "max_moves_per_round")
        _at_least(self.maintenance_mailbox, 1, "maintenance_mailbox")
        for name in ("maintenance_interval_s", "partition_grace_s", "garbage_delay_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"must be a finite number > 0, got {value!r}", field=name)
        first = self.maintenance_first_round_s
        if not (isinstance(first, int | float) and math.isfinite(first) and first >= 0):
            raise ConfigError(
                f"must be a finite number >= 0, got {first!r}", field="maintenance_first_round_s"
            )
        if self.retain_months is not None:
            _at_least(self.retain_months, 1, "retain_months")
            if self.retain_months <= self.keep_hot_months:
                raise ConfigError(
                    f"must exceed keep_hot_months ({self.keep_hot_months}), "
                    f"got {self.retain_months}",
                    field="retain_months",
                )
        if self.garbage_delay_s < self.default_timeout_s:
            # A query bound to the old view may still open the old files until its deadline.
            raise ConfigError(
                f"must be at least default_timeout_s ({self.default_timeout_s} s), "
                f"got {self.garbage_delay_s}",
                field="garbage_delay_s",
            )

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Config:
        """Defaults, then the TOML file at ``path``, then the environment, then ``overrides``.

        Without ``path``, ``./symbiote.toml`` is read if it exists.
        """
        values: dict[str, Any] = {}
        toml_path = Path(path) if path is not None else Path("symbiote.toml")
        if path is not None and not toml_path.exists():
            raise ConfigError(f"no such file: {toml_path}", field="config")
        if toml_path.exists():
            try:
                values.update(msgspec.toml.decode(toml_path.read_bytes()))
            except msgspec.DecodeError as exc:
                raise ConfigError(f"{toml_path}: {exc}", field="config") from None
        values.update(_from_env(os.environ if env is None else env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return _convert(values)


def _check_addr(value: str, field: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"must be host:port, got {value!r}", field=field)


#: Fields given as comma-separated lists in the environment.
_LIST_FIELDS = frozenset({"mesh_redact"})


def _at_least(value: int, low: int, field: str) -> None:
    if not isinstance(value, int) or value < low:
        raise ConfigError(f"must be an integer >= {low}, got {value!r}", field=field)


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    fields = set(Config.__struct_fields__)
    out: dict[str, Any] = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in _LIST_FIELDS:
                out[name] = [v.strip() for v in value.split(",") if v.strip()]
            elif name in fields:
                out[name] = value
    return out


def _convert(values: dict[str, Any]) -> Config:
    try:
        # strict=False lets "4" from the environment become 4.
        return msgspec.convert(values, Config, strict=False)
    except msgspec.ValidationError as exc:
        match = re.search(r"at `\$\.(\w+)`", str(exc))
        field = match.group(1) if match else None
        message = str(exc).split(" - at ")[0]
        raise ConfigError(message, field=field) from None
