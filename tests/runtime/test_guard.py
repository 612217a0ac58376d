"""The loop-block guard catches a blocking call on the trio thread and passes clean code."""

from __future__ import annotations

import time

import pytest
import trio
import trio.lowlevel

from symbiote.runtime._guard import LoopBlocked, LoopGuard, guard_loop


async def test_guard_catches_a_blocking_call() -> None:
    with pytest.raises(LoopBlocked, match="blocked for"):
        with guard_loop(bound_s=0.02):
            await trio.lowlevel.checkpoint()
            time.sleep(0.06)  # noqa: ASYNC251 -- deliberately blocking, as a DuckDB call inline would
            await trio.lowlevel.checkpoint()


async def test_guard_passes_work_done_in_a_thread() -> None:
    with guard_loop(bound_s=0.02) as guard:
        await trio.to_thread.run_sync(time.sleep, 0.06)
    assert guard.max_step_s < 0.02
    assert guard.steps > 0


async def test_loop_guard_fixture_records_steps(loop_guard: LoopGuard) -> None:
    await trio.sleep(0.01)
    assert loop_guard.steps > 0


def test_the_plugin_fixture_fails_a_blocking_test(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        """
        import time, trio, pytest

        @pytest.mark.loop_bound(20)
        async def test_blocks(loop_guard):
            await trio.sleep(0)
            time.sleep(0.08)
            await trio.sleep(0)

        async def test_clean(loop_guard):
            await trio.to_thread.run_sync(time.sleep, 0.08)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*LoopBlocked*blocked for*"])
