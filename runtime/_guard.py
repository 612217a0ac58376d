"""The loop-block guard: a trio Instrument that times every task step.

A trio program stays responsive only if no task step (the code between two checkpoints) runs
long. :class:`LoopGuard` records the longest step and which task took it, so a test or a
running service can assert that nothing blocked the loop; a blocking DuckDB call made on the
trio thread shows up here as a step as long as the query.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio
import trio.lowlevel

__all__ = ["LoopBlocked", "LoopGuard", "guard_loop"]

log = logging.getLogger("symbiote.guard")


class LoopBlocked(AssertionError):
    """A task step ran longer than the allowed bound."""


class LoopGuard(trio.abc.Instrument):
    """Records the longest task step (wall-clock time) since it was installed or reset.

    ``warn_s`` logs each step longer than it as it happens, with the task's name.
    """

    def __init__(self, *, warn_s: float | None = None) -> None:
        self.warn_s = warn_s
        self.max_step_s = 0.0
        self.max_step_task = ""
        self.steps = 0
        self._started: dict[trio.lowlevel.Task, float] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started[task] = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        t0 = self._started.pop(task, None)
        if t0 is None:
            return
        took = time.perf_counter() - t0
        self.steps += 1
        if took > self.max_step_s:
            self.max_step_s = took
            self.max_step_task = task.name
        if self.warn_s is not None and took > self.warn_s:
            log.warning("slow task step", extra={"task": task.name, "step_ms": took * 1e3})

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self._started.pop(task, None)

    def reset(self) -> None:
        """Forget what was measured so far."""
        self.max_step_s = 0.0
        self.max_step_task = ""
        self.steps = 0

    def check(self, bound_s: float) -> None:
        """Raise :class:`LoopBlocked` if any step took longer than ``bound_s`` seconds."""
        if self.max_step_s > bound_s:
            raise LoopBlocked(
                f"the trio loop was blocked for {self.max_step_s * 1e3:.1f} ms by task "
                f"{self.max_step_task!r} (bound {bound_s * 1e3:.1f} ms)"
            )


@contextmanager
def guard_loop(bound_s: float | None = None) -> Iterator[LoopGuard]:
    """Install a :class:`LoopGuard` on the running trio loop for the ``with`` block.

    With ``bound_s``, leaving the block raises :class:`LoopBlocked` if a step took longer.
    """
    guard = LoopGuard()
    trio.lowlevel.add_instrument(guard)
    try:
        yield guard
    finally:
        trio.lowlevel.remove_instrument(guard)
    if bound_s is not None:
        guard.check(bound_s)
