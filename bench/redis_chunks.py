"""Redis chunk size: time to write and read one big value, as one SET or in chunks.

Run: `python bench/redis_chunks.py [--mib 400] [--chunks 0,1,2,4,16] [--repeats 3]` (0: one
plain value, which Redis refuses past its proto-max-bulk-len, 512 MB by default). A chunk
of N MiB is N MiB less `ALLOCATION_HEADROOM`, as in the store. Uses the local Redis
(FEDQ_REDIS_URL) and deletes its key. This is how infra/redis_values.py's CHUNK_BYTES was
chosen.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import redis.asyncio as aioredis

from infra.redis_values import ALLOCATION_HEADROOM, ValueIO


async def main(mib: int, chunks: list[float], repeats: int) -> None:
    """Print write and read seconds of a `mib` MiB value for each chunk size."""
    data = bytearray(os.urandom(2**20)) * mib
    client = aioredis.Redis.from_url(
        os.environ.get("FEDQ_REDIS_URL", "redis://127.0.0.1:6379/0"), socket_timeout=300
    )
    key = "fedq:{bench-redis-chunks}:value"
    try:
        # Alternating sizes, so that each sees the same machine (its speed drifts).
        for chunk in chunks * repeats:
            chunk_bytes = int(chunk * 2**20) - ALLOCATION_HEADROOM if chunk else (mib + 1) * 2**20
            io = ValueIO(client, chunk_bytes=chunk_bytes)
            started = time.perf_counter()
            await io.write(key, data, ex=60)
            written = time.perf_counter()
            back = await io.read(key)
            read = time.perf_counter()
            assert back == data
            del back
            label = f"{chunk} MiB chunks" if chunk else "one value"
            write_s, read_s = written - started, read - written
            print(f"{mib} MiB as {label}: write {write_s:.2f} s, read {read_s:.2f} s")
            await client.unlink(key)
    finally:
        await client.unlink(key)
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=400)
    parser.add_argument("--chunks", default="0,1,2,4,16", help="MiB per chunk, 0: one value")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.mib, [float(c) for c in args.chunks.split(",")], args.repeats))
