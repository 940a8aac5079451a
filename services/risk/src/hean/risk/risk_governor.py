"""`RiskGovernor`: the risk service's core. Sizing, pre-trade checks and the kill switch.

No I/O and no clock: time comes with each event (`timestamp_ns`). The wiring module
(`hean.risk.service`) feeds it events, persists the kill switch and publishes its outputs.

Checks, in order, on every ORDER_REQUEST (an order is approved only if all pass):

1. kill switch active -> only orders that reduce a position pass;
2. `reduce_only` orders must really reduce (never increase or flip);
3. daily drawdown from the UTC day's starting equity below `daily_drawdown_limit`;
4. a price is known (the order's limit price, else the last mark);
5. notional >= `min_order_notional`;
6. worst-case post-trade notional of the symbol <= `max_position_size`;
7. worst-case post-trade gross exposure <= `max_total_exposure`;
8. that exposure / equity <= `max_leverage`;
9. every check registered with `register_check` (sync) or `check_bus` (the guide's
   subscriber style) approves.

Orders that reduce a position skip 3 and 5-8 (reducing never breaks a limit further). An
order is reducing only if it still is once every pending order on its side has filled.
"Worst case" counts approved orders that are not filled yet: the symbol's exposure is the
larger of |position + all pending buys| and |position + all pending sells|, so no subset
of pending orders filling can take a position past a limit.
"""

from __future__ import annotations

import contextvars
import decimal
import inspect
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_DOWN, Decimal
from typing import Any

from hean.core.types import Event, EventType, OrderRequestData, OrderType, Side
from hean.risk.kelly import KellyParams, bet_fraction, shrunk_payoff_ratio

ZERO = Decimal(0)
ONE = Decimal(1)
NS_PER_DAY = 86_400 * 1_000_000_000
_CTX = decimal.Context(prec=40)


@dataclass(frozen=True, slots=True)
class RiskLimits:
    max_position_size: Decimal  # USDT notional per symbol
    max_leverage: Decimal
    daily_drawdown_limit: Decimal  # 0.05 = 5% of the day's starting equity
    max_total_exposure: Decimal | None = None  # USDT gross; None: only leverage binds
    min_order_notional: Decimal = Decimal(5)
    size_step: Decimal = Decimal("0.000001")
    #: 0.2 = 20% below the highest equity the account has had, across days; None: off.
    max_drawdown_limit: Decimal | None = None

    def __post_init__(self) -> None:
        if self.max_position_size <= 0 or self.max_leverage <= 0:
            raise ValueError("max position size and max leverage must be > 0")
        if not ZERO < self.daily_drawdown_limit < ONE:
            raise ValueError("daily drawdown limit must be in (0, 1)")
        if self.max_total_exposure is not None and self.max_total_exposure <= 0:
            raise ValueError("max total exposure must be > 0")
        if self.min_order_notional < 0 or self.size_step <= 0:
            raise ValueError("min order notional must be >= 0 and size step > 0")
        if self.max_drawdown_limit is not None and not ZERO < self.max_drawdown_limit < ONE:
            raise ValueError("max drawdown limit must be in (0, 1)")


