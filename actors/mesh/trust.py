"""EigenTrust (Kamvar, Schlosser, Garcia-Molina 2003), computed locally, and the trust policy.

Local trust
    Peer ``i`` rates peer ``j`` from their interactions: ``s_ij = max(sat_ij - unsat_ij, 0)``,
    normalised per row, ``c_ij = s_ij / sum_j s_ij``. A peer with no positive rating of anyone
    gets the pre-trusted distribution ``p`` as its row (it defers to the anchors).

Global trust
    ``t <- (1 - a) C^T t + a p``, from ``t = p``, until ``||t_new - t||_1 < epsilon`` (1e-6).
    ``C`` is row-stochastic and ``p`` sums to 1, so ``t`` sums to 1 at every step. Every
    pre-trusted peer keeps at least ``a * p_i`` (its floor), and a set of peers that no honest
    peer rates (a Sybil ring rating only itself) receives no mass at all: its score is ~0
    however many members it has and however they rate each other.

Where the ratings come from
    This node's own row of ``C`` is live evidence (valid rows delivered: satisfactory; forged
    signatures, timeouts: unsatisfactory; see :class:`~symbiote.actors.mesh.antientropy.RowSync`).
    Other peers' rows arrive as signed ``trust_report`` rows through anti-entropy, the latest
    report of an origin replacing the previous. The computing node is always among the
    pre-trusted peers, next to the operator's choice (the bootstrap file), so its own
    observations anchor the computation.

Policy
    :class:`TrustPolicy` turns scores into two decisions the protocols consult: below
    ``sync_threshold`` a peer is no longer synced from; below ``drop_threshold`` its frames are
    dropped. Thresholds are relative to the uniform score ``1/N``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from symbiote.schema.mesh import TrustConfig

__all__ = ["TrustGraph", "TrustPolicy", "TrustScores", "eigentrust"]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


def eigentrust(
    local: FloatArray,
    pretrusted: FloatArray,
    *,
    a: float = 0.15,
    epsilon: float = 1e-6,
    max_iterations: int = 1000,
) -> tuple[FloatArray, int]:
    """Global trust vector and the number of iterations taken.

    ``local`` is the ``n x n`` matrix of non-negative local trust values (row ``i`` = what
    ``i`` thinks of each peer; the diagonal is ignored: nobody rates itself). ``pretrusted``
    is the anchor distribution (non-negative, not all zero; normalised here).
    """
    s = np.array(local, dtype=np.float64, copy=True)
    n = s.shape[0]
    if s.shape != (n, n) or pretrusted.shape != (n,):
        raise ValueError("local must be n x n and pretrusted of length n")
    if n == 0:
        return np.zeros(0), 0
    if (s < 0).any() or not np.isfinite(s).all():
        raise ValueError("local trust values must be finite and >= 0")
    p = np.asarray(pretrusted, dtype=np.float64)
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError("pretrusted must be >= 0 and not all zero")
    p = p / p.sum()
    np.fill_diagonal(s, 0.0)
    sums = s.sum(axis=1)
    empty = sums <= 0
    c = np.divide(s, sums[:, None], out=np.zeros_like(s), where=~empty[:, None])
    c[empty] = p  # a peer that rates nobody defers to the anchors
    ct = c.T.copy()  # contiguous for the repeated products
    t = p.copy()
    for it in range(1, max_iterations + 1):
        nxt = (1.0 - a) * (ct @ t) + a * p
        delta = float(np.abs(nxt - t).sum())
        t = nxt
        if delta < epsilon:
            return t, it
    log.warning("eigentrust did not reach epsilon in %d iterations", max_iterations)
    return t, max_iterations


@dataclass(frozen=True, slots=True)
class TrustScores:
    """The result of one computation: a score per peer (summing to 1) and its evidence."""

    scores: dict[str, float]
    #: Interactions (satisfactory + unsatisfactory) reported *about* each peer, by anyone.
    evidence: dict[str, int]
    iterations: int = 0
    computed_at: float = 0.0

    def relative(self, peer_id: str) -> float | None:
        """Score x N (1.0 = an average peer); None for a peer not in the computation."""
        s = self.scores.get(peer_id)
        return None if s is None else s * len(self.scores)


@dataclass(slots=True)
class TrustGraph:
    """Interaction counts between peers (``trust_edges``), bounded to ``max_peers`` peers."""

    self_id: str
    config: TrustConfig = field(default_factory=TrustConfig)
    #: (from, to) -> [satisfactory, unsatisfactory]
    edges: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    #: Origins whose outgoing edges came from a report, with that report's row seq.
    reported: dict[str, int] = field(default_factory=dict)
    _peers: set[str] = field(default_factory=set)
    refused: int = 0

    def __post_init__(self) -> None:
        self._peers.add(self.self_id)

    def peers(self) -> set[str]:
        """Every peer in the graph, this node included."""
        return set(self._peers)

    def _admit(self, *peer_ids: str) -> bool:
        new = [p for p in peer_ids if p not in self._peers]
        if len(self._peers) + len(set(new)) > self.config.max_peers:
            self.refused += 1
            return False
        self._peers.update(new)
        return True

    def add_peer(self, peer_id: str) -> bool:
        """Make ``peer_id`` part of the computation (False if the graph is full)."""
        return self._admit(peer_id)

    def record(self, frm: str, to: str, *, satisfactory: int = 0, unsatisfactory: int = 0) -> None:
        """Add interactions of ``frm`` with ``to`` (a self-rating is ignored)."""
        if frm == to or satisfactory < 0 or unsatisfactory < 0 or not self._admit(frm, to):
            return
        e = self.edges.setdefault((frm, to), [0, 0])
        e[0] += satisfactory
        e[1] += unsatisfactory

    def outgoing(self, frm: str) -> dict[str, tuple[int, int]]:
        """``frm``'s counts with every peer it has rated (the content of its trust report)."""
        return {to: (e[0], e[1]) for (f, to), e in self.edges.items() if f == frm}

    def set_report(self, origin: str, seq: int, edges: dict[str, tuple[int, int]]) -> bool:
        """Replace ``origin``'s outgoing edges by a newer report; False if older or refused.

        This node's own edges are never replaced by a report (they are live evidence).
        """
        if origin == self.self_id or seq <= self.reported.get(origin, 0):
            return False
        if not self._admit(origin):
            return False
        for key in [k for k in self.edges if k[0] == origin]:
            del self.edges[key]
        self.reported[origin] = seq
        for to, (sat, unsat) in edges.items():
            if sat >= 0 and unsat >= 0:
                self.record(origin, to, satisfactory=sat, unsatisfactory=unsat)
        return True

    def compute(self, pretrusted: set[str], *, now: float = 0.0) -> TrustScores:
        """EigenTrust over the graph, anchored in ``pretrusted`` plus this node."""
        ids = sorted(self._peers)
        index = {p: i for i, p in enumerate(ids)}
        n = len(ids)
        local = np.zeros((n, n), dtype=np.float64)
        evidence = dict.fromkeys(ids, 0)
        for (frm, to), (sat, unsat) in self.edges.items():
            local[index[frm], index[to]] = max(sat - unsat, 0)
            evidence[to] += sat + unsat
        p = np.zeros(n, dtype=np.float64)
        for pid in pretrusted | {self.self_id}:
            if pid in index:
                p[index[pid]] = 1.0
        t, iters = eigentrust(
            local,
            p,
            a=self.config.pretrust_weight,
            epsilon=self.config.epsilon,
            max_iterations=self.config.max_iterations,
        )
        return TrustScores(
            {pid: float(t[i]) for pid, i in index.items()}, evidence, iters, computed_at=now
        )


