"""Supervision: strategies, restart types, intensity, backoff, ordered shutdown, nesting."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from symbiote.runtime import (
    ActorStopped,
    ChildSpec,
    ConfigError,
    SupervisorEscalation,
    SupervisorSpec,
    format_tree,
    open_supervisor,
)
from tests.runtime.kit import Crash, Echo, Quitter, SlowStop, worker


def starts(log: list[str]) -> list[str]:
    return [e for e in log if e.startswith("start")]


async def crash(sup: object, path: str) -> None:
    ref = sup.ref(path)  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="crashed"):
        await ref.ask(Crash(), timeout=5)
    await trio.sleep(1)  # let the restart (with backoff) happen


def three(log: list[str], strategy: str, **kw: object) -> SupervisorSpec:
    return SupervisorSpec(
        id="root",
        strategy=strategy,  # type: ignore[arg-type]
        children=(worker("a", log), worker("b", log), worker("c", log)),
        **kw,  # type: ignore[arg-type]
    )


async def test_one_for_one_restarts_only_the_child(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []
    async with open_supervisor(three(log, "one_for_one")) as sup:
        log.clear()
        await crash(sup, "b")
        assert log == ["stop b", "start b"]
        assert [sup.ref(n).restarts for n in "abc"] == [0, 1, 0]


async def test_one_for_all_restarts_everyone_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_supervisor(three(log, "one_for_all")) as sup:
        log.clear()
        await crash(sup, "b")
        # b's own stop runs as it crashes; then c and a stop in reverse order; all restart in order.
        assert log == ["stop b", "stop c", "stop a", "start a", "start b", "start c"]


async def test_rest_for_one_restarts_the_child_and_later_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_supervisor(three(log, "rest_for_one")) as sup:
        log.clear()
        await crash(sup, "b")
        assert log == ["stop b", "stop c", "start b", "start c"]
        assert await sup.ref("a").ask(Echo("a"), timeout=1) == "a"


async def test_restart_types(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []
    spec = SupervisorSpec(
        id="root",
        children=(
            worker("perm", log, restart="permanent"),
            worker("trans", log, restart="transient"),
            worker("temp", log, restart="temporary"),
            ChildSpec(id="quits", factory=lambda: Quitter(log), restart="transient"),
        ),
    )
    async with open_supervisor(spec) as sup:
        await trio.sleep(1)
        assert "quit" in log and log.count("quit") == 1  # transient + normal exit: not restarted
        await crash(sup, "perm")
        await crash(sup, "trans")
        await crash(sup, "temp")
        assert sup.ref("perm").restarts == 1
        assert sup.ref("trans").restarts == 1
        with pytest.raises(ActorStopped):
            await sup.ref("temp").ask(Echo(1), timeout=1)


async def test_intensity_exceeded_escalates(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []
    spec = three(log, "one_for_one", intensity=2, period=10.0)
    with pytest.raises(SupervisorEscalation, match="more than 2 restarts"):
        async with open_supervisor(spec) as sup:
            for _ in range(3):
                await crash(sup, "a")
            await trio.sleep_forever()
    # a stopped as it crashed; the others were stopped in reverse order on the way out.
    assert log[-3:] == ["stop a", "stop c", "stop b"]


async def test_restarts_spread_over_time_do_not_escalate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_supervisor(three(log, "one_for_one", intensity=1, period=5.0)) as sup:
        for _ in range(4):
            await crash(sup, "a")
            await trio.sleep(6)
        assert sup.ref("a").restarts == 4


async def test_backoff_doubles_between_restarts(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []
    spec = three(
        log, "one_for_one", intensity=5, period=100.0, backoff_initial=0.5, backoff_max=3.0
    )
    async with open_supervisor(spec) as sup:
        a = sup.ref("a")
        delays = []
        for _ in range(4):
            with pytest.raises(Exception, match="crashed"):
                await a.ask(Crash(), timeout=5)
            t0 = trio.current_time()
            await a.ask(Echo(1), timeout=10)  # waits for the restart
            delays.append(trio.current_time() - t0)
        assert delays == pytest.approx([0.5, 1.0, 2.0, 3.0])


async def test_nested_supervisor_escalates_to_parent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    inner = SupervisorSpec(
        id="inner", children=(worker("x", log), worker("y", log)), intensity=0, period=5.0
    )
    spec = SupervisorSpec(id="root", children=(worker("a", log), inner), intensity=3)
    async with open_supervisor(spec) as sup:
        log.clear()
        await crash(sup, "inner/x")
        # inner gave up (intensity 0), the parent restarted the whole inner tree.
        assert log == ["stop x", "stop y", "start x", "start y"]
        node = sup.tree()
        assert node.children[1].kind == "supervisor" and node.children[1].restarts == 1
        assert await sup.ref("inner/x").ask(Echo("x"), timeout=1) == "x"


async def test_shutdown_is_reverse_order_with_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    spec = SupervisorSpec(
        id="root",
        children=(
            worker("a", log),
            ChildSpec(id="slow", factory=lambda: SlowStop("slow", log), shutdown=2.0),
            worker("c", log),
        ),
    )
    async with open_supervisor(spec):
        log.clear()
        t0 = trio.current_time()
    took = trio.current_time() - t0
    assert log == ["stop c", "stopping slow", "stop a"]
    assert took == pytest.approx(2.0)


async def test_start_failure_fails_the_start() -> None:
    log: list[str] = []
    spec = SupervisorSpec(
        id="root", children=(worker("a", log), worker("b", log, start_fails=True), worker("c", log))
    )
    with pytest.raises(RuntimeError, match="b cannot start"):
        async with open_supervisor(spec):
            pass
    # b's on_stop still runs to release what its on_start took; then a stops.
    assert log == ["start a", "stop b", "stop a"]


async def test_tree_introspection() -> None:
    log: list[str] = []
    async with open_supervisor(three(log, "one_for_one")) as sup:
        for i in range(3):
            await sup.ref("a").ask(Echo(i), timeout=1)
        node = sup.tree()
        assert node.kind == "supervisor" and node.strategy == "one_for_one"
        a = node.children[0]
        assert (a.id, a.state, a.processed, a.restarts, a.mailbox_size) == (
            "a",
            "running",
            3,
            0,
            64,
        )
        text = format_tree(node)
        assert "root [supervisor one_for_one] running" in text
        assert "a [actor] running mailbox=0/64 peak=1 processed=3 restarts=0" in text


async def test_nothing_left_running_after_shutdown() -> None:
    log: list[str] = []
    threads = threading.active_count()
    async with trio.open_nursery() as nursery:
        async with open_supervisor(three(log, "one_for_all")) as sup:
            await sup.ref("a").ask(Echo(1), timeout=1)
        assert nursery.child_tasks == set()
    assert sup.tree().state == "stopped"
    assert all(c.state == "stopped" for c in sup.tree().children)
    assert threading.active_count() <= threads


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"strategy": "one_for_none"}, "root.strategy"),
        ({"intensity": -1}, "root.intensity"),
        ({"period": 0}, "root.period"),
    ],
)
def test_bad_supervisor_spec(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        SupervisorSpec(id="root", children=(), **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_bad_child_specs() -> None:
    log: list[str] = []
    with pytest.raises(ConfigError, match="duplicate child id 'a'"):
        SupervisorSpec(id="root", children=(worker("a", log), worker("a", log)))
    with pytest.raises(ConfigError) as info:
        worker("a", log, mailbox=-1)
    assert info.value.field == "a.mailbox"
    with pytest.raises(ConfigError) as info:
        worker("a", log, restart="sometimes")
    assert info.value.field == "a.restart"
    with pytest.raises(ConfigError):
        worker("a", log, shutdown=0)


async def test_callers_wait_through_a_parent_restart_of_a_nested_tree(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    inner = SupervisorSpec(id="inner", children=(worker("x", log),))
    spec = SupervisorSpec(
        id="root",
        strategy="one_for_all",
        children=(worker("a", log), inner),
        backoff_initial=1.0,
    )
    async with open_supervisor(spec) as sup:
        with pytest.raises(Exception, match="crashed"):
            await sup.ref("a").ask(Crash(), timeout=5)
        await trio.sleep(0.1)  # the supervisor has stopped the group; the 1 s backoff runs
        # inner/x is being restarted along with a: a caller now waits for the new
        # incarnation instead of being told the actor is stopped.
        t0 = trio.current_time()
        assert await sup.ref("inner/x").ask(Echo("x"), timeout=10) == "x"
        assert trio.current_time() - t0 == pytest.approx(0.9)
        assert sup.ref("inner/x").restarts == 1
