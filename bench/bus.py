"""Event bus benchmark: our Redis Streams bus versus a bare redis-py loop, same Redis, same
machine, same run.

Measures, for one hop (publish -> consumer group -> handler -> ack):
* throughput: N events published as fast as possible by one process and consumed by
  another; events/s from the first publish to the last ack;
* latency at a paced rate (default 1,000 events/s): p50/p99/max of publish-to-handler time.

Usage: python bench/bus.py [--events 50000] [--rate 1000] [--seconds 5] [--redis-url URL]
Without --redis-url it starts its own redis-server on a free port (no persistence).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from hean.core.bus import EventBus, RedisBusConfig, RedisStreamsTransport
from hean.core.event_streams import stream_key
from hean.core.types import Event, EventType

STREAM = stream_key(EventType.TICK)
BARE_STREAM = "bench:bare"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], str, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="hean-bench-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    return proc, url, workdir


def tick_data(i: int) -> dict[str, Any]:
    return {"symbol": "BTC/USDT", "price": Decimal("42000.5") + i % 100, "volume": "0.01"}


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    qs = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": qs[49], "p99": qs[98], "max": ordered[-1], "n": len(ordered)}


# --- consumers (run in a child process) ----------------------------------------------------


def bare_consumer(url: str, expected: int, out: Any, ready: Any) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(url)
        with contextlib.suppress(redis.ResponseError):
            await client.xgroup_create(BARE_STREAM, "g", id="0", mkstream=True)
        ready.set()
        latencies: list[float] = []
        seen = 0
        first = last = 0.0
        while seen < expected:
            resp: Any = await client.xreadgroup("g", "c", {BARE_STREAM: ">"}, count=500, block=100)
            if not resp:
                continue
            now = time.time_ns()
            ids = []
            for entry_id, fields in resp[0][1]:
                payload = orjson.loads(fields[b"event"])
                latencies.append((now - payload["timestamp"]) / 1e9)
                ids.append(entry_id)
            await client.xack(BARE_STREAM, "g", *ids)
            if seen == 0:
                first = time.perf_counter()
            seen += len(ids)
            last = time.perf_counter()
        out.put({"latencies": latencies, "consume_s": last - first, "done_ns": time.time_ns()})
        await client.aclose()

    asyncio.run(run())


def bus_consumer(url: str, expected: int, out: Any, ready: Any) -> None:
    async def run() -> None:
        config = RedisBusConfig(
            url=url, group="bench", consumer="bench-consumer", batch_size=500,
            worker_count=1, block_ms=100, group_start_id="0",
        )  # fmt: skip
        bus = EventBus(RedisStreamsTransport(config))
        latencies: list[float] = []
        done = asyncio.Event()

        def on_tick(event: Event) -> None:
            latencies.append((time.time_ns() - event.timestamp) / 1e9)
            if len(latencies) >= expected:
                done.set()

        bus.subscribe(EventType.TICK, on_tick)
        await bus.start()
        ready.set()
        await done.wait()
        await bus.flush(30)  # the last acks are sent
        out.put({"latencies": latencies, "done_ns": time.time_ns()})
        await bus.stop()

    asyncio.run(run())


# --- producers ----------------------------------------------------------------------------


async def bare_produce(url: str, n: int, rate: float | None) -> int:
    client = aioredis.Redis.from_url(url)
    start = time.time_ns()
    if rate is None:
        for offset in range(0, n, 500):
            async with client.pipeline(transaction=False) as pipe:
                for i in range(offset, min(n, offset + 500)):
                    body = {"event_type": "TICK", "timestamp": time.time_ns(), "data": tick_data(i)}
                    pipe.xadd(BARE_STREAM, {"event": orjson.dumps(body, default=str)})
                await pipe.execute()
    else:
        interval = 1 / rate
        t0 = time.perf_counter()
        for i in range(n):
            body = {"event_type": "TICK", "timestamp": time.time_ns(), "data": tick_data(i)}
            await client.xadd(BARE_STREAM, {"event": orjson.dumps(body, default=str)})
            await _pace(t0, i + 1, interval)
    await client.aclose()
    return start


async def bus_produce(url: str, n: int, rate: float | None) -> int:
    config = RedisBusConfig(url=url, group="bench-producer", consumer="bench-producer")
    bus = EventBus(RedisStreamsTransport(config), source="bench")
    await bus.start()
    start = time.time_ns()
    if rate is None:
        for i in range(n):
            await bus.publish(Event(event_type=EventType.TICK, data=tick_data(i)))
            if i % 500 == 499:
                await asyncio.sleep(0)  # let the outbox flusher run, as a real producer would
    else:
        interval = 1 / rate
        t0 = time.perf_counter()
        for i in range(n):
            await bus.publish(Event(event_type=EventType.TICK, data=tick_data(i)))
            await _pace(t0, i + 1, interval)
    await bus.flush(60)
    await bus.stop()
    return start


async def _pace(t0: float, sent: int, interval: float) -> None:
    delay = t0 + sent * interval - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def run_case(kind: str, url: str, n: int, rate: float | None) -> dict[str, Any]:
    redis.Redis.from_url(url).flushall()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ready = ctx.Event()
    target = bare_consumer if kind == "bare" else bus_consumer
    proc = ctx.Process(target=target, args=(url, n, out, ready))
    proc.start()
    ready.wait(30)
    produce = bare_produce if kind == "bare" else bus_produce
    start_ns = asyncio.run(produce(url, n, rate))
    result: dict[str, Any] = out.get(timeout=600)
    proc.join(30)
    result["events_per_s"] = n / ((result["done_ns"] - start_ns) / 1e9)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--redis-url")
    args = parser.parse_args()

    proc = None
    url = args.redis_url
    if url is None:
        proc, url, _ = start_redis()
    try:
        paced = int(args.rate * args.seconds)
        print(f"redis {url}; throughput: {args.events} events; latency: {paced} at {args.rate:g}/s")
        rows = []
        for kind in ("bare", "bus"):
            fast = run_case(kind, url, args.events, None)
            slow = run_case(kind, url, paced, args.rate)
            lat = percentiles(slow["latencies"])
            rows.append((kind, fast["events_per_s"], lat))
        print(f"{'':6} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for kind, eps, lat in rows:
            print(
                f"{kind:6} {eps:10,.0f} {lat['p50'] * 1e3:8.3f} "
                f"{lat['p99'] * 1e3:8.3f} {lat['max'] * 1e3:8.3f}"
            )
        ratio = rows[1][1] / rows[0][1]
        print(f"bus/bare throughput ratio: {ratio:.2f} (goal >= 0.50)")
        p99_ms = rows[1][2]["p99"] * 1e3
        print(f"bus p99 hop latency at {args.rate:g}/s: {p99_ms:.3f} ms (goal < 1 ms)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
