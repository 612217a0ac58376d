"""The synchronous vector layer: an HNSW index over chunk embeddings keyed by chunk id.

:class:`VectorIndex` is a plain, *thread-confined* object: it takes no locks, and the index
actor calls it from one worker thread at a time (``trio.to_thread.run_sync`` with a
``CapacityLimiter(1)``). It is a materialised view of ``chunks.embedding``: every mutation may
carry the commit sequence it reflects, the index remembers the highest one (``highest_seq``),
and a snapshot records it so a restarted actor catches up from the rows committed after it.

Design points, each measured or forced by the libraries (see docs/vector-search.md):

* hnswlib is the default backend (20k x 768: ~2x the build speed and ~2x the QPS of usearch at
  equal recall, half the memory); usearch stays available behind the same small interface.
* External ids are strings; the library sees int labels from a counter that never goes back.
  A deleted label is never reused for another id and an update retires the old label and
  inserts a new one, so a deleted or superseded vector can never be returned under an id
  again -- not even after a snapshot reload. hnswlib's ``replace_deleted`` recycles the
  *memory slot* of a deleted element, but only once the deleted slots exceed a quarter of the
  live count (``GARBAGE_RATIO``): reusing a slot costs hnswlib ~3.5x a plain insert (it
  repairs the old element's neighbourhood; measured 667 vs 2,316 updates/s at 130k x 768), so
  bursts of updates and deletes run at insert speed while churn grows the index by at most
  ~25%.
* ``search`` takes a whole matrix of queries and makes one library call (micro-batching: the
  library runs the batch on its own threads with the GIL released).
* Snapshots: files go into a fresh ``snap-<seq>-<token>/`` directory, each fsynced, then a
  manifest with sizes and SHA-256 digests atomically replaces ``CURRENT.json``. A missing,
  partial or damaged snapshot raises :class:`SnapshotError` before any bytes reach the
  library (hnswlib can crash the process on a corrupt file), so the caller rebuilds.

:class:`MicroBatcher` (trio) is the serving loop the index actor needs: many trio callers, one
task that stacks whatever queries are pending into one ``VectorIndex.search`` call in a worker
thread.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, NamedTuple, Protocol

import msgspec
import numpy as np
import numpy.typing as npt
import trio

from symbiote.schema.errors import (
    ActorStopped,
    BadArgument,
    ConfigError,
    InvalidRecord,
    SymbioteError,
)

__all__ = [
    "AUTO_EF_FROM",
    "AUTO_EF_GROWTH",
    "AUTO_EF_MAX_FACTOR",
    "GARBAGE_RATIO",
    "Interrupted",
    "MicroBatcher",
    "SearchResult",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotIncompatible",
    "SnapshotManifest",
    "SnapshotMissing",
    "VectorChecks",
    "VectorIndex",
    "VectorParams",
    "ef_for_size",
]

log = logging.getLogger(__name__)

Metric = Literal["cosine", "ip", "l2"]
Backend = Literal["hnswlib", "usearch"]

F32Array = npt.NDArray[np.float32]
I64Array = npt.NDArray[np.int64]
ObjArray = npt.NDArray[np.object_]

SNAPSHOT_FORMAT = 1
CURRENT = "CURRENT.json"
_INDEX_FILE = "index.bin"
_IDS_FILE = "ids.msgpack"
_HASH_CHUNK = 4 << 20
_MAX_EF = 100_000
#: Deleted slots are reused only past this fraction of the live count (or _GARBAGE_FLOOR).
GARBAGE_RATIO = 0.25
_GARBAGE_FLOOR = 1024

StopCheck = Callable[[], bool]


# --------------------------------------------------------------------------- errors


class SnapshotError(SymbioteError):
    """A snapshot cannot be used; the caller should rebuild the index from the database."""

    code = "snapshot"


class SnapshotMissing(SnapshotError):
    """There is no snapshot in the directory (first start, or it was removed)."""

    code = "snapshot_missing"


class SnapshotCorrupt(SnapshotError):
    """The snapshot is partial or damaged: bad manifest, wrong size or checksum, unreadable."""

    code = "snapshot_corrupt"


class SnapshotIncompatible(SnapshotError):
    """The snapshot was built with other structural parameters (dim, metric, M, backend)."""

    code = "snapshot_incompatible"


class Interrupted(SymbioteError):
    """A long snapshot load or save gave up because its ``should_stop`` check said so."""

    code = "interrupted"


# --------------------------------------------------------------------------- params


class VectorParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Parameters of a :class:`VectorIndex`.

    ``dim``, ``metric``, ``M``, ``ef_construction`` and ``backend`` shape the graph and are
    fixed for the life of an index (a snapshot with other values is refused). ``ef_search``,
    ``ef_auto``, ``max_k`` and ``threads`` are query-time knobs and may change when a snapshot
    is loaded.

    ``ef_search`` is the default search breadth up to :data:`AUTO_EF_FROM` vectors. With
    ``ef_auto`` (the default) it grows 1.5x each time the index doubles past that size, at
    most :data:`AUTO_EF_MAX_FACTOR` times over (:func:`ef_for_size`): HNSW recall at a fixed
    ef falls as the graph grows (docs/vector-search.md has the measurements).
    """

    dim: int
    metric: Metric = "cosine"
    M: int = 16
    ef_construction: int = 128
    ef_search: int = 64
    ef_auto: bool = True
    max_k: int = 1000
    backend: Backend = "hnswlib"
    threads: int = 0
    """Library threads for batch add/search; 0 means one per core."""
    initial_capacity: int = 1024
    seed: int = 100

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("dim", 1 <= self.dim <= 65_536, "must be in [1, 65536]"),
            ("M", 2 <= self.M <= 256, "must be in [2, 256]"),
            ("ef_construction", 1 <= self.ef_construction <= 10_000, "must be in [1, 10000]"),
            ("ef_search", 1 <= self.ef_search <= _MAX_EF, f"must be in [1, {_MAX_EF}]"),
            ("max_k", 1 <= self.max_k <= _MAX_EF, f"must be in [1, {_MAX_EF}]"),
            ("threads", self.threads >= 0, "must be >= 0"),
            ("initial_capacity", self.initial_capacity >= 1, "must be >= 1"),
        ]
        for field, ok, why in checks:
            if not ok:
                raise ConfigError(why, field=field)

    def structural(self) -> tuple[object, ...]:
        """The values a snapshot must share with the caller's params to be reusable."""
        return (self.backend, self.dim, self.metric, self.M, self.ef_construction)

    @property
    def num_threads(self) -> int:
        """``threads`` resolved to a positive count."""
        return self.threads or (os.cpu_count() or 1)


