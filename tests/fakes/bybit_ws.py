"""A fake Bybit v5 public market-data venue: REST klines and the public websocket, served
by aiohttp on 127.0.0.1 (never the internet), spoken to by unmodified ccxt / ccxt.pro.

REST (what `fetch_ohlcv` and `load_markets` use): `/v5/market/instruments-info` and
`/v5/market/kline` answered from `bars`, the venue's record, which the test controls. The
next requests can be answered with HTTP 503 (`fail_next`) or have their connection cut
mid-request (`drop_next`).

Websocket (what ccxt.pro's `watch_ohlcv` uses): `/v5/public/<category>` as on
`wss://stream.bybit.com`. It answers `{"op": "subscribe", "args": ["kline.1.BTCUSDT"]}` and
`{"op": "ping"}` the way Bybit does and pushes kline updates
(`{"topic": "kline.1.BTCUSDT", "data": [{"start", "end", "open", ..., "confirm"}]}`) when
the test calls `push`. With `repeat_s` set, the newest pushed bar is pushed again every
`repeat_s` seconds, as a live market keeps updating its forming bar. The test can close
every connection from the server side (`drop`), cut them without a close frame (`cut`),
refuse new connections with HTTP 503 while `refuse_ws` is set, and make a gap by simply
never pushing or adding some bars.

Time is the test's: bar `i` starts at `t0_ms + i` minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

BAR_MS = 60_000
T0_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC
MARKET_ID = "BTCUSDT"
TOPIC = f"kline.1.{MARKET_ID}"
#: Bybit's instruments-info row for the BTCUSDT linear perpetual, as the real API answers it;
#: every fake Bybit of the tests serves this one.
INSTRUMENT: dict[str, Any] = {
    "symbol": MARKET_ID,
    "contractType": "LinearPerpetual",
    "status": "Trading",
    "baseCoin": "BTC",
    "quoteCoin": "USDT",
    "settleCoin": "USDT",
    "launchTime": "1585526400000",
    "deliveryTime": "0",
    "deliveryFeeRate": "",
    "priceScale": "2",
    "leverageFilter": {"minLeverage": "1", "maxLeverage": "100.00", "leverageStep": "0.01"},
    "priceFilter": {"minPrice": "0.10", "maxPrice": "199999.80", "tickSize": "0.10"},
    "lotSizeFilter": {
        "maxOrderQty": "100.000",
        "minOrderQty": "0.001",
        "qtyStep": "0.001",
        "postOnlyMaxOrderQty": "1000.000",
        "maxMktOrderQty": "100.000",
        "minNotionalValue": "5",
    },
    "unifiedMarginTrade": True,
    "fundingInterval": 480,
    "copyTrading": "both",
    "upperFundingRate": "0.00375",
    "lowerFundingRate": "-0.00375",
}


async def real_clock_t0(bars_before_now: int, margin_s: float = 20.0) -> int:
    """A fake venue's first bar such that bar `bars_before_now` is the one forming now, on
    the real clock, for tests of a feed that computes its history window from the clock.
    Within `margin_s` of a bar's end it first waits for the next bar: a process starting
    across the boundary would ask for one bar later than the test laid out (a history of
    49 bars instead of 50, seen once in CI)."""
    left_s = (BAR_MS - int(time.time() * 1000) % BAR_MS) / 1000
    if left_s < margin_s:
        await asyncio.sleep(left_s + 0.2)
    return (int(time.time() * 1000) // BAR_MS - bars_before_now) * BAR_MS


def listed_orders(
    orders: Iterable[dict[str, Any]], request: web.Request, *, open_: bool
) -> list[dict[str, Any]]:
    """What Bybit's order/realtime (`open_`) or order/history lists of `orders`, filtered by
    the request's `orderLinkId` when it names one (the fake order venues share this)."""
    link = request.query.get("orderLinkId")
    return [
        o
        for o in orders
        if (o["orderStatus"] == "New") == open_ and link in (None, o["orderLinkId"])
    ]


def bar_row(i: int, t0_ms: int = T0_MS) -> list[str]:
    """Bybit kline row for bar i: [start ms, open, high, low, close, volume, turnover]."""
    base = 40_000 + (i % 50) * 10
    return [
        str(t0_ms + i * BAR_MS),
        f"{base}",
        f"{base + 15}",
        f"{base - 5}",
        f"{base + 5}",
        "12.5",
        "500000",
    ]


@dataclass
class _Socket:
    ws: web.WebSocketResponse
    request: web.Request
    topics: set[str] = field(default_factory=set)


