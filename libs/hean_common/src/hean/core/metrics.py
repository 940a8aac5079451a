"""The project's Prometheus metrics, with the integration guide's names.

One `Metrics` object per process, built in `main` and passed in (no global registry), so tests
build as many as they like. Every service exports the same families; each fills the ones its
work touches. Label values are bounded sets (event types, components, symbols), never ids.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
SLIPPAGE_BUCKETS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0)

# generate_latest() writes the classic text format; Debian's Prometheus 2.x expects this type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """All HEAN metric families on one registry."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process_metrics:
            # process_cpu_seconds_total, process_resident_memory_bytes, ...: the System
            # Health dashboard's CPU and memory per service.
            ProcessCollector(registry=r)

        # Trading (names from the guide)
        self.orders_total = Counter(
            "hean_orders_total",
            "Orders placed on the exchange",
            ["symbol", "side", "type"],
            registry=r,
        )
        self.pnl = Gauge("hean_pnl", "Current total P&L (quote currency)", registry=r)
        self.latency_seconds = Histogram(
            "hean_latency_seconds",
            "Processing latency by pipeline stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.trades_total = Counter(
            "hean_trades_total", "Fills executed", ["symbol", "side"], registry=r
        )
        # Trading, for the dashboards
        self.pnl_realized = Gauge("hean_pnl_realized", "Realized P&L", registry=r)
        self.pnl_unrealized = Gauge("hean_pnl_unrealized", "Unrealized P&L", registry=r)
        self.equity = Gauge("hean_equity", "Account equity (quote currency)", registry=r)
        self.fees_total = Gauge("hean_fees_paid", "Fees paid so far", registry=r)
        self.drawdown_ratio = Gauge(
            "hean_drawdown_ratio", "Drawdown from the day's starting equity (0.05 = 5%)", registry=r
        )
        self.daily_drawdown_limit = Gauge(
            "hean_daily_drawdown_limit", "Configured DAILY_DRAWDOWN_LIMIT", registry=r
        )
        self.peak_drawdown_ratio = Gauge(
            "hean_peak_drawdown_ratio",
            "Drawdown from the highest equity the account has had, across days (0.2 = 20%)",
            registry=r,
        )
        self.max_drawdown_limit = Gauge(
            "hean_max_drawdown_limit", "Configured MAX_DRAWDOWN_LIMIT (0: off)", registry=r
        )
        self.win_rate = Gauge("hean_win_rate", "Share of closed trades with profit", registry=r)
        self.sharpe_ratio = Gauge("hean_sharpe_ratio", "Sharpe ratio of closed trades", registry=r)
        self.trade_volume = Counter(
            "hean_trade_volume_total", "Traded notional (quote currency)", ["symbol"], registry=r
        )
        self.position_notional = Gauge(
            "hean_position_notional", "Open position notional", ["symbol"], registry=r
        )
        self.killswitch_active = Gauge(
            "hean_killswitch_active", "1 while the kill switch blocks new orders", registry=r
        )
        self.orders_rejected_total = Counter(
            "hean_orders_rejected_total", "Orders rejected", ["source", "reason"], registry=r
        )
        self.order_fill_ratio = Histogram(
            "hean_order_fill_ratio",
            "Filled share of each finished order",
            buckets=(0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
            registry=r,
        )
        self.slippage_bps = Histogram(
            "hean_slippage_bps",
            "Fill slippage in basis points",
            ["symbol"],
            buckets=SLIPPAGE_BUCKETS,
            registry=r,
        )
        self.exchange_api_errors_total = Counter(
            "hean_exchange_api_errors_total",
            "Exchange API errors",
            ["exchange", "kind"],
            registry=r,
        )
        self.signals_total = Counter(
            "hean_signals_total", "Signals emitted", ["symbol", "side"], registry=r
        )
        self.predictions_total = Counter(
            "hean_predictions_total", "Model predictions published", ["model_version"], registry=r
        )

        # System (names from the guide)
        self.uptime_seconds = Gauge(
            "hean_orchestrator_uptime_seconds",
            "Seconds since the orchestrator started",
            registry=r,
        )
        self.components_healthy = Gauge(
            "hean_components_healthy", "Components in state healthy", registry=r
        )
        self.components_total = Gauge("hean_components_total", "Components registered", registry=r)
        self.circuit_breakers_open = Gauge(
            "hean_circuit_breakers_open", "Circuit breakers in state open", registry=r
        )
        self.circuit_breaker_state = Gauge(
            "hean_circuit_breaker_state",
            "Circuit breaker state per component (0 closed, 1 half_open, 2 open)",
            ["component"],
            registry=r,
        )
        self.component_up = Gauge(
            "hean_component_healthy", "1 if the component is healthy", ["component"], registry=r
        )
        self.queue_size = Gauge(
            "hean_eventbus_queue_size",
            "Events waiting in this process: outbox plus in-flight plus local queue",
            registry=r,
        )
        self.outbox_size = Gauge(
            "hean_eventbus_outbox_size", "Events waiting for Redis to accept them", registry=r
        )
        self.redis_connected = Gauge(
            "hean_eventbus_redis_connected", "1 while Redis answers", registry=r
        )
        self.events_published = Counter(
            "hean_eventbus_published_total", "Events published", ["event_type"], registry=r
        )
        self.events_handled = Counter(
            "hean_eventbus_handled_total",
            "Events handled, by outcome (ok, error, dead_letter)",
            ["event_type", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "hean_eventbus_dead_letters_total",
            "Events sent to the dead-letter stream",
            ["event_type"],
            registry=r,
        )
        self.reclaimed = Counter(
            "hean_eventbus_reclaimed_total",
            "Pending events taken over from idle consumers",
            registry=r,
        )
        self.pending = Gauge(
            "hean_eventbus_pending",
            "Entries pending (delivered, not acked) for this group",
            ["stream"],
            registry=r,
        )
        self.group_lag = Gauge(
            "hean_eventbus_group_lag",
            "Entries not yet delivered to this group",
            ["stream"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