#: Index size up to which ``ef_search`` is the default ef unchanged (see :func:`ef_for_size`).
AUTO_EF_FROM: Final = 500_000
#: The size-scaled default ef grows by this factor for each doubling past AUTO_EF_FROM ...
AUTO_EF_GROWTH: Final = 1.5
#: ... and is at most this multiple of ``ef_search``.
AUTO_EF_MAX_FACTOR: Final = 8


def ef_for_size(params: VectorParams, size: int) -> int:
    """The default ef for an index of ``size`` vectors under ``params``.

    ``params.ef_search`` up to :data:`AUTO_EF_FROM` vectors (or always, without ``ef_auto``);
    beyond, 1.5 times more for each doubling of the size, at most 8 times ``ef_search``: with
    the default 64, 96 up to 1,000,000 vectors, 144 up to 2,000,000. Measured at 1,000,000 x
    768 (M=16, ef_construction=128): recall@10 0.949 at ef=64, 0.975 at 96, 0.983 at 128,
    for a raw batch rate of 2,697 / 2,055 / 1,688 queries/s (docs/vector-search.md).
    """
    base = params.ef_search
    if not params.ef_auto or size <= AUTO_EF_FROM:
        return base
    factor = 1.0
    span = AUTO_EF_FROM
    while span < size and factor < AUTO_EF_MAX_FACTOR:
        factor = min(AUTO_EF_MAX_FACTOR, factor * AUTO_EF_GROWTH)
        span *= 2
    return min(_MAX_EF, math.ceil(base * factor))


class SearchResult(NamedTuple):
    """Ids (object array of str, ``None`` where fewer than k were found) and distances.

    Both have shape ``(q, k')`` with ``k' = min(k, len(index))``, rows sorted by distance;
    missing slots have distance ``inf``. Cosine distance is ``1 - cosine similarity``.
    """

    ids: ObjArray
    distances: F32Array


class FileDigest(msgspec.Struct, frozen=True):
    """Size and SHA-256 of one snapshot file."""

    size: int
    sha256: str


class SnapshotManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What ``CURRENT.json`` says about the current snapshot."""

    format: int
    directory: str
    params: VectorParams
    highest_seq: int
    count: int
    next_label: int
    free_slots: int
    files: dict[str, FileDigest]
    created_at: float
    library: str


class _IdTable(msgspec.Struct, array_like=True):
    labels: list[int]
    ids: list[str]


# --------------------------------------------------------------------------- backends


class _Backend(Protocol):
    name: ClassVar[str]

    @property
    def capacity(self) -> int: ...

    def reserve(self, capacity: int) -> None: ...

    def add(self, labels: I64Array, vectors: F32Array, *, reuse: bool) -> None:
        """Insert; ``reuse`` lets the library put them into deleted elements' slots."""
        ...

    def remove(self, labels: I64Array) -> None: ...

    def search(self, queries: F32Array, k: int, ef: int) -> tuple[I64Array, F32Array]:
        """Labels (-1 where missing) and distances (inf where missing), shape (q, k)."""
        ...

    def save(self, path: Path) -> None: ...

    def load(self, path: Path, capacity: int) -> None: ...

    def version(self) -> str: ...


