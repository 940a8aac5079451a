"""The Grafana provisioning and dashboard files: generated from their source, wired to the
provisioned datasource, and covering what the integration guide lists."""

from __future__ import annotations

import subprocess
import sys

import yaml

from tests.deploy.dashboards import load_dashboards, metric_names, panels, queries
from tests.deploy.tools import GRAFANA_DIR, ROOT


def test_dashboards_json_matches_its_generator():
    result = subprocess.run(
        [sys.executable, str(GRAFANA_DIR / "build_dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_datasource_provisioning_has_the_uid_every_panel_uses():
    provisioning = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    [source] = provisioning["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    uid = source["uid"]
    for dashboard in load_dashboards().values():
        for panel in panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid
        for variable in dashboard["templating"]["list"]:
            assert variable["datasource"]["uid"] == uid


def test_dashboard_provider_points_at_the_mounted_directory():
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "hean.yml").read_text()
    )["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    compose = (ROOT / "deploy" / "docker-compose.yml").read_text()
    assert "./grafana/dashboards:/etc/grafana/dashboards:ro" in compose
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in compose


def test_dashboards_are_the_guides_three_with_service_and_instance_variables():
    dashboards = {d["title"]: d for d in load_dashboards().values()}
    assert set(dashboards) == {
        "HEAN / Trading Performance",
        "HEAN / System Health",
        "HEAN / Execution Quality",
    }
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == 3
    for dashboard in dashboards.values():
        names = [v["name"] for v in dashboard["templating"]["list"]]
        assert names == ["service", "instance"]
        ids = [p["id"] for p in panels(dashboard)]
        assert len(ids) == len(set(ids))
        for panel in panels(dashboard):
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
            refs = [t["refId"] for t in panel.get("targets", [])]
            assert len(refs) == len(set(refs)), panel["title"]


def test_dashboards_show_what_the_guide_lists():
    metrics_by_dashboard: dict[str, set[str]] = {}
    for query in queries():
        metrics_by_dashboard.setdefault(query.dashboard, set()).update(metric_names(query.expr))
    trading = metrics_by_dashboard["HEAN / Trading Performance"]
    assert {"hean_pnl", "hean_trade_volume_total", "hean_win_rate", "hean_sharpe_ratio"} <= trading
    assert "hean_drawdown_ratio" in trading
    health = metrics_by_dashboard["HEAN / System Health"]
    assert {"hean_component_healthy", "hean_circuit_breaker_state"} <= health
    assert {"hean_eventbus_queue_size", "process_cpu_seconds_total"} <= health
    assert "process_resident_memory_bytes" in health
    execution = metrics_by_dashboard["HEAN / Execution Quality"]
    assert {"hean_order_fill_ratio_bucket", "hean_slippage_bps_bucket"} <= execution
    assert {"hean_latency_seconds_bucket", "hean_exchange_api_errors_total"} <= execution


def test_metric_names_reads_names_not_labels_or_functions():
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) "
        '(rate(hean_latency_seconds_bucket{service=~"a|b"}[30s])))'
        ' / on (instance) group_left max(up{job="x"} offset 5m) and hean_pnl > 0.8 * hean_equity'
    )
    assert metric_names(expr) == {"hean_latency_seconds_bucket", "up", "hean_pnl", "hean_equity"}
