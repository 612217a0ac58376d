"""ask/tell semantics of the kernel: deadlines, overload, crashes, cancellation, bad input."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from symbiote.runtime import (
    ActorCrashed,
    ActorStopped,
    BadArgument,
    Busy,
    ChildSpec,
    DeadlineExceeded,
    SupervisorSpec,
    WrongMessage,
    open_supervisor,
)
from tests.runtime.kit import Crash, Echo, Refuse, Sleep, Worker, worker


def tree(*children: ChildSpec, **kw: object) -> SupervisorSpec:
    return SupervisorSpec(id="root", children=children, **kw)  # type: ignore[arg-type]


async def test_ask_round_trip() -> None:
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log))) as sup:
        assert await sup.ref("w").ask(Echo(41), timeout=1) == 41
        assert sup.ref("w").processed == 1


async def test_ask_deadline_raises_and_actor_lives(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log))) as sup:
        w = sup.ref("w")
        t0 = trio.current_time()
        with pytest.raises(DeadlineExceeded):
            await w.ask(Sleep(10), timeout=0.5)
        assert trio.current_time() - t0 == pytest.approx(0.5)
        assert await w.ask(Echo("still here"), timeout=20) == "still here"
        assert w.restarts == 0


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
async def test_ask_rejects_bad_deadline(timeout: float) -> None:
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log))) as sup:
        with pytest.raises(BadArgument) as info:
            await sup.ref("w").ask(Echo(1), timeout=timeout)
        assert info.value.field == "timeout"


async def test_wrong_message_type_is_refused_at_the_caller() -> None:
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log))) as sup:
        w = sup.ref("w")
        with pytest.raises(WrongMessage) as info:
            await w.ask("not a message", timeout=1)
        assert info.value.code == "wrong_message"
        with pytest.raises(WrongMessage):
            await w.tell(42)
        assert await w.ask(Echo(1), timeout=1) == 1
        assert w.restarts == 0


async def test_typed_error_from_handler_reaches_caller_only() -> None:
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log))) as sup:
        w = sup.ref("w")
        with pytest.raises(BadArgument) as info:
            await w.ask(Refuse(), timeout=1)
        assert info.value.to_failure().code == "bad_argument"
        assert info.value.field == "msg"
        assert await w.ask(Echo(2), timeout=1) == 2
        assert w.restarts == 0


async def test_busy_when_mailbox_full_and_policy_fail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log, mailbox=2))) as sup:
        w = sup.ref("w")
        await w.tell(Sleep(100))  # taken by the actor
        await trio.sleep(0.01)
        await w.tell(Sleep(0))
        await w.tell(Sleep(0))  # the mailbox (2) is now full
        with pytest.raises(Busy):
            await w.tell(Echo(1), overload="fail")
        with pytest.raises(Busy):
            await w.ask(Echo(1), timeout=1, overload="fail")
        with pytest.raises(Busy):
            w.tell_nowait(Echo(1))
        assert w.peak_depth == 2
        # With the default policy the sender waits for room instead (bounded by its deadline).
        with pytest.raises(DeadlineExceeded):
            await w.ask(Echo(1), timeout=1)


async def test_per_actor_fail_policy(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log, mailbox=0, overload="fail"))) as sup:
        w = sup.ref("w")
        await w.tell(Sleep(100))  # a rendezvous mailbox: accepted only while the actor waits
        await trio.sleep(0.01)
        with pytest.raises(Busy):
            await w.tell(Echo(1))
        # The per-call policy overrides the actor's.
        with pytest.raises(DeadlineExceeded):
            await w.ask(Echo(1), timeout=1, overload="wait")


async def test_caller_gets_actor_crashed_at_once(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log))) as sup:
        w = sup.ref("w")
        t0 = trio.current_time()
        outcomes: list[tuple[str, float]] = []

        async def waiter(msg: object) -> None:
            try:
                await w.ask(msg, timeout=100)
            except ActorCrashed:
                outcomes.append((type(msg).__name__, trio.current_time() - t0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, Crash(after=1.0))  # being handled when it crashes
            await trio.sleep(0.1)
            nursery.start_soon(waiter, Echo(1))  # queued behind it
        assert sorted(name for name, _ in outcomes) == ["Crash", "Echo"]
        assert [at for _, at in outcomes] == pytest.approx([1.0, 1.0])  # at the crash, not at 100 s
        assert w.last_error is not None and "boom" in w.last_error
        # The supervisor brought it back.
        assert await w.ask(Echo(2), timeout=5) == 2
        assert w.restarts == 1


async def test_cancelled_caller_does_not_kill_actor(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log))) as sup:
        w = sup.ref("w")
        with trio.move_on_after(0.1):
            await w.ask(Sleep(1), timeout=10)
        await trio.sleep(2)
        assert await w.ask(Echo("ok"), timeout=1) == "ok"
        assert w.restarts == 0 and w.last_error is None


async def test_stopped_actor_raises_actor_stopped() -> None:
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log))) as sup:
        w = sup.ref("w")
    with pytest.raises(ActorStopped):
        await w.ask(Echo(1), timeout=1)
    with pytest.raises(ActorStopped):
        await w.tell(Echo(1))


async def test_blocked_senders_are_released_at_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    results: list[str] = []

    async def sender(w: object) -> None:
        try:
            await w.tell(Sleep(0))  # type: ignore[attr-defined]
            results.append("sent")
        except ActorStopped:
            results.append("stopped")

    async with trio.open_nursery() as outer:
        async with open_supervisor(tree(worker("w", log, mailbox=1))) as sup:
            w = sup.ref("w")
            await w.tell(Sleep(1000))
            await trio.sleep(0.01)
            await w.tell(Sleep(0))
            for _ in range(3):
                outer.start_soon(sender, w)
            await trio.sleep(0.1)
    assert results == ["stopped"] * 3


async def test_queue_is_bounded_under_a_flood(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []
    async with open_supervisor(tree(worker("w", log, mailbox=8))) as sup:
        w = sup.ref("w")
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(w.tell, Sleep(0.01))
        await trio.sleep(5)
        # Depth counts requests sent and not yet taken: the buffer (8) plus at most the one
        # handed straight to the waiting actor.
        assert w.peak_depth <= 8 + 1
        assert w.processed == 100


def test_worker_is_constructible() -> None:
    assert Worker("x", []).name == "x"
