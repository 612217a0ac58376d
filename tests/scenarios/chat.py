"""Generated records for the scenario tests."""

from __future__ import annotations

import datetime as dt

import numpy as np

from symbiote.schema.records import Chunk, Document, Message

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def message(
    i: int, *, prefix: str = "e", thread: str | None = None, text: str | None = None
) -> Message:
    return Message(
        event_id=f"{prefix}{i}",
        tenant_id="tenant-a",
        source="test",
        thread_id=thread or f"thread-{i % 5}",
        msg_id=str(i),
        ts=T0 + dt.timedelta(seconds=i),
        author_raw=f"author {i % 3}",
        author_uuid=f"uuid-{i % 3}",
        text=text if text is not None else f"hello {i}",
    )


def chunk(i: int, dim: int, *, doc: str = "doc-1") -> Chunk:
    rng = np.random.default_rng(i)
    vec = rng.standard_normal(dim).astype(np.float32)
    return Chunk(
        chunk_id=f"{doc}:{i}",
        document_id=doc,
        text=f"chunk {i}",
        embedding=(vec / np.linalg.norm(vec)).tolist(),
    )


def post(doc_id: str) -> Document:
    return Document(id=doc_id, doc_type="post", title="A post", slug=doc_id, status="draft")