class _Hnswlib:
    name: ClassVar[str] = "hnswlib"
    _SPACES: ClassVar[dict[str, str]] = {"cosine": "cosine", "ip": "ip", "l2": "l2"}

    def __init__(self, params: VectorParams, capacity: int) -> None:
        import hnswlib

        self._p = params
        self._idx: Any = hnswlib.Index(space=self._SPACES[params.metric], dim=params.dim)
        if capacity == 0:
            return  # load() fills it; an init_index here would be thrown away
        self._idx.init_index(
            max_elements=capacity,
            M=params.M,
            ef_construction=params.ef_construction,
            random_seed=params.seed,
            allow_replace_deleted=True,
        )
        self._idx.set_num_threads(params.num_threads)

    @property
    def capacity(self) -> int:
        return int(self._idx.get_max_elements())

    def reserve(self, capacity: int) -> None:
        if capacity > self.capacity:
            self._idx.resize_index(capacity)

    def add(self, labels: I64Array, vectors: F32Array, *, reuse: bool) -> None:
        self._idx.add_items(vectors, labels, num_threads=self._p.num_threads, replace_deleted=reuse)

    def remove(self, labels: I64Array) -> None:
        for label in labels.tolist():
            self._idx.mark_deleted(label)

    def search(self, queries: F32Array, k: int, ef: int) -> tuple[I64Array, F32Array]:
        self._idx.set_ef(max(ef, k))
        try:
            labels, dist = self._idx.knn_query(queries, k=k, num_threads=self._p.num_threads)
            return labels.astype(np.int64, copy=False), dist.astype(np.float32, copy=False)
        except RuntimeError:
            # hnswlib refuses a batch when any query finds fewer than k live elements (many
            # deletes, tiny index); answer row by row with as many as each row can get.
            return self._search_ragged(queries, k)

    def _search_ragged(self, queries: F32Array, k: int) -> tuple[I64Array, F32Array]:
        labels = np.full((len(queries), k), -1, dtype=np.int64)
        dist = np.full((len(queries), k), np.inf, dtype=np.float32)
        for row, query in enumerate(queries):
            kk = k
            while kk > 0:
                try:
                    lab, d = self._idx.knn_query(query[None, :], k=kk, num_threads=1)
                except RuntimeError:
                    kk //= 2
                    continue
                labels[row, :kk] = lab[0]
                dist[row, :kk] = d[0]
                break
        return labels, dist

    def save(self, path: Path) -> None:
        self._idx.save_index(str(path))

    def load(self, path: Path, capacity: int) -> None:
        self._idx.load_index(str(path), max_elements=capacity, allow_replace_deleted=True)
        self._idx.set_num_threads(self._p.num_threads)

    def version(self) -> str:
        from importlib.metadata import version

        return f"hnswlib {version('hnswlib')}"


class _Usearch:
    name: ClassVar[str] = "usearch"
    _METRICS: ClassVar[dict[str, str]] = {"cosine": "cos", "ip": "ip", "l2": "l2sq"}

    def __init__(self, params: VectorParams, capacity: int) -> None:
        from usearch.index import Index

        self._p = params
        self._idx: Any = Index(
            ndim=params.dim,
            metric=self._METRICS[params.metric],
            dtype="f32",
            connectivity=params.M,
            expansion_add=params.ef_construction,
            expansion_search=params.ef_search,
        )
        self._capacity = capacity

    @property
    def capacity(self) -> int:
        return self._capacity

    def reserve(self, capacity: int) -> None:
        # usearch grows by itself; only the bookkeeping follows.
        self._capacity = max(self._capacity, capacity)

    def add(self, labels: I64Array, vectors: F32Array, *, reuse: bool) -> None:
        # usearch manages the memory of removed entries itself; ``reuse`` is hnswlib's knob.
        self._idx.add(labels.astype(np.uint64), vectors, threads=self._p.num_threads)

    def remove(self, labels: I64Array) -> None:
        self._idx.remove(labels.astype(np.uint64))

    def search(self, queries: F32Array, k: int, ef: int) -> tuple[I64Array, F32Array]:
        self._idx.expansion_search = max(ef, k)
        m = self._idx.search(queries, k, threads=self._p.num_threads)
        keys = np.full((len(queries), k), -1, dtype=np.int64)
        dist = np.full((len(queries), k), np.inf, dtype=np.float32)
        found_keys = np.asarray(m.keys).reshape(len(queries), -1)
        keys[:, : found_keys.shape[1]] = found_keys
        dist[:, : found_keys.shape[1]] = np.asarray(m.distances).reshape(len(queries), -1)
        # A one-row query comes back as ``Matches`` (already trimmed to what was found), a
        # batch as ``BatchMatches`` with per-row ``counts``.
        counts = np.asarray(m.counts if hasattr(m, "counts") else [len(m)]).reshape(-1)
        missing = np.arange(keys.shape[1])[None, :] >= counts[:, None]
        keys[missing] = -1
        dist[missing] = np.inf
        return keys, dist

    def save(self, path: Path) -> None:
        self._idx.save(str(path))

    def load(self, path: Path, capacity: int) -> None:
        self._idx.load(str(path))
        self._capacity = capacity

    def version(self) -> str:
        from importlib.metadata import version

        return f"usearch {version('usearch')}"


def _make_backend(params: VectorParams, capacity: int) -> _Backend:
    if params.backend == "usearch":
        return _Usearch(params, capacity)
    return _Hnswlib(params, capacity)


