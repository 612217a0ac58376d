"""Typed errors and the failure record that carries them across a mailbox.

Every error symbiote raises at a caller is a :class:`SymbioteError` subclass with a stable
``code``. When an error has to cross a mailbox (an actor answering a request, a peer answering
over the mesh) it travels as a :class:`Failure` struct and is turned back into the same
exception class on the caller's side by :func:`raise_failure`, so callers can ``except`` the
precise class they care about and tools can match on the code.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

__all__ = [
    "ActorCrashed",
    "ActorStopped",
    "BadArgument",
    "Busy",
    "ConfigError",
    "DeadlineExceeded",
    "Failure",
    "Interrupted",
    "InvalidRecord",
    "NotFound",
    "PeriodOpen",
    "QueryError",
    "SchemaTooNew",
    "SupervisorEscalation",
    "SymbioteError",
    "TooLarge",
    "WriteConflict",
    "WrongMessage",
    "error_for_code",
    "error_of",
    "raise_failure",
]


class Failure(msgspec.Struct, frozen=True, tag=True):
    """An error as data: what crosses a mailbox or a socket instead of an exception."""

    code: str
    message: str
    field: str | None = None


class SymbioteError(Exception):
    """Base of every error symbiote raises; ``code`` is stable, ``field`` names the culprit."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message if field is None else f"{field}: {message}")
        self.message = message
        self.field = field

    def to_failure(self) -> Failure:
        """This error as a :class:`Failure` record."""
        return Failure(code=self.code, message=self.message, field=self.field)


class BadArgument(SymbioteError, ValueError):
    """A call was made with an argument outside its domain (a zero deadline, k <= 0...)."""

    code = "bad_argument"


class ConfigError(SymbioteError, ValueError):
    """A configuration or child spec is invalid; raised when it is built or started."""

    code = "config"


class InvalidRecord(SymbioteError, ValueError):
    """A record failed validation (wrong dimension, NaN, naive timestamp...)."""

    code = "invalid_record"


class TooLarge(InvalidRecord):
    """A value or frame is larger than its configured cap."""

    code = "too_large"


class WrongMessage(SymbioteError, TypeError):
    """An actor was sent a message type it does not accept; the actor is unaffected."""

    code = "wrong_message"


class Busy(SymbioteError):
    """The target's mailbox is full and the overload policy is ``fail``."""

    code = "busy"


class DeadlineExceeded(SymbioteError, TimeoutError):
    """No reply arrived within the caller's deadline."""

    code = "deadline"


class ActorCrashed(SymbioteError):
    """The actor died while the request was queued or being handled."""

    code = "actor_crashed"


class ActorStopped(SymbioteError):
    """The actor is stopped (or stopping) and takes no more messages."""

    code = "actor_stopped"


class SupervisorEscalation(SymbioteError):
    """A supervisor exceeded its restart intensity and gave up on its children."""

    code = "escalation"


class QueryError(SymbioteError):
    """A SQL statement failed: syntax, binding, missing table, runtime error."""

    code = "query"


class Interrupted(SymbioteError):
    """A running query was stopped by ``interrupt()`` (a cancel or a deadline), not a failure."""

    code = "interrupted"


class WriteConflict(SymbioteError):
    """A write failed a constraint or a concurrent transaction touched the same key."""

    code = "write_conflict"


class NotFound(BadArgument):
    """A call named something that does not exist: a data period, a tenant in it, a message."""

    code = "not_found"


class PeriodOpen(BadArgument):
    """A maintenance call targeted a data period that may still receive writes; refused."""

    code = "period_open"


class SchemaTooNew(SymbioteError):
    """The database was written by a newer symbiote; this version refuses to open it."""

    code = "schema_too_new"


def _all_subclasses(cls: type[SymbioteError]) -> list[type[SymbioteError]]:
    out: list[type[SymbioteError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_for_code(code: str) -> type[SymbioteError]:
    """The exception class registered for ``code`` (``SymbioteError`` if it is unknown)."""
    for cls in _all_subclasses(SymbioteError):
        if cls.code == code:
            return cls
    return SymbioteError


def error_of(failure: Failure) -> SymbioteError:
    """The exception that ``failure`` describes (the reverse of ``to_failure``)."""
    return error_for_code(failure.code)(failure.message, field=failure.field)


def raise_failure(failure: Failure) -> None:
    """Raise the exception that ``failure`` describes."""
    raise error_of(failure)
