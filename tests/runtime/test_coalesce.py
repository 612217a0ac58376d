"""The client-side batcher: concurrent calls sent as one message, answered one by one."""

from __future__ import annotations

import functools
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from symbiote.runtime import ActorStopped, Busy, Coalescer, ConfigError, DeadlineExceeded, _reply
from symbiote.runtime._coalesce import ANSWER_SLICE
from symbiote.schema.errors import BadArgument, SymbioteError


class Recorder:
    """A ``send`` that records its batches and answers ``item * 10``, or fails as told."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.timeouts: list[float] = []
        self.delay = delay
        self.fail_items: set[int] = set()
        self.fail_batch: SymbioteError | None = None
        self.release = trio.Event()
        self.hold = False

    async def __call__(self, items: list[int], timeout: float) -> list[int | SymbioteError]:
        self.batches.append(list(items))
        self.timeouts.append(timeout)
        if self.hold:
            await self.release.wait()
        await trio.sleep(self.delay)
        if self.fail_batch is not None:
            raise self.fail_batch
        return [
            BadArgument("refused", field=f"item{i}") if i in self.fail_items else i * 10
            for i in items
        ]


@asynccontextmanager
async def running(send: Recorder, **limits: Any) -> AsyncIterator[Coalescer[int, int]]:
    """A coalescer named ``t`` over ``send``, its task running for the block."""
    c: Coalescer[int, int] = Coalescer(send, name="t", **limits)
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run)
        yield c
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def first_held(send: Recorder, **limits: Any) -> AsyncIterator[Coalescer[int, int]]:
    """``running``, with a first batch (item 0) in flight and held until ``send.release``."""
    send.hold = True
    async with running(send, **limits) as c:
        c.submit_nowait(0, timeout=1000)
        await trio.testing.wait_all_tasks_blocked()
        yield c


async def _call_all(
    c: Coalescer[int, int], items: range, timeout: float = 10.0
) -> dict[int, object]:
    out: dict[int, object] = {}

    async def one(i: int) -> None:
        try:
            out[i] = await c.call(i, timeout=timeout)
        except SymbioteError as exc:
            out[i] = exc

    async with trio.open_nursery() as nursery:
        for i in items:
            nursery.start_soon(one, i)
    return out


async def test_concurrent_calls_go_out_as_one_batch_and_each_gets_its_answer() -> None:
    send = Recorder()
    async with running(send, max_batch=64, max_waiting=64) as c:
        out = await _call_all(c, range(20))
    assert out == {i: i * 10 for i in range(20)}
    assert len(send.batches) == 1 and sorted(send.batches[0]) == list(range(20))
    assert (c.batches, c.items) == (1, 20)


async def test_a_lone_caller_is_sent_at_once(autojump_clock: trio.testing.MockClock) -> None:
    # Under the autojump clock a gathering timer would show as time passing.
    send = Recorder()
    async with running(send, max_batch=8, max_waiting=8) as c:
        t0 = trio.current_time()
        for i in range(3):
            assert await c.call(i, timeout=5) == i * 10
        assert trio.current_time() == t0
    assert send.batches == [[0], [1], [2]]


async def test_calls_made_while_a_batch_is_in_flight_form_the_next_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder(delay=1.0)
    async with running(send, max_batch=100, max_waiting=100) as c:
        async with trio.open_nursery() as callers:
            callers.start_soon(_call_all, c, range(0, 1))
            await trio.sleep(0.5)  # the first batch is in flight now
            callers.start_soon(_call_all, c, range(1, 30))
    assert send.batches[0] == [0]
    assert sorted(send.batches[1]) == list(range(1, 30))


async def test_an_item_error_fails_that_caller_only() -> None:
    send = Recorder()
    send.fail_items = {3}
    async with running(send, max_batch=16, max_waiting=16) as c:
        out = await _call_all(c, range(8))
    assert isinstance(out[3], BadArgument) and out[3].field == "item3"
    assert {i: v for i, v in out.items() if i != 3} == {i: i * 10 for i in range(8) if i != 3}


async def test_a_batch_error_fails_every_caller_of_the_batch() -> None:
    send = Recorder()
    send.fail_batch = Busy("index full")
    async with running(send, max_batch=16, max_waiting=16) as c:
        out = await _call_all(c, range(5))
        send.fail_batch = None
        assert await c.call(7, timeout=5) == 70  # and the coalescer carries on
    assert all(isinstance(v, Busy) for v in out.values())


async def test_batches_hold_at_most_max_batch_items() -> None:
    send = Recorder()
    async with running(send, max_batch=8, max_waiting=64) as c:
        out = await _call_all(c, range(30))
    assert out == {i: i * 10 for i in range(30)}
    assert max(len(b) for b in send.batches) == 8
    assert sum(len(b) for b in send.batches) == 30


async def test_a_weight_bound_cuts_batches_but_never_strands_a_heavy_item() -> None:
    send = Recorder()
    send.hold = True
    async with running(send, max_batch=64, max_waiting=64, weight=lambda i: i, max_weight=10) as c:
        async with trio.open_nursery() as callers:
            callers.start_soon(_call_all, c, range(1, 2))  # in flight, held
            await trio.testing.wait_all_tasks_blocked()
            # Queued in this order while the first batch is held: 3+3+3 fit, 4 does not;
            # 30 is over the bound on its own and still goes (alone).
            for i in (3, 3, 3, 4, 30, 2):
                callers.start_soon(functools.partial(c.call, i, timeout=10.0))
                await trio.testing.wait_all_tasks_blocked()
            send.hold = False
            send.release.set()
    assert send.batches == [[1], [3, 3, 3], [4], [30], [2]]


class _WakeupsPerStep(trio.abc.Instrument):
    """The most tasks one task step of ``name`` made runnable."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.running: trio.lowlevel.Task | None = None
        self.count = 0
        self.most = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.running, self.count = task, 0

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        if self.running is not None and self.running.name.endswith(self.name):
            self.count += 1
            self.most = max(self.most, self.count)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.running = None


