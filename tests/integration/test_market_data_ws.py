"""market-data live mode over the websocket (ccxt.pro `watch_ohlcv`) against a local fake
Bybit v5 venue (tests/fakes/bybit_ws.py: REST klines and the public websocket, aiohttp on
127.0.0.1, never the internet), on a real Redis. Real ccxt talks to the fake unchanged.

The fake pushes kline updates when the test says so (and repeats the newest one, as a live
market does); a bar is closed once a newer one is pushed. REST backfill decides "closed" by
the feed's clock, which these tests move (`Clock`), except the process test (real time).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.health import read_snapshots
from hean.core.settings import CoreSettings, SettingsError, load_settings
from hean.core.types import Event, EventType
from hean.market_data.service import (
    LastBarStore,
    MarketDataSettings,
    WebSocketFeed,
    build,
    make_ccxt_client,
)
from tests.conftest import ROOT, free_port
from tests.fakes.bybit_ws import BAR_MS, T0_MS, FakeBybit, real_clock_t0
from tests.helpers import eventually
from tests.integration.signal_path_helpers import FAST, read, running

SYMBOL = "BTC/USDT:USDT"
STORE_KEY = "hean:market_data:test:last_bar"


class Clock:
    """The feed's wall clock, moved by the test (REST backfill closes bars by it)."""

    def __init__(self, t0_ms: int = T0_MS) -> None:
        self.t0_ms = t0_ms
        self.now_ns = 0

    def at_bar(self, i: int, seconds_in: int = 30) -> None:
        """Now is `seconds_in` into bar i: bars before i are closed, bar i is forming."""
        self.now_ns = (self.t0_ms + i * BAR_MS) * 1_000_000 + seconds_in * 1_000_000_000

    def __call__(self) -> int:
        return self.now_ns


@pytest.fixture
async def venue() -> AsyncIterator[tuple[FakeBybit, str, str]]:
    fake = FakeBybit(repeat_s=0.05)
    async with fake.serving() as (api_url, ws_url):
        yield fake, api_url, ws_url


def live_settings(redis_url: str, api_url: str, ws_url: str, **extra: Any) -> MarketDataSettings:
    values: dict[str, Any] = {
        "REDIS_URL": redis_url,
        "SERVICE_NAME": "market-data",
        "MARKET_DATA_MODE": "live",
        "EXCHANGE": "bybit",
        "SYMBOLS": SYMBOL,
        "LIVE_API_URL": api_url,
        "LIVE_WS_URL": ws_url,
        "LIVE_TRANSPORT": "websocket",
        "LIVE_BACKOFF_MAX_S": "0.1",
        "LIVE_FETCH_LIMIT": "100",
        "LIVE_TIMEOUT_MS": "2000",
    }
    values.update(extra)
    return MarketDataSettings(**values)


