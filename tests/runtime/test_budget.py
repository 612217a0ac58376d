"""Property tests of the restart accounting (OTP intensity/period with backoff)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from symbiote.runtime import RestartBudget

gaps = st.lists(st.floats(min_value=0.0, max_value=20.0, allow_nan=False), max_size=60)


@given(
    intensity=st.integers(min_value=0, max_value=6),
    period=st.floats(min_value=0.1, max_value=30.0),
    gaps=gaps,
)
def test_budget_matches_a_sliding_window_count(
    intensity: int, period: float, gaps: list[float]
) -> None:
    budget = RestartBudget(intensity, period, 0.01, 1.0)
    now = 0.0
    accepted: list[float] = []
    for gap in gaps:
        now += gap
        delay = budget.record(now)
        # The reference model: every restart, accepted or not, counts in its window.
        in_window = [t for t in accepted if now - t < period] + [now]
        if delay is None:
            assert len(in_window) > intensity
            return  # the supervisor escalates here; nothing more is counted
        assert len(in_window) <= intensity
        accepted.append(now)
        # Backoff doubles with each restart inside the window, up to the cap.
        assert delay == min(0.01 * 2 ** (len(in_window) - 1), 1.0)


@given(
    intensity=st.integers(min_value=1, max_value=6), period=st.floats(min_value=0.1, max_value=30.0)
)
def test_restarts_further_apart_than_the_period_never_escalate(
    intensity: int, period: float
) -> None:
    budget = RestartBudget(intensity, period, 0.05, 2.0)
    for i in range(100):
        # 1.5 x the period apart: clear of float rounding at the window edge.
        assert budget.record(i * period * 1.5) == 0.05


def test_intensity_zero_allows_no_restart() -> None:
    assert RestartBudget(0, 5.0, 0.1, 1.0).record(0.0) is None
