"""A hybrid logical clock (Kulkarni et al., 2014) with a bound on how far ahead a peer may be.

An HLC reading is ``(wall_ms, logical)``: ``wall_ms`` is the largest physical time (Unix ms)
this node has seen, its own or a peer's, and ``logical`` orders events within one millisecond.
It gives every row a timestamp that (1) respects causality (a row created after receiving
another orders after it) and (2) stays close to physical time, so it can be read as a date.

The bound: a remote reading whose ``wall_ms`` is more than ``max_skew`` ahead of local physical
time is refused with :class:`~symbiote.schema.mesh.ClockSkew` and counted. Without it one
peer with a clock (or a forged timestamp) set to the year 3000 would drag every clock in the
mesh there for good, since an HLC never goes backwards.

The physical clock is injected (``wall``, seconds as a float) so tests under trio's MockClock
can make physical time follow virtual time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from symbiote.schema.mesh import ClockSkew, Hlc

__all__ = ["HybridClock"]

log = logging.getLogger(__name__)

#: The logical counter is bounded: beyond it the clock waits for physical time by advancing
#: wall_ms by one millisecond (a burst of >65k events in 1 ms is not a real workload).
MAX_LOGICAL = (1 << 16) - 1


class HybridClock:
    """One node's HLC. Not thread-safe: owned by one actor, like everything else here."""

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        max_skew: float = 60.0,
        peer_id: str = "",
    ) -> None:
        if not max_skew > 0:
            raise ValueError("max_skew must be > 0")
        self._wall = wall
        self.max_skew_ms = int(max_skew * 1000)
        self._last = Hlc(0, 0)
        #: Remote readings refused for being too far ahead.
        self.rejected = 0
        self._log = {"peer_id": peer_id}

    def physical_ms(self) -> int:
        """Local physical time in Unix milliseconds."""
        return int(self._wall() * 1000)

    @property
    def last(self) -> Hlc:
        """The latest reading this clock produced or absorbed."""
        return self._last

    def now(self) -> Hlc:
        """A fresh reading for a local event (a row being published); strictly increasing."""
        pt = self.physical_ms()
        last = self._last
        if pt > last.wall_ms:
            nxt = Hlc(pt, 0)
        elif last.logical < MAX_LOGICAL:
            nxt = Hlc(last.wall_ms, last.logical + 1)
        else:
            nxt = Hlc(last.wall_ms + 1, 0)
        self._last = nxt
        return nxt

    def check(self, remote: Hlc, *, sender: str | None = None) -> None:
        """Raise ClockSkew (and count it) if ``remote`` is too far ahead of physical time."""
        ahead = remote.wall_ms - self.physical_ms()
        if ahead > self.max_skew_ms:
            self.rejected += 1
            if self.rejected & (self.rejected - 1) == 0:  # sampled: 1, 2, 4, 8...
                log.warning(
                    "refused a timestamp %.1fs ahead (bound %.1fs, count %d)",
                    ahead / 1000,
                    self.max_skew_ms / 1000,
                    self.rejected,
                    extra={**self._log, "sender": sender},
                )
            raise ClockSkew(
                f"{ahead / 1000:.1f}s ahead of local time (bound {self.max_skew_ms / 1000:.1f}s)",
                field="hlc",
            )

    def update(self, remote: Hlc, *, sender: str | None = None) -> Hlc:
        """Absorb a remote reading (after :meth:`check`) and return the merged reading."""
        self.check(remote, sender=sender)
        pt = self.physical_ms()
        last = self._last
        wall = max(pt, last.wall_ms, remote.wall_ms)
        if wall == last.wall_ms == remote.wall_ms:
            logical = max(last.logical, remote.logical) + 1
        elif wall == last.wall_ms:
            logical = last.logical + 1
        elif wall == remote.wall_ms:
            logical = remote.logical + 1
        else:
            logical = 0
        if logical > MAX_LOGICAL:
            wall, logical = wall + 1, 0
        self._last = Hlc(wall, logical)
        return self._last
