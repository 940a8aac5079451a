"""`python -m hean.core.devrun`: the local run until every service exists.

Starts a redis-server if none answers at REDIS_URL (append-only persistence under
`.hean/redis/`), then runs a demo service on the real bus: a replayer that publishes the
bundled BTC candles as TICK events and a tick counter that consumes them through a consumer
group, with `/health` and `/metrics` on HEALTH_PORT (default 8080). Ctrl-C stops cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from hean.core.candles import Candle, bundled_data_path, load_candles
from hean.core.service import ServiceContext, load_service_settings, serve
from hean.core.settings import CoreSettings, SettingsError, redact_url
from hean.core.types import Event, EventType

log = logging.getLogger("hean.devrun")


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        client.ping()
        client.close()
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    return True


def ensure_redis(url: str, workdir: Path) -> subprocess.Popen[bytes] | None:
    """Start redis-server for `url` if nothing answers there; returns the child (or None).

    Raises `RuntimeError` with what to do when redis-server is missing or Redis is remote.
    """
    if redis_answers(url):
        return None
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 6379
    if host not in {"localhost", "127.0.0.1", "::1"}:
        raise RuntimeError(f"Redis at {redact_url(url)} does not answer (and is not local)")
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "no Redis answers at "
            f"{redact_url(url)} and redis-server is not installed: install it "
            "(Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) "
            "or point REDIS_URL at a running Redis"
        )
    workdir = workdir.resolve()  # redis-server changes into --dir before opening its log
    workdir.mkdir(parents=True, exist_ok=True)
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
            "--save", "", "--dir", str(workdir),
            "--logfile", str(workdir / "redis.log")]  # fmt: skip
    if parts.password:
        args += ["--requirepass", parts.password]
    # Its own session: Ctrl-C reaches the services, which flush into Redis before we stop it.
    proc = subprocess.Popen(  # noqa: S603
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not start; see {workdir / 'redis.log'}")
        time.sleep(0.05)
    log.info("started redis-server on port %d (data in %s)", port, workdir)
    return proc


class CandleReplayer:
    """Publishes the bundled candles' closes as TICK events at `rate` per second."""

    def __init__(self, ctx: ServiceContext, candles: tuple[Candle, ...], rate: float) -> None:
        self.bus = ctx.bus
        self.candles = candles
        self.rate = rate
        self.published = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            for candle in self.candles:
                await self.bus.publish(
                    Event(
                        event_type=EventType.TICK,
                        data={
                            "symbol": "BTC/USDT",
                            "price": candle.close,
                            "volume": candle.volume,
                            "timestamp": candle.timestamp_ns,
                        },
                    )
                )
                self.published += 1
                await asyncio.sleep(1 / self.rate)


class TickCounter:
    def __init__(self, ctx: ServiceContext) -> None:
        self.bus = ctx.bus
        self.count = 0
        self.last_price: str | None = None

    async def start(self) -> None:
        self.bus.subscribe(EventType.TICK, self.on_tick)

    async def on_tick(self, event: Event) -> None:
        self.count += 1
        self.last_price = str(event.data["price"])
        if self.count % 50 == 0:
            log.info("ticks consumed: %d, last BTC/USDT %s", self.count, self.last_price)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s")
    try:
        settings = load_service_settings("demo", CoreSettings)
    except SettingsError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    try:
        redis_proc = ensure_redis(settings.redis_url, Path(".hean/redis"))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    candles = load_candles(bundled_data_path(), "BTC/USDT").candles

    def build(ctx: ServiceContext) -> None:
        ctx.orchestrator.register_component(
            name="replayer", component=CandleReplayer(ctx, candles, 10)
        )
        ctx.orchestrator.register_component(name="tick_counter", component=TickCounter(ctx))

    def ready(ctx: ServiceContext, port: int) -> None:
        print(f"HEAN demo running: health http://127.0.0.1:{port}/health, "
              f"metrics http://127.0.0.1:{port}/metrics (Ctrl-C stops)", flush=True)  # fmt: skip

    try:
        asyncio.run(serve("demo", build, settings, ready=ready))
    except KeyboardInterrupt:
        pass
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
