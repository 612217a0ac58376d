"""Validation and decoding of symbiote's records: every error names its field precisely."""

from __future__ import annotations

import datetime as dt
import gc
import math
from typing import Any

import msgspec
import numpy as np
import pytest

from symbiote.schema.errors import ConfigError, InvalidRecord, TooLarge
from symbiote.schema.messages import IngestMessages
from symbiote.schema.records import (
    Chunk,
    Document,
    Limits,
    Message,
    decode_chunks,
    decode_documents,
    decode_messages,
    embedding_matrix,
    validate_chunks,
    validate_documents,
    validate_messages,
)

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
LIMITS = Limits(dim=4, max_text_bytes=100, max_id_bytes=32)


def message(i: int = 0, **kw: Any) -> Message:
    fields: dict[str, Any] = dict(
        event_id=f"e{i}",
        tenant_id="t",
        source="whatsapp",
        thread_id="th",
        msg_id=str(i),
        ts=NOW,
        author_raw="alice",
        author_uuid="u1",
    )
    fields.update(kw)
    return Message(**fields)


def message_dict(i: int = 0, **kw: Any) -> dict[str, Any]:
    d = msgspec.to_builtins(message(i))
    d.update(kw)
    return {k: v for k, v in d.items() if v is not None}


def post(**kw: Any) -> Document:
    fields: dict[str, Any] = dict(id="p1", doc_type="post", title="T", slug="t", status="draft")
    fields.update(kw)
    return Document(**fields)


def chunk(i: int = 0, embedding: Any = (0.1, 0.2, 0.3, 0.4), **kw: Any) -> Chunk:
    return Chunk(chunk_id=f"d:{i}", document_id="d", text="hello", embedding=embedding, **kw)


def field_of(exc_info: pytest.ExceptionInfo[InvalidRecord]) -> str | None:
    return exc_info.value.field


def test_valid_records_pass() -> None:
    validate_messages([message(0), message(1, media_type="image", text="hi")], LIMITS)
    validate_documents([post(), Document(id="x", doc_type="profile")], LIMITS)
    mat = validate_chunks([chunk(0), chunk(1, embedding=np.ones(4))], LIMITS)
    assert mat.shape == (2, 4) and mat.dtype == np.float32


def test_naive_timestamp_names_the_row() -> None:
    msgs = [message(0), message(1), message(2), message(3, ts=dt.datetime(2024, 1, 1))]
    with pytest.raises(InvalidRecord) as ei:
        validate_messages(msgs, LIMITS)
    assert field_of(ei) == "messages[3].ts"
    assert "naive" in ei.value.message


def test_non_utc_aware_timestamp_is_accepted() -> None:
    paris = dt.timezone(dt.timedelta(hours=2))
    validate_messages([message(ts=dt.datetime(2024, 1, 1, 14, tzinfo=paris))], LIMITS)


def test_timestamp_of_wrong_type() -> None:
    with pytest.raises(InvalidRecord) as ei:
        validate_messages([message(ts="2024-01-01")], LIMITS)
    assert field_of(ei) == "messages[0].ts"


def test_media_type_domain() -> None:
    with pytest.raises(InvalidRecord) as ei:
        validate_messages([message(0), message(1, media_type="pdf")], LIMITS)
    assert field_of(ei) == "messages[1].media_type"


def test_unhashable_media_type_is_refused_not_a_crash() -> None:
    with pytest.raises(InvalidRecord) as info:
        validate_messages([message(0), message(1, media_type=["image"])], LIMITS)
    assert field_of(info) == "messages[1].media_type"


@pytest.mark.parametrize(
    "field",
    [
        "event_id",
        "tenant_id",
        "source",
        "thread_id",
        "msg_id",
        "author_raw",
        "author_uuid",
        "media_url",
        "created_by_run",
        "text",
    ],
)
def test_string_field_types(field: str) -> None:
    # Every string field, each behind valid messages: the fault is found in the right row.
    with pytest.raises(InvalidRecord) as ei:
        validate_messages([message(0), message(1), message(2, **{field: 7})], LIMITS)
    assert field_of(ei) == f"messages[2].{field}"


