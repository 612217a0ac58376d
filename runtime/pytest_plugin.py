"""pytest plugin (entry point ``pytest11``): fixtures for testing programs built on symbiote.

Fixtures:

* ``loop_guard`` — a :class:`LoopGuard` installed for the whole test; at teardown the test
  fails if any task step blocked the loop longer than the bound. The bound is the
  ``symbiote_max_step_ms`` ini option (default 100 ms) or ``@pytest.mark.loop_bound(ms)``.
* ``symbiote_config`` — a :class:`Config` for a fresh DuckDB file in ``tmp_path`` with a small
  embedding dimension, ready to adjust with ``msgspec.structs.replace``.
* ``symbiote_runtime`` — a running runtime on ``symbiote_config``, under the loop guard.

The async fixtures need pytest-trio (``trio_mode = true`` or ``@pytest.mark.trio``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from symbiote.runtime._guard import LoopGuard

if TYPE_CHECKING:
    from symbiote.runtime._config import Config
    from symbiote.runtime._system import Runtime

# A blocking DuckDB call shows up as a step as long as the call (hundreds of ms for real
# work); 100 ms still catches that while leaving room for a garbage-collection pause on a
# loaded CI machine, which a 50 ms bound did not (seen: 51 ms on a busy 2-core box).
DEFAULT_MAX_STEP_MS = 100.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "symbiote_max_step_ms",
        "longest task step (ms) the loop_guard fixture allows",
        default=str(DEFAULT_MAX_STEP_MS),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "loop_bound(ms): longest task step the loop_guard fixture allows in this test"
    )


def _bound_ms(request: pytest.FixtureRequest) -> float:
    marker = request.node.get_closest_marker("loop_bound")
    if marker is not None:
        return float(marker.args[0])
    return float(request.config.getini("symbiote_max_step_ms"))


@pytest.fixture
async def loop_guard(request: pytest.FixtureRequest) -> AsyncIterator[LoopGuard]:
    """Fail the test if the trio loop was blocked longer than the bound."""
    guard = LoopGuard()
    trio.lowlevel.add_instrument(guard)
    try:
        yield guard
    finally:
        trio.lowlevel.remove_instrument(guard)
    guard.check(_bound_ms(request) / 1e3)


@pytest.fixture
def symbiote_config(tmp_path: Path) -> Iterator[Config]:
    """A config for a fresh database file under ``tmp_path``, dimension 16."""
    from symbiote.runtime._config import Config

    yield Config(db_path=str(tmp_path / "symbiote.duckdb"), dim=16)


@pytest.fixture
async def symbiote_runtime(
    symbiote_config: Config, loop_guard: LoopGuard
) -> AsyncIterator[Runtime]:
    """A running runtime on ``symbiote_config``; shut down after the test."""
    from symbiote.runtime._system import open_runtime

    rt: Any
    async with open_runtime(symbiote_config) as rt:
        yield rt
