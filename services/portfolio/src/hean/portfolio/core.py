"""The portfolio's pure core: positions, P&L, equity and trade statistics from fills.

No I/O and no clock: every input (a fill, a mark price) carries its own time. All money is
`Decimal`. A position keeps its *cost basis* (sum of entry qty x price of what is still open)
rather than a rounded average price, so realized + unrealized P&L always equals the cash
flow of the fills plus the marked value of what is held (checked by a hypothesis test).

Conventions:
- `qty` is signed: > 0 long, < 0 short.
- `realized_pnl` and `unrealized_pnl` are gross of fees; `fees` are tracked separately and
  `total_pnl = realized + unrealized - fees`; `equity = starting_equity + total_pnl`.
- A *closed trade* is every fill (or part of a fill) that reduces a position: its P&L is
  `closed_qty x (exit - average entry) x direction` and its return is that P&L over the cost
  basis it closed. Win rate, payoff ratio and Sharpe are computed over those returns.
"""

from __future__ import annotations

import decimal
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from hean.core.types import Side

ZERO = Decimal(0)
_CONTEXT = decimal.Context(prec=50, rounding=decimal.ROUND_HALF_EVEN)


@dataclass(frozen=True, slots=True)
class Fill:
    """One execution: `qty` > 0 of `symbol` bought or sold at `price`, paying `fee`."""

    order_id: str
    symbol: str
    side: Side
    qty: Decimal
    price: Decimal
    fee: Decimal = ZERO
    fill_id: str | None = None
    timestamp_ns: int = 0

    def __post_init__(self) -> None:
        if not self.qty.is_finite() or self.qty <= 0:
            raise ValueError(f"fill qty must be > 0, got {self.qty}")
        if not self.price.is_finite() or self.price <= 0:
            raise ValueError(f"fill price must be > 0, got {self.price}")
        if not self.fee.is_finite():  # negative: a maker rebate
            raise ValueError(f"fill fee must be finite, got {self.fee}")

    @property
    def dedupe_key(self) -> str:
        """The fill id, or order id + qty + price when the venue gave no fill id."""
        if self.fill_id:
            return f"id:{self.fill_id}"
        return f"op:{self.order_id}:{self.qty.normalize()}:{self.price.normalize()}"

    @property
    def signed_qty(self) -> Decimal:
        return self.qty if self.side is Side.BUY else -self.qty


@dataclass(frozen=True, slots=True)
class ClosedTrade:
    symbol: str
    qty: Decimal
    entry_price: Decimal
    exit_price: Decimal
    pnl: Decimal
    return_ratio: Decimal
    timestamp_ns: int


@dataclass(slots=True)
class Position:
    symbol: str
    qty: Decimal = ZERO
    cost_basis: Decimal = ZERO  # sum of |qty| x entry price of the open quantity
    realized_pnl: Decimal = ZERO
    fees: Decimal = ZERO
    mark_price: Decimal | None = None

    @property
    def average_entry_price(self) -> Decimal:
        if self.qty == 0:
            return ZERO
        return _CONTEXT.divide(self.cost_basis, abs(self.qty))

    @property
    def direction(self) -> int:
        return (self.qty > 0) - (self.qty < 0)

    @property
    def unrealized_pnl(self) -> Decimal:
        if self.qty == 0 or self.mark_price is None:
            return ZERO
        value = _CONTEXT.multiply(abs(self.qty), self.mark_price)
        return _CONTEXT.multiply(Decimal(self.direction), _CONTEXT.subtract(value, self.cost_basis))

    @property
    def notional(self) -> Decimal:
        if self.mark_price is None:
            return self.cost_basis
        return _CONTEXT.multiply(abs(self.qty), self.mark_price)


@dataclass(frozen=True, slots=True)
class TradeStats:
    closed_trades: int
    wins: int
    losses: int
    win_rate: Decimal
    avg_win: Decimal
    avg_loss: Decimal  # as a positive number
    payoff_ratio: Decimal | None  # avg win / avg loss; None until both exist
    sharpe_ratio: Decimal | None  # mean / sample stdev of trade returns (not annualised)

    def to_dict(self) -> dict[str, Any]:
        return {
            "closed_trades": self.closed_trades,
            "wins": self.wins,
            "losses": self.losses,
            "win_rate": self.win_rate,
            "avg_win": self.avg_win,
            "avg_loss": self.avg_loss,
            "payoff_ratio": self.payoff_ratio,
            "sharpe_ratio": self.sharpe_ratio,
        }


