"""Client-side batching: concurrent calls of one kind sent to an actor as one message.

An actor that micro-batches (the index actor runs all pending searches in one library call)
still pays for every request on the way: the ``ask`` with its reply slot, the mailbox, the
dispatch, the per-request check. At 64 concurrent searches that bookkeeping was a third of the
trio thread's time per query, serialised with the library call. A :class:`Coalescer` moves
the batching to the sending side: callers park on their own reply slot, one task takes
everything queued, sends it as ONE message and hands each caller its own answer.

Like group commit, it needs no timer: while one batch is in flight the next one gathers, so
the batch size follows the load (one caller alone is sent at once).

The contract:

* each caller keeps its own deadline (the shared timer of :mod:`._reply` wakes it); a caller
  that leaves before its batch is sent is dropped from it;
* ``send`` gets the items and the longest time any of their callers still waits; it returns
  one result per item, in order, and a :class:`SymbioteError` in that list fails that item
  alone; a ``SymbioteError`` raised by ``send`` fails the whole batch;
* at most ``max_batch`` items per message (and, given a ``weight`` per item, at most
  ``max_weight`` in all, so a batch of writes stays within the writer's group bound) and
  ``max_waiting`` callers queued: past that a caller waits for room until its deadline
  (backpressure, then ``DeadlineExceeded``); waiting callers are queued, and so sent, in
  their order of arrival, and a newcomer never takes a place ahead of them;
* when :meth:`Coalescer.run` ends (its owner stops), every caller still queued or in flight
  gets :class:`ActorStopped`, and later calls raise it at once.

A caller that keeps many calls in flight need not park a task on each: :meth:`Coalescer.submit`
(and ``submit_nowait``, which raises :class:`Busy` instead of waiting for room) queues the item
and returns a :class:`Ticket` to collect the answer from later. A producer that submits a
window of items and then collects every answered ticket in one step parks once per batch, not
once per item: with 1-message ingest that was 3.6-3.9 us of trio-thread time per request
against 9.4-9.5 us for a task per call (docs/data-layer.md). A ticket keeps the deadline of
its submission: a call still queued when it passes is not sent. Cancelling a wait on a
ticket does not give the call up (it is a handle, waited on as often as one likes, by one
task at a time).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, NoReturn, TypeVar

import trio

from symbiote.runtime._reply import Reply, check_timeout, deadline_error
from symbiote.schema.errors import ActorStopped, Busy, ConfigError, SymbioteError

__all__ = ["Coalescer", "Ticket"]

T = TypeVar("T")
R = TypeVar("R")

SendFn = Callable[[list[T], float], Awaitable[Sequence["R | SymbioteError"]]]

#: Callers answered per task step; the coalescer yields to the loop between slices.
ANSWER_SLICE = 128

#: The timeout ``send`` gets when every caller's deadline has just passed (they are woken
#: by the timer; the message only has to fail fast).
_EXPIRED_S = 1e-6


def _own_copy(error: SymbioteError) -> SymbioteError:
    # One exception object raised in many tasks would collect every caller's traceback
    # (and keep their frames alive): each caller raises a copy of its own.
    return type(error)(error.message, field=error.field)


class _Waiting(Generic[T]):
    __slots__ = ("deadline", "item", "slot", "timeout")

    def __init__(self, item: T, deadline: float, timeout: float, slot: Reply) -> None:
        self.item = item
        self.deadline = deadline
        self.timeout = timeout
        self.slot = slot


class _RoomWaiter(Generic[T]):
    """A caller waiting for room, with the entry :meth:`Coalescer._let_in` queues for it."""

    __slots__ = ("admitted", "entry")

    def __init__(self, entry: _Waiting[T]) -> None:
        self.entry = entry
        self.admitted = trio.Event()


class Ticket(Generic[R]):
    """The answer to a submitted call, to be collected later (see :meth:`Coalescer.submit`).

    The deadline was fixed at submission: a call still queued when it passes is not sent,
    and its ticket holds ``DeadlineExceeded`` (from the moment a :meth:`wait` times out, or
    else once the coalescer next takes from its queue). Cancelling a :meth:`wait` leaves the
    call as it was (unlike cancelling :meth:`Coalescer.call`): it goes on, and its answer
    can still be collected.
    """

    __slots__ = ("_deadline", "_name", "_slot", "_timeout")

    def __init__(self, slot: Reply, deadline: float, name: str, timeout: float) -> None:
        self._slot = slot
        self._deadline = deadline
        self._name = name
        self._timeout = timeout

    @property
    def done(self) -> bool:
        """Whether the answer (a value or an error) has arrived."""
        return self._slot.done

    def result(self) -> R:
        """The answer, without waiting: its value, or its error raised.

        Raises ``trio.WouldBlock`` while it has not arrived.
        """
        slot = self._slot
        if not slot.done:
            raise trio.WouldBlock
        if slot.error is not None:
            # A copy per read: raising one object again and again would grow its traceback
            # with every reader's frames.
            raise _own_copy(slot.error)
        value: R = slot.value
        return value

    async def wait(self) -> R:
        """Park until the answer arrives and return it (or raise its error).

        Raises ``DeadlineExceeded`` once the deadline set at submission has passed
        unanswered, ``trio.BusyResourceError`` if another task is already waiting on it.
        Always a checkpoint.
        """
        if self._slot.parked:
            raise trio.BusyResourceError("another task is already waiting on this ticket")
        if not await self._slot.wait(self._deadline, abandon_on_cancel=False):
            # Settled here, not only when the coalescer reaches the item: from now on
            # ``done`` is true and ``result()`` raises this too (a later answer is ignored).
            self._slot.set(None, deadline_error(self._name, self._timeout))
        return self.result()


class Coalescer(Generic[T, R]):
    """Merges concurrent :meth:`call` s into batches for ``send``; see the module docstring.

    ``name`` appears in errors. Start :meth:`run` in a nursery before the first call.
    """

    def __init__(
        self,
        send: SendFn[T, R],
        *,
        name: str,
        max_batch: int,
        max_waiting: int,
        weight: Callable[[T], int] | None = None,
        max_weight: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ConfigError("must be at least 1", field="max_batch")
        if max_waiting < max_batch:
            raise ConfigError("must be at least max_batch", field="max_waiting")
        if (weight is None) != (max_weight is None):
            raise ConfigError("weight and max_weight go together", field="max_weight")
        if max_weight is not None and max_weight < 1:
            raise ConfigError("must be at least 1", field="max_weight")
        self.name = name
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._weight = weight
        self.max_weight = max_weight
        self._send = send
        self._queue: list[_Waiting[T]] = []
        self._in_flight: list[_Waiting[T]] = []
        self._work = trio.Event()
        # Callers waiting for room, in arrival order: _let_in queues their entries as batches
        # free places, so they are sent in that order too.
        self._room_waiters: collections.OrderedDict[_RoomWaiter[T], None] = (
            collections.OrderedDict()
        )
        self._closed = False
        # For _make_room: the earliest deadline queued since its last scan (a bound: entries
        # taken since may have held it), and how many callers gave up since then.
        self._earliest = math.inf
        self._left = 0
        self._scans = 0
        #: Batches sent and items answered, for introspection and tests.
        self.batches = 0
        self.items = 0

    @property
    def waiting(self) -> int:
        """Callers queued for the next batch (not counting the one in flight)."""
        return len(self._queue)

    async def call(self, item: T, *, timeout: float) -> R:
        """Send ``item`` in the next batch and return its result.

        Raises the item's or the batch's :class:`SymbioteError`, ``DeadlineExceeded`` after
        ``timeout`` seconds, ``ActorStopped`` once the coalescer is closed.
        """
        check_timeout(timeout)
        deadline = trio.current_time() + timeout
        entry = _Waiting(item, deadline, timeout, Reply())
        if self._admit(entry):
            await self._wait_for_room(entry)
        slot = entry.slot
        try:
            # Abandoned here rather than by the reply: the entry counts as given up for
            # _make_room (via _left) from the same moment _take starts passing over it.
            answered = await slot.wait(deadline, abandon_on_cancel=False)
        except BaseException:
            self._give_up(slot)
            raise
        if not answered:
            raise deadline_error(self.name, timeout)
        if slot.error is not None:
            raise slot.error
        result: R = slot.value
        return result

    async def submit(self, item: T, *, timeout: float) -> Ticket[R]:
        """Queue ``item`` for the next batch and return a :class:`Ticket` for its answer.

        Waits only for room in the queue (backpressure, then ``DeadlineExceeded`` after
        ``timeout``); ``timeout`` also bounds the wait for the answer. Always a checkpoint.
        """
        check_timeout(timeout)
        deadline = trio.current_time() + timeout
        # The checkpoint first: other tasks may fill the queue during it, and the room is
        # checked after it with nothing in between to the append.
        await trio.lowlevel.checkpoint()
        entry = _Waiting(item, deadline, timeout, Reply())
        if self._admit(entry):
            await self._wait_for_room(entry)
        return Ticket(entry.slot, deadline, self.name, timeout)

    def submit_nowait(self, item: T, *, timeout: float) -> Ticket[R]:
        """Like :meth:`submit`, but raises :class:`Busy` at once when the queue is full."""
        check_timeout(timeout)
        deadline = trio.current_time() + timeout
        entry = _Waiting(item, deadline, timeout, Reply())
        if self._admit(entry):
            raise Busy(f"{self.name}: the queue is full ({self.max_waiting} calls)")
        return Ticket(entry.slot, deadline, self.name, timeout)

    def _full(self) -> bool:
        # Room goes to callers in arrival order: while anyone waits for it, a newcomer is
        # behind them.
        return len(self._queue) >= self.max_waiting or bool(self._room_waiters)

    def _queue_entry(self, entry: _Waiting[T]) -> None:
        self._queue.append(entry)
        if entry.deadline < self._earliest:
            self._earliest = entry.deadline
        self._work.set()

    def _admit(self, entry: _Waiting[T]) -> bool:
        """Queue ``entry`` if there is room; True if the caller must wait for room."""
        if self._closed:
            raise self._closed_error()
        if self._full() and not self._make_room():
            return True
        self._queue_entry(entry)
        return False

    def _make_room(self) -> bool:
        """Drop queued callers that left or whose deadline passed; True if a newcomer fits.

        Such entries would otherwise hold their places until the next batch is taken, and a
        full queue of them would refuse live callers. The scan covers the whole queue, so it
        runs only when it can find something: a queued deadline has passed, or a caller has
        given up, since the last one. A queue full of live callers is not scanned again for
        every refused newcomer.
        """
        now = trio.current_time()
        if now < self._earliest and not self._left:
            return False
        self._left = 0
        self._scans += 1
        live = [w for w in self._queue if not w.slot.abandoned and w.deadline > now]
        self._earliest = min((w.deadline for w in live), default=math.inf)
        if len(live) == len(self._queue):
            return False
        self._expire(self._queue, now)
        self._queue = live
        self._let_in(now)  # callers already waiting for room go first
        return not self._full()

    async def _wait_for_room(self, entry: _Waiting[T]) -> None:
        """Wait until :meth:`_let_in` has queued ``entry``, in arrival order."""
        waiter = _RoomWaiter(entry)
        self._room_waiters[waiter] = None
        try:
            with trio.move_on_at(entry.deadline):
                await waiter.admitted.wait()
        except BaseException:
            # Cancelled from outside: if the entry was queued meanwhile, nobody will read
            # its answer, so it need not be sent.
            self._give_up(entry.slot)
            raise
        finally:
            # Not admitted: this caller gives its turn up (_let_in may have dropped it
            # already, past its deadline).
            if not waiter.admitted.is_set():
                self._room_waiters.pop(waiter, None)
        if not waiter.admitted.is_set():
            raise deadline_error(self.name, entry.timeout)
        if self._closed:
            raise self._closed_error()

    def _give_up(self, slot: Reply) -> None:
        """A caller left: its entry, if queued, is dead weight for _make_room to drop."""
        slot.abandon()
        self._left += 1

    def _let_in(self, now: float) -> None:
        """Queue the entries of waiting callers, oldest first, as far as there is room.

        A waiter already past its deadline, or gone, is dropped instead: its own timer
        wakes it with ``DeadlineExceeded``, and it must not take a place it cannot use.
        """
        while self._room_waiters and len(self._queue) < self.max_waiting:
            waiter, _ = self._room_waiters.popitem(last=False)
            entry = waiter.entry
            if entry.deadline <= now or entry.slot.abandoned:
                continue
            self._queue_entry(entry)
            waiter.admitted.set()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Send batches until cancelled; then fail every caller left with ``ActorStopped``."""
        task_status.started()
        try:
            while True:
                if not self._queue:
                    self._work = trio.Event()
                    await self._work.wait()
                    continue
                await self._send_next()
        finally:
            self._close()

    async def _send_next(self) -> None:
        # One batch in flight at a time. Two or four (the next sent while the last is served)
        # measured worse on 2 cores, for searches (the trio side then competes with the
        # library's threads for the CPU) and for 1-message ingest (lower throughput, ack p50
        # 18-23 ms against 9-12): docs/vector-search.md and docs/data-layer.md.
        # Taken without a checkpoint: everything queued while the last batch was in flight.
        now = trio.current_time()
        live = self._take(now)
        self._let_in(now)
        if not live:
            return
        self._in_flight = live
        timeout = max(w.deadline for w in live) - now
        results: Sequence[R | SymbioteError]
        try:
            results = await self._send([w.item for w in live], max(timeout, _EXPIRED_S))
        except SymbioteError as exc:
            results = [exc] * len(live)
        for n, (w, result) in enumerate(zip(live, results, strict=True), 1):
            if isinstance(result, SymbioteError):
                w.slot.set(None, _own_copy(result))
            else:
                w.slot.set(result, None)
            if n % ANSWER_SLICE == 0:
                # Thousands of wake-ups in one task step would stall the loop for
                # milliseconds. Shielded: a stop must not strand answers already owed (a
                # committed write's caller hears it was committed).
                await trio.lowlevel.cancel_shielded_checkpoint()
        self._in_flight = []
        self.batches += 1
        self.items += len(live)

    def _expire(self, batch: Sequence[_Waiting[T]], now: float) -> None:
        # Items past their deadline are not sent, and each is answered here: a ticket
        # nobody waits on was never woken by the timer (answering a slot already answered,
        # or one whose caller left, changes nothing).
        for w in batch:
            if w.deadline <= now:
                w.slot.set(None, deadline_error(self.name, w.timeout))

    def _take(self, now: float) -> list[_Waiting[T]]:
        """The oldest live callers: at most ``max_batch``, and at most ``max_weight`` in all
        (but always one, however heavy).

        Callers that left, or whose deadline passed while queued, are answered (the latter)
        and skipped: they take no place in the batch.
        """
        head = self._queue[: self.max_batch]
        if not all(not w.slot.abandoned and w.deadline > now for w in head):
            return self._take_skipping(now)
        # The common case, every candidate live: only the weight bound may cut the batch.
        count = len(head)
        weight, limit = self._weight, self.max_weight
        if weight is not None and limit is not None:
            total = 0
            for i, w in enumerate(head):
                total += weight(w.item)
                if i and total > limit:
                    count = i
                    break
        del self._queue[:count]
        return head if count == len(head) else head[:count]

    def _take_skipping(self, now: float) -> list[_Waiting[T]]:
        """:meth:`_take` when some candidates are gone: they are answered and passed over."""
        batch: list[_Waiting[T]] = []
        weight, limit = self._weight, self.max_weight
        total = 0
        scanned = 0
        for w in self._queue:
            if len(batch) == self.max_batch:
                break
            if w.slot.abandoned or w.deadline <= now:
                self._expire((w,), now)
                scanned += 1
                continue
            if weight is not None and limit is not None:
                total += weight(w.item)
                if batch and total > limit:
                    break
            batch.append(w)
            scanned += 1
        del self._queue[:scanned]
        return batch

    def _closed_error(self) -> ActorStopped:
        return ActorStopped(f"{self.name} is closed")

    def _close(self) -> None:
        self._closed = True
        for w in (*self._in_flight, *self._queue):
            w.slot.set(None, self._closed_error())
        self._in_flight = []
        self._queue.clear()
        for waiter in self._room_waiters:
            waiter.admitted.set()  # they see the close
        self._room_waiters.clear()
