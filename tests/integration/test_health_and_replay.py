"""Health snapshots in Redis, the per-process HTTP endpoint, a service's start-up with bad
settings, replay with count and follow, dead-letter retry and drop."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from decimal import Decimal

import aiohttp
import pytest
import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.event_streams import DLQ_STREAM, RedisEventStream, stream_key
from hean.core.health import (
    HEALTH_INDEX_KEY,
    HealthReporter,
    HealthServer,
    health_key,
    read_snapshots,
)
from hean.core.metrics import Metrics
from hean.core.orchestrator import TradingOrchestrator
from hean.core.service import ServiceContext, serve
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType, json_dumps
from tests.helpers import eventually


def fill(i: int) -> Event:
    return Event(
        event_type=EventType.ORDER_FILLED,
        data={"order_id": f"o-{i}", "fill_price": Decimal("100.5"), "filled_qty": "1"},
    )


async def test_health_snapshot_written_with_ttl_and_expires(
    redis_client: aioredis.Redis,
) -> None:
    reporter = HealthReporter(redis_client, interval_s=0.1, ttl_s=0.5)
    orchestrator = TradingOrchestrator(
        bus=EventBus(), service_name="risk", instance="host:1", reporter=reporter
    )
    orchestrator.register_component(name="risk_governor", component=object())
    await orchestrator.start()
    try:
        await eventually(
            lambda: _exists(redis_client, health_key("risk", "host:1")), message="snapshot"
        )
        ttl_ms = await redis_client.pttl(health_key("risk", "host:1"))
        assert 0 < ttl_ms <= 500
        [snapshot] = await read_snapshots(redis_client)
        assert snapshot["service"] == "risk" and snapshot["instance"] == "host:1"
        assert snapshot["health"]["orchestrator"]["overall_state"] == "healthy"
        assert "risk_governor" in snapshot["health"]["components"]
    finally:
        await orchestrator.stop()
    assert await read_snapshots(redis_client) == []  # withdrawn at a clean stop

    # A process that dies without withdrawing disappears once the TTL runs out.
    await reporter.publish("ml-service", "host:2", orchestrator.health())
    assert len(await read_snapshots(redis_client)) == 1
    await eventually(lambda: _gone(redis_client), timeout=3, message="expiry")


async def test_health_snapshots_found_by_their_index_not_a_keyspace_scan(
    redis_client: aioredis.Redis,
) -> None:
    # The keyspace grows with the system's life (a day's publish-once markers); the
    # snapshots are found through their index, which forgets the ones gone.
    await redis_client.mset({f"hean:published:{i}": b"1" for i in range(2000)})
    reporter = HealthReporter(redis_client, interval_s=1, ttl_s=30)
    for service in ("risk", "execution", "portfolio"):
        await reporter.publish(service, "h1", {"orchestrator": {"overall_state": "healthy"}})
    assert sorted(s["service"] for s in await read_snapshots(redis_client)) == [
        "execution",
        "portfolio",
        "risk",
    ]
    await reporter.withdraw("risk", "h1")
    await redis_client.delete(health_key("execution", "h1"))  # as if it had expired
    [left] = await read_snapshots(redis_client)
    assert left["service"] == "portfolio"
    assert await redis_client.smembers(HEALTH_INDEX_KEY) == {health_key("portfolio", "h1").encode()}
    await reporter.withdraw("portfolio", "h1")
    assert await redis_client.exists(HEALTH_INDEX_KEY) == 0


async def _exists(client: aioredis.Redis, key: str) -> bool:
    return bool(await client.exists(key))


async def _gone(client: aioredis.Redis) -> bool:
    return await read_snapshots(client) == []


async def test_health_server_serves_health_json_and_prometheus_metrics() -> None:
    metrics = Metrics()
    orchestrator = TradingOrchestrator(bus=EventBus(metrics=metrics), metrics=metrics)
    orchestrator.register_component(name="ml_engine", component=object(), failure_threshold=1)
    await orchestrator.start()
    server = HealthServer(orchestrator.health, metrics, host="127.0.0.1", port=0)
    port = await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                assert resp.status == 200
                body = await resp.json()
            assert body["components"]["ml_engine"]["circuit_breaker"] == "closed"

            def fail() -> None:
                raise TimeoutError("API timeout")

            with pytest.raises(TimeoutError):
                await orchestrator.execute_with_circuit_breaker("ml_engine", fail)
            async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                assert resp.status == 503
                body = await resp.json()
            assert body["orchestrator"]["overall_state"] == "unhealthy"
            assert body["components"]["ml_engine"]["error_message"] == "TimeoutError: API timeout"

            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain")
                text = await resp.text()
        for name in (
            "hean_orders_total",
            "hean_pnl",
            "hean_latency_seconds",
            "hean_trades_total",
            "hean_orchestrator_uptime_seconds",
            "hean_components_healthy",
            "hean_components_total",
            "hean_circuit_breakers_open",
            "hean_eventbus_queue_size",
        ):
            assert f"# TYPE {name} " in text, name
        assert "hean_circuit_breakers_open 1.0" in text
    finally:
        await server.stop()
        await orchestrator.stop()


async def test_service_serve_runs_components_on_redis_with_health(redis_url: str) -> None:
    settings = CoreSettings(
        REDIS_URL=redis_url, SERVICE_NAME="demo", HEALTH_PORT=0, HEALTH_INTERVAL_S=0.1,
        HEALTH_TTL_S=1.0, EVENT_BLOCK_MS=50,
    )  # fmt: skip
    seen: list[Event] = []
    stop = asyncio.Event()
    ports: list[int] = []

    class Recorder:
        def __init__(self, ctx: ServiceContext) -> None:
            self.ctx = ctx

        async def start(self) -> None:
            self.ctx.bus.subscribe(EventType.ORDER_FILLED, seen.append)

    def build(ctx: ServiceContext) -> None:
        ctx.orchestrator.register_component(name="recorder", component=Recorder(ctx))

    task = asyncio.create_task(
        serve(
            "demo",
            build,
            settings,
            stop_event=stop,
            ready=lambda c, p: ports.append(p),
            freeze_gc=True,
        )
    )
    try:
        await eventually(lambda: bool(ports), message="service ready")
        # What start-up built is out of the collector's generations (run_service does this).
        await eventually(lambda: gc.get_freeze_count() > 0, message="start-up objects frozen")
        publisher = EventBus.redis(CoreSettings(REDIS_URL=redis_url, SERVICE_NAME="execution"))
        await publisher.publish(fill(1))
        await publisher.stop()
        await eventually(lambda: len(seen) == 1, message="the fill consumed by the service")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{ports[0]}/health") as resp,
        ):
            body = await resp.json()
        assert body["components"]["recorder"]["state"] == "healthy"
        assert body["components"]["event_bus"]["state"] == "healthy"
        client = aioredis.Redis.from_url(redis_url)
        await eventually(lambda: _snapshot_for(client, "demo"), message="snapshot in Redis")
        await client.aclose()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        gc.unfreeze()


async def _snapshot_for(client: aioredis.Redis, service: str) -> bool:
    return any(s["service"] == service for s in await read_snapshots(client))


@pytest.mark.parametrize(
    ("variable", "value"),
    [("EVENT_MAX_QUEUE_SIZE", "-1"), ("REDIS_URL", "mysql://x"), ("HEALTH_PORT", "99999")],
)
def test_service_start_refused_with_bad_setting_naming_variable(
    subprocess_env: dict[str, str], variable: str, value: str
) -> None:
    env = {**subprocess_env, variable: value}
    result = subprocess.run(
        [sys.executable, "-m", "hean.core.devrun"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert variable in result.stderr
    assert "Traceback" not in result.stderr


async def test_replay_count_limit_range_and_follow(redis_url: str) -> None:
    bus = EventBus.redis(CoreSettings(REDIS_URL=redis_url, SERVICE_NAME="execution"))
    for i in range(10):
        await bus.publish(fill(i))
    await bus.flush(10)

    async with RedisEventStream(redis_url) as stream:
        everything = [e async for e in stream.replay_events(EventType.ORDER_FILLED)]
        assert [e.data["order_id"] for e in everything] == [f"o-{i}" for i in range(10)]
        limited = [e async for e in stream.replay_events("ORDER_FILLED", count=3)]
        assert [e.data["order_id"] for e in limited] == ["o-0", "o-1", "o-2"]
        ids = [i async for i, _ in stream.replay_entries(EventType.ORDER_FILLED)]
        middle = [e async for e in stream.replay_events(EventType.ORDER_FILLED, ids[3], ids[5])]
        assert [e.data["order_id"] for e in middle] == ["o-3", "o-4", "o-5"]
        assert await stream.stream_length(EventType.ORDER_FILLED) == 10

        followed: list[str] = []

        async def follow() -> None:
            async for event in stream.replay_events(
                EventType.ORDER_FILLED, ids[8], follow=True, count=5, block_ms=100
            ):
                followed.append(event.data["order_id"])

        task = asyncio.create_task(follow())
        await eventually(lambda: len(followed) == 2, message="the existing tail")
        for i in range(10, 13):
            await bus.publish(fill(i))
        await asyncio.wait_for(task, 10)
        assert followed == ["o-8", "o-9", "o-10", "o-11", "o-12"]
    await bus.stop()


async def test_replay_skips_undecodable_entries(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    key = stream_key(EventType.ORDER_FILLED)
    await redis_client.xadd(key, {"event": fill(1).to_json()})
    await redis_client.xadd(key, {"event": b"garbage"})
    await redis_client.xadd(key, {"event": fill(2).to_json()})
    async with RedisEventStream(redis_url) as stream:
        orders = [e.data["order_id"] async for e in stream.replay_events(EventType.ORDER_FILLED)]
    assert orders == ["o-1", "o-2"]


async def test_dead_letter_retry_republishes_and_drop_removes(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    key = stream_key(EventType.ORDER_FILLED)
    bad = dict(fill(7).to_dict())
    payload = json_dumps({**bad, "data": {**bad["data"], "fill_price": "-1"}})
    good = fill(8).to_json()
    for raw in (payload, good):
        await redis_client.xadd(
            DLQ_STREAM,
            {"stream": key, "entry_id": "1-0", "group": "portfolio", "consumer": "c",
             "deliveries": 5, "error": "boom", "payload": raw, "dead_at_ns": 1},
        )  # fmt: skip
    async with RedisEventStream(redis_url) as stream:
        bad_letter, good_letter = await stream.dead_letters()
        new_id = await stream.retry_dead_letter(good_letter.dlq_id)
        replayed = [i async for i, _ in stream.replay_entries(EventType.ORDER_FILLED)]
        assert replayed == [new_id]
        with pytest.raises(Exception, match="fill_price"):
            await stream.retry_dead_letter(bad_letter.dlq_id)
        assert await stream.drop_dead_letter(bad_letter.dlq_id) is True
        assert await stream.dead_letters() == []
        with pytest.raises(KeyError):
            await stream.retry_dead_letter("1-1")