class Harness:
    """A WebSocketFeed on a real Redis bus, against the fake venue."""

    def __init__(self, url: str, venue: tuple[FakeBybit, str, str], client: aioredis.Redis) -> None:
        self.url = url
        self.fake, api_url, ws_url = venue
        self.client = client
        self.clock = Clock()
        self.settings = live_settings(url, api_url, ws_url)
        self.bus: EventBus | None = None
        self.feed: WebSocketFeed | None = None

    async def start(self) -> WebSocketFeed:
        self.bus = EventBus.redis(CoreSettings(REDIS_URL=self.url, SERVICE_NAME="market-data"))
        await self.bus.start()
        self.feed = WebSocketFeed(
            self.bus,
            make_ccxt_client(self.settings, websocket=True),
            LastBarStore(self.client, STORE_KEY),
            symbols=(SYMBOL,),
            timeframe="1m",
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
            self.feed = None
        if self.bus is not None:
            await self.bus.stop()
            self.bus = None

    async def events(self, etype: EventType) -> list[Event]:
        return await read(self.url, etype)

    async def bar_indices(self) -> list[int]:
        return [
            (e.data["timestamp"] // 1_000_000 - T0_MS) // BAR_MS
            for e in await self.events(EventType.CANDLE)
        ]

    async def has_bars(self, count: int) -> bool:
        return len(await self.bar_indices()) >= count

    async def wait_bars(self, count: int, message: str) -> None:
        await eventually(lambda: self.has_bars(count), timeout=15, message=message)

    async def tick_prices(self) -> list[Decimal]:
        return [t.data["price"] for t in await self.events(EventType.TICK)]

    async def subscribed_after(self, accepted: int) -> None:
        """Wait for a websocket connection newer than the `accepted`-th to subscribe."""
        await eventually(
            lambda: self.fake.ws_accepted > accepted and self.fake.subscribed() > 0,
            timeout=15,
            message="the feed subscribed over a new connection",
        )

    async def started_with_history(self) -> WebSocketFeed:
        """History bars 0-299 on the venue, now in bar 300: the feed backfills them over
        REST and subscribes."""
        self.fake.add(*range(300))
        self.clock.at_bar(300)
        feed = await self.start()
        await self.wait_bars(300, "300 history bars over REST")
        await self.subscribed_after(0)
        return feed


@pytest.fixture
async def harness(
    venue: tuple[FakeBybit, str, str], redis_url: str, redis_client: aioredis.Redis
) -> AsyncIterator[Harness]:
    h = Harness(redis_url, venue, redis_client)
    yield h
    await h.stop()


async def test_ws_feed_bars_once_in_order_forming_updates_only_tick(harness: Harness) -> None:
    fake = harness.fake
    feed = await harness.started_with_history()
    assert await harness.bar_indices() == list(range(300))

    await fake.push(300, close="40100")

    async def ticked(*prices: str) -> bool:
        return (await harness.tick_prices())[-len(prices) :] == [Decimal(p) for p in prices]

    await eventually(lambda: ticked("40100"), timeout=10, message="a TICK at 40100")
    await fake.push(300, close="40110.5")
    await eventually(lambda: ticked("40100", "40110.5"), timeout=10, message="TICK at 40110.5")
    # The fake kept re-pushing the forming bar meanwhile: no CANDLE for it, no repeated TICK.
    assert await harness.bar_indices() == list(range(300))
    assert await harness.tick_prices() == [Decimal("40100"), Decimal("40110.5")]

    await fake.push(301)  # a newer bar: 300 is closed
    await harness.wait_bars(301, "bar 300 closed by bar 301")
    candle = (await harness.events(EventType.CANDLE))[-1]
    assert candle.data["close"] == Decimal("40110.5")  # its last update, not the first
    assert candle.data["high"] == Decimal("40110.5")

    await fake.push(302)
    await fake.push(303)
    await harness.wait_bars(303, "bars 301 and 302 closed")
    assert await harness.bar_indices() == list(range(303))  # once each, in order
    assert feed.connected and feed.health_check() == {"state": "healthy"}
    assert await harness.events(EventType.ERROR) == []
    assert feed.bars_fetched_for_holes == 0  # the stream had every bar


async def test_ws_feed_server_drop_and_refusal_reconnects_backfills_without_duplicates(
    harness: Harness,
) -> None:
    fake = harness.fake
    feed = await harness.started_with_history()
    await fake.push(300)
    await fake.push(301)
    await harness.wait_bars(301, "bar 300 over the websocket")

    # The venue closes the connection and refuses new ones for a while.
    fake.refuse_ws = True
    await fake.drop()
    # Both sides counted three: the fake refuses before the feed has read the refusal.
    await eventually(
        lambda: fake.ws_refused >= 3 and feed.reconnects >= 3,
        timeout=15,
        message="reconnect attempts",
    )
    assert not feed.connected
    health = feed.health_check()
    assert health["state"] == "degraded"
    assert "websocket" in health["error_message"] and "503" in health["error_message"]

    # Bars 301-304 close while the websocket is out: each attempt's REST backfill takes them.
    fake.add(*range(301, 306))
    harness.clock.at_bar(305)
    await harness.wait_bars(305, "bars missed during the outage, backfilled over REST")

    accepted = fake.ws_accepted
    fake.refuse_ws = False
    await harness.subscribed_after(accepted)
    await fake.push(305)
    await fake.push(306)
    await harness.wait_bars(306, "bar 305 over the websocket again")
    await eventually(lambda: feed.connected, timeout=10, message="connected again")

    assert await harness.bar_indices() == list(range(306))  # none twice, none out of order
    assert feed.health_check() == {"state": "healthy"}
    assert await harness.events(EventType.ERROR) == []
    stored = await harness.client.hget(STORE_KEY, SYMBOL)
    assert stored is not None and int(stored) == (T0_MS + 305 * BAR_MS) * 1_000_000


async def test_ws_feed_abrupt_disconnect_bars_missed_fetched_before_streaming_on(
    harness: Harness,
) -> None:
    fake = harness.fake
    feed = await harness.started_with_history()
    await fake.push(300)
    await fake.push(301)
    await harness.wait_bars(301, "bar 300 over the websocket")

    reconnects, accepted = feed.reconnects, fake.ws_accepted
    fake.cut()  # no close frame: the network went away
    # Bars 301-303 happen while nobody listens; the feed's clock has not moved, so the
    # reconnect backfill does not take them: the stream's first closed bar shows the hole.
    fake.add(301, 302, 303)
    await eventually(lambda: feed.reconnects > reconnects, timeout=15, message="a reconnect")
    await harness.subscribed_after(accepted)
    await fake.push(304)
    await fake.push(305)
    await harness.wait_bars(305, "bars 301-304")

    assert await harness.bar_indices() == list(range(305))
    # 302 and 303 came over REST (301 too, unless the venue's repeat of its forming bar 301
    # reached the new connection before bar 304 did).
    assert feed.bars_fetched_for_holes >= 2
    assert await harness.events(EventType.ERROR) == []
    await eventually(lambda: feed.connected, timeout=10, message="connected again")
    assert feed.health_check() == {"state": "healthy"}


async def test_ws_feed_bars_the_venue_lacks_reported_as_gap_in_error_and_health(
    harness: Harness,
) -> None:
    fake = harness.fake
    feed = await harness.started_with_history()
    await fake.push(300)
    await fake.push(301)
    await harness.wait_bars(301, "bar 300")

    await fake.push(305)  # bars 302-304 never existed, on the stream or over REST
    await fake.push(306)
    await harness.wait_bars(303, "bars after the gap")

    assert await harness.bar_indices() == [*range(302), 305]
    errors = await harness.events(EventType.ERROR)
    assert len(errors) == 1
    assert errors[0].data["component"] == "market_data"
    assert errors[0].data["symbol"] == SYMBOL
    assert errors[0].data["missing_bars"] == 3
    health = feed.health_check()
    assert health["state"] == "degraded"
    assert "3 bar(s) missing" in health["error_message"]


async def test_ws_feed_restart_resumes_after_the_last_published_bar(harness: Harness) -> None:
    fake = harness.fake
    await harness.started_with_history()
    await fake.push(300)
    await fake.push(301)
    await harness.wait_bars(301, "bar 300")
    await harness.stop()

    fake.add(301, 302)  # closed while the service was down
    harness.clock.at_bar(303)
    accepted = fake.ws_accepted
    feed = await harness.start()
    assert feed.tracker.last_bar_ns[SYMBOL] == (T0_MS + 300 * BAR_MS) * 1_000_000
    await harness.wait_bars(303, "bars 301-302 backfilled after the restart")
    await harness.subscribed_after(accepted)
    await fake.push(303)
    await fake.push(304)
    await harness.wait_bars(304, "bar 303 over the websocket")
    assert await harness.bar_indices() == list(range(304))


async def test_market_data_live_transport_rest_polls_without_websocket(
    venue: tuple[FakeBybit, str, str], redis_url: str, redis_client: aioredis.Redis
) -> None:
    fake, api_url, ws_url = venue
    fake.t0_ms = await real_clock_t0(20)
    fake.add(*range(20))
    settings = live_settings(
        redis_url,
        api_url,
        ws_url,
        LIVE_TRANSPORT="rest",
        LIVE_HISTORY_BARS=20,
        LIVE_POLL_INTERVAL_S=0.05,
        **FAST,
    )
    assert not settings.live_websocket
    async with running("market-data", build, settings):

        async def polled_twenty() -> bool:
            return int(await redis_client.xlen("hean:events:CANDLE")) >= 20

        await eventually(polled_twenty, timeout=15, message="20 bars polled")
        requests = fake.kline_requests
        await eventually(lambda: fake.kline_requests > requests + 2, message="polling goes on")
    assert fake.ws_accepted == 0 and fake.ws_refused == 0


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LIVE_TRANSPORT": "carrier-pigeon"}, "LIVE_TRANSPORT"),
        ({"LIVE_TRANSPORT": "websocket", "EXCHANGE": "bitstamp"}, "LIVE_TRANSPORT"),
        ({"LIVE_TRANSPORT": "websocket", "EXCHANGE": "coinmate"}, "LIVE_TRANSPORT"),
        ({"LIVE_WS_URL": "http://127.0.0.1:9"}, "LIVE_WS_URL"),
    ],
)
def test_market_data_settings_bad_live_transport_refused_naming_variable(
    env: dict[str, str], variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {"MARKET_DATA_MODE": "live", "EXCHANGE": "bybit", "SYMBOLS": SYMBOL}
    for key, value in {**base, **env}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=variable) as caught:
        load_settings(MarketDataSettings)
    assert str(caught.value).count(":") >= 1


