"""The exchange interface every venue adapter implements (paper, ccxt), and its value types.

Child orders carry a client order id derived from our order id, so a venue that enforces
unique client ids (Bybit's orderLinkId) refuses a second placement of the same child even
if our own deduplication were bypassed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_FLOOR, Decimal
from typing import Literal

from hean.core.errors import PermanentError, TransientError
from hean.core.types import Side

ZERO = Decimal(0)
Liquidity = Literal["maker", "taker"]
ChildType = Literal["market", "limit"]


class OrderRefusedError(PermanentError):
    """The venue refused the order (unknown symbol, below minimum, price off tick, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PlacementUnknownError(TransientError):
    """The venue may have taken the order: it did not answer the placement, and asking it
    by client order id failed too. Placing it again is safe only under the same client
    order id (the venue refuses a duplicate); reporting it rejected is not (it may fill)."""


@dataclass(frozen=True, slots=True)
class MarketRules:
    """A symbol's trading rules: price tick, quantity step, minimum quantity and minimum
    notional (quantity x price; 0: none)."""

    symbol: str
    tick_size: Decimal = Decimal("0.01")
    qty_step: Decimal = Decimal("0.000001")
    min_qty: Decimal = Decimal("0.000001")
    min_notional: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        if self.tick_size <= 0 or self.qty_step <= 0 or self.min_qty <= 0:
            raise ValueError(f"{self.symbol}: tick size, qty step and min qty must be > 0")
        if self.min_notional < 0:
            raise ValueError(f"{self.symbol}: min notional must be >= 0")

    def floor_qty(self, qty: Decimal) -> Decimal:
        return (qty / self.qty_step).to_integral_value(rounding=ROUND_DOWN) * self.qty_step

    def min_size(self, price: Decimal | None) -> Decimal:
        """The smallest quantity the venue takes at `price`: the minimum quantity, or the
        minimum notional's quantity rounded up to the step if that is larger."""
        if self.min_notional <= 0 or price is None or price <= 0:
            return self.min_qty
        steps = (self.min_notional / price / self.qty_step).to_integral_value(
            rounding=ROUND_CEILING
        )
        return max(self.min_qty, steps * self.qty_step)

    def on_tick(self, price: Decimal) -> bool:
        return price % self.tick_size == 0

    def round_price(self, price: Decimal, *, up: bool) -> Decimal:
        steps = price / self.tick_size
        rounding = ROUND_CEILING if up else ROUND_FLOOR
        return steps.to_integral_value(rounding=rounding) * self.tick_size

    def refusal(
        self, qty: Decimal, price: Decimal | None, mark: Decimal | None = None
    ) -> str | None:
        """Why the venue would refuse this order, or None. The minimum notional is checked
        at `price`, else at `mark` (a market order's expected price) if one is given."""
        if qty < self.min_qty:
            return f"order qty {qty} below minimum {self.min_qty} for {self.symbol}"
        if qty % self.qty_step != 0:
            return f"order qty {qty} is not a multiple of the qty step {self.qty_step}"
        if price is not None and not self.on_tick(price):
            return f"price {price} is not a multiple of the tick size {self.tick_size}"
        at = price if price is not None else mark
        if self.min_notional > 0 and at is not None and qty * at < self.min_notional:
            return (
                f"order value {qty * at:f} below the minimum notional {self.min_notional} "
                f"for {self.symbol}"
            )
        return None


@dataclass(frozen=True, slots=True)
class ChildOrder:
    """One order sent to the venue on behalf of a parent order."""

    client_order_id: str
    parent_order_id: str
    symbol: str
    side: Side
    qty: Decimal
    type: ChildType = "market"
    price: Decimal | None = None
    reduce_only: bool = False


@dataclass(frozen=True, slots=True)
class ExchangeFill:
    fill_id: str
    client_order_id: str
    symbol: str
    side: Side
    qty: Decimal
    price: Decimal
    fee: Decimal
    liquidity: Liquidity
    reference_price: Decimal  # the market price the order met; slippage is measured from it
    timestamp_ns: int

    @property
    def slippage_bps(self) -> Decimal:
        """Adverse price move from the reference, in basis points (negative = improvement)."""
        move = (self.price - self.reference_price) / self.reference_price * Decimal(10_000)
        return (move if self.side is Side.BUY else -move).quantize(Decimal("0.0001"))


@dataclass(frozen=True, slots=True)
class PlaceResult:
    exchange_order_id: str
    fills: tuple[ExchangeFill, ...] = ()
    open_qty: Decimal = ZERO  # still working on the venue after the immediate fills


@dataclass(frozen=True, slots=True)
class ClosedChild:
    """A child the venue closed by itself (cancelled, expired, rejected after taking it),
    reported once every fill of it has been."""

    client_order_id: str
    reason: str


class Exchange(ABC):
    """A trading venue. Adapters raise `OrderRefusedError` (permanent) for refusals and
    `TransientError` for what is worth retrying (timeouts, 5xx, rate limits)."""

    name: str = "exchange"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect and load markets."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abstractmethod
    def rules(self, symbol: str) -> MarketRules | None:
        """The symbol's trading rules, or None if the venue does not list it."""

    @abstractmethod
    async def place(self, child: ChildOrder, now_ns: int) -> PlaceResult:
        """Send `child`; return the venue's id, any immediate fills and the open remainder."""

    @abstractmethod
    async def cancel(self, client_order_id: str, now_ns: int, symbol: str | None = None) -> Decimal:
        """Cancel what is left of a child; return the cancelled quantity (0 if none).

        `symbol` lets an adapter cancel a child it did not place in this process (after a
        restart)."""

    def track_unknown(self, child: ChildOrder, now_ns: int) -> None:  # noqa: B027
        """Follow `child`, whose placement went unanswered (`PlacementUnknownError`), as if
        placed: its fills are reported by `poll_fills`, and `poll_closed` reports it closed
        if the venue turns out to have no such order. A simulator always answers."""

    async def on_market_data(
        self, symbol: str, price: Decimal, volume: Decimal, now_ns: int
    ) -> list[ExchangeFill]:
        """Market data seen by us; a simulator fills resting orders here. Live venues: []."""
        return []

    async def poll_fills(self, now_ns: int) -> list[ExchangeFill]:
        """Fills of resting orders reported by the venue since the last poll."""
        return []

    async def poll_closed(self, now_ns: int) -> list[ClosedChild]:
        """Children the venue closed by itself since the last poll, after `poll_fills`
        reported their fills. A simulator closes nothing by itself: []."""
        return []

    async def fills_since(
        self, symbol: str, since_ns: int, order_ids: Collection[str], now_ns: int
    ) -> list[ExchangeFill]:
        """The venue's fills on `symbol` from `since_ns` on of the children of `order_ids`
        (client ids `<order_id>-<n>`), oldest first: what a previous run's orders filled
        that it may not have reported (reconciliation). A simulator keeps nothing across a
        restart: []."""
        return []

    async def open_client_order_ids(self, symbols: Collection[str] = ()) -> list[str]:
        """Client ids of our orders still open on the venue (for reconciliation), looking at
        `symbols` as well as the symbols this process traded."""
        return []
