"""The records symbiote stores, their limits, and the checks that guard the write path.

The three record types mirror Egregora's tables (``messages``, ``documents``) plus the
``chunks`` table that brings embeddings into DuckDB. They are frozen msgspec structs built
with ``kw_only=True`` and ``forbid_unknown_fields=True``, so decoding a dict or a JSON body
with an unexpected key fails instead of silently dropping data.

Constructing a struct in Python performs no type checks (msgspec only checks on decode), so
the ``validate_*`` functions check types as well as meaning. They run on the writer's hot path
and are written as flat loops over the records; embeddings are checked as one numpy matrix.

Every failure is an :class:`~symbiote.schema.errors.InvalidRecord` (or its subclass
:class:`~symbiote.schema.errors.TooLarge`) whose ``field`` is the precise path of the culprit,
for instance ``messages[3].ts`` or ``chunks[0].embedding``.

Timestamps: a naive datetime is refused (its instant is unknown). An aware datetime in another
zone is accepted; it denotes one instant, and it is stored as that instant in UTC (DuckDB's
``TIMESTAMPTZ`` and Arrow's ``timestamp[us, tz=UTC]`` both keep instants), so reading it back
gives the same moment expressed in UTC.

JSON fields (``attrs``, ``pii_flags``, ``extensions``, ``metadata``) are checked for
encodability and size where the writer encodes them, not here, so that the hot path encodes
each value once; those errors carry the same kind of field path.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from .errors import ConfigError, InvalidRecord, TooLarge

__all__ = [
    "CORRECTABLE_MESSAGE_FIELDS",
    "DEFAULT_LIMITS",
    "MEDIA_TYPES",
    "POST_STATUSES",
    "Chunk",
    "Document",
    "Limits",
    "MediaType",
    "Message",
    "UTCDateTime",
    "decode_chunks",
    "decode_documents",
    "decode_messages",
    "embedding_matrix",
    "validate_chunks",
    "validate_documents",
    "validate_message_changes",
    "validate_messages",
]

#: A datetime that must carry a timezone; msgspec refuses naive values when decoding.
UTCDateTime = Annotated[_dt.datetime, msgspec.Meta(tz=True)]
MediaType = Literal["image", "video", "audio"]
MEDIA_TYPES: Final = frozenset({"image", "video", "audio"})
POST_STATUSES: Final = frozenset({"draft", "published", "archived"})


class Limits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Caps applied to incoming records; one instance per database, built from the Config."""

    #: Embedding dimension of ``chunks.embedding`` (fixed per database file).
    dim: int = 768
    #: Largest UTF-8 size of a free-text field (message text, document content, chunk text).
    max_text_bytes: int = 1_000_000
    #: Largest encoded size of one JSON field (attrs, pii_flags, extensions, metadata).
    max_json_bytes: int = 256_000
    #: Largest UTF-8 size of an identifier or short string field (ids, urls, titles...).
    max_id_bytes: int = 4_096
    #: Most records one write request may carry.
    max_rows_per_request: int = 100_000

    def __post_init__(self) -> None:
        # DuckDB's ARRAY type caps the size at 100k; 65535 is already far past any model.
        if not (isinstance(self.dim, int) and 1 <= self.dim <= 65_535):
            raise ConfigError(
                f"dim must be an integer in [1, 65535], got {self.dim!r}", field="dim"
            )
        for name in ("max_text_bytes", "max_json_bytes", "max_id_bytes", "max_rows_per_request"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"must be a positive integer, got {value!r}", field=name)


DEFAULT_LIMITS: Final = Limits()


