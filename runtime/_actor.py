"""Actors, their mailboxes, and the references callers hold.

An actor is a trio task that owns its state alone and is reached only through an
:class:`ActorRef`. A ref is stable across restarts: the supervisor gives each incarnation a
fresh bounded mailbox and swaps it in, so callers never hold a dead channel. Every request is a
:class:`Request`; an ``ask`` carries a one-shot reply slot that the actor answers exactly once,
and that the kernel answers with :class:`ActorCrashed` or :class:`ActorStopped` if the actor
never can.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal

import trio

from symbiote.runtime._reply import Reply, check_timeout, deadline_error
from symbiote.schema.errors import (
    ActorCrashed,
    ActorStopped,
    Busy,
    DeadlineExceeded,
    SymbioteError,
    WrongMessage,
)

__all__ = ["Actor", "ActorRef", "ActorState", "Inbox", "Overload", "Request"]

Overload = Literal["wait", "fail"]
"""What a send does when the mailbox is full: wait for room, or raise :class:`Busy`."""


class ActorState(enum.Enum):
    """Where an actor is in its life, as seen through its ref."""

    NEW = "new"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Request:
    """One message taken from a mailbox, with the means to answer it.

    An actor answers every request it takes exactly once, with :meth:`reply` or :meth:`fail`;
    for a ``tell`` (no one waiting) answering only marks it processed. Answering twice is a
    no-op, so the kernel can fail everything still unanswered when an actor dies.
    """

    __slots__ = ("_inbox", "_slot", "msg")

    def __init__(self, msg: Any, slot: Reply | None) -> None:
        self.msg = msg
        self._slot = slot
        self._inbox: Inbox | None = None

    @property
    def expects_reply(self) -> bool:
        """True for an ``ask``, False for a ``tell``."""
        return self._slot is not None

    @property
    def abandoned(self) -> bool:
        """True once the caller stopped waiting (deadline passed or caller cancelled)."""
        return self._slot is not None and self._slot.abandoned

    async def wait_abandoned(self) -> None:
        """Return when the caller gives up; never returns for a ``tell``.

        Long-running handlers race this against their work to stop early, e.g. a reader
        interrupts its query when the caller is gone.
        """
        if self._slot is None:
            await trio.sleep_forever()
        else:
            await self._slot.wait_abandoned()

    def reply(self, value: Any = None) -> None:
        """Answer with ``value``."""
        slot = self._slot
        if slot is not None and not slot.set(value, None):
            return
        self._finish()

    def fail(self, error: SymbioteError) -> None:
        """Answer with a typed error; the caller's ``ask`` raises it."""
        slot = self._slot
        if slot is not None and not slot.set(None, error):
            return
        self._finish()

    def _finish(self) -> None:
        inbox = self._inbox
        if inbox is not None:
            self._inbox = None
            inbox._answered(self)


class _Stats:
    """Counters that survive restarts; read by introspection."""

    __slots__ = ("last_error", "peak_depth", "processed", "queued", "restarts")

    def __init__(self) -> None:
        # Sent but not yet taken by the actor: the mailbox depth, counted on the hot path
        # instead of asking the channel for its statistics on every send.
        self.queued = 0
        self.peak_depth = 0
        self.processed = 0
        self.restarts = 0
        self.last_error: str | None = None


