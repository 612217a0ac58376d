"""Child specs as data: what to start, how to restart it, how long it may take to stop.

Modelled on Erlang/OTP's child specification. A :class:`SupervisorSpec` is itself a valid
child, which is how trees nest. Specs validate themselves when built, so a bad tree fails at
construction with a :class:`ConfigError` naming the field, not halfway through a start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import msgspec

from symbiote.schema.errors import ConfigError

if TYPE_CHECKING:
    from symbiote.runtime._actor import Actor

__all__ = ["RESTART_TYPES", "STRATEGIES", "ChildSpec", "Restart", "Strategy", "SupervisorSpec"]

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
Restart = Literal["permanent", "transient", "temporary"]
STRATEGIES: tuple[str, ...] = ("one_for_one", "one_for_all", "rest_for_one")
RESTART_TYPES: tuple[str, ...] = ("permanent", "transient", "temporary")


def _positive(value: float, field: str) -> None:
    if not isinstance(value, int | float) or math.isnan(value) or value <= 0:
        raise ConfigError(f"must be a positive number, got {value!r}", field=field)


def _check_id(child_id: str) -> None:
    if not isinstance(child_id, str) or not child_id or "/" in child_id:
        raise ConfigError(f"must be a non-empty name without '/', got {child_id!r}", field="id")


def _check_restart(restart: str, child_id: str) -> None:
    if restart not in RESTART_TYPES:
        raise ConfigError(
            f"unknown restart type {restart!r}; expected one of {', '.join(RESTART_TYPES)}",
            field=f"{child_id}.restart",
        )


class ChildSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How to run one actor under a supervisor.

    ``factory`` builds a fresh actor for every incarnation, so no state leaks from a crashed
    one. ``shutdown`` is the deadline in seconds for the actor to stop once asked.
    """

    id: str
    factory: Callable[[], Actor]
    restart: Restart = "permanent"
    shutdown: float = 5.0
    mailbox: int = 64
    overload: Literal["wait", "fail"] = "wait"

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_restart(self.restart, self.id)
        _positive(self.shutdown, f"{self.id}.shutdown")
        if not isinstance(self.mailbox, int) or self.mailbox < 0:
            raise ConfigError(
                f"mailbox size must be an integer >= 0, got {self.mailbox!r}",
                field=f"{self.id}.mailbox",
            )
        if self.overload not in ("wait", "fail"):
            raise ConfigError(
                f"unknown overload policy {self.overload!r}; expected 'wait' or 'fail'",
                field=f"{self.id}.overload",
            )
        if not callable(self.factory):
            raise ConfigError("must be callable", field=f"{self.id}.factory")


class SupervisorSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A supervisor: its children in start order, its strategy and its restart budget.

    At most ``intensity`` restarts within ``period`` seconds (OTP's MaxR and MaxT); one more
    and the supervisor stops its children and fails to its parent. Between restarts it waits
    ``backoff_initial`` seconds, doubling per recent restart up to ``backoff_max``.
    """

    id: str
    children: tuple[ChildSpec | SupervisorSpec, ...]
    strategy: Strategy = "one_for_one"
    intensity: int = 3
    period: float = 5.0
    backoff_initial: float = 0.05
    backoff_max: float = 2.0
    restart: Restart = "permanent"
    shutdown: float = 30.0

    def __post_init__(self) -> None:
        _check_id(self.id)
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}",
                field=f"{self.id}.strategy",
            )
        _check_restart(self.restart, self.id)
        if not isinstance(self.intensity, int) or self.intensity < 0:
            raise ConfigError(
                f"must be an integer >= 0, got {self.intensity!r}", field=f"{self.id}.intensity"
            )
        _positive(self.period, f"{self.id}.period")
        _positive(self.shutdown, f"{self.id}.shutdown")
        if self.backoff_initial < 0 or self.backoff_max < self.backoff_initial:
            raise ConfigError(
                "need 0 <= backoff_initial <= backoff_max", field=f"{self.id}.backoff_initial"
            )
        seen: set[str] = set()
        for child in self.children:
            if child.id in seen:
                raise ConfigError(
                    f"duplicate child id {child.id!r} under {self.id!r}", field="children"
                )
            seen.add(child.id)
