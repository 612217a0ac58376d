"""Kernel benchmark: what an ask costs, how fast tells flow, and what overload does.

    python bench/kernel.py [--quick]

Figures, all from the same run:

* ask round trip through an :class:`ActorRef` (p50/p99) against its anchor, a bare trio
  memory-channel request/reply with a one-shot reply channel, measured the same way;
* tell throughput to a no-op actor;
* overload: 100,000 tells offered by 100 producers to an actor that is slower than them,
  with the ``wait`` policy (senders are held back) and with ``fail`` (senders get ``Busy``):
  RSS growth and the loop's lag (how late a 1 ms ticker wakes up) while it happens.

The last stdout line is the JSON record described in DESIGN.md.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import trio
import trio.lowlevel
from _common import emit_json, percentile, print_table, rss_bytes

from symbiote.runtime import (
    Actor,
    Busy,
    ChildSpec,
    Coalescer,
    Inbox,
    SupervisorSpec,
    open_supervisor,
)


class Echo(Actor):
    async def handle(self, msg: Any) -> Any:
        return msg


class Sink(Actor):
    """Counts tells; with ``pause_every``, yields for 1 ms every so many: a slow consumer."""

    def __init__(self, pause_every: int = 0) -> None:
        self.pause_every = pause_every
        self.seen = 0

    async def run(self, inbox: Inbox) -> None:
        async for request in inbox:
            self.seen += 1
            request.reply()
            if self.pause_every and self.seen % self.pause_every == 0:
                await trio.sleep(0.001)


async def bare_round_trips(n: int) -> list[float]:
    """The anchor: a server task and one-shot reply channels, no kernel."""
    send, receive = trio.open_memory_channel[tuple[int, trio.MemorySendChannel[int]]](64)
    samples: list[float] = []

    async def server() -> None:
        async for value, reply in receive:
            reply.send_nowait(value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        for i in range(n):
            t0 = time.perf_counter()
            reply_send, reply_receive = trio.open_memory_channel[int](1)
            await send.send((i, reply_send))
            with trio.fail_after(5):
                await reply_receive.receive()
            samples.append(time.perf_counter() - t0)
        nursery.cancel_scope.cancel()
    return samples


async def ask_round_trips(n: int) -> list[float]:
    spec = SupervisorSpec(id="bench", children=(ChildSpec(id="echo", factory=Echo),))
    samples: list[float] = []
    async with open_supervisor(spec) as sup:
        ref = sup.ref("echo")
        for i in range(n):
            t0 = time.perf_counter()
            await ref.ask(i, timeout=5)
            samples.append(time.perf_counter() - t0)
    return samples


async def concurrent_calls(n: int, callers: int, coalesced: bool) -> float:
    """Calls per second from ``callers`` tasks to an echo actor: one ``ask`` per call, or
    through a :class:`Coalescer` (one ``ask`` per batch, the actor echoing the list)."""
    spec = SupervisorSpec(
        id="bench", children=(ChildSpec(id="echo", factory=Echo, mailbox=max(64, callers)),)
    )
    per = n // callers
    async with open_supervisor(spec) as sup:
        ref = sup.ref("echo")

        async def send(items: list[int], timeout: float) -> list[int]:
            echoed: list[int] = await ref.ask(items, timeout=timeout)
            return echoed

        batcher: Coalescer[int, int] = Coalescer(
            send, name="echo", max_batch=callers, max_waiting=callers
        )

        async def caller() -> None:
            for i in range(per):
                if coalesced:
                    await batcher.call(i, timeout=5)
                else:
                    await ref.ask(i, timeout=5)

        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            t0 = time.perf_counter()
            async with trio.open_nursery() as calls:
                for _ in range(callers):
                    calls.start_soon(caller)
            took = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
    return per * callers / took


async def tell_throughput(n: int) -> float:
    spec = SupervisorSpec(id="bench", children=(ChildSpec(id="sink", factory=Sink, mailbox=1024),))
    async with open_supervisor(spec) as sup:
        ref = sup.ref("sink")
        t0 = time.perf_counter()
        for _ in range(n):
            await ref.tell(None)
        await ref.ask(None, timeout=30)  # everything before it has been taken
        return n / (time.perf_counter() - t0)


async def overload(total: int, producers: int, policy: str) -> dict[str, float]:
    """Offer ``total`` tells from ``producers`` tasks to a slow actor; watch memory and lag."""
    spec = SupervisorSpec(
        id="bench",
        children=(ChildSpec(id="slow", factory=lambda: Sink(pause_every=20), mailbox=1000),),
    )
    lags: list[float] = []
    rss0 = rss_bytes()
    rss_peak = rss0
    accepted = rejected = 0
    done = trio.Event()

    async def ticker() -> None:
        nonlocal rss_peak
        while not done.is_set():
            t0 = time.perf_counter()
            await trio.sleep(0.001)
            lags.append(time.perf_counter() - t0 - 0.001)
            rss_peak = max(rss_peak, rss_bytes())

    async def producer(ref: Any, count: int) -> None:
        nonlocal accepted, rejected
        for _ in range(count):
            try:
                await ref.tell(None, overload=policy)
                accepted += 1
            except Busy:
                rejected += 1
                await trio.lowlevel.checkpoint()

    t0 = time.perf_counter()
    async with open_supervisor(spec) as sup, trio.open_nursery() as nursery:
        ref = sup.ref("slow")
        nursery.start_soon(ticker)
        async with trio.open_nursery() as offer:
            for _ in range(producers):
                offer.start_soon(producer, ref, total // producers)
        done.set()
        peak_depth = ref.peak_depth
    return {
        "seconds": time.perf_counter() - t0,
        "accepted": accepted,
        "rejected": rejected,
        "peak_depth": peak_depth,
        "rss_growth_mb": (rss_peak - rss0) / 2**20,
        "lag_p50_ms": percentile(lags, 50) * 1e3,
        "lag_p99_ms": percentile(lags, 99) * 1e3,
    }


async def main(quick: bool) -> None:
    n = 5_000 if quick else 50_000
    # Interleave anchor and kernel runs so a noisy neighbour hits both alike.
    bare: list[float] = []
    ask: list[float] = []
    for _ in range(3):
        bare += await bare_round_trips(n // 3)
        ask += await ask_round_trips(n // 3)
    asked: list[float] = []
    coalesced: list[float] = []
    for _ in range(3):
        asked.append(await concurrent_calls(n * 4, 64, coalesced=False))
        coalesced.append(await concurrent_calls(n * 4, 64, coalesced=True))
    tells_per_s = await tell_throughput(50_000 if quick else 500_000)
    wait = await overload(100_000, 100, "wait")
    fail = await overload(100_000, 100, "fail")

    us = 1e6
    print_table(
        [
            {
                "path": "bare channel req/reply",
                "p50_us": percentile(bare, 50) * us,
                "p99_us": percentile(bare, 99) * us,
            },
            {
                "path": "ActorRef.ask",
                "p50_us": percentile(ask, 50) * us,
                "p99_us": percentile(ask, 99) * us,
            },
        ],
        title=f"ask round trip ({len(ask):,} sequential calls each)",
    )
    print_table(
        [
            {"path": "ActorRef.ask per call", "calls_per_s": max(asked)},
            {"path": "Coalescer: one ask per batch", "calls_per_s": max(coalesced)},
        ],
        title="64 concurrent callers to one echo actor (best of 3, interleaved)",
    )
    print_table([{"tells_per_s": tells_per_s}], title="tell throughput (one producer)")
    print_table(
        [{"policy": "wait", **wait}, {"policy": "fail", **fail}],
        title="100,000 tells offered by 100 producers to a slow actor (mailbox 1,000)",
    )
    emit_json(
        "kernel",
        {
            "quick": quick,
            "ask_p50_us": percentile(ask, 50) * us,
            "ask_p99_us": percentile(ask, 99) * us,
            "bare_p50_us": percentile(bare, 50) * us,
            "bare_p99_us": percentile(bare, 99) * us,
            "ask_ratio_vs_bare": percentile(ask, 50) / percentile(bare, 50),
            "calls_per_s_64_ask": max(asked),
            "calls_per_s_64_coalesced": max(coalesced),
            "coalesced_ratio_vs_ask": max(coalesced) / max(asked),
            "tells_per_s": tells_per_s,
            "overload_rss_growth_mb": max(wait["rss_growth_mb"], fail["rss_growth_mb"]),
            "overload_loop_lag_p99_ms": max(wait["lag_p99_ms"], fail["lag_p99_ms"]),
            "overload_peak_depth": max(wait["peak_depth"], fail["peak_depth"]),
            "overload_fail_rejected": fail["rejected"],
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run, under 60 s")
    args = parser.parse_args()
    trio.run(main, args.quick)
