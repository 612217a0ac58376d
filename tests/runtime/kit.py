"""Small actors used by the kernel tests."""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from symbiote.runtime import Actor, ChildSpec, Inbox
from symbiote.schema.errors import BadArgument


class Echo(msgspec.Struct, frozen=True):
    value: Any


class Crash(msgspec.Struct, frozen=True):
    reason: str = "boom"
    after: float = 0.0


class Sleep(msgspec.Struct, frozen=True):
    seconds: float


class Refuse(msgspec.Struct, frozen=True):
    pass


class Worker(Actor):
    """Echoes, sleeps, refuses, or crashes on request; records its lifecycle in ``log``."""

    accepts = (Echo, Crash, Sleep, Refuse)

    def __init__(self, name: str, log: list[str], *, start_fails: bool = False) -> None:
        self.name = name
        self.log = log
        self.start_fails = start_fails

    async def on_start(self) -> None:
        if self.start_fails:
            raise RuntimeError(f"{self.name} cannot start")
        self.log.append(f"start {self.name}")

    async def handle(self, msg: Any) -> Any:
        if isinstance(msg, Echo):
            return msg.value
        if isinstance(msg, Sleep):
            await trio.sleep(msg.seconds)
            return msg.seconds
        if isinstance(msg, Refuse):
            raise BadArgument("refused on purpose", field="msg")
        await trio.sleep(msg.after)
        raise RuntimeError(msg.reason)

    async def on_stop(self) -> None:
        self.log.append(f"stop {self.name}")


class Quitter(Actor):
    """Returns from run() at once: a normal exit."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def run(self, inbox: Inbox) -> None:
        self.log.append("quit")


class SlowStop(Worker):
    """Takes forever in on_stop: the shutdown deadline must cut it short."""

    async def on_stop(self) -> None:
        self.log.append(f"stopping {self.name}")
        await trio.sleep_forever()


def worker(name: str, log: list[str], **kw: Any) -> ChildSpec:
    start_fails = kw.pop("start_fails", False)
    return ChildSpec(id=name, factory=lambda: Worker(name, log, start_fails=start_fails), **kw)
