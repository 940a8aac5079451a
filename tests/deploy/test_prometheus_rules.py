"""The Prometheus files through Debian's promtool: config, rules and the rules' unit tests."""

from __future__ import annotations

import subprocess

import yaml

from tests.deploy.tools import PROMETHEUS_DIR, SERVICES, tool


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = tool("promtool")
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, cwd=PROMETHEUS_DIR, timeout=120
    )


def test_promtool_check_config_accepts_prometheus_yml():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules_accepts_alerts_yml():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 19 rules found" in result.stdout


def test_promtool_test_rules_passes_alert_unit_tests():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_cover_the_issue_list_and_every_service():
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {
        "HeanServiceInstanceDown",
        "HeanServiceNoReplicaUp",
        "HeanCircuitBreakerOpen",
        "HeanEventQueueGrowing",
        "HeanDeadLetters",
        "HeanDailyDrawdownNearLimit",
        "HeanKillSwitchTriggered",
    } <= names
    absent = {
        r["labels"]["service"]: r["expr"] for r in rules if r["alert"] == "HeanServiceNoReplicaUp"
    }
    assert absent == {s: f'absent(up{{job="{s}"}} == 1)' for s in SERVICES}
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
