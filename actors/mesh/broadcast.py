"""The bounded queue of membership updates waiting to be piggybacked.

One entry per member: a newer update about a member replaces the older one (it carries
everything the older said). Updates sent the fewest times go first, and each is dropped after
its retransmit limit, so a new update spreads fast and an old one stops costing bandwidth.
"""

from __future__ import annotations

from symbiote.schema.mesh import Update

__all__ = ["BroadcastQueue"]


class _Entry:
    __slots__ = ("order", "transmits", "update")

    def __init__(self, update: Update, order: int) -> None:
        self.update = update
        self.transmits = 0
        self.order = order


class BroadcastQueue:
    """Updates to gossip, at most ``max_size``; the most retransmitted are evicted first."""

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.max_size = max_size
        self._entries: dict[str, _Entry] = {}
        self._order = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, update: Update) -> None:
        """Queue ``update``, replacing any queued update about the same member."""
        self._order += 1
        self._entries[update.peer_id] = _Entry(update, self._order)
        if len(self._entries) > self.max_size:
            worst = max(self._entries.values(), key=lambda e: (e.transmits, -e.order))
            del self._entries[worst.update.peer_id]
            self.evicted += 1

    def take(self, limit: int, retransmits: int) -> list[Update]:
        """Up to ``limit`` updates to send now; each is dropped after ``retransmits`` sends."""
        if not self._entries or limit < 1:
            return []
        chosen = sorted(self._entries.values(), key=lambda e: (e.transmits, -e.order))[:limit]
        for e in chosen:
            e.transmits += 1
            if e.transmits >= retransmits:
                del self._entries[e.update.peer_id]
        return [e.update for e in chosen]