@pytest.mark.parametrize("field", ["author_raw", "media_url", "created_by_run"])
def test_every_short_field_has_the_id_cap(field: str) -> None:
    at_cap: dict[str, Any] = {field: "é" * 16}  # 32 bytes
    over: dict[str, Any] = {field: "é" * 17}
    validate_messages([message(0, **at_cap)], LIMITS)
    with pytest.raises(TooLarge) as ei:
        validate_messages([message(0), message(1, **over)], LIMITS)
    assert field_of(ei) == f"messages[1].{field}"


def test_uncommon_valid_messages_pass() -> None:
    # Each is off the common shape (UTC, no media, no created_at, short strings) and valid.
    class Stamp(dt.datetime):
        pass

    paris = dt.timezone(dt.timedelta(hours=2))
    validate_messages(
        [
            message(0, created_at=dt.datetime(2024, 1, 1, tzinfo=paris)),
            message(1, media_type="image", media_url="m"),
            message(2, ts=Stamp(2024, 1, 1, tzinfo=dt.UTC)),
            message(3, text="é" * 50, event_id="x" * 32),
        ],
        LIMITS,
    )


def test_naive_created_at_names_the_row() -> None:
    with pytest.raises(InvalidRecord) as ei:
        validate_messages([message(0), message(1, created_at=dt.datetime(2024, 1, 1))], LIMITS)
    assert field_of(ei) == "messages[1].created_at"


def test_empty_event_id() -> None:
    with pytest.raises(InvalidRecord) as ei:
        validate_messages([message(event_id="")], LIMITS)
    assert field_of(ei) == "messages[0].event_id"


def test_text_over_cap_is_too_large() -> None:
    validate_messages([message(text="é" * 50)], LIMITS)  # 100 bytes: exactly at the cap
    with pytest.raises(TooLarge) as ei:
        validate_messages([message(text="é" * 51)], LIMITS)
    assert field_of(ei) == "messages[0].text"
    with pytest.raises(TooLarge):
        validate_messages([message(event_id="x" * 33)], LIMITS)


def test_too_many_rows() -> None:
    limits = Limits(dim=4, max_rows_per_request=2)
    with pytest.raises(TooLarge) as ei:
        validate_messages([message(i) for i in range(3)], limits)
    assert field_of(ei) == "messages"


def test_not_a_message() -> None:
    with pytest.raises(InvalidRecord) as ei:
        validate_messages([message(), {"event_id": "x"}], LIMITS)  # type: ignore[list-item]
    assert field_of(ei) == "messages[1]"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"title": None}, "title"),
        ({"slug": ""}, "slug"),
        ({"status": None}, "status"),
        ({"status": "deleted"}, "status"),
    ],
)
def test_post_rules(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRecord) as ei:
        validate_documents([post(), post(id="p2", **changes)], LIMITS)
    assert field_of(ei) == f"documents[1].{field}"


def test_non_post_may_omit_post_fields() -> None:
    validate_documents([Document(id="j1", doc_type="journal", status="whatever")], LIMITS)


def test_document_field_checks() -> None:
    with pytest.raises(InvalidRecord) as ei:
        validate_documents([post(tags=("a", 3))], LIMITS)
    assert field_of(ei) == "documents[0].tags[1]"
    with pytest.raises(InvalidRecord) as ei:
        validate_documents([post(date=NOW)], LIMITS)
    assert field_of(ei) == "documents[0].date"
    with pytest.raises(InvalidRecord) as ei:
        validate_documents([post(window_start=NOW, window_end=NOW - dt.timedelta(1))], LIMITS)
    assert field_of(ei) == "documents[0].window_end"
    with pytest.raises(InvalidRecord) as ei:
        validate_documents([post(created_at=dt.datetime(2024, 1, 1))], LIMITS)
    assert field_of(ei) == "documents[0].created_at"


