"""Portfolio wiring: ORDER_FILLED and TICK/CANDLE in, PNL_UPDATE out.

TICK and CANDLE are subscribed conflated: they only mark positions to market, so the
newest price per symbol a few times a second is all that is read (hean.core.bus).

State is rebuilt at start by replaying the ORDER_FILLED stream (kept in full: an "important"
stream) through the same core; the consumer group is created at the stream's start first,
so a fill published while the replay runs is still delivered, and the core's fill
deduplication makes the overlap harmless.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Annotated, Any, cast

from pydantic import Field

from hean.core.bus import EventBus
from hean.core.errors import PermanentError
from hean.core.event_streams import RedisEventStream, ensure_group, newest_events, stream_key
from hean.core.metrics import Metrics
from hean.core.service import ServiceContext
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType
from hean.portfolio.core import Portfolio, fill_from_event_data

log = logging.getLogger(__name__)

#: How many of the newest TICK and CANDLE events a rebuild reads for its marks.
MARK_SCAN = 500


class PortfolioSettings(CoreSettings):
    starting_equity: Annotated[Decimal, Field(gt=0, allow_inf_nan=False)] = Field(
        default=Decimal("10000"), alias="STARTING_EQUITY"
    )
    pnl_publish_interval_ms: Annotated[int, Field(ge=0, le=3_600_000)] = Field(
        default=1000, alias="PNL_PUBLISH_INTERVAL_MS"
    )


class PortfolioService:
    """Keeps a `Portfolio` current and publishes PNL_UPDATE.

    A PNL_UPDATE goes out after every new fill, and after a mark change at most once every
    `publish_interval_ms` of event time.
    """

    def __init__(
        self,
        bus: EventBus,
        portfolio: Portfolio,
        *,
        metrics: Metrics | None = None,
        publish_interval_ms: int = 1000,
        history: RedisEventStream | None = None,
        group: str = "portfolio",
    ) -> None:
        self.bus = bus
        self.portfolio = portfolio
        self.metrics = metrics
        self.publish_interval_ns = publish_interval_ms * 1_000_000
        self.history = history
        self.group = group
        self.rebuilt_fills = 0
        self._last_publish_ns: int | None = None
        self._dirty = False

    async def start(self) -> None:
        if self.history is not None and await self.rebuild():
            # Whoever reads PNL_UPDATE (risk, dashboards) sees the rebuilt state now, not
            # at the next fill: on a new group every fill comes back as a duplicate.
            await self._publish(self.portfolio.last_update_ns, reason="rebuild")
        self.bus.subscribe(EventType.ORDER_FILLED, self.on_fill, name="portfolio.on_fill")
        # Marks only: the newest price per symbol is enough (conflated, see hean.core.bus).
        self.bus.subscribe(EventType.TICK, self.on_tick, name="portfolio.on_tick", conflate=True)
        self.bus.subscribe(
            EventType.CANDLE, self.on_candle, name="portfolio.on_candle", conflate=True
        )

    async def rebuild(self) -> int:
        """Replay every ORDER_FILLED in the stream into the core; returns fills applied.

        Each position is then marked at the newest price known for its symbol: the newest
        of its last fill and the recent TICK and CANDLE events still in Redis (by event
        time). Without that its mark would be its first fill's price, and the equity
        published for risk's drawdown check as stale as the position is old.
        """
        assert self.history is not None
        await self.history.connect()
        await ensure_group(
            self.history.client, stream_key(EventType.ORDER_FILLED), self.group, start_id="0"
        )
        applied = 0
        marks: dict[str, tuple[int, Decimal]] = {}
        async for event in self.history.replay_events(EventType.ORDER_FILLED):
            try:
                fill = fill_from_event_data(event.data, event.timestamp)
            except ValueError as exc:
                log.warning("rebuild: skipping fill %s: %s", event.event_id, exc)
                continue
            if self.portfolio.apply_fill(fill):
                applied += 1
                traded = (fill.timestamp_ns, fill.price)
                marks[fill.symbol] = max(marks.get(fill.symbol, traded), traded)
        for event_type, field in ((EventType.CANDLE, "close"), (EventType.TICK, "price")):
            for event in await newest_events(self.history.client, event_type, MARK_SCAN):
                symbol, price = str(event.data.get("symbol")), event.data.get(field)
                known = marks.get(symbol)
                if known is not None and isinstance(price, Decimal) and price > 0:
                    marks[symbol] = max(known, (event.timestamp, price))
        for symbol, (timestamp_ns, price) in marks.items():
            self.portfolio.mark(symbol, price, timestamp_ns)
        self.rebuilt_fills = applied
        log.info("portfolio rebuilt from %d fills: equity %s", applied, self.portfolio.equity)
        self._update_metrics()
        return applied

    async def on_fill(self, event: Event) -> None:
        try:
            fill = fill_from_event_data(event.data, event.timestamp)
        except ValueError as exc:
            raise PermanentError(str(exc)) from exc
        if not self.portfolio.apply_fill(fill):
            log.info("duplicate fill ignored: %s (event %s)", fill.dedupe_key, event.event_id)
            return
        await self._publish(event.timestamp, reason="fill")

    async def on_tick(self, event: Event) -> None:
        await self._on_mark(str(event.data["symbol"]), event.data["price"], event.timestamp)

    async def on_candle(self, event: Event) -> None:
        await self._on_mark(str(event.data["symbol"]), event.data["close"], event.timestamp)

    async def _on_mark(self, symbol: str, price: Decimal, timestamp_ns: int) -> None:
        if self.portfolio.mark(symbol, price, timestamp_ns):
            self._dirty = True
        if not self._dirty:
            return
        last = self._last_publish_ns
        # Event time moving back by more than an interval is a clock stepped back, not a
        # late event: publish and go on from there, or marks would wait for it to catch
        # up (risk's drawdown check reads equity from PNL_UPDATE).
        elapsed = None if last is None else timestamp_ns - last
        if elapsed is None or abs(elapsed) >= self.publish_interval_ns:
            await self._publish(timestamp_ns, reason="mark")

    async def _publish(self, timestamp_ns: int, *, reason: str) -> None:
        data = self.portfolio.snapshot()
        data["reason"] = reason
        await self.bus.publish(Event(event_type=EventType.PNL_UPDATE, data=data))
        self._last_publish_ns = timestamp_ns
        self._dirty = False
        self._update_metrics()

    def _update_metrics(self) -> None:
        m = self.metrics
        if m is None:
            return
        p = self.portfolio
        m.pnl.set(float(p.total_pnl))
        m.pnl_realized.set(float(p.realized_pnl))
        m.pnl_unrealized.set(float(p.unrealized_pnl))
        m.equity.set(float(p.equity))
        m.fees_total.set(float(p.fees))
        stats = p.stats()
        m.win_rate.set(float(stats.win_rate))
        if stats.sharpe_ratio is not None:
            m.sharpe_ratio.set(float(stats.sharpe_ratio))
        for symbol, pos in p.positions.items():
            m.position_notional.labels(symbol).set(float(pos.notional if pos.qty else 0))

    def health_check(self) -> dict[str, Any]:
        return {"state": "healthy", "equity": str(self.portfolio.equity)}


def build(ctx: ServiceContext) -> None:
    settings = cast(PortfolioSettings, ctx.settings)
    service = PortfolioService(
        ctx.bus,
        Portfolio(settings.starting_equity),
        metrics=ctx.metrics,
        publish_interval_ms=settings.pnl_publish_interval_ms,
        history=RedisEventStream(settings.redis_url, client=ctx.redis),
        group=settings.service_name,
    )
    ctx.orchestrator.register_component(name="portfolio", component=service, circuit_breaker=True)
