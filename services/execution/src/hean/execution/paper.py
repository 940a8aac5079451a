"""The paper exchange: fills against the latest market price, deterministic given its inputs.

Model (all figures configurable, see `PaperConfig`):

- Market orders (and marketable limits) fill as taker at the last price moved against us by
  `slippage_bps = base_slippage_bps + impact_bps * notional / depth_notional` (slippage grows
  linearly with size), rounded to the tick against us, and never through a limit price.
- At most `liquidity_notional` is filled per price update; the rest of a market order is
  filled on later updates (partial fills).
- Resting limit orders fill as maker at their limit price once the market trades through
  it (a price beyond the limit; touching it is not enough: the queue ahead at that price
  may take all of it), again at most `liquidity_notional` per update. What a marketable
  limit could not fill at once rests the same way.
- Fees: `qty x price x (taker_fee_rate | maker_fee_rate)`.
- `latency_ms` delays each placement's acknowledgement (simulated network time).
- Unknown symbols (neither configured nor seen in market data), sizes below the minimum and
  prices off tick are refused with the reason a venue would give.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_DOWN, Decimal

from hean.core.types import Side
from hean.execution.exchange import (
    ZERO,
    ChildOrder,
    Exchange,
    ExchangeFill,
    Liquidity,
    MarketRules,
    OrderRefusedError,
    PlaceResult,
)

_BPS = Decimal(10_000)
_FEE_QUANTUM = Decimal("1e-8")


@dataclass(frozen=True, slots=True)
class PaperConfig:
    taker_fee_rate: Decimal = Decimal("0.00055")
    maker_fee_rate: Decimal = Decimal("0.0002")
    base_slippage_bps: Decimal = Decimal("1")
    impact_bps: Decimal = Decimal("10")
    depth_notional: Decimal = Decimal("100000")
    liquidity_notional: Decimal = Decimal("250000")
    latency_ms: float = 0.0
    markets: Mapping[str, MarketRules] = field(default_factory=dict)
    #: rules for a symbol that is not configured but has market data; None: refuse it
    default_rules: MarketRules | None = field(default_factory=lambda: MarketRules("*"))

    def __post_init__(self) -> None:
        for name in ("taker_fee_rate", "maker_fee_rate", "base_slippage_bps", "impact_bps"):
            if getattr(self, name) < 0:
                raise ValueError(f"paper {name} must be >= 0")
        if self.depth_notional <= 0 or self.liquidity_notional <= 0:
            raise ValueError("paper depth and liquidity notionals must be > 0")
        if self.latency_ms < 0:
            raise ValueError("paper latency must be >= 0")


@dataclass(slots=True)
class _Resting:
    child: ChildOrder
    open_qty: Decimal
    liquidity: Liquidity  # market remainders stay taker, limits rest as maker
    fills: int = 0


class PaperExchange(Exchange):
    name = "paper"

    def __init__(self, config: PaperConfig | None = None) -> None:
        self.config = config or PaperConfig()
        self.last_price: dict[str, Decimal] = {}
        self.resting: dict[str, _Resting] = {}
        self._client_ids: set[str] = set()
        self._sequence = 0

    def rules(self, symbol: str) -> MarketRules | None:
        configured = self.config.markets.get(symbol)
        if configured is not None:
            return configured
        if symbol in self.last_price and self.config.default_rules is not None:
            return replace(self.config.default_rules, symbol=symbol)
        return None

    async def place(self, child: ChildOrder, now_ns: int) -> PlaceResult:
        if self.config.latency_ms > 0:
            await asyncio.sleep(self.config.latency_ms / 1000)  # simulated network time
        rules = self.rules(child.symbol)
        if rules is None:
            raise OrderRefusedError(f"unknown symbol {child.symbol}")
        refusal = rules.refusal(child.qty, child.price, self.last_price.get(child.symbol))
        if refusal is not None:
            raise OrderRefusedError(refusal)
        if child.client_order_id in self._client_ids:
            raise OrderRefusedError(f"duplicate client order id {child.client_order_id}")
        last = self.last_price.get(child.symbol)
        if last is None:
            raise OrderRefusedError(f"no market data for {child.symbol}")
        self._client_ids.add(child.client_order_id)
        self._sequence += 1
        exchange_id = f"paper-{self._sequence}"
        marketable = child.type == "market" or (
            child.price is not None
            and (child.price >= last if child.side is Side.BUY else child.price <= last)
        )
        resting = _Resting(child, child.qty, "taker" if marketable else "maker")
        fills: list[ExchangeFill] = []
        if marketable:
            fill = self._fill(resting, last, rules, now_ns)
            if fill is not None:
                fills.append(fill)
            if child.price is not None:
                # What the book could not take rests at the limit, as a venue's would: it
                # fills as maker once the market trades through it, not at once at a price
                # the market has left.
                resting.liquidity = "maker"
        if resting.open_qty > 0:
            self.resting[child.client_order_id] = resting
        return PlaceResult(exchange_id, tuple(fills), resting.open_qty)

    async def cancel(self, client_order_id: str, now_ns: int, symbol: str | None = None) -> Decimal:
        resting = self.resting.pop(client_order_id, None)
        return resting.open_qty if resting is not None else ZERO

    async def on_market_data(
        self, symbol: str, price: Decimal, volume: Decimal, now_ns: int
    ) -> list[ExchangeFill]:
        self.last_price[symbol] = price
        rules = self.rules(symbol)
        if rules is None:
            return []
        fills: list[ExchangeFill] = []
        for client_id, resting in list(self.resting.items()):
            child = resting.child
            if child.symbol != symbol:
                continue
            if resting.liquidity == "maker":
                assert child.price is not None
                # Through, not touching: at the limit price our order may be behind others.
                crossed = price < child.price if child.side is Side.BUY else price > child.price
                if not crossed:
                    continue
            fill = self._fill(resting, price, rules, now_ns)
            if fill is not None:
                fills.append(fill)
            if resting.open_qty <= 0:
                del self.resting[client_id]
        return fills

    async def open_client_order_ids(self, symbols: Collection[str] = ()) -> list[str]:
        return list(self.resting)

    def _fill(
        self, resting: _Resting, last: Decimal, rules: MarketRules, now_ns: int
    ) -> ExchangeFill | None:
        cfg = self.config
        child = resting.child
        qty = min(resting.open_qty, rules.floor_qty(cfg.liquidity_notional / last))
        if qty <= 0:
            return None
        if resting.liquidity == "maker":
            assert child.price is not None
            price = child.price
            rate = cfg.maker_fee_rate
        else:
            notional = qty * last
            bps = cfg.base_slippage_bps + cfg.impact_bps * notional / cfg.depth_notional
            up = child.side is Side.BUY
            move = last * bps / _BPS
            price = rules.round_price(last + move if up else last - move, up=up)
            if child.price is not None:  # a marketable limit never fills through its price
                price = min(price, child.price) if up else max(price, child.price)
            rate = cfg.taker_fee_rate
        resting.open_qty -= qty
        resting.fills += 1
        fee = (qty * price * rate).quantize(_FEE_QUANTUM, rounding=ROUND_DOWN)
        return ExchangeFill(
            fill_id=f"{child.client_order_id}-f{resting.fills}",
            client_order_id=child.client_order_id,
            symbol=child.symbol,
            side=child.side,
            qty=qty,
            price=price,
            fee=fee,
            liquidity=resting.liquidity,
            reference_price=last,
            timestamp_ns=now_ns,
        )
