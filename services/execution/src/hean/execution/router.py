"""`ExecutionRouter`: turns an approved order into a working parent order and its children.

Pure: no I/O, no clock. Time comes in as `now_ns` (the event time of the approval or of the
market data that drives the algorithm).

Algorithms (`type` of the order; parameters from the order, else the router's defaults):

- `market`: one market child now.
- `limit`: one limit child now at `price`.
- `twap`: `slices` children of equal size, one every `duration_s / slices` seconds, the
  first at once. Market children, or limits at `price` if the order has one.
- `vwap`: like TWAP, but each slice's size follows the volume profile of the symbol's last
  `slices` candles (equal sizes if no volume is known).
- `iceberg`: children of `display_size` (default `iceberg_display_ratio x size`), the next
  one only once the previous has filled, so only one is ever visible.

Child sizes are multiples of the venue's qty step (the last child takes the remainder) and
never below its minimum; the number of slices shrinks if the order is too small for them.
Client order ids are `<order_id>-<n>`: derived from our order id, so a venue that enforces
unique client ids refuses a repeat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum
from typing import Any

from hean.core.types import OrderType, Side
from hean.execution.exchange import ZERO, ChildOrder, ChildType, MarketRules, OrderRefusedError

NS_PER_S = 1_000_000_000
#: Children are planned at least this factor above the venue's minimum notional at the
#: order's price, so a slice placed later, after the price fell by up to about 9%, is
#: still taken.
SLICE_NOTIONAL_MARGIN = Decimal("1.1")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    twap_duration_s: float = 60.0
    twap_slices: int = 5
    vwap_duration_s: float = 60.0
    vwap_slices: int = 5
    iceberg_display_ratio: Decimal = Decimal("0.1")

    def __post_init__(self) -> None:
        if self.twap_slices < 1 or self.vwap_slices < 1:
            raise ValueError("TWAP and VWAP need at least one slice")
        if self.twap_duration_s < 0 or self.vwap_duration_s < 0:
            raise ValueError("algorithm durations must be >= 0")
        if not Decimal(0) < self.iceberg_display_ratio <= 1:
            raise ValueError("iceberg display ratio must be in (0, 1]")


class ParentStatus(StrEnum):
    WORKING = "working"
    FILLED = "filled"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class PlannedSlice:
    qty: Decimal
    due_ns: int


@dataclass(slots=True)
class ParentOrder:
    """An approved order being worked: its plan, children and fills."""

    order_id: str
    symbol: str
    side: Side
    size: Decimal
    algorithm: OrderType
    rules: MarketRules
    child_type: ChildType
    limit_price: Decimal | None = None
    reduce_only: bool = False
    plan: list[PlannedSlice] = field(default_factory=list)
    display_qty: Decimal | None = None  # iceberg only
    filled_qty: Decimal = ZERO
    sent_qty: Decimal = ZERO
    next_slice: int = 0
    open_children: dict[str, Decimal] = field(default_factory=dict)
    #: Children of a cancelled order whose cancel the venue did not take (client id -> qty
    #: that may still fill): the order is reported cancelled only once none is left.
    uncancelled: dict[str, Decimal] = field(default_factory=dict)
    children_sent: int = 0
    status: ParentStatus = ParentStatus.WORKING

    @property
    def remaining(self) -> Decimal:
        return self.size - self.filled_qty

    @property
    def done(self) -> bool:
        return self.status is not ParentStatus.WORKING

    @property
    def next_due_ns(self) -> int | None:
        if self.done or self.next_slice >= len(self.plan):
            return None
        return self.plan[self.next_slice].due_ns

    def due_children(self, now_ns: int) -> list[ChildOrder]:
        """Every child due now; each is recorded as sent."""
        children: list[ChildOrder] = []
        while (child := self.next_child(now_ns)) is not None:
            children.append(child)
        return children

    def next_child(self, now_ns: int) -> ChildOrder | None:
        """The next child due at `now_ns` (recorded as sent), or None."""
        if self.done:
            return None
        if self.display_qty is not None:
            if self.open_children or self.sent_qty >= self.size:
                return None
            left = self.size - self.sent_qty
            qty = left if left - self.display_qty < self.rules.min_qty else self.display_qty
            return self._child(qty)
        if self.next_slice < len(self.plan) and self.plan[self.next_slice].due_ns <= now_ns:
            self.next_slice += 1
            return self._child(self.plan[self.next_slice - 1].qty)
        return None

    def unsend(self, child: ChildOrder) -> None:
        """The venue never got `child` (transient failure): it is due again."""
        self.open_children.pop(child.client_order_id, None)
        self.sent_qty -= child.qty
        self.children_sent -= 1
        if self.display_qty is None:
            self.next_slice -= 1

    def client_order_id(self, n: int) -> str:
        """The client order id of this order's `n`th child (1-based): derived from the order
        id, so a redelivered approval can never place under a new one."""
        return f"{self.order_id}-{n}"

    def sent_client_ids(self) -> list[str]:
        """The client ids of every child the venue got (a child it never got is unsent and
        its number used again)."""
        return [self.client_order_id(n) for n in range(1, self.children_sent + 1)]

    def _child(self, qty: Decimal) -> ChildOrder:
        self.children_sent += 1
        client_id = self.client_order_id(self.children_sent)
        self.sent_qty += qty
        self.open_children[client_id] = qty
        return ChildOrder(
            client_order_id=client_id,
            parent_order_id=self.order_id,
            symbol=self.symbol,
            side=self.side,
            qty=qty,
            type=self.child_type,
            price=self.limit_price if self.child_type == "limit" else None,
            reduce_only=self.reduce_only,
        )

    def on_fill(self, client_order_id: str, qty: Decimal) -> None:
        for children in (self.open_children, self.uncancelled):
            open_qty = children.get(client_order_id)
            if open_qty is not None:
                left = open_qty - qty
                if left <= 0:
                    del children[client_order_id]
                else:
                    children[client_order_id] = left
        self.filled_qty += qty
        if self.filled_qty >= self.size and self.status is ParentStatus.WORKING:
            self.status = ParentStatus.FILLED

    def on_child_refused(self, client_order_id: str) -> None:
        qty = self.open_children.pop(client_order_id, ZERO)
        self.sent_qty -= qty

    def cancel(self) -> dict[str, Decimal]:
        """Stop the algorithm; returns the children still open (client id -> open qty)."""
        if self.status is ParentStatus.WORKING:
            self.status = ParentStatus.CANCELLED
        still_open = dict(self.open_children)
        self.open_children.clear()
        return still_open


class ExecutionRouter:
    """Plans parent orders (see the module docstring)."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()

    def route(
        self,
        order: Mapping[str, Any],
        rules: MarketRules,
        now_ns: int,
        volumes: Sequence[Decimal] = (),
    ) -> ParentOrder:
        """Plan `order` (ORDER_APPROVED data). Raises `OrderRefusedError` for an order the
        venue would refuse (price off tick; size or value below its minimum).

        The size is rounded down to the venue's quantity step (risk sizes to one step for
        every symbol; the venue's is often coarser): the order is worked, and finishes, at
        the rounded size. Children are never below the venue's minimum quantity or, at the
        order's price (a market order's: risk's reference price), its minimum notional."""
        algorithm = OrderType(str(order.get("type") or "market").lower())
        approved = Decimal(order["size"])
        size = rules.floor_qty(approved)
        price = Decimal(order["price"]) if order.get("price") is not None else None
        ref = order.get("reference_price")
        mark = Decimal(ref) if ref is not None else None
        refusal = rules.refusal(size, price, mark)
        if refusal is not None:
            if size != approved:
                refusal = f"size {approved} rounded to the qty step {rules.qty_step}: {refusal}"
            raise OrderRefusedError(refusal)
        if algorithm not in (OrderType.MARKET, OrderType.LIMIT):
            # Slices: plan with the smallest child the venue takes at this price, with room
            # for the price to fall before a later one goes out (its notional is checked
            # then). A single child is the whole order, checked above.
            at = price if price is not None else mark
            planned = at / SLICE_NOTIONAL_MARGIN if at is not None else None
            rules = replace(rules, min_qty=rules.min_size(planned))
        child_type: ChildType = "limit" if price is not None else "market"
        if algorithm is OrderType.MARKET:
            child_type, price = "market", None
        parent = ParentOrder(
            order_id=str(order["order_id"]),
            symbol=str(order["symbol"]),
            side=Side(order["side"]),
            size=size,
            algorithm=algorithm,
            rules=rules,
            child_type=child_type,
            limit_price=price,
            reduce_only=bool(order.get("reduce_only", False)),
        )
        cfg = self.config
        if algorithm in (OrderType.MARKET, OrderType.LIMIT):
            parent.plan = [PlannedSlice(size, now_ns)]
        elif algorithm is OrderType.TWAP:
            slices = _int(order.get("slices"), cfg.twap_slices)
            duration = _float(order.get("duration_s"), cfg.twap_duration_s)
            parent.plan = _schedule(_split(size, [Decimal(1)] * slices, rules), now_ns, duration)
        elif algorithm is OrderType.VWAP:
            slices = _int(order.get("slices"), cfg.vwap_slices)
            duration = _float(order.get("duration_s"), cfg.vwap_duration_s)
            profile = [v for v in volumes[-slices:] if v > 0]
            weights = profile if len(profile) == slices else [Decimal(1)] * slices
            parent.plan = _schedule(_split(size, weights, rules), now_ns, duration)
        else:
            display = order.get("display_size")
            qty = Decimal(display) if display is not None else size * cfg.iceberg_display_ratio
            qty = max(rules.floor_qty(qty), rules.min_qty)
            parent.display_qty = min(qty, size)
        return parent


