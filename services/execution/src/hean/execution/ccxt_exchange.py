"""A live venue through ccxt (Bybit v5 first).

- Client order ids are our child ids (`<order_id>-<n>`, Bybit's `orderLinkId`, <= 36
  chars): a repeated placement is refused by the venue as a duplicate, which we read as
  "already placed" rather than as a failure.
- A create-order whose answer was lost (a timeout, a dropped connection, a 5xx: the venue
  may have accepted it) is never resent blindly: the venue is asked for the client order
  id first (open orders, then the order history) and a found order is adopted as placed.
  Only rate-limit refusals (`DDoSProtection`, `RateLimitExceeded`), which certainly did
  nothing, are resent at once. If the lookup itself fails, `place` raises `TransientError`
  and the service retries later with the same client order id, so the venue's duplicate
  check still stands between a lost answer and a second order.
- Transient errors (ccxt `NetworkError`: timeouts, 5xx, rate limits, exchange unavailable)
  are retried with exponential backoff (tenacity), then raised as `TransientError`; refusals
  (`InvalidOrder`, `BadSymbol`, `InsufficientFunds`, `BadRequest`, ...) are never retried and
  become `OrderRefusedError` with the venue's message. ccxt's own rate limiter is on.
- The execution service calls every method through its circuit breaker.
- Fills are polled from the venue's execution list (`fetch_my_trades`), deduplicated by
  the venue's execution id, for the symbols with a child whose fills may not all be in:
  one not filled in full and not yet seen closed on the venue. A child we cancel stays
  polled until then too, so a fill made before the cancel took (or since the last poll) is
  still reported. Each poll asks from `POLL_OVERLAP_MS` before the previous one on,
  never from an old placement: a venue answers a start time with a bounded window after
  it (Bybit: seven days), so a start left at the last fill would stop seeing new fills a
  week after a quiet spell. A full page is followed by the page before it. Nothing is
  marked seen until every symbol's answer is in, so a failed poll loses no fill.
- Trades say nothing of a cancel: every `ORDER_STATES_INTERVAL_MS` the venue's open orders
  are listed, and a child of ours missing there (older than `LISTING_GRACE_MS`) is looked
  up. One the venue cancelled, expired or rejected by itself (slippage protection, a
  reduce-only order after the position closed, a time-in-force) is reported closed by
  `poll_closed` once its fills are all in, so the order does not stay working for ever.
  One we cancelled is let go the same way, without a report.

Tests point ccxt at a local fake Bybit v5 server by overriding its API urls (`api_url`);
nothing here talks to the internet on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, TypeVar, cast

import ccxt.async_support as ccxt_async  # type: ignore[import-untyped]
from ccxt.base.errors import (  # type: ignore[import-untyped]
    AuthenticationError,
    BadRequest,
    BadSymbol,
    DDoSProtection,
    InsufficientFunds,
    InvalidOrder,
    NetworkError,
    OrderNotFound,
    PermissionDenied,
)
from ccxt.base.errors import ExchangeError as CcxtExchangeError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from hean.core.errors import PermanentError, TransientError
from hean.core.types import Side
from hean.execution.exchange import (
    ZERO,
    ChildOrder,
    ClosedChild,
    Exchange,
    ExchangeFill,
    MarketRules,
    OrderRefusedError,
    PlacementUnknownError,
    PlaceResult,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_REFUSALS = (InvalidOrder, BadSymbol, InsufficientFunds, BadRequest, OrderNotFound)
#: How far before the previous fill poll the next one starts: a venue may list a trade a
#: little after it happened (trades are deduplicated by the venue's id).
POLL_OVERLAP_MS = 60_000
#: Trades asked for per request (Bybit's largest page of executions).
TRADES_PAGE = 100
#: The longest time window one request asks for (Bybit answers at most seven days).
TRADES_WINDOW_MS = 7 * 86_400_000 - 60_000
#: How often the venue is asked which of our children it still has open.
ORDER_STATES_INTERVAL_MS = 5_000
#: A child younger than this may not be listed yet: it is not looked for.
LISTING_GRACE_MS = 5_000
#: ccxt's order states for an order the venue ended without filling it in full.
_CLOSED_BY_VENUE = ("canceled", "expired", "rejected")
#: How long a trade's id is kept, before the oldest start in use: longer than any start a
#: poll may ask from (a minute back; an approval handled late places with its own time).
SEEN_TRADES_KEEP_MS = 86_400_000
_API_KEYS = ("spot", "futures", "v2", "public", "private")


@dataclass(slots=True)
class _OpenChild:
    """A child placed whose fills may not all be polled yet: not filled in full, and not
    seen closed on the venue with every fill it had polled."""

    symbol: str
    qty: Decimal
    placed_ms: int
    left: Decimal  # not filled yet, by the fills polled so far
    cancelled: bool = False  # we cancelled it (or the venue refused: gone already)
    unknown: bool = False  # its placement went unanswered: the venue may not have it
    reference: Decimal | None = None  # the market price when it was placed


@dataclass(frozen=True, slots=True)
class CcxtConfig:
    exchange_id: str = "bybit"
    api_key: str = field(default="", repr=False)
    api_secret: str = field(default="", repr=False)
    testnet: bool = True
    market_type: str = "linear"  # bybit: spot | linear | inverse
    api_url: str | None = None  # override every API url (a local fake venue in tests)
    retry_attempts: int = 3
    retry_initial_s: float = 0.2
    retry_max_s: float = 2.0
    timeout_ms: int = 10_000


class CcxtExchange(Exchange):
    """`Exchange` over a ccxt async client (see the module docstring)."""

    def __init__(self, config: CcxtConfig, client: Any | None = None) -> None:
        self.config = config
        self.name = config.exchange_id
        self.client: Any = client if client is not None else _make_client(config)
        self._symbols: dict[str, str] = {}  # ours -> ccxt's unified symbol
        self._children: dict[str, tuple[str, str]] = {}  # client id -> (venue id, our symbol)
        self._open: dict[str, _OpenChild] = {}  # by client id
        self._states_polled_ms = 0
        self._seen_trades: dict[str, int] = {}  # venue trade id -> its time (ms), recent only
        self._since_ms: dict[str, int] = {}  # per symbol: where the next fill poll starts
        self._marks: dict[str, Decimal] = {}  # per symbol: the last market price we saw

    async def start(self) -> None:
        await self._call(self.client.load_markets)

    async def on_market_data(
        self, symbol: str, price: Decimal, volume: Decimal, now_ns: int
    ) -> list[ExchangeFill]:
        """Remember the market price: a child's fills measure their slippage from the price
        when it was placed, as paper's do from the price they met."""
        if price > 0:
            self._marks[symbol] = price
        return []

    async def close(self) -> None:
        await self.client.close()

    # --- symbols and rules ---------------------------------------------------------------------

    def _venue_symbol(self, symbol: str) -> str | None:
        if symbol in self._symbols:
            return self._symbols[symbol]
        markets: dict[str, Any] = self.client.markets or {}
        candidates = [symbol]
        if ":" not in symbol and "/" in symbol and self.config.market_type != "spot":
            quote = symbol.split("/", 1)[1]
            base_coin = symbol.split("/", 1)[0]
            settle = quote if self.config.market_type == "linear" else base_coin
            candidates.insert(0, f"{symbol}:{settle}")
        for candidate in candidates:
            if candidate in markets:
                self._symbols[symbol] = candidate
                return candidate
        return None

    def rules(self, symbol: str) -> MarketRules | None:
        venue = self._venue_symbol(symbol)
        if venue is None:
            return None
        market = self.client.markets[venue]
        precision = market.get("precision") or {}
        limits = market.get("limits") or {}
        amount = limits.get("amount") or {}
        step = _dec(precision.get("amount")) or Decimal("0.000001")
        return MarketRules(
            symbol,
            tick_size=_dec(precision.get("price")) or Decimal("0.01"),
            qty_step=step,
            min_qty=_dec(amount.get("min")) or step,
            min_notional=_dec((limits.get("cost") or {}).get("min")) or Decimal(0),
        )

    # --- orders --------------------------------------------------------------------------------

    async def place(self, child: ChildOrder, now_ns: int) -> PlaceResult:
        venue = self._venue_symbol(child.symbol)
        if venue is None:
            raise OrderRefusedError(f"unknown symbol {child.symbol} on {self.name}")
        params: dict[str, Any] = {"clientOrderId": child.client_order_id}
        if child.reduce_only:
            params["reduceOnly"] = True
        order = await self._create(venue, child, params)
        exchange_id = str(order.get("id") or "")
        self._track(child, exchange_id, now_ns)
        return PlaceResult(exchange_id, (), child.qty)

    def track_unknown(self, child: ChildOrder, now_ns: int) -> None:
        self._track(child, "", now_ns, unknown=True)

    def _track(
        self, child: ChildOrder, exchange_id: str, now_ns: int, unknown: bool = False
    ) -> None:
        if not any(c.symbol == child.symbol for c in self._open.values()):
            # Nothing of this symbol is being polled: its fills start now, whatever an
            # earlier order's last poll left (an old start would ask a week-long window).
            self._since_ms[child.symbol] = now_ns // 1_000_000 - POLL_OVERLAP_MS
        self._children[child.client_order_id] = (exchange_id, child.symbol)
        self._open[child.client_order_id] = _OpenChild(
            child.symbol,
            child.qty,
            now_ns // 1_000_000,
            child.qty,
            unknown=unknown,
            reference=self._marks.get(child.symbol),
        )

    async def _create(self, venue: str, child: ChildOrder, params: dict[str, Any]) -> Any:
        """`create_order`, retried, but never resent while it may have been placed (see the
        module docstring). Returns the venue's order (`{"id": ""}` if only a duplicate
        refusal says it exists)."""
        client_id = child.client_order_id
        price = float(child.price) if child.price is not None else None
        args = (venue, child.type, child.side.value.lower(), float(child.qty), price, params)
        attempts = max(1, self.config.retry_attempts)
        for attempt in range(1, attempts + 1):
            try:
                return await self._once(self.client.create_order, *args)
            except OrderRefusedError as exc:
                if "duplicate" not in exc.reason.lower():
                    raise
                # An earlier attempt (or run) did land: it is placed already.
                log.warning("%s: %s already placed (%s)", self.name, client_id, exc)
                return {"id": ""}
            except TransientError as exc:
                if not isinstance(exc.__cause__, DDoSProtection):  # may have been placed
                    try:
                        found = await self.find_order(venue, client_id)
                    except TransientError as lookup:
                        raise PlacementUnknownError(
                            f"{exc}; it may have been placed, and looking it up failed: {lookup}"
                        ) from exc
                    if found is not None:
                        log.warning(
                            "%s: %s was placed although its answer was lost (%s); adopted",
                            self.name,
                            client_id,
                            exc,
                        )
                        return found
                if attempt == attempts:
                    raise
                delay = self.config.retry_initial_s * 2 ** (attempt - 1)
                await asyncio.sleep(min(delay, self.config.retry_max_s))
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    async def find_order(self, venue: str, client_order_id: str) -> Any | None:
        """The venue's order with this client order id, open or closed, or None if it has
        none. Raises `TransientError` when the venue cannot say."""
        params = {"orderLinkId": client_order_id} if self.name == "bybit" else {}
        closed = (
            self.client.fetch_canceled_and_closed_orders
            if self.client.has.get("fetchCanceledAndClosedOrders")
            else self.client.fetch_closed_orders
        )
        for fetch in (self.client.fetch_open_orders, closed):
            try:
                orders = await self._call(fetch, venue, None, None, params)
            except OrderRefusedError as exc:  # the venue would not answer this lookup
                raise TransientError(f"cannot look up {client_order_id}: {exc}") from exc
            for order in orders:
                if _client_id(order) == client_order_id:
                    return order
        return None

    async def cancel(self, client_order_id: str, now_ns: int, symbol: str | None = None) -> Decimal:
        known = self._children.get(client_order_id)
        if known is None:
            if symbol is None:
                return ZERO
            known = ("", symbol)  # placed by an earlier run: cancel by client order id
        exchange_id, our_symbol = known
        venue = self._venue_symbol(our_symbol)
        params = {"orderLinkId": client_order_id} if not exchange_id else {}
        # The child stays polled: it may have filled since the last poll (or until the
        # venue took the cancel), and those fills must still be reported. poll_closed lets
        # it go once the venue lists it closed and its fills are in.
        open_child = self._open.get(client_order_id)
        if open_child is not None:
            open_child.cancelled = True
        try:
            order = await self._call(self.client.cancel_order, exchange_id, venue, params)
        except OrderRefusedError as exc:
            log.info("%s: cancel of %s refused: %s", self.name, client_order_id, exc)
            return ZERO
        return _dec(order.get("remaining")) or ZERO

    async def poll_closed(self, now_ns: int) -> list[ClosedChild]:
        now_ms = now_ns // 1_000_000
        if now_ms - self._states_polled_ms < ORDER_STATES_INTERVAL_MS:
            return []
        self._states_polled_ms = now_ms
        by_symbol: dict[str, list[str]] = {}
        for client_id, child in self._open.items():
            if now_ms - child.placed_ms >= LISTING_GRACE_MS:
                by_symbol.setdefault(child.symbol, []).append(client_id)
        closed: list[ClosedChild] = []
        for symbol, client_ids in sorted(by_symbol.items()):
            venue = cast(str, self._venue_symbol(symbol))
            # What failed is asked again next time; what was found is reported now (it is
            # forgotten here, so it must not be lost to a later symbol's failure).
            try:
                # Bybit lists 50 at most: one beyond that is looked up, and found open.
                orders = await self._call(self.client.fetch_open_orders, venue, None, 50)
            except (TransientError, OrderRefusedError) as exc:
                log.warning("%s: listing open orders of %s failed: %s", self.name, symbol, exc)
                continue
            listed = {_client_id(order) for order in orders}
            for client_id in client_ids:
                # Polls of other symbols' events run meanwhile: one may have let it go.
                if (known := self._open.get(client_id)) is None:
                    continue
                if client_id in listed:
                    known.unknown = False  # the venue has it
                    continue
                try:
                    order = await self.find_order(venue, client_id)
                except TransientError as exc:
                    log.warning("%s: looking up %s failed: %s", self.name, client_id, exc)
                    continue
                if (open_child := self._open.get(client_id)) is None:
                    continue  # its last fill was polled meanwhile: nothing left to tell
                if order is None and open_child.cancelled:
                    del self._open[client_id]  # the venue knows no such order: nothing to poll
                    continue
                if order is None and open_child.unknown:
                    # Its placement went unanswered, and the venue has no such order.
                    del self._open[client_id]
                    closed.append(ClosedChild(client_id, "it never reached the venue"))
                    continue
                open_child.unknown = False
                status = str((order or {}).get("status") or "")
                if order is None or status not in _CLOSED_BY_VENUE:
                    continue  # not listed yet, or filled: its trades tell
                if open_child.qty - open_child.left < (_dec(order.get("filled")) or ZERO):
                    continue  # a fill of it is not polled yet: closed once it is
                del self._open[client_id]
                if not open_child.cancelled:
                    closed.append(ClosedChild(client_id, f"the venue ended it ({status})"))
        return closed

    async def poll_fills(self, now_ns: int) -> list[ExchangeFill]:
        now_ms = now_ns // 1_000_000
        symbols = {open_child.symbol for open_child in self._open.values()}
        answers: list[tuple[str, int, list[dict[str, Any]]]] = []
        for symbol in sorted(symbols):  # all asked before anything is marked seen
            since = self._since_ms.get(symbol, now_ms - POLL_OVERLAP_MS)
            answers.append((symbol, since, await self._trades(symbol, since, now_ms)))
        fills: list[ExchangeFill] = []
        for symbol, since, trades in answers:
            for trade in sorted(trades, key=lambda t: int(t.get("timestamp") or 0)):
                fill = self._fill_from_trade(trade, symbol)
                if fill is not None:
                    fills.append(fill)
            self._since_ms[symbol] = max(since, now_ms - POLL_OVERLAP_MS)
        # Ids kept in the order seen (polls hand trades over oldest first): forget from
        # the front, so a poll costs what it forgets, not what is kept.
        in_use = min((self._since_ms[symbol] for symbol in symbols), default=now_ms)
        horizon = min(in_use, now_ms) - SEEN_TRADES_KEEP_MS
        while self._seen_trades:
            trade_id, at = next(iter(self._seen_trades.items()))
            if at >= horizon:
                break
            del self._seen_trades[trade_id]
        return fills

    async def _trades(self, symbol: str, since: int, now_ms: int) -> list[dict[str, Any]]:
        """Our trades on `symbol` from `since` (ms) on, in windows of at most
        `TRADES_WINDOW_MS` (a poll after a long pause walks forward through them); the
        last window is open-ended, so a venue clock a little ahead loses nothing."""
        trades: list[dict[str, Any]] = []
        start = since
        while now_ms - start > TRADES_WINDOW_MS:
            trades += await self._window(symbol, start, start + TRADES_WINDOW_MS)
            start += TRADES_WINDOW_MS
        return trades + await self._window(symbol, start, None)

    async def _window(self, symbol: str, start: int, end: int | None) -> list[dict[str, Any]]:
        """Trades from `start` to `end` (ms): pages of `TRADES_PAGE`, newest first as the
        venue lists them; a full page is followed by the one before it (from its oldest
        trade's millisecond again, duplicates dropped by id; a page all in one millisecond
        moves on to the one before, the only way to keep going)."""
        venue = self._venue_symbol(symbol)
        trades: list[dict[str, Any]] = []
        until = end
        while True:
            params: dict[str, Any] = {} if until is None else {"until": until}
            page = await self._call(self.client.fetch_my_trades, venue, start, TRADES_PAGE, params)
            trades.extend(page)
            if len(page) < TRADES_PAGE:
                return trades
            oldest = min(int(t.get("timestamp") or 0) for t in page)
            until = oldest if until is None or oldest < until else oldest - 1
            if until < start:
                return trades

    def _fill_from_trade(self, trade: dict[str, Any], symbol: str) -> ExchangeFill | None:
        client_id = _client_id(trade)
        trade_id = str(trade.get("id") or "")
        if client_id not in self._children or not trade_id or trade_id in self._seen_trades:
            return None
        self._seen_trades[trade_id] = int(trade.get("timestamp") or 0)
        fill = self._to_fill(trade, symbol)
        if fill is None:
            return None
        open_child = self._open.get(client_id)
        if open_child is not None:
            open_child.unknown = False
            open_child.left -= fill.qty
            if open_child.left <= 0:  # filled in full: not polled for any more
                del self._open[client_id]
            if open_child.reference is not None:
                fill = replace(fill, reference_price=open_child.reference)
        return fill

    def _to_fill(self, trade: dict[str, Any], symbol: str) -> ExchangeFill | None:
        """A venue trade as our fill, or None if it has no quantity or price. Its reference
        price is its own (no slippage) until the caller knows the market price it met."""
        qty = _dec(trade.get("amount")) or ZERO
        price = _dec(trade.get("price")) or ZERO
        if qty <= 0 or price <= 0:
            return None
        timestamp_ms = int(trade.get("timestamp") or 0)
        return ExchangeFill(
            fill_id=f"{self.name}-{trade.get('id')}",
            client_order_id=_client_id(trade),
            symbol=symbol,
            side=Side(str(trade.get("side") or "buy").upper()),
            qty=qty,
            price=price,
            fee=self._quote_fee(trade.get("fee") or {}, symbol, price),
            liquidity="maker" if trade.get("takerOrMaker") == "maker" else "taker",
            reference_price=price,
            timestamp_ns=timestamp_ms * 1_000_000,
        )

    async def fills_since(
        self, symbol: str, since_ns: int, order_ids: Collection[str], now_ns: int
    ) -> list[ExchangeFill]:
        if self._venue_symbol(symbol) is None:
            return []
        now_ms = now_ns // 1_000_000
        trades = await self._trades(symbol, since_ns // 1_000_000 - POLL_OVERLAP_MS, now_ms)
        # Nothing is marked seen: the caller may fail before it reports these, and ask again
        # (a retried start). The children are not polled afterwards: they were cancelled.
        fills: dict[str, ExchangeFill] = {}
        for trade in sorted(trades, key=lambda t: int(t.get("timestamp") or 0)):
            if not trade.get("id") or _client_id(trade).rpartition("-")[0] not in order_ids:
                continue
            fill = self._to_fill(trade, symbol)
            if fill is not None:
                fills.setdefault(fill.fill_id, fill)  # pages overlap by a millisecond
        return list(fills.values())

    def _quote_fee(self, fee: dict[str, Any], symbol: str, price: Decimal) -> Decimal:
        """A trade's fee in the quote currency, with its sign (negative: a maker rebate).
        A spot buy's fee is charged in the base coin (Bybit): worth its cost x price."""
        cost = _dec(fee.get("cost")) or ZERO
        currency = str(fee.get("currency") or "")
        base, _, quote = symbol.partition("/")
        if currency and currency == base:
            return cost * price
        if currency and currency != quote:
            log.warning(
                "%s: fee %s %s on %s is in neither coin of the pair; counted as %s",
                self.name,
                cost,
                currency,
                symbol,
                quote,
            )
        return cost

    async def open_client_order_ids(self, symbols: Collection[str] = ()) -> list[str]:
        ids: list[str] = []
        for symbol in sorted({s for _, s in self._children.values()} | set(symbols)):
            venue = self._venue_symbol(symbol)
            if venue is None:
                continue
            # Bybit lists 20 unless asked for more, 50 at most.
            orders = await self._call(self.client.fetch_open_orders, venue, None, 50)
            for order in orders:
                client_id = order.get("clientOrderId")
                if client_id:
                    ids.append(str(client_id))
                    self._children.setdefault(str(client_id), (str(order.get("id")), symbol))
        return ids

    # --- error mapping and retries --------------------------------------------------------------

    async def _call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.retry_attempts),
            wait=wait_exponential(
                multiplier=self.config.retry_initial_s, max=self.config.retry_max_s
            ),
            retry=retry_if_exception_type(TransientError),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._once(func, *args)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _once(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return await func(*args)
        except NetworkError as exc:  # timeouts, 5xx, rate limits, maintenance
            log.warning("%s: transient error: %s", self.name, exc)
            raise TransientError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        except _REFUSALS as exc:
            raise OrderRefusedError(f"{self.name}: {_message(exc)}") from exc
        except (AuthenticationError, PermissionDenied) as exc:
            raise PermanentError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        except CcxtExchangeError as exc:
            raise PermanentError(f"{self.name}: {type(exc).__name__}: {exc}") from exc


def _make_client(config: CcxtConfig) -> Any:
    cls = getattr(ccxt_async, config.exchange_id)
    client = cls(
        {
            "apiKey": config.api_key,
            "secret": config.api_secret,
            "enableRateLimit": True,
            "timeout": config.timeout_ms,
            "options": {
                "defaultType": "swap" if config.market_type != "spot" else "spot",
                "fetchMarkets": {"types": [config.market_type]},
                # known account mode: saves two private calls per order
                "enableUnifiedMargin": False,
                "enableUnifiedAccount": True,
            },
        }
    )
    if config.testnet and config.api_url is None:
        client.set_sandbox_mode(True)
    if config.api_url is not None:
        client.urls["api"] = {key: config.api_url for key in _API_KEYS}
    client.has["fetchCurrencies"] = False
    return client


def _client_id(order: dict[str, Any]) -> str:
    """Our client order id on a ccxt order or trade (Bybit's `orderLinkId`), or ""."""
    info = order.get("info") or {}
    return str(order.get("clientOrderId") or info.get("orderLinkId") or "")


def _dec(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        result = Decimal(str(value))
    except ArithmeticError:
        return None
    return result if result.is_finite() else None


def _message(exc: BaseException) -> str:
    """ccxt errors read `bybit {"retCode":..., "retMsg": "..."}`; keep it short."""
    text = str(exc)
    return text if len(text) <= 300 else text[:297] + "..."