async def test_a_large_batch_is_answered_in_slices() -> None:
    # 1,000 wake-ups in one task step would hold the loop for milliseconds.
    send = Recorder()
    send.hold = True
    probe = _WakeupsPerStep("Coalescer.run")
    async with running(send, max_batch=2048, max_waiting=2048) as c:
        async with trio.open_nursery() as callers:
            callers.start_soon(_call_all, c, range(1))  # the first batch, held
            await trio.testing.wait_all_tasks_blocked()
            callers.start_soon(_call_all, c, range(1, 1001))
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(probe)
            send.hold = False
            send.release.set()
        trio.lowlevel.remove_instrument(probe)
    assert c.items == 1001
    assert 0 < probe.most <= ANSWER_SLICE + 1


async def test_each_caller_keeps_its_own_deadline(autojump_clock: trio.testing.MockClock) -> None:
    send = Recorder(delay=5.0)
    c: Coalescer[int, int] = Coalescer(send, name="t", max_batch=8, max_waiting=8)
    fired: dict[int, object] = {}

    async def one(i: int, timeout: float) -> None:
        t0 = trio.current_time()
        try:
            fired[i] = await c.call(i, timeout=timeout)
        except DeadlineExceeded:
            fired[i] = ("deadline", trio.current_time() - t0)

    async with trio.open_nursery() as nursery:
        await nursery.start(c.run)
        async with trio.open_nursery() as callers:
            callers.start_soon(one, 1, 1.0)
            callers.start_soon(one, 2, 20.0)
        nursery.cancel_scope.cancel()
    assert fired[1] == ("deadline", pytest.approx(1.0))
    assert fired[2] == 20
    # send is given the longest time any caller of the batch still waits.
    assert send.timeouts[0] == pytest.approx(20.0)


async def test_a_caller_that_left_before_its_batch_is_not_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    send.hold = True
    async with running(send, max_batch=8, max_waiting=8) as c:
        async with trio.open_nursery() as callers:
            callers.start_soon(_call_all, c, range(0, 1))  # in flight, held
            await trio.sleep(1)
            with trio.move_on_after(1):
                await c.call(99, timeout=60)  # queued, then gives up
            callers.start_soon(_call_all, c, range(1, 3))
            await trio.sleep(1)
            send.hold = False
            send.release.set()
    assert [sorted(b) for b in send.batches] == [[0], [1, 2]]


