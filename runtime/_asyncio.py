"""Run a trio world inside an asyncio program with trio's guest mode.

``start_guest_run`` lets trio borrow asyncio's event loop: both run on the same thread, trio's
I/O waits happen in a helper thread, and trio's task steps are scheduled as asyncio
callbacks. :func:`open_in_asyncio` enters an async resource (a runtime, a supervisor) inside
that trio world and yields an :class:`AsyncioPortal` whose :meth:`~AsyncioPortal.call` runs a
trio coroutine function and is awaited from asyncio code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, TypeVar

import outcome
import trio
import trio.lowlevel

from symbiote.schema.errors import ActorStopped

__all__ = ["AsyncioPortal", "open_in_asyncio"]

T = TypeVar("T")
R = TypeVar("R")


class AsyncioPortal(Generic[T]):
    """Awaitable access, from asyncio code, to a resource living in a trio guest run."""

    def __init__(
        self,
        resource: T,
        nursery: trio.Nursery,
        loop: asyncio.AbstractEventLoop,
        token: trio.lowlevel.TrioToken,
    ) -> None:
        self.resource = resource
        self._nursery = nursery
        self._loop = loop
        self._token = token

    async def call(self, fn: Callable[..., Awaitable[R]], *args: Any) -> R:
        """``await fn(*args)`` in the trio world; cancelling the asyncio task cancels it."""
        future: asyncio.Future[R] = self._loop.create_future()
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                try:
                    result = await fn(*args)
                except BaseException as exc:
                    if not future.done():
                        if isinstance(exc, trio.Cancelled):
                            future.set_exception(ActorStopped("the call was cancelled"))
                        else:
                            future.set_exception(exc)
                    if isinstance(exc, trio.Cancelled):
                        raise
                    return
                if not future.done():
                    future.set_result(result)

        # asyncio code runs outside trio's run context even on the same thread: hand trio
        # the work through its token.
        self._token.run_sync_soon(self._nursery.start_soon, run)
        try:
            return await future
        except asyncio.CancelledError:
            self._token.run_sync_soon(scope.cancel)
            raise


@asynccontextmanager
async def open_in_asyncio(
    open_resource: Callable[[], AbstractAsyncContextManager[T]],
) -> AsyncIterator[AsyncioPortal[T]]:
    """From asyncio: start trio as a guest, enter ``open_resource()`` there, yield a portal.

    Leaving the block shuts the resource down in the trio world and waits for the guest run
    to finish.
    """
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[AsyncioPortal[T]] = loop.create_future()
    finished: asyncio.Future[outcome.Outcome[None]] = loop.create_future()
    stop = trio.Event()
    tokens: list[trio.lowlevel.TrioToken] = []

    async def trio_main() -> None:
        tokens.append(trio.lowlevel.current_trio_token())
        async with open_resource() as resource, trio.open_nursery() as nursery:
            ready.set_result(AsyncioPortal(resource, nursery, loop, tokens[0]))
            await stop.wait()
            nursery.cancel_scope.cancel()

    def done(result: outcome.Outcome[None]) -> None:
        if not finished.done():
            finished.set_result(result)
        if not ready.done():
            try:
                result.unwrap()
                ready.set_exception(RuntimeError("the trio guest run ended before it started"))
            except BaseException as exc:
                ready.set_exception(exc)

    trio.lowlevel.start_guest_run(
        trio_main,
        run_sync_soon_threadsafe=loop.call_soon_threadsafe,
        done_callback=done,
        host_uses_signal_set_wakeup_fd=True,
    )
    try:
        yield await ready
    finally:
        if tokens:
            try:
                tokens[0].run_sync_soon(stop.set)
            except trio.RunFinishedError:
                pass
        (await finished).unwrap()
