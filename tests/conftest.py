"""Suite-wide options: ``--full`` selects the long variants (crash cycles, large sizes)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="run the long variants of the crash and scale tests",
    )


@pytest.fixture
def full_run(request: pytest.FixtureRequest) -> bool:
    """True when the suite runs with --full."""
    return bool(request.config.getoption("--full"))