# --------------------------------------------------------------------------- helpers


def _sha256(path: Path, should_stop: StopCheck | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            # Hashing gigabytes takes seconds: a stopping owner should not wait for it.
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped while hashing {path.name}", field="should_stop")
            h.update(chunk)
    return h.hexdigest()


#: Whether snapshot files are written by a forked child process by default (see
#: :func:`_write_in_child`). Only where ``fork`` is the platform's own (Linux).
FORK_SAVES: Final = sys.platform == "linux" and hasattr(os, "fork")
#: How often the parent checks ``should_stop`` while the child writes.
_CHILD_POLL_S = 0.05
#: Longest a snapshot writer process may run before it is killed and the save fails (the
#: previous snapshot stays current). A save took 11 s at 1,000,000 x 768; a child that never
#: ends (say, a lock some other thread held at the fork) must not hold the owner forever.
CHILD_LIMIT_S: Final = 900.0


def _write_in_child(
    write: Callable[[], None],
    should_stop: StopCheck | None = None,
    on_forked: Callable[[], None] | None = None,
    limit_s: float = CHILD_LIMIT_S,
) -> None:
    """Run ``write`` in a forked child process and wait for it (blocking; call from a worker
    thread).

    hnswlib's ``save_index`` holds the GIL for the whole write (10.4 s at 1,000,000 x 768):
    every Python thread, the event loop included, would stop. The child gets a copy-on-write
    image of the index as of the fork and writes it while this process runs on; the fork
    itself holds the GIL for the page-table copy only. The child touches nothing but the
    index and the files (no locks other threads may hold: no logging, no imports), and leaves
    with ``os._exit``. ``on_forked`` is called in this process once the child exists (what
    it writes is fixed from then on). ``should_stop`` is polled while waiting; if it says
    stop, the child is killed and :class:`Interrupted` raised; past ``limit_s`` it is killed
    and ``OSError`` raised.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child process
        os.close(read_end)
        status = 0
        try:
            write()
        except BaseException as exc:  # reported to the parent, then exit
            os.write(write_end, repr(exc).encode()[:4096])
            status = 1
        os._exit(status)
    os.close(write_end)
    try:
        if on_forked is not None:
            on_forked()
        deadline = time.monotonic() + limit_s
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if should_stop is not None and should_stop():
                _kill(pid)
                raise Interrupted("stopped while writing a snapshot", field="should_stop")
            if time.monotonic() > deadline:
                _kill(pid)
                raise OSError(f"snapshot writer process did not finish within {limit_s:g} s")
            time.sleep(_CHILD_POLL_S)
        message = os.read(read_end, 4096).decode(errors="replace")
    finally:
        os.close(read_end)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        why = message or f"wait status {status}"
        raise OSError(f"snapshot writer process failed: {why}")


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _check_seq(seq: int | None) -> None:
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
        raise BadArgument("must be a non-negative int", field="seq")


# --------------------------------------------------------------------------- the index


class VectorChecks:
    """Input validation that depends only on :class:`VectorParams` (safe from any thread).

    :class:`VectorIndex` inherits it; the index actor also uses it on its own to refuse bad
    queries while the index is still being loaded or built.
    """

    def __init__(self, params: VectorParams) -> None:
        self._params = params

    @property
    def params(self) -> VectorParams:
        """The parameters the checks follow."""
        return self._params

    def check_vectors(self, vectors: object, *, field: str = "vectors") -> F32Array:
        """``vectors`` as a C-contiguous float32 ``(n, dim)`` array, or a typed error.

        A 1-D array is taken as one vector. Rejects a wrong dimension, non-numeric data,
        NaN/inf components and, under cosine, all-zero vectors (they have no direction).
        """
        dim = self._params.dim
        if (
            type(vectors) is np.ndarray
            and vectors.dtype == np.float32
            and vectors.ndim == 2
            and vectors.shape[1] == dim
            and vectors.flags.c_contiguous
        ):
            # Fast path, accept-only: one pass of row dot products. NaN/inf components make
            # a row's product NaN/inf and only a zero row gives 0; anything doubtful
            # (including a finite row whose product overflows) goes through the full checks
            # below, which name the row.
            norm2 = np.einsum("ij,ij->i", vectors, vectors)
            if np.isfinite(norm2).all() and (
                self._params.metric != "cosine" or bool((norm2 > 0).all())
            ):
                return vectors
        try:
            arr = np.asarray(vectors)
        except (TypeError, ValueError) as exc:
            raise InvalidRecord(f"not an array of numbers ({exc})", field=field) from None
        if arr.dtype == np.bool_ or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise InvalidRecord(f"must be real numbers, got dtype {arr.dtype}", field=field)
        shape = arr.shape
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise InvalidRecord(f"expected shape (n, {dim}), got {shape}", field=field)
        out = np.ascontiguousarray(arr, dtype=np.float32)
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise InvalidRecord(f"row {row} has NaN or infinite components", field=field)
        if self._params.metric == "cosine" and len(out):
            with np.errstate(over="ignore"):  # an overflowing norm is inf: still non-zero
                norms = np.linalg.norm(out, axis=1)
            zero = ~(norms > 0)
            if zero.any():
                row = int(np.flatnonzero(zero)[0])
                raise InvalidRecord(
                    f"row {row} is an all-zero vector, undefined under cosine", field=field
                )
        return out

    def check_k(self, k: object) -> int:
        """``k`` if it is an int in ``[1, max_k]``, else ``BadArgument(field='k')``."""
        if not isinstance(k, int | np.integer) or isinstance(k, bool):
            raise BadArgument(f"must be an int, got {type(k).__name__}", field="k")
        if not 1 <= int(k) <= self._params.max_k:
            raise BadArgument(f"must be in [1, {self._params.max_k}], got {k}", field="k")
        return int(k)

    def check_ef(self, ef: object, size: int = 0) -> int:
        """``ef`` checked to be an int in range; ``None`` is the default for ``size`` vectors
        (:func:`ef_for_size`)."""
        if ef is None:
            return ef_for_size(self._params, size)
        if not isinstance(ef, int | np.integer) or isinstance(ef, bool):
            raise BadArgument(f"must be an int, got {type(ef).__name__}", field="ef")
        if not 1 <= int(ef) <= _MAX_EF:
            raise BadArgument(f"must be in [1, {_MAX_EF}], got {ef}", field="ef")
        return int(ef)


class VectorIndex(VectorChecks):
    """An HNSW index of vectors keyed by string ids (chunk ids); not thread-safe by design.

    Mutations are validated completely before the library is touched, so a bad call raises a
    typed error (``InvalidRecord``/``BadArgument`` with ``field``) and leaves the index as it
    was. Capacity grows automatically (doubling).
    """

    def __init__(self, params: VectorParams) -> None:
        super().__init__(params)
        self._backend = _make_backend(params, params.initial_capacity)
        self._id_to_label: dict[str, int] = {}
        self._label_to_id: ObjArray = np.full(params.initial_capacity, None, dtype=object)
        self._next_label = 0
        self._free_slots = 0
        self._highest_seq = 0

    # -- introspection

    @property
    def highest_seq(self) -> int:
        """The highest commit sequence applied to this index (0 when none)."""
        return self._highest_seq

    @property
    def capacity(self) -> int:
        """Element slots currently allocated by the library."""
        return self._backend.capacity

    def __len__(self) -> int:
        return len(self._id_to_label)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._id_to_label

    def ids(self) -> list[str]:
        """The live ids, in no particular order."""
        return list(self._id_to_label)

    def advance_seq(self, seq: int) -> None:
        """Record that commits up to ``seq`` are reflected (e.g. commits without chunks)."""
        _check_seq(seq)
        self._highest_seq = max(self._highest_seq, seq)

    def _check_ids(self, ids: object, n: int) -> list[str]:
        if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
            raise InvalidRecord("must be a sequence of str", field="ids")
        out = list(ids)
        for i, cid in enumerate(out):
            if not isinstance(cid, str) or not cid:
                raise InvalidRecord(f"item {i} is not a non-empty str", field="ids")
        if len(out) != n:
            raise InvalidRecord(f"{len(out)} ids for {n} vectors", field="ids")
        if len(set(out)) != len(out):
            raise InvalidRecord("duplicate ids in one call", field="ids")
        return out

    # -- mutations

    def add(self, ids: Sequence[str], vectors: object, *, seq: int | None = None) -> None:
        """Insert or replace the vectors of ``ids`` (idempotent: replaying a commit is safe).

        A replaced id gets a new internal label and its old one is deleted, so the old vector
        can never be returned again.
        """
        arr = self.check_vectors(vectors)
        id_list = self._check_ids(ids, len(arr))
        _check_seq(seq)
        if id_list:
            stale = np.asarray(
                [self._id_to_label[c] for c in id_list if c in self._id_to_label], dtype=np.int64
            )
            labels = np.arange(self._next_label, self._next_label + len(id_list), dtype=np.int64)
            reuse = self._free_slots > max(_GARBAGE_FLOOR, int(len(self) * GARBAGE_RATIO))
            self._ensure_capacity(len(id_list), reuse=reuse)
            # New labels go in before the old ones are retired: if the library fails midway,
            # every id still resolves to one vector (old or new), never to none.
            self._backend.add(labels, arr, reuse=reuse)
            if reuse:
                self._free_slots -= min(self._free_slots, len(id_list))
            self._next_label += len(id_list)
            self._grow_label_table(self._next_label)
            if len(stale):
                self._backend.remove(stale)
                self._label_to_id[stale] = None
                self._free_slots += len(stale)
            self._label_to_id[labels] = np.asarray(id_list, dtype=object)
            self._id_to_label.update(zip(id_list, labels.tolist(), strict=True))
        if seq is not None:
            self._highest_seq = max(self._highest_seq, seq)

    def update(self, ids: Sequence[str], vectors: object, *, seq: int | None = None) -> None:
        """Same as :meth:`add` (an upsert); named for call sites that mean an update."""
        self.add(ids, vectors, seq=seq)

    def delete(self, ids: Iterable[str], *, seq: int | None = None) -> int:
        """Delete ``ids``; unknown ids are ignored. Returns how many were deleted."""
        if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
            raise InvalidRecord("must be a sequence of str", field="ids")
        id_list = list(ids)
        if any(not isinstance(c, str) for c in id_list):
            raise InvalidRecord("must be a sequence of str", field="ids")
        _check_seq(seq)
        labels = [self._id_to_label[c] for c in dict.fromkeys(id_list) if c in self._id_to_label]
        if labels:
            self._retire(np.asarray(labels, dtype=np.int64))
        if seq is not None:
            self._highest_seq = max(self._highest_seq, seq)
        return len(labels)

    def _retire(self, labels: I64Array) -> None:
        self._backend.remove(labels)
        for cid in self._label_to_id[labels].tolist():
            del self._id_to_label[cid]
        self._label_to_id[labels] = None
        self._free_slots += len(labels)

    @property
    def free_slots(self) -> int:
        """Slots of deleted elements still allocated (reused past ``GARBAGE_RATIO``)."""
        return self._free_slots

    def _ensure_capacity(self, n: int, *, reuse: bool) -> None:
        used = len(self._id_to_label) + self._free_slots
        need = used + (max(0, n - self._free_slots) if reuse else n)
        cap = self._backend.capacity
        if need > cap:
            new_cap = max(need, cap * 2)
            log.debug("vector index grows from %d to %d slots", cap, new_cap)
            self._backend.reserve(new_cap)

    def _grow_label_table(self, size: int) -> None:
        if size > len(self._label_to_id):
            grown = np.full(max(size, 2 * len(self._label_to_id)), None, dtype=object)
            grown[: len(self._label_to_id)] = self._label_to_id
            self._label_to_id = grown

    # -- search

    def search(self, queries: object, k: int, ef: int | None = None) -> SearchResult:
        """The ``k`` nearest ids of every row of ``queries`` in ONE library call.

        ``queries`` is ``(q, dim)`` (a 1-D vector is one query); ``ef`` defaults to
        :func:`ef_for_size` of the index's size and is raised to ``k`` if smaller.
        """
        arr = self.check_vectors(queries, field="queries")
        return self.search_checked(arr, self.check_k(k), self.check_ef(ef, len(self)))

    def search_checked(self, queries: F32Array, k: int, ef: int) -> SearchResult:
        """:meth:`search` for queries already checked row by row (``check_vectors``, ``check_k``,
        ``check_ef``): a C-contiguous float32 ``(q, dim)`` matrix.

        The index actor validates each query when it arrives, so one bad query fails alone;
        checking the stacked batch again cost ~5% of a 64-query call at 20,000 x 768.
        """
        kk = min(k, len(self._id_to_label))
        if kk == 0 or len(queries) == 0:
            return SearchResult(
                np.empty((len(queries), kk), dtype=object),
                np.empty((len(queries), kk), np.float32),
            )
        labels, dist = self._backend.search(queries, kk, ef)
        ids: ObjArray = np.full(labels.shape, None, dtype=object)
        valid = (labels >= 0) & (labels < len(self._label_to_id))
        ids[valid] = self._label_to_id[labels[valid]]
        # The libraries never return a deleted label; mapping retired labels to None anyway
        # means no library quirk can resurrect a deleted id. Ids are non-empty strings, so
        # truthiness is exactly "is not None".
        alive = ids.astype(bool)
        if not alive.all():
            ids, dist = _compact(ids, dist, alive)
        return SearchResult(ids.astype(object, copy=False), dist.astype(np.float32, copy=False))

    # -- snapshots

    def save(
        self,
        directory: str | os.PathLike[str],
        *,
        should_stop: StopCheck | None = None,
        in_child: bool = FORK_SAVES,
        on_image: Callable[[], None] | None = None,
    ) -> Path:
        """Write a snapshot under ``directory`` atomically; returns the snapshot's folder.

        The previous snapshot stays valid until the new manifest has replaced
        ``CURRENT.json``, and is removed after that. ``should_stop`` is polled while the
        files are written and hashed; when it returns True the partial snapshot is removed
        and :class:`Interrupted` raised (the previous snapshot stays current).
        ``in_child`` writes the index and id files from a forked process, so the library's
        GIL-holding save does not stop this process's threads (the default on Linux).

        The caller must keep the index unchanged until ``on_image`` is called (from the
        calling thread): the snapshot holds the index as it was then. With ``in_child`` that
        is right after the fork, so changes may go on while the child writes.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        snap = root / f"snap-{self._highest_seq:012d}-{secrets.token_hex(4)}"
        snap.mkdir()
        # The manifest describes the files: its figures are taken with the files' content.
        highest_seq, count = self._highest_seq, len(self._id_to_label)
        next_label, free_slots = self._next_label, self._free_slots
        try:
            write = functools.partial(self._write_files, snap)
            if in_child:
                _write_in_child(write, should_stop, on_image)
            else:
                write()
                if on_image is not None:
                    on_image()
            files: dict[str, FileDigest] = {}
            for name in (_INDEX_FILE, _IDS_FILE):
                path = snap / name
                _fsync_file(path)
                files[name] = FileDigest(
                    size=path.stat().st_size, sha256=_sha256(path, should_stop)
                )
            _fsync_dir(snap)
            manifest = SnapshotManifest(
                format=SNAPSHOT_FORMAT,
                directory=snap.name,
                params=self._params,
                highest_seq=highest_seq,
                count=count,
                next_label=next_label,
                free_slots=free_slots,
                files=files,
                created_at=time.time(),
                library=self._backend.version(),
            )
            _write_atomic(root / CURRENT, msgspec.json.encode(manifest))
        except BaseException:
            shutil.rmtree(snap, ignore_errors=True)
            raise
        for old in root.glob("snap-*"):
            if old.name != snap.name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        log.info("vector snapshot %s: %d vectors, seq %d", snap, count, highest_seq)
        return snap

    def _write_files(self, snap: Path) -> None:
        self._backend.save(snap / _INDEX_FILE)
        labels = list(self._id_to_label.values())
        table = _IdTable(labels=labels, ids=list(self._id_to_label))
        (snap / _IDS_FILE).write_bytes(msgspec.msgpack.encode(table))

    @staticmethod
    def read_manifest(directory: str | os.PathLike[str]) -> SnapshotManifest:
        """The manifest of the current snapshot, or ``SnapshotMissing``/``SnapshotCorrupt``."""
        path = Path(directory) / CURRENT
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise SnapshotMissing(f"no {CURRENT} in {directory}", field="directory") from None
        try:
            manifest = msgspec.json.decode(raw, type=SnapshotManifest)
        except (msgspec.DecodeError, ConfigError) as exc:
            raise SnapshotCorrupt(f"unreadable manifest: {exc}", field="manifest") from None
        if manifest.format != SNAPSHOT_FORMAT:
            raise SnapshotIncompatible(
                f"snapshot format {manifest.format}, expected {SNAPSHOT_FORMAT}", field="format"
            )
        return manifest

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        params: VectorParams | None = None,
        *,
        should_stop: StopCheck | None = None,
    ) -> VectorIndex:
        """Load the current snapshot in ``directory``, verified before the library reads it.

        With ``params``, the snapshot's structural parameters must match them (else
        ``SnapshotIncompatible``) and the query-time ones (``ef_search``, ``max_k``,
        ``threads``) are taken from ``params``. Raises a :class:`SnapshotError` subclass when
        the caller should rebuild instead, and :class:`Interrupted` if ``should_stop`` (polled
        while the files are verified) returned True.
        """
        root = Path(directory)
        manifest = cls.read_manifest(root)
        if params is not None and params.structural() != manifest.params.structural():
            raise SnapshotIncompatible(
                f"snapshot has {manifest.params.structural()}, wanted {params.structural()}",
                field="params",
            )
        use = params if params is not None else manifest.params
        snap = root / manifest.directory
        if Path(manifest.directory).name != manifest.directory or not snap.is_dir():
            raise SnapshotCorrupt(f"snapshot folder {manifest.directory!r} missing", field="files")
        for name in (_INDEX_FILE, _IDS_FILE):
            digest = manifest.files.get(name)
            path = snap / name
            if digest is None or not path.is_file():
                raise SnapshotCorrupt(f"{name} missing", field="files")
            size = path.stat().st_size
            if size != digest.size:
                raise SnapshotCorrupt(
                    f"{name} has {size} bytes, expected {digest.size}", field=name
                )
            if _sha256(path, should_stop) != digest.sha256:
                raise SnapshotCorrupt(f"{name} checksum mismatch", field=name)
        try:
            table = msgspec.msgpack.decode((snap / _IDS_FILE).read_bytes(), type=_IdTable)
        except msgspec.DecodeError as exc:
            raise SnapshotCorrupt(f"unreadable id table: {exc}", field=_IDS_FILE) from None
        if len(table.ids) != manifest.count or len(table.labels) != manifest.count:
            raise SnapshotCorrupt("id table does not match the manifest count", field=_IDS_FILE)

        self = cls.__new__(cls)
        self._params = use
        self._backend = _make_backend(use, 0)
        capacity = max(use.initial_capacity, manifest.count + manifest.free_slots)
        try:
            self._backend.load(snap / _INDEX_FILE, capacity)
        except (RuntimeError, ValueError, OSError) as exc:
            raise SnapshotCorrupt(f"library refused the index: {exc}", field=_INDEX_FILE) from None
        self._next_label = manifest.next_label
        self._free_slots = manifest.free_slots
        self._highest_seq = manifest.highest_seq
        self._label_to_id = np.full(max(manifest.next_label, 1), None, dtype=object)
        if table.labels:
            labels = np.asarray(table.labels, dtype=np.int64)
            if labels.min() < 0 or labels.max() >= manifest.next_label:
                raise SnapshotCorrupt("label out of range", field=_IDS_FILE)
            self._label_to_id[labels] = np.asarray(table.ids, dtype=object)
        self._id_to_label = dict(zip(table.ids, table.labels, strict=True))
        if len(self._id_to_label) != manifest.count:
            raise SnapshotCorrupt("duplicate ids in the id table", field=_IDS_FILE)
        log.info("vector snapshot %s loaded: %d vectors, seq %d", snap, len(self), self.highest_seq)
        return self


