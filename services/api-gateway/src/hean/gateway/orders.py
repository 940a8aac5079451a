"""Open orders derived from the ORDER_* streams: a pure function over events in stream order.

An order is open from its ORDER_APPROVED until an ORDER_CANCELLED or ORDER_REJECTED for it,
or until its fills add up to its size (or a fill reports `remaining_qty` 0). Fills are
counted once per `fill_id` (the streams are at-least-once). Events about orders approved
before the window the caller read are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

from hean.core.topology import APPROVER
from hean.core.types import Event, EventType


def _decimal(value: object) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def open_orders(events: Iterable[Event]) -> list[dict[str, Any]]:
    """Orders still working, oldest approval first. `events` must be in stream order."""
    orders: dict[str, dict[str, Any]] = {}
    seen_fills: set[str] = set()
    for event in events:
        data = event.data
        order_id = str(data.get("order_id") or data.get("id") or "")
        if not order_id:
            continue
        if event.event_type is EventType.ORDER_APPROVED:
            if event.source_service != APPROVER:
                continue  # not an order: execution dead-letters it
            orders.setdefault(
                order_id,
                {
                    "order_id": order_id,
                    "symbol": data.get("symbol"),
                    "side": str(data.get("side")),
                    "type": str(data.get("type", "market")),
                    "size": str(data.get("size")),
                    "price": None if data.get("price") is None else str(data.get("price")),
                    "status": "approved",
                    "filled_qty": "0",
                    "approved_at": event.timestamp,
                    "approved_event_id": event.event_id,
                    "exchange_order_ids": [],
                },
            )
            continue
        order = orders.get(order_id)
        if order is None:
            continue
        if event.event_type in (EventType.ORDER_CANCELLED, EventType.ORDER_REJECTED):
            del orders[order_id]
        elif event.event_type is EventType.ORDER_PLACED:
            if order["status"] == "approved":
                order["status"] = "placed"
            exchange_id = data.get("exchange_order_id")
            if exchange_id and exchange_id not in order["exchange_order_ids"]:
                order["exchange_order_ids"].append(str(exchange_id))
        elif event.event_type is EventType.ORDER_FILLED:
            fill_key = str(data.get("fill_id") or event.event_id)
            if fill_key in seen_fills:
                continue
            seen_fills.add(fill_key)
            filled = Decimal(order["filled_qty"]) + (_decimal(data.get("filled_qty")) or 0)
            order["filled_qty"] = str(filled)
            order["status"] = "partially_filled"
            size = _decimal(order["size"])
            remaining = _decimal(data.get("remaining_qty"))
            if (remaining is not None and remaining <= 0) or (size is not None and filled >= size):
                del orders[order_id]
    return sorted(orders.values(), key=lambda o: (o["approved_at"], o["order_id"]))
