"""Child process of the crash test: ingest fast, log every acknowledged event_id.

    python crash_child.py DB_PATH ACK_LOG CYCLE

Each acknowledged request's ids are appended to ACK_LOG (with the ack time) by one unbuffered
``os.write`` right after the ack, so the log never claims more than was acknowledged.
Producers also resend ids of the previous cycle, as a client retrying after a crash would.
"""

from __future__ import annotations

import os
import sys
import time

import trio

from symbiote.runtime import Config, open_runtime
from tests.scenarios.chat import message

PRODUCERS = 20
PER_REQUEST = 5


async def main(db_path: str, ack_log: str, cycle: int) -> None:
    fd = os.open(ack_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    config = Config(db_path=db_path, dim=8, readers=1)
    async with open_runtime(config) as rt:

        async def producer(p: int) -> None:
            for j in range(10**9):
                base = (cycle * PRODUCERS + p) * 10**6 + j * PER_REQUEST
                batch = [message(base + k, prefix="c") for k in range(PER_REQUEST)]
                if j % 10 == 0 and cycle > 0:
                    # A retry of something the previous cycle may or may not have committed.
                    old = ((cycle - 1) * PRODUCERS + p) * 10**6 + j * PER_REQUEST
                    batch.append(message(old, prefix="c"))
                await rt.ingest(batch)
                now = time.time()
                os.write(fd, "".join(f"{m.event_id}\t{now}\n" for m in batch).encode())

        async with trio.open_nursery() as nursery:
            for p in range(PRODUCERS):
                nursery.start_soon(producer, p)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