# Records (and the write messages that carry them) are values that never point back at
# anything that points at them, so ``gc=False`` is safe, and it keeps hundreds of thousands
# of queued rows out of the collector's passes: full collections during a 10,000 msg/s
# ingest fell from ~50 ms to ~20 ms, and the ack p99 with them (docs/data-layer.md).
class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """One row of Egregora's ``messages`` ingestion buffer; ``event_id`` is its key."""

    event_id: str
    tenant_id: str
    source: str
    thread_id: str
    msg_id: str
    ts: UTCDateTime
    author_raw: str
    author_uuid: str
    text: str | None = None
    media_url: str | None = None
    media_type: MediaType | None = None
    attrs: dict[str, Any] | None = None
    pii_flags: dict[str, Any] | None = None
    #: Filled with the commit batch's time by the writer when left empty.
    created_at: UTCDateTime | None = None
    created_by_run: str | None = None


class Document(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """One row of Egregora's ``documents`` table (every document type); ``id`` is its key.

    A ``doc_type == "post"`` needs ``title``, ``slug`` and a ``status`` in
    :data:`POST_STATUSES`.
    """

    id: str
    doc_type: str
    content: str | None = None
    created_at: UTCDateTime | None = None
    source_checksum: str | None = None
    title: str | None = None
    slug: str | None = None
    date: _dt.date | None = None
    summary: str | None = None
    authors: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    status: str | None = None
    subject_uuid: str | None = None
    alias: str | None = None
    avatar_url: str | None = None
    interests: tuple[str, ...] | None = None
    filename: str | None = None
    mime_type: str | None = None
    media_type: str | None = None
    phash: str | None = None
    window_start: UTCDateTime | None = None
    window_end: UTCDateTime | None = None
    extensions: dict[str, Any] | None = None


class Chunk(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """A piece of a document with its embedding; ``chunk_id`` (``"{document_id}:{i}"``) is its key.

    ``embedding`` is declared as a list of floats for decoding; a 1-D numpy array of the right
    length is accepted as well when a struct is built in Python (it is cheaper to pass).
    """

    chunk_id: str
    document_id: str
    text: str
    embedding: list[float]
    metadata: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# validation


def _path(path: str, i: int, name: str) -> str:
    return f"{path}[{i}].{name}"


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_text(value: str, cap: int, field: str) -> None:
    # len() counts code points; a code point is 1 to 4 UTF-8 bytes, so encoding (which copies
    # the string) is only needed in the narrow band where the answer is not already known.
    n = len(value)
    if n * 4 <= cap:
        return
    if n > cap or len(value.encode("utf-8", "surrogatepass")) > cap:
        raise TooLarge(f"longer than {cap} UTF-8 bytes", field=field)


def _check_aware(value: object, field: str, *, required: bool) -> None:
    if value is None:
        if required:
            raise InvalidRecord("required timestamp is missing", field=field)
        return
    if not isinstance(value, _dt.datetime):
        raise InvalidRecord(f"expected a datetime, got {_type_name(value)}", field=field)
    if value.tzinfo is not _dt.UTC and value.utcoffset() is None:
        raise InvalidRecord("naive datetime: a timezone (UTC) is required", field=field)


def _check_str_tuple(value: object, cap: int, field: str) -> None:
    if value is None:
        return
    if not isinstance(value, tuple | list):
        raise InvalidRecord(f"expected a list of strings, got {_type_name(value)}", field=field)
    for j, item in enumerate(value):
        if type(item) is not str:
            raise InvalidRecord(f"expected str, got {_type_name(item)}", field=f"{field}[{j}]")
        _check_text(item, cap, f"{field}[{j}]")


_MESSAGE_REQUIRED: Final = (
    "event_id",
    "tenant_id",
    "source",
    "thread_id",
    "msg_id",
    "author_raw",
    "author_uuid",
)
_MESSAGE_OPTIONAL_SHORT: Final = ("media_url", "created_by_run")

#: Columns of a stored message a correction may change. The key, the time, the tenant, the
#: thread and the author id place the row (its month file, its sort order, the hot table's
#: indexes), so they are not correctable: a message with another place is another message.
CORRECTABLE_MESSAGE_FIELDS: Final = frozenset(
    {"text", "media_url", "media_type", "attrs", "pii_flags", "author_raw", "created_by_run"}
)


def validate_messages(
    messages: Sequence[Message], limits: Limits = DEFAULT_LIMITS, *, path: str = "messages"
) -> None:
    """Check ``messages`` for types and meaning; raise :class:`InvalidRecord` naming the field.

    Checks: required strings present (``event_id`` non-empty), sizes against ``limits``, ``ts``
    and ``created_at`` timezone-aware, ``media_type`` in :data:`MEDIA_TYPES`, row count.
    """
    if len(messages) > limits.max_rows_per_request:
        raise TooLarge(
            f"{len(messages)} records, more than {limits.max_rows_per_request}", field=path
        )
    # Code points, not bytes: a string of at most cap/4 code points cannot exceed cap bytes.
    id_quick = limits.max_id_bytes // 4
    text_quick = limits.max_text_bytes // 4
    utc = _dt.UTC
    datetime = _dt.datetime
    for i, m in enumerate(messages):
        # One expression answers "certainly valid" for the common message (attribute reads,
        # no getattr by name, no field path built): the writer checks every message of a group
        # here, so this is per-row cost. Anything else gets the field-by-field check, which
        # either passes it too or names the fault.
        if not (
            type(m) is Message
            and type(ev := m.event_id) is str
            and type(tenant := m.tenant_id) is str
            and type(source := m.source) is str
            and type(thread := m.thread_id) is str
            and type(msg_id := m.msg_id) is str
            and type(raw := m.author_raw) is str
            and type(author := m.author_uuid) is str
            and ev
            and max(
                len(ev), len(tenant), len(source), len(thread), len(msg_id), len(raw), len(author)
            )
            <= id_quick
            and ((url := m.media_url) is None or (type(url) is str and len(url) <= id_quick))
            and ((run := m.created_by_run) is None or (type(run) is str and len(run) <= id_quick))
            and ((text := m.text) is None or (type(text) is str and len(text) <= text_quick))
            and type(ts := m.ts) is datetime
            and ts.tzinfo is utc
            and (
                (created := m.created_at) is None
                or (type(created) is datetime and created.tzinfo is utc)
            )
            and ((media := m.media_type) is None or (type(media) is str and media in MEDIA_TYPES))
        ):
            _check_message(m, i, limits, path)


def _check_message(m: object, i: int, limits: Limits, path: str) -> None:
    """The field-by-field check of one message; raises naming the first faulty field."""
    if type(m) is not Message:
        raise InvalidRecord(f"expected Message, got {_type_name(m)}", field=f"{path}[{i}]")
    id_cap = limits.max_id_bytes
    text_cap = limits.max_text_bytes
    id_quick = id_cap // 4
    text_quick = text_cap // 4
    for name in _MESSAGE_REQUIRED:
        v = getattr(m, name)
        if type(v) is not str:
            raise InvalidRecord(f"expected str, got {_type_name(v)}", field=_path(path, i, name))
        if len(v) > id_quick:
            _check_text(v, id_cap, _path(path, i, name))
    if not m.event_id:
        raise InvalidRecord("must not be empty", field=_path(path, i, "event_id"))
    for name in _MESSAGE_OPTIONAL_SHORT:
        v = getattr(m, name)
        if v is not None:
            if type(v) is not str:
                raise InvalidRecord(
                    f"expected str, got {_type_name(v)}", field=_path(path, i, name)
                )
            if len(v) > id_quick:
                _check_text(v, id_cap, _path(path, i, name))
    text = m.text
    if text is not None:
        if type(text) is not str:
            raise InvalidRecord(
                f"expected str, got {_type_name(text)}", field=_path(path, i, "text")
            )
        if len(text) > text_quick:
            _check_text(text, text_cap, _path(path, i, "text"))
    _check_aware(m.ts, _path(path, i, "ts"), required=True)
    if m.created_at is not None:
        _check_aware(m.created_at, _path(path, i, "created_at"), required=False)
    media = m.media_type
    if media is not None and (type(media) is not str or media not in MEDIA_TYPES):
        raise InvalidRecord(
            f"must be one of {sorted(MEDIA_TYPES)} or null, got {media!r:.40}",
            field=_path(path, i, "media_type"),
        )


_DOCUMENT_SHORT: Final = (
    "source_checksum",
    "title",
    "slug",
    "status",
    "subject_uuid",
    "alias",
    "avatar_url",
    "filename",
    "mime_type",
    "media_type",
    "phash",
)
_DOCUMENT_TEXT: Final = ("content", "summary")
_DOCUMENT_LISTS: Final = ("authors", "tags", "interests")


def validate_documents(
    documents: Sequence[Document], limits: Limits = DEFAULT_LIMITS, *, path: str = "documents"
) -> None:
    """Check ``documents``; raise :class:`InvalidRecord` naming the field.

    Beyond types and sizes: a post (``doc_type == "post"``) needs ``title``, ``slug`` and a
    ``status`` in :data:`POST_STATUSES`; ``window_start`` may not be after ``window_end``.
    """
    if len(documents) > limits.max_rows_per_request:
        raise TooLarge(
            f"{len(documents)} records, more than {limits.max_rows_per_request}", field=path
        )
    id_cap = limits.max_id_bytes
    text_cap = limits.max_text_bytes
    for i, d in enumerate(documents):
        if type(d) is not Document:
            raise InvalidRecord(f"expected Document, got {_type_name(d)}", field=f"{path}[{i}]")
        for name in ("id", "doc_type"):
            v = getattr(d, name)
            if type(v) is not str or not v:
                raise InvalidRecord(
                    f"expected a non-empty str, got {v!r:.40}", field=_path(path, i, name)
                )
            _check_text(v, id_cap, _path(path, i, name))
        for name in _DOCUMENT_SHORT:
            v = getattr(d, name)
            if v is not None:
                if type(v) is not str:
                    raise InvalidRecord(
                        f"expected str, got {_type_name(v)}", field=_path(path, i, name)
                    )
                _check_text(v, id_cap, _path(path, i, name))
        for name in _DOCUMENT_TEXT:
            v = getattr(d, name)
            if v is not None:
                if type(v) is not str:
                    raise InvalidRecord(
                        f"expected str, got {_type_name(v)}", field=_path(path, i, name)
                    )
                _check_text(v, text_cap, _path(path, i, name))
        for name in _DOCUMENT_LISTS:
            _check_str_tuple(getattr(d, name), id_cap, _path(path, i, name))
        for name in ("created_at", "window_start", "window_end"):
            _check_aware(getattr(d, name), _path(path, i, name), required=False)
        if d.date is not None and (
            not isinstance(d.date, _dt.date) or isinstance(d.date, _dt.datetime)
        ):
            raise InvalidRecord(
                f"expected a date, got {_type_name(d.date)}", field=_path(path, i, "date")
            )
        if (
            d.window_start is not None
            and d.window_end is not None
            and d.window_start > d.window_end
        ):
            raise InvalidRecord(
                "window_end is before window_start", field=_path(path, i, "window_end")
            )
        if d.doc_type == "post":
            for name in ("title", "slug"):
                if not getattr(d, name):
                    raise InvalidRecord(
                        "a post needs a non-empty " + name, field=_path(path, i, name)
                    )
            if d.status not in POST_STATUSES:
                raise InvalidRecord(
                    f"a post's status must be one of {sorted(POST_STATUSES)}, got {d.status!r}",
                    field=_path(path, i, "status"),
                )


def embedding_matrix(
    chunks: Sequence[Chunk], dim: int, *, path: str = "chunks"
) -> npt.NDArray[np.float32]:
    """The embeddings of ``chunks`` as one C-contiguous ``float32`` matrix of shape (n, dim).

    Raises :class:`InvalidRecord` at ``{path}[i].embedding`` for a wrong length, a non-numeric
    value, NaN or infinity (also a float64 that overflows float32), or an all-zero vector
    (cosine similarity is undefined for it).
    """
    n = len(chunks)
    if n == 0:
        return np.empty((0, dim), dtype=np.float32)
    rows = [c.embedding for c in chunks]
    try:
        raw = np.asarray(rows)
    except (ValueError, TypeError):
        # Ragged or odd input: find the row to blame.
        raw = np.empty((0,))
    if raw.ndim != 2 or raw.shape[1] != dim or raw.dtype.kind not in "fiu":
        _blame_embedding_row(rows, dim, path)
        # Every row passed on its own yet the stack did not: unreachable with sane numpy.
        raise InvalidRecord(f"embeddings do not form an (n, {dim}) matrix", field=path)
    with np.errstate(over="ignore", invalid="ignore"):
        mat = np.ascontiguousarray(raw, dtype=np.float32)
    finite = np.isfinite(mat).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        raise InvalidRecord(
            "NaN or infinite value (or beyond float32 range)", field=_path(path, i, "embedding")
        )
    nonzero = mat.any(axis=1)
    if not nonzero.all():
        i = int(np.argmin(nonzero))
        raise InvalidRecord(
            "all-zero embedding: cosine similarity is undefined", field=_path(path, i, "embedding")
        )
    return mat


def _blame_embedding_row(rows: list[Any], dim: int, path: str) -> None:
    for i, row in enumerate(rows):
        field = _path(path, i, "embedding")
        if isinstance(row, str | bytes) or row is None:
            raise InvalidRecord(
                f"expected a list of {dim} floats, got {_type_name(row)}", field=field
            )
        try:
            arr = np.asarray(row)
        except (ValueError, TypeError) as exc:
            raise InvalidRecord(f"not a vector of numbers: {exc}", field=field) from None
        if arr.ndim != 1:
            raise InvalidRecord(f"expected a flat vector, got shape {arr.shape}", field=field)
        if arr.shape[0] != dim:
            raise InvalidRecord(f"expected {dim} values, got {arr.shape[0]}", field=field)
        if arr.dtype.kind not in "fiu":
            raise InvalidRecord(f"expected numbers, got dtype {arr.dtype}", field=field)


def validate_chunks(
    chunks: Sequence[Chunk], limits: Limits = DEFAULT_LIMITS, *, path: str = "chunks"
) -> npt.NDArray[np.float32]:
    """Check ``chunks`` and return their embeddings as an (n, dim) float32 matrix.

    The matrix is returned so that the writer does not convert the vectors a second time.
    """
    if len(chunks) > limits.max_rows_per_request:
        raise TooLarge(
            f"{len(chunks)} records, more than {limits.max_rows_per_request}", field=path
        )
    id_cap = limits.max_id_bytes
    text_cap = limits.max_text_bytes
    for i, c in enumerate(chunks):
        if type(c) is not Chunk:
            raise InvalidRecord(f"expected Chunk, got {_type_name(c)}", field=f"{path}[{i}]")
        for name in ("chunk_id", "document_id"):
            v = getattr(c, name)
            if type(v) is not str or not v:
                raise InvalidRecord(
                    f"expected a non-empty str, got {v!r:.40}", field=_path(path, i, name)
                )
            _check_text(v, id_cap, _path(path, i, name))
        if type(c.text) is not str:
            raise InvalidRecord(
                f"expected str, got {_type_name(c.text)}", field=_path(path, i, "text")
            )
        _check_text(c.text, text_cap, _path(path, i, "text"))
    return embedding_matrix(chunks, limits.dim, path=path)


# --------------------------------------------------------------------------------------------
# decoding from dicts / JSON

_T = TypeVar("_T")

# msgspec reports the location as a JSON path such as "$[3].ts" or "$[0].embedding[2]".
_AT_RE: Final = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<loc>[^`]*)`)?$", re.DOTALL)
_NAMED_FIELD_RE: Final = re.compile(r"(?:unknown|required) field `(?P<name>[^`]+)`")


def _field_from_msgspec(exc: msgspec.ValidationError, root: str) -> tuple[str, str]:
    """Split a msgspec error into (message, field path rooted at ``root``)."""
    text = str(exc)
    m = _AT_RE.match(text)
    msg, loc = (m.group("msg"), m.group("loc") or "") if m else (text, "")
    field = root + loc
    named = _NAMED_FIELD_RE.search(msg)
    if named:
        # "Object contains unknown field `x` - at `$[1]`": the culprit is the field itself.
        field = f"{field}.{named.group('name')}"
    return msg, field


def _decode(obj: object, typ: type[_T], root: str) -> _T:
    try:
        if isinstance(obj, bytes | bytearray | memoryview | str):
            return msgspec.json.decode(obj, type=typ)
        return msgspec.convert(obj, typ)
    except msgspec.ValidationError as exc:
        msg, field = _field_from_msgspec(exc, root)
        raise InvalidRecord(msg, field=field) from None
    except msgspec.DecodeError as exc:
        raise InvalidRecord(f"malformed JSON: {exc}", field=root) from None


def decode_messages(obj: object, limits: Limits = DEFAULT_LIMITS) -> tuple[Message, ...]:
    """Decode a list of message dicts (or a JSON array as bytes/str) and validate it.

    Unknown fields, missing required fields, wrong types and naive timestamps are reported as
    :class:`InvalidRecord` with ``field`` like ``messages[1].ts``.
    """
    messages = _decode(obj, tuple[Message, ...], "messages")
    validate_messages(messages, limits)
    return messages


def decode_documents(obj: object, limits: Limits = DEFAULT_LIMITS) -> tuple[Document, ...]:
    """Decode a list of document dicts (or a JSON array) and validate it."""
    documents = _decode(obj, tuple[Document, ...], "documents")
    validate_documents(documents, limits)
    return documents


def decode_chunks(obj: object, limits: Limits = DEFAULT_LIMITS) -> tuple[Chunk, ...]:
    """Decode a list of chunk dicts (or a JSON array) and validate it, embeddings included."""
    chunks = _decode(obj, tuple[Chunk, ...], "chunks")
    validate_chunks(chunks, limits)
    return chunks


def validate_message_changes(
    event_id: object, changes: object, limits: Limits = DEFAULT_LIMITS
) -> None:
    """Check a correction of one stored message; raise :class:`InvalidRecord` naming the field.

    ``changes`` maps correctable column names (:data:`CORRECTABLE_MESSAGE_FIELDS`) to new
    values, checked as :func:`validate_messages` checks the same fields; JSON values
    (``attrs``, ``pii_flags``) are encoded once here to check their size (a correction is
    rare, so unlike ingest it can afford the second encoding by the writer).
    """
    if type(event_id) is not str or not event_id:
        raise InvalidRecord("expected a non-empty str", field="event_id")
    _check_text(event_id, limits.max_id_bytes, "event_id")
    if not isinstance(changes, dict) or not changes:
        raise InvalidRecord("expected a non-empty mapping of column to value", field="changes")
    for name, value in changes.items():
        if name not in CORRECTABLE_MESSAGE_FIELDS:
            allowed = ", ".join(sorted(CORRECTABLE_MESSAGE_FIELDS))
            raise InvalidRecord(
                f"{name!r:.40} cannot be corrected (allowed: {allowed})", field="changes"
            )
        path = f"changes.{name}"
        if name in ("attrs", "pii_flags"):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise InvalidRecord(f"expected an object, got {_type_name(value)}", field=path)
            try:
                size = len(msgspec.json.encode(value))
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidRecord(f"not JSON-encodable: {exc}", field=path) from None
            if size > limits.max_json_bytes:
                raise TooLarge(f"JSON larger than {limits.max_json_bytes} bytes", field=path)
            continue
        if value is None:
            if name == "author_raw":
                raise InvalidRecord("must not be null", field=path)
            continue
        if type(value) is not str:
            raise InvalidRecord(f"expected str, got {_type_name(value)}", field=path)
        if name == "media_type" and value not in MEDIA_TYPES:
            raise InvalidRecord(
                f"must be one of {sorted(MEDIA_TYPES)} or null, got {value!r:.40}", field=path
            )
        cap = limits.max_text_bytes if name == "text" else limits.max_id_bytes
        _check_text(value, cap, path)
