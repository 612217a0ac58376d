"""Data contracts of vector search: the ``where`` filter, the hits, and the rows they carry.

``where`` is a :class:`SearchFilter` (or a dict that converts to one). Its fields are the whole
filter vocabulary; an unknown key or a value of the wrong type is refused with a
:class:`~symbiote.schema.errors.BadArgument` naming ``where.<field>`` (see
:func:`parse_filter`). Fields combine with AND; a list value means "any of these".

=================  =========================================  =================================
field              matches                                    column
=================  =========================================  =================================
``document_id``    str or list of str                         ``chunks.document_id``
``doc_type``       str or list of str                         ``documents.doc_type``
``status``         str or list of str                         ``documents.status``
``tags``           str or list: the document has ANY of them  ``documents.tags``
``tags_all``       list: the document has ALL of them         ``documents.tags``
``tenant_id``      str or list of str                         ``chunks.metadata ->> 'tenant_id'``
``thread_id``      str or list of str                         ``chunks.metadata ->> 'thread_id'``
``metadata``       {key: str | int | bool}, all equal         ``chunks.metadata ->> key``
``created_after``  aware datetime, inclusive                  ``documents.created_at >=``
``created_before`` aware datetime, exclusive                  ``documents.created_at <``
=================  =========================================  =================================

A document field only matches chunks whose ``document_id`` has a row in ``documents``.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any, Final

import msgspec

from .errors import BadArgument
from .records import UTCDateTime

__all__ = [
    "MAX_FILTER_VALUES",
    "ChunkRow",
    "SearchFilter",
    "SearchHits",
    "parse_filter",
]

#: Most values one filter field may list (the values become SQL parameters).
MAX_FILTER_VALUES: Final = 1_000
_MAX_VALUE_BYTES: Final = 4_096
_METADATA_KEY: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class SearchFilter(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``where`` of a search; see the module docstring for what each field matches."""

    document_id: str | list[str] | None = None
    doc_type: str | list[str] | None = None
    status: str | list[str] | None = None
    tags: str | list[str] | None = None
    tags_all: list[str] | None = None
    tenant_id: str | list[str] | None = None
    thread_id: str | list[str] | None = None
    metadata: dict[str, str | int | bool] | None = None
    created_after: UTCDateTime | None = None
    created_before: UTCDateTime | None = None

    def is_empty(self) -> bool:
        """True when no field is set (the filter matches every chunk)."""
        return all(getattr(self, name) is None for name in self.__struct_fields__)


class ChunkRow(msgspec.Struct, frozen=True, kw_only=True):
    """A chunk as stored, without its embedding (returned with ``with_rows=True``)."""

    chunk_id: str
    document_id: str
    text: str
    metadata: dict[str, Any] | None
    seq: int


class SearchHits(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a search: parallel lists, nearest first.

    ``distances`` are cosine distances (``1 - cosine similarity``). ``plan`` says how the
    answer was found: ``"hnsw"`` (the index), ``"hnsw+filter"`` (index over-fetch checked
    against DuckDB), ``"hnsw+exact"`` (while the index is still being built: its partial
    answer, checked against DuckDB, plus an exact scan of the rows it does not hold yet) or
    ``"exact"`` (a scan inside DuckDB: a very selective filter, or a snapshot still
    loading). ``fetched`` is how many index candidates were examined (0 for an exact scan).
    ``rows`` is filled when asked for.
    """

    chunk_ids: list[str]
    document_ids: list[str]
    distances: list[float]
    plan: str
    fetched: int = 0
    rows: list[ChunkRow] | None = None

    def __len__(self) -> int:
        return len(self.chunk_ids)


def _field_of(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    named = re.search(r"(?:unknown|required) field `([^`]+)`", text)
    if named:
        return f"where.{named.group(1)}"
    at = re.search(r" - at `\$\.?([^`]*)`", text)
    if at and at.group(1):
        return "where." + at.group(1).split("[")[0].split(".")[0]
    return "where"


def _check_values(name: str, value: object) -> None:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        return
    if not values:
        raise BadArgument("must not be an empty list", field=f"where.{name}")
    if len(values) > MAX_FILTER_VALUES:
        raise BadArgument(f"more than {MAX_FILTER_VALUES} values", field=f"where.{name}")
    for v in values:
        if isinstance(v, str) and len(v.encode("utf-8", "surrogatepass")) > _MAX_VALUE_BYTES:
            raise BadArgument(
                f"a value is longer than {_MAX_VALUE_BYTES} bytes", field=f"where.{name}"
            )


def parse_filter(where: object) -> SearchFilter | None:
    """``where`` (a dict, a :class:`SearchFilter` or None) as a checked filter, or None.

    Raises :class:`BadArgument` whose ``field`` is ``where.<name>`` for an unknown field, a
    value of the wrong type, an empty list, a naive datetime or a bad metadata key.
    """
    if where is None:
        return None
    if isinstance(where, SearchFilter):
        # Building a struct in Python checks no types: round-trip it through the validator.
        where = msgspec.structs.asdict(where)
    if not isinstance(where, dict):
        raise BadArgument(
            f"must be a dict or a SearchFilter, got {type(where).__name__}", field="where"
        )
    try:
        flt = msgspec.convert(where, SearchFilter)
    except msgspec.ValidationError as exc:
        message = str(exc).split(" - at ")[0]
        raise BadArgument(message, field=_field_of(exc)) from None
    for name in flt.__struct_fields__:
        _check_values(name, getattr(flt, name))
    if flt.metadata is not None:
        if not flt.metadata:
            raise BadArgument("must not be empty", field="where.metadata")
        for key in flt.metadata:
            if not _METADATA_KEY.match(key):
                raise BadArgument(
                    f"key {key!r:.70} must be an identifier of at most 64 characters",
                    field="where.metadata",
                )
    if (
        isinstance(flt.created_after, _dt.datetime)
        and isinstance(flt.created_before, _dt.datetime)
        and flt.created_after >= flt.created_before
    ):
        raise BadArgument(
            "created_after must be before created_before", field="where.created_after"
        )
    return None if flt.is_empty() else flt
