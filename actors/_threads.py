"""Worker threads for database work, at a lower OS priority than the trio loop's thread.

DuckDB releases the GIL while it works, so its threads and the trio thread truly run in
parallel; on a machine with few cores, a handful of heavy queries then take the cores from
the trio thread and the loop wakes late (measured in docs/data-layer.md: 4 aggregates on 2
cores pushed the loop's p99 lag from 0.3 ms to 6 ms). Database threads are background work:
running them at a higher ``nice`` value lets the scheduler prefer the loop without slowing the
queries when the loop is idle. Raising one's own nice value needs no privilege on Linux; where
it is not supported this does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

__all__ = ["lower_new_threads", "run_in_db_thread", "set_db_thread_nice"]

T = TypeVar("T")

log = logging.getLogger("symbiote.threads")

_nice = 10
_lowered: set[int] = set()
_lock = threading.Lock()


def set_db_thread_nice(nice: int) -> None:
    """The ``nice`` increment for database threads (0 leaves them alone)."""
    global _nice
    _nice = nice


def _lower(tid: int) -> None:
    if _nice <= 0 or not hasattr(os, "setpriority"):
        return
    with _lock:
        if tid in _lowered:
            return
        _lowered.add(tid)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + _nice))
    except OSError as exc:  # not permitted or not supported: run at normal priority
        log.debug("cannot lower thread priority", extra={"tid": tid, "error": str(exc)})


def _current_tasks() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def lower_new_threads(start: Callable[[], T]) -> T:
    """Call ``start`` (which creates threads, e.g. opening DuckDB) and lower the new threads."""
    before = _current_tasks()
    result = start()
    for tid in _current_tasks() - before:
        _lower(tid)
    return result


async def run_in_db_thread(fn: Callable[..., T], *args: object, limiter: trio.CapacityLimiter) -> T:
    """``trio.to_thread.run_sync`` for database work, in a lowered-priority worker thread.

    Never abandons the thread on cancel: a connection is used by one thread at a time, and
    the caller interrupts the query instead (see the reader).
    """

    def work() -> T:
        _lower(threading.get_native_id())
        return fn(*args)

    return await trio.to_thread.run_sync(work, limiter=limiter)