@dataclass(frozen=True, slots=True)
class KillSwitchState:
    active: bool = False
    reason: str = ""
    timestamp_ns: int = 0

    def to_mapping(self) -> dict[str, str]:
        return {
            "active": "1" if self.active else "0",
            "reason": self.reason,
            "timestamp": str(self.timestamp_ns),
        }

    @classmethod
    def from_mapping(cls, raw: Mapping[str, str]) -> KillSwitchState:
        return cls(
            active=raw.get("active") == "1",
            reason=raw.get("reason", ""),
            timestamp_ns=int(raw.get("timestamp") or 0),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    order_id: str
    approved: bool
    reasons: tuple[str, ...] = ()
    order: Mapping[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "approved"


@dataclass(frozen=True, slots=True)
class SizedOrder:
    """An ORDER_REQUEST built from a SIGNAL."""

    order_id: str
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class NoOrder:
    """A SIGNAL that yields no order, and why."""

    signal_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RiskView:
    """What a custom check sees: a read-only summary of the governor's state."""

    equity: Decimal
    day_start_equity: Decimal
    positions: Mapping[str, Decimal]
    marks: Mapping[str, Decimal]
    kill_switch: KillSwitchState


RiskCheckFn = Callable[[OrderRequestData, RiskView], str | None]


@dataclass(slots=True)
class _Reservation:
    symbol: str
    signed_qty: Decimal  # what is still unfilled, signed
    price: Decimal | None = None  # what it was checked at (the symbol may have no mark yet)


_ballot: contextvars.ContextVar[list[tuple[bool, str]] | None] = contextvars.ContextVar(
    "hean_risk_ballot", default=None
)

EventHandler = Callable[[Event], Awaitable[None] | None]


class CheckBus:
    """The bus a guide-style custom check gets: its ORDER_APPROVED / ORDER_REJECTED are votes.

    ```python
    check = CustomRiskCheck(governor.check_bus("custom"))
    await check.start()   # subscribes to ORDER_REQUEST on this CheckBus
    ```
    The governor calls the check for each ORDER_REQUEST that passed the built-in checks;
    publishing ORDER_APPROVED is a yes, ORDER_REJECTED a no (with its reason), nothing a no.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.handlers: list[EventHandler] = []

    def subscribe(self, event_type: EventType, handler: EventHandler, **_: Any) -> None:
        if EventType(event_type) is not EventType.ORDER_REQUEST:
            raise ValueError(f"risk check {self.name!r} can only subscribe to ORDER_REQUEST")
        self.handlers.append(handler)

    async def publish(self, event: Event) -> Event:
        ballot = _ballot.get()
        if ballot is None:
            raise RuntimeError(f"risk check {self.name!r} published outside an order check")
        if event.event_type is EventType.ORDER_APPROVED:
            ballot.append((True, ""))
        elif event.event_type is EventType.ORDER_REJECTED:
            ballot.append((False, str(event.data.get("reason") or "rejected")))
        else:
            raise ValueError(f"risk check {self.name!r} may only approve or reject orders")
        return event


class RiskGovernor:
    """Sizing (SIGNAL -> ORDER_REQUEST), checks (ORDER_REQUEST -> Decision), kill switch."""

    def __init__(
        self,
        limits: RiskLimits,
        *,
        starting_equity: Decimal,
        kelly: KellyParams | None = None,
        decision_cache_size: int = 10_000,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if starting_equity <= 0:
            raise ValueError("starting equity must be > 0")
        self.limits = limits
        self.kelly = kelly or KellyParams()
        #: Equity of the last PNL_UPDATE (or STARTING_EQUITY) and the marks it was valued
        #: at. Between two updates risk values its own positions at its own marks from there
        #: (`equity`), so the daily drawdown keeps moving with the market when portfolio is
        #: slow, stalled or down.
        self._base_equity = starting_equity
        self._base_marks: dict[str, Decimal] = {}
        self._equity = starting_equity
        #: When (risk's clock) the last PNL_UPDATE came, and when a held position's mark
        #: last moved: the market moving long after the last update means portfolio is not
        #: reporting (`unreported_s`).
        self._pnl_seen_ns: int | None = None
        self._moved_ns: int | None = None
        self.day: int | None = None
        self.day_start_equity = starting_equity
        #: The highest equity seen (the high-water mark of `max_drawdown_limit`), across
        #: days; it starts at STARTING_EQUITY and is persisted by the service.
        self.peak_equity = starting_equity
        self.positions: dict[str, Decimal] = {}
        self.marks: dict[str, Decimal] = {}
        self.kill_switch = KillSwitchState()
        self.observed_payoff: Decimal | None = None
        self.closed_trades = 0
        self._reserved: dict[str, _Reservation] = {}
        self._seen_fills: set[str] = set()
        self._decisions: OrderedDict[str, Decision] = OrderedDict()
        self._cache_size = decision_cache_size
        self._checks: list[tuple[str, RiskCheckFn]] = []
        self._check_buses: list[CheckBus] = []
        self._clock = clock

    # --- plug-ins ----------------------------------------------------------------------------

    def register_check(self, name: str, check: RiskCheckFn) -> None:
        """Add a sync check: `check(order, view)` returns a rejection reason or None."""
        self._checks.append((name, check))

    def check_bus(self, name: str) -> CheckBus:
        """A `CheckBus` for a guide-style check class; its votes join every decision."""
        bus = CheckBus(name)
        self._check_buses.append(bus)
        return bus

    @property
    def check_names(self) -> list[str]:
        return [n for n, _ in self._checks] + [b.name for b in self._check_buses]

    # --- state from events --------------------------------------------------------------------

    @property
    def equity(self) -> Decimal:
        """The account's equity now: the last PNL_UPDATE's, moved by risk's positions at
        risk's marks since then."""
        return self._equity

    @equity.setter
    def equity(self, value: Decimal) -> None:
        """The account's equity at the current marks (a PNL_UPDATE, a restore)."""
        self._base_equity = self._equity = value
        self._base_marks = dict(self.marks)
        self.peak_equity = max(self.peak_equity, value)

    def on_mark(self, symbol: str, price: Decimal) -> KillSwitchState | None:
        """A new market price. Returns the new kill-switch state if the equity it gives
        breached the daily drawdown limit."""
        if price <= 0:
            return None
        self.marks[symbol] = price
        self._base_marks.setdefault(symbol, price)
        if not self.positions.get(symbol):
            return None
        self._revalue()
        self._moved_ns = self._clock()
        return self._check_drawdown(self._moved_ns)

    def unreported_s(self) -> float:
        """Seconds the market moved a held position since the last PNL_UPDATE (0 if it
        has not)."""
        if self._moved_ns is None:
            return 0.0
        since = self._pnl_seen_ns if self._pnl_seen_ns is not None else self._moved_ns
        return max(0.0, (self._moved_ns - since) / 1e9)

    def _revalue(self) -> None:
        moved = sum(
            (
                qty * (self.marks[s] - self._base_marks[s])
                for s, qty in self.positions.items()
                if qty and s in self.marks and s in self._base_marks
            ),
            ZERO,
        )
        self._equity = self._base_equity + moved
        self.peak_equity = max(self.peak_equity, self._equity)

    def _check_drawdown(self, timestamp_ns: int) -> KillSwitchState | None:
        breach = self.drawdown_breach()
        return self.trigger_kill_switch(breach, timestamp_ns) if breach else None

    def drawdown_breach(self) -> str | None:
        """Why the equity is past a drawdown limit (daily, or from the peak), else None."""
        if self.drawdown >= self.limits.daily_drawdown_limit:
            return (
                f"daily drawdown {self.drawdown:.4%} reached the limit "
                f"{self.limits.daily_drawdown_limit:.2%}"
            )
        peak_limit = self.limits.max_drawdown_limit
        if peak_limit is not None and self.peak_drawdown >= peak_limit:
            return (
                f"drawdown from the peak equity {self.peak_equity:.2f}: "
                f"{self.peak_drawdown:.4%} reached MAX_DRAWDOWN_LIMIT {peak_limit:.2%}"
            )
        return None

    def on_fill(
        self,
        order_id: str,
        symbol: str,
        side: Side,
        qty: Decimal,
        price: Decimal,
        key: str,
        *,
        finished: bool = False,
    ) -> bool:
        """Apply a fill (deduplicated by `key`); False if seen before. `finished`: the
        order has nothing left to fill (execution may work less than was approved: its
        size rounded down to the venue's step), so it reserves nothing any more."""
        if key in self._seen_fills:
            return False
        self._seen_fills.add(key)
        signed = qty if side is Side.BUY else -qty
        self.positions[symbol] = self.positions.get(symbol, ZERO) + signed
        self.marks.setdefault(symbol, price)
        # Bought at `price`, valued from the base mark on: the difference is the fill's.
        base = self._base_marks.setdefault(symbol, price)
        self._base_equity += signed * (base - price)
        self._revalue()
        self._release(order_id, signed, finished=finished)
        return True

    def _release(self, order_id: str, filled: Decimal, *, finished: bool = False) -> bool:
        """Take `filled` (signed) off `order_id`'s reservation, dropping it when nothing is
        left to fill (or it crossed zero, or the order is `finished`). True if some of it
        is still reserved."""
        res = self._reserved.get(order_id)
        if res is None:
            return False
        left = res.signed_qty - filled
        if finished or left == 0 or (left > 0) != (res.signed_qty > 0):
            del self._reserved[order_id]
            return False
        res.signed_qty = left
        return True

    def restore_reservation(self, order: OrderRequestData, filled: Decimal = ZERO) -> bool:
        """Reserve again an order approved before a restart that is still working, less
        `filled` (signed: what its fills so far bought, negative for sold). False if
        nothing of it is left to fill."""
        self._reserve(order)
        return self._release(order.order_id, filled)

    @property
    def reserved_orders(self) -> int:
        """How many approved orders are still reserved (not filled, cancelled or rejected)."""
        return len(self._reserved)

    def on_order_closed(self, order_id: str) -> None:
        """An order was cancelled or rejected downstream: release what it reserved."""
        self._reserved.pop(order_id, None)

    def on_pnl(self, data: Mapping[str, Any], timestamp_ns: int) -> KillSwitchState | None:
        """Take equity, marks and trade statistics from a PNL_UPDATE.

        Returns the new kill-switch state if this update breached the daily drawdown limit.
        """
        positions = data.get("positions")
        if isinstance(positions, Mapping):
            for symbol, pos in positions.items():
                if isinstance(pos, Mapping):
                    mark = _decimal(pos.get("mark_price"))
                    if mark is not None and mark > 0:
                        self.marks[str(symbol)] = mark
        equity = _decimal(data.get("equity"))
        if equity is not None:
            self.roll_day(timestamp_ns)
            self.equity = equity  # valued at the marks just taken from it
            self._pnl_seen_ns = self._clock()
        stats = data.get("trade_stats")
        if isinstance(stats, Mapping):
            self.observed_payoff = _decimal(stats.get("payoff_ratio"))
            self.closed_trades = int(stats.get("closed_trades") or 0)
        return self._check_drawdown(timestamp_ns)

    def roll_day(self, timestamp_ns: int) -> bool:
        """Start a new UTC day at the current equity if `timestamp_ns` is in a later day."""
        day = timestamp_ns // NS_PER_DAY
        if self.day is None or day > self.day:
            self.day = day
            self.day_start_equity = self.equity
            return True
        return False

    @property
    def drawdown(self) -> Decimal:
        if self.day_start_equity <= 0:
            return ONE
        return max(ZERO, _CTX.divide(self.day_start_equity - self.equity, self.day_start_equity))

    @property
    def peak_drawdown(self) -> Decimal:
        """How far the equity is below its peak (0.2 = 20%)."""
        if self.peak_equity <= 0:
            return ONE
        return max(ZERO, _CTX.divide(self.peak_equity - self.equity, self.peak_equity))

    # --- kill switch -------------------------------------------------------------------------

    def trigger_kill_switch(self, reason: str, timestamp_ns: int) -> KillSwitchState | None:
        """Activate the kill switch; returns the new state, or None if it was already on."""
        if self.kill_switch.active:
            return None
        self.kill_switch = KillSwitchState(True, reason, timestamp_ns)
        return self.kill_switch

    def reset_kill_switch(self, timestamp_ns: int) -> bool:
        """Clear the kill switch (explicit command only). The day and the peak restart at
        the current equity so the same drawdown does not trip it again at once."""
        if not self.kill_switch.active:
            return False
        self.kill_switch = KillSwitchState(False, "", timestamp_ns)
        self.day = timestamp_ns // NS_PER_DAY
        self.day_start_equity = self.equity
        self.peak_equity = self.equity
        return True

    # --- sizing ------------------------------------------------------------------------------

    def size_signal(self, signal: Event) -> SizedOrder | NoOrder:
        """SIGNAL -> ORDER_REQUEST data sized by fractional Kelly, or why there is none.

        The order id is derived from the signal's event id, so a redelivered signal sizes to
        the same order id (and execution places it at most once).
        """
        data = signal.data
        symbol = str(data["symbol"])
        side = Side(data["side"])
        order_id = order_id_for_signal(signal.event_id)
        p = _win_probability(data, self.kelly.default_win_probability)
        b = shrunk_payoff_ratio(
            self.observed_payoff,
            self.closed_trades,
            self.kelly.prior_payoff,
            self.kelly.prior_trades,
        )
        share = bet_fraction(p, b, self.kelly)
        if share <= 0:
            return NoOrder(signal.event_id, f"Kelly fraction <= 0 (p={p}, b={b:.4f})")
        order_type = _order_type(data.get("type"))
        price = valuation_price(
            order_type, side, _decimal(data.get("price")), self.marks.get(symbol)
        )
        if price is None or price <= 0:
            return NoOrder(signal.event_id, f"no market price for {symbol}")
        notional = min(_CTX.multiply(self.equity, share), self.limits.max_position_size)
        size = _CTX.divide(notional, price).quantize(self.limits.size_step, rounding=ROUND_DOWN)
        requested = _decimal(data.get("size"))
        if requested is not None and requested > 0:
            size = min(size, requested)
        if size <= 0:
            return NoOrder(signal.event_id, f"size rounds to 0 at price {price}")
        order: dict[str, Any] = {
            key: data[key]
            for key in ("type", "price", "duration_s", "slices", "display_size", "reduce_only")
            if data.get(key) is not None
        }
        order.update(
            {
                "order_id": order_id,
                "symbol": symbol,
                "side": side.value,
                "size": size,
                "signal_id": signal.event_id,
                "reference_price": price,
                "win_probability": p,
                "payoff_ratio": _round(b),
                "kelly_share": _round(share),
            }
        )
        return SizedOrder(order_id, order)

    # --- checks ------------------------------------------------------------------------------

    def view(self) -> RiskView:
        return RiskView(
            equity=self.equity,
            day_start_equity=self.day_start_equity,
            positions=dict(self.positions),
            marks=dict(self.marks),
            kill_switch=self.kill_switch,
        )

    def is_reducing(self, symbol: str, side: Side, size: Decimal) -> bool:
        """True if the order only reduces the position, even once every approved order on
        the same side that has not filled yet has: two sells of a whole long position are
        not both reducing (the second would open a short)."""
        position = self.positions.get(symbol, ZERO)
        buys, sells = self._pending(symbol)
        left = position + sells if side is Side.SELL else -(position + buys)
        return size > 0 and size <= left

    def evaluate(self, order: OrderRequestData, timestamp_ns: int) -> Decision:
        """Run the built-in and registered sync checks. Changes no state except rolling
        the UTC day forward when the order's time is in a new day."""
        reasons: list[str] = []
        symbol, side, size = order.symbol, order.side, order.size
        reducing = self.is_reducing(symbol, side, size)
        if self.kill_switch.active and not reducing:
            reasons.append(f"kill switch active: {self.kill_switch.reason}")
        if order.reduce_only and not reducing:
            reasons.append("reduce-only order would increase or flip the position")
        price = self._order_price(order)
        if not reducing:
            self.roll_day(timestamp_ns)
            breach = self.drawdown_breach()
            if breach:
                reasons.append(breach)
            if price is None:
                reasons.append(f"no market price for {symbol}")
            else:
                reasons.extend(self._limit_reasons(symbol, side, size, price))
        if not reasons:
            view = self.view()
            for name, check in self._checks:
                verdict = check(order, view)
                if verdict:
                    reasons.append(f"{name}: {verdict}")
        return Decision(order.order_id, not reasons, tuple(reasons), _order_dict(order))

    def _limit_reasons(self, symbol: str, side: Side, size: Decimal, price: Decimal) -> list[str]:
        reasons: list[str] = []
        lim = self.limits
        notional = size * price
        if notional < lim.min_order_notional:
            reasons.append(f"order notional {notional:.2f} below minimum {lim.min_order_notional}")
        signed = size if side is Side.BUY else -size
        symbol_after = self.worst_case_notional(symbol, price, extra=signed)
        if symbol_after > lim.max_position_size:
            reasons.append(
                f"position {symbol} would reach {symbol_after:.2f} USDT > MAX_POSITION_SIZE "
                f"{lim.max_position_size}"
            )
        others = sum(
            (
                self.worst_case_notional(s, self._price_of(s))
                for s in self._symbols()
                if s != symbol
            ),
            ZERO,
        )
        exposure = others + symbol_after
        if lim.max_total_exposure is not None and exposure > lim.max_total_exposure:
            reasons.append(
                f"total exposure would reach {exposure:.2f} USDT > {lim.max_total_exposure}"
            )
        if self.equity <= 0:
            reasons.append(f"equity {self.equity} is not positive")
        elif _CTX.divide(exposure, self.equity) > lim.max_leverage:
            reasons.append(
                f"leverage would reach {_CTX.divide(exposure, self.equity):.2f}x > "
                f"MAX_LEVERAGE {lim.max_leverage}"
            )
        return reasons

    def _order_price(self, order: OrderRequestData) -> Decimal | None:
        return valuation_price(order.type, order.side, order.price, self.marks.get(order.symbol))

    def _price_of(self, symbol: str) -> Decimal:
        """The mark of `symbol`, else the highest price its pending orders were checked at
        (a limit order placed before the symbol's first tick): never 0 for an exposure."""
        mark = self.marks.get(symbol)
        if mark is not None:
            return mark
        prices = [r.price for r in self._reserved.values() if r.symbol == symbol and r.price]
        return max(prices, default=ZERO)

    def _reserve(self, order: OrderRequestData) -> None:
        signed = order.size if order.side is Side.BUY else -order.size
        self._reserved[order.order_id] = _Reservation(
            order.symbol, signed, self._order_price(order)
        )

    def _symbols(self) -> set[str]:
        return set(self.positions) | {r.symbol for r in self._reserved.values()}

    def worst_case_notional(self, symbol: str, price: Decimal, extra: Decimal = ZERO) -> Decimal:
        """Largest |position| if any subset of pending orders (plus `extra`) fills, x price."""
        position = self.positions.get(symbol, ZERO)
        buys, sells = self._pending(symbol)
        high = position + buys + max(extra, ZERO)
        low = position + sells + min(extra, ZERO)
        return max(abs(high), abs(low)) * price

    def _pending(self, symbol: str) -> tuple[Decimal, Decimal]:
        """What approved, unfilled orders of `symbol` would add if they all filled: the
        buys (>= 0) and the sells (<= 0)."""
        pending = [r.signed_qty for r in self._reserved.values() if r.symbol == symbol]
        return sum((q for q in pending if q > 0), ZERO), sum((q for q in pending if q < 0), ZERO)

    async def decide(self, request: Event) -> Decision:
        """ORDER_REQUEST -> Decision, including the subscriber-style checks' votes.

        The same order id always gets the same decision (a redelivered request is answered
        from a bounded cache and reserves nothing twice).
        """
        order = OrderRequestData.model_validate(dict(request.data))
        cached = self._decisions.get(order.order_id)
        if cached is not None:
            return cached
        # The day rolls on risk's clock: a request stamped in the future by its publisher's
        # clock must not start a new day (and a new drawdown base) early.
        decision = self.evaluate(order, min(request.timestamp, self._clock()))
        if decision.approved and self._check_buses:
            # Reserved before the votes are awaited: an order decided meanwhile (another
            # symbol, on another worker) counts this one in its limits.
            reducing = self.is_reducing(order.symbol, order.side, order.size)
            self._reserve(order)
            reasons = await self._vote(request)
            if self.kill_switch.active and not reducing:  # it tripped during the votes
                reasons.append(f"kill switch active: {self.kill_switch.reason}")
            if reasons:
                self._reserved.pop(order.order_id, None)
                decision = replace(decision, approved=False, reasons=tuple(reasons))
        cached = self._decisions.get(order.order_id)  # a concurrent duplicate finished first
        if cached is not None:
            if not cached.approved:
                self._reserved.pop(order.order_id, None)
            return cached
        self._remember(decision)
        if decision.approved:
            self._reserve(order)
        return decision

    async def _vote(self, request: Event) -> list[str]:
        reasons: list[str] = []
        for bus in self._check_buses:
            for handler in bus.handlers:
                ballot: list[tuple[bool, str]] = []
                token = _ballot.set(ballot)
                try:
                    result = handler(request)
                    if inspect.isawaitable(result):
                        await result
                finally:
                    _ballot.reset(token)
                if not ballot:
                    reasons.append(f"{bus.name}: no verdict")
                elif not all(ok for ok, _ in ballot):
                    reasons.extend(f"{bus.name}: {why}" for ok, why in ballot if not ok)
        return reasons

    def _remember(self, decision: Decision) -> None:
        self._decisions[decision.order_id] = decision
        while len(self._decisions) > self._cache_size:
            self._decisions.popitem(last=False)


def valuation_price(
    order_type: OrderType, side: Side, price: Decimal | None, mark: Decimal | None
) -> Decimal | None:
    """The price an order is sized and checked at: the most it may fill at, never just the
    price it carries. A market order (and any order without a price) fills near the market,
    whatever `price` says. A buy limit fills at its price or lower; a sell limit at its
    price or higher: at the market, when that is above it (a marketable sell)."""
    if order_type is OrderType.MARKET or price is None:
        return mark
    if side is Side.SELL and mark is not None:
        return max(price, mark)
    return price


def _order_type(value: Any) -> OrderType:
    try:
        return OrderType(str(value or "market").lower())
    except ValueError:
        return OrderType.MARKET  # the request it becomes is validated (and refused) later


def order_id_for_signal(signal_event_id: str) -> str:
    """Deterministic order id of the order sized from a signal (<= 36 chars for venues)."""
    return f"o{signal_event_id}"[:36]


def _win_probability(data: Mapping[str, Any], default: Decimal) -> Decimal:
    for key in ("signal_strength", "confidence", "win_probability"):
        value = data.get(key)
        if value is not None:
            p = Decimal(str(value))
            if ZERO <= p <= ONE:
                return p
    return default


def _decimal(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        result = Decimal(str(value))
    except decimal.InvalidOperation:
        return None
    return result if result.is_finite() else None


def _round(value: Decimal) -> Decimal:
    return value.quantize(Decimal("1e-8"))


def _order_dict(order: OrderRequestData) -> dict[str, Any]:
    return order.model_dump(mode="python")
