"""FEATURES_READY -> ML_PREDICTION throughput with 1 and 3 ml-service replicas.

Starts its own redis-server on a free port, then for each replica count: starts that many
`python -m hean.ml` processes (cache off, so every event runs the model), waits for their
health snapshots, publishes N FEATURES_READY events (real feature rows of the bundled BTC
data, cycled) and times from the first publish until the ml-service group has acked every
one. Prints events/s per replica count.

Usage: python bench/ml_throughput.py [--events 5000] [--replicas 1 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from itertools import cycle, islice

import redis
import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.candles import bundled_data_path, load_candles
from hean.core.event_streams import stream_key
from hean.core.features import compute_feature_rows
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)


async def drained(client: aioredis.Redis, n: int) -> bool:
    key = stream_key(EventType.FEATURES_READY)
    for info in await client.xinfo_groups(key):
        if info["name"].decode() == "ml-service":
            return bool(info["entries-read"] >= n and info["pending"] == 0)
    return False


async def run(url: str, replicas: int, rows: list[dict[str, float]], n: int) -> float:
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    env = dict(
        os.environ,
        REDIS_URL=url,
        HEALTH_PORT="0",
        HEALTH_INTERVAL_S="0.5",
        HEALTH_TTL_S="3",
        ML_CACHE_SIZE="0",
        EVENT_BATCH_SIZE="100",
        LOG_LEVEL="WARNING",
    )
    procs = [
        spawn([sys.executable, "-m", "hean.ml"], dict(env, INSTANCE_ID=f"bench-{i}"))
        for i in range(replicas)
    ]
    try:
        deadline = time.monotonic() + 60
        while len([k async for k in client.scan_iter(match="hean:health:ml-service:*")]) < replicas:
            if time.monotonic() > deadline:
                raise RuntimeError("ml-service replicas did not start")
            await asyncio.sleep(0.1)
        events = [
            Event(event_type=EventType.FEATURES_READY, data={"symbol": "BTC/USDT", "features": f})
            for f in islice(cycle(rows), n)
        ]
        bus = EventBus.redis(CoreSettings(REDIS_URL=url, SERVICE_NAME="bench-source"))
        await bus.start()
        started = time.perf_counter()
        for event in events:
            await bus.publish(event)
        await bus.flush(60)
        while True:
            if await drained(client, n):
                break
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        await bus.stop()
        count = int(await client.xlen(stream_key(EventType.ML_PREDICTION)))
        if count != n:
            raise RuntimeError(f"{count} predictions for {n} events")
        return n / elapsed
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        await client.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    candles = load_candles(bundled_data_path(), "BTC/USDT").candles[:1240]
    rows = [f for _, f in compute_feature_rows(candles)]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = spawn(
            [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp]
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = aioredis.Redis.from_url(url)
            for _ in range(100):
                try:
                    await client.ping()
                    break
                except redis.ConnectionError:
                    await asyncio.sleep(0.05)
            await client.aclose()
            cpus = os.cpu_count()
            print(f"FEATURES_READY -> ML_PREDICTION, {args.events} events, cache off, {cpus} CPUs")
            for replicas in args.replicas:
                rate = await run(url, replicas, rows, args.events)
                print(f"  {replicas} replica(s): {rate:,.0f} events/s")
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(main())
