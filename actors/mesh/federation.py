"""Federated search: ask the peers that granted this node a search, merge their answers.

Asker (:meth:`Federation.search`)::

    targets = alive, trusted peers whose latest grant to me covers one of the asked tags
    A -> each target   FedSearch(qid, vector, k, tags, deadline_ms, where)     in parallel
    A                  local search (own data, no redaction), same deadline
    wait until every target answered or refused, or the deadline: no longer
    merge by distance; each hit names its origin (the authenticated sender)
    -> FederatedHits(hits, asked, answered, missing, refused, redacted)

Answerer (:meth:`Federation.handle`, for every ``FedSearch`` that arrives), in this order:

1. the sender is distrusted by the trust policy -> ``FedRefused("distrusted")``;
2. this node's own latest grant to the sender (never one the sender presents) is missing,
   expired, lacks ``search``, or covers none of the asked tags -> ``no_grant`` / ``expired`` /
   ``not_permitted`` / ``out_of_scope``;
3. malformed vector, ``k`` beyond ``max_hits``, a bad ``where`` -> ``bad_request`` naming the
   field;
4. more than ``inflight_per_peer`` searches of this sender (or ``inflight`` in all) running
   -> ``busy``;
5. otherwise the local search runs with ``tags`` = asked tags within the grant (the scope
   replaces whatever tags the asker put in ``where``, which can only narrow it), bounded by
   the asker's deadline. Hits whose document carries no tag of the scope are dropped again
   (a second line of defence, counted ``scope_dropped``), the configured fields and the
   grant's ``redact`` fields are blanked (:func:`redact_hit`), text is cut to
   ``max_text_chars`` and the answer to ``max_reply_bytes``.

Every refusal is counted by code and logged, sampled, with the sender's peer id. Nothing is
unbounded: searches this node runs at once (``max_outgoing``, then :class:`Busy`), peers asked
per search (``max_peers``), hits per answer (``max_hits``), searches answered at once, and
the size of every answer.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import trio

from symbiote.actors.mesh.antientropy import RowSync
from symbiote.actors.mesh.grants import GrantBook
from symbiote.actors.mesh.net import Inbound, PeerAddr
from symbiote.actors.search import check_query_vector
from symbiote.schema.errors import BadArgument, Busy, ConfigError, InvalidRecord, SymbioteError
from symbiote.schema.mesh import (
    MAX_FED_HITS,
    MAX_GRANT_TAGS,
    MAX_TAG_CHARS,
    PEER_ID_PATTERN,
    FederatedHits,
    FedHit,
    FedHits,
    FedRefused,
    FedSearch,
    GrantDenied,
    MeshHit,
    check_redact_fields,
)
from symbiote.schema.search import SearchFilter, parse_filter

__all__ = [
    "Federation",
    "FederationConfig",
    "LocalHit",
    "LocalSearch",
    "redact_hit",
]

log = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]

#: Keys of :attr:`Federation.stats`, a closed set.
STAT_KEYS = (
    "searches",
    "requests_out",
    "answers_in",
    "refusals_in",
    "unexpected_answer",
    "bad_answer",
    "requests_in",
    "answers_out",
    "answer_late",
    "answer_trimmed",
    "scope_dropped",
    "refused_distrusted",
    "refused_no_grant",
    "refused_expired",
    "refused_not_permitted",
    "refused_out_of_scope",
    "refused_bad_request",
    "refused_busy",
    "refused_unavailable",
    "send_dropped",
)

REDACTED = "[redacted]"
_ENCODER = msgspec.msgpack.Encoder()
_PEER_ID = re.compile(PEER_ID_PATTERN)


class LocalHit(msgspec.Struct, frozen=True, kw_only=True):
    """A hit of this node's own search, with the document fields an answer may carry."""

    chunk_id: str
    document_id: str
    distance: float
    text: str | None = None
    title: str | None = None
    authors: list[str] | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None


def _cited(origin: str, h: LocalHit | FedHit) -> MeshHit:
    """``h`` as a merged hit naming the peer it came from."""
    return MeshHit(
        origin=origin,
        chunk_id=h.chunk_id,
        document_id=h.document_id,
        distance=h.distance,
        text=h.text,
        title=h.title,
        authors=h.authors,
        tags=h.tags,
        metadata=h.metadata,
    )


#: This node's own search: (vector, k, filter, timeout) -> nearest hits, nearest first.
LocalSearch = Callable[[F32Array, int, SearchFilter | None, float], Awaitable[list[LocalHit]]]


class FederationConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Bounds and policy of federated search (built from the runtime Config)."""

    dim: int
    #: Largest ``k`` asked or answered.
    max_hits: int = 50
    #: Most peers one search asks.
    max_peers: int = 16
    #: Federated searches this node runs at once; beyond, :class:`Busy`.
    max_outgoing: int = 64
    #: Searches answered at once for one peer, and for all peers; beyond, ``busy``.
    inflight_per_peer: int = 4
    inflight: int = 32
    #: Longest deadline a search may ask for (asker) or be given (answerer).
    max_deadline_s: float = 30.0
    #: Chunk text in an answer is cut to this many characters.
    max_text_chars: int = 2000
    #: Largest encoded answer; trailing hits are dropped to fit (keep below the frame cap).
    max_reply_bytes: int = 512 * 1024
    #: Fields this node always redacts from its answers (plus each grant's ``redact``).
    redact: tuple[str, ...] = ("authors",)

    def __post_init__(self) -> None:
        for name in (
            "dim",
            "max_peers",
            "max_outgoing",
            "inflight_per_peer",
            "inflight",
            "max_text_chars",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError("must be an integer >= 1", field=name)
        if not 1 <= self.max_hits <= MAX_FED_HITS:
            raise ConfigError(f"must be in 1..{MAX_FED_HITS}", field="max_hits")
        if not (math.isfinite(self.max_deadline_s) and self.max_deadline_s > 0):
            raise ConfigError("must be a finite number > 0", field="max_deadline_s")
        if self.max_reply_bytes < 1024:
            raise ConfigError("must be at least 1024", field="max_reply_bytes")
        check_redact_fields(self.redact, "redact")


def redact_hit(hit: LocalHit, fields: frozenset[str], *, max_text: int) -> FedHit:
    """``hit`` as it may leave this node: ``fields`` blanked, text cut to ``max_text`` chars.

    ``authors`` blanks the list and replaces each author's name (case-insensitive) by
    ``[redacted]`` in the text and the title, which often quote it. ``metadata`` drops all
    metadata, ``metadata.<key>`` one key.
    """
    text, title, authors, metadata = hit.text, hit.title, hit.authors, hit.metadata
    if "authors" in fields:
        names = sorted({a.strip() for a in authors or () if a and a.strip()}, key=len, reverse=True)
        if names:
            pattern = re.compile("|".join(re.escape(n) for n in names), re.IGNORECASE)
            text = None if text is None else pattern.sub(REDACTED, text)
            title = None if title is None else pattern.sub(REDACTED, title)
        authors = None
    if "text" in fields:
        text = None
    if "title" in fields:
        title = None
    if "metadata" in fields:
        metadata = None
    elif metadata:
        drop = {f.partition(".")[2] for f in fields if f.startswith("metadata.")}
        if drop & metadata.keys():
            metadata = {k: v for k, v in metadata.items() if k not in drop}
    if text is not None and len(text) > max_text:
        text = text[:max_text]
    return FedHit(
        chunk_id=hit.chunk_id,
        document_id=hit.document_id,
        distance=hit.distance,
        text=text,
        title=title,
        authors=authors,
        tags=hit.tags,
        metadata=metadata,
    )


class _Pending:
    """One federated search in flight: who was asked, who answered."""

    __slots__ = ("done", "hits", "k", "redacted", "refused", "replied", "targets")

    def __init__(self, targets: Sequence[str], k: int) -> None:
        self.targets = set(targets)
        self.k = k
        self.replied: set[str] = set()
        self.hits: list[MeshHit] = []
        self.refused: dict[str, str] = {}
        self.redacted: dict[str, list[str]] = {}
        self.done = trio.Event()
        self._check()

    def answer(self, peer: str, hits: list[MeshHit], redacted: list[str]) -> None:
        self.replied.add(peer)
        self.hits.extend(hits)
        if redacted:
            self.redacted[peer] = redacted
        self._check()

    def refuse(self, peer: str, code: str) -> None:
        self.replied.add(peer)
        self.refused[peer] = code
        self._check()

    def _check(self) -> None:
        if self.replied >= self.targets:
            self.done.set()


def _check_tags(tags: object) -> list[str]:
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list | tuple):
        raise BadArgument("must be a list of tags", field="tags")
    if len(tags) > MAX_GRANT_TAGS:
        raise BadArgument(f"more than {MAX_GRANT_TAGS} tags", field="tags")
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not tag or len(tag) > MAX_TAG_CHARS:
            raise BadArgument(
                f"must be a non-empty string of at most {MAX_TAG_CHARS} characters",
                field=f"tags[{i}]",
            )
    return sorted(set(tags))


def _narrow(flt: SearchFilter | None, tags: list[str]) -> SearchFilter | None:
    """``flt`` with its ``tags`` replaced by ``tags`` narrowed by what ``flt`` asked."""
    if not tags:
        return flt
    if flt is not None and flt.tags is not None:
        asked = [flt.tags] if isinstance(flt.tags, str) else flt.tags
        tags = sorted(set(tags) & set(asked))
    base = flt if flt is not None else SearchFilter()
    return msgspec.structs.replace(base, tags=tags)


class Federation:
    """Federated search for one node, riding on its :class:`RowSync`'s SwimNode and network.

    Build it after the RowSync (it registers itself as a SwimNode message handler), then run
    it next to them: ``await nursery.start(federation.run)``. ``local`` is this node's own
    search; without it the node asks but does not answer (``unavailable``).
    """

    def __init__(
        self,
        sync: RowSync,
        grants: GrantBook,
        config: FederationConfig,
        *,
        local: LocalSearch | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.sync = sync
        self.swim = sync.swim
        self.peer_id = sync.peer_id
        self.grants = grants
        self.config = config
        self.local = local
        self._wall = wall
        self._pending: dict[int, _Pending] = {}
        self._qid = 0
        self._inflight: Counter[str] = Counter()
        self._inflight_total = 0
        self._nursery: trio.Nursery | None = None
        self.stats: Counter[str] = Counter({k: 0 for k in STAT_KEYS})
        self._extra: dict[str, Any] = {"peer_id": self.peer_id}
        self.swim.handlers.append(self.handle)

    async def run(
        self, *, task_status: trio.TaskStatus[Federation] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve incoming searches until cancelled (answers run as tasks in this nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- asking ------------------------------------------------------------------------------

    def targets(self, tags: list[str], *, now: float | None = None) -> list[str]:
        """Alive, trusted peers whose latest grant to this node covers one of ``tags``.

        Most trusted first, at most ``max_peers``.
        """
        t = self._wall() if now is None else now
        policy = self.sync.policy
        out = []
        for granter in self.grants.granted_to(self.peer_id, tags, now=t):
            m = self.swim.members.get(granter)
            if m is not None and m.status == "alive" and policy.sync_from(granter):
                out.append(granter)
        scores = policy.scores

        def rank(p: str) -> tuple[float, str]:
            r = scores.relative(p) if scores is not None else None
            return (-(r if r is not None else 1.0), p)

        return sorted(out, key=rank)[: self.config.max_peers]

    async def search(
        self,
        vector: object,
        k: int = 10,
        *,
        tags: Sequence[str] = (),
        where: object = None,
        deadline: float = 1.0,
        peers: Sequence[str] | None = None,
        include_local: bool = True,
    ) -> FederatedHits:
        """Search this node and the peers that granted it ``tags``; see the module docstring.

        ``peers`` asks exactly these peers instead of the granters found locally (they still
        enforce their own grants). Returns within ``deadline`` seconds (plus scheduling):
        peers that have not answered by then are reported ``missing``. Raises
        :class:`InvalidRecord` / :class:`BadArgument` naming the field for bad input,
        :class:`Busy` when ``max_outgoing`` searches are already running.
        """
        cfg = self.config
        query = check_query_vector(vector, cfg.dim)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cfg.max_hits:
            raise BadArgument(f"must be an int in [1, {cfg.max_hits}], got {k!r}", field="k")
        asked_tags = _check_tags(list(tags) if not isinstance(tags, str) else tags)
        flt = parse_filter(where)
        if not isinstance(deadline, int | float) or not 0 < deadline <= cfg.max_deadline_s:
            raise BadArgument(
                f"must be in (0, {cfg.max_deadline_s}] seconds, got {deadline!r}",
                field="deadline",
            )
        if not isinstance(include_local, bool):
            raise BadArgument("must be a bool", field="include_local")
        if len(self._pending) >= cfg.max_outgoing:
            raise Busy(f"{cfg.max_outgoing} federated searches already running")
        targets = self._check_peers(peers) if peers is not None else self.targets(asked_tags)
        self.stats["searches"] += 1
        self._qid += 1
        qid = self._qid
        pending = _Pending(targets, k)
        self._pending[qid] = pending
        start = trio.current_time()
        local_hits: list[MeshHit] = []
        local_state: dict[str, str] = {}
        try:
            msg = FedSearch(
                qid,
                query.astype("<f4").tobytes(),
                k,
                asked_tags,
                max(1, math.ceil(deadline * 1000)),
                flt,
            )
            for peer in targets:
                m = self.swim.members.get(peer)
                if (
                    m is None
                    or m.status == "dead"
                    or not self.swim.net.send_nowait(PeerAddr(peer, m.addr), msg)
                ):
                    pending.refuse(peer, "unreachable")
                else:
                    self.stats["requests_out"] += 1
            async with trio.open_nursery() as nursery:
                if include_local and self.local is not None:
                    nursery.start_soon(
                        self._search_local,
                        query,
                        k,
                        _narrow(flt, asked_tags),
                        deadline,
                        local_hits,
                        local_state,
                    )
                with trio.move_on_after(deadline):
                    await pending.done.wait()
        finally:
            del self._pending[qid]
        hits = sorted(
            [*local_hits, *pending.hits], key=lambda h: (h.distance, h.origin, h.chunk_id)
        )[:k]
        answered = sorted(p for p in pending.replied if p not in pending.refused)
        missing = sorted(pending.targets - pending.replied)
        refused = dict(pending.refused)
        if local_state.get("state") == "answered":
            answered.insert(0, self.peer_id)
        elif local_state.get("state") == "late":
            missing.insert(0, self.peer_id)
        elif "state" in local_state:
            refused[self.peer_id] = local_state["state"]
        return FederatedHits(
            hits=hits,
            asked=sorted(targets),
            answered=answered,
            missing=missing,
            refused=refused,
            redacted=pending.redacted,
            elapsed_ms=(trio.current_time() - start) * 1000.0,
        )

    def _check_peers(self, peers: Sequence[str]) -> list[str]:
        if isinstance(peers, str) or not isinstance(peers, Sequence):
            raise BadArgument("must be a list of peer ids", field="peers")
        out = sorted({p for p in peers if p != self.peer_id})
        if len(out) > self.config.max_peers:
            raise BadArgument(f"more than {self.config.max_peers} peers", field="peers")
        for i, p in enumerate(out):
            if not isinstance(p, str) or not _PEER_ID.match(p):
                raise BadArgument("must be a peer id", field=f"peers[{i}]")
        return out

    async def _search_local(
        self,
        query: F32Array,
        k: int,
        flt: SearchFilter | None,
        deadline: float,
        out: list[MeshHit],
        state: dict[str, str],
    ) -> None:
        assert self.local is not None
        state["state"] = "late"
        try:
            with trio.move_on_after(deadline):
                hits = await self.local(query, k, flt, deadline)
                out.extend(_cited(self.peer_id, h) for h in hits[:k])
                state["state"] = "answered"
        except SymbioteError as exc:
            log.warning("local part of a federated search failed: %s", exc, extra=self._extra)
            state["state"] = exc.code

    # -- receiving ---------------------------------------------------------------------------

    def handle(self, item: Inbound) -> bool:
        """SwimNode handler: take the federated search messages, leave the rest."""
        peer = item.sender.peer_id
        match item.msg:
            case FedSearch() as q:
                if peer is not None:
                    self._on_request(item.sender, peer, q)
                return True
            case FedHits() as h:
                if peer is not None:
                    self._on_hits(peer, h)
                return True
            case FedRefused() as r:
                if peer is not None:
                    self._on_refused(peer, r)
                return True
        return False

    def _on_hits(self, peer: str, answer: FedHits) -> None:
        pending = self._pending.get(answer.qid)
        if pending is None or peer not in pending.targets or peer in pending.replied:
            # Late (the asker gave up), duplicated, or from a peer that was not asked.
            self.stats["unexpected_answer"] += 1
            return
        hits: list[MeshHit] = []
        for h in answer.hits[: pending.k]:
            if not (math.isfinite(h.distance) and -1e-6 <= h.distance <= 2.0 + 1e-6):
                self.stats["bad_answer"] += 1
                continue
            hits.append(_cited(peer, h))
        self.stats["answers_in"] += 1
        pending.answer(peer, hits, list(answer.redacted))

    def _on_refused(self, peer: str, refusal: FedRefused) -> None:
        pending = self._pending.get(refusal.qid)
        if pending is None or peer not in pending.targets or peer in pending.replied:
            self.stats["unexpected_answer"] += 1
            return
        self.stats["refusals_in"] += 1
        pending.refuse(peer, refusal.code[:32])

    def _on_request(self, sender: PeerAddr, peer: str, q: FedSearch) -> None:
        self.stats["requests_in"] += 1
        cfg = self.config
        if not self.sync.policy.sync_from(peer):
            self._refuse(sender, q.qid, "distrusted", "this node does not trust the sender")
            return
        try:
            grant, scope = self.grants.check(peer, list(q.tags), now=self._wall())
            flt = _narrow(parse_filter(q.where), scope)
            if flt is None or not flt.tags:
                raise GrantDenied(
                    "where.tags and the grant share no tag", reason="out_of_scope", field="tags"
                )
            vector = self._parse_vector(q.vector)
            if not 1 <= q.k <= cfg.max_hits:
                raise BadArgument(f"must be in [1, {cfg.max_hits}]", field="k")
            if q.deadline_ms <= 0:
                raise BadArgument("must be > 0", field="deadline_ms")
        except GrantDenied as exc:
            self._refuse(sender, q.qid, exc.reason, exc.message, exc.field)
            return
        except SymbioteError as exc:
            self._refuse(sender, q.qid, "bad_request", exc.message, exc.field)
            return
        if self.local is None or self._nursery is None:
            self._refuse(sender, q.qid, "unavailable", "this node does not answer searches")
            return
        if self._inflight[peer] >= cfg.inflight_per_peer or self._inflight_total >= cfg.inflight:
            self._refuse(sender, q.qid, "busy", "too many searches running; retry later")
            return
        self._inflight[peer] += 1
        self._inflight_total += 1
        redact = frozenset(cfg.redact) | frozenset(grant.redact)
        timeout = min(q.deadline_ms / 1000.0, cfg.max_deadline_s)
        tags = list(flt.tags) if isinstance(flt.tags, list) else [str(flt.tags)]
        self._nursery.start_soon(
            self._answer, sender, peer, q.qid, vector, q.k, flt, tags, redact, timeout
        )

    def _parse_vector(self, raw: bytes) -> F32Array:
        dim = self.config.dim
        if len(raw) != dim * 4:
            raise InvalidRecord(f"expected {dim * 4} bytes ({dim} float32)", field="vector")
        return check_query_vector(np.frombuffer(raw, dtype="<f4").astype(np.float32), dim)

    async def _answer(
        self,
        sender: PeerAddr,
        peer: str,
        qid: int,
        vector: F32Array,
        k: int,
        flt: SearchFilter,
        scope: list[str],
        redact: frozenset[str],
        timeout: float,
    ) -> None:
        assert self.local is not None
        try:
            with trio.move_on_after(timeout) as cs:
                hits = await self.local(vector, k, flt, timeout)
            if cs.cancelled_caught:
                self.stats["answer_late"] += 1  # the asker has stopped waiting
                return
        except SymbioteError as exc:
            self._refuse(sender, qid, "unavailable", exc.message, exc.field)
            return
        finally:
            self._inflight[peer] -= 1
            if self._inflight[peer] <= 0:
                del self._inflight[peer]
            self._inflight_total -= 1
        allowed = set(scope)
        kept = [h for h in hits if h.tags and allowed.intersection(h.tags)]
        if len(kept) < len(hits):
            # The local search ignored its filter: a bug, but nothing outside the grant leaves.
            self.stats["scope_dropped"] += len(hits) - len(kept)
            log.warning(
                "dropped %d hits outside the grant's tags",
                len(hits) - len(kept),
                extra={**self._extra, "sender": peer},
            )
        out = [redact_hit(h, redact, max_text=self.config.max_text_chars) for h in kept[:k]]
        answer = FedHits(qid, out, sorted(redact))
        while out and len(_ENCODER.encode(answer)) > self.config.max_reply_bytes:
            self.stats["answer_trimmed"] += 1
            out = out[: len(out) // 2] if len(out) > 1 else []
            answer = FedHits(qid, out, sorted(redact))
        self.stats["answers_out"] += 1
        self._send(sender, answer)

    def _refuse(
        self,
        to: PeerAddr,
        qid: int,
        code: str,
        message: str,
        field: str | None = None,
    ) -> None:
        key = f"refused_{code}"
        self.stats[key] += 1
        n = self.stats[key]
        if n & (n - 1) == 0:  # sampled: 1, 2, 4, 8...
            log.warning(
                "refused a federated search: %s (%s, count %d)",
                code,
                message,
                n,
                extra={**self._extra, "sender": to.peer_id, "code": code},
            )
        self._send(to, FedRefused(qid, code, message[:200], field))

    def _send(self, to: PeerAddr, msg: FedHits | FedRefused) -> None:
        if not self.swim.net.send_nowait(to, msg):
            self.stats["send_dropped"] += 1
