"""One-shot replies and the per-run timer that enforces their deadlines.

An ``ask`` used to wrap its wait in ``trio.move_on_after`` and wait on a ``trio.Event``. On the
ingest path, where one request carries one message, entering and leaving that cancel scope and
the event's bookkeeping were a quarter of the trio thread's time (py-spy, 1-message requests
at saturation). Here a caller parks itself directly (``wait_task_rescheduled``) and one system
task per run keeps every pending deadline in a heap: thousands of outstanding asks share one
timer instead of registering a cancel scope each.

The heap drops entries lazily: an answered reply stays until its deadline or until answered
entries outnumber live ones, when the heap is rebuilt. So its size stays below twice the
number of callers waiting plus a constant: bounded by the callers, never by the traffic.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any

import trio

from symbiote.schema.errors import BadArgument, DeadlineExceeded, SymbioteError

__all__ = ["Reply"]

#: Rebuild the heap when it holds this many more entries than twice the live ones.
_SLACK = 1024


class Reply:
    """A one-shot reply: set once by the actor (or the kernel or the timer), read once.

    ``abandoned`` turns true when the caller stops waiting (deadline or cancellation), so an
    actor can skip or interrupt work nobody will read.
    """

    __slots__ = (
        "_abandon_event",
        "_due",
        "_task",
        "_timer",
        "abandoned",
        "done",
        "error",
        "value",
    )

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: SymbioteError | None = None
        self.abandoned = False
        self._task: trio.lowlevel.Task | None = None
        # The run's timer, kept from wait(): answering is on every reply's path, and looking
        # the timer up again (a RunVar) cost a lookup per answer.
        self._timer: _Timer | None = None
        # The key of this reply's live entry in the timer's heap: a reply waited on again
        # (a ticket) leaves older entries behind, and only the live one counts.
        self._due = -1
        self._abandon_event: trio.Event | None = None

    @property
    def parked(self) -> bool:
        """Whether a task is parked in :meth:`wait` on this reply."""
        return self._task is not None

    def set(self, value: Any, error: SymbioteError | None) -> bool:
        """Answer; False (and nothing changes) if already answered."""
        if self.done:
            return False
        self.done = True
        self.value = value
        self.error = error
        task = self._task
        if task is not None:
            self._task = None
            assert self._timer is not None  # set with _task in wait()
            self._timer.answered()
            trio.lowlevel.reschedule(task)
        return True

    def abandon(self) -> None:
        """The caller is gone: mark it so the actor can notice."""
        if self.abandoned:
            return
        self.abandoned = True
        if self._abandon_event is not None:
            self._abandon_event.set()

    async def wait_abandoned(self) -> None:
        """Return once the caller stopped waiting."""
        if self.abandoned:
            return
        if self._abandon_event is None:
            self._abandon_event = trio.Event()
        await self._abandon_event.wait()

    async def wait(self, deadline: float, *, abandon_on_cancel: bool = True) -> bool:
        """Park until answered or until ``deadline`` (trio time); True if answered.

        Always a checkpoint. A cancelled caller sees ``Cancelled`` and, unless
        ``abandon_on_cancel`` is false (a ticket may be waited on again), abandons the reply.
        """
        if self.done:
            await trio.lowlevel.checkpoint()
            return True
        timer = self._timer = _timer()
        self._task = trio.lowlevel.current_task()
        timer.add(deadline, self)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._task = None
            timer.answered()
            if abandon_on_cancel:
                self.abandon()
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        return self.done

    def _expire(self) -> None:
        """The deadline passed: wake the caller without an answer."""
        task = self._task
        if task is None:
            return  # answered or aborted already, and counted then
        self._task = None
        assert self._timer is not None
        self._timer.answered()
        self.abandon()
        trio.lowlevel.reschedule(task)


class _Timer:
    """Deadlines of every parked caller in this run, served by one system task."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Reply]] = []
        self._order = itertools.count()
        self._waiting = 0
        self._wake_at = math.inf
        self._scope: trio.CancelScope | None = None

    def add(self, deadline: float, reply: Reply) -> None:
        self._waiting += 1
        heap = self._heap
        if len(heap) > 2 * self._waiting + _SLACK:
            heap[:] = [e for e in heap if e[2]._task is not None and e[2]._due == e[1]]
            heapq.heapify(heap)
        key = reply._due = next(self._order)
        heapq.heappush(heap, (deadline, key, reply))
        if deadline < self._wake_at:
            self._wake_at = deadline
            if self._scope is not None:
                self._scope.deadline = deadline

    def answered(self) -> None:
        self._waiting -= 1

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, key, reply = heapq.heappop(heap)
                if reply._due == key:
                    reply._expire()
            self._wake_at = heap[0][0] if heap else math.inf
            with trio.CancelScope(deadline=self._wake_at) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None


_TIMER: trio.lowlevel.RunVar[_Timer] = trio.lowlevel.RunVar("symbiote_reply_timer")


def _timer() -> _Timer:
    try:
        return _TIMER.get()
    except LookupError:
        timer = _Timer()
        _TIMER.set(timer)
        trio.lowlevel.spawn_system_task(timer.run, name="symbiote.reply-timer")
        return timer


def check_timeout(timeout: float) -> None:
    """Refuse a timeout that is not a positive number of seconds (``BadArgument``).

    A NaN deadline would sit in the timer's heap forever and then break its cancel scope.
    """
    if not isinstance(timeout, int | float) or math.isnan(timeout) or timeout <= 0:
        raise BadArgument(f"must be a positive number of seconds, got {timeout!r}", field="timeout")


def deadline_error(name: str, timeout: float) -> DeadlineExceeded:
    """The error an ``ask`` raises when ``name`` did not answer within ``timeout``."""
    return DeadlineExceeded(f"no reply from {name} within {timeout} s")