def _split(size: Decimal, weights: Sequence[Decimal], rules: MarketRules) -> list[Decimal]:
    """Split `size` by `weights` into step multiples >= min qty, fewer slices if needed."""
    max_slices = int((size / rules.min_qty).to_integral_value(rounding=ROUND_DOWN))
    weights = list(weights)[-max(1, min(len(weights), max_slices)) :]
    total = sum(weights, ZERO)
    parts = [max(rules.floor_qty(size * w / total), rules.min_qty) for w in weights[:-1]]
    while parts and size - sum(parts, ZERO) < rules.min_qty:
        parts.pop()  # the order is too small for this many slices
    parts.append(size - sum(parts, ZERO))
    return parts


def _schedule(parts: list[Decimal], now_ns: int, duration_s: float) -> list[PlannedSlice]:
    step = int(duration_s * NS_PER_S / len(parts))
    return [PlannedSlice(qty, now_ns + i * step) for i, qty in enumerate(parts)]


def _int(value: Any, default: int) -> int:
    try:
        result = int(value) if value is not None else default
    except (TypeError, ValueError):
        return default
    return result if result >= 1 else default


def _float(value: Any, default: float) -> float:
    try:
        result = float(value) if value is not None else default
    except (TypeError, ValueError):
        return default
    return result if result >= 0 else default