@dataclass
class FakeBybit:
    """See the module docstring."""

    bars: dict[int, list[str]] = field(default_factory=dict)  # the venue's record, by index
    t0_ms: int = T0_MS
    # REST faults
    fail_next: int = 0
    drop_next: int = 0
    kline_requests: int = 0
    # websocket
    refuse_ws: bool = False
    repeat_s: float = 0.0
    ws_accepted: int = 0
    ws_refused: int = 0
    pings: int = 0
    pushes: int = 0
    _sockets: list[_Socket] = field(default_factory=list)
    _newest_pushed: int | None = None
    _conn_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # --- the venue's record ------------------------------------------------------------

    def add(self, *indices: int) -> None:
        """Bars the venue has (REST answers them); not pushed to websocket subscribers."""
        for i in indices:
            self.bars[i] = bar_row(i, self.t0_ms)

    def forget(self, *indices: int) -> None:
        """Bars the venue lost: neither REST nor a later push will have them."""
        for i in indices:
            self.bars.pop(i, None)

    def start_ms(self, i: int) -> int:
        return self.t0_ms + i * BAR_MS

    # --- websocket control ---------------------------------------------------------------

    def subscribed(self, topic: str = TOPIC) -> int:
        """Open connections subscribed to `topic`."""
        return sum(1 for s in self._sockets if topic in s.topics and not s.ws.closed)

    async def push(self, i: int, *, close: str | None = None, confirm: bool = False) -> int:
        """Record bar i (its close moved to `close` if given: the forming bar trading) and
        push it to every subscriber; returns how many connections it went to."""
        row = self.bars.get(i) or bar_row(i, self.t0_ms)
        if close is not None:
            high = max(float(row[2]), float(close))
            low = min(float(row[3]), float(close))
            row = [row[0], row[1], f"{high:g}", f"{low:g}", close, row[5], row[6]]
        self.bars[i] = row
        if self._newest_pushed is None or i >= self._newest_pushed:
            self._newest_pushed = i
        return await self._send_kline(i, confirm)

    async def drop(self) -> None:
        """Close every connection from the server side (a close frame: "going away")."""
        for sock in list(self._sockets):
            await sock.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server restart")

    def cut(self) -> None:
        """Cut every connection without a close frame (the network went away)."""
        for sock in list(self._sockets):
            if sock.request.transport is not None:
                sock.request.transport.abort()

    # --- aiohttp -------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v5/market/instruments-info", self.instruments)
        app.router.add_get("/v5/market/kline", self.kline)
        app.router.add_get("/v5/public/{category}", self.websocket)
        return app

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[tuple[str, str]]:
        """Serve on a free port; yields (REST base URL, websocket base URL)."""
        runner = web.AppRunner(self.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        repeater = asyncio.create_task(self._repeat())
        try:
            yield f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
        finally:
            repeater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await repeater
            for sock in list(self._sockets):
                await sock.ws.close()
            await runner.cleanup()

    async def instruments(self, request: web.Request) -> web.Response:
        listed = [] if request.query.get("status") == "PreLaunch" else [INSTRUMENT]
        return _reply({"category": "linear", "list": listed, "nextPageCursor": ""})

    async def kline(self, request: web.Request) -> web.StreamResponse:
        self.kline_requests += 1
        if self.drop_next > 0:
            self.drop_next -= 1
            assert request.transport is not None
            request.transport.close()  # the connection drops mid-request
            return web.Response(status=200)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="Service Unavailable")
        q = request.query
        assert q["symbol"] == MARKET_ID and q["interval"] == "1" and q["category"] == "linear"
        start = int(q.get("start", 0))
        end = int(q.get("end", 2**62))
        limit = int(q.get("limit", 200))
        rows = [r for r in self.bars.values() if start <= int(r[0]) <= end]
        rows.sort(key=lambda r: -int(r[0]))  # Bybit answers newest first
        return _reply({"category": "linear", "symbol": MARKET_ID, "list": rows[:limit]})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_ws:
            self.ws_refused += 1
            return web.Response(status=503, text="Service Unavailable")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.ws_accepted += 1
        sock = _Socket(ws, request)
        conn_id = f"fake-{next(self._conn_ids)}"
        self._sockets.append(sock)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                await self._on_message(sock, conn_id, msg.json())
        finally:
            self._sockets.remove(sock)
        return ws

    async def _on_message(self, sock: _Socket, conn_id: str, message: dict[str, Any]) -> None:
        op, req_id = message.get("op"), message.get("req_id")
        if op == "ping":
            self.pings += 1
            reply = {"success": True, "ret_msg": "pong", "conn_id": conn_id, "op": "ping"}
        elif op == "subscribe":
            topics = [str(t) for t in message.get("args", [])]
            unknown = [t for t in topics if t != TOPIC]
            if unknown:
                reply = {
                    "success": False,
                    "ret_msg": f"error:handler not found,topic:{unknown[0]}",
                    "conn_id": conn_id,
                    "op": "subscribe",
                }
            else:
                sock.topics.update(topics)
                reply = {"success": True, "ret_msg": "", "conn_id": conn_id, "op": "subscribe"}
        elif op == "unsubscribe":
            sock.topics.difference_update(str(t) for t in message.get("args", []))
            reply = {"success": True, "ret_msg": "", "conn_id": conn_id, "op": "unsubscribe"}
        else:
            reply = {"success": False, "ret_msg": f"unknown op {op!r}", "conn_id": conn_id}
        if req_id is not None:
            reply["req_id"] = req_id
        await sock.ws.send_json(reply)

    async def _send_kline(self, i: int, confirm: bool) -> int:
        row = self.bars[i]
        start = int(row[0])
        message = {
            "topic": TOPIC,
            "data": [
                {
                    "start": start,
                    "end": start + BAR_MS - 1,
                    "interval": "1",
                    "open": row[1],
                    "close": row[4],
                    "high": row[2],
                    "low": row[3],
                    "volume": row[5],
                    "turnover": row[6],
                    "confirm": confirm,
                    "timestamp": start + BAR_MS // 2,
                }
            ],
            "ts": start + BAR_MS // 2,
            "type": "snapshot",
        }
        sent = 0
        for sock in list(self._sockets):
            if TOPIC in sock.topics and not sock.ws.closed:
                with contextlib.suppress(ConnectionError):
                    await sock.ws.send_json(message)
                    sent += 1
        self.pushes += sent
        return sent

    async def _repeat(self) -> None:
        while True:
            await asyncio.sleep(self.repeat_s or 0.05)
            newest = self._newest_pushed
            if self.repeat_s > 0 and newest is not None and newest in self.bars:
                await self._send_kline(newest, False)


def _reply(result: Any) -> web.Response:
    return web.json_response(
        {"retCode": 0, "retMsg": "OK", "result": result, "retExtInfo": {}, "time": T0_MS}
    )