class Inbox:
    """The receiving side of one incarnation's mailbox.

    Tracks which requests the actor has taken but not answered, so that the kernel can fail
    exactly those when the actor dies.
    """

    def __init__(self, receive: trio.MemoryReceiveChannel[Request], stats: _Stats) -> None:
        self._receive = receive
        self._stats = stats
        self._taken: set[Request] = set()

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> Request:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive(self) -> Request:
        """Wait for the next request; raises ``trio.EndOfChannel`` once the mailbox closed."""
        return self._take(await self._receive.receive())

    def receive_nowait(self, limit: int) -> list[Request]:
        """Take up to ``limit`` requests already queued, without waiting."""
        out: list[Request] = []
        while len(out) < limit:
            request = self.poll()
            if request is None:
                break
            out.append(request)
        return out

    def poll(self) -> Request | None:
        """Take the next request if one is queued, else None; never waits."""
        try:
            return self._take(self._receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return None

    def depth(self) -> int:
        """Requests waiting in the mailbox now."""
        return self._stats.queued

    async def serve(self, request: Request, handler: Callable[[Any], Awaitable[Any]]) -> None:
        """Answer ``request`` with ``handler(request.msg)``.

        A :class:`SymbioteError` from the handler is the caller's problem and goes back to it;
        any other exception is the actor's and propagates: the actor crashes and its
        supervisor decides what happens next.
        """
        if request.abandoned:
            request.fail(DeadlineExceeded("caller gave up before the request was handled"))
            return
        try:
            value = await handler(request.msg)
        except SymbioteError as exc:
            request.fail(exc)
        else:
            request.reply(value)

    def _take(self, request: Request) -> Request:
        self._stats.queued -= 1
        request._inbox = self
        self._taken.add(request)
        return request

    def _answered(self, request: Request) -> None:
        self._taken.discard(request)
        self._stats.processed += 1

    def _fail_all(self, error: SymbioteError) -> None:
        """Fail every request taken or still queued; the incarnation is over."""
        for request in list(self._taken):
            request.fail(error)
        while True:
            try:
                request = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            request.fail(error)
        self._taken.clear()
        self._stats.queued = 0


class Actor:
    """Base class of every actor: subclass it and override :meth:`handle` (or :meth:`run`).

    ``accepts`` lists the message types the actor takes; anything else is refused at the
    caller with :class:`WrongMessage` before it reaches the mailbox. Resources are acquired in
    :meth:`on_start` and released in :meth:`on_stop`, which runs on every exit of the
    incarnation, bounded by the child's shutdown deadline.
    """

    accepts: ClassVar[tuple[type, ...]] = (object,)

    #: Set by the kernel before :meth:`on_start`: this actor's own ref.
    ref: ActorRef

    async def on_start(self) -> None:
        """Acquire resources. The supervisor starts the next child only after this returns."""

    async def handle(self, msg: Any) -> Any:
        """Answer one message; the return value is the reply to an ``ask``."""
        raise WrongMessage(f"{type(self).__name__} has no handler for {type(msg).__name__}")

    async def run(self, inbox: Inbox) -> None:
        """The actor's loop. The default serves one message at a time with :meth:`handle`."""
        async for request in inbox:
            await inbox.serve(request, self.handle)

    async def on_stop(self) -> None:
        """Release resources; runs after every incarnation, crash or not."""


class ActorRef:
    """The stable address of an actor: what callers hold and send to.

    The ref outlives incarnations. While the actor restarts, ``wait`` senders wait for the new
    incarnation (backpressure) and ``fail`` senders get :class:`Busy`; once it is stopped for
    good every send raises :class:`ActorStopped`.
    """

    def __init__(
        self,
        name: str,
        *,
        mailbox_size: int,
        overload: Overload = "wait",
        accepts: tuple[type, ...] = (object,),
    ) -> None:
        self.name = name
        self.mailbox_size = mailbox_size
        self.overload: Overload = overload
        self.accepts = accepts
        self.state = ActorState.NEW
        self._stats = _Stats()
        self._send: trio.MemorySendChannel[Request] | None = None
        self._inbox: Inbox | None = None
        self._running = trio.Event()

    def __repr__(self) -> str:
        return f"<ActorRef {self.name} {self.state.value}>"

    # -- calls ---------------------------------------------------------------------------

    async def tell(self, msg: Any, *, overload: Overload | None = None) -> None:
        """Send ``msg`` without waiting for an answer; waits for room (or raises ``Busy``)."""
        self._check_message(msg)
        await self._enqueue(Request(msg, None), overload)

    def tell_nowait(self, msg: Any) -> None:
        """Send ``msg`` only if there is room now, else raise :class:`Busy`. Never waits."""
        self._check_message(msg)
        send = self._send_channel_or_raise(fail_fast=True)
        try:
            send.send_nowait(Request(msg, None))
        except trio.WouldBlock:
            raise Busy(f"mailbox of {self.name} is full ({self.mailbox_size})") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._gone_error() from None
        self._note_depth(send)

    async def ask(self, msg: Any, *, timeout: float, overload: Overload | None = None) -> Any:
        """Send ``msg`` and wait for the reply, at most ``timeout`` seconds in all.

        Raises :class:`DeadlineExceeded` when the deadline passes, the actor's typed error if
        it refused the request, :class:`ActorCrashed` at once if the actor dies first.
        A cancelled caller leaves the actor alone: the reply is simply dropped.
        """
        check_timeout(timeout)
        self._check_message(msg)
        deadline = trio.current_time() + timeout
        slot = Reply()
        request = Request(msg, slot)
        if not self._enqueue_now(request, overload):
            # Slow path (mailbox full or actor restarting): only here does a cancel scope pay.
            queued = False
            try:
                with trio.move_on_at(deadline):
                    await self._enqueue(request, overload, yield_after=False)
                    queued = True
            finally:
                if not queued:
                    slot.abandon()
            if not queued:
                raise deadline_error(self.name, timeout)
        if not await slot.wait(deadline):
            raise deadline_error(self.name, timeout)
        if slot.error is not None:
            raise slot.error
        return slot.value

    # -- introspection -------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests sent and not yet taken by the actor (at most the mailbox size + 1)."""
        return self._inbox.depth() if self._inbox is not None else 0

    @property
    def peak_depth(self) -> int:
        """Highest mailbox depth seen by a sender since the first start."""
        return self._stats.peak_depth

    @property
    def processed(self) -> int:
        """Requests answered since the first start."""
        return self._stats.processed

    @property
    def restarts(self) -> int:
        """How many times the supervisor restarted this actor."""
        return self._stats.restarts

    @property
    def last_error(self) -> str | None:
        """The error that ended the last crashed incarnation, if any."""
        return self._stats.last_error

    # -- kernel side (used by the supervisor) ----------------------------------------------

    def _open(self) -> Inbox:
        self._stats.queued = 0
        send, receive = trio.open_memory_channel[Request](self.mailbox_size)
        self._send = send
        self._inbox = Inbox(receive, self._stats)
        return self._inbox

    def _mark_running(self) -> None:
        self.state = ActorState.RUNNING
        self._running.set()

    def _close(self, state: ActorState, error: SymbioteError | None) -> None:
        """End the incarnation: refuse new sends, fail what was taken or queued."""
        self.state = state
        if state is not ActorState.RUNNING:
            self._running = trio.Event()
        if self._send is not None:
            self._send.close()
            self._send = None
        if self._inbox is not None and error is not None:
            self._inbox._fail_all(error)

    def _closed_for_good(self) -> None:
        self.state = ActorState.STOPPED
        self._running.set()  # wake senders waiting for a restart so they see STOPPED

    # -- internals -----------------------------------------------------------------------

    def _check_message(self, msg: Any) -> None:
        if not isinstance(msg, self.accepts):
            names = ", ".join(t.__name__ for t in self.accepts)
            raise WrongMessage(
                f"{self.name} accepts {names}, not {type(msg).__name__}", field="message"
            )

    def _gone_error(self) -> SymbioteError:
        if self.state is ActorState.STOPPED or self.state is ActorState.STOPPING:
            return ActorStopped(f"{self.name} is stopped")
        return ActorCrashed(f"{self.name} crashed: {self._stats.last_error}")

    def _send_channel_or_raise(self, *, fail_fast: bool) -> trio.MemorySendChannel[Request]:
        if self.state is ActorState.STOPPED or self.state is ActorState.STOPPING:
            raise ActorStopped(f"{self.name} is stopped")
        if self._send is None:
            raise Busy(f"{self.name} is restarting")
        return self._send

    def _note_depth(self, send: trio.MemorySendChannel[Request]) -> None:
        stats = self._stats
        stats.queued += 1
        if stats.queued > stats.peak_depth:
            stats.peak_depth = stats.queued

    def _enqueue_now(self, request: Request, overload: Overload | None) -> bool:
        """Queue ``request`` if the mailbox has room now; False means take the slow path.

        Raises :class:`Busy` at once for a full mailbox under ``fail``; every other
        refusal (stopped, restarting) is left to :meth:`_enqueue`, which words it.
        """
        send = self._send
        if send is None or self.state is ActorState.STOPPED or self.state is ActorState.STOPPING:
            return False
        try:
            send.send_nowait(request)
        except trio.WouldBlock:
            if (overload or self.overload) == "fail":
                raise Busy(f"mailbox of {self.name} is full ({self.mailbox_size})") from None
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self._note_depth(send)
        return True

    async def _enqueue(
        self, request: Request, overload: Overload | None, *, yield_after: bool = True
    ) -> None:
        """Queue ``request`` on the current incarnation's mailbox.

        ``yield_after=False`` skips the scheduling point after a send that found room at once;
        ``ask`` uses it because waiting for the reply is its checkpoint anyway, and one task
        switch less per request is measurable on the ingest path.
        """
        fail_fast = (overload or self.overload) == "fail"
        while True:
            if self.state is ActorState.STOPPED or self.state is ActorState.STOPPING:
                raise ActorStopped(f"{self.name} is stopped")
            send = self._send
            if send is None:
                if fail_fast:
                    raise Busy(f"{self.name} is restarting")
                await self._running.wait()
                continue
            try:
                if fail_fast:
                    send.send_nowait(request)
                elif yield_after:
                    await send.send(request)
                else:
                    try:
                        send.send_nowait(request)
                    except trio.WouldBlock:
                        await send.send(request)
            except trio.WouldBlock:
                raise Busy(f"mailbox of {self.name} is full ({self.mailbox_size})") from None
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                # The incarnation ended while we waited for room; the request was never
                # queued, so it is safe to offer it to the next incarnation (or to fail with
                # ActorStopped if there is none).
                await trio.lowlevel.checkpoint()
                continue
            self._note_depth(send)
            return
