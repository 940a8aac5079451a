"""Reading the provisioned Grafana dashboards: their panels, queries and metric names."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.deploy.tools import DASHBOARD_DIR

# What Grafana substitutes before sending a query; the test uses the same values
# Grafana would for "All" and a short scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$service": ".*", "$instance": ".*"}

PROMQL_WORDS = {
    # functions
    "abs", "absent", "avg", "avg_over_time", "ceil", "count", "delta", "deriv", "exp",
    "floor", "histogram_quantile", "increase", "irate", "label_replace", "max",
    "max_over_time", "min", "min_over_time", "rate", "round", "sort", "sort_desc", "sum",
    "sum_over_time", "time", "topk", "bottomk", "vector", "scalar", "clamp_min", "clamp_max",
    "quantile", "stddev", "last_over_time",
    # keywords
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool",
}  # fmt: skip


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def promql(self) -> str:
        """The query as Grafana sends it to Prometheus."""
        expr = self.expr
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"unsubstituted Grafana variable in {self}"
        return expr


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries() -> list[Query]:
    found = []
    for dashboard in load_dashboards().values():
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                found.append(
                    Query(dashboard["title"], panel["title"], target["refId"], target["expr"])
                )
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (identifiers that are not functions,
    keywords, grouping labels, label matchers, durations or numbers)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"(?<![A-Za-z0-9_:])\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|[smhdwy])*", "", text)
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return names - PROMQL_WORDS


def dashboard_file(name: str) -> Path:
    return DASHBOARD_DIR / name