def test_market_data_process_websocket_without_watch_ohlcv_stops_at_start(
    subprocess_env: dict[str, str],
) -> None:
    env = {
        **subprocess_env,
        "MARKET_DATA_MODE": "live",
        "EXCHANGE": "bitstamp",
        "LIVE_TRANSPORT": "websocket",
    }
    result = subprocess.run(
        [sys.executable, "-m", "hean.market_data"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert "LIVE_TRANSPORT" in stderr and "watchOHLCV" in stderr


@contextlib.contextmanager
def market_data_process(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hean.market_data"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_market_data_process_streams_over_websocket_and_recovers_from_a_drop(
    venue: tuple[FakeBybit, str, str],
    redis_client: aioredis.Redis,
    subprocess_env: dict[str, str],
    tmp_path: Path,
) -> None:
    fake, api_url, ws_url = venue
    # Real time here: bar 50 is the one forming now.
    fake.t0_ms = await real_clock_t0(50)
    fake.add(*range(50))
    port = free_port()
    env = {
        **subprocess_env,
        "SERVICE_NAME": "market-data",
        "MARKET_DATA_MODE": "live",
        "EXCHANGE": "bybit",
        "SYMBOLS": SYMBOL,
        "LIVE_API_URL": api_url,
        "LIVE_WS_URL": ws_url,  # LIVE_TRANSPORT left at auto: websocket for bybit
        "LIVE_HISTORY_BARS": "50",
        "LIVE_BACKOFF_MAX_S": "0.2",
        "HEALTH_PORT": str(port),
        "HEALTH_INTERVAL_S": "0.2",
        "HEALTH_TTL_S": "2",
        "EVENT_BLOCK_MS": "50",
    }

    async def stamps() -> list[int]:
        return [
            (e.data["timestamp"] // 1_000_000 - fake.t0_ms) // BAR_MS
            for e in await read(subprocess_env["REDIS_URL"], EventType.CANDLE)
        ]

    async def component() -> dict[str, Any]:
        snaps = await read_snapshots(redis_client)
        return dict(snaps[0]["health"]["components"]["market_data"]) if snaps else {}

    async def healthy() -> bool:
        return (await component()).get("state") == "healthy"

    async def reconnects_metric() -> float:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            text = await response.text()
        for line in text.splitlines():
            if line.startswith("hean_market_data_reconnects_total "):
                return float(line.split()[1])
        return -1.0

    with market_data_process(env, tmp_path / "market-data.log") as proc:

        async def subscribed() -> bool:
            assert proc.poll() is None, (tmp_path / "market-data.log").read_text()
            return fake.subscribed() > 0

        await eventually(subscribed, timeout=30, message="the process subscribed")
        await eventually(lambda: _count(stamps, 50), timeout=15, message="50 history bars")
        await fake.push(50)
        await fake.push(51)
        await eventually(lambda: _count(stamps, 51), timeout=15, message="bar 50 via websocket")
        await eventually(healthy, timeout=15, message="healthy while streaming")

        accepted = fake.ws_accepted
        await fake.drop()
        await eventually(
            lambda: fake.ws_accepted > accepted and fake.subscribed() > 0,
            timeout=15,
            message="the process reconnected",
        )
        await fake.push(52)
        await fake.push(53)  # bar 51's last update went nowhere: fetched over REST
        await eventually(lambda: _count(stamps, 53), timeout=15, message="bars 51 and 52")
        await eventually(healthy, timeout=15, message="healthy after the reconnect")
        assert await reconnects_metric() >= 1.0
        assert proc.poll() is None

    assert await stamps() == list(range(53))  # none twice, none out of order


async def _count(stamps: Any, expected: int) -> bool:
    return len(await stamps()) >= expected


async def test_ws_feed_stop_while_waiting_for_pushes_returns(harness: Harness) -> None:
    harness.fake.repeat_s = 0.0  # a silent market: the watch waits
    feed = await harness.started_with_history()
    await asyncio.wait_for(harness.stop(), 10)
    assert feed.error is None
