"""The features service on a real Redis: FEATURES_READY after warm-up, redelivered candles
ignored, and engine state carried across a restart (no new warm-up, same numbers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from hean.core.bus import EventBus, worker_lane
from hean.core.candles import Candle, bundled_data_path, load_candles
from hean.core.errors import QueueFullError
from hean.core.event_streams import stream_key
from hean.core.features import FEATURE_VERSION, WARMUP_BARS, compute_feature_rows
from hean.core.service import ServiceContext
from hean.core.settings import CoreSettings, SettingsError, load_settings
from hean.core.types import Event, EventType
from hean.features.core import FeatureCore
from hean.features.service import EngineStore, FeaturesService, FeaturesSettings, build
from hean.market_data.service import candle_data
from tests.conftest import RedisServer
from tests.helpers import eventually
from tests.integration.signal_path_helpers import FAST, drained, publish, read, running


def _events(candles: tuple[Candle, ...]) -> list[Event]:
    return [Event(event_type=EventType.CANDLE, data=candle_data(c)) for c in candles]


STATE_KEY = "hean:features:features:state"


def _moved(candle: Candle, symbol: str) -> Candle:
    """`candle` under another symbol."""
    c = candle
    return Candle(symbol, c.timeframe, c.timestamp_ns, c.open, c.high, c.low, c.close, c.volume)


def _component(ctx: ServiceContext) -> dict[str, Any]:
    entry: dict[str, Any] = ctx.orchestrator.health()["components"]["features"]
    return entry


def _settings(url: str) -> FeaturesSettings:
    return FeaturesSettings(
        REDIS_URL=url, SERVICE_NAME="features", FEATURE_BATCH_TIMEOUT=20, **FAST
    )


async def test_features_service_restart_and_redelivery_same_features_as_batch(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    btc = load_candles(bundled_data_path(), "BTC/USDT").candles[: WARMUP_BARS + 80]
    eth = tuple(_moved(c, "ETH/USDT") for c in btc)
    first, second = WARMUP_BARS + 40, WARMUP_BARS + 80
    async with running("features", build, _settings(redis_url)) as ctx:
        await publish(
            redis_url,
            [
                e
                for pair in zip(_events(btc[:first]), _events(eth[:first]), strict=True)
                for e in pair
            ],
        )
        await eventually(
            lambda: drained(ctx.redis, EventType.CANDLE, "features"), timeout=20, message="drain"
        )
        # The same bars again (as a redelivery would bring them): ignored.
        await publish(redis_url, _events(btc[first - 10 : first]))
        await eventually(
            lambda: drained(ctx.redis, EventType.CANDLE, "features"), timeout=20, message="drain"
        )
        assert len(await read(redis_url, EventType.FEATURES_READY)) == 2 * (first - WARMUP_BARS + 1)

    async with running("features", build, _settings(redis_url)) as ctx:
        await publish(redis_url, _events(btc[first:second]))
        await eventually(
            lambda: drained(ctx.redis, EventType.CANDLE, "features"), timeout=20, message="drain"
        )

    published = await read(redis_url, EventType.FEATURES_READY)
    got = [e for e in published if e.data["symbol"] == "BTC/USDT"]
    want = list(compute_feature_rows(btc[:second]))
    assert [e.data["timestamp"] for e in got] == [c.timestamp_ns for c, _ in want]
    for event, (_, row) in zip(got, want, strict=True):
        assert event.data["features"] == pytest.approx(row, rel=1e-9, abs=1e-12)
        assert event.data["feature_version"] == FEATURE_VERSION
    assert len([e for e in published if e.data["symbol"] == "ETH/USDT"]) == first - WARMUP_BARS + 1
    candles = await read(redis_url, EventType.CANDLE)
    by_id = {c.event_id: c for c in candles}
    for event in got:  # each FEATURES_READY carries its candle's correlation id
        assert event.correlation_id is not None
        assert by_id[event.correlation_id].data["timestamp"] == event.data["timestamp"]
    state = await redis_client.hgetall(STATE_KEY)
    assert set(state) == {b"BTC/USDT", b"ETH/USDT"}


def test_features_settings_bad_batch_size_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATURE_BATCH_SIZE", "0")
    with pytest.raises(SettingsError, match="FEATURE_BATCH_SIZE"):
        load_settings(FeaturesSettings)


async def test_features_refused_batches_roll_back_and_are_delivered_again_in_order(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Redis refusing the FEATURES_READY writes (here: the stream's key holds a string, so
    XADD gets WRONGTYPE) leaves the candles unacked and the component degraded; once Redis
    takes writes again the candles come back and the rows are exactly the batch ones."""
    btc = load_candles(bundled_data_path(), "BTC/USDT").candles[: WARMUP_BARS + 30]
    first = WARMUP_BARS + 10
    settings = FeaturesSettings(
        REDIS_URL=redis_url,
        SERVICE_NAME="features",
        FEATURE_BATCH_TIMEOUT=20,
        EVENT_CLAIM_IDLE_MS=500,
        EVENT_CLAIM_INTERVAL_MS=200,
        **FAST,
    )
    key = "hean:events:FEATURES_READY"
    async with running("features", build, settings) as ctx:
        await publish(redis_url, _events(btc[:first]))
        await eventually(
            lambda: drained(ctx.redis, EventType.CANDLE, "features"), timeout=20, message="drain"
        )
        saved = await redis_client.hgetall(STATE_KEY)
        await redis_client.rename(key, "hean:test:rows")
        await redis_client.set(key, "not a stream")
        for event in _events(btc[first:]):  # plain XADDs: a bus would trip over the key
            await redis_client.xadd(stream_key(EventType.CANDLE), {"event": event.to_json()})

        async def refused() -> bool:
            health = _component(ctx)
            pending: Any = await redis_client.xpending(stream_key(EventType.CANDLE), "features")
            return bool(health["state"] == "degraded" and pending["pending"] > 0)

        await eventually(refused, timeout=20, message="refused batches seen")
        health = _component(ctx)
        assert "WRONGTYPE" in str(health["error_message"])
        # The engine state rides in the same script as the refused XADD: not saved either.
        assert await redis_client.hgetall(STATE_KEY) == saved
        await redis_client.delete(key)
        await redis_client.rename("hean:test:rows", key)
        await eventually(
            lambda: drained(ctx.redis, EventType.CANDLE, "features"), timeout=30, message="drain"
        )

        async def healthy() -> bool:
            return bool(_component(ctx)["state"] == "healthy")

        await eventually(healthy, timeout=10, message="healthy again")

    got = await read(redis_url, EventType.FEATURES_READY)
    want = list(compute_feature_rows(btc))
    assert [e.data["timestamp"] for e in got] == [c.timestamp_ns for c, _ in want]
    for event, (_, row) in zip(got, want, strict=True):
        assert event.data["features"] == pytest.approx(row, rel=1e-9, abs=1e-12)


