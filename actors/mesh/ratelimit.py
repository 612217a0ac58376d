"""Token buckets, one per peer, in a table of bounded size."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["BucketTable", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; time is passed in by the caller.

    The caller passes ``trio.current_time()`` so that the same code runs under ``MockClock``.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if there are enough; False means "over the limit"."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class BucketTable:
    """Buckets keyed by peer id; the least recently used is evicted beyond ``max_keys``.

    Keyed by peer rather than by connection so that reconnecting does not refill the bucket.
    """

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float, n: float = 1.0) -> bool:
        """Spend from ``key``'s bucket (created full on first use)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now, n)
