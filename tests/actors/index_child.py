"""Child process of the index crash tests: run a runtime until the parent SIGKILLs it.

    python index_child.py ingest DB_PATH ACK_LOG   # upsert/update/delete chunks, log each ack
    python index_child.py build DB_PATH ACK_LOG    # open (which builds the index) and idle

Both modes snapshot the index often, so a kill lands between, during or after snapshot saves.
"""

from __future__ import annotations

import os
import sys

import trio

from symbiote.runtime import Config, open_runtime
from tests.actors.index_data import DIM, SLOTS, chunk_for

BATCH = 40


def config(db_path: str) -> Config:
    return Config(
        db_path=db_path,
        dim=DIM,
        readers=1,
        index_snapshot_every_changes=300,
        index_snapshot_interval_s=0.2,
        index_catchup_rows=100,
    )


async def ingest(db_path: str, ack_log: str) -> None:
    fd = os.open(ack_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    async with open_runtime(config(db_path)) as rt:
        for j in range(10**9):
            # Slots are reused: a later i upserts the same chunk_id with a new vector.
            batch = [chunk_for(i) for i in range(j * BATCH, (j + 1) * BATCH)]
            await rt.upsert_chunks(batch)
            if j % 4 == 3:
                await rt.delete_chunks([chunk_for(j * 7 + d * 13).chunk_id for d in range(10)])
            os.write(fd, f"{j}\n".encode())


async def build(db_path: str, ack_log: str) -> None:
    fd = os.open(ack_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    async with open_runtime(config(db_path)):
        os.write(fd, b"ready\n")
        await trio.sleep_forever()


if __name__ == "__main__":
    mode, path, log = sys.argv[1:4]
    assert SLOTS > 0
    trio.run(ingest if mode == "ingest" else build, path, log)