async def test_a_full_queue_makes_callers_wait_then_time_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    send.hold = True
    async with running(send, max_batch=2, max_waiting=2) as c:
        async with trio.open_nursery() as callers:
            callers.start_soon(_call_all, c, range(0, 2))  # taken: in flight, held
            await trio.sleep(1)
            callers.start_soon(_call_all, c, range(2, 4), 100.0)  # fill the queue
            await trio.sleep(1)
            assert c.waiting == 2
            t0 = trio.current_time()
            with pytest.raises(DeadlineExceeded):
                await c.call(9, timeout=3.0)  # no room until the deadline
            assert trio.current_time() - t0 == pytest.approx(3.0)
            assert c.waiting == 2  # the refused call never entered the queue
            send.hold = False
            send.release.set()
    assert [sorted(b) for b in send.batches] == [[0, 1], [2, 3]]


async def test_room_frees_a_waiting_caller(autojump_clock: trio.testing.MockClock) -> None:
    send = Recorder(delay=1.0)
    async with running(send, max_batch=1, max_waiting=1) as c:
        out = await _call_all(c, range(5), timeout=100.0)
    assert out == {i: i * 10 for i in range(5)}


async def test_stopping_fails_queued_and_in_flight_callers_and_later_calls() -> None:
    send = Recorder()
    send.hold = True
    c: Coalescer[int, int] = Coalescer(send, name="searches", max_batch=2, max_waiting=8)
    results: dict[int, object] = {}
    async with trio.open_nursery() as outer:

        async def callers() -> None:
            results.update(await _call_all(c, range(5)))

        async with trio.open_nursery() as nursery:
            await nursery.start(c.run)
            outer.start_soon(callers)
            await trio.testing.wait_all_tasks_blocked()
            assert len(send.batches) == 1 and c.waiting == 3
            nursery.cancel_scope.cancel()
    assert set(results) == set(range(5))
    assert all(isinstance(v, ActorStopped) for v in results.values())
    with pytest.raises(ActorStopped, match="searches is closed"):
        await c.call(1, timeout=1)


@pytest.mark.parametrize("timeout", [float("nan"), 0.0, -1.0, "5"])
async def test_a_bad_timeout_is_refused_before_it_joins_a_batch(timeout: Any) -> None:
    send = Recorder()
    async with running(send, max_batch=8, max_waiting=8) as c:
        with pytest.raises(BadArgument) as info:
            await c.call(1, timeout=timeout)
        assert info.value.field == "timeout"
        assert await c.call(2, timeout=5) == 20  # nothing poisoned the timer or a batch
    assert send.batches == [[2]]


async def test_a_caller_waiting_for_room_hears_of_the_stop_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    send.hold = True
    c: Coalescer[int, int] = Coalescer(send, name="t", max_batch=1, max_waiting=1)
    seen: dict[str, object] = {}

    async def late() -> None:
        t0 = trio.current_time()
        with pytest.raises(ActorStopped):
            await c.call(9, timeout=1000)
        seen["after"] = trio.current_time() - t0

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(c.run)
            outer.start_soon(_call_all, c, range(2))  # one in flight, one filling the queue
            await trio.testing.wait_all_tasks_blocked()
            outer.start_soon(late)  # waits for room
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    assert seen["after"] == pytest.approx(5.0)  # at the stop, not at its 1,000 s deadline


