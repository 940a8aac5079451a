"""The ccxt adapter against a local fake Bybit v5 HTTP server (aiohttp), never the internet.

The fake venue implements the few v5 endpoints the adapter uses: instruments-info,
order/create (market orders fill at once, limits rest), order/cancel, order/realtime and
execution/list. It enforces unique orderLinkIds and the instrument's minimum quantity, and
can be told to answer the next requests with HTTP 503 (a transient failure). Its execution
list answers as Bybit's does: newest first, 50 a page unless asked for up to 100, and from
a start time only the seven days after it (a longer range is refused). Its clock can be
moved ahead (`clock_offset_ms`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

import pytest
from aiohttp import web

from hean.core.bus import EventBus, InMemoryTransport
from hean.core.circuit_breaker import CircuitBreaker
from hean.core.errors import TransientError
from hean.core.types import Event, EventType, Side
from hean.execution.ccxt_exchange import CcxtConfig, CcxtExchange
from hean.execution.exchange import ChildOrder, OrderRefusedError, PlacementUnknownError
from hean.execution.ledger import RedisLedger
from hean.execution.service import ExecutionService
from tests.fakes.bybit_ws import INSTRUMENT, listed_orders

D = Decimal
WEEK_MS = 7 * 86_400_000


@dataclass
class FakeBybit:
    price: Decimal = field(default_factory=lambda: D("100"))
    fail_next: int = 0
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)  # by orderLinkId
    executions: list[dict[str, Any]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    clock_offset_ms: int = 0
    #: the next create is taken, then answered 503, and this many requests after it fail
    lose_next_create: int = 0
    #: seconds the order lookups (realtime, history) take to answer
    lookup_delay_s: float = 0.0

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.clock_offset_ms

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v5/market/instruments-info", self.instruments)
        app.router.add_post("/v5/order/create", self.create)
        app.router.add_post("/v5/order/cancel", self.cancel)
        app.router.add_get("/v5/order/realtime", self.realtime)
        app.router.add_get("/v5/order/history", self.history)
        app.router.add_get("/v5/execution/list", self.execution_list)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        private = request.path.startswith(("/v5/order", "/v5/execution"))
        if private and not request.headers.get("X-BAPI-API-KEY"):
            return _reply(None, code=10003, msg="API key is invalid.")
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="Service Unavailable")
        response: web.StreamResponse = await handler(request)
        return response

    async def instruments(self, request: web.Request) -> web.Response:
        listed = [] if request.query.get("status") == "PreLaunch" else [INSTRUMENT]
        return _reply({"category": "linear", "list": listed})

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        link = body.get("orderLinkId", "")
        if link in self.orders:
            return _reply(None, code=110072, msg="OrderLinkedID is duplicate")
        qty = D(body["qty"])
        if qty < D("0.001"):
            return _reply(None, code=170136, msg="Order quantity below the lower limit")
        if qty * self.price > D(5000):  # the fake account holds 5000 USDT
            return _reply(None, code=110007, msg="ab not enough for new order")
        order_id = f"bybit-{next(self.ids)}"
        order = {
            "orderId": order_id,
            "orderLinkId": link,
            "symbol": body["symbol"],
            "side": body["side"],
            "orderType": body["orderType"],
            "qty": body["qty"],
            "price": body.get("price", "0"),
            "leavesQty": body["qty"],
            "cumExecQty": "0",
            "orderStatus": "New",
        }
        self.orders[link] = order
        if body["orderType"] == "Market":
            self._execute(order, qty, self.price, maker=False)
        if self.lose_next_create:  # taken, but the answer is lost; then the venue degrades
            self.fail_next, self.lose_next_create = self.lose_next_create, 0
            return web.Response(status=503, text="Service Unavailable")
        return _reply({"orderId": order_id, "orderLinkId": link})

    def _execute(self, order: dict[str, Any], qty: Decimal, price: Decimal, maker: bool) -> None:
        fee = qty * price * (D("0.0002") if maker else D("0.00055"))
        self.executions.append(
            {
                "symbol": order["symbol"],
                "orderId": order["orderId"],
                "orderLinkId": order["orderLinkId"],
                "side": order["side"],
                "orderPrice": order["price"],
                "orderQty": order["qty"],
                "leavesQty": "0",
                "orderType": order["orderType"],
                "execFee": str(fee),
                "feeCurrency": "USDT",
                "execId": f"exec-{next(self.ids)}",
                "execPrice": str(price),
                "execQty": str(qty),
                "execType": "Trade",
                "execValue": str(qty * price),
                "execTime": str(self.now_ms()),
                "isMaker": maker,
                "feeRate": "0.00055",
                "closedSize": "0",
                "seq": next(self.ids),
            }
        )
        order.update(leavesQty="0", cumExecQty=str(qty), orderStatus="Filled")

    def fill_resting(self, link: str) -> None:
        order = self.orders[link]
        self._execute(order, D(order["qty"]), D(order["price"]), maker=True)

    async def cancel(self, request: web.Request) -> web.Response:
        body = await request.json()
        link = body.get("orderLinkId") or next(
            (k for k, o in self.orders.items() if o["orderId"] == body.get("orderId")), ""
        )
        order = self.orders.get(link)
        if order is None or order["orderStatus"] != "New":
            return _reply(None, code=110001, msg="Order does not exist.")
        order["orderStatus"] = "Cancelled"
        return _reply({"orderId": order["orderId"], "orderLinkId": link})

    async def realtime(self, request: web.Request) -> web.Response:
        if request.query.get("orderLinkId"):
            await asyncio.sleep(self.lookup_delay_s)
        listed = listed_orders(self.orders.values(), request, open_=True)
        return _reply({"category": "linear", "list": listed})

    async def history(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.lookup_delay_s)
        listed = listed_orders(self.orders.values(), request, open_=False)
        return _reply({"category": "linear", "list": listed, "nextPageCursor": ""})

    async def execution_list(self, request: web.Request) -> web.Response:
        q = request.query
        start = int(q["startTime"]) if "startTime" in q else None
        end = int(q["endTime"]) if "endTime" in q else None
        if start is None and end is None:
            end = self.now_ms()
        if start is None:
            start = cast(int, end) - WEEK_MS
        if end is None:
            end = start + WEEK_MS
        if end - start > WEEK_MS:
            return _reply(None, code=10001, msg="The time range cannot exceed 7 days")
        limit = min(int(q.get("limit", 50)), 100)
        listed = [e for e in self.executions if start <= int(e["execTime"]) <= end]
        listed.sort(key=lambda e: int(e["execTime"]), reverse=True)
        return _reply({"category": "linear", "list": listed[:limit], "nextPageCursor": ""})


def _reply(result: Any, code: int = 0, msg: str = "OK") -> web.Response:
    body = {
        "retCode": code,
        "retMsg": msg,
        "result": result if result is not None else {},
        "retExtInfo": {},
        "time": int(time.time() * 1000),
    }
    return web.json_response(body)


@pytest.fixture
async def venue() -> AsyncIterator[tuple[FakeBybit, str]]:
    fake = FakeBybit()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def exchange(venue) -> AsyncIterator[CcxtExchange]:
    _fake, url = venue
    config = CcxtConfig(
        api_key="test-key",
        api_secret="test-secret",
        api_url=url,
        retry_initial_s=0.01,
        retry_max_s=0.05,
    )
    ex = CcxtExchange(config)
    await ex.start()
    yield ex
    await ex.close()


async def running_service(
    exchange: CcxtExchange, *watched: EventType, bus: EventBus | None = None, **kwargs: Any
) -> tuple[EventBus, ExecutionService, list[Event]]:
    """An execution service on `exchange` behind a circuit breaker, started with its bus
    (in memory unless given); the events of the `watched` types it publishes, in order."""
    bus = bus if bus is not None else EventBus()
    seen: list[Event] = []
    for etype in watched:
        bus.subscribe(etype, seen.append)
    svc = ExecutionService(bus, exchange, breaker=CircuitBreaker("bybit"), **kwargs)
    await svc.start()
    await bus.start()
    return bus, svc, seen


def of(events: list[Event], etype: EventType) -> list[Event]:
    return [e for e in events if e.event_type is etype]


def child(cid: str, qty: str = "0.5", type_: str = "market", price: str | None = None):
    return ChildOrder(cid, "p1", "BTC/USDT", Side.BUY, D(qty), type_, D(price) if price else None)  # type: ignore[arg-type]


async def test_ccxt_rules_from_bybit_instrument(exchange):
    rules = exchange.rules("BTC/USDT")
    assert rules is not None
    assert (rules.tick_size, rules.qty_step, rules.min_qty) == (D("0.1"), D("0.001"), D("0.001"))
    assert rules.min_notional == D(5)  # lotSizeFilter.minNotionalValue
    assert exchange.rules("DOGE/USDT") is None


async def test_ccxt_market_order_sends_client_id_and_fill_is_polled_once(venue, exchange):
    fake, _ = venue
    result = await exchange.place(child("ord-1-1"), time.time_ns())
    assert result.exchange_order_id.startswith("bybit-")
    assert "ord-1-1" in fake.orders
    fills = await exchange.poll_fills(time.time_ns())
    assert [(f.client_order_id, f.qty, f.price, f.liquidity) for f in fills] == [
        ("ord-1-1", D("0.5"), D("100"), "taker")
    ]
    assert fills[0].fee == D("0.5") * D("100") * D("0.00055")
    assert await exchange.poll_fills(time.time_ns()) == []


def order_requests(fake: FakeBybit) -> list[str]:
    return [r for r in fake.requests if r.startswith(("POST /v5/order", "GET /v5/order"))]


async def test_ccxt_transient_503_looked_up_before_resent_then_placed_once(venue, exchange):
    fake, _ = venue
    fake.fail_next = 1
    await exchange.place(child("ord-2-1"), time.time_ns())
    assert list(fake.orders) == ["ord-2-1"]
    # A 5xx may hide an accepted order: the venue is asked for it before the resend.
    assert order_requests(fake) == [
        "POST /v5/order/create",
        "GET /v5/order/realtime",
        "GET /v5/order/history",
        "POST /v5/order/create",
    ]


async def test_ccxt_persistent_outage_raises_transient_error_without_resending(venue, exchange):
    fake, _ = venue
    fake.fail_next = 10
    with pytest.raises(TransientError, match=r"ExchangeNotAvailable|503"):
        await exchange.place(child("ord-3-1"), time.time_ns())
    # The lookup could not say whether the first create landed, so it is not resent here;
    # the service retries later with the same orderLinkId (the venue refuses a duplicate).
    assert order_requests(fake) == ["POST /v5/order/create"] + ["GET /v5/order/realtime"] * 3


async def test_ccxt_order_taken_but_unanswered_and_unfindable_is_tracked_not_lost(venue, exchange):
    fake, _ = venue
    fake.lose_next_create = 3  # every lookup attempt fails too
    t0 = time.time_ns()
    with pytest.raises(PlacementUnknownError, match="may have been placed"):
        await exchange.place(child("unk-1-1"), t0)
    assert fake.orders["unk-1-1"]["orderStatus"] == "Filled"  # the venue did take it
    exchange.track_unknown(child("unk-1-1"), t0)  # the service's last attempt does this
    fills = await exchange.poll_fills(t0 + 1_000_000_000)
    assert [(f.client_order_id, f.qty) for f in fills] == [("unk-1-1", D("0.5"))]
    assert await exchange.poll_closed(t0 + 10_000_000_000) == []


async def test_ccxt_unanswered_order_the_venue_never_got_is_reported_closed(venue, exchange):
    fake, _ = venue
    fake.fail_next = 4  # the create and the three lookup attempts
    t0 = time.time_ns()
    with pytest.raises(PlacementUnknownError):
        await exchange.place(child("unk-2-1", type_="limit", price="90.0"), t0)
    assert fake.orders == {}
    exchange.track_unknown(child("unk-2-1", type_="limit", price="90.0"), t0)
    assert await exchange.poll_fills(t0 + 1_000_000_000) == []
    closed = await exchange.poll_closed(t0 + 10_000_000_000)
    assert [(c.client_order_id, c.reason) for c in closed] == [
        ("unk-2-1", "it never reached the venue")
    ]


async def test_ccxt_service_unanswered_placement_on_last_delivery_is_not_rejected(venue, exchange):
    """The venue took the order but its answer was lost and it could not be asked, on the
    approval's last delivery (no retry left): the order must not be reported rejected
    (risk would free its exposure while it fills), nor placed again."""
    fake, _ = venue
    watched = (EventType.ORDER_FILLED, EventType.ORDER_REJECTED, EventType.ORDER_CANCELLED)
    last_delivery = EventBus(transport=InMemoryTransport(max_deliveries=1))
    bus, _svc, seen = await running_service(exchange, *watched, bus=last_delivery)
    fake.lose_next_create = 3
    data = {"order_id": "unk-3", "symbol": "BTC/USDT", "side": "BUY", "size": "0.25"}
    await bus.publish(Event(event_type=EventType.ORDER_APPROVED, source="risk:test", data=data))
    await bus.flush(10)
    assert seen == []
    assert list(fake.orders) == ["unk-3-1"]
    tick = {"symbol": "BTC/USDT", "price": "100"}
    await bus.publish(Event(event_type=EventType.TICK, data=tick))
    await bus.flush(10)
    assert [(e.event_type, e.data["filled_qty"]) for e in seen] == [
        (EventType.ORDER_FILLED, D("0.25"))
    ]
    assert list(fake.orders) == ["unk-3-1"]  # placed once
    await bus.stop()


async def test_ccxt_fee_in_quote_with_its_sign_a_base_coin_fee_at_the_fill_price(exchange):
    quote_fee = exchange._quote_fee
    # A spot buy's fee comes in the base coin: 0.0001 BTC at 60,000 is 6 USDT.
    assert quote_fee({"cost": "0.0001", "currency": "BTC"}, "BTC/USDT", D(60000)) == D(6)
    assert quote_fee({"cost": "3.3", "currency": "USDT"}, "BTC/USDT", D(60000)) == D("3.3")
    # A maker rebate stays negative (it was counted as a cost).
    assert quote_fee({"cost": "-0.01", "currency": "USDT"}, "BTC/USDT", D(100)) == D("-0.01")
    assert quote_fee({}, "BTC/USDT", D(100)) == 0


async def test_ccxt_unanswered_later_slice_is_followed_and_cancelled_by_the_kill_switch(
    venue, exchange
):
    """A TWAP's second slice goes unanswered (and cannot be looked up) on a tick: it may be
    resting on the venue, so it stays one of the order's open children, and the kill
    switch cancels it there (it used to be forgotten until a later tick placed it again)."""
    fake, _ = venue
    bus, _svc, cancelled = await running_service(exchange, EventType.ORDER_CANCELLED)
    t0 = time.time_ns()
    data: dict[str, Any] = {"order_id": "tw", "symbol": "BTC/USDT", "side": "BUY", "size": "0.5"}
    data |= {"type": "twap", "price": "90", "slices": 2, "duration_s": 10}
    await bus.publish(
        Event(event_type=EventType.ORDER_APPROVED, source="risk:test", data=data, timestamp=t0)
    )
    await bus.flush(10)
    assert list(fake.orders) == ["tw-1"]
    fake.lose_next_create = 3
    tick = {"symbol": "BTC/USDT", "price": "100"}
    await bus.publish(Event(event_type=EventType.TICK, data=tick, timestamp=t0 + 6 * 10**9))
    await bus.flush(10)
    assert fake.orders["tw-2"]["orderStatus"] == "New"  # the venue took it
    trigger = {"reason": "manual", "triggered_by": "test"}
    await bus.publish(Event(event_type=EventType.KILLSWITCH_TRIGGERED, data=trigger))
    await bus.flush(10)
    assert [e.data["order_id"] for e in cancelled] == ["tw"]
    assert fake.orders["tw-1"]["orderStatus"] == "Cancelled"
    assert fake.orders["tw-2"]["orderStatus"] == "Cancelled"
    await bus.stop()


async def test_ccxt_fill_slippage_measured_from_the_market_price_when_placed(venue, exchange):
    # Live fills reported slippage 0 (their own price as the reference): the dashboards'
    # slippage panel said nothing about the live venue.
    fake, _ = venue
    await exchange.on_market_data("BTC/USDT", D(100), D(0), 0)
    fake.price = D("100.5")  # the market moved before the order met it
    t0 = time.time_ns()
    await exchange.place(child("slip-1-1"), t0)
    (fill,) = await exchange.poll_fills(t0 + 10**9)
    assert (fill.price, fill.reference_price, fill.slippage_bps) == (D("100.5"), D(100), D(50))


async def test_ccxt_find_order_by_client_order_id_open_or_closed(venue, exchange):
    fake, _ = venue
    await exchange.place(child("ord-9-1"), time.time_ns())  # a market order: filled, closed
    found = await exchange.find_order("BTC/USDT:USDT", "ord-9-1")
    assert found is not None and found["id"] == fake.orders["ord-9-1"]["orderId"]
    assert await exchange.find_order("BTC/USDT:USDT", "ord-9-2") is None


async def test_ccxt_refusal_not_retried_and_carries_venue_reason(venue, exchange):
    fake, _ = venue
    with pytest.raises(OrderRefusedError, match="ab not enough for new order"):
        await exchange.place(child("ord-4-1", qty="60"), time.time_ns())
    assert fake.requests.count("POST /v5/order/create") == 1


async def test_ccxt_duplicate_client_id_read_as_already_placed(venue, exchange):
    fake, _ = venue
    await exchange.place(child("ord-5-1"), time.time_ns())
    again = await exchange.place(child("ord-5-1"), time.time_ns())
    assert again.exchange_order_id == ""
    assert len([o for o in fake.orders if o == "ord-5-1"]) == 1


async def test_ccxt_limit_rests_is_listed_open_and_cancelled(venue, exchange):
    fake, _ = venue
    await exchange.place(child("ord-6-1", type_="limit", price="90.0"), time.time_ns())
    assert await exchange.open_client_order_ids() == ["ord-6-1"]
    await exchange.cancel("ord-6-1", time.time_ns())
    assert fake.orders["ord-6-1"]["orderStatus"] == "Cancelled"
    assert await exchange.open_client_order_ids() == []


async def test_ccxt_fill_eight_quiet_days_after_the_last_one_is_still_seen(venue, exchange):
    # A poll asks from where the last one ended; Bybit answers a start time with the seven
    # days after it only. Left at the last fill, the start would hide every later fill.
    fake, _ = venue
    t0 = time.time_ns()
    await exchange.place(child("q-1-1"), t0)
    assert [f.client_order_id for f in await exchange.poll_fills(t0)] == ["q-1-1"]
    await exchange.place(child("q-2-1", type_="limit", price="99.0"), t0)
    fake.clock_offset_ms = 8 * 86_400_000  # nothing polled for eight days (execution down)
    fake.fill_resting("q-2-1")
    later = t0 + fake.clock_offset_ms * 1_000_000
    assert [f.client_order_id for f in await exchange.poll_fills(later)] == ["q-2-1"]
    assert await exchange.poll_fills(later) == []


async def test_ccxt_trade_ids_kept_long_enough_never_reported_twice_then_forgotten(venue, exchange):
    fake, _ = venue
    t0 = time.time_ns()
    await exchange.place(child("r-1-1"), t0)
    assert [f.client_order_id for f in await exchange.poll_fills(t0)] == ["r-1-1"]
    # Nothing open on the symbol; an order 30 s later polls from a minute before it, which
    # still holds the first order's trade: that one is not reported again.
    t1 = t0 + 30 * 1_000_000_000
    await exchange.place(child("r-2-1"), t1)
    assert [f.client_order_id for f in await exchange.poll_fills(t1)] == ["r-2-1"]
    # Two days on, ids of trades no poll can ask for again are forgotten.
    fake.clock_offset_ms = 2 * 86_400_000
    t2 = t0 + fake.clock_offset_ms * 1_000_000
    await exchange.place(child("r-3-1"), t2)
    assert [f.client_order_id for f in await exchange.poll_fills(t2)] == ["r-3-1"]
    assert len(exchange._seen_trades) == 1


async def test_ccxt_fills_beyond_one_page_all_seen_once_and_filled_children_not_polled(
    venue, exchange
):
    fake, _ = venue
    now = time.time_ns()
    for i in range(230):  # more than two pages of 100 (Bybit's default page is 50)
        await exchange.place(child(f"p-{i}-1", qty="0.01"), now)
    fills = await exchange.poll_fills(now)
    assert sorted(f.client_order_id for f in fills) == sorted(f"p-{i}-1" for i in range(230))
    asked = fake.requests.count("GET /v5/execution/list")
    # Every child is filled in full: there is nothing left to poll for.
    assert await exchange.poll_fills(now) == []
    assert fake.requests.count("GET /v5/execution/list") == asked


async def test_ccxt_child_the_venue_ended_by_itself_reported_closed_once(venue, exchange):
    fake, _ = venue
    s = 1_000_000_000
    t0 = time.time_ns()
    await exchange.place(child("v-1-1", type_="limit", price="90.0"), t0)  # rests
    await exchange.place(child("v-2-1", type_="limit", price="91.0"), t0)  # rests, then fills
    fake.orders["v-1-1"]["orderStatus"] = "Cancelled"  # the venue's own doing
    fake.fill_resting("v-2-1")
    assert await exchange.poll_closed(t0 + 1 * s) == []  # too young to be looked for
    assert [f.client_order_id for f in await exchange.poll_fills(t0 + 10 * s)] == ["v-2-1"]
    closed = await exchange.poll_closed(t0 + 10 * s)
    assert [(c.client_order_id, c.reason) for c in closed] == [
        ("v-1-1", "the venue ended it (canceled)")
    ]
    assert await exchange.poll_closed(t0 + 20 * s) == []  # once


async def test_ccxt_child_filled_before_our_cancel_still_reports_its_fill(venue, exchange):
    fake, _ = venue
    s = 1_000_000_000
    t0 = time.time_ns()
    await exchange.place(child("k-1-1", type_="limit", price="90.0"), t0)
    await exchange.place(child("k-2-1", type_="limit", price="91.0"), t0)
    fake.fill_resting("k-1-1")  # fills between two polls ...
    assert await exchange.cancel("k-1-1", t0) == 0  # ... so the cancel is refused
    assert await exchange.cancel("k-2-1", t0) == 0  # cancelled
    fills = await exchange.poll_fills(t0 + s)
    assert [(f.client_order_id, f.qty) for f in fills] == [("k-1-1", D("0.5"))]
    assert await exchange.poll_closed(t0 + 10 * s) == []  # our cancel: nothing to report
    assert exchange._open == {}  # both let go: nothing left to poll
    assert await exchange.poll_fills(t0 + 20 * s) == []


async def test_ccxt_kill_switch_after_an_unpolled_fill_reports_the_fill(venue, exchange):
    fake, _ = venue
    watched = (EventType.ORDER_FILLED, EventType.ORDER_CANCELLED)
    bus, _svc, seen = await running_service(exchange, *watched)
    data = {"order_id": "ks", "symbol": "BTC/USDT", "side": "BUY", "size": "0.25"}
    data |= {"type": "limit", "price": "90"}
    await bus.publish(Event(event_type=EventType.ORDER_APPROVED, source="risk:test", data=data))
    await bus.flush(10)
    fake.fill_resting("ks-1")
    trigger = {"reason": "daily drawdown", "triggered_by": "risk"}
    await bus.publish(Event(event_type=EventType.KILLSWITCH_TRIGGERED, data=trigger))
    await bus.flush(10)
    assert [e.data["order_id"] for e in of(seen, EventType.ORDER_CANCELLED)] == ["ks"]
    for n in range(3):
        tick = {"symbol": "BTC/USDT", "price": "100"}
        at = time.time_ns() + n * 10 * 1_000_000_000
        await bus.publish(Event(event_type=EventType.TICK, data=tick, timestamp=at))
        await bus.flush(10)
    fills = of(seen, EventType.ORDER_FILLED)
    assert [(f.data["order_id"], f.data["filled_qty"]) for f in fills] == [("ks", D("0.25"))]
    await bus.stop()


async def test_ccxt_child_filled_while_its_state_is_looked_up_is_not_a_crash(venue, exchange):
    # Events of different symbols are handled concurrently: a fill poll can let a child go
    # while the order-state poll is waiting for the venue's answer about it.
    fake, _ = venue
    s = 1_000_000_000
    t0 = time.time_ns()
    await exchange.place(child("race-1-1", type_="limit", price="90.0"), t0)
    fake.fill_resting("race-1-1")
    fake.lookup_delay_s = 0.3
    closed, fills = await asyncio.gather(
        exchange.poll_closed(t0 + 10 * s), exchange.poll_fills(t0 + 10 * s)
    )
    assert closed == []
    assert [f.client_order_id for f in fills] == ["race-1-1"]
    assert exchange._open == {}


async def test_ccxt_order_the_venue_cancelled_is_reported_cancelled(venue, exchange):
    # Trades say nothing of a cancel: without asking for order states the order would stay
    # working for ever (risk keeping its reservation, the ledger listing it open).
    fake, _ = venue
    bus, svc, cancelled = await running_service(exchange, EventType.ORDER_CANCELLED)
    data = {"order_id": "vc", "symbol": "BTC/USDT", "side": "BUY", "size": "0.25"}
    data |= {"type": "limit", "price": "90"}
    await bus.publish(Event(event_type=EventType.ORDER_APPROVED, source="risk:test", data=data))
    await bus.flush(10)
    assert fake.orders["vc-1"]["orderStatus"] == "New"
    fake.orders["vc-1"]["orderStatus"] = "Cancelled"
    later = time.time_ns() + 10 * 1_000_000_000
    tick = {"symbol": "BTC/USDT", "price": "100"}
    await bus.publish(Event(event_type=EventType.TICK, data=tick, timestamp=later))
    await bus.flush(10)
    (event,) = cancelled
    assert event.data["order_id"] == "vc"
    assert "the venue ended it (canceled)" in event.data["reason"]
    assert (event.data["filled_qty"], event.data["remaining_qty"]) == (D(0), D("0.25"))
    assert svc.parents == {}
    await bus.stop()


@pytest.mark.parametrize(
    ("venue_fills_it", "poll_interval_s"),
    [(True, 0.0), (False, 0.0), (True, 1e9)],  # 1e9: fills seen only when the cancel took
)
async def test_ccxt_order_whose_cancel_failed_is_not_reported_cancelled_until_the_venue_says(
    venue, exchange, venue_fills_it, poll_interval_s
):
    """The kill switch's cancel of a resting child is not taken (the venue answers 503).
    Reported cancelled at once, risk freed the reservation while the child could still
    fill: an order stays working (health degraded) until the cancel is taken, sent again on
    a market event, or the child fills: then it ends filled, not cancelled."""
    fake, _ = venue
    watched = (EventType.ORDER_CANCELLED, EventType.ORDER_FILLED)
    bus, svc, seen = await running_service(exchange, *watched, poll_interval_s=poll_interval_s)
    data = {"order_id": "cf", "symbol": "BTC/USDT", "side": "BUY", "size": "0.25"}
    data |= {"type": "limit", "price": "90"}
    await bus.publish(Event(event_type=EventType.ORDER_APPROVED, source="risk:test", data=data))
    tick = {"symbol": "BTC/USDT", "price": "100"}
    await bus.publish(Event(event_type=EventType.TICK, data=tick))  # the first poll
    await bus.flush(10)
    fake.fail_next = 100  # the cancel and its retries
    trigger = {"reason": "manual", "triggered_by": "test"}
    await bus.publish(Event(event_type=EventType.KILLSWITCH_TRIGGERED, data=trigger))
    await bus.flush(10)
    assert seen == [] and fake.orders["cf-1"]["orderStatus"] == "New"
    health = svc.health_check()
    assert health["state"] == "degraded" and "cf" in health["error_message"]

    fake.fail_next = 0  # the venue is back
    if venue_fills_it:
        fake.fill_resting("cf-1")
    await bus.publish(Event(event_type=EventType.TICK, data=tick))
    await bus.flush(10)
    if venue_fills_it:
        (filled,) = seen
        assert filled.event_type is EventType.ORDER_FILLED
        assert filled.data["remaining_qty"] == 0  # risk frees the reservation now
    else:
        (cancelled,) = seen
        assert cancelled.event_type is EventType.ORDER_CANCELLED
        assert cancelled.data["reason"] == "kill switch: manual"
        assert fake.orders["cf-1"]["orderStatus"] == "Cancelled"
    assert svc.parents == {} and svc.health_check() == {"state": "healthy"}
    await bus.stop()


async def test_ccxt_execution_service_approval_to_fill_on_fake_bybit(venue, exchange, redis_client):
    fake, _ = venue
    ledger = RedisLedger(redis_client)
    bus, _svc, fills = await running_service(exchange, EventType.ORDER_FILLED, ledger=ledger)
    approved = Event(
        event_type=EventType.ORDER_APPROVED,
        source="risk:test",
        data={"order_id": "live-1", "symbol": "BTC/USDT", "side": "BUY", "size": "0.25"},
    )
    await bus.publish(approved)
    await bus.publish(approved)  # redelivered: the ledger stops it before the venue
    await bus.publish(Event(event_type=EventType.TICK, data={"symbol": "BTC/USDT", "price": "100"}))
    await bus.flush(10)
    assert list(fake.orders) == ["live-1-1"]
    assert [(f.data["order_id"], f.data["filled_qty"]) for f in fills] == [("live-1", D("0.25"))]
    assert fills[0].data["fill_id"].startswith("bybit-exec-")
    await bus.stop()


async def test_ccxt_size_off_the_venue_step_placed_rounded_down_and_finished(
    venue, exchange, redis_client
):
    # Risk sizes to 0.000001 (ORDER_SIZE_STEP); Bybit's BTCUSDT steps by 0.001 and refuses
    # anything else ("not a multiple of the qty step" used to reject nearly every order).
    fake, _ = venue
    watched = (EventType.ORDER_FILLED, EventType.ORDER_REJECTED)
    ledger = RedisLedger(redis_client)
    bus, _svc, seen = await running_service(exchange, *watched, ledger=ledger)
    data = {
        "order_id": "odd-1",
        "symbol": "BTC/USDT",
        "side": "BUY",
        "size": "0.058333",
        "reference_price": "100",
    }
    await bus.publish(Event(event_type=EventType.ORDER_APPROVED, source="risk:test", data=data))
    await bus.publish(Event(event_type=EventType.TICK, data={"symbol": "BTC/USDT", "price": "100"}))
    await bus.flush(10)
    assert of(seen, EventType.ORDER_REJECTED) == []
    assert fake.orders["odd-1-1"]["qty"] == "0.058"
    fills = of(seen, EventType.ORDER_FILLED)
    assert [(f.data["filled_qty"], f.data["remaining_qty"]) for f in fills] == [(D("0.058"), 0)]
    await bus.stop()


async def test_ccxt_restart_reconciles_open_venue_order_by_cancelling_it(venue, redis_client):
    fake, url = venue
    config = CcxtConfig(api_key="k", api_secret="s", api_url=url, retry_initial_s=0.01)
    first = CcxtExchange(config)
    bus = EventBus()
    svc = ExecutionService(bus, first, ledger=RedisLedger(redis_client))
    await svc.start()
    await bus.start()
    await bus.publish(
        Event(
            event_type=EventType.ORDER_APPROVED,
            source="risk:test",
            data={
                "order_id": "rest-1",
                "symbol": "BTC/USDT",
                "side": "BUY",
                "size": "0.5",
                "type": "limit",
                "price": "90",
            },
        )
    )
    await bus.flush(10)
    assert fake.orders["rest-1-1"]["orderStatus"] == "New"
    await bus.stop()
    await first.close()  # the process dies with its order resting on the venue

    second = CcxtExchange(config)
    bus = EventBus()
    cancelled: list[Event] = []
    bus.subscribe(EventType.ORDER_CANCELLED, cancelled.append)
    svc = ExecutionService(bus, second, ledger=RedisLedger(redis_client))
    await svc.start()  # reconciles before subscribing to new work
    await bus.start()
    await bus.flush(10)
    assert fake.orders["rest-1-1"]["orderStatus"] == "Cancelled"
    assert [c.data["order_id"] for c in cancelled] == ["rest-1"]
    assert svc.reconciled == ["rest-1"]
    await bus.stop()
    await second.close()


async def _rest_then_die(fake: FakeBybit, config: CcxtConfig, redis_client: Any, oid: str) -> None:
    """A first execution places a resting limit `oid` of 0.5 and dies with it open."""
    first = CcxtExchange(config)
    bus = EventBus()
    svc = ExecutionService(bus, first, ledger=RedisLedger(redis_client))
    await svc.start()
    await bus.start()
    data = {"order_id": oid, "symbol": "BTC/USDT", "side": "BUY", "size": "0.5"}
    data |= {"type": "limit", "price": "90"}
    await bus.publish(Event(event_type=EventType.ORDER_APPROVED, source="risk:test", data=data))
    await bus.flush(10)
    assert fake.orders[f"{oid}-1"]["orderStatus"] == "New"
    await bus.stop()
    await first.close()


async def _restart(config: CcxtConfig, redis_client: Any) -> tuple[ExecutionService, list[Event]]:
    second = CcxtExchange(config)
    bus = EventBus()
    seen: list[Event] = []
    for etype in (EventType.ORDER_FILLED, EventType.ORDER_CANCELLED):
        bus.subscribe(etype, seen.append)
    svc = ExecutionService(bus, second, ledger=RedisLedger(redis_client))
    await svc.start()  # reconciles before subscribing to new work
    await bus.start()
    await bus.flush(10)
    await bus.stop()
    return svc, seen  # its exchange still open: the caller closes it


async def test_ccxt_restart_reports_a_fill_made_while_execution_was_down(venue, redis_client):
    fake, url = venue
    config = CcxtConfig(api_key="k", api_secret="s", api_url=url, retry_initial_s=0.01)
    await _rest_then_die(fake, config, redis_client, "down-1")
    fake.fill_resting("down-1-1")  # fills on the venue while no execution runs
    svc, seen = await _restart(config, redis_client)
    assert [(e.event_type, e.data["filled_qty"]) for e in seen] == [
        (EventType.ORDER_FILLED, D("0.5"))
    ]
    fill = seen[0].data
    assert (fill["order_id"], fill["client_order_id"], fill["remaining_qty"]) == (
        "down-1", "down-1-1", 0,
    )  # fmt: skip
    assert fill["fill_id"] == f"bybit-{fake.executions[-1]['execId']}"
    assert svc.reconciled == ["down-1"]
    assert await RedisLedger(redis_client).open_orders() == {}
    await svc.exchange.close()


async def test_ccxt_restart_reports_a_partial_fill_then_cancels_the_rest(venue, redis_client):
    fake, url = venue
    config = CcxtConfig(api_key="k", api_secret="s", api_url=url, retry_initial_s=0.01)
    await _rest_then_die(fake, config, redis_client, "part-1")
    order = fake.orders["part-1-1"]
    fake._execute(order, D("0.2"), D("90"), maker=True)
    order.update(leavesQty="0.3", cumExecQty="0.2", orderStatus="New")  # still resting
    svc, seen = await _restart(config, redis_client)
    assert order["orderStatus"] == "Cancelled"
    assert [(e.event_type, e.data["filled_qty"]) for e in seen] == [
        (EventType.ORDER_FILLED, D("0.2")),
        (EventType.ORDER_CANCELLED, D("0.2")),
    ]
    assert seen[0].data["remaining_qty"] == D("0.3")
    # Asking again (a start retried after a later step failed) finds the fill again.
    again = await svc.exchange.fills_since(
        "BTC/USDT", time.time_ns() - 60 * 10**9, {"part-1"}, time.time_ns()
    )
    assert [f.fill_id for f in again] == [seen[0].data["fill_id"]]
    # A fill some ORDER_FILLED already reports is not reported again.
    claimed_ms = str(time.time_ns() // 1_000_000 - 60_000)
    leftovers = {"part-1": {"symbol": "BTC/USDT", "size": "0.5", "claimed_ms": claimed_ms}}
    published = {"part-1": {seen[0].data["fill_id"]: D("0.2")}}
    assert await svc._venue_fills(leftovers, published) == {}
    await svc.exchange.close()
