"""market-data wiring: candles from a file (replay) or an exchange (live) onto the bus.

Replay (`MARKET_DATA_MODE=replay`, the default) publishes the bundled BTC 1-minute file,
bar by bar, as the TICKs inside each bar and then the bar's CANDLE, for every symbol in
SYMBOLS, at REPLAY_SPEED times real time (0: as fast as the consumers keep up).

Live (`MARKET_DATA_MODE=live`) takes the EXCHANGE's bars through ccxt, over one of two
transports (`LIVE_TRANSPORT`; `auto`, the default, picks the websocket where ccxt.pro offers
`watchOHLCV` for the exchange, REST otherwise):

- websocket (`WebSocketFeed`): ccxt.pro `watch_ohlcv` per symbol. The forming bar is pushed
  again and again; its close changes go out as TICKs, and the bar goes out as a CANDLE once
  a newer bar has been pushed (it is closed then). REST `fetch_ohlcv` still backfills: the
  history at the first start and the bars closed while disconnected after each
  (re)connect, and any bar the stream skipped before it is published.
- REST (`LiveFeed`): polls `fetch_ohlcv` every LIVE_POLL_INTERVAL_S; a bar is closed once
  the clock has passed its end and the exchange answers with a newer bar, or 10 s (at
  most half a bar) after its end if it shows none (`BarTracker.accept`).

Both reconnect with backoff and keep the last published bar per symbol in Redis, so neither
a reconnect nor a restart publishes a bar twice or out of order; bars the exchange itself
lacks are reported as a gap (health and an ERROR event). Health is degraded, with the
reason, while the exchange is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from pydantic import Field, ValidationInfo, field_validator

from hean.core.bus import Backoff, EventBus
from hean.core.candles import (
    Candle,
    LoadReport,
    LoadResult,
    bundled_data_path,
    load_candles,
    validate_candle_rows,
)
from hean.core.errors import QueueFullError
from hean.core.event_streams import as_str, newest_events, stream_key
from hean.core.features import WARMUP_BARS
from hean.core.metrics import Metrics
from hean.core.service import ServiceContext
from hean.core.settings import CoreSettings, ExchangeSettings
from hean.core.types import Event, EventType
from hean.market_data.core import (
    BarTracker,
    Gap,
    StreamedBars,
    replay_offset_s,
    replay_shift_ns,
    shifted,
    ticks_for_bar,
    timeframe_ns,
)

log = logging.getLogger(__name__)

COMPONENT = "market_data"
NS_PER_MS = 1_000_000


class MarketDataSettings(CoreSettings, ExchangeSettings):
    market_data_mode: Literal["replay", "live"] = Field(default="replay", alias="MARKET_DATA_MODE")
    symbols_csv: str = Field(default="BTC/USDT", alias="SYMBOLS")
    timeframe: str = Field(default="1m", alias="TIMEFRAME")

    replay_data_path: str = Field(default="", alias="REPLAY_DATA_PATH")
    replay_speed: Annotated[float, Field(ge=0, le=1e9)] = Field(default=60.0, alias="REPLAY_SPEED")
    replay_warmup_bars: Annotated[int, Field(ge=0)] = Field(
        default=WARMUP_BARS, alias="REPLAY_WARMUP_BARS"
    )
    replay_loop: bool = Field(default=False, alias="REPLAY_LOOP")
    replay_ticks: bool = Field(default=True, alias="REPLAY_TICKS")
    replay_max_bars: Annotated[int, Field(ge=0)] = Field(default=0, alias="REPLAY_MAX_BARS")
    replay_max_lag: Annotated[int, Field(ge=0)] = Field(default=5000, alias="REPLAY_MAX_LAG")
    replay_max_outbox: Annotated[int, Field(gt=0)] = Field(default=2000, alias="REPLAY_MAX_OUTBOX")

    live_poll_interval_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=5.0, alias="LIVE_POLL_INTERVAL_S"
    )
    live_history_bars: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=300, alias="LIVE_HISTORY_BARS"
    )
    live_fetch_limit: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=200, alias="LIVE_FETCH_LIMIT"
    )
    live_backoff_max_s: Annotated[float, Field(gt=0, le=600)] = Field(
        default=30.0, alias="LIVE_BACKOFF_MAX_S"
    )
    live_timeout_ms: Annotated[int, Field(gt=0, le=120_000)] = Field(
        default=10_000, alias="LIVE_TIMEOUT_MS"
    )
    live_market_type: Literal["linear", "inverse", "spot"] = Field(
        default="linear", alias="LIVE_MARKET_TYPE"
    )
    live_api_url: str = Field(default="", alias="LIVE_API_URL")
    live_transport: Literal["auto", "websocket", "rest"] = Field(
        default="auto", alias="LIVE_TRANSPORT"
    )
    live_ws_url: str = Field(default="", alias="LIVE_WS_URL")

    @field_validator("symbols_csv")
    @classmethod
    def _symbols(cls, value: str) -> str:
        symbols = [s.strip() for s in value.split(",") if s.strip()]
        if not symbols:
            raise ValueError("must name at least one symbol (comma-separated)")
        if len(set(symbols)) != len(symbols):
            raise ValueError("lists a symbol twice")
        return ",".join(symbols)

    @field_validator("market_data_mode")
    @classmethod
    def _live_needs_exchange(cls, value: str, info: ValidationInfo) -> str:
        if value == "live":
            import ccxt.async_support as ccxt_async  # type: ignore[import-untyped]

            exchange = str(info.data.get("exchange", "")).lower()
            if exchange == "paper" or not hasattr(ccxt_async, exchange):
                raise ValueError(
                    f"live mode needs EXCHANGE set to a ccxt exchange id (got {exchange!r})"
                )
        return value

    @field_validator("live_transport")
    @classmethod
    def _websocket_needs_watch_ohlcv(cls, value: str, info: ValidationInfo) -> str:
        if value == "websocket" and info.data.get("market_data_mode") == "live":
            exchange = str(info.data.get("exchange", "")).lower()
            if not watch_ohlcv_supported(exchange):
                raise ValueError(
                    f"websocket needs an exchange whose ccxt.pro class offers watchOHLCV "
                    f"({exchange!r} does not; use auto or rest)"
                )
        return value

    @field_validator("live_ws_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        value = value.strip()
        if value and urlsplit(value).scheme not in ("ws", "wss"):
            raise ValueError("must be a ws:// or wss:// URL (or empty for the exchange's own)")
        return value.rstrip("/")

    @field_validator("timeframe")
    @classmethod
    def _timeframe(cls, value: str) -> str:
        timeframe_ns(value)
        return value.strip()

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(self.symbols_csv.split(","))

    @property
    def live_websocket(self) -> bool:
        """Whether live mode streams over the websocket (else it polls REST).

        `auto` streams where ccxt.pro offers watchOHLCV, except when only the REST URL is
        overridden: the websocket would then bypass that proxy (or fake exchange) and reach
        the real one, so `auto` polls REST instead."""
        if self.live_transport == "auto":
            if self.live_api_url and not self.live_ws_url:
                return False
            return watch_ohlcv_supported(self.exchange.lower())
        return self.live_transport == "websocket"


def watch_ohlcv_supported(exchange: str) -> bool:
    """Whether ccxt.pro has `exchange` and its class offers `watchOHLCV`."""
    import ccxt.pro as ccxt_pro  # type: ignore[import-untyped]

    cls = getattr(ccxt_pro, exchange, None) if exchange in ccxt_pro.exchanges else None
    return cls is not None and bool(cls().has.get("watchOHLCV"))


def candle_data(candle: Candle) -> dict[str, Any]:
    return {
        "symbol": candle.symbol,
        "open": candle.open,
        "high": candle.high,
        "low": candle.low,
        "close": candle.close,
        "volume": candle.volume,
        "timeframe": candle.timeframe,
        "timestamp": candle.timestamp_ns,
    }


class FeedMetrics:
    """market-data's own metric families, on the process registry."""

    def __init__(self, metrics: Metrics | None) -> None:
        registry = metrics.registry if metrics is not None else None
        self.bars = Counter(
            "hean_market_data_bars_total", "CANDLE events published", ["symbol"], registry=registry
        )
        self.ticks = Counter(
            "hean_market_data_ticks_total", "TICK events published", ["symbol"], registry=registry
        )
        self.bad_rows = Gauge(
            "hean_market_data_bad_rows", "Rows of the replay file skipped as bad", registry=registry
        )
        self.gaps = Counter(
            "hean_market_data_gaps_total", "Gaps in live bars", ["symbol"], registry=registry
        )
        self.reconnects = Counter(
            "hean_market_data_reconnects_total", "Live feed reconnects", registry=registry
        )


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds` unless `stop` is set first (pacing and backoff, never for a result)."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)


class _Feed:
    """Shared lifecycle: a background task started by `start` and ended by `stop`."""

    def __init__(self, bus: EventBus, metrics: Metrics | None) -> None:
        self.bus = bus
        self.m = FeedMetrics(metrics)
        self.bars_published = 0
        self.ticks_published = 0
        self.error: str | None = None
        #: Set while the bus outbox is full (Redis unreachable too long): publishing waits.
        self.paused: str | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._guarded(), name=f"{type(self).__name__}")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def join(self) -> None:
        """Wait until the feed ends by itself (a replay reaching the end of its file)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _guarded(self) -> None:
        try:
            await self._run()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("market-data feed stopped on an error")

    async def _run(self) -> None:
        raise NotImplementedError

    async def _send(self, event: Event) -> None:
        """Publish; while the bus outbox is full ("Queue is full": Redis unreachable for
        long), market data pauses rather than being dropped, and resumes when Redis takes
        the backlog. Returns without publishing only when the feed is stopping."""
        backoff = Backoff(initial=0.05, maximum=2.0)
        while True:
            try:
                await self.bus.publish(event)
            except QueueFullError as exc:
                if self.paused is None:
                    log.warning("%s; market data paused until Redis takes the backlog", exc)
                    self.paused = str(exc)
                if self._stop.is_set():
                    return
                await _wait(self._stop, backoff.next_delay())
                continue
            if self.paused is not None:
                log.info("Redis took the backlog; market data resumed")
                self.paused = None
            return

    def _paused_health(self) -> dict[str, Any] | None:
        if self.paused is None:
            return None
        return {"state": "degraded", "error_message": f"market data paused: {self.paused}"}

    async def _publish_candle(self, candle: Candle) -> None:
        await self._send(Event(event_type=EventType.CANDLE, data=candle_data(candle)))
        self.bars_published += 1
        self.m.bars.labels(candle.symbol).inc()

    async def _publish_tick(
        self, symbol: str, price: Decimal, volume: Decimal, timestamp_ns: int
    ) -> None:
        data = {"symbol": symbol, "price": price, "volume": volume, "timestamp": timestamp_ns}
        await self._send(Event(event_type=EventType.TICK, data=data))
        self.ticks_published += 1
        self.m.ticks.labels(symbol).inc()


LagProbe = Callable[[], Awaitable[int]]


def redis_lag_probe(client: aioredis.Redis) -> LagProbe:
    """Entries of the CANDLE stream not yet delivered to its slowest consumer group.

    0 while Redis cannot be asked: the replay then goes on into the bus's outbox, whose
    bound holds it back until Redis is back (an outage must not end the replay)."""

    async def lag() -> int:
        key = stream_key(EventType.CANDLE)
        try:
            groups = await client.xinfo_groups(key)
        except aioredis.ResponseError:
            return 0  # no stream yet
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            log.debug("lag probe: Redis unreachable (%s)", exc)
            return 0
        worst = 0
        for group in groups:
            value = group.get("lag") if isinstance(group, dict) else None
            if value is not None:
                worst = max(worst, int(value))
        return worst

    return lag


ResumeProbe = Callable[[], Awaitable[dict[str, int]]]


def redis_resume_probe(client: aioredis.Redis, count: int = 2000) -> ResumeProbe:
    """The newest CANDLE time per symbol already in Redis (from the stream's tail)."""

    async def newest() -> dict[str, int]:
        found: dict[str, int] = {}
        for event in reversed(await newest_events(client, EventType.CANDLE, count)):
            symbol, timestamp = str(event.data["symbol"]), event.data.get("timestamp")
            if timestamp is not None and symbol not in found:
                found[symbol] = int(timestamp)
        return found

    return newest


class ReplayFeed(_Feed):
    """Publishes a candle file as TICKs and CANDLEs (see the module docstring)."""

    def __init__(
        self,
        bus: EventBus,
        load: LoadResult,
        *,
        symbols: Sequence[str],
        bar_ns: int,
        speed: float,
        warmup_bars: int = 0,
        loop: bool = False,
        ticks: bool = True,
        max_bars: int = 0,
        max_outbox: int = 2000,
        max_lag: int = 0,
        lag_probe: LagProbe | None = None,
        resume_probe: ResumeProbe | None = None,
        metrics: Metrics | None = None,
        source: str = "",
    ) -> None:
        super().__init__(bus, metrics)
        self.resume_probe = resume_probe
        self.skipped_on_resume = 0
        candles = load.candles[:max_bars] if max_bars else load.candles
        if not candles:
            raise ValueError(f"no valid candles to replay in {source or 'the file'}")
        self.candles = candles
        self.report: LoadReport = load.report
        self.symbols = tuple(symbols)
        self.bar_ns = bar_ns
        self.speed = speed
        self.warmup_bars = warmup_bars
        self.loop = loop
        self.ticks = ticks
        self.max_outbox = max_outbox
        self.max_lag = max_lag
        self.lag_probe = lag_probe
        self.source = source
        self.loops_done = 0
        self.finished = False
        self.throttled = 0
        self.m.bad_rows.set(self.report.rows_skipped)

    async def _run(self) -> None:
        first, last = self.candles[0].timestamp_ns, self.candles[-1].timestamp_ns
        clock = asyncio.get_running_loop().time
        started = clock()
        n = 0
        warmup = self.warmup_bars
        # A restart continues after the newest bar already published (market time never
        # goes back: consumers would drop older bars as stale), with no new warm-up burst.
        newest = await self.resume_probe() if self.resume_probe is not None else {}
        resume_after = min((newest.get(s, -1) for s in self.symbols), default=-1)
        if resume_after >= 0:
            warmup = 0
            log.info("resuming the replay after the bars already in Redis (up to %d)", resume_after)
        while not self._stop.is_set():
            shift = replay_shift_ns(first, last, self.bar_ns, self.loops_done)
            for base in self.candles:
                if resume_after >= 0:
                    if base.timestamp_ns + shift <= resume_after:
                        self.skipped_on_resume += 1
                        continue
                    resume_after = -1
                if n == warmup:
                    # The warm-up bars went out as fast as consumers took them; pace the
                    # rest from now.
                    started = clock()
                due = started + replay_offset_s(n, self.bar_ns, self.speed, warmup)
                await _wait(self._stop, due - clock())
                if self._stop.is_set():
                    return
                for symbol in self.symbols:
                    candle = shifted(base, symbol, shift)
                    if self.ticks:
                        for tick in ticks_for_bar(candle, self.bar_ns):
                            await self._publish_tick(
                                symbol, tick.price, tick.volume, tick.timestamp_ns
                            )
                    await self._publish_candle(candle)
                n += 1
                await self._backpressure(n)
            self.loops_done += 1
            if not self.loop:
                break
        await self.bus.flush()
        self.finished = True
        log.info(
            "replay finished: %d bars and %d ticks published for %s",
            self.bars_published,
            self.ticks_published,
            ", ".join(self.symbols),
        )

    async def _backpressure(self, bars_done: int) -> None:
        if self.bus.health().outbox_size >= self.max_outbox:
            await self.bus.flush()
        if self.lag_probe is None or self.max_lag <= 0 or bars_done % 50:
            return
        delay = Backoff(initial=0.02, maximum=0.5)
        while not self._stop.is_set() and await self.lag_probe() > self.max_lag:
            self.throttled += 1
            await _wait(self._stop, delay.next_delay())

    def health_check(self) -> dict[str, Any]:
        if self.error is not None:
            return {"state": "unhealthy", "error_message": f"replay failed: {self.error}"}
        paused = self._paused_health()
        if paused is not None:
            return paused
        notes = []
        if self.report.rows_skipped:
            rows = ", ".join(f"row {p.row}: {p.reason}" for p in self.report.problems[:5])
            more = "" if self.report.rows_skipped <= 5 else ", ..."
            notes.append(
                f"{self.report.rows_skipped} bad row(s) of {self.report.rows_read} skipped in "
                f"{self.source} ({rows}{more})"
            )
        if self.finished:
            notes.append(f"replay finished after {self.bars_published} bars")
        result: dict[str, Any] = {"state": "healthy"}
        if notes:
            result["error_message"] = "; ".join(notes)
        return result


class LastBarStore:
    """The last published bar per symbol, in a Redis hash (survives restarts)."""

    def __init__(self, client: aioredis.Redis, key: str) -> None:
        self.client = client
        self.key = key

    async def load(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.key)
        return {as_str(k): int(as_str(v)) for k, v in raw.items()}

    async def save(self, symbol: str, bar_ns: int) -> None:
        await self.client.hset(self.key, symbol, str(bar_ns))


def rows_to_candles(symbol: str, timeframe: str, rows: Sequence[Sequence[Any]]) -> list[Candle]:
    """ccxt OHLCV rows `[ms, o, h, l, c, v]` as validated candles (bad rows skipped, logged)."""
    named = (
        (
            i + 1,
            {
                "timestamp": str(row[0]) if len(row) > 0 and row[0] is not None else None,
                "open": _text(row, 1),
                "high": _text(row, 2),
                "low": _text(row, 3),
                "close": _text(row, 4),
                "volume": _text(row, 5),
            },
        )
        for i, row in enumerate(sorted(rows, key=lambda r: r[0] if r and r[0] is not None else 0))
    )
    return list(validate_candle_rows(named, symbol, timeframe, source=f"exchange {symbol}").candles)


def _text(row: Sequence[Any], i: int) -> str | None:
    return None if len(row) <= i or row[i] is None else str(row[i])


class LiveFeed(_Feed):
    """Polls ccxt `fetch_ohlcv` per symbol (see the module docstring)."""

    def __init__(
        self,
        bus: EventBus,
        client_factory: Callable[[], Any],
        store: LastBarStore,
        *,
        symbols: Sequence[str],
        timeframe: str,
        poll_interval_s: float = 5.0,
        history_bars: int = 300,
        fetch_limit: int = 200,
        backoff_max_s: float = 30.0,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        metrics: Metrics | None = None,
        exchange: str = "exchange",
    ) -> None:
        super().__init__(bus, metrics)
        self.client_factory = client_factory
        self.store = store
        self.symbols = tuple(symbols)
        self.timeframe = timeframe
        self.bar_ns = timeframe_ns(timeframe)
        self.poll_interval_s = poll_interval_s
        self.history_bars = history_bars
        self.fetch_limit = fetch_limit
        self.backoff_max_s = backoff_max_s
        self.clock_ns = wall_clock_ns
        self.exchange = exchange
        self.tracker = BarTracker(self.bar_ns)
        self.connected = False
        self.reconnects = 0
        self.failures = 0
        self.duplicates_dropped = 0
        self.gaps: list[Gap] = []
        self.bars_since_gap: dict[str, int] = {}
        self.last_error: str | None = None
        #: Why the last save of where to resume failed (None: saved).
        self.store_error: str | None = None
        self._last_tick: dict[str, Decimal] = {}

    @property
    def transport(self) -> str:
        return "REST"

    async def start(self) -> None:
        self.tracker = BarTracker.restore(self.bar_ns, await self.store.load())
        if self.tracker.last_bar_ns:
            log.info("resuming after bars %s", self.tracker.last_bar_ns)
        await super().start()

    async def _run(self) -> None:
        import ccxt.async_support as ccxt_async

        backoff = Backoff(initial=0.5, maximum=self.backoff_max_s)
        client: Any = None
        try:
            while not self._stop.is_set():
                try:
                    if client is None:
                        client = self.client_factory()
                    for symbol in self.symbols:
                        await self._poll(client, symbol)
                    self._connected(backoff)
                    await _wait(self._stop, self.poll_interval_s)
                except ccxt_async.BaseError as exc:
                    await _close_client(client)
                    client = None
                    await self._reconnect_after(exc, backoff)
        finally:
            await _close_client(client)

    def _connected(self, backoff: Backoff) -> None:
        if not self.connected:
            log.info("%s %s feed connected", self.exchange, self.transport)
        self.connected = True
        self.last_error = None
        backoff.reset()

    async def _reconnect_after(self, exc: Exception, backoff: Backoff) -> None:
        """Count a lost connection, say why in health, and wait out the backoff."""
        import ccxt.async_support as ccxt_async

        self.connected = False
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        kind = "network" if isinstance(exc, ccxt_async.NetworkError | OSError) else "exchange"
        self.m.reconnects.inc()
        delay = backoff.next_delay()
        log.warning(
            "%s %s %s error (%s); reconnecting in %.1f s",
            self.exchange,
            self.transport,
            kind,
            self.last_error,
            delay,
        )
        self.reconnects += 1
        await _wait(self._stop, delay)

    async def _poll(self, client: Any, symbol: str) -> None:
        bar_ms = self.bar_ns // NS_PER_MS
        now_ms = self.clock_ns() // NS_PER_MS
        since_ns = self.tracker.since_ns(symbol)
        if since_ns is None:
            start_ms = (now_ms // bar_ms - self.history_bars) * bar_ms
        else:
            start_ms = since_ns // NS_PER_MS
        while True:
            end_ms = start_ms + self.fetch_limit * bar_ms - 1
            candles = await self._fetch_window(client, symbol, start_ms, end_ms)
            result = self.tracker.accept(symbol, candles, self.clock_ns())
            self.duplicates_dropped += result.already_seen
            await self._publish(symbol, result.publish, result.gaps)
            await self._tick_forming(symbol, result.forming)
            if end_ms + 1 >= now_ms:
                return
            start_ms = end_ms + 1

    async def _fetch_window(
        self, client: Any, symbol: str, start_ms: int, end_ms: int
    ) -> list[Candle]:
        """One `fetch_ohlcv` page: bars opening from `start_ms` to `end_ms`. The end is always
        explicit: an exchange answering "the newest N bars" to an open-ended request would
        skip bars on catch-up (ADR 0004)."""
        rows = await client.fetch_ohlcv(
            symbol,
            self.timeframe,
            since=start_ms,
            limit=self.fetch_limit,
            params={"until": end_ms},
        )
        return rows_to_candles(symbol, self.timeframe, rows)

    async def _tick_forming(self, symbol: str, forming: Candle | None) -> None:
        """A TICK at the forming bar's close (the latest traded price) when it moved."""
        if forming is not None and self._last_tick.get(symbol) != forming.close:
            await self._publish_tick(symbol, forming.close, Decimal(0), self.clock_ns())
            self._last_tick[symbol] = forming.close

    async def _publish(self, symbol: str, candles: Sequence[Candle], gaps: Sequence[Gap]) -> None:
        for gap in gaps:
            self.gaps.append(gap)
            del self.gaps[:-100]
            self.bars_since_gap[symbol] = 0
            self.m.gaps.labels(symbol).inc()
            log.error("gap in %s bars from %s: %s", self.exchange, symbol, gap.describe())
            await self._send(
                Event(
                    event_type=EventType.ERROR,
                    data={
                        "component": COMPONENT,
                        "error": f"gap in bars: {gap.describe()}",
                        "symbol": symbol,
                        "missing_bars": gap.missing_bars,
                        "after_timestamp": gap.after_ns,
                        "next_timestamp": gap.next_ns,
                        "timestamp": gap.next_ns,
                    },
                )
            )
        if not candles:
            return
        for candle in candles:
            await self._publish_candle(candle)
            if symbol in self.bars_since_gap:
                self.bars_since_gap[symbol] += 1
        # In Redis before we remember them: a crash in between republishes (consumers drop
        # a bar they already have) rather than losing bars.
        await self.bus.flush()
        self.tracker.commit(symbol, candles)
        try:
            await self.store.save(symbol, candles[-1].timestamp_ns)
        except (aioredis.RedisError, OSError) as exc:
            # Only where a restart resumes: the bars are in Redis. The next bar's save
            # writes it; a restart before that republishes a few bars, which consumers
            # drop as already seen. Not a reason to stop the feed.
            self.store_error = f"{type(exc).__name__}: {exc}"
            log.warning("could not save the last %s bar (%s)", symbol, self.store_error)
        else:
            self.store_error = None

    def health_check(self) -> dict[str, Any]:
        if self.error is not None:
            return {"state": "unhealthy", "error_message": f"live feed failed: {self.error}"}
        paused = self._paused_health()
        if paused is not None:
            return paused
        if not self.connected:
            message = self.last_error or "not connected yet"
            return {
                "state": "degraded",
                "error_message": f"{self.exchange} ({self.transport}): {message}",
            }
        recent = [g for g in self.gaps if self.bars_since_gap.get(g.symbol, 0) < 60]
        if recent:
            return {
                "state": "degraded",
                "error_message": f"{len(self.gaps)} gap(s); last: {recent[-1].describe()}",
            }
        if self.store_error is not None:
            return {
                "state": "degraded",
                "error_message": f"cannot save where to resume after a restart: {self.store_error}",
            }
        return {"state": "healthy"}


async def _close_client(client: Any) -> None:
    """Close a ccxt client (its HTTP session and websockets); a failure to close is moot."""
    if client is not None:
        with contextlib.suppress(Exception):
            await client.close()


class WebSocketFeed(LiveFeed):
    """Streams ccxt.pro `watch_ohlcv` per symbol, with REST backfill (see the module
    docstring). `client_factory` must make ccxt.pro clients (they also speak REST)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams: dict[str, StreamedBars] = {}
        self.updates_received = 0
        self.bars_fetched_for_holes = 0

    @property
    def transport(self) -> str:
        return "websocket"

    async def _run(self) -> None:
        import ccxt.async_support as ccxt_async

        backoff = Backoff(initial=0.5, maximum=self.backoff_max_s)
        while not self._stop.is_set():
            client = self.client_factory()
            try:
                # Bars closed while we were away (or the history, at the first start):
                # REST, from the bar after the last one published.
                for symbol in self.symbols:
                    await self._poll(client, symbol)
                await self._stream(client, backoff)
            except (ccxt_async.BaseError, OSError) as exc:
                await _close_client(client)
                await self._reconnect_after(exc, backoff)
            else:
                await _close_client(client)

    async def _stream(self, client: Any, backoff: Backoff) -> None:
        """Watch every symbol until the feed stops (returns) or the connection fails (raises
        the first error; the other symbols' watches end with it)."""
        halt = asyncio.Event()
        self.streams = {s: StreamedBars(self.bar_ns) for s in self.symbols}

        async def watch(symbol: str) -> None:
            try:
                await self._watch(client, symbol, halt, backoff)
            finally:
                halt.set()

        async def relay_stop() -> None:
            await self._stop.wait()
            halt.set()

        relay = asyncio.create_task(relay_stop())
        try:
            results = await asyncio.gather(
                *(watch(s) for s in self.symbols), return_exceptions=True
            )
        finally:
            relay.cancel()
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _watch(self, client: Any, symbol: str, halt: asyncio.Event, backoff: Backoff) -> None:
        while not halt.is_set():
            rows = await self._next_update(client, symbol, halt)
            if rows is None:
                return
            self.updates_received += 1
            if not self.connected:
                self._connected(backoff)  # data flows: the subscription is live
            await self._on_update(client, symbol, rows)

    async def _next_update(
        self, client: Any, symbol: str, halt: asyncio.Event
    ) -> list[list[Any]] | None:
        """The next rows ccxt.pro hands over for `symbol`, or None once `halt` is set."""
        watch = asyncio.ensure_future(client.watch_ohlcv(symbol, self.timeframe, params={}))
        halted = asyncio.ensure_future(halt.wait())
        try:
            await asyncio.wait({watch, halted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            halted.cancel()
            if not watch.done():
                watch.cancel()
        if not watch.done() or watch.cancelled():
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            return None
        return cast(list[list[Any]], watch.result())

    async def _on_update(self, client: Any, symbol: str, rows: Sequence[Sequence[Any]]) -> None:
        stream = self.streams[symbol]
        stream.update(rows_to_candles(symbol, self.timeframe, rows))
        hole = stream.missing(self.tracker.last_bar_ns.get(symbol))
        if hole is not None:
            fetched = await self._fetch_range(client, symbol, *hole)
            self.bars_fetched_for_holes += len(fetched)
            stream.fill(fetched)
        newest = stream.newest_ns()
        if newest is None:
            return
        result = self.tracker.accept(symbol, stream.candles(), newest)
        self.duplicates_dropped += result.already_seen
        await self._publish(symbol, result.publish, result.gaps)
        stream.prune(self.tracker.last_bar_ns.get(symbol))
        await self._tick_forming(symbol, result.forming)

    async def _fetch_range(
        self, client: Any, symbol: str, from_ns: int, to_ns: int
    ) -> list[Candle]:
        """Bars opening in [from_ns, to_ns), over REST, in pages of `fetch_limit`."""
        bar_ms = self.bar_ns // NS_PER_MS
        start_ms, last_ms = from_ns // NS_PER_MS, to_ns // NS_PER_MS - 1
        found: list[Candle] = []
        while start_ms <= last_ms:
            end_ms = min(last_ms, start_ms + self.fetch_limit * bar_ms - 1)
            page = await self._fetch_window(client, symbol, start_ms, end_ms)
            found += [c for c in page if from_ns <= c.timestamp_ns < to_ns]
            start_ms = end_ms + 1
        return found


def make_ccxt_client(settings: MarketDataSettings, *, websocket: bool = False) -> Callable[[], Any]:
    """A factory of ccxt async clients for EXCHANGE (public market data only); ccxt.pro
    clients (REST and websocket) when `websocket`."""
    if websocket:
        import ccxt.pro as ccxt_module
    else:
        import ccxt.async_support as ccxt_module

    cls = getattr(ccxt_module, settings.exchange.lower())

    def factory() -> Any:
        client = cls(
            {
                "enableRateLimit": True,
                "timeout": settings.live_timeout_ms,
                "options": {
                    "defaultType": "spot" if settings.live_market_type == "spot" else "swap",
                    "fetchMarkets": {"types": [settings.live_market_type]},
                },
            }
        )
        if settings.live_api_url:
            client.urls["api"] = {
                key: value if key == "ws" else settings.live_api_url
                for key, value in client.urls["api"].items()
            }
        elif settings.exchange_testnet:
            client.set_sandbox_mode(True)
        if settings.live_ws_url and "ws" in client.urls["api"]:
            client.urls["api"]["ws"] = rebased_urls(client.urls["api"]["ws"], settings.live_ws_url)
        client.has["fetchCurrencies"] = False
        return client

    return factory


def rebased_urls(urls: Any, base: str) -> Any:
    """ccxt's (nested) websocket URLs with scheme and host replaced by `base`, paths kept:
    `wss://stream.{hostname}/v5/public/linear` -> `ws://127.0.0.1:8080/v5/public/linear`."""
    if isinstance(urls, dict):
        return {key: rebased_urls(value, base) for key, value in urls.items()}
    if isinstance(urls, str):
        parts = urlsplit(urls)
        query = f"?{parts.query}" if parts.query else ""
        return f"{base.rstrip('/')}{parts.path}{query}"
    return urls


