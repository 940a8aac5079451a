"""SIGNAL -> ORDER_FILLED latency through risk, execution and portfolio (paper exchange).

Starts a private redis-server (unless REDIS_URL is set) and the three services as real
processes (`python -m hean.<pkg>`), publishes SIGNALs at a fixed rate (alternating BUY and
SELL so the position stays inside the limits) and measures, per signal, the time from its
publish to the arrival of its ORDER_FILLED (matched by correlation id) at this process.

    .venv/bin/python bench/order_path.py [--rate 100] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.event_streams import stream_key
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType

SERVICES = ("risk", "execution", "portfolio")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed and REDIS_URL is not set")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


async def wait_for_groups(client: aioredis.Redis, timeout: float = 30.0) -> None:
    wanted = {
        (stream_key(EventType.SIGNAL), "risk"),
        (stream_key(EventType.ORDER_APPROVED), "execution"),
        (stream_key(EventType.ORDER_FILLED), "portfolio"),
    }
    deadline = time.monotonic() + timeout
    while wanted:
        for key, group in list(wanted):
            if await client.exists(key):
                groups = await client.xinfo_groups(key)
                if any(g["name"].decode() == group for g in groups):
                    wanted.discard((key, group))
        if time.monotonic() > deadline:
            raise TimeoutError(f"services not ready: {sorted(wanted)}")
        await asyncio.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def spawn(name: str, env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    log = (logs / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", f"hean.{name}"], env=env, stdout=log, stderr=subprocess.STDOUT
    )


async def run(url: str, rate: float, seconds: float, logs: Path) -> None:
    env = dict(
        os.environ,
        REDIS_URL=url,
        HEALTH_PORT="0",
        LOG_LEVEL="WARNING",
        PNL_PUBLISH_INTERVAL_MS="1000",
        EVENT_BLOCK_MS="100",
        MAX_POSITION_SIZE="1000000",
        # 1000 round trips pay ~1.3 USDT each in fees and slippage: keep the kill switch out
        DAILY_DRAWDOWN_LIMIT="0.5",
    )
    procs = [spawn(name, env, logs) for name in SERVICES]
    client = aioredis.Redis.from_url(url)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    total = int(rate * seconds)

    async def on_fill(event: Event) -> None:
        started = sent.get(event.correlation_id or "")
        if started is not None:
            latencies.append(time.perf_counter() - started)
            del sent[event.correlation_id or ""]
        if len(latencies) >= total:
            done.set()

    try:
        await wait_for_groups(client)
        listener = EventBus.redis(CoreSettings(REDIS_URL=url, SERVICE_NAME="bench-listener"))
        listener.subscribe(EventType.ORDER_FILLED, on_fill)
        await listener.start()
        source = EventBus.redis(CoreSettings(REDIS_URL=url, SERVICE_NAME="bench-source"))
        await source.start()
        await source.publish(
            Event(event_type=EventType.TICK, data={"symbol": "BTC/USDT", "price": "100"})
        )
        await source.flush(5)
        await asyncio.sleep(1.0)  # let execution see the first price before any order
        interval = 1.0 / rate
        start = time.perf_counter()
        for i in range(total):
            target = start + i * interval
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            signal = Event(
                event_type=EventType.SIGNAL,
                data={
                    "symbol": "BTC/USDT",
                    "side": "BUY" if i % 2 == 0 else "SELL",
                    "signal_strength": 0.7,
                    "price": "100",
                },
            )
            sent[signal.event_id] = time.perf_counter()
            await source.publish(signal)
        await source.flush(10)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=30)
        await source.stop()
        await listener.stop()
    finally:
        await client.aclose()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=15)

    ms = [v * 1000 for v in latencies]
    print(f"signals sent: {total} at {rate:g}/s; fills received: {len(ms)}")
    if ms:
        print(
            f"SIGNAL -> ORDER_FILLED latency ms: p50={percentile(ms, 0.5):.2f} "
            f"p90={percentile(ms, 0.9):.2f} p99={percentile(ms, 0.99):.2f} "
            f"max={max(ms):.2f} mean={statistics.fmean(ms):.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=100.0, help="signals per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to send")
    args = parser.parse_args()
    with redis_server() as url, tempfile.TemporaryDirectory() as logs:
        asyncio.run(run(url, args.rate, args.seconds, Path(logs)))


if __name__ == "__main__":
    main()
