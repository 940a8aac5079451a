"""risk, execution and portfolio as real processes (`python -m hean.<pkg>`) on a real Redis,
with a scripted signal source: signals become fills and P&L, a drawdown trips the kill
switch, and a SIGKILLed and restarted execution process places no duplicate order."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.event_streams import RedisEventStream, stream_key
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType
from tests.helpers import stop_processes

D = Decimal


class Services:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, instance: str = "1") -> None:
        env = dict(self.env, HEALTH_PORT="0", INSTANCE_ID=f"{name}-{instance}")
        log = (self.logs / f"{name}-{instance}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"hean.{name}"], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        stop_processes(self.procs.values())

    def log(self, name: str, instance: str = "1") -> str:
        return (self.logs / f"{name}-{instance}.log").read_text(errors="replace")


@pytest.fixture
def services(subprocess_env, tmp_path) -> Iterator[Services]:
    env = dict(subprocess_env)
    env.update(
        {
            "DAILY_DRAWDOWN_LIMIT": "0.01",
            "PNL_PUBLISH_INTERVAL_MS": "0",
            "EVENT_BLOCK_MS": "50",
            "LOG_LEVEL": "INFO",
            "PAPER_MARKETS": '{"BTC/USDT": {"tick_size": "0.1", "qty_step": "0.001"}}',
        }
    )
    env.pop("EXCHANGE", None)
    svc = Services(env, tmp_path)
    yield svc
    svc.stop_all()


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)


async def events(url: str, etype: EventType) -> list[Event]:
    async with RedisEventStream(url) as stream:
        return [e async for e in stream.replay_events(etype)]


async def group_ready(client: aioredis.Redis, etype: EventType, group: str) -> bool:
    key = stream_key(etype)
    if not await client.exists(key):
        return False
    return any(g["name"].decode() == group for g in await client.xinfo_groups(key))


async def group_done(client: aioredis.Redis, etype: EventType, group: str) -> bool:
    key = stream_key(etype)
    last = (await client.xinfo_stream(key))["last-generated-id"]
    for info in await client.xinfo_groups(key):
        if info["name"].decode() == group:
            return bool(info["last-delivered-id"] == last and info["pending"] == 0)
    return False


async def send(url: str, *evts: Event) -> None:
    bus = EventBus.redis(CoreSettings(REDIS_URL=url, SERVICE_NAME="signal-source"))
    await bus.start()
    for e in evts:
        await bus.publish(e)
    await bus.flush(5)
    await bus.stop()


def tick(price: str) -> Event:
    return Event(event_type=EventType.TICK, data={"symbol": "BTC/USDT", "price": price})


def buy_signal() -> Event:
    return Event(
        event_type=EventType.SIGNAL,
        data={"symbol": "BTC/USDT", "side": "BUY", "signal_strength": 0.7, "price": "100"},
    )


@pytest.mark.timeout(120)
async def test_order_path_processes_signal_fill_pnl_killswitch_and_restart(
    services, redis_url, redis_client
):
    for name in ("risk", "execution", "portfolio"):
        services.start(name)
    await eventually(lambda: group_ready(redis_client, EventType.SIGNAL, "risk"))
    await eventually(lambda: group_ready(redis_client, EventType.TICK, "execution"))
    await eventually(lambda: group_ready(redis_client, EventType.ORDER_FILLED, "portfolio"))

    await send(redis_url, tick("100"))
    await eventually(lambda: group_done(redis_client, EventType.TICK, "execution"))
    first = buy_signal()
    await send(redis_url, first)

    async def long_position() -> Any:
        for update in await events(redis_url, EventType.PNL_UPDATE):
            pos = update.data["positions"].get("BTC/USDT")
            if pos and D(pos["qty"]) > 0:
                return update
        return None

    update = await eventually(long_position)
    assert D(update.data["positions"]["BTC/USDT"]["qty"]) == D(10)  # quarter Kelly, 1000 USDT
    assert D(update.data["equity"]) < D(10000)  # fees and slippage

    # price falls 12%: 120 USDT loss on 10000 > 1% daily limit -> kill switch
    await send(redis_url, tick("88"))
    triggered = await eventually(lambda: events(redis_url, EventType.KILLSWITCH_TRIGGERED))
    assert "daily drawdown" in triggered[0].data["reason"]

    second = buy_signal()
    await send(redis_url, second)

    async def second_rejected() -> Any:
        for r in await events(redis_url, EventType.ORDER_REJECTED):
            if r.data["order_id"] == f"o{second.event_id}":
                return r
        return None

    rejection = await eventually(second_rejected)
    assert "kill switch active" in rejection.data["reason"]

    # execution dies hard and comes back; the first approval is delivered again
    services.kill("execution")
    services.start("execution", "2")
    approved = (await events(redis_url, EventType.ORDER_APPROVED))[0]
    await send(redis_url, approved)
    await eventually(lambda: group_done(redis_client, EventType.ORDER_APPROVED, "execution"))
    placed = await events(redis_url, EventType.ORDER_PLACED)
    assert [p.data["order_id"] for p in placed] == [f"o{first.event_id}"]
    assert len(await events(redis_url, EventType.ORDER_FILLED)) == 1
    assert "Traceback" not in services.log("risk") + services.log("portfolio")
