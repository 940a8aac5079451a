"""The dashboard in a real browser against the real system (`hean up`, gateway, UI server).

Tests run in file order on one system: the kill switch is refused before it is triggered,
and the triggering test resets it through the dashboard again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from tests.helpers import eventually
from tests.ui.conftest import SERVICES, Browser, System

TIMEOUT_MS = 90_000


async def fill_ids(browser: Browser) -> set[str]:
    rows = browser.page.locator("#fills-table tbody tr")
    return {str(await rows.nth(i).get_attribute("data-fill-id")) for i in range(await rows.count())}


async def chart_points(browser: Browser) -> int:
    return int(await browser.page.locator("#equity-chart").get_attribute("data-points") or 0)


async def test_dashboard_health_panel_lists_all_eight_services(
    system: System, browser: Browser
) -> None:
    from playwright.async_api import expect

    page = browser.page
    await page.goto(system.ui_url)
    rows = page.locator("#services-table tbody tr[data-service]")
    await expect(rows).to_have_count(len(SERVICES), timeout=TIMEOUT_MS)
    shown = {await rows.nth(i).get_attribute("data-service") for i in range(len(SERVICES))}
    assert shown == set(SERVICES)
    assert set(system.gateway("/health")["services"]) == shown
    # Every service has live instances with components listed (not only a name).
    for name in SERVICES:
        row = page.locator(f'#services-table tr[data-service="{name}"]')
        await expect(row.locator(".instances")).to_contain_text("up ")
        await expect(row.locator(".component").first).to_contain_text("breaker")
    await expect(page.locator("#overall-state")).to_contain_text("8/8 services up")
    await expect(page.locator("#streams-table tr[data-type='TICK']")).to_be_visible()
    await expect(page.locator("#gateway-banner")).to_be_hidden()


async def test_dashboard_equity_chart_and_fills_fill_up_as_trades_happen(
    system: System, browser: Browser, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    page = browser.page
    await page.goto(system.ui_url)
    await expect(page.locator("#stream-state")).to_have_attribute("data-state", "live")
    await expect(page.locator("#fills-table tbody tr").first).to_be_visible(timeout=TIMEOUT_MS)
    first_fills = await fill_ids(browser)
    first_points = await chart_points(browser)

    # The same page, never reloaded: new fills and equity points arrive live.
    async def more_fills() -> bool:
        return bool(await fill_ids(browser) - first_fills)

    async def more_points() -> bool:
        return await chart_points(browser) > first_points

    await eventually(more_fills, timeout=120, interval=0.2, message="a new fill on the page")
    await eventually(more_points, timeout=60, interval=0.2, message="new equity points")
    assert await page.locator("#equity-chart canvas").count() >= 1

    # What the page shows is what the gateway has: fills by id, slippage, P&L figures.
    gateway_fills = system.gateway("/fills?count=200")["fills"]
    by_id = {f["data"]["fill_id"]: f["data"] for f in gateway_fills}
    shown = await fill_ids(browser)
    assert shown and shown <= set(by_id), shown - set(by_id)
    fill_id = sorted(shown)[0]
    row = page.locator(f'#fills-table tr[data-fill-id="{fill_id}"]')
    slippage = float(by_id[fill_id]["slippage_bps"])
    await expect(row).to_contain_text(f"{slippage:.2f}")
    await expect(page.locator("#fig-equity")).to_have_text(re.compile(r"^\d{1,3}(,\d{3})*\.\d\d$"))
    await expect(page.locator("#fig-fees")).not_to_have_text("-")
    await expect(page.locator("#signals-table tr[data-symbol='BTC/USDT']")).to_be_visible()
    await expect(page.locator("#orders-table tbody tr").first).to_be_visible()
    await expect(page.locator("#killswitch-banner")).to_be_hidden()
    assert browser.errors == []

    docs_shot = os.environ.get("HEAN_UI_SCREENSHOT")
    if docs_shot:
        # For docs/ui-screenshot.png: let some history build up first.
        async def history() -> bool:
            return len(await fill_ids(browser)) >= 12 and await chart_points(browser) >= 60

        await eventually(history, timeout=300, interval=0.5, message="a screenful of history")
    shot = Path(docs_shot or tmp_path / "ui-screenshot.png")
    png = await page.screenshot(path=str(shot), full_page=False)
    assert len(png) > 10_000


async def test_dashboard_killswitch_without_token_is_refused_with_message(
    system: System, browser: Browser
) -> None:
    from playwright.async_api import expect

    page = browser.page
    await page.goto(system.ui_url)
    await expect(page.locator("#killswitch-state")).to_have_attribute("data-active", "false")

    await page.click("#ks-trigger")
    await expect(page.locator("#ks-dialog")).to_be_visible()
    await page.click("#ks-confirm")  # no token typed
    result = page.locator("#ks-result")
    await expect(result).to_contain_text("Refused by the gateway (HTTP 401)")
    await expect(result).to_contain_text("Authorization: Bearer")

    await page.click("#ks-trigger")
    await page.fill("#ks-token", "not-the-token")
    await page.click("#ks-confirm")
    await expect(result).to_contain_text("invalid token")

    assert system.gateway("/killswitch")["active"] is False
    await expect(page.locator("#killswitch-banner")).to_be_hidden()
    await expect(page.locator("#killswitch-state")).to_have_attribute("data-active", "false")


async def test_dashboard_killswitch_with_token_shows_on_in_banner_and_health_then_resets(
    system: System, browser: Browser, ui_log: Callable[[], str]
) -> None:
    from playwright.async_api import expect

    page = browser.page
    await page.goto(system.ui_url)
    await expect(page.locator("#services-table tr[data-service='risk']")).to_be_visible()

    # Cancelling the confirmation sends nothing.
    await page.click("#ks-trigger")
    await page.fill("#ks-token", system.token)
    await page.click("#ks-cancel")
    await expect(page.locator("#ks-dialog")).to_be_hidden()
    assert system.gateway("/killswitch")["active"] is False

    await page.click("#ks-trigger")
    await page.fill("#ks-reason", "ui test: halt trading")
    await page.fill("#ks-token", system.token)
    await page.click("#ks-confirm")
    await expect(page.locator("#ks-result")).to_contain_text("applied by risk")
    banner = page.locator("#killswitch-banner")
    await expect(banner).to_be_visible()
    await expect(banner).to_contain_text("ui test: halt trading")
    await expect(page.locator("#killswitch-state")).to_have_text("ON")
    assert system.gateway("/killswitch")["active"] is True

    # Health (risk's own snapshot, through the gateway) shows it too.
    risk = page.locator("#services-table tr[data-service='risk']")
    await expect(risk).to_have_attribute("data-state", "degraded", timeout=30_000)
    await expect(risk).to_contain_text("kill switch active")
    await expect(page.locator("#overall-state")).to_have_attribute("data-state", "degraded")

    # Reset with the token this tab kept in memory (the field left empty).
    await page.click("#ks-reset")
    await page.click("#ks-confirm")
    await expect(page.locator("#ks-result")).to_contain_text("reset: applied by risk")
    await expect(banner).to_be_hidden()
    assert system.gateway("/killswitch")["active"] is False
    await expect(risk).to_have_attribute("data-state", "healthy", timeout=30_000)

    log = ui_log()
    assert "/api/killswitch/trigger" in log  # the access log is on ...
    assert system.token not in log  # ... and never shows the token