async def test_callers_of_a_failed_batch_raise_their_own_error_objects() -> None:
    send = Recorder()
    send.fail_batch = Busy("full")
    async with running(send, max_batch=8, max_waiting=8) as c:
        out = await _call_all(c, range(3))
    errors = list(out.values())
    assert all(isinstance(e, Busy) and str(e) == "full" for e in errors)
    assert len({id(e) for e in errors}) == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_batch": 0, "max_waiting": 4}, "max_batch"),
        ({"max_batch": 8, "max_waiting": 4}, "max_waiting"),
        ({"max_batch": 8, "max_waiting": 8, "max_weight": 10}, "max_weight"),
        ({"max_batch": 8, "max_waiting": 8, "weight": len, "max_weight": 0}, "max_weight"),
    ],
)
def test_limits_are_checked(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Coalescer(Recorder(), name="t", **kwargs)
    assert info.value.field == field


# -- tickets: calls submitted without a task parked on each ----------------------------------


async def test_submitted_items_go_out_as_one_batch_and_tickets_hold_the_answers() -> None:
    send = Recorder()
    async with running(send, max_batch=64, max_waiting=64) as c:
        tickets = [c.submit_nowait(i, timeout=10) for i in range(20)]
        assert not any(t.done for t in tickets)  # nothing ran: submit_nowait never yields
        with pytest.raises(trio.WouldBlock):
            tickets[0].result()
        assert await tickets[-1].wait() == 190
        assert all(t.done for t in tickets)  # answered with the last one, in one batch
        assert [t.result() for t in tickets] == [i * 10 for i in range(20)]
    assert send.batches == [list(range(20))]


async def test_a_ticket_raises_its_item_error_each_time_it_is_read() -> None:
    send = Recorder()
    send.fail_items = {1}
    async with running(send, max_batch=8, max_waiting=8) as c:
        good, bad = c.submit_nowait(0, timeout=10), c.submit_nowait(1, timeout=10)
        with pytest.raises(BadArgument) as info:
            await bad.wait()
        assert info.value.field == "item1"
        with pytest.raises(BadArgument):
            bad.result()
        assert good.result() == 0


async def test_submit_nowait_refuses_with_busy_when_the_queue_is_full() -> None:
    send = Recorder()
    send.hold = True
    async with running(send, max_batch=2, max_waiting=2) as c:
        first = [c.submit_nowait(i, timeout=10) for i in range(2)]
        await trio.testing.wait_all_tasks_blocked()  # taken: in flight, held
        queued = [c.submit_nowait(i, timeout=10) for i in range(2, 4)]
        with pytest.raises(Busy, match=r"the queue is full \(2 calls\)"):
            c.submit_nowait(9, timeout=10)
        send.hold = False
        send.release.set()
        assert [await t.wait() for t in first + queued] == [0, 10, 20, 30]
    assert send.batches == [[0, 1], [2, 3]]  # the refused item never entered a batch


async def test_submit_waits_for_room_then_times_out(autojump_clock: trio.testing.MockClock) -> None:
    send = Recorder()
    async with first_held(send, max_batch=1, max_waiting=1) as c:
        c.submit_nowait(1, timeout=100)  # fills the queue
        t0 = trio.current_time()
        with pytest.raises(DeadlineExceeded):
            await c.submit(9, timeout=3.0)
        assert trio.current_time() - t0 == pytest.approx(3.0)
        assert c.waiting == 1
        send.hold = False
        send.release.set()
        assert await (await c.submit(2, timeout=100)).wait() == 20


async def test_a_ticket_keeps_the_deadline_of_its_submission(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder(delay=50.0)
    async with running(send, max_batch=8, max_waiting=8) as c:
        ticket = await c.submit(1, timeout=10.0)
        await trio.sleep(8)
        t0 = trio.current_time()
        with pytest.raises(DeadlineExceeded):
            await ticket.wait()
        assert trio.current_time() - t0 == pytest.approx(2.0)  # 10 s from submission


async def test_only_one_task_may_wait_on_a_ticket() -> None:
    send = Recorder()
    send.hold = True
    async with running(send, max_batch=8, max_waiting=8) as c:
        ticket = c.submit_nowait(1, timeout=10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticket.wait)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await ticket.wait()
            send.hold = False
            send.release.set()
        assert ticket.result() == 10


async def test_stopping_fails_outstanding_tickets_and_later_submits() -> None:
    send = Recorder()
    send.hold = True
    c: Coalescer[int, int] = Coalescer(send, name="writes", max_batch=2, max_waiting=8)
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run)
        tickets = [c.submit_nowait(i, timeout=10) for i in range(5)]
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    for t in tickets:
        with pytest.raises(ActorStopped):
            t.result()
    with pytest.raises(ActorStopped, match="writes is closed"):
        c.submit_nowait(1, timeout=1)
    with pytest.raises(ActorStopped):
        await c.submit(1, timeout=1)


@pytest.mark.parametrize("timeout", [float("nan"), 0.0, -1.0, "5"])
async def test_a_bad_timeout_is_refused_at_submission(timeout: Any) -> None:
    async with running(Recorder(), max_batch=8, max_waiting=8) as c:
        with pytest.raises(BadArgument):
            c.submit_nowait(1, timeout=timeout)
        with pytest.raises(BadArgument):
            await c.submit(1, timeout=timeout)
        assert c.waiting == 0


async def test_submit_is_always_a_checkpoint() -> None:
    async with running(Recorder(), max_batch=8, max_waiting=8) as c:
        with trio.testing.assert_checkpoints():
            ticket = await c.submit(1, timeout=10)
        assert await ticket.wait() == 10


async def test_concurrent_submits_never_overfill_the_queue() -> None:
    send = Recorder()
    async with first_held(send, max_batch=1, max_waiting=2) as c:
        async with trio.open_nursery() as nursery:
            for i in range(1, 11):
                nursery.start_soon(functools.partial(c.submit, i, timeout=10))
            await trio.testing.wait_all_tasks_blocked()
            assert c.waiting == 2  # the other 8 wait for room
            nursery.cancel_scope.cancel()
        send.hold = False
        send.release.set()


async def test_reading_a_failed_ticket_again_raises_a_fresh_error() -> None:
    send = Recorder()
    send.fail_items = {1}
    async with running(send, max_batch=8, max_waiting=8) as c:
        bad = c.submit_nowait(1, timeout=10)
        seen: list[BaseException] = []
        for _ in range(20):
            try:
                await bad.wait()
            except BadArgument as exc:
                seen.append(exc)
        depths = {len(traceback.extract_tb(e.__traceback__)) for e in seen}
        assert len(depths) == 1 and len({id(e) for e in seen}) == 20


async def test_a_ticket_past_its_deadline_is_not_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    async with first_held(send, max_batch=8, max_waiting=8) as c:
        late = c.submit_nowait(1, timeout=1.0)
        fresh = c.submit_nowait(2, timeout=100)
        await trio.sleep(5)  # the deadline of 1 passes while it is queued; nobody waits
        send.hold = False
        send.release.set()
        assert await fresh.wait() == 20
        with pytest.raises(DeadlineExceeded, match=r"within 1\.0 s"):
            late.result()
    assert send.batches == [[0], [2]]


async def test_a_ticket_whose_wait_timed_out_holds_the_deadline_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    async with first_held(send, max_batch=8, max_waiting=8) as c:
        late = c.submit_nowait(1, timeout=1.0)  # queued behind the held batch
        with pytest.raises(DeadlineExceeded):
            await late.wait()
        assert late.done  # settled at once, before the coalescer reaches it
        send.hold = False
        send.release.set()
        await trio.sleep(5)
        with pytest.raises(DeadlineExceeded, match=r"within 1\.0 s"):
            late.result()
    assert send.batches == [[0]]


async def test_a_cancelled_wait_leaves_the_call_going(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    async with first_held(send, max_batch=1, max_waiting=4) as c:
        ticket = c.submit_nowait(1, timeout=60)  # queued behind the held batch
        with trio.move_on_after(1):
            await ticket.wait()
        send.hold = False
        send.release.set()
        t0 = trio.current_time()
        assert await ticket.wait() == 10  # sent after all, and answered
        assert trio.current_time() - t0 < 1
    assert send.batches == [[0], [1]]


async def test_waiting_on_a_ticket_again_and_again_keeps_the_timer_heap_bounded() -> None:
    send = Recorder()
    async with first_held(send, max_batch=1, max_waiting=4) as c:
        ticket = c.submit_nowait(1, timeout=1000)
        for _ in range(3 * _reply._SLACK):
            with trio.move_on_after(0):
                await ticket.wait()
        timer = _reply._TIMER.get()
        assert timer._waiting == 0
        assert len(timer._heap) <= 2 + _reply._SLACK
        send.hold = False
        send.release.set()
        assert await ticket.wait() == 10


async def test_room_goes_to_waiting_callers_in_arrival_order() -> None:
    send = Recorder()
    newcomer: list[object] = []

    class Probe(Recorder):
        async def __call__(self, items: list[int], timeout: float) -> list[int | SymbioteError]:
            if items == [1]:
                # The batch just freed a place, and a waiting caller was let in but has not
                # run yet: a newcomer must not take that place.
                try:
                    c.submit_nowait(99, timeout=10)
                    newcomer.append("queued")
                except Busy:
                    newcomer.append("busy")
            return await send(items, timeout)

    send.hold = True
    probe = Probe()
    async with running(probe, max_batch=1, max_waiting=1) as c:
        c.submit_nowait(0, timeout=100)
        await trio.testing.wait_all_tasks_blocked()  # in flight, held
        c.submit_nowait(1, timeout=100)  # the queue is full
        async with trio.open_nursery() as callers:
            for i in (10, 11, 12):
                callers.start_soon(functools.partial(c.call, i, timeout=100))
                await trio.testing.wait_all_tasks_blocked()  # parked, in this order
            with pytest.raises(Busy):
                c.submit_nowait(13, timeout=10)  # behind them
            send.hold = False
            send.release.set()
    assert newcomer == ["busy"]
    assert send.batches == [[0], [1], [10], [11], [12]]


async def test_a_caller_that_timed_out_waiting_for_room_leaves_no_trace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    async with first_held(send, max_batch=1, max_waiting=1) as c:
        c.submit_nowait(1, timeout=100)  # the queue is full
        with pytest.raises(DeadlineExceeded):
            await c.submit(2, timeout=1.0)  # waits for room, in vain
        assert not c._room_waiters
        send.hold = False
        send.release.set()
        assert await (await c.submit(3, timeout=100)).wait() == 30
    assert send.batches == [[0], [1], [3]]


async def test_callers_let_in_together_are_sent_in_arrival_order() -> None:
    send = Recorder()
    async with first_held(send, max_batch=2, max_waiting=3) as c:
        for i in (1, 2, 3):
            c.submit_nowait(i, timeout=100)  # the queue is full
        async with trio.open_nursery() as callers:
            for i in (10, 11, 12):
                callers.start_soon(functools.partial(c.call, i, timeout=100))
                await trio.testing.wait_all_tasks_blocked()  # parked, in this order
            send.hold = False
            send.release.set()
    assert send.batches == [[0], [1, 2], [3, 10], [11, 12]]


async def test_submit_nowait_after_a_close_with_callers_waiting_says_stopped() -> None:
    send = Recorder()
    c: Coalescer[int, int] = Coalescer(send, name="t", max_batch=1, max_waiting=1)
    send.hold = True
    out: list[object] = []

    async def wait_for_room(i: int) -> None:
        try:
            await c.call(i, timeout=100)
        except ActorStopped as exc:
            out.append(exc)

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(c.run)
            c.submit_nowait(0, timeout=100)
            await trio.testing.wait_all_tasks_blocked()  # in flight, held
            c.submit_nowait(1, timeout=100)  # the queue is full
            outer.start_soon(wait_for_room, 10)
            outer.start_soon(wait_for_room, 11)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        with pytest.raises(ActorStopped):  # not Busy, though the waiters have not run yet
            c.submit_nowait(99, timeout=10)
    assert len(out) == 2


async def test_queued_callers_that_expired_take_no_place_in_a_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    async with first_held(send, max_batch=2, max_waiting=8) as c:
        late = c.submit_nowait(1, timeout=1.0)
        fresh = [c.submit_nowait(i, timeout=100) for i in (2, 3)]
        await trio.sleep(5)  # 1's deadline passes while it is queued
        send.hold = False
        send.release.set()
        assert [await t.wait() for t in fresh] == [20, 30]
        with pytest.raises(DeadlineExceeded):
            late.result()
    # 1 is skipped, not counted: 2 and 3 fill the batch of two together.
    assert send.batches == [[0], [2, 3]]


async def test_a_weighted_batch_skips_expired_callers_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    async with first_held(send, max_batch=8, max_waiting=8, weight=lambda i: i, max_weight=5) as c:
        late = c.submit_nowait(1, timeout=1.0)
        fresh = [c.submit_nowait(i, timeout=100) for i in (2, 3, 4)]
        await trio.sleep(5)
        send.hold = False
        send.release.set()
        assert [await t.wait() for t in fresh] == [20, 30, 40]
        with pytest.raises(DeadlineExceeded):
            late.result()
    # The expired 1 weighs nothing: 2 + 3 fill the weight of 5 together, then 4 goes alone.
    assert send.batches == [[0], [2, 3], [4]]


async def test_expired_callers_give_their_room_to_a_newcomer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    async with first_held(send, max_batch=2, max_waiting=2) as c:
        gone = [c.submit_nowait(i, timeout=1.0) for i in (1, 2)]
        with pytest.raises(Busy):
            c.submit_nowait(8, timeout=100)  # full of live callers: refused
        await trio.sleep(5)  # both queued deadlines pass: their places are free again
        newcomer = c.submit_nowait(3, timeout=100)
        assert c.waiting == 1
        send.hold = False
        send.release.set()
        assert await newcomer.wait() == 30
        for t in gone:
            with pytest.raises(DeadlineExceeded):
                t.result()
    assert send.batches == [[0], [3]]


async def test_a_queue_full_of_live_callers_is_not_rescanned_for_each_refusal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    async with first_held(send, max_batch=2, max_waiting=2) as c:
        queued = [c.submit_nowait(i, timeout=100) for i in (1, 2)]
        for i in range(50):
            with pytest.raises(Busy):
                c.submit_nowait(10 + i, timeout=100)
        assert c._scans == 0  # nothing queued could have expired or been given up
        await trio.sleep(200)  # now both have: one scan frees the queue
        newcomer = c.submit_nowait(3, timeout=100)
        assert c._scans == 1
        send.hold = False
        send.release.set()
        assert await newcomer.wait() == 30
        for t in queued:
            with pytest.raises(DeadlineExceeded):
                t.result()
    assert send.batches == [[0], [3]]


async def test_a_caller_that_gave_up_frees_its_place_in_a_full_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    async with first_held(send, max_batch=2, max_waiting=2) as c:
        async with trio.open_nursery() as callers:
            stay = c.submit_nowait(1, timeout=100)

            async def leave() -> None:
                with trio.move_on_after(1):
                    await c.call(2, timeout=100)

            callers.start_soon(leave)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(Busy):
                c.submit_nowait(8, timeout=100)
            await trio.sleep(2)  # the caller of 2 gave up after 1 s
            newcomer = c.submit_nowait(3, timeout=100)
            send.hold = False
            send.release.set()
            assert [await stay.wait(), await newcomer.wait()] == [10, 30]
    assert send.batches == [[0], [1, 3]]


async def test_callers_let_in_after_giving_up_waiting_for_room_free_their_places(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Two callers wait for room and are cancelled; before their tasks run, a newcomer's
    # scan lets them in. Their entries are then dead: they must not keep the queue full.
    send = Recorder()
    async with first_held(send, max_batch=2, max_waiting=2) as c:
        for i in (1, 2):
            c.submit_nowait(i, timeout=1.0)  # they expire at t=1
        scopes = [trio.CancelScope() for _ in range(2)]

        async def caller(scope: trio.CancelScope, item: int) -> None:
            with scope:
                await c.call(item, timeout=100)

        async with trio.open_nursery() as callers:
            for scope, item in zip(scopes, (3, 4), strict=True):
                callers.start_soon(caller, scope, item)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(5)
            for scope in scopes:
                scope.cancel()
            with pytest.raises(Busy):
                c.submit_nowait(5, timeout=100)  # the scan lets 3 and 4 in, still live
        newcomer = c.submit_nowait(6, timeout=100)  # 3 and 4 have left since
        send.hold = False
        send.release.set()
        assert await newcomer.wait() == 60
    assert send.batches == [[0], [6]]


async def test_a_caller_waiting_for_room_past_its_deadline_is_not_let_in(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    async with first_held(send, max_batch=1, max_waiting=1) as c:
        c.submit_nowait(1, timeout=1.0)
        async with trio.open_nursery() as callers:

            async def waiter() -> None:
                with pytest.raises(DeadlineExceeded):
                    await c.call(2, timeout=2.0)

            callers.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            autojump_clock.jump(5)  # 1 and the waiter for 2 are both past their deadlines
            newcomer = c.submit_nowait(3, timeout=100)  # the waiter's task has not run yet
        send.hold = False
        send.release.set()
        assert await newcomer.wait() == 30
    assert send.batches == [[0], [3]]


async def test_a_cancelled_call_frees_its_place_once_its_task_has_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send = Recorder()
    async with first_held(send, max_batch=2, max_waiting=2) as c:
        stay = c.submit_nowait(1, timeout=100)
        scope = trio.CancelScope()

        async def leave() -> None:
            with scope:
                await c.call(2, timeout=100)

        async with trio.open_nursery() as callers:
            callers.start_soon(leave)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
        newcomer = c.submit_nowait(3, timeout=100)
        send.hold = False
        send.release.set()
        assert [await stay.wait(), await newcomer.wait()] == [10, 30]
    assert send.batches == [[0], [1, 3]]
