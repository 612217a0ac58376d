"""The supervisor: starts children in order, restarts them by strategy, stops them in reverse.

The whole contract, in the words of Erlang/OTP:

* Children start one at a time in spec order; the next starts only when the previous one's
  ``on_start`` returned. A child that fails to start at the first start fails the supervisor.
* When a child exits, its restart type decides whether it comes back: ``permanent`` always,
  ``transient`` only after an abnormal exit (an exception), ``temporary`` never.
* The strategy decides who comes back with it: ``one_for_one`` the child alone,
  ``one_for_all`` every child, ``rest_for_one`` the child and those started after it. Children
  restarted along with it are first stopped in reverse start order.
* Each restart is counted against the budget (``intensity`` within ``period``) and delayed by
  an exponential backoff. Over budget, the supervisor stops all its children and raises
  :class:`SupervisorEscalation`, which its own parent sees as an abnormal exit.
* Shutdown stops children in reverse start order. Each child is cancelled and then has until
  its ``shutdown`` deadline to run ``on_stop``; requests still queued fail with
  :class:`ActorStopped`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from symbiote.runtime._actor import Actor, ActorRef, ActorState
from symbiote.runtime._budget import RestartBudget
from symbiote.runtime._groups import unwrap_single
from symbiote.runtime._specs import ChildSpec, SupervisorSpec
from symbiote.runtime._tree import TreeNode
from symbiote.schema.errors import (
    ActorCrashed,
    ActorStopped,
    ConfigError,
    SupervisorEscalation,
)

__all__ = ["Supervisor", "open_supervisor"]

log = logging.getLogger("symbiote.supervisor")


class _Exit:
    """A child's incarnation ended on its own (not stopped by its supervisor)."""

    __slots__ = ("child", "error", "incarnation")

    def __init__(self, child: _Child, error: BaseException | None) -> None:
        self.child = child
        self.error = error
        self.incarnation = child.incarnation


