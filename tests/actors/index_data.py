"""Deterministic chunks for the index tests: vector i comes from a seeded generator."""

from __future__ import annotations

import numpy as np

from symbiote.schema.records import Chunk

DIM = 16
#: Chunk ids cycle through this many slots, so a long ingest also updates chunks.
SLOTS = 3000


def vector(i: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(dim).astype(np.float32)
    out: np.ndarray = v / np.linalg.norm(v)
    return out


def chunk_for(
    i: int, *, dim: int = DIM, slots: int = SLOTS, metadata: dict[str, object] | None = None
) -> Chunk:
    slot = i % slots
    return Chunk(
        chunk_id=f"doc-{slot // 4}:{slot % 4}",
        document_id=f"doc-{slot // 4}",
        text=f"chunk {i}",
        embedding=vector(i, dim).tolist(),
        metadata=metadata,
    )
