# ruff: noqa: E501  (PromQL queries read best on one line)
"""Write HEAN's three Grafana dashboards (the integration guide's list) as JSON.

    python deploy/grafana/build_dashboards.py           # rewrite deploy/grafana/dashboards/
    python deploy/grafana/build_dashboards.py --check   # exit 1 if the files are stale

The JSON files are what Grafana provisions; this script is their source, so queries stay
consistent (one filter helper, one datasource uid). tests/deploy runs every query against a
real Prometheus scraping real services and checks the files match this script.

Selection: `$service` is the `service` label the Prometheus scrape config sets (the compose
service name), `$instance` one replica. Every metric family is registered in every process
(hean.core.metrics), so an unlabelled gauge that only one service fills (P&L, equity,
drawdown, ...) reads 0 in the others: those panels select their owner explicitly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DATASOURCE_UID = "hean-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
OUT = Path(__file__).resolve().parent / "dashboards"
SEL = 'service=~"$service", instance=~"$instance"'
RATE = "$__rate_interval"

Panel = dict[str, Any]


def target(expr: str, legend: str = "__auto", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"refId": ref, "datasource": DATASOURCE, "expr": expr, "legendFormat": legend, **extra}


def panel(
    kind: str,
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    description: str = "",
    w: int = 12,
    h: int = 8,
    decimals: int | None = None,
    thresholds: list[tuple[float | None, str]] | None = None,
    mappings: list[dict[str, Any]] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    options: dict[str, Any] | None = None,
) -> Panel:
    defaults: dict[str, Any] = {"unit": unit}
    if decimals is not None:
        defaults["decimals"] = decimals
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": color, "value": value} for value, color in thresholds],
        }
    if mappings:
        defaults["mappings"] = mappings
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
        "gridPos": {"w": w, "h": h},
    }


def row(title: str) -> Panel:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "panels": [],
        "gridPos": {"w": 24, "h": 1},
    }


def layout(panels: list[Panel]) -> list[Panel]:
    """Give panels ids and positions: left to right, wrapping at 24 columns."""
    x = y = line_height = 0
    for number, p in enumerate(panels, start=1):
        p["id"] = number
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            y += line_height
            x = line_height = 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x += w
        line_height = max(line_height, h)
        if p["type"] == "row":
            y += h
            x = line_height = 0
    return panels


def variables() -> list[dict[str, Any]]:
    def var(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "type": "query",
            "name": name,
            "label": label,
            "datasource": DATASOURCE,
            "definition": query,
            "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor"},
            "refresh": 2,
            "regex": "",
            "sort": 1,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "hide": 0,
            "options": [],
        }

    return [
        var("service", "service", "label_values(hean_orchestrator_uptime_seconds, service)"),
        var(
            "instance",
            "instance",
            'label_values(hean_orchestrator_uptime_seconds{service=~"$service"}, instance)',
        ),
    ]


def dashboard(uid: str, title: str, description: str, panels: list[Panel]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["hean"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["hean"], "asDropdown": True, "title": "HEAN dashboards"}
        ],
        "panels": layout(panels),
    }


def trading_performance() -> dict[str, Any]:
    pf = 'service="portfolio"'
    risk = 'service="risk"'
    percent = {"reduceOptions": {"calcs": ["lastNotNull"]}}
    return dashboard(
        "hean-trading-performance",
        "HEAN / Trading Performance",
        "P&L, volume, win rate, Sharpe ratio and drawdown (portfolio, execution and risk).",
        [
            row("P&L"),
            panel(
                "timeseries",
                "P&L (USDT)",
                [
                    target(f"hean_pnl{{{pf}}}", "total", "A"),
                    target(f"hean_pnl_realized{{{pf}}}", "realized", "B"),
                    target(f"hean_pnl_unrealized{{{pf}}}", "unrealized", "C"),
                ],
                description="Total, realized and unrealized P&L from the portfolio service.",
                w=16,
            ),
            panel(
                "stat",
                "Equity (USDT)",
                [target(f"hean_equity{{{pf}}}", "equity")],
                decimals=2,
                w=8,
                options=percent,
            ),
            panel(
                "timeseries",
                "Open position notional by symbol (USDT)",
                [target(f"hean_position_notional{{{pf}}}", "{{symbol}}")],
                w=12,
            ),
            panel(
                "stat",
                "Fees paid (USDT)",
                [target(f"hean_fees_paid{{{pf}}}", "fees")],
                decimals=2,
                w=12,
                options=percent,
            ),
            row("Volume"),
            panel(
                "timeseries",
                "Traded notional by symbol (USDT per second)",
                [
                    target(
                        f"sum by (symbol) (rate(hean_trade_volume_total{{{SEL}}}[{RATE}]))",
                        "{{symbol}}",
                    )
                ],
                w=12,
            ),
            panel(
                "timeseries",
                "Fills and orders per minute",
                [
                    target(
                        f"sum by (symbol, side) (rate(hean_trades_total{{{SEL}}}[{RATE}])) * 60",
                        "fills {{symbol}} {{side}}",
                        "A",
                    ),
                    target(
                        f"sum by (type) (rate(hean_orders_total{{{SEL}}}[{RATE}])) * 60",
                        "orders {{type}}",
                        "B",
                    ),
                ],
                w=12,
            ),
            panel(
                "timeseries",
                "Signals per minute",
                [
                    target(
                        f"sum by (symbol, side) (rate(hean_signals_total{{{SEL}}}[{RATE}])) * 60",
                        "{{symbol}} {{side}}",
                    )
                ],
                w=12,
            ),
            panel(
                "timeseries",
                "Order rejections per minute",
                [
                    target(
                        f"sum by (source, reason) (rate(hean_orders_rejected_total{{{SEL}}}[{RATE}])) * 60",
                        "{{source}}: {{reason}}",
                    )
                ],
                w=12,
            ),
            row("Win rate and Sharpe ratio"),
            panel(
                "stat",
                "Win rate",
                [target(f"hean_win_rate{{{pf}}}", "win rate")],
                unit="percentunit",
                decimals=1,
                w=8,
                options=percent,
                thresholds=[(None, "red"), (0.45, "orange"), (0.55, "green")],
            ),
            panel(
                "stat",
                "Sharpe ratio",
                [target(f"hean_sharpe_ratio{{{pf}}}", "Sharpe")],
                decimals=2,
                w=8,
                options=percent,
                thresholds=[(None, "red"), (0.5, "orange"), (1.0, "green")],
            ),
            panel(
                "timeseries",
                "Win rate and Sharpe ratio over time",
                [
                    target(f"hean_win_rate{{{pf}}}", "win rate", "A"),
                    target(f"hean_sharpe_ratio{{{pf}}}", "Sharpe", "B"),
                ],
                w=8,
            ),
            row("Drawdown"),
            panel(
                "timeseries",
                "Drawdown and limits",
                [
                    target(f"hean_drawdown_ratio{{{risk}}}", "daily drawdown", "A"),
                    target(
                        f"hean_daily_drawdown_limit{{{risk}}}", "daily limit (kill switch)", "B"
                    ),
                    target(f"hean_peak_drawdown_ratio{{{risk}}}", "drawdown from the peak", "C"),
                    target(
                        f"hean_max_drawdown_limit{{{risk}}} > 0", "peak limit (kill switch)", "D"
                    ),
                ],
                unit="percentunit",
                description=(
                    "Loss from the UTC day's starting equity, and from the highest equity the "
                    "account has had (MAX_DRAWDOWN_LIMIT, shown when set); the kill switch "
                    "trips at either limit."
                ),
                w=12,
            ),
            panel(
                "gauge",
                "Drawdown used (share of the limit)",
                [
                    target(
                        f"max(hean_drawdown_ratio{{{risk}}}) / max(hean_daily_drawdown_limit{{{risk}}} > 0)",
                        "used",
                    )
                ],
                unit="percentunit",
                minimum=0,
                maximum=1,
                thresholds=[(None, "green"), (0.5, "orange"), (0.8, "red")],
                w=6,
                options=percent,
            ),
            panel(
                "stat",
                "Kill switch",
                [target(f"max(hean_killswitch_active{{{risk}}})", "kill switch")],
                mappings=[
                    {
                        "type": "value",
                        "options": {
                            "0": {"text": "off", "color": "green"},
                            "1": {"text": "ACTIVE", "color": "red"},
                        },
                    }
                ],
                w=6,
                options=percent,
            ),
        ],
    )


def system_health() -> dict[str, Any]:
    last = {"reduceOptions": {"calcs": ["lastNotNull"]}}
    return dashboard(
        "hean-system-health",
        "HEAN / System Health",
        "Targets, components, circuit breakers, event bus queues and process resources per service and replica.",
        [
            row("Services and components"),
            panel(
                "stat",
                "Replicas up per service",
                [target(f"sum by (service) (up{{{SEL}}})", "{{service}}")],
                w=12,
                options=last,
                thresholds=[(None, "red"), (1, "green")],
            ),
            panel(
                "timeseries",
                "Healthy components (share)",
                [
                    target(
                        f"hean_components_healthy{{{SEL}}} / hean_components_total{{{SEL}}}",
                        "{{service}} {{instance}}",
                    )
                ],
                unit="percentunit",
                minimum=0,
                maximum=1,
                w=12,
            ),
            panel(
                "state-timeline",
                "Component status (1 healthy)",
                [
                    target(
                        f"hean_component_healthy{{{SEL}}}", "{{service}}/{{component}} {{instance}}"
                    )
                ],
                mappings=[
                    {
                        "type": "value",
                        "options": {
                            "0": {"text": "not healthy", "color": "red"},
                            "1": {"text": "healthy", "color": "green"},
                        },
                    }
                ],
                w=24,
                h=9,
            ),
            panel(
                "timeseries",
                "Orchestrator uptime",
                [target(f"hean_orchestrator_uptime_seconds{{{SEL}}}", "{{service}} {{instance}}")],
                unit="s",
                w=12,
            ),
            panel(
                "timeseries",
                "Redis connection (1 connected)",
                [target(f"hean_eventbus_redis_connected{{{SEL}}}", "{{service}} {{instance}}")],
                minimum=0,
                maximum=1,
                w=12,
            ),
            row("Circuit breakers"),
            panel(
                "stat",
                "Open circuit breakers",
                [target(f"sum(hean_circuit_breakers_open{{{SEL}}})", "open")],
                w=6,
                options=last,
                thresholds=[(None, "green"), (1, "red")],
            ),
            panel(
                "state-timeline",
                "Circuit breaker state per component",
                [
                    target(
                        f"hean_circuit_breaker_state{{{SEL}}}",
                        "{{service}}/{{component}} {{instance}}",
                    )
                ],
                mappings=[
                    {
                        "type": "value",
                        "options": {
                            "0": {"text": "closed", "color": "green"},
                            "1": {"text": "half_open", "color": "orange"},
                            "2": {"text": "open", "color": "red"},
                        },
                    }
                ],
                w=18,
                h=9,
            ),
            row("Event bus"),
            panel(
                "timeseries",
                "Queue depth (outbox + in flight + local queue)",
                [target(f"hean_eventbus_queue_size{{{SEL}}}", "{{service}} {{instance}}")],
                w=12,
            ),
            panel(
                "timeseries",
                "Outbox (waiting for Redis)",
                [target(f"hean_eventbus_outbox_size{{{SEL}}}", "{{service}} {{instance}}")],
                w=12,
            ),
            panel(
                "timeseries",
                "Consumer group lag by stream",
                [
                    target(
                        f"max by (service, stream) (hean_eventbus_group_lag{{{SEL}}})",
                        "{{service}} {{stream}}",
                    )
                ],
                w=12,
            ),
            panel(
                "timeseries",
                "Pending (delivered, not acked) by stream",
                [
                    target(
                        f"max by (service, stream) (hean_eventbus_pending{{{SEL}}})",
                        "{{service}} {{stream}}",
                    )
                ],
                w=12,
            ),
            panel(
                "timeseries",
                "Events handled per second by outcome",
                [
                    target(
                        f"sum by (service, outcome) (rate(hean_eventbus_handled_total{{{SEL}}}[{RATE}]))",
                        "{{service}} {{outcome}}",
                    )
                ],
                w=12,
            ),
            panel(
                "timeseries",
                "Events published per second",
                [
                    target(
                        f"sum by (service, event_type) (rate(hean_eventbus_published_total{{{SEL}}}[{RATE}]))",
                        "{{service}} {{event_type}}",
                    )
                ],
                w=12,
            ),
            panel(
                "timeseries",
                "Dead letters and reclaimed entries",
                [
                    target(
                        f"sum by (service, event_type) (increase(hean_eventbus_dead_letters_total{{{SEL}}}[{RATE}]))",
                        "dead-lettered {{service}} {{event_type}}",
                        "A",
                    ),
                    target(
                        f"sum by (service) (increase(hean_eventbus_reclaimed_total{{{SEL}}}[{RATE}]))",
                        "reclaimed {{service}}",
                        "B",
                    ),
                ],
                w=24,
            ),
            row("CPU and memory"),
            panel(
                "timeseries",
                "CPU per replica (cores)",
                [
                    target(
                        f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])",
                        "{{service}} {{instance}}",
                    )
                ],
                unit="short",
                w=12,
            ),
            panel(
                "timeseries",
                "Resident memory per replica",
                [
                    target(
                        f"process_resident_memory_bytes{{{SEL}}}",
                        "{{service}} {{instance}}",
                    )
                ],
                unit="bytes",
                w=12,
            ),
        ],
    )


def execution_quality() -> dict[str, Any]:
    last = {"reduceOptions": {"calcs": ["lastNotNull"]}}
    fill = f"hean_order_fill_ratio_bucket{{{SEL}}}"
    slip = f"hean_slippage_bps_bucket{{{SEL}}}"
    lat = f"hean_latency_seconds_bucket{{{SEL}}}"
    return dashboard(
        "hean-execution-quality",
        "HEAN / Execution Quality",
        "Fill rate, slippage, latency distribution and exchange API errors.",
        [
            row("Fill rate"),
            panel(
                "stat",
                "Average filled share of finished orders",
                [
                    target(
                        f"sum(rate(hean_order_fill_ratio_sum{{{SEL}}}[{RATE}])) / sum(rate(hean_order_fill_ratio_count{{{SEL}}}[{RATE}]))",
                        "fill rate",
                    )
                ],
                unit="percentunit",
                decimals=1,
                w=8,
                options=last,
                thresholds=[(None, "red"), (0.9, "orange"), (0.99, "green")],
            ),
            panel(
                "timeseries",
                "Filled share of finished orders (median, p10)",
                [
                    target(
                        f"histogram_quantile(0.5, sum by (le) (rate({fill}[{RATE}])))",
                        "median",
                        "A",
                    ),
                    target(
                        f"histogram_quantile(0.1, sum by (le) (rate({fill}[{RATE}])))", "p10", "B"
                    ),
                ],
                unit="percentunit",
                w=16,
            ),
            row("Slippage"),
            panel(
                "timeseries",
                "Slippage by symbol (bps: median, p95)",
                [
                    target(
                        f"histogram_quantile(0.5, sum by (le, symbol) (rate({slip}[{RATE}])))",
                        "median {{symbol}}",
                        "A",
                    ),
                    target(
                        f"histogram_quantile(0.95, sum by (le, symbol) (rate({slip}[{RATE}])))",
                        "p95 {{symbol}}",
                        "B",
                    ),
                ],
                w=12,
            ),
            panel(
                "timeseries",
                "Average slippage by symbol (bps)",
                [
                    target(
                        f"sum by (symbol) (rate(hean_slippage_bps_sum{{{SEL}}}[{RATE}])) / sum by (symbol) (rate(hean_slippage_bps_count{{{SEL}}}[{RATE}]))",
                        "{{symbol}}",
                    )
                ],
                w=12,
            ),
            row("Latency"),
            panel(
                "timeseries",
                "Latency by stage (p50, p95, p99)",
                [
                    target(
                        f"histogram_quantile(0.5, sum by (le, stage) (rate({lat}[{RATE}])))",
                        "p50 {{stage}}",
                        "A",
                    ),
                    target(
                        f"histogram_quantile(0.95, sum by (le, stage) (rate({lat}[{RATE}])))",
                        "p95 {{stage}}",
                        "B",
                    ),
                    target(
                        f"histogram_quantile(0.99, sum by (le, stage) (rate({lat}[{RATE}])))",
                        "p99 {{stage}}",
                        "C",
                    ),
                ],
                unit="s",
                w=24,
                h=9,
            ),
            panel(
                "heatmap",
                "Latency distribution (all stages)",
                [
                    target(
                        f"sum by (le) (increase({lat}[{RATE}]))",
                        "{{le}}",
                        format="heatmap",
                    )
                ],
                unit="s",
                w=24,
                h=9,
                options={
                    "calculate": False,
                    "yAxis": {"unit": "s"},
                    "cellGap": 1,
                    "color": {"mode": "scheme", "scheme": "Oranges"},
                },
            ),
            row("Exchange"),
            panel(
                "timeseries",
                "Exchange API errors per minute",
                [
                    target(
                        f"sum by (exchange, kind) (rate(hean_exchange_api_errors_total{{{SEL}}}[{RATE}])) * 60",
                        "{{exchange}} {{kind}}",
                    )
                ],
                w=12,
            ),
            panel(
                "timeseries",
                "Orders placed per minute by type",
                [
                    target(
                        f"sum by (type, side) (rate(hean_orders_total{{{SEL}}}[{RATE}])) * 60",
                        "{{type}} {{side}}",
                    )
                ],
                w=12,
            ),
        ],
    )


DASHBOARDS = {
    "hean-trading-performance.json": trading_performance,
    "hean-system-health.json": system_health,
    "hean-execution-quality.json": execution_quality,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON files are stale")
    args = parser.parse_args(argv)
    stale = []
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        path = OUT / name
        text = render(build)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        print("stale (run python deploy/grafana/build_dashboards.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