async def test_features_batch_refused_by_a_full_outbox_rolls_back_every_symbol_in_it(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """Redis down and the outbox full: a batch of two symbols cannot be queued. Both
    rows' futures fail (their candles stay unacked) and both engines go back to their
    saved state, not only the one whose handler closed the batch."""
    server = redis_factory()
    settings = CoreSettings(REDIS_URL=server.url, SERVICE_NAME="features", EVENT_MAX_QUEUE_SIZE=1)
    bus = EventBus.redis(settings)
    await bus.start()
    client = aioredis.Redis.from_url(server.url)
    workers = settings.event_worker_count
    names = ["BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT"]
    first = names[0]
    second = next(s for s in names if worker_lane(s, workers) != worker_lane(first, workers))
    service = FeaturesService(
        bus,
        FeatureCore(),
        EngineStore(client, STATE_KEY),
        batch_size=10,
        batch_timeout_ms=60_000,
        worker_count=workers,
    )
    base = load_candles(bundled_data_path(), "BTC/USDT").candles[: WARMUP_BARS + 2]
    candles = {symbol: [_moved(c, symbol) for c in base] for symbol in (first, second)}

    def add(symbol: str, index: int) -> asyncio.Future[None]:
        outcome = service.core.on_candle(candles[symbol][index])
        assert outcome.features is not None
        row = Event(
            event_type=EventType.FEATURES_READY,
            data=service.core.features_data(candles[symbol][index], outcome.features),
        )
        return service.batcher.add(row, symbol, service.core.snapshot(symbol))

    try:
        for symbol in (first, second):
            for candle in candles[symbol][:WARMUP_BARS]:
                service.core.on_candle(candle)
        # The first symbol alone: its row goes at once and is saved.
        await asyncio.wait_for(add(first, WARMUP_BARS), 10)
        # Both symbols active now: the second's row waits for the first's next one.
        waiting = add(second, WARMUP_BARS)
        server.stop()  # nothing leaves the outbox from here on; it holds one event
        closing = add(first, WARMUP_BARS + 1)
        results = await asyncio.wait_for(
            asyncio.gather(waiting, closing, return_exceptions=True), 10
        )
        assert all(isinstance(r, QueueFullError) for r in results), results
        assert "Queue is full" in str(service.last_error)
        # Both back to what Redis holds: the first after its saved row, the second empty.
        assert service.core.engines[first].bars_seen == WARMUP_BARS + 1
        assert service.core.engines[second].bars_seen == 0
    finally:
        await bus.stop(drain_timeout=0.5)
        await client.aclose()
