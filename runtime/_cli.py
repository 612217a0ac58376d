"""The ``symbiote`` command.

``symbiote run`` starts the supervisor on the configured DuckDB file (``symbiote.toml`` and
``SYMBIOTE_*`` variables, or the flags), prints the live tree, ingests a generated chat
workload as a demonstration (``--demo-messages 0`` to skip it), queries it, and then serves
until SIGINT or SIGTERM, when it shuts the tree down in order and exits 0.
``symbiote config`` prints the effective configuration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import random
import signal
import sys
import time
from collections.abc import Sequence

import msgspec
import trio

from symbiote.runtime._config import Config
from symbiote.runtime._logging import configure_logging
from symbiote.runtime._system import Runtime, open_runtime
from symbiote.schema.errors import SymbioteError
from symbiote.schema.records import Message

__all__ = ["demo_messages", "main"]

log = logging.getLogger("symbiote.cli")


def demo_messages(n: int, *, seed: int = 7, tenants: int = 3, threads: int = 20) -> list[Message]:
    """A generated chat workload: ``n`` messages over tenants and threads, in time order."""
    rnd = random.Random(seed)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    authors = [f"author-{i}" for i in range(50)]
    out = []
    for i in range(n):
        thread = min(int(rnd.paretovariate(1.2)) - 1, threads - 1)  # a few busy threads
        author = rnd.choice(authors)
        out.append(
            Message(
                event_id=f"demo-{seed}-{i}",
                tenant_id=f"tenant-{thread % tenants}",
                source="demo",
                thread_id=f"thread-{thread}",
                msg_id=str(i),
                ts=start + dt.timedelta(seconds=i * 7),
                author_raw=author,
                author_uuid=f"uuid-{author}",
                text=f"message {i} about topic {rnd.randint(0, 40)}",
            )
        )
    return out


async def _demo(rt: Runtime, n: int) -> None:
    messages = demo_messages(n)
    t0 = time.perf_counter()
    written = duplicates = 0
    for start in range(0, n, 1000):
        ack = await rt.ingest(messages[start : start + 1000])
        written += ack.written
        duplicates += ack.duplicates
    took = time.perf_counter() - t0
    print(
        f"ingested {n:,} demo messages in {took:.2f} s"
        f" ({written:,} new, {duplicates:,} seen before)"
    )
    table = await rt.query(
        "SELECT thread_id, count(*) AS messages, count(DISTINCT author_uuid) AS authors "
        "FROM messages WHERE source = ? GROUP BY thread_id ORDER BY messages DESC LIMIT 5",
        ["demo"],
    )
    print("busiest threads:")
    for row in table.to_pylist():
        print(
            f"  {row['thread_id']:<10} {row['messages']:>7,} messages {row['authors']:>4} authors"
        )


async def _serve(config: Config, demo: int, once: bool) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_runtime(config) as rt:
            print(f"symbiote running on {config.db_path}")
            print(rt.format_tree(), flush=True)
            if demo:
                await _demo(rt, demo)
                print(rt.format_tree(), flush=True)
            if once:
                return
            print("serving; Ctrl-C or SIGTERM stops", flush=True)
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: shutting down", flush=True)
                break


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symbiote", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "start the supervisor and serve"), ("config", "print the config")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="TOML file (default: ./symbiote.toml if present)")
        p.add_argument("--db", dest="db_path", help="DuckDB file (default: symbiote.duckdb)")
        p.add_argument("--dim", type=int, help="embedding dimension")
        p.add_argument("--readers", type=int, help="reader actors")
    run = sub.choices["run"]
    run.add_argument(
        "--demo-messages",
        type=int,
        default=20_000,
        help="generated messages to ingest first (0: none)",
    )
    run.add_argument("--once", action="store_true", help="exit after the demonstration")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``symbiote`` console script."""
    args = _parser().parse_args(argv)
    try:
        config = Config.load(args.config, db_path=args.db_path, dim=args.dim, readers=args.readers)
    except SymbioteError as exc:
        print(f"symbiote: bad configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    if args.command == "config":
        print(msgspec.toml.encode(config).decode())
        return 0
    try:
        trio.run(_serve, config, max(0, args.demo_messages), args.once)
    except SymbioteError as exc:
        print(f"symbiote: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