@dataclass(slots=True)
class TradeTally:
    """Running statistics of closed trades, constant work and memory per trade: a
    PNL_UPDATE goes out on every mark, and recomputing over every trade ever closed would
    make a long-running portfolio slower with each trade. Returns use Welford's update (no
    cancellation in the variance)."""

    count: int = 0
    wins: int = 0
    losses: int = 0
    sum_wins: Decimal = ZERO
    sum_losses: Decimal = ZERO  # as a positive number
    mean_return: Decimal = ZERO
    m2_return: Decimal = ZERO  # sum of squared deviations from the mean

    def add(self, trade: ClosedTrade) -> None:
        self.count += 1
        if trade.pnl > 0:
            self.wins += 1
            self.sum_wins = _CONTEXT.add(self.sum_wins, trade.pnl)
        elif trade.pnl < 0:
            self.losses += 1
            self.sum_losses = _CONTEXT.subtract(self.sum_losses, trade.pnl)
        delta = _CONTEXT.subtract(trade.return_ratio, self.mean_return)
        self.mean_return = _CONTEXT.add(self.mean_return, _CONTEXT.divide(delta, self.count))
        after = _CONTEXT.subtract(trade.return_ratio, self.mean_return)
        self.m2_return = _CONTEXT.add(self.m2_return, _CONTEXT.multiply(delta, after))

    def stats(self) -> TradeStats:
        """Win rate, payoff ratio and Sharpe (break-even counts as neither win nor loss)."""
        n = self.count
        avg_win = _CONTEXT.divide(self.sum_wins, self.wins) if self.wins else ZERO
        avg_loss = _CONTEXT.divide(self.sum_losses, self.losses) if self.losses else ZERO
        payoff = _CONTEXT.divide(avg_win, avg_loss) if self.wins and self.losses else None
        sharpe: Decimal | None = None
        if n >= 2:
            var = _CONTEXT.divide(self.m2_return, n - 1)
            if var > 0:
                sharpe = _CONTEXT.divide(self.mean_return, var.sqrt(_CONTEXT))
        return TradeStats(
            closed_trades=n,
            wins=self.wins,
            losses=self.losses,
            win_rate=_CONTEXT.divide(self.wins, n) if n else ZERO,
            avg_win=avg_win,
            avg_loss=avg_loss,
            payoff_ratio=payoff,
            sharpe_ratio=sharpe,
        )


def trade_stats(trades: Iterable[ClosedTrade]) -> TradeStats:
    """`TradeStats` of `trades` (see `TradeTally`)."""
    tally = TradeTally()
    for trade in trades:
        tally.add(trade)
    return tally.stats()