class TrustPolicy:
    """What the protocols ask: may I sync from this peer? may its frames in?

    Before the first computation, and for peers about whom fewer than ``min_evidence``
    interactions are known, both answers are yes: a newcomer has to be able to join and earn
    trust. A peer with evidence and a score below a threshold is refused.
    """

    def __init__(self, config: TrustConfig | None = None, *, self_id: str = "") -> None:
        self.config = config if config is not None else TrustConfig()
        self.self_id = self_id
        self.scores: TrustScores | None = None
        #: Decisions that went against a peer, by kind ("no_sync", "drop").
        self.refusals: dict[str, int] = {"no_sync": 0, "drop": 0}

    def update(self, scores: TrustScores) -> None:
        """Install a new computation."""
        self.scores = scores

    def _relative(self, peer_id: str) -> float | None:
        if self.scores is None or peer_id == self.self_id:
            return None
        if self.scores.evidence.get(peer_id, 0) < self.config.min_evidence:
            return None
        return self.scores.relative(peer_id)

    def sync_from(self, peer_id: str) -> bool:
        """False when ``peer_id`` scores below ``sync_threshold`` (with enough evidence)."""
        r = self._relative(peer_id)
        if r is not None and r < self.config.sync_threshold:
            self.refusals["no_sync"] += 1
            return False
        return True

    def accept_frames(self, peer_id: str) -> bool:
        """False when ``peer_id`` scores below ``drop_threshold`` (with enough evidence)."""
        r = self._relative(peer_id)
        if r is not None and r < self.config.drop_threshold:
            self.refusals["drop"] += 1
            return False
        return True
