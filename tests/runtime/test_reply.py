"""The one-shot reply and the shared deadline timer behind ``ask``."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from symbiote.runtime import ChildSpec, DeadlineExceeded, SupervisorSpec, open_supervisor
from symbiote.runtime._reply import _SLACK, Reply, _timer
from tests.runtime.kit import Echo, Sleep, worker


def tree(*children: ChildSpec) -> SupervisorSpec:
    return SupervisorSpec(id="root", children=children)


async def test_short_deadline_after_long_one_fires_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The timer sleeps until the earliest deadline it knows; a later, shorter ask must move
    # that wake-up earlier rather than wait behind the long one.
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log, mailbox=8))) as sup:
        w = sup.ref("w")
        fired: dict[str, float] = {}

        async def ask(name: str, timeout: float) -> None:
            t0 = trio.current_time()
            with pytest.raises(DeadlineExceeded):
                await w.ask(Sleep(1000), timeout=timeout)
            fired[name] = trio.current_time() - t0

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "long", 100.0)
            await trio.sleep(1)
            nursery.start_soon(ask, "short", 2.0)
        assert fired["short"] == pytest.approx(2.0)
        assert fired["long"] == pytest.approx(100.0)


async def test_answered_entries_do_not_pile_up() -> None:
    # 20,000 answered asks with a long deadline: without pruning, every one would stay in the
    # heap until its deadline (an hour away).
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log))) as sup:
        w = sup.ref("w")
        for i in range(20_000):
            assert await w.ask(Echo(i), timeout=3600) == i
        timer = _timer()
        assert len(timer._heap) <= 2 * timer._waiting + _SLACK + 1
        assert timer._waiting == 0


async def test_cancelled_wait_abandons_and_is_not_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reply = Reply()
    with trio.move_on_after(1):
        await reply.wait(trio.current_time() + 10)
    assert reply.abandoned and not reply.done
    assert _timer()._waiting == 0
    # An answer that comes after the caller left changes nothing and wakes no one.
    assert reply.set("late", None) is True
    await trio.sleep(20)  # the stale heap entry expires harmlessly


async def test_answer_before_wait_returns_at_once() -> None:
    reply = Reply()
    assert reply.set(7, None) is True
    assert reply.set(8, None) is False  # one-shot
    assert await reply.wait(trio.current_time() + 1) is True
    assert reply.value == 7
