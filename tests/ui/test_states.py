"""The dashboard server on its own and the page's error states: gateway unreachable, Redis
down (a real gateway on a real Redis that the test stops), bad settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hean.core.settings import SettingsError, load_settings
from hean.ui.server import STATIC_DIR
from hean.ui.settings import UiSettings
from tests.conftest import RedisServer, free_port
from tests.ui.conftest import Browser, Child, get_json, start_child, start_ui, wait_until


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in reversed(started):
        child.stop()


def test_settings_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_URL", "ftp://gateway:8000")
    monkeypatch.setenv("UI_PORT", "70000")
    with pytest.raises(SettingsError) as info:
        load_settings(UiSettings)
    assert "GATEWAY_URL" in str(info.value)
    assert "UI_PORT" in str(info.value)


def test_settings_defaults_port_3000_and_local_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GATEWAY_URL", "UI_PORT", "UI_HOST"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(UiSettings)
    assert settings.ui_port == 3000
    assert settings.gateway_url == "http://localhost:8000"


def test_server_bad_setting_exits_2_with_one_line_naming_it(tmp_path: Path) -> None:
    env = {**os.environ, "UI_POLL_INTERVAL_S": "fast"}
    done = subprocess.run(
        [sys.executable, "-m", "hean.ui"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.startswith("ui: invalid settings: UI_POLL_INTERVAL_S")
    assert "Traceback" not in done.stderr


def test_static_page_references_only_local_assets() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs
    for ref in refs:
        assert ref.startswith("/static/") or ref == "data:,", ref
        if ref.startswith("/static/"):
            assert (STATIC_DIR / ref.removeprefix("/static/")).is_file(), ref


async def test_dashboard_gateway_unreachable_shows_banner(
    browser: Browser, children: list[Child], tmp_path: Path
) -> None:
    from playwright.async_api import expect

    closed = free_port()  # nothing listens here
    ui, url = start_ui(dict(os.environ), f"http://127.0.0.1:{closed}", tmp_path)
    children.append(ui)
    status, body = get_json(url + "/api/health")
    assert status == 502
    assert body["error"] == "gateway_unreachable"

    page = browser.page
    await page.goto(url)
    banner = page.locator("#gateway-banner")
    await expect(banner).to_be_visible()
    await expect(banner).to_contain_text(
        f"Gateway unreachable: cannot reach the gateway at http://127.0.0.1:{closed}"
    )
    await expect(page.locator("#stream-state")).to_have_attribute("data-state", "disconnected")
    await expect(page.locator("#fills-empty")).to_be_visible()
    await expect(page.locator("#equity-empty")).to_be_visible()


async def test_dashboard_redis_down_shows_degraded_banner(
    browser: Browser,
    children: list[Child],
    redis_factory: Callable[..., RedisServer],
    tmp_path: Path,
) -> None:
    from playwright.async_api import expect

    redis = redis_factory()
    gateway_port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis.url,
        "PYTHONUNBUFFERED": "1",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(gateway_port),
        "HEALTH_HOST": "127.0.0.1",
        "HEALTH_PORT": str(free_port()),
        "HEALTH_INTERVAL_S": "1",
    }
    gateway = start_child("gateway", [sys.executable, "-m", "hean.gateway"], env, tmp_path)
    children.append(gateway)
    gateway_url = f"http://127.0.0.1:{gateway_port}"

    def gateway_reports_itself() -> bool:
        _status, body = get_json(gateway_url + "/health")
        return bool(body) and "api-gateway" in body.get("services", {})

    wait_until(gateway_reports_itself, timeout=60, message="the gateway", alive=gateway.check_alive)
    ui, url = start_ui(dict(os.environ), gateway_url, tmp_path)
    children.append(ui)

    page = browser.page
    await page.goto(url)
    row = page.locator("#services-table tr[data-service='api-gateway']")
    await expect(row).to_be_visible()
    # Only the gateway runs: the other seven show as down, the system as unhealthy.
    await expect(page.locator("#services-table tr[data-service='risk']")).to_contain_text(
        "risk is down"
    )
    await expect(page.locator("#overall-state")).to_have_attribute("data-state", "unhealthy")
    await expect(page.locator("#redis-banner")).to_be_hidden()

    redis.stop()
    banner = page.locator("#redis-banner")
    await expect(banner).to_be_visible(timeout=30_000)
    await expect(banner).to_contain_text("Redis is unreachable")
    await expect(page.locator("#overall-state")).to_contain_text("Redis unreachable")
    await expect(page.locator("#gateway-banner")).to_be_hidden()