class _Child:
    """The supervisor's bookkeeping for one child across its incarnations."""

    def __init__(self, spec: ChildSpec | SupervisorSpec, path: str) -> None:
        self.spec = spec
        self.path = path
        self.ref: ActorRef | None = None
        self.sub: Supervisor | None = None
        if isinstance(spec, ChildSpec):
            self.ref = ActorRef(path, mailbox_size=spec.mailbox, overload=spec.overload)
        else:
            self.sub = Supervisor(spec, path=path)
        self.scope: trio.CancelScope | None = None
        self.exited = trio.Event()
        self.exited.set()
        self.alive = False  # between started() and the end of the incarnation
        self.retired = False  # will not be restarted again
        self.stop_requested = False
        self.stop_deadline = 0.0
        self.stop_state = ActorState.STOPPING
        self.restarts = 0
        self.incarnation = 0
        self.last_error: str | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    def note_error(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.ref is not None:
            self.ref._stats.last_error = self.last_error


class Supervisor:
    """Runs one :class:`SupervisorSpec`; see the module docstring for the contract."""

    def __init__(self, spec: SupervisorSpec, *, path: str | None = None) -> None:
        self.spec = spec
        self.path = path if path is not None else spec.id
        self._children = [_Child(c, f"{self.path}/{c.id}") for c in spec.children]
        self._budget = RestartBudget(
            spec.intensity, spec.period, spec.backoff_initial, spec.backoff_max
        )
        # A child has at most one live incarnation, so at most one current exit pending, plus
        # one stale exit from an incarnation that ended while its group was being restarted.
        self._exit_send, self._exit_receive = trio.open_memory_channel[_Exit](
            2 * len(self._children) + 1
        )
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._runs = 0
        # How our children should look while we stop: STOPPED for good, or RESTARTING when
        # our parent is about to start us again (their callers then wait instead of failing).
        self._stop_state = ActorState.STOPPING
        self.state = "new"

    # -- public ----------------------------------------------------------------------------

    def ref(self, path: str) -> ActorRef:
        """The ref of the actor at ``path`` (child ids joined by '/', relative to here)."""
        head, _, rest = path.partition("/")
        for child in self._children:
            if child.id == head:
                if rest:
                    if child.sub is None:
                        break
                    return child.sub.ref(rest)
                if child.ref is None:
                    raise ConfigError(f"{path!r} is a supervisor, not an actor", field="path")
                return child.ref
        raise ConfigError(f"no actor at {path!r} under {self.path!r}", field="path")

    def tree(self) -> TreeNode:
        """The live tree below this supervisor, as data."""
        nodes: list[TreeNode] = []
        for child in self._children:
            if child.sub is not None:
                node = child.sub.tree()
                nodes.append(
                    TreeNode(
                        id=node.id,
                        kind=node.kind,
                        state=node.state,
                        strategy=node.strategy,
                        restarts=child.restarts,
                        last_error=child.last_error,
                        children=node.children,
                    )
                )
            else:
                assert child.ref is not None
                ref = child.ref
                nodes.append(
                    TreeNode(
                        id=child.id,
                        kind="actor",
                        state=ref.state.value,
                        mailbox_size=ref.mailbox_size,
                        depth=ref.depth,
                        peak_depth=ref.peak_depth,
                        processed=ref.processed,
                        restarts=ref.restarts,
                        last_error=ref.last_error,
                    )
                )
        return TreeNode(
            id=self.spec.id,
            kind="supervisor",
            state=self.state,
            strategy=self.spec.strategy,
            children=tuple(nodes),
        )

    def cancel(self) -> None:
        """Ask the supervisor to shut its tree down (in reverse order) and return."""
        if self._scope is not None:
            self._scope.cancel()

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the children, supervise them until cancelled, then stop them in reverse.

        Raises :class:`SupervisorEscalation` when the restart budget is exceeded, and the
        start error of a child that fails to start the first time.
        """
        failure: Exception | None = None
        with trio.CancelScope() as scope:
            self._scope = scope
            # Children run in shielded scopes inside this nursery, so a cancellation from
            # outside reaches only the loop below, whose ``finally`` then stops them one by
            # one in reverse order, each with its own deadline.
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    self.state = "starting"
                    self._stop_state = ActorState.STOPPING
                    self._runs += 1
                    for child in self._children:
                        if self._runs > 1:
                            # Our parent restarted us: for our children that is a restart too.
                            self._count_restart(child)
                        error = await self._start(child)
                        if error is not None:
                            raise error
                    self.state = "running"
                    task_status.started(self)
                    await self._supervise()
                except Exception as exc:
                    failure = exc
                finally:
                    self.state = "stopping"
                    with trio.CancelScope(shield=True):
                        await self._stop_all()
                    self.state = "stopped"
        if failure is not None:
            raise failure

    # -- the supervision loop ------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            ev = await self._exit_receive.receive()
            child = ev.child
            if ev.incarnation != child.incarnation:
                continue  # already restarted as part of a group since this exit
            if not self._should_restart(child.spec, ev.error):
                log.info("child exited, not restarted", extra={"child": child.path})
                self._retire(child)
                continue
            delay = self._budget.record(trio.current_time())
            if delay is None:
                raise SupervisorEscalation(
                    f"{self.path}: more than {self.spec.intensity} restarts within "
                    f"{self.spec.period} s; last from {child.path}: {child.last_error}"
                )
            group = self._restart_group(child)
            for other in reversed(group):
                await self._stop(other, ActorState.RESTARTING)
            log.warning(
                "restarting",
                extra={"child": child.path, "delay_s": delay, "group": [c.id for c in group]},
            )
            await trio.sleep(delay)
            for member in group:
                if member is not child and member.spec.restart == "temporary":
                    self._retire(member)
                    continue
                self._count_restart(member)
                error = await self._start(member)
                if error is not None:
                    # A failed restart counts like a crash: round the loop again, where the
                    # budget decides between another try and escalation.
                    self._exit_send.send_nowait(_Exit(member, error))
                    break

    @staticmethod
    def _should_restart(spec: ChildSpec | SupervisorSpec, error: BaseException | None) -> bool:
        if spec.restart == "permanent":
            return True
        if spec.restart == "transient":
            return error is not None
        return False

    def _restart_group(self, child: _Child) -> list[_Child]:
        strategy = self.spec.strategy
        if strategy == "one_for_one":
            return [child]
        active = [c for c in self._children if not c.retired]
        if strategy == "one_for_all":
            return active
        index = self._children.index(child)
        return [c for c in active if self._children.index(c) >= index]

    @staticmethod
    def _count_restart(child: _Child) -> None:
        child.restarts += 1
        child.retired = False
        if child.ref is not None:
            child.ref._stats.restarts += 1

    def _retire(self, child: _Child) -> None:
        child.retired = True
        if child.ref is not None:
            child.ref._closed_for_good()

    # -- starting and stopping one child -------------------------------------------------

    async def _start(self, child: _Child) -> Exception | None:
        """Start one incarnation; return its start error instead of raising it."""
        assert self._nursery is not None
        child.stop_requested = False
        child.exited = trio.Event()
        child.incarnation += 1
        try:
            # Shielded: if this supervisor were cancelled while the child starts, trio would
            # not move the started child into our nursery (TaskStatus.started() leaves it in
            # start()'s own nursery when that one is cancelled), and start() would then wait
            # for the child to exit, which only _stop_all() asks for: a deadlock until the
            # parent's deadline. A start is bounded (on_start has its own deadlines), and the
            # cancellation is seen at the next checkpoint, after the child is ours to stop.
            with trio.CancelScope(shield=True):
                await self._nursery.start(self._incarnation, child)
        except Exception as exc:
            child.note_error(exc)
            log.error("child failed to start", extra={"child": child.path, "error": str(exc)})
            return exc
        return None

    async def _incarnation(self, child: _Child, *, task_status: trio.TaskStatus[None]) -> None:
        """One life of a child, from start to exit; never raises into the nursery."""
        error: Exception | None = None
        try:
            # Shielded: only this supervisor stops a child, in order (see run()).
            with trio.CancelScope(shield=True) as scope:
                child.scope = scope
                if child.sub is not None:
                    await child.sub.run(task_status=_Started(task_status, child))
                else:
                    assert child.ref is not None and isinstance(child.spec, ChildSpec)
                    error = await self._run_actor(child, child.ref, child.spec, task_status)
        except Exception as exc:
            if not child.alive:
                # Failed before started(): nursery.start() re-raises it to _start().
                child.exited.set()
                raise
            error = exc
        finally:
            child.scope = None
            child.alive = False
        if error is not None:
            child.note_error(error)
            log.error("child crashed", extra={"child": child.path, "error": child.last_error})
        child.exited.set()
        if not child.stop_requested:
            self._exit_send.send_nowait(_Exit(child, error))

    async def _run_actor(
        self,
        child: _Child,
        ref: ActorRef,
        spec: ChildSpec,
        task_status: trio.TaskStatus[None],
    ) -> Exception | None:
        """Run one actor incarnation; return the exception that ended it, if any."""
        actor = spec.factory()
        if not isinstance(actor, Actor):
            raise ConfigError(
                f"factory returned {type(actor).__name__}, not an Actor", field=f"{spec.id}.factory"
            )
        ref.accepts = actor.accepts
        actor.ref = ref
        inbox = ref._open()
        try:
            await actor.on_start()
        except BaseException:
            ref._close(ActorState.RESTARTING, ActorCrashed(f"{ref.name} failed to start"))
            with trio.CancelScope(shield=True), trio.move_on_after(spec.shutdown):
                await actor.on_stop()
            raise
        child.alive = True
        ref._mark_running()
        task_status.started()
        error: Exception | None = None
        try:
            await actor.run(inbox)
        except Exception as exc:
            error = exc
            child.note_error(exc)
        finally:
            if child.stop_requested:
                ref._close(child.stop_state, ActorStopped(f"{ref.name} was stopped"))
            elif error is not None:
                ref._close(ActorState.RESTARTING, ActorCrashed(f"{ref.name} crashed: {error!r}"))
            else:
                ref._close(ActorState.RESTARTING, ActorStopped(f"{ref.name} exited"))
            deadline = (
                child.stop_deadline if child.stop_requested else trio.current_time() + spec.shutdown
            )
            with trio.CancelScope(shield=True, deadline=deadline):
                await actor.on_stop()
        return error

    async def _stop(self, child: _Child, state: ActorState = ActorState.STOPPING) -> None:
        """Stop one child and wait for it, bounded by its shutdown deadline."""
        if child.exited.is_set():
            return
        child.stop_requested = True
        child.stop_state = state
        child.stop_deadline = trio.current_time() + child.spec.shutdown
        if child.ref is not None:
            child.ref.state = state
        if child.sub is not None:
            child.sub._stop_state = state
        if child.scope is not None:
            child.scope.cancel()
        # The extra second covers on_stop's own deadline; past it a child is stuck in code
        # that cannot be cancelled (a thread), and all we can do is say so.
        with trio.move_on_after(child.spec.shutdown + 1.0) as scope:
            await child.exited.wait()
        if scope.cancelled_caught:
            log.error("child missed its shutdown deadline", extra={"child": child.path})

    async def _stop_all(self) -> None:
        final = self._stop_state is ActorState.STOPPING
        for child in reversed(self._children):
            await self._stop(child, self._stop_state)
            if final:
                self._retire(child)


class _Started:
    """Adapts a nested supervisor's ``started(sup)`` to the parent's ``started()``."""

    def __init__(self, inner: trio.TaskStatus[None], child: _Child | None = None) -> None:
        self._inner = inner
        self._child = child

    def started(self, value: Any = None) -> None:
        if self._child is not None:
            self._child.alive = True
        self._inner.started()


@asynccontextmanager
async def open_supervisor(spec: SupervisorSpec) -> AsyncIterator[Supervisor]:
    """Start the tree described by ``spec``; shut it down in reverse order on exit.

    A child that fails to start makes this raise its error. If the root supervisor escalates
    later, the body is cancelled and :class:`SupervisorEscalation` is raised from the
    ``async with``.
    """
    sup = Supervisor(spec)
    started = False
    escalation: Exception | None = None

    async def root(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal escalation
        try:
            await sup.run(task_status=_Started(task_status))
        except Exception as exc:
            if not started:
                raise  # a start failure: nursery.start() raises it below
            escalation = exc
            nursery.cancel_scope.cancel()

    with unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(root)
            started = True
            try:
                yield sup
            finally:
                sup.cancel()
    if escalation is not None:
        raise escalation