@dataclass(slots=True)
class Portfolio:
    """Positions and P&L of one account, in the quote currency (USDT)."""

    starting_equity: Decimal
    positions: dict[str, Position] = field(default_factory=dict)
    #: the most recent closed trades (for inspection); statistics cover all of them
    recent_trades: deque[ClosedTrade] = field(default_factory=lambda: deque(maxlen=1000))
    tally: TradeTally = field(default_factory=TradeTally)
    fees: Decimal = ZERO
    realized_pnl: Decimal = ZERO
    peak_equity: Decimal = ZERO
    max_drawdown: Decimal = ZERO
    fills_applied: int = 0
    last_update_ns: int = 0
    _seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.starting_equity.is_finite() or self.starting_equity <= 0:
            raise ValueError(f"starting equity must be > 0, got {self.starting_equity}")
        self.peak_equity = max(self.peak_equity, self.starting_equity)

    # --- inputs ------------------------------------------------------------------------------

    def has_seen(self, fill: Fill) -> bool:
        return fill.dedupe_key in self._seen

    def apply_fill(self, fill: Fill) -> bool:
        """Apply `fill`; False (and no change) if this fill was applied before."""
        key = fill.dedupe_key
        if key in self._seen:
            return False
        self._seen.add(key)
        pos = self.positions.setdefault(fill.symbol, Position(fill.symbol))
        delta = fill.signed_qty
        if pos.qty == 0 or (pos.qty > 0) == (delta > 0):
            pos.cost_basis = _CONTEXT.add(pos.cost_basis, _CONTEXT.multiply(fill.qty, fill.price))
            pos.qty = _CONTEXT.add(pos.qty, delta)
        else:
            self._reduce(pos, fill)
        pos.fees = _CONTEXT.add(pos.fees, fill.fee)
        self.fees = _CONTEXT.add(self.fees, fill.fee)
        if pos.mark_price is None:
            pos.mark_price = fill.price
        self.fills_applied += 1
        self.last_update_ns = max(self.last_update_ns, fill.timestamp_ns)
        self._track_equity()
        return True

    def _reduce(self, pos: Position, fill: Fill) -> None:
        open_qty = abs(pos.qty)
        closed = min(open_qty, fill.qty)
        direction = Decimal(pos.direction)
        if closed == open_qty:
            cost_closed = pos.cost_basis
        else:
            cost_closed = _CONTEXT.divide(_CONTEXT.multiply(pos.cost_basis, closed), open_qty)
        entry = _CONTEXT.divide(cost_closed, closed)
        exit_value = _CONTEXT.multiply(closed, fill.price)
        pnl = _CONTEXT.multiply(direction, _CONTEXT.subtract(exit_value, cost_closed))
        trade = ClosedTrade(
            symbol=pos.symbol,
            qty=closed,
            entry_price=entry,
            exit_price=fill.price,
            pnl=pnl,
            return_ratio=_CONTEXT.divide(pnl, cost_closed),
            timestamp_ns=fill.timestamp_ns,
        )
        self.recent_trades.append(trade)
        self.tally.add(trade)
        pos.realized_pnl = _CONTEXT.add(pos.realized_pnl, pnl)
        self.realized_pnl = _CONTEXT.add(self.realized_pnl, pnl)
        pos.cost_basis = _CONTEXT.subtract(pos.cost_basis, cost_closed)
        pos.qty = _CONTEXT.add(pos.qty, fill.signed_qty)
        if pos.qty == 0:
            pos.cost_basis = ZERO
        elif (pos.qty > 0) != (direction > 0):
            # Flipped: what is left of the fill opens the new position at the fill price.
            pos.cost_basis = _CONTEXT.multiply(abs(pos.qty), fill.price)

    def mark(self, symbol: str, price: Decimal, timestamp_ns: int = 0) -> bool:
        """Mark `symbol` at `price`. True if an open position's value changed."""
        if not price.is_finite() or price <= 0:
            raise ValueError(f"mark price must be > 0, got {price}")
        pos = self.positions.get(symbol)
        if pos is None:
            return False
        changed = pos.mark_price != price and pos.qty != 0
        pos.mark_price = price
        self.last_update_ns = max(self.last_update_ns, timestamp_ns)
        if changed:
            self._track_equity()
        return changed

    # --- outputs -----------------------------------------------------------------------------

    @property
    def unrealized_pnl(self) -> Decimal:
        return sum((p.unrealized_pnl for p in self.positions.values()), ZERO)

    @property
    def total_pnl(self) -> Decimal:
        return _CONTEXT.subtract(_CONTEXT.add(self.realized_pnl, self.unrealized_pnl), self.fees)

    @property
    def equity(self) -> Decimal:
        return _CONTEXT.add(self.starting_equity, self.total_pnl)

    @property
    def exposure(self) -> Decimal:
        """Gross notional of open positions at their marks."""
        return sum((p.notional for p in self.positions.values() if p.qty != 0), ZERO)

    @property
    def drawdown(self) -> Decimal:
        """Current drawdown from the equity peak (0.05 = 5%)."""
        if self.peak_equity <= 0:
            return ZERO
        return max(ZERO, _CONTEXT.divide(self.peak_equity - self.equity, self.peak_equity))

    def stats(self) -> TradeStats:
        return self.tally.stats()

    def _track_equity(self) -> None:
        equity = self.equity
        if equity > self.peak_equity:
            self.peak_equity = equity
        self.max_drawdown = max(self.max_drawdown, self.drawdown)

    def snapshot(self) -> dict[str, Any]:
        """The PNL_UPDATE payload: totals, equity, fees, positions and trade statistics."""
        positions: dict[str, Any] = {}
        for symbol, pos in sorted(self.positions.items()):
            positions[symbol] = {
                "qty": pos.qty,
                "avg_entry_price": _q(pos.average_entry_price),
                "mark_price": pos.mark_price,
                "notional": _q(pos.notional if pos.qty != 0 else ZERO),
                "unrealized_pnl": _q(pos.unrealized_pnl),
                "realized_pnl": _q(pos.realized_pnl),
                "fees": pos.fees,
            }
        return {
            "total_pnl": _q(self.total_pnl),
            "realized_pnl": _q(self.realized_pnl),
            "unrealized_pnl": _q(self.unrealized_pnl),
            "equity": _q(self.equity),
            "starting_equity": self.starting_equity,
            "fees": self.fees,
            "exposure": _q(self.exposure),
            "peak_equity": _q(self.peak_equity),
            "drawdown": _q(self.drawdown),
            "max_drawdown": _q(self.max_drawdown),
            "positions": positions,
            "trade_stats": {k: _q(v) for k, v in self.stats().to_dict().items()},
            "fills_applied": self.fills_applied,
            "as_of": self.last_update_ns,
        }


_DISPLAY = Decimal("1e-12")


def _q(value: Any) -> Any:
    """Round a derived figure for the wire (12 decimals); inputs are passed through as is."""
    if isinstance(value, Decimal):
        return plain(value.quantize(_DISPLAY, context=_CONTEXT))
    return value


def plain(value: Decimal) -> Decimal:
    """`value` without trailing zeros and never in exponent form (1E+3 becomes 1000)."""
    normal = value.normalize(_CONTEXT)
    exponent = normal.as_tuple().exponent
    return normal.quantize(Decimal(1)) if isinstance(exponent, int) and exponent > 0 else normal


def fill_from_event_data(data: Mapping[str, Any], timestamp_ns: int) -> Fill:
    """Build a `Fill` from validated ORDER_FILLED data; ValueError if symbol or side is missing."""
    symbol = data.get("symbol")
    side = data.get("side")
    if not symbol or side is None:
        raise ValueError(f"fill of order {data.get('order_id')} has no symbol or side")
    return Fill(
        order_id=str(data["order_id"]),
        symbol=str(symbol),
        side=Side(side),
        qty=Decimal(data["filled_qty"]),
        price=Decimal(data["fill_price"]),
        fee=Decimal(data.get("fee") or 0),
        fill_id=str(data["fill_id"]) if data.get("fill_id") else None,
        timestamp_ns=timestamp_ns,
    )