def _compact(
    ids: ObjArray, dist: F32Array, alive: npt.NDArray[np.bool_]
) -> tuple[ObjArray, F32Array]:
    """Move the live entries of each row to its front, padding with None / inf."""
    out_ids = np.full(ids.shape, None, dtype=object)
    out_dist = np.full(dist.shape, np.inf, dtype=np.float32)
    for row in range(ids.shape[0]):
        keep = alive[row]
        n = int(keep.sum())
        out_ids[row, :n] = ids[row][keep]
        out_dist[row, :n] = dist[row][keep]
    return out_ids, out_dist


# --------------------------------------------------------------------------- micro-batching


class _Pending:
    __slots__ = ("done", "ef", "error", "k", "query", "result")

    def __init__(self, query: F32Array, k: int, ef: int) -> None:
        self.query = query
        self.k = k
        self.ef = ef
        self.done = trio.Event()
        self.result: SearchResult | None = None
        self.error: BaseException | None = None


class MicroBatcher:
    """Many trio callers, one library call: stacks pending queries into one ``search``.

    Run :meth:`serve` in a nursery; callers ``await batcher.search(vector, k)``. While one
    batch runs in a worker thread, new queries queue in a bounded channel and the next batch
    takes all of them (up to ``max_batch``), so the batch size follows the load with no timer
    and a lone caller pays no waiting. Queries are validated in the caller's task, so one bad
    query fails alone. Pass the index actor's ``CapacityLimiter(1)`` as ``limiter`` so
    searches and mutations never touch the index from two threads at once.
    """

    def __init__(
        self,
        index: VectorIndex,
        *,
        max_batch: int = 256,
        queue_size: int = 1024,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        if max_batch < 1:
            raise ConfigError("must be >= 1", field="max_batch")
        self._index = index
        self._max_batch = max_batch
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(1)
        send, recv = trio.open_memory_channel[_Pending](queue_size)
        self._send = send
        self._recv = recv
        self._inflight: list[_Pending] = []
        self.batches = 0
        self.queries = 0

    @property
    def mean_batch(self) -> float:
        """Average number of queries per library call so far."""
        return self.queries / self.batches if self.batches else math.nan

    async def search(self, query: object, k: int, ef: int | None = None) -> SearchResult:
        """Queue one query (``(dim,)`` or ``(1, dim)``) and wait for its row of results."""
        arr = self._index.check_vectors(query, field="queries")
        if len(arr) != 1:
            raise InvalidRecord("expected exactly one query vector", field="queries")
        ef_ = self._index.check_ef(ef, len(self._index))
        pending = _Pending(arr[0], self._index.check_k(k), ef_)
        try:
            await self._send.send(pending)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ActorStopped("the vector search loop is not running") from None
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The batching loop; runs until cancelled or :meth:`close` is called."""
        task_status.started()
        try:
            await self._loop()
        finally:
            # Nobody may wait forever: answer what was taken but not served and what is still
            # queued with ActorStopped (the caller's typed "actor went away").
            stopped = ActorStopped("the vector search loop stopped")
            leftovers = self._inflight
            self._inflight = []
            with contextlib.suppress(trio.ClosedResourceError):
                while True:
                    try:
                        leftovers.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
            self._recv.close()
            for p in leftovers:
                if not p.done.is_set():
                    p.error = stopped
                    p.done.set()

    async def _loop(self) -> None:
        while True:
            # Take a queued query without a checkpoint: the callers just answered are
            # already runnable, and yielding to them here would make them run before the
            # next batch is handed to the thread instead of while it runs.
            try:
                first = self._recv.receive_nowait()
            except trio.WouldBlock:
                try:
                    first = await self._recv.receive()
                except trio.EndOfChannel:
                    return
            except trio.EndOfChannel:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            self._inflight = batch
            groups: dict[int, list[_Pending]] = {}
            for p in batch:
                groups.setdefault(p.ef, []).append(p)
            for ef, group in groups.items():
                await self._run(group, ef)
            self._inflight = []

    async def _run(self, group: list[_Pending], ef: int) -> None:
        k = max(p.k for p in group)
        queries = np.stack([p.query for p in group])
        try:
            res = await trio.to_thread.run_sync(
                self._index.search, queries, k, ef, limiter=self._limiter
            )
        except Exception as exc:
            for p in group:
                p.error = exc
                p.done.set()
            return
        self.batches += 1
        self.queries += len(group)
        for row, p in enumerate(group):
            p.result = SearchResult(
                res.ids[row : row + 1, : p.k], res.distances[row : row + 1, : p.k]
            )
            p.done.set()

    async def close(self) -> None:
        """Stop taking queries; :meth:`serve` returns once the queue is drained."""
        with contextlib.suppress(trio.ClosedResourceError):
            await self._send.aclose()
