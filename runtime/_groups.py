"""Exception groups at the edge of the kernel's context managers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["unwrap_single"]


@contextmanager
def unwrap_single() -> Iterator[None]:
    """Re-raise a trio exception group that holds ONE error as that error.

    A nursery wraps even a lone error from the body of an ``async with`` in a group (strict
    exception groups); callers of our context managers should be able to write a plain
    ``except DeadlineExceeded``. Several errors stay grouped.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
