"""How often CPython hands the GIL between threads while a runtime is open.

The actors' worker threads run Python too (the writer validates rows and builds Arrow
columns, readers convert results). When the trio thread wakes while such a thread holds the
GIL, it waits for CPython's switch interval (5 ms by default) before it may force a handoff;
on the ingest benchmark that wait was most of the loop's p99 lag. A shorter interval bounds
it. The interval is process-wide, so it is set while at least one runtime is open and the
host's own value comes back when the last one closes; several runtimes get the shortest
interval any of them asked for.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["switch_interval"]

_lock = threading.Lock()
_requested: list[float] = []
_saved: float | None = None


@contextmanager
def switch_interval(seconds: float | None) -> Iterator[None]:
    """Hold CPython's thread switch interval at ``seconds`` or less; None changes nothing."""
    if seconds is None:
        yield
        return
    global _saved
    with _lock:
        if not _requested:
            _saved = sys.getswitchinterval()
        _requested.append(seconds)
        sys.setswitchinterval(min(_requested))
    try:
        yield
    finally:
        with _lock:
            _requested.remove(seconds)
            if _requested:
                sys.setswitchinterval(min(_requested))
            elif _saved is not None:
                sys.setswitchinterval(_saved)
                _saved = None