@pytest.mark.parametrize(
    ("embedding", "needle"),
    [
        ([0.1, 0.2, 0.3], "expected 4 values, got 3"),
        ([0.1, 0.2, 0.3, 0.4, 0.5], "expected 4 values"),
        ([0.1, math.nan, 0.3, 0.4], "NaN"),
        ([0.1, math.inf, 0.3, 0.4], "NaN or infinite"),
        ([1e39, 0.0, 0.0, 0.0], "float32"),
        ([0.0, 0.0, 0.0, 0.0], "all-zero"),
        (["a", 0.2, 0.3, 0.4], "numbers"),
        (None, "expected a list"),
        ([[0.1, 0.2], [0.3, 0.4]], "flat vector"),
    ],
)
def test_embedding_errors_name_the_row(embedding: Any, needle: str) -> None:
    chunks = [chunk(0), chunk(1), chunk(2, embedding=embedding)]
    with pytest.raises(InvalidRecord) as ei:
        validate_chunks(chunks, LIMITS)
    assert field_of(ei) == "chunks[2].embedding"
    assert needle in ei.value.message


def test_embedding_matrix_accepts_numpy_and_lists() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, 4))
    chunks = [chunk(i, embedding=vecs[i]) for i in range(3)]
    chunks += [chunk(i, embedding=list(vecs[i])) for i in range(3, 5)]
    mat = embedding_matrix(chunks, 4)
    np.testing.assert_allclose(mat, vecs.astype(np.float32))
    assert embedding_matrix([], 4).shape == (0, 4)


def test_limits_are_checked() -> None:
    with pytest.raises(ConfigError) as ei:
        Limits(dim=0)
    assert ei.value.field == "dim"
    with pytest.raises(ConfigError):
        Limits(max_text_bytes=-1)


def test_decode_messages_from_dicts_and_json() -> None:
    rows = [message_dict(0), message_dict(1, ts="2024-05-01T14:00:00+02:00")]
    decoded = decode_messages(rows, LIMITS)
    assert decoded[1].ts == NOW
    assert decode_messages(msgspec.json.encode(rows), LIMITS) == decoded


@pytest.mark.parametrize(
    ("row", "field", "needle"),
    [
        ({"ts": "2024-05-01T12:00:00"}, "messages[1].ts", "timezone"),
        ({"surprise": 1}, "messages[1].surprise", "unknown field"),
        ({"media_type": "pdf"}, "messages[1].media_type", "pdf"),
        ({"event_id": 5}, "messages[1].event_id", "Expected `str`"),
    ],
)
def test_decode_messages_errors(row: dict[str, Any], field: str, needle: str) -> None:
    rows = [message_dict(0), message_dict(1, **row)]
    with pytest.raises(InvalidRecord) as ei:
        decode_messages(rows, LIMITS)
    assert ei.value.field == field
    assert needle in ei.value.message


def test_decode_missing_field_and_bad_json() -> None:
    row = message_dict(0)
    del row["author_uuid"]
    with pytest.raises(InvalidRecord) as ei:
        decode_messages([row], LIMITS)
    assert ei.value.field == "messages[0].author_uuid"
    with pytest.raises(InvalidRecord) as ei:
        decode_messages(b'[{"event_id": "x"', LIMITS)
    assert ei.value.field == "messages"
    with pytest.raises(InvalidRecord) as ei:
        decode_messages({"event_id": "x"}, LIMITS)
    assert ei.value.field == "messages"


def test_decode_chunks_and_documents() -> None:
    rows = [{"chunk_id": "d:0", "document_id": "d", "text": "x", "embedding": [1, 2, 3, 4]}]
    assert decode_chunks(rows, LIMITS)[0].embedding == [1.0, 2.0, 3.0, 4.0]
    rows[0]["embedding"] = [1, 2, "x", 4]
    with pytest.raises(InvalidRecord) as ei:
        decode_chunks(rows, LIMITS)
    assert ei.value.field == "chunks[0].embedding[2]"
    docs: list[dict[str, Any]] = [
        {"id": "p", "doc_type": "post", "title": "T", "slug": "t", "status": "nope"}
    ]
    with pytest.raises(InvalidRecord) as ei:
        decode_documents(docs, LIMITS)
    assert ei.value.field == "documents[0].status"
    docs[0].update(status="published", date="2024-01-02", tags=["a"])
    assert decode_documents(docs, LIMITS)[0].date == dt.date(2024, 1, 2)


def test_records_are_not_tracked_by_the_collector() -> None:
    m = message(0)
    assert not gc.is_tracked(m)
    assert not gc.is_tracked(IngestMessages(messages=(m,)))
