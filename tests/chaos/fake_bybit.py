"""A local fake Bybit v5 server (aiohttp) that can be told to misbehave.

The approach of tests/integration/test_order_path_ccxt.py (instruments-info, order/create,
order/cancel, order/realtime and order/history (by orderLinkId too), execution/list; unique
orderLinkIds; the instrument's minimum quantity; a 5000 USDT account), plus scripted faults
for the next order/create calls and an outage switch, and a record of every create call per
orderLinkId:

- `503`: HTTP 503 before the order book is touched (the venue did nothing).
- `429`: HTTP 429, and `10006`: HTTP 200 with retCode 10006 "Too many visits!" (Bybit's
  rate limit): the venue did nothing.
- `170136`: the order is refused as below the venue's (changed) minimum quantity.
- `drop`: the order is accepted, then the connection is closed without an answer.
- `hold`: the order is accepted, then the answer is held (the client times out).
- `outage = True`: every private endpoint answers 503 until cleared.
- `dup_exec`: orderLinkIds whose execution is listed twice in execution/list.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web

from tests.fakes.bybit_ws import INSTRUMENT, listed_orders

D = Decimal
BALANCE = D(5000)
MIN_QTY = D("0.001")


@dataclass
class FakeBybit:
    price: Decimal = field(default_factory=lambda: D("100"))
    faults: deque[str] = field(default_factory=deque)  # for the next order/create calls
    outage: bool = False
    dup_exec: set[str] = field(default_factory=set)
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)  # by orderLinkId
    executions: list[dict[str, Any]] = field(default_factory=list)
    #: every POST order/create per orderLinkId, and what came of it
    create_calls: Counter[str] = field(default_factory=Counter)
    create_log: list[tuple[str, str]] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v5/market/instruments-info", self.instruments)
        app.router.add_post("/v5/order/create", self.create)
        app.router.add_post("/v5/order/cancel", self.cancel)
        app.router.add_get("/v5/order/realtime", self.realtime)
        app.router.add_get("/v5/order/history", self.history)
        app.router.add_get("/v5/execution/list", self.execution_list)
        return app

    def placed(self, link: str) -> int:
        """How many create calls for `link` reached the order book (accepted or refused)."""
        return sum(1 for lk, what in self.create_log if lk == link and what in _PROCESSED)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests[f"{request.method} {request.path}"] += 1
        private = request.path.startswith(("/v5/order", "/v5/execution"))
        if private and not request.headers.get("X-BAPI-API-KEY"):
            return _reply(None, code=10003, msg="API key is invalid.")
        if private and self.outage:
            if request.path == "/v5/order/create":
                link = str((await request.json()).get("orderLinkId", ""))
                self.create_calls[link] += 1
                self.create_log.append((link, "503 (outage)"))
            return web.Response(status=503, text="Service Unavailable")
        response: web.StreamResponse = await handler(request)
        return response

    async def instruments(self, request: web.Request) -> web.Response:
        listed = [] if request.query.get("status") == "PreLaunch" else [INSTRUMENT]
        return _reply({"category": "linear", "list": listed})

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        link = str(body.get("orderLinkId", ""))
        self.create_calls[link] += 1
        fault = self.faults.popleft() if self.faults else ""
        if fault == "503":
            self.create_log.append((link, "503"))
            return web.Response(status=503, text="Service Unavailable")
        if fault == "429":
            self.create_log.append((link, "429"))
            return web.Response(status=429, text="Too Many Requests")
        if fault == "10006":
            self.create_log.append((link, "10006"))
            return _reply(None, code=10006, msg="Too many visits!")
        if fault == "170136":  # the venue's minimum moved above our cached rules
            self.create_log.append((link, "refused: qty"))
            return _reply(None, code=170136, msg="Order quantity below the lower limit")
        if link in self.orders:
            self.create_log.append((link, "duplicate"))
            return _reply(None, code=110072, msg="OrderLinkedID is duplicate")
        qty = D(body["qty"])
        if qty < MIN_QTY:
            self.create_log.append((link, "refused: qty"))
            return _reply(None, code=170136, msg="Order quantity below the lower limit")
        if qty * self.price > BALANCE:
            self.create_log.append((link, "refused: balance"))
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
            self._execute(order, qty, self.price)
        self.create_log.append((link, f"accepted{' then ' + fault if fault else ''}"))
        if fault == "drop":
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("fake venue dropped the connection")
        if fault == "hold":
            await self.released.wait()
        return _reply({"orderId": order_id, "orderLinkId": link})

    def _execute(self, order: dict[str, Any], qty: Decimal, price: Decimal) -> None:
        fee = qty * price * D("0.00055")
        execution = {
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
            "execTime": str(int(time.time() * 1000)),
            "isMaker": False,
            "feeRate": "0.00055",
            "closedSize": "0",
            "seq": next(self.ids),
        }
        self.executions.append(execution)
        if order["orderLinkId"] in self.dup_exec:
            self.executions.append(dict(execution))  # the venue reports the fill twice
        order.update(leavesQty="0", cumExecQty=str(qty), orderStatus="Filled")

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
        listed = listed_orders(self.orders.values(), request, open_=True)
        return _reply({"category": "linear", "list": listed})

    async def history(self, request: web.Request) -> web.Response:
        listed = listed_orders(self.orders.values(), request, open_=False)
        return _reply({"category": "linear", "list": listed, "nextPageCursor": ""})

    async def execution_list(self, request: web.Request) -> web.Response:
        return _reply({"category": "linear", "list": list(reversed(self.executions))})


_PROCESSED = (
    "accepted",
    "accepted then drop",
    "accepted then hold",
    "duplicate",
    "refused: qty",
    "refused: balance",
)


def _reply(result: Any, code: int = 0, msg: str = "OK") -> web.Response:
    body = {
        "retCode": code,
        "retMsg": msg,
        "result": result if result is not None else {},
        "retExtInfo": {},
        "time": int(time.time() * 1000),
    }
    return web.json_response(body)


@asynccontextmanager
async def serve(fake: FakeBybit) -> AsyncIterator[str]:
    """Run `fake` on a free local port; yields its base url."""
    runner = web.AppRunner(fake.app(), handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server: Any = site._server
    port = int(server.sockets[0].getsockname()[1])
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        fake.released.set()
        await runner.cleanup()
