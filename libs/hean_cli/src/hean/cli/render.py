"""Turning events, health and dead letters into terminal tables and lines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from rich.table import Table

from hean.core.types import Event, EventType

#: The data fields worth a column, per event type (others: the first few keys).
COLUMNS: Final[Mapping[EventType, tuple[str, ...]]] = {
    EventType.TICK: ("symbol", "price", "volume"),
    EventType.CANDLE: ("symbol", "open", "high", "low", "close", "volume"),
    EventType.FEATURES_READY: ("symbol",),
    EventType.ML_PREDICTION: ("symbol", "prediction", "confidence", "model_version"),
    EventType.SIGNAL: ("symbol", "side", "size", "signal_strength"),
    EventType.ORDER_REQUEST: ("order_id", "symbol", "side", "size", "type", "price"),
    EventType.ORDER_APPROVED: ("order_id", "symbol", "side", "size", "type", "price"),
    EventType.ORDER_PLACED: ("order_id", "symbol", "side", "size", "price", "exchange_order_id"),
    EventType.ORDER_FILLED: (
        "order_id",
        "symbol",
        "side",
        "fill_price",
        "filled_qty",
        "fee",
        "liquidity",
    ),
    EventType.ORDER_CANCELLED: ("order_id", "reason"),
    EventType.ORDER_REJECTED: ("order_id", "reason"),
    EventType.PNL_UPDATE: ("total_pnl", "realized_pnl", "unrealized_pnl", "equity", "drawdown"),
    EventType.ERROR: ("component", "error"),
    EventType.KILLSWITCH_TRIGGERED: ("reason",),
}


def utc(timestamp_ns: int) -> str:
    return datetime.fromtimestamp(timestamp_ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def columns_for(event_type: EventType) -> tuple[str, ...]:
    return COLUMNS.get(event_type, ())


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        return f"{{{len(value)} fields}}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def event_row(entry_id: str, event: Event) -> list[str]:
    data = event.data
    return [
        entry_id,
        utc(event.timestamp),
        *(cell(data.get(name)) for name in columns_for(event.event_type)),
    ]


def event_line(entry_id: str, event: Event) -> str:
    data = event.data
    fields = " ".join(
        f"{name}={cell(data.get(name))}"
        for name in columns_for(event.event_type)
        if data.get(name) is not None
    )
    return f"{entry_id}  {utc(event.timestamp)}  {event.event_type.value}  {fields}"


def events_table(event_type: EventType, rows: Sequence[list[str]]) -> Table:
    table = Table(title=f"{event_type.value}: {len(rows)} events", title_justify="left")
    table.add_column("stream id", no_wrap=True)
    table.add_column("time (UTC)", no_wrap=True)
    for name in columns_for(event_type):
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    return table


_STATE_STYLE: Final = {"healthy": "green", "degraded": "yellow", "unhealthy": "red"}


def styled(state: str) -> str:
    style = _STATE_STYLE.get(state, "red")
    return f"[{style}]{state}[/{style}]"


def health_tables(merged: Mapping[str, Any]) -> list[Table]:
    services = Table(title="services", title_justify="left")
    for name in ("service", "instance", "state", "uptime (s)", "snapshot age (s)"):
        services.add_column(name)
    for service, entry in merged.get("services", {}).items():
        instances = entry.get("instances", {})
        if not instances:
            services.add_row(service, "-", styled("unhealthy") + " (down)", "-", "-")
        for instance, view in instances.items():
            services.add_row(
                service,
                instance,
                styled(str(view.get("state"))),
                str(view.get("uptime_seconds", "-")),
                str(view.get("age_seconds", "-")),
            )
    components = Table(title="components", title_justify="left")
    for name in ("component", "state", "circuit breaker", "failures", "message"):
        components.add_column(name)
    for name, entry in merged.get("components", {}).items():
        components.add_row(
            name,
            styled(str(entry.get("state"))),
            str(entry.get("circuit_breaker", "-")),
            str(entry.get("failure_count", "-")),
            cell(entry.get("error_message", "")),
        )
    return [services, components]


def dlq_table(entries: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title=f"dead letters: {len(entries)}", title_justify="left")
    for name in ("dlq id", "stream", "entry id", "group", "deliveries", "error"):
        table.add_column(name)
    for e in entries:
        table.add_row(
            str(e["dlq_id"]),
            str(e["stream"]),
            str(e["entry_id"]),
            str(e["group"]),
            str(e["deliveries"]),
            cell(e["error"]),
        )
    return table
