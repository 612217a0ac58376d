"""Grants: which peer may search which of this node's tags, as signed replicated rows.

A grant is a ``grant`` row (payload :class:`~symbiote.schema.mesh.Grant`) published by the
granter, so it is signed by the granter's key and spreads by anti-entropy like any row: the
grantee learns what it may ask, and any node can check who granted what. The latest grant row
of a granter for a grantee replaces its earlier ones; a grant with no permissions (or one
already expired) therefore revokes.

:class:`GrantBook` indexes the grant rows a node holds, its own and others', by
``(granter, grantee)``. It answers two questions:

* for the asker: which peers granted me a search over these tags (:meth:`GrantBook.granted_to`);
* for the granter, on every incoming request: did I grant this peer a search over these tags,
  and is it still valid (:meth:`GrantBook.check`)? The answer uses only this node's own
  rows, never a grant a peer presents, so nothing a peer sends can widen what it may see.

Expiry is checked at the time of use, against this node's clock. The book is bounded
(``max_grants`` pairs); beyond it new pairs are refused, counted and logged.
"""

from __future__ import annotations

import logging
from collections import Counter

import msgspec

from symbiote.schema.mesh import Grant, GrantDenied, GrantRecord, Row

__all__ = ["GrantBook", "grant_record", "scope_tags"]

log = logging.getLogger(__name__)

_DECODER = msgspec.msgpack.Decoder(Grant)


def grant_record(row: Row, grant: Grant) -> GrantRecord:
    """The ``grants`` table row for ``grant`` carried by ``row``."""
    return GrantRecord(
        granter=row.origin,
        grantee=grant.grantee,
        row_seq=row.seq,
        tags=list(grant.tags),
        permissions=list(grant.permissions),
        redact=list(grant.redact),
        expires_at=grant.expires_at,
        signature=row.signature,
    )


def decode_grant(row: Row) -> Grant | None:
    """The grant a ``grant`` row carries, or None if its payload is not a grant."""
    try:
        return _DECODER.decode(row.payload)
    except msgspec.DecodeError:
        return None


def scope_tags(granted: list[str], asked: list[str]) -> list[str]:
    """The tags an answer may come from: ``asked`` within ``granted`` (all, if none asked)."""
    if not asked:
        return sorted(set(granted))
    return sorted(set(granted) & set(asked))


class GrantBook:
    """The latest grant per ``(granter, grantee)`` among the rows this node holds."""

    def __init__(self, self_id: str, *, max_grants: int = 65_536) -> None:
        if max_grants < 1:
            raise ValueError("max_grants must be >= 1")
        self.self_id = self_id
        self.max_grants = max_grants
        # (granter, grantee) -> (row seq, grant); the newest row of the pair wins.
        self._latest: dict[tuple[str, str], tuple[int, Grant]] = {}
        #: ``bad_payload`` (a grant row that is not a grant), ``full`` (pair refused at the cap).
        self.stats: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._latest)

    def observe(self, row: Row) -> Grant | None:
        """Index ``row`` if it is a grant row; the grant if it is now the pair's latest."""
        if row.kind != "grant":
            return None
        grant = decode_grant(row)
        if grant is None:
            self.stats["bad_payload"] += 1
            return None
        key = (row.origin, grant.grantee)
        held = self._latest.get(key)
        if held is not None and held[0] >= row.seq:
            return None
        if held is None and len(self._latest) >= self.max_grants:
            self.stats["full"] += 1
            if self.stats["full"] & (self.stats["full"] - 1) == 0:
                log.warning(
                    "grant book full (%d pairs), grant ignored",
                    self.max_grants,
                    extra={"peer_id": self.self_id, "origin": row.origin},
                )
            return None
        self._latest[key] = (row.seq, grant)
        return grant

    def latest(self, granter: str, grantee: str) -> Grant | None:
        """The latest grant of ``granter`` to ``grantee``, valid or not."""
        held = self._latest.get((granter, grantee))
        return None if held is None else held[1]

    def granted_to(
        self, grantee: str, tags: list[str], *, now: float, permission: str = "search"
    ) -> dict[str, Grant]:
        """Granters whose latest grant gives ``grantee`` ``permission`` over any of ``tags``.

        Only grants valid at ``now``; ``tags`` empty means any tag.
        """
        out: dict[str, Grant] = {}
        for (granter, to), (_, grant) in self._latest.items():
            if to != grantee or granter == grantee:
                continue
            if permission in grant.permissions and grant.expires_at > now:
                if scope_tags(grant.tags, tags):
                    out[granter] = grant
        return out

    def check(
        self, grantee: str, tags: list[str], *, now: float, permission: str = "search"
    ) -> tuple[Grant, list[str]]:
        """This node's grant to ``grantee`` and the tags it allows, or GrantDenied with a reason.

        Reasons: ``no_grant`` (never granted), ``expired``, ``not_permitted`` (no such
        permission, e.g. revoked), ``out_of_scope`` (none of ``tags`` is granted).
        """
        grant = self.latest(self.self_id, grantee)
        if grant is None:
            raise GrantDenied("no grant for this peer", reason="no_grant", field="grant")
        if grant.expires_at <= now:
            raise GrantDenied(
                f"grant expired at {grant.expires_at}", reason="expired", field="expires_at"
            )
        if permission not in grant.permissions:
            raise GrantDenied(
                f"grant does not include {permission!r}",
                reason="not_permitted",
                field="permissions",
            )
        scope = scope_tags(grant.tags, tags)
        if not scope:
            raise GrantDenied(
                "none of the requested tags is granted", reason="out_of_scope", field="tags"
            )
        return grant, scope

    def issued(self) -> list[tuple[str, Grant]]:
        """(grantee, grant) for this node's own latest grants."""
        return [(to, g) for (frm, to), (_, g) in self._latest.items() if frm == self.self_id]
