"""market-data live mode through ccxt against a local fake Bybit v5 server (aiohttp on
127.0.0.1, never the internet), on a real Redis.

The fake (tests/fakes/bybit_ws.py) answers instruments-info and /v5/market/kline from bars
the test controls; it can answer with HTTP 503 or drop the connection (a disconnect) for the
next requests. Time is a clock the test moves, so "a bar has closed" is decided
deterministically. These tests poll REST (LIVE_TRANSPORT=rest); the websocket transport is
tested in test_market_data_ws.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.event_streams import RedisEventStream
from hean.core.health import read_snapshots
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType
from hean.market_data.service import (
    LastBarStore,
    LiveFeed,
    MarketDataSettings,
    build,
    make_ccxt_client,
)
from tests.fakes.bybit_ws import BAR_MS, T0_MS, FakeBybit, bar_row, real_clock_t0
from tests.helpers import eventually
from tests.integration.signal_path_helpers import FAST, running

SYMBOL = "BTC/USDT:USDT"


class Clock:
    def __init__(self) -> None:
        self.now_ns = 0

    def at_bar(self, i: int, seconds_in: int = 30) -> None:
        """Now is `seconds_in` into bar i: bars before i are closed, bar i is forming."""
        self.now_ns = (T0_MS + i * BAR_MS) * 1_000_000 + seconds_in * 1_000_000_000

    def __call__(self) -> int:
        return self.now_ns


@pytest.fixture
async def venue() -> AsyncIterator[tuple[FakeBybit, str]]:
    fake = FakeBybit()
    async with fake.serving() as (api_url, _ws_url):
        yield fake, api_url


class Harness:
    def __init__(self, url: str, api_url: str, client: aioredis.Redis, clock: Clock) -> None:
        self.url = url
        self.client = client
        self.clock = clock
        self.settings = MarketDataSettings(
            REDIS_URL=url,
            SERVICE_NAME="market-data",
            MARKET_DATA_MODE="live",
            EXCHANGE="bybit",
            SYMBOLS=SYMBOL,
            LIVE_API_URL=api_url,
            LIVE_TRANSPORT="rest",
            LIVE_POLL_INTERVAL_S="0.02",
            LIVE_BACKOFF_MAX_S="0.1",
            LIVE_HISTORY_BARS="300",
            LIVE_FETCH_LIMIT="100",
            LIVE_TIMEOUT_MS="2000",
        )
        self.bus: EventBus | None = None
        self.feed: LiveFeed | None = None

    async def start(self) -> LiveFeed:
        self.bus = EventBus.redis(CoreSettings(REDIS_URL=self.url, SERVICE_NAME="market-data"))
        await self.bus.start()
        self.feed = LiveFeed(
            self.bus,
            make_ccxt_client(self.settings),
            LastBarStore(self.client, "hean:market_data:test:last_bar"),
            symbols=(SYMBOL,),
            timeframe="1m",
            poll_interval_s=0.02,
            history_bars=300,
            fetch_limit=100,
            backoff_max_s=0.1,
            wall_clock_ns=self.clock,
            exchange="bybit",
        )
        await self.feed.start()
        return self.feed

    async def stop(self) -> None:
        if self.feed is not None:
            await self.feed.stop()
        if self.bus is not None:
            await self.bus.stop()

    async def events(self, etype: EventType) -> list[Event]:
        async with RedisEventStream(self.url) as stream:
            return [e async for e in stream.replay_events(etype)]

    async def bar_indices(self) -> list[int]:
        return [
            (e.data["timestamp"] // 1_000_000 - T0_MS) // BAR_MS
            for e in await self.events(EventType.CANDLE)
        ]


@pytest.fixture
async def harness(
    venue: tuple[FakeBybit, str], redis_url: str, redis_client: aioredis.Redis
) -> AsyncIterator[Harness]:
    h = Harness(redis_url, venue[1], redis_client, Clock())
    yield h
    await h.stop()


async def _has_bars(h: Harness, count: int) -> bool:
    return len(await h.bar_indices()) >= count


async def test_live_feed_reconnects_after_errors_and_disconnects_without_duplicates(
    venue: tuple[FakeBybit, str], harness: Harness
) -> None:
    fake, _ = venue
    fake.add(*range(0, 301))  # bar 300 is still forming
    harness.clock.at_bar(300)
    feed = await harness.start()

    await eventually(lambda: _has_bars(harness, 300), timeout=15, message="300 history bars")
    assert await harness.bar_indices() == list(range(300))

    async def forming_close_ticked() -> bool:  # the forming bar's close is the last price
        ticks = await harness.events(EventType.TICK)
        return [t.data["price"] for t in ticks] == [Decimal(bar_row(300)[4])]

    await eventually(forming_close_ticked, timeout=5, message="a TICK at the forming close")

    fake.fail_next = 3
    await eventually(lambda: feed.reconnects >= 1, timeout=10, message="a reconnect after 503")
    fake.add(*range(301, 306))
    harness.clock.at_bar(305)
    await eventually(lambda: _has_bars(harness, 305), timeout=15, message="bars up to 304")

    fake.drop_next = 2
    reconnects = feed.reconnects
    await eventually(
        lambda: feed.reconnects > reconnects, timeout=10, message="a reconnect after a drop"
    )
    fake.add(*range(306, 311))
    harness.clock.at_bar(310)
    await eventually(lambda: _has_bars(harness, 310), timeout=15, message="bars up to 309")
    await eventually(lambda: feed.connected, timeout=10, message="the feed connected again")

    assert await harness.bar_indices() == list(range(310))  # none twice, none out of order
    assert feed.health_check() == {"state": "healthy"}
    assert await harness.events(EventType.ERROR) == []
    stored = await harness.client.hget("hean:market_data:test:last_bar", SYMBOL)
    assert stored is not None
    assert int(stored) == (T0_MS + 309 * BAR_MS) * 1_000_000


async def test_live_feed_missing_bars_reported_as_gap_in_error_and_health(
    venue: tuple[FakeBybit, str], harness: Harness
) -> None:
    fake, _ = venue
    fake.add(*range(0, 301))
    harness.clock.at_bar(300)
    feed = await harness.start()
    await eventually(lambda: _has_bars(harness, 300), timeout=15, message="history bars")

    fake.add(300, *range(304, 308))  # bars 301-303 never existed on the venue
    harness.clock.at_bar(307)
    await eventually(lambda: _has_bars(harness, 304), timeout=15, message="bars after the gap")

    errors = await harness.events(EventType.ERROR)
    assert len(errors) == 1
    assert errors[0].data["component"] == "market_data"
    assert errors[0].data["missing_bars"] == 3
    assert errors[0].data["symbol"] == SYMBOL
    health = feed.health_check()
    assert health["state"] == "degraded"
    assert "3 bar(s) missing" in health["error_message"]
    assert await harness.bar_indices() == [*range(301), 304, 305, 306]


async def test_live_feed_keeps_publishing_when_saving_its_resume_point_fails(
    venue: tuple[FakeBybit, str], harness: Harness
) -> None:
    """Saving the last bar (where a restart resumes) happens after the bars are in Redis;
    a failed save is reported in health and retried with the next bar, never fatal."""
    fake, _ = venue
    fake.add(*range(0, 301))
    harness.clock.at_bar(300)
    feed = await harness.start()
    await eventually(lambda: _has_bars(harness, 300), timeout=15, message="history bars")

    key = "hean:market_data:test:last_bar"
    await harness.client.delete(key)
    await harness.client.set(key, "not a hash")  # every save now fails (WRONGTYPE)
    fake.add(*range(301, 304))
    harness.clock.at_bar(303)
    await eventually(lambda: _has_bars(harness, 303), timeout=15, message="bars 300-302")
    await eventually(lambda: _true(feed.store_error is not None), timeout=5, message="error")
    health = feed.health_check()
    assert health["state"] == "degraded"
    assert "cannot save where to resume" in health["error_message"]
    assert "WRONGTYPE" in health["error_message"]

    await harness.client.delete(key)
    fake.add(*range(304, 306))
    harness.clock.at_bar(305)
    await eventually(lambda: _has_bars(harness, 305), timeout=15, message="bars 303-304")
    await eventually(lambda: _true(feed.store_error is None), timeout=5, message="saved again")
    assert feed.health_check() == {"state": "healthy"}
    assert await harness.bar_indices() == list(range(305))
    stored = await harness.client.hget(key, SYMBOL)
    assert stored is not None and int(stored) == (T0_MS + 304 * BAR_MS) * 1_000_000


async def _true(value: bool) -> bool:
    return value


async def test_live_feed_restart_resumes_after_last_stored_bar(
    venue: tuple[FakeBybit, str], harness: Harness
) -> None:
    fake, _ = venue
    fake.add(*range(0, 301))
    harness.clock.at_bar(300)
    await harness.start()
    await eventually(lambda: _has_bars(harness, 300), timeout=15, message="history bars")
    await harness.stop()

    fake.add(*range(301, 304))
    harness.clock.at_bar(303)
    requests_before = fake.kline_requests
    feed = await harness.start()
    assert feed.tracker.last_bar_ns[SYMBOL] == (T0_MS + 299 * BAR_MS) * 1_000_000
    await eventually(lambda: _has_bars(harness, 303), timeout=15, message="bars after restart")
    assert await harness.bar_indices() == list(range(303))
    assert fake.kline_requests > requests_before


async def test_market_data_service_live_mode_publishes_closed_bars_healthy(
    venue: tuple[FakeBybit, str], redis_url: str, redis_client: aioredis.Redis
) -> None:
    fake, api_url = venue
    fake.t0_ms = await real_clock_t0(50)
    fake.add(*range(51))  # bar 50 is the one forming now (real clock)
    settings = MarketDataSettings(
        REDIS_URL=redis_url,
        SERVICE_NAME="market-data",
        MARKET_DATA_MODE="live",
        EXCHANGE="bybit",
        SYMBOLS=SYMBOL,
        LIVE_API_URL=api_url,
        LIVE_TRANSPORT="rest",
        LIVE_HISTORY_BARS=50,
        LIVE_POLL_INTERVAL_S=0.05,
        **FAST,
    )
    async with running("market-data", build, settings):

        async def fifty_bars_and_healthy() -> bool:
            if int(await redis_client.xlen("hean:events:CANDLE")) < 50:
                return False
            snaps = await read_snapshots(redis_client)
            return [s["health"]["orchestrator"]["overall_state"] for s in snaps] == ["healthy"]

        await eventually(fifty_bars_and_healthy, timeout=15, message="50 bars, healthy")
    async with RedisEventStream(redis_url) as stream:
        bars = [e.data["timestamp"] async for e in stream.replay_events(EventType.CANDLE)]
    expected = [(fake.t0_ms + i * BAR_MS) * 1_000_000 for i in range(len(bars))]
    assert bars == expected  # in order, none twice (bar 50 too if the minute turned)
