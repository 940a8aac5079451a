"""The features service on a real Redis: FEATURES_READY after warm-up, redelivered candles
ignored, and engine state carried across a restart (no new warm-up, same numbers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from hean.core.bus import EventBus, worker_lane
from hean.core.candles import Candle, bundled_data_path, load_candles
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


def _refusing_settings(url: str) -> FeaturesSettings:
    # The claim idle time stays at its default (30 s): what brings refused rows back is
    # the service sending them again, not the bus redelivering their candles.
    return FeaturesSettings(
        REDIS_URL=url, SERVICE_NAME="features", FEATURE_BATCH_TIMEOUT=20, **FAST
    )


ROWS_KEY = "hean:events:FEATURES_READY"


async def _handled(ctx: ServiceContext, url: str, candles: tuple[Candle, ...]) -> None:
    """Publish `candles` and wait until the service has handled and acked them all."""
    await publish(url, _events(candles))
    await eventually(
        lambda: drained(ctx.redis, EventType.CANDLE, "features"), timeout=20, message="drain"
    )


def _healthy(ctx: ServiceContext) -> bool:
    return bool(_component(ctx)["state"] == "healthy")


async def _refuse_rows(client: aioredis.Redis) -> None:
    """Make Redis refuse every FEATURES_READY write (the stream's key holds a string, so
    XADD gets WRONGTYPE), keeping the rows written so far aside."""
    await client.rename(ROWS_KEY, "hean:test:rows")
    await client.set(ROWS_KEY, "not a stream")


async def _take_rows_again(client: aioredis.Redis) -> None:
    await client.delete(ROWS_KEY)
    await client.rename("hean:test:rows", ROWS_KEY)


async def _assert_rows_are_the_batch_ones(url: str, candles: tuple[Candle, ...]) -> None:
    got = await read(url, EventType.FEATURES_READY)
    want = list(compute_feature_rows(candles))
    assert [e.data["timestamp"] for e in got] == [c.timestamp_ns for c, _ in want]
    for event, (_, row) in zip(got, want, strict=True):
        assert event.data["features"] == pytest.approx(row, rel=1e-9, abs=1e-12)


async def test_features_refused_rows_are_held_in_order_until_redis_takes_them(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Redis refusing the FEATURES_READY writes leaves the candles unacked and the
    component degraded, naming the error; the rows of later candles wait behind the
    refused one. Once Redis takes writes again, every row goes out, in order, and they
    are exactly the batch ones."""
    btc = load_candles(bundled_data_path(), "BTC/USDT").candles[: WARMUP_BARS + 30]
    first = WARMUP_BARS + 10
    async with running("features", build, _refusing_settings(redis_url)) as ctx:
        await _handled(ctx, redis_url, btc[:first])
        saved = await redis_client.hgetall(STATE_KEY)
        await _refuse_rows(redis_client)
        for event in _events(btc[first:]):  # plain XADDs: a bus would trip over the key
            await redis_client.xadd(stream_key(EventType.CANDLE), {"event": event.to_json()})

        async def held() -> bool:
            health = _component(ctx)
            pending: Any = await redis_client.xpending(stream_key(EventType.CANDLE), "features")
            return bool(
                health["state"] == "degraded"
                and "20 rows held" in str(health["error_message"])
                and pending["pending"] == 20
            )

        await eventually(held, timeout=20, message="all 20 rows held")
        health = _component(ctx)
        assert "WRONGTYPE" in str(health["error_message"])
        assert "20 rows held" in str(health["error_message"])
        # The engine state rides in the same script as the refused XADD: not saved either.
        assert await redis_client.hgetall(STATE_KEY) == saved
        await _take_rows_again(redis_client)
        await eventually(
            lambda: drained(ctx.redis, EventType.CANDLE, "features"), timeout=30, message="drain"
        )
        await eventually(lambda: _healthy(ctx), timeout=10, message="healthy again")
        assert await redis_client.hgetall(STATE_KEY) != saved

    await _assert_rows_are_the_batch_ones(redis_url, btc)


