"""Execution wiring: ORDER_APPROVED -> router -> exchange -> ORDER_PLACED / ORDER_FILLED /
ORDER_CANCELLED / ORDER_REJECTED; TICK and CANDLE drive the paper fills and the algorithms;
KILLSWITCH_TRIGGERED cancels every open order and algorithm.

Idempotency: an ORDER_APPROVED is worked only after `ledger.claim(order_id)` succeeded (an
atomic marker in Redis), so a redelivery, even to a restarted process, places nothing.
After a restart, orders the ledger still lists as open are reconciled before new work
starts: children still open on the venue are cancelled; then the venue's fills of the
order's children since its claim that no ORDER_FILLED in Redis reports yet (made while
execution was down, or before a crash let it publish them) are published; then the parent
is reported ORDER_CANCELLED ("execution restarted") with what filled, so risk releases
what it reserved, or closed as filled if the fills complete it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict, deque
from decimal import Decimal
from typing import Annotated, Any, Literal, cast

import ccxt  # type: ignore[import-untyped]
import redis.asyncio as aioredis
from pydantic import Field, field_validator, model_validator

from hean.core.bus import EventBus, is_last_attempt
from hean.core.circuit_breaker import CircuitBreaker, CircuitBreakerOpenError
from hean.core.errors import PermanentError, TransientError
from hean.core.event_streams import RedisEventStream, as_str, newest_events, stream_key
from hean.core.metrics import Metrics
from hean.core.resp import RespConnection
from hean.core.service import ServiceContext
from hean.core.settings import CoreSettings, ExchangeSettings
from hean.core.topology import APPROVER
from hean.core.types import Event, EventType, current_event
from hean.execution.ccxt_exchange import CcxtConfig, CcxtExchange
from hean.execution.exchange import (
    ChildOrder,
    ClosedChild,
    Exchange,
    ExchangeFill,
    MarketRules,
    OrderRefusedError,
    PlacementUnknownError,
)
from hean.execution.ledger import MemoryLedger, OrderLedger, RedisLedger
from hean.execution.paper import PaperConfig, PaperExchange
from hean.execution.router import ExecutionRouter, ParentOrder, ParentStatus, RouterConfig

log = logging.getLogger(__name__)

#: Finished orders kept in memory, so a venue's late fill of one is still reported as its.
FINISHED_MEMORY = 10_000
#: How often cancels the venue did not take are sent again, seconds (on market events).
CANCEL_RETRY_S = 1.0
#: ORDER_FILLED entries reconciliation reads back when an open order has no claim time.
RECONCILE_SCAN = 10_000
#: How far back the venue's fills are asked for an open order the ledger has no claim time
#: for (claimed by an older version).
RECONCILE_LOOKBACK_NS = 7 * 86_400 * 1_000_000_000

NonNegDecimal = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]
PosDecimal = Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]


class ExecutionSettings(CoreSettings, ExchangeSettings):
    paper_taker_fee: NonNegDecimal = Field(default=Decimal("0.00055"), alias="PAPER_TAKER_FEE")
    paper_maker_fee: NonNegDecimal = Field(default=Decimal("0.0002"), alias="PAPER_MAKER_FEE")
    paper_slippage_bps: NonNegDecimal = Field(default=Decimal("1"), alias="PAPER_SLIPPAGE_BPS")
    paper_impact_bps: NonNegDecimal = Field(default=Decimal("10"), alias="PAPER_IMPACT_BPS")
    paper_depth_notional: PosDecimal = Field(
        default=Decimal("100000"), alias="PAPER_DEPTH_NOTIONAL"
    )
    paper_liquidity_notional: PosDecimal = Field(
        default=Decimal("250000"), alias="PAPER_LIQUIDITY_NOTIONAL"
    )
    paper_latency_ms: Annotated[float, Field(ge=0, le=10_000)] = Field(
        default=0.0, alias="PAPER_LATENCY_MS"
    )
    #: JSON: {"BTC/USDT": {"tick_size": "0.1", "qty_step": "0.001", "min_qty": "0.001"}}
    paper_markets: dict[str, dict[str, str]] = Field(default_factory=dict, alias="PAPER_MARKETS")
    #: trade symbols that are not configured once market data for them arrives
    paper_allow_unlisted: bool = Field(default=True, alias="PAPER_ALLOW_UNLISTED")
    twap_duration_s: Annotated[float, Field(ge=0)] = Field(default=60.0, alias="TWAP_DURATION_S")
    twap_slices: Annotated[int, Field(ge=1, le=1000)] = Field(default=5, alias="TWAP_SLICES")
    vwap_duration_s: Annotated[float, Field(ge=0)] = Field(default=60.0, alias="VWAP_DURATION_S")
    vwap_slices: Annotated[int, Field(ge=1, le=1000)] = Field(default=5, alias="VWAP_SLICES")
    iceberg_display_ratio: Annotated[Decimal, Field(gt=0, le=1)] = Field(
        default=Decimal("0.1"), alias="ICEBERG_DISPLAY_RATIO"
    )

    @field_validator("paper_markets", mode="before")
    @classmethod
    def _parse_markets(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    #: live venues: spot | linear | inverse (Bybit categories); our "BTC/USDT" maps to
    #: ccxt's "BTC/USDT:USDT" for linear perpetuals
    ccxt_market_type: Literal["spot", "linear", "inverse"] = Field(
        default="linear", alias="CCXT_MARKET_TYPE"
    )
    #: override every API url of the venue (a local fake exchange in tests)
    ccxt_api_url: str | None = Field(default=None, alias="CCXT_API_URL")
    ccxt_retry_attempts: Annotated[int, Field(ge=1, le=20)] = Field(
        default=3, alias="CCXT_RETRY_ATTEMPTS"
    )

    @field_validator("exchange")
    @classmethod
    def _known_exchange(cls, value: str) -> str:
        name = value.lower()
        if name != "paper" and name not in ccxt.exchanges:
            raise ValueError(f"exchange {value!r} is neither 'paper' nor a ccxt exchange id")
        return name

    @model_validator(mode="after")
    def _live_needs_keys(self) -> ExecutionSettings:
        if self.exchange != "paper" and not self.api_key.get_secret_value():
            raise ValueError(f"API_KEY and API_SECRET are required for EXCHANGE={self.exchange}")
        return self

    def ccxt_config(self) -> CcxtConfig:
        return CcxtConfig(
            exchange_id=self.exchange,
            api_key=self.api_key.get_secret_value(),
            api_secret=self.api_secret.get_secret_value(),
            testnet=self.exchange_testnet,
            market_type=self.ccxt_market_type,
            api_url=self.ccxt_api_url,
            retry_attempts=self.ccxt_retry_attempts,
        )

    def paper_config(self) -> PaperConfig:
        markets = {
            symbol: MarketRules(symbol, **{k: Decimal(v) for k, v in rules.items()})
            for symbol, rules in self.paper_markets.items()
        }
        return PaperConfig(
            taker_fee_rate=self.paper_taker_fee,
            maker_fee_rate=self.paper_maker_fee,
            base_slippage_bps=self.paper_slippage_bps,
            impact_bps=self.paper_impact_bps,
            depth_notional=self.paper_depth_notional,
            liquidity_notional=self.paper_liquidity_notional,
            latency_ms=self.paper_latency_ms,
            markets=markets,
            default_rules=MarketRules("*") if self.paper_allow_unlisted else None,
        )

    def router_config(self) -> RouterConfig:
        return RouterConfig(
            twap_duration_s=self.twap_duration_s,
            twap_slices=self.twap_slices,
            vwap_duration_s=self.vwap_duration_s,
            vwap_slices=self.vwap_slices,
            iceberg_display_ratio=self.iceberg_display_ratio,
        )


class ExecutionService:
    """Works approved orders on an exchange (see the module docstring)."""

    def __init__(
        self,
        bus: EventBus,
        exchange: Exchange,
        *,
        router: ExecutionRouter | None = None,
        ledger: OrderLedger | None = None,
        metrics: Metrics | None = None,
        breaker: CircuitBreaker | None = None,
        candle_history: int = 50,
        market_history: aioredis.Redis | None = None,
        poll_interval_s: float = 0.0,
    ) -> None:
        self.bus = bus
        self.market_history = market_history
        self.poll_interval_s = poll_interval_s
        self._last_poll = float("-inf")
        # This process's claims: a claim retried after its reply was lost is still ours.
        self.claimer = uuid.uuid4().hex
        self.exchange = exchange
        self.router = router or ExecutionRouter()
        self.ledger: OrderLedger = ledger if ledger is not None else MemoryLedger()
        self.metrics = metrics
        self.breaker = breaker or CircuitBreaker("exchange")
        self.parents: dict[str, ParentOrder] = {}
        # finished parents, so a venue's late fill of a cancelled child is still reported
        self._finished: OrderedDict[str, ParentOrder] = OrderedDict()
        #: Cancelled orders waiting for the venue to take a child's cancel: id -> reason.
        self._cancelling: dict[str, str] = {}
        self._cancel_retried: dict[str, float] = {}  # symbol -> when (monotonic)
        self._child_parent: dict[str, str] = {}
        #: Risk's time of the newest KILLSWITCH_TRIGGERED seen: approvals made before it are
        #: not placed.
        self._kill_switch_ns: int | None = None
        #: Children whose placement went unanswered on an earlier attempt (they may be on the
        #: venue): retried under the same client id, never reported rejected.
        self._maybe_placed: set[str] = set()
        self._volumes: dict[str, deque[Decimal]] = {}
        self._candle_history = candle_history
        self.reconciled: list[str] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.exchange.start()
        await self.reconcile()
        if self.market_history is not None:
            await self.warm_up(self.market_history)
        b = self.bus
        b.subscribe(EventType.ORDER_APPROVED, self.on_approved, name="execution.on_approved")
        b.subscribe(EventType.TICK, self.on_tick, name="execution.on_tick")
        b.subscribe(EventType.CANDLE, self.on_candle, name="execution.on_candle")
        b.subscribe(
            EventType.KILLSWITCH_TRIGGERED, self.on_killswitch, name="execution.on_killswitch"
        )

    async def stop(self) -> None:
        await self.exchange.close()
        await self.ledger.aclose()

    def health_check(self) -> dict[str, Any]:
        state = self.breaker.state.value
        if state != "closed":
            return {"state": "degraded", "error_message": f"exchange circuit breaker {state}"}
        if self._cancelling:
            return {
                "state": "degraded",
                "error_message": (
                    f"{len(self._cancelling)} cancelled order(s) with a child whose cancel the "
                    f"venue has not taken (may still fill): {', '.join(sorted(self._cancelling))}"
                ),
            }
        return {"state": "healthy"}

    async def reconcile(self) -> None:
        """Cancel what a previous run left open (see the module docstring). The ledger's
        fill count goes with the ack of the event that filled, after the ORDER_FILLED is in
        Redis, so a crash in between leaves it behind the stream: the fills already
        published count, and an order they fill completely is closed as filled, not
        reported cancelled. Fills are asked of the venue after the cancels, so what filled
        until a cancel took is in."""
        leftovers = await self.ledger.open_orders()
        if not leftovers:
            return
        symbols = {info["symbol"] for info in leftovers.values() if info.get("symbol")}
        venue_open = set(await self.exchange.open_client_order_ids(symbols))
        for order_id, info in leftovers.items():
            for client_id in [c for c in venue_open if c.startswith(f"{order_id}-")]:
                await self.exchange.cancel(client_id, 0, info.get("symbol"))
        published: dict[str, dict[str, Decimal]] = {}
        if self.market_history is not None:
            published = await self._published_fills(self.market_history, leftovers)
        unreported = await self._venue_fills(leftovers, published)
        for order_id, info in leftovers.items():
            done = max(
                Decimal(info.get("filled") or "0"),
                sum(published.get(order_id, {}).values(), Decimal(0)),
            )
            size = self._worked_size(info)
            events: list[Event] = []
            for fill in unreported.get(order_id, []):
                done += fill.qty
                log.warning(
                    "order %s: fill %s of %s %s on the venue was not reported before the "
                    "restart; reported now",
                    order_id,
                    fill.fill_id,
                    fill.qty,
                    fill.symbol,
                )
                self._count_fill(fill)
                remaining = max(size - done, Decimal(0)) if size is not None else None
                events.append(
                    Event(
                        event_type=EventType.ORDER_FILLED,
                        data=self._filled_data(order_id, fill, done, remaining),
                    )
                )
            self.reconciled.append(order_id)
            status = ParentStatus.CANCELLED
            if size is not None and done >= size:
                status = ParentStatus.FILLED
                log.warning("order %s was filled before the restart: closed as filled", order_id)
            else:
                events.append(
                    Event(
                        event_type=EventType.ORDER_CANCELLED,
                        data={
                            "order_id": order_id,
                            "reason": "execution restarted: open order cancelled on reconciliation",
                            "symbol": info.get("symbol"),
                            "filled_qty": done,
                            "remaining_qty": size - done if size is not None else None,
                        },
                    )
                )
            await self._publish_then_finish(events, order_id, status.value, str(done))
        log.warning("reconciled %d open orders left by a previous run", len(leftovers))

    async def _publish_then_finish(
        self, events: list[Event], order_id: str, status: str, filled: str
    ) -> None:
        """Publish `events`, then mark the order finished in the ledger. On Redis the
        ledger's write goes in the pipeline of the last event, so a crash can never leave
        the order finished with its events unwritten (the next start would not reconcile
        it again)."""
        ledger = self.ledger
        if events and isinstance(ledger, RedisLedger) and self.bus.transport.name == "redis":
            for event in events[:-1]:
                await self.bus.publish(event)
            finish = ledger.finish_command(order_id, status, filled)
            await self.bus.publish(events[-1], then=(finish,))
            return
        for event in events:
            await self.bus.publish(event)
        await ledger.finish(order_id, status, filled)

    def _worked_size(self, info: dict[str, str]) -> Decimal | None:
        """The size an order in the ledger was worked at: the approved size rounded down
        to the venue's step (see the router), if the ledger has it."""
        if not info.get("size"):
            return None
        size = Decimal(info["size"])
        rules = self.exchange.rules(info["symbol"]) if info.get("symbol") else None
        return rules.floor_qty(size) if rules is not None else size

    async def _venue_fills(
        self, orders: dict[str, dict[str, str]], published: dict[str, dict[str, Decimal]]
    ) -> dict[str, list[ExchangeFill]]:
        """Per order of `orders`, the venue's fills of its children that no ORDER_FILLED in
        Redis reports, asked per symbol from the oldest claim on (a week back for an entry
        without a claim time, claimed by an older version)."""
        now_ns = time.time_ns()
        by_symbol: dict[str, set[str]] = {}
        since: dict[str, int] = {}
        for order_id, info in orders.items():
            symbol = info.get("symbol")
            if not symbol:
                continue
            by_symbol.setdefault(symbol, set()).add(order_id)
            claimed = info.get("claimed_ms")
            start = int(claimed) * 1_000_000 if claimed else now_ns - RECONCILE_LOOKBACK_NS
            since[symbol] = min(since.get(symbol, start), start)
        found: dict[str, list[ExchangeFill]] = {}
        for symbol, order_ids in sorted(by_symbol.items()):
            for fill in await self.exchange.fills_since(symbol, since[symbol], order_ids, now_ns):
                order_id = fill.client_order_id.rpartition("-")[0]
                if fill.fill_id not in published.get(order_id, {}):
                    found.setdefault(order_id, []).append(fill)
        return found

    async def _published_fills(
        self, client: aioredis.Redis, orders: dict[str, dict[str, str]]
    ) -> dict[str, dict[str, Decimal]]:
        """Per order of `orders`, its fills that ORDER_FILLED events already report (fill
        id -> quantity). Read from the oldest order's claim time on; where a ledger entry
        has none (claimed by an older version), from the newest RECONCILE_SCAN fills."""
        claimed = [int(info["claimed_ms"]) for info in orders.values() if info.get("claimed_ms")]
        if len(claimed) == len(orders):
            start = f"{min(claimed)}-0"
        else:
            newest: Any = await client.xrevrange(
                stream_key(EventType.ORDER_FILLED), count=RECONCILE_SCAN
            )
            start = as_str(newest[-1][0]) if newest else "-"
        filled: dict[str, dict[str, Decimal]] = {}
        history = RedisEventStream(client=client)
        async for event in history.replay_events(EventType.ORDER_FILLED, start):
            order_id, fill_id = str(event.data.get("order_id")), str(event.data.get("fill_id"))
            if order_id in orders:
                filled.setdefault(order_id, {})[fill_id] = Decimal(str(event.data["filled_qty"]))
        return filled

    async def warm_up(self, client: aioredis.Redis, count: int = 500) -> None:
        """Seed the last price per symbol (and the VWAP volume profile) from the newest
        CANDLE and TICK events in Redis. A restarted execution would otherwise refuse every
        approval with "no market data" until the next tick arrives. Runs after
        reconciliation, so no order is resting and nothing can fill at these prices."""
        seen = 0
        for event_type, handler in (
            (EventType.CANDLE, self.on_candle),
            (EventType.TICK, self.on_tick),
        ):
            for event in await newest_events(client, event_type, count):
                await handler(event)
                seen += 1
        if seen:
            log.info("market state warmed up from %d recent events in Redis", seen)
        for event in await newest_events(client, EventType.KILLSWITCH_TRIGGERED, 1):
            self._note_kill_switch(event)

    # --- handlers ----------------------------------------------------------------------------

    async def on_approved(self, event: Event) -> None:
        data = event.data
        order_id = str(data["order_id"])
        symbol = str(data["symbol"])
        if event.source_service != APPROVER:
            # Only risk's approval has passed its limits and the kill switch, and reserved
            # exposure; a check subscribed to ORDER_REQUEST on the bus cannot approve.
            raise PermanentError(
                f"ORDER_APPROVED {order_id} was published by {event.source or 'no service'}, "
                f"not by {APPROVER}: execution places only {APPROVER}'s approvals (custom "
                "checks plug into risk: docs/ORDER_PATH.md, Custom checks)"
            )
        if order_id in self.parents or order_id in self._finished:
            log.info("order %s is being or was worked here; redelivery ignored", order_id)
            return
        if not await self.ledger.claim(order_id, symbol, str(data["size"]), self.claimer):
            log.info("order %s already handled; redelivery ignored", order_id)
            return
        if self._kill_switch_ns is not None and event.timestamp < self._kill_switch_ns:
            # Approved before the kill switch, arriving after it (a backlog, a redelivery):
            # the switch stops it as it would have stopped the order had it been working.
            reason = "kill switch triggered after it was approved: not placed"
            await self._reject(order_id, symbol, reason, kill_switch=True)
            return
        rules = self.exchange.rules(symbol)
        try:
            if rules is None:
                raise OrderRefusedError(f"unknown symbol {symbol}")
            volumes = list(self._volumes.get(symbol, ()))
            parent = self.router.route(data, rules, event.timestamp, volumes)
        except OrderRefusedError as exc:
            await self._reject(order_id, symbol, exc.reason)
            return
        if parent.size != Decimal(data["size"]):
            log.info(
                "order %s: size %s rounded down to %s (%s's qty step %s)",
                order_id,
                data["size"],
                parent.size,
                symbol,
                rules.qty_step,
            )
        self.parents[order_id] = parent
        try:
            await self._work(parent, event.timestamp)
        except TransientError:
            if parent.children_sent == 0:
                # Nothing reached the venue: give the claim back so the retry can place it.
                del self.parents[order_id]
                await self.ledger.release(order_id)
                raise
            log.exception("order %s: transient failure mid-algorithm; will retry", order_id)

    async def on_tick(self, event: Event) -> None:
        await self._market(str(event.data["symbol"]), event.data["price"], event.data, event)

    async def on_candle(self, event: Event) -> None:
        symbol = str(event.data["symbol"])
        history = self._volumes.setdefault(symbol, deque(maxlen=self._candle_history))
        history.append(Decimal(event.data["volume"]))
        await self._market(symbol, event.data["close"], event.data, event)

    async def _market(self, symbol: str, price: Decimal, data: Any, event: Event) -> None:
        volume = Decimal(data.get("volume") or 0)
        fills = await self.exchange.on_market_data(symbol, price, volume, event.timestamp)
        polled, closed = await self._poll_venue(event.timestamp)
        for fill in fills + polled:
            await self._on_exchange_fill(fill)
        for child in closed:
            await self._on_venue_closed(child, event.timestamp)
        await self._retry_cancels(symbol, event.timestamp)
        for parent in [p for p in self.parents.values() if p.symbol == symbol]:
            if not parent.done:
                try:
                    await self._work(parent, event.timestamp)
                except TransientError:
                    log.warning(
                        "order %s: exchange unavailable; slice retried later", parent.order_id
                    )

    def _note_kill_switch(self, event: Event) -> None:
        self._kill_switch_ns = max(self._kill_switch_ns or 0, event.timestamp)

    async def on_killswitch(self, event: Event) -> None:
        self._note_kill_switch(event)
        reason = f"kill switch: {event.data['reason']}"
        for parent in list(self.parents.values()):
            if parent.done:
                continue
            await self._stop_working(parent, event.timestamp)
            await self._cancelled(parent, reason)

    async def _stop_working(self, parent: ParentOrder, now_ns: int) -> None:
        """Stop `parent`'s algorithm and cancel its children still open on the venue, so
        none fills after the order is reported cancelled. A child whose cancel the venue
        cannot take now stays in `parent.uncancelled`: it may still fill, so the order is
        not reported cancelled (and risk keeps its reservation) until the cancel is taken,
        tried again on the symbol's market events, or the child is filled or closed."""
        for client_id, qty in parent.cancel().items():
            try:
                await self.breaker.call(self.exchange.cancel, client_id, now_ns)
            except (TransientError, CircuitBreakerOpenError) as exc:
                parent.uncancelled[client_id] = qty
                log.error(
                    "order %s: cancel of %s failed (%s): it may still fill; the order is "
                    "reported cancelled once the venue takes the cancel",
                    parent.order_id,
                    client_id,
                    exc,
                )

    async def _retry_cancels(self, symbol: str, now_ns: int) -> None:
        """Send again the cancels of `symbol`'s children the venue did not take (at most
        once a second per symbol). Once taken, the venue's fills are asked at once, so the
        order is reported cancelled with every fill made until the cancel took."""
        now = time.monotonic()
        if not self._cancelling or now - self._cancel_retried.get(symbol, 0.0) < CANCEL_RETRY_S:
            return
        self._cancel_retried[symbol] = now
        for order_id in list(self._cancelling):
            parent = self.parents.get(order_id)
            if parent is None or parent.symbol != symbol:
                continue
            taken: list[str] = []
            try:
                for client_id in list(parent.uncancelled):
                    await self.breaker.call(self.exchange.cancel, client_id, now_ns)
                    taken.append(client_id)
                fills = await self.breaker.call(self.exchange.poll_fills, now_ns) if taken else []
            except (TransientError, CircuitBreakerOpenError) as exc:
                self._count_api_error(exc)
                return  # the venue still does not answer: next time (a taken cancel is
                # refused then, harmlessly)
            for fill in fills:
                await self._on_exchange_fill(fill)
            for client_id in taken:
                parent.uncancelled.pop(client_id, None)
            await self._settle_cancel(parent)

    async def _settle_cancel(self, parent: ParentOrder) -> None:
        """Report a cancelled order whose every child is now closed on the venue."""
        reason = self._cancelling.get(parent.order_id)
        if reason is None or parent.uncancelled:
            return
        del self._cancelling[parent.order_id]
        if parent.filled_qty >= parent.size:  # its late fills completed it
            parent.status = ParentStatus.FILLED
            await self._finish(parent)
        else:
            await self._cancelled(parent, reason)

    async def _poll_venue(self, now_ns: int) -> tuple[list[ExchangeFill], list[ClosedChild]]:
        """The venue's fills of resting orders, then the children it closed by itself,
        through the breaker and at most every `poll_interval_s`. A venue outage must not
        fail market-data handling (ticks would pile up for retry behind the orders of
        their symbol): it is counted and logged, and the next poll catches up."""
        now = time.monotonic()
        if now - self._last_poll < self.poll_interval_s:
            return [], []
        self._last_poll = now
        try:
            fills = await self.breaker.call(self.exchange.poll_fills, now_ns)
        except (TransientError, CircuitBreakerOpenError) as exc:
            self._count_api_error(exc)
            log.warning("polling %s for fills failed: %s", self.exchange.name, exc)
            return [], []
        try:
            closed = await self.breaker.call(self.exchange.poll_closed, now_ns)
        except (TransientError, CircuitBreakerOpenError) as exc:
            self._count_api_error(exc)
            log.warning("asking %s for its open orders failed: %s", self.exchange.name, exc)
            closed = []
        except Exception:  # the fills polled above must still be reported
            log.exception("asking %s for its open orders failed", self.exchange.name)
            closed = []
        return fills, closed

    async def _on_venue_closed(self, closed: ClosedChild, now_ns: int) -> None:
        """A child the venue ended by itself: its order stops (its other children still
        open are cancelled on the venue) and is reported cancelled with what filled."""
        order_id = self._child_parent.get(closed.client_order_id)
        parent = self.parents.get(order_id) if order_id is not None else None
        if parent is not None and closed.client_order_id in parent.uncancelled:
            del parent.uncancelled[closed.client_order_id]  # closed: our cancel or the venue's
            await self._settle_cancel(parent)
            return
        if parent is None or parent.done:
            return  # finished already: filled, or cancelled by us
        log.warning(
            "order %s: child %s: %s", parent.order_id, closed.client_order_id, closed.reason
        )
        parent.on_child_refused(closed.client_order_id)  # gone: not to be cancelled again
        await self._stop_working(parent, now_ns)
        await self._cancelled(parent, f"{closed.reason}: child {closed.client_order_id}")

    # --- working an order --------------------------------------------------------------------

    async def _work(self, parent: ParentOrder, now_ns: int) -> None:
        while not parent.done:  # done: filled, or cancelled while we awaited the venue
            child = parent.next_child(now_ns)
            if child is None:
                return
            try:
                result = await self.breaker.call(self.exchange.place, child, now_ns)
            except OrderRefusedError as exc:
                self._maybe_placed.discard(child.client_order_id)  # this answer says no
                parent.on_child_refused(child.client_order_id)
                if parent.filled_qty == 0 and parent.children_sent == 1:
                    parent.status = ParentStatus.REJECTED
                    await self._reject(parent.order_id, parent.symbol, exc.reason)
                else:
                    await self._stop_working(parent, now_ns)
                    await self._cancelled(parent, f"exchange refused a child order: {exc.reason}")
                return
            except (TransientError, CircuitBreakerOpenError) as exc:
                self._count_api_error(exc)
                cid = child.client_order_id
                if isinstance(exc, PlacementUnknownError):
                    self._maybe_placed.add(cid)
                # An approval's first child is placed again (same client id) when the
                # approval is delivered again; a later slice would wait for a later tick,
                # unknown to a kill switch's cancel meanwhile.
                redelivered = parent.children_sent == 1 and not is_last_attempt()
                if cid in self._maybe_placed and not redelivered:
                    # An attempt may have reached the venue: the order must not be reported
                    # rejected while it may fill. It is followed as placed; the venue's
                    # answer ends it (its fills, or "it never reached the venue").
                    self._maybe_placed.discard(cid)
                    self.exchange.track_unknown(child, now_ns)
                    self._child_parent[cid] = parent.order_id
                    log.warning(
                        "order %s: child %s may have reached the venue (%s); followed until "
                        "the venue says",
                        parent.order_id,
                        cid,
                        exc,
                    )
                    return
                parent.unsend(child)
                if is_last_attempt():
                    # This approval's retries are used up (the venue stayed down): give the
                    # order a visible end, so risk frees its reservation, rather than a dead
                    # letter or an order that fills minutes later at another price.
                    reason = f"exchange unavailable: {exc}"
                    if parent.filled_qty == 0 and parent.children_sent == 0:
                        parent.status = ParentStatus.REJECTED
                        await self._reject(parent.order_id, parent.symbol, reason)
                    else:
                        await self._stop_working(parent, now_ns)
                        await self._cancelled(parent, reason)
                    return
                raise TransientError(str(exc)) from exc
            self._maybe_placed.discard(child.client_order_id)
            self._child_parent[child.client_order_id] = parent.order_id
            await self._placed(parent, child, result.exchange_order_id)
            for fill in result.fills:
                await self._on_exchange_fill(fill)

    # Ledger writes made while handling an event go with its ack (`EventBus.write_on_ack`):
    # no round trip of their own in the symbol's lane, and never ahead of the ORDER_FILLED
    # or ORDER_CANCELLED they follow (a crash in between leaves the order open in the
    # ledger, which the restart reconciles). The claim is not deferred: it is the gate.

    def _deferred_ledger(self) -> RedisLedger | None:
        """The Redis ledger when its writes can go with the ack of the event being handled."""
        if (
            isinstance(self.ledger, RedisLedger)
            and self.bus.transport.name == "redis"
            and current_event.get() is not None
        ):
            return self.ledger
        return None

    async def _ledger_record_fill(self, order_id: str, filled: str) -> None:
        if (ledger := self._deferred_ledger()) is not None:
            self.bus.write_on_ack(*ledger.record_fill_command(order_id, filled))
        else:
            await self.ledger.record_fill(order_id, filled)

    async def _ledger_finish(self, order_id: str, status: str, filled: str) -> None:
        if (ledger := self._deferred_ledger()) is not None:
            self.bus.write_on_ack(*ledger.finish_command(order_id, status, filled))
        else:
            await self.ledger.finish(order_id, status, filled)

    async def _placed(self, parent: ParentOrder, child: ChildOrder, exchange_id: str) -> None:
        if self.metrics is not None:
            self.metrics.orders_total.labels(child.symbol, child.side.value, child.type).inc()
        await self.bus.publish(
            Event(
                event_type=EventType.ORDER_PLACED,
                data={
                    "order_id": parent.order_id,
                    "client_order_id": child.client_order_id,
                    "exchange_order_id": exchange_id,
                    "exchange": self.exchange.name,
                    "symbol": child.symbol,
                    "side": child.side.value,
                    "size": child.qty,
                    "price": child.price,
                    "type": child.type,
                    "algorithm": parent.algorithm.value,
                    "child_index": parent.children_sent,
                },
            )
        )

    async def _on_exchange_fill(self, fill: ExchangeFill) -> None:
        order_id = self._child_parent.get(fill.client_order_id)
        parent = None
        if order_id is not None:
            parent = self.parents.get(order_id) or self._finished.get(order_id)
        if parent is None:
            log.error("fill %s for unknown child %s", fill.fill_id, fill.client_order_id)
            return
        parent.on_fill(fill.client_order_id, fill.qty)
        self._count_fill(fill)
        await self.bus.publish(
            Event(
                event_type=EventType.ORDER_FILLED,
                data=self._filled_data(parent.order_id, fill, parent.filled_qty, parent.remaining),
            )
        )
        await self._ledger_record_fill(parent.order_id, str(parent.filled_qty))
        if parent.status is ParentStatus.FILLED and parent.order_id in self.parents:
            await self._finish(parent)
        elif parent.order_id in self._cancelling:
            await self._settle_cancel(parent)  # a child whose cancel failed filled

    def _count_fill(self, fill: ExchangeFill) -> None:
        if self.metrics is not None:
            self.metrics.trades_total.labels(fill.symbol, fill.side.value).inc()
            self.metrics.trade_volume.labels(fill.symbol).inc(float(fill.qty * fill.price))
            self.metrics.slippage_bps.labels(fill.symbol).observe(float(fill.slippage_bps))

    def _filled_data(
        self, order_id: str, fill: ExchangeFill, cumulative: Decimal, remaining: Decimal | None
    ) -> dict[str, Any]:
        """ORDER_FILLED data of one fill of `order_id`."""
        return {
            "order_id": order_id,
            "fill_id": fill.fill_id,
            "client_order_id": fill.client_order_id,
            "symbol": fill.symbol,
            "side": fill.side.value,
            "fill_price": fill.price,
            "filled_qty": fill.qty,
            "fee": fill.fee,
            "liquidity": fill.liquidity,
            "reference_price": fill.reference_price,
            "slippage_bps": fill.slippage_bps,
            "cumulative_qty": cumulative,
            "remaining_qty": remaining,
            "exchange": self.exchange.name,
        }

    async def _reject(
        self, order_id: str, symbol: str, reason: str, *, kill_switch: bool = False
    ) -> None:
        """Report `order_id` rejected: by the venue, or by execution for the kill switch."""
        by = "execution" if kill_switch else f"exchange:{self.exchange.name}"
        log.warning("order %s rejected by %s: %s", order_id, by, reason)
        if self.metrics is not None:
            label = "kill switch" if kill_switch else "exchange"
            self.metrics.orders_rejected_total.labels("execution", label).inc()
        await self.bus.publish(
            Event(
                event_type=EventType.ORDER_REJECTED,
                data={"order_id": order_id, "reason": reason, "rejected_by": by, "symbol": symbol},
            )
        )
        await self._ledger_finish(order_id, ParentStatus.REJECTED.value, "0")
        self.parents.pop(order_id, None)

    async def _cancelled(self, parent: ParentOrder, reason: str) -> None:
        if parent.uncancelled:  # a child may still fill: reported once the venue says
            self._cancelling[parent.order_id] = reason
            return
        await self.bus.publish(
            Event(
                event_type=EventType.ORDER_CANCELLED,
                data={
                    "order_id": parent.order_id,
                    "reason": reason,
                    "symbol": parent.symbol,
                    "filled_qty": parent.filled_qty,
                    "remaining_qty": parent.remaining,
                },
            )
        )
        await self._finish(parent)

    async def _finish(self, parent: ParentOrder) -> None:
        await self._ledger_finish(parent.order_id, parent.status.value, str(parent.filled_qty))
        if self.metrics is not None:
            self.metrics.order_fill_ratio.observe(float(parent.filled_qty / parent.size))
        self.parents.pop(parent.order_id, None)
        self._finished[parent.order_id] = parent
        while len(self._finished) > FINISHED_MEMORY:
            # Its own children only: a scan of every child known cost each order about a
            # millisecond once 10,000 orders were done.
            _, old = self._finished.popitem(last=False)
            for client_id in old.sent_client_ids():
                self._child_parent.pop(client_id, None)

    def _count_api_error(self, exc: BaseException) -> None:
        if self.metrics is not None:
            kind = "circuit_open" if isinstance(exc, CircuitBreakerOpenError) else "transient"
            self.metrics.exchange_api_errors_total.labels(self.exchange.name, kind).inc()


def build(ctx: ServiceContext) -> None:
    settings = cast(ExecutionSettings, ctx.settings)
    exchange: Exchange
    if settings.exchange == "paper":
        exchange = PaperExchange(settings.paper_config())
    else:
        exchange = CcxtExchange(settings.ccxt_config())
    service = ExecutionService(
        ctx.bus,
        exchange,
        router=ExecutionRouter(settings.router_config()),
        ledger=RedisLedger(ctx.redis, fast=RespConnection(settings.redis_url)),
        metrics=ctx.metrics,
        market_history=ctx.redis,
        # A live venue is polled for fills at most 4 times a second, not on every tick.
        poll_interval_s=0.0 if settings.exchange == "paper" else 0.25,
    )
    # The exchange calls go through the orchestrator's breaker for this component (CB_*
    # settings), so /health shows the breaker that really guards the venue.
    ctx.orchestrator.register_component(name="execution", component=service)
    breaker = ctx.orchestrator.circuit_breaker("execution")
    assert breaker is not None
    service.breaker = breaker
