"""Restart accounting: OTP's intensity/period rule plus exponential backoff.

Kept apart from the supervisor and free of trio so that it can be property-tested alone:
given the times of restarts, it says how long to wait before the next one, or that the budget
is spent and the supervisor must give up.
"""

from __future__ import annotations

from collections import deque

__all__ = ["RestartBudget"]


class RestartBudget:
    """At most ``intensity`` restarts within any ``period`` seconds, with backoff between them."""

    def __init__(
        self, intensity: int, period: float, backoff_initial: float, backoff_max: float
    ) -> None:
        self.intensity = intensity
        self.period = period
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        # Only the restarts inside the window matter, and there are at most intensity + 1.
        self._recent: deque[float] = deque(maxlen=intensity + 1)

    def record(self, now: float) -> float | None:
        """Count a restart at ``now``; return the delay before it, or None if over budget."""
        while self._recent and now - self._recent[0] >= self.period:
            self._recent.popleft()
        self._recent.append(now)
        if len(self._recent) > self.intensity:
            return None
        delay = self.backoff_initial * 2.0 ** (len(self._recent) - 1)
        return min(delay, self.backoff_max)

    def in_window(self, now: float) -> int:
        """How many restarts counted at ``now`` are still inside the window."""
        return sum(1 for t in self._recent if now - t < self.period)
