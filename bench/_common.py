"""Small helpers shared by the benchmarks in ``bench/``.

Every benchmark prints a readable table and ends its stdout with exactly one JSON line
``{"bench": "<name>", ...figures}`` (see DESIGN.md, "Benchmarks"). These helpers keep that
format uniform and give every benchmark the same seeded data, percentile and timing code, so
figures from different benchmarks are comparable.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = [
    "Stopwatch",
    "clustered_unit_vectors",
    "emit_json",
    "peak_rss_bytes",
    "percentile",
    "print_table",
    "rng",
    "rss_bytes",
    "timed",
]

DEFAULT_SEED = 20240501


def rng(seed: int = DEFAULT_SEED) -> np.random.Generator:
    """A numpy generator with the benchmarks' fixed default seed."""
    return np.random.default_rng(seed)


def clustered_unit_vectors(
    n: int,
    dim: int,
    *,
    seed: int = DEFAULT_SEED,
    world_seed: int = DEFAULT_SEED,
    latent_dim: int = 32,
    n_clusters: int = 100,
    spread: float = 1.0,
    noise: float = 0.2,
    chunk: int = 50_000,
) -> np.ndarray:
    """``n`` float32 unit vectors of ``dim`` with clustered, low-intrinsic-dimension structure.

    Isotropic noise in 768 dimensions makes all neighbours nearly equidistant (recall of any
    ANN index collapses to ~0.5 and means nothing), whereas real embeddings live near a
    low-dimensional manifold with topical clusters. So a "world" (``world_seed``) fixes
    ``n_clusters`` centres in a ``latent_dim`` space and a random projection to ``dim``; each
    point is ``project(centre + spread * N(0, 1)) + noise``, normalised. Base vectors and
    queries must share ``world_seed`` and differ in ``seed``. With the defaults the mean cosine
    of a query to its nearest neighbour is ~0.75, to its 10th ~0.67. Generated in chunks so
    1M x 768 never needs a float64 copy of the whole matrix.
    """
    world = np.random.default_rng(world_seed)
    proj = world.standard_normal((latent_dim, dim), dtype=np.float32)
    proj /= np.float32(math.sqrt(latent_dim))
    centres = world.standard_normal((n_clusters, latent_dim), dtype=np.float32)
    gen = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    noise_scale = np.float32(noise * math.sqrt(latent_dim / dim))
    for start in range(0, n, chunk):
        m = min(n, start + chunk) - start
        z = centres[gen.integers(0, n_clusters, size=m)]
        z += np.float32(spread) * gen.standard_normal((m, latent_dim), dtype=np.float32)
        block = z @ proj
        block += noise_scale * gen.standard_normal((m, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + m] = block
    return out


def percentile(values: Sequence[float] | np.ndarray, p: float) -> float:
    """The ``p``-th percentile (0-100) of ``values``; NaN when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan
    return float(np.percentile(arr, p))


class Stopwatch:
    """Wall time (``perf_counter``) since construction; ``stop()`` freezes ``seconds``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._stopped: float | None = None

    def stop(self) -> float:
        """Freeze and return the elapsed seconds."""
        if self._stopped is None:
            self._stopped = time.perf_counter() - self.start
        return self._stopped

    @property
    def seconds(self) -> float:
        """Elapsed seconds: frozen after ``stop()``, running before."""
        return self._stopped if self._stopped is not None else time.perf_counter() - self.start


@contextmanager
def timed() -> Iterator[Stopwatch]:
    """``with timed() as t: ...`` then read ``t.seconds`` (frozen at block exit)."""
    sw = Stopwatch()
    try:
        yield sw
    finally:
        sw.stop()


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, *, title: str = ""
) -> None:
    """Print ``rows`` (dicts) as an aligned text table on stdout."""
    if not rows:
        return
    cols = list(columns) if columns is not None else list(rows[0])
    cells = [[_fmt(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def emit_json(bench: str, figures: dict[str, Any]) -> None:
    """Print the benchmark's final line: ``{"bench": bench, **figures}`` as compact JSON.

    Non-finite floats become ``null`` so the line is strict JSON; call this last.
    """
    print(json.dumps({"bench": bench, **_jsonable(figures)}, separators=(",", ":")))
    sys.stdout.flush()
