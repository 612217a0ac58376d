"""Interpreter settings a runtime applies: the GIL switch interval and the GC freeze."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import msgspec
import pytest

from symbiote.runtime import Config, ConfigError, open_runtime
from symbiote.runtime._gil import switch_interval


@pytest.fixture
def host_interval() -> Iterator[float]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield 0.005
    sys.setswitchinterval(before)


def test_nested_holders_get_the_shortest_and_the_host_value_returns(host_interval: float) -> None:
    with switch_interval(0.002):
        assert sys.getswitchinterval() == pytest.approx(0.002)
        with switch_interval(0.0005):
            assert sys.getswitchinterval() == pytest.approx(0.0005)
            with switch_interval(0.003):
                assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    assert sys.getswitchinterval() == pytest.approx(host_interval)
    with switch_interval(None):
        assert sys.getswitchinterval() == pytest.approx(host_interval)


async def test_runtime_sets_it_while_open(host_interval: float, symbiote_config: Config) -> None:
    wanted = symbiote_config.gil_switch_interval_ms
    assert wanted is not None
    async with open_runtime(symbiote_config):
        assert sys.getswitchinterval() == pytest.approx(wanted / 1e3)
    assert sys.getswitchinterval() == pytest.approx(host_interval)


@pytest.mark.parametrize("value", [0, -1, float("nan"), 1e9, "fast"])
def test_bad_interval_names_the_field(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        Config(gil_switch_interval_ms=value)  # type: ignore[arg-type]
    assert info.value.field == "gil_switch_interval_ms"


@pytest.mark.parametrize("freeze", [True, False])
async def test_gc_freeze_after_start(symbiote_config: Config, freeze: bool) -> None:
    gc.unfreeze()
    config = msgspec.structs.replace(symbiote_config, gc_freeze=freeze)
    try:
        async with open_runtime(config):
            assert (gc.get_freeze_count() > 0) is freeze
    finally:
        gc.unfreeze()
