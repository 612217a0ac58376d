"""Run a trio world in a background thread and call into it from synchronous code.

:class:`BlockingHost` starts ``trio.run`` in a thread, enters an async context manager there
(typically a runtime or a supervisor tree) and lets the host thread call coroutine functions
in that world, either blocking (:meth:`call`) or through a ``concurrent.futures.Future``
(:meth:`submit`; an asyncio host can ``await asyncio.wrap_future(f)``). Closing it (or leaving
its ``with`` block, also on ``KeyboardInterrupt``) cancels what is still running and shuts the
tree down in the trio thread before returning.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, TypeVar

import trio
import trio.from_thread
import trio.lowlevel

from symbiote.schema.errors import ActorStopped, Busy, ConfigError

__all__ = ["BlockingHost"]

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("symbiote.blocking")


class BlockingHost(Generic[T]):
    """A trio thread holding one async resource, driven from synchronous code.

    ``max_pending`` bounds the futures :meth:`submit` may have outstanding; past it, ``submit``
    raises :class:`Busy` rather than queueing without limit.
    """

    def __init__(
        self,
        open_resource: Callable[[], AbstractAsyncContextManager[T]],
        *,
        name: str = "symbiote-trio",
        max_pending: int = 10_000,
        start_timeout: float = 60.0,
    ) -> None:
        if max_pending < 1:
            raise ConfigError("must be >= 1", field="max_pending")
        self._open_resource = open_resource
        self._name = name
        self._max_pending = max_pending
        self._start_timeout = start_timeout
        self._pending = threading.BoundedSemaphore(max_pending)
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._resource: T | None = None
        self._error: BaseException | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> T:
        """Start the trio thread and enter the resource; returns the resource."""
        if self._thread is not None:
            raise ConfigError("already started", field="start")
        self._thread = threading.Thread(target=self._thread_main, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            raise TimeoutError(f"the trio thread did not start within {self._start_timeout} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        # A host that forgets to close still gets an orderly shutdown at interpreter exit.
        atexit.register(self.close)
        assert self._resource is not None
        return self._resource

    def close(self, timeout: float | None = None) -> None:
        """Cancel what is still running, leave the resource, and join the thread."""
        if self._closed or self._thread is None:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout)
        if self._error is not None:
            log.error("trio thread ended with an error", extra={"error": repr(self._error)})

    def __enter__(self) -> T:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- calls -------------------------------------------------------------------------------

    def call(self, fn: Callable[..., Awaitable[R]], *args: Any) -> R:
        """Run ``await fn(*args)`` in the trio thread and return its result (blocking)."""
        token = self._live_token()
        return trio.from_thread.run(fn, *args, trio_token=token)

    def submit(self, fn: Callable[..., Awaitable[R]], *args: Any) -> concurrent.futures.Future[R]:
        """Start ``fn(*args)`` in the trio thread; its outcome arrives in the returned Future.

        A Future can be cancelled only before the call starts (concurrent.futures' rule); the
        call itself is bounded by its own deadline. Raises :class:`Busy` when ``max_pending``
        futures are already outstanding.
        """
        token = self._live_token()
        if not self._pending.acquire(blocking=False):
            raise Busy(f"{self._max_pending} submitted calls are still pending")
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        future.add_done_callback(lambda _: self._pending.release())

        def spawn() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(self._deliver, future, fn, args)

        try:
            trio.from_thread.run_sync(spawn, trio_token=token)
        except BaseException:
            future.cancel()
            raise
        return future

    # -- the trio side -----------------------------------------------------------------------

    def _live_token(self) -> trio.lowlevel.TrioToken:
        if self._token is None or self._closed:
            raise ActorStopped("the runtime is not running (closed or never started)")
        return self._token

    def _thread_main(self) -> None:
        try:
            trio.run(self._trio_main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _trio_main(self) -> None:
        self._stop = trio.Event()
        async with self._open_resource() as resource:
            # The calls' nursery sits inside the resource: no call outlives what it uses.
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._resource = resource
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

    @staticmethod
    async def _deliver(
        future: concurrent.futures.Future[R],
        fn: Callable[..., Awaitable[R]],
        args: tuple[Any, ...],
    ) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = await fn(*args)
        except trio.Cancelled:
            future.set_exception(ActorStopped("the runtime closed before the call finished"))
            raise
        except BaseException as exc:  # the host's to handle, not the nursery's
            future.set_exception(exc)
        else:
            future.set_result(result)
