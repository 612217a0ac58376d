"""The runtime's configuration: one msgspec Struct, from defaults, TOML and environment.

Precedence, lowest first: the defaults below, a TOML file (``symbiote.toml`` by default, if
it exists), then ``SYMBIOTE_<FIELD>`` environment variables (``SYMBIOTE_DB_PATH``,
``SYMBIOTE_READERS``...). Every value is validated; a bad one raises :class:`ConfigError`
naming the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from symbiote.schema.errors import ConfigError

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
    #: Mailbox sizes: the bound on requests queued at each actor.
    writer_mailbox: int = 4096
    reader_mailbox: int = 64
    #: Group commit: most rows one transaction takes in.
    max_batch_rows: int = 50_000
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

    def __post_init__(self) -> None:
        _at_least(self.dim, 1, "dim")
        _at_least(self.readers, 1, "readers")
        _at_least(self.writer_mailbox, 1, "writer_mailbox")
        _at_least(self.reader_mailbox, 1, "reader_mailbox")
        _at_least(self.max_batch_rows, 1, "max_batch_rows")
        _at_least(self.max_text_bytes, 1, "max_text_bytes")
        _at_least(self.stream_batch_rows, 1, "stream_batch_rows")
        _at_least(self.restart_intensity, 0, "restart_intensity")
        if self.duckdb_threads is not None:
            _at_least(self.duckdb_threads, 1, "duckdb_threads")
        if not 0 <= self.batch_window_s <= 1:
            raise ConfigError(
                f"must be within [0, 1] seconds, got {self.batch_window_s!r}",
                field="batch_window_s",
            )
        for name in ("default_timeout_s", "restart_period_s", "shutdown_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"must be > 0, got {getattr(self, name)!r}", field=name)
        if not self.db_path:
            raise ConfigError("must name a file", field="db_path")

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


def _at_least(value: int, low: int, field: str) -> None:
    if not isinstance(value, int) or value < low:
        raise ConfigError(f"must be an integer >= {low}, got {value!r}", field=field)


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    fields = set(Config.__struct_fields__)
    out: dict[str, str] = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in fields:
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