def build(ctx: ServiceContext) -> None:
    settings = cast(MarketDataSettings, ctx.settings)
    bar_ns = timeframe_ns(settings.timeframe)
    feed: _Feed
    if settings.market_data_mode == "replay":
        path = Path(settings.replay_data_path) if settings.replay_data_path else bundled_data_path()
        loaded = load_candles(path, settings.symbols[0], settings.timeframe)
        feed = ReplayFeed(
            ctx.bus,
            loaded,
            symbols=settings.symbols,
            bar_ns=bar_ns,
            speed=settings.replay_speed,
            warmup_bars=settings.replay_warmup_bars,
            loop=settings.replay_loop,
            ticks=settings.replay_ticks,
            max_bars=settings.replay_max_bars,
            max_outbox=settings.replay_max_outbox,
            max_lag=settings.replay_max_lag,
            lag_probe=redis_lag_probe(ctx.redis),
            resume_probe=redis_resume_probe(ctx.redis),
            metrics=ctx.metrics,
            source=str(path),
        )
    else:
        websocket = settings.live_websocket
        feed = (WebSocketFeed if websocket else LiveFeed)(
            ctx.bus,
            make_ccxt_client(settings, websocket=websocket),
            LastBarStore(ctx.redis, f"hean:market_data:{settings.service_name}:last_bar"),
            symbols=settings.symbols,
            timeframe=settings.timeframe,
            poll_interval_s=settings.live_poll_interval_s,
            history_bars=settings.live_history_bars,
            fetch_limit=settings.live_fetch_limit,
            backoff_max_s=settings.live_backoff_max_s,
            metrics=ctx.metrics,
            exchange=settings.exchange,
        )
    ctx.orchestrator.register_component(name=COMPONENT, component=feed, circuit_breaker=False)