async def test_features_brief_refusal_loses_no_row_of_the_candles_after_it(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Redis refuses one candle's row and takes writes again a moment later, while the next
    candles are arriving. The refused row goes out first and the later ones follow it,
    computed from the engine that saw it: no row is lost or out of order. (Before, the
    refused candle waited for the bus to redeliver it, 30 s later; the candles after it
    were computed without it and published first, and its redelivery was then ignored as
    stale: its row was never published.)"""
    btc = load_candles(bundled_data_path(), "BTC/USDT").candles[: WARMUP_BARS + 30]
    first = WARMUP_BARS + 10
    async with running("features", build, _refusing_settings(redis_url)) as ctx:
        await _handled(ctx, redis_url, btc[:first])
        await _refuse_rows(redis_client)
        await redis_client.xadd(
            stream_key(EventType.CANDLE), {"event": _events(btc[first : first + 1])[0].to_json()}
        )

        async def refused() -> bool:
            return "WRONGTYPE" in str(_component(ctx).get("error_message"))

        await eventually(refused, timeout=10, message="the row refused")
        await _take_rows_again(redis_client)
        for event in _events(btc[first + 1 :]):
            await redis_client.xadd(stream_key(EventType.CANDLE), {"event": event.to_json()})
        await eventually(
            lambda: drained(ctx.redis, EventType.CANDLE, "features"), timeout=20, message="drain"
        )
        await eventually(lambda: _healthy(ctx), timeout=10, message="healthy again")

    await _assert_rows_are_the_batch_ones(redis_url, btc)


async def test_features_batch_the_full_outbox_cannot_take_goes_again_once_redis_is_back(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """Redis down and the outbox full: a batch of two symbols cannot be queued whole. No
    row fails and no engine goes back: the batch is sent again once Redis answers, and
    both rows resolve when it is written (the one the outbox took goes out twice, which
    consumers drop as a repeat)."""
    server = redis_factory()
    settings = CoreSettings(REDIS_URL=server.url, SERVICE_NAME="features", EVENT_MAX_QUEUE_SIZE=2)
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
        server.stop()  # nothing leaves the outbox from here on; it holds two events
        bus.publish_nowait(_events(base[:1])[0])  # another event takes one place
        closing = add(first, WARMUP_BARS + 1)
        await asyncio.sleep(0.5)
        assert not waiting.done() and not closing.done()
        assert service.core.engines[first].bars_seen == WARMUP_BARS + 2  # not rolled back
        assert service.core.engines[second].bars_seen == WARMUP_BARS + 1
        server.start()  # an empty Redis on the same port (no persistence)
        await asyncio.wait_for(asyncio.gather(waiting, closing), 20)
        assert service.refused_batches >= 1 and service.last_error is None
        rows = await read(server.url, EventType.FEATURES_READY)
        assert [e.data["symbol"] for e in rows] == [second, second, first]
        state = await client.hgetall(STATE_KEY)
        assert set(state) == {first.encode(), second.encode()}
    finally:
        await bus.stop(drain_timeout=0.5)
        await client.aclose()


async def test_features_rows_complete_and_in_order_while_redis_refuses_writes_by_turns(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """Redis with `noeviction` going over and under its `maxmemory` every few milliseconds
    (as when other keys expire near the limit; here the limit itself is switched between
    1 byte and none): writes fail and succeed by turns while candles arrive. The bus keeps
    the refused writes in order and sends them again; every row reaches Redis, in candle
    order, and the rows are exactly the batch ones."""
    server = redis_factory()
    url = server.url
    btc = load_candles(bundled_data_path(), "BTC/USDT").candles[: WARMUP_BARS + 150]
    client = aioredis.Redis.from_url(url)
    churning = True
    swings = 0
    refusals_seen: set[str] = set()

    async def churn(ctx: ServiceContext) -> None:
        nonlocal swings
        while churning:
            await client.config_set("maxmemory", 1)
            await asyncio.sleep(0.004)
            message = ctx.bus.health().error_message
            if message and "refuses writes for now" in message:
                refusals_seen.add(message)
            await client.config_set("maxmemory", 0)
            swings += 1
            await asyncio.sleep(0.004)

    async def add(event: Event) -> None:  # the test's own writes are refused too: retry
        while True:
            try:
                await client.xadd(stream_key(EventType.CANDLE), {"event": event.to_json()})
                return
            except OutOfMemoryError:
                await asyncio.sleep(0.002)

    try:
        async with running("features", build, _refusing_settings(url)) as ctx:
            await client.config_set("maxmemory-policy", "noeviction")
            task = asyncio.create_task(churn(ctx))
            try:
                for event in _events(btc):
                    await add(event)
                    await asyncio.sleep(0.003)
            finally:
                churning = False
                await task
            await eventually(
                lambda: drained(ctx.redis, EventType.CANDLE, "features"),
                timeout=30,
                message="drain",
            )
        assert swings > 50
        assert refusals_seen  # the service's writes were refused (and kept by its bus)
        got = await read(url, EventType.FEATURES_READY)
        first_seen: dict[int, Event] = {}
        for event in got:
            first_seen.setdefault(event.data["timestamp"], event)
        want = {c.timestamp_ns: row for c, row in compute_feature_rows(btc)}
        assert list(first_seen) == list(want)
        for event in got:  # repeats included: the same numbers
            expected = want[event.data["timestamp"]]
            assert event.data["features"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    finally:
        await client.aclose()
