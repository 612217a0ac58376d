"""The blocking facade (a trio thread driven from sync code) and asyncio guest mode."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from symbiote.runtime import (
    ActorStopped,
    Busy,
    SupervisorSpec,
    open_supervisor,
)
from symbiote.runtime._asyncio import open_in_asyncio
from symbiote.runtime._blocking import BlockingHost
from tests.runtime.kit import Echo, Sleep, worker


def spec(log: list[str]) -> SupervisorSpec:
    return SupervisorSpec(id="root", children=(worker("a", log), worker("b", log)))


def test_blocking_call_submit_and_clean_shutdown() -> None:
    log: list[str] = []
    before = threading.active_count()
    with BlockingHost(lambda: open_supervisor(spec(log))) as sup:
        a = sup.ref("a")
        assert log == ["start a", "start b"]
    # After the with block the tree is down, in reverse order, and the thread is gone.
    assert log == ["start a", "start b", "stop b", "stop a"]
    assert threading.active_count() == before
    assert a.state.value == "stopped"


def test_blocking_calls() -> None:
    log: list[str] = []
    host = BlockingHost(lambda: open_supervisor(spec(log)))
    sup = host.start()
    try:
        a = sup.ref("a")
        assert host.call(_ask, a, Echo(7)) == 7
        futures = [host.submit(_ask, a, Echo(i)) for i in range(50)]
        assert [f.result(timeout=5) for f in futures] == list(range(50))
        wrapped = asyncio.run(_await_wrapped(host.submit(_ask, a, Echo("x"))))
        assert wrapped == "x"
    finally:
        host.close()
    with pytest.raises(ActorStopped):
        host.call(_ask, a, Echo(1))


def test_submit_is_bounded() -> None:
    log: list[str] = []
    host = BlockingHost(lambda: open_supervisor(spec(log)), max_pending=2)
    sup = host.start()
    try:
        a = sup.ref("a")
        f1 = host.submit(_ask, a, Sleep(0.3))
        f2 = host.submit(_ask, a, Sleep(0.3))
        with pytest.raises(Busy):
            host.submit(_ask, a, Echo(1))
        assert f1.result(timeout=5) == 0.3 and f2.result(timeout=5) == 0.3
        assert host.submit(_ask, a, Echo(3)).result(timeout=5) == 3
    finally:
        host.close()


def test_close_fails_pending_futures_instead_of_hanging() -> None:
    log: list[str] = []
    host = BlockingHost(lambda: open_supervisor(spec(log)))
    sup = host.start()
    pending = host.submit(_ask, sup.ref("a"), Sleep(30))
    host.close(timeout=10)
    with pytest.raises(ActorStopped):
        pending.result(timeout=1)


def test_keyboard_interrupt_in_the_host_thread_still_shuts_down() -> None:
    log: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with BlockingHost(lambda: open_supervisor(spec(log))):
            raise KeyboardInterrupt
    assert log[-2:] == ["stop b", "stop a"]


def test_start_failure_is_raised_in_the_host() -> None:
    log: list[str] = []
    bad = SupervisorSpec(id="root", children=(worker("a", log, start_fails=True),))
    with (
        pytest.raises(RuntimeError, match="a cannot start"),
        BlockingHost(lambda: open_supervisor(bad)),
    ):
        pass


def test_asyncio_guest_mode() -> None:
    log: list[str] = []

    async def host_program() -> list[object]:
        async with open_in_asyncio(lambda: open_supervisor(spec(log))) as portal:
            a = portal.resource.ref("a")
            # asyncio tasks and trio actors interleave on one thread.
            results = await asyncio.gather(*(portal.call(_ask, a, Echo(i)) for i in range(20)))
            await asyncio.sleep(0.01)
            slow = asyncio.ensure_future(portal.call(_ask, a, Sleep(30)))
            await asyncio.sleep(0.05)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            # The cancelled caller is gone; a is still busy with its sleep, b answers.
            b = portal.resource.ref("b")
            results.append(await portal.call(_ask, b, Echo("after")))
            return list(results)

    out = asyncio.run(host_program())
    assert out == [*range(20), "after"]
    assert log[-2:] == ["stop b", "stop a"]


async def _ask(ref: object, msg: object) -> object:
    return await ref.ask(msg, timeout=60)  # type: ignore[attr-defined]


async def _await_wrapped(f: concurrent.futures.Future[object]) -> object:
    return await asyncio.wrap_future(f)
