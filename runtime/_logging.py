"""Log records with their structured fields shown as ``key=value`` after the message.

symbiote logs through the standard :mod:`logging` module and puts its fields in ``extra``
(``child=``, ``error=``, ``peer=``...). The plain formatter drops them; this one appends them,
so the CLI's log lines carry the facts and stay greppable.
"""

from __future__ import annotations

import logging

__all__ = ["KeyValueFormatter", "configure_logging"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class KeyValueFormatter(logging.Formatter):
    """``logging.Formatter`` that appends a record's ``extra`` fields as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if fields:
            text += " " + " ".join(f"{k}={v!r}" for k, v in sorted(fields.items()))
        return text


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` with :class:`KeyValueFormatter` (used by the CLI)."""
    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
