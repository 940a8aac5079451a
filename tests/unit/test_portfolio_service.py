"""Portfolio wiring over the in-memory bus: fills and ticks in, PNL_UPDATE out."""

from __future__ import annotations

from decimal import Decimal

from hean.core.bus import EventBus
from hean.core.types import Event, EventType
from hean.portfolio.core import Portfolio
from hean.portfolio.service import PortfolioService

D = Decimal
SECOND = 1_000_000_000


async def _wired(interval_ms: int = 1000):
    bus = EventBus()
    updates: list[Event] = []
    bus.subscribe(EventType.PNL_UPDATE, updates.append)
    svc = PortfolioService(bus, Portfolio(D(10000)), publish_interval_ms=interval_ms)
    await svc.start()
    await bus.start()
    return bus, svc, updates


def _fill(fill_id: str, side: str = "BUY", qty: str = "1", price: str = "100") -> Event:
    return Event(
        event_type=EventType.ORDER_FILLED,
        data={
            "order_id": "o1",
            "fill_id": fill_id,
            "symbol": "BTC/USDT",
            "side": side,
            "filled_qty": qty,
            "fill_price": price,
            "fee": "0.1",
        },
    )


def _tick(price: str, t_s: int) -> Event:
    return Event(
        event_type=EventType.TICK,
        data={"symbol": "BTC/USDT", "price": price},
        timestamp=t_s * SECOND,
    )


async def test_portfolio_service_fill_publishes_pnl_update_with_equity_and_positions():
    bus, _svc, updates = await _wired()
    await bus.publish(_fill("f1"))
    await bus.flush(5)
    assert len(updates) == 1
    data = updates[0].data
    assert data["equity"] == D("9999.9")
    assert data["fees"] == D("0.1")
    assert data["positions"]["BTC/USDT"]["qty"] == D(1)
    await bus.stop()


async def test_portfolio_service_duplicate_fill_publishes_nothing_more():
    bus, svc, updates = await _wired()
    await bus.publish(_fill("f1"))
    await bus.publish(_fill("f1"))
    await bus.flush(5)
    assert len(updates) == 1
    assert svc.portfolio.positions["BTC/USDT"].qty == D(1)
    await bus.stop()


async def test_portfolio_service_ticks_throttled_by_event_time():
    bus, _svc, updates = await _wired(interval_ms=1000)
    await bus.publish(_fill("f1"))
    await bus.flush(5)
    fill_time = updates[0].timestamp
    base = fill_time // SECOND + 10
    for i, price in enumerate(["101", "102", "103"]):
        await bus.publish(_tick(price, base) if i < 2 else _tick(price, base + 2))
    await bus.flush(5)
    marks = [u for u in updates if u.data["reason"] == "mark"]
    # first tick publishes, the second (same second) is throttled, the third is 2 s later
    assert [m.data["unrealized_pnl"] for m in marks] == [D(1), D(3)]
    await bus.stop()


async def test_portfolio_service_marks_go_on_after_the_clock_steps_back():
    bus, _svc, updates = await _wired(interval_ms=1000)
    await bus.publish(_fill("f1"))
    await bus.flush(5)
    base = updates[0].timestamp // SECOND + 10
    ticks = [("101", base), ("102", base - 60), ("103", base - 60), ("104", base - 58)]
    for price, t_s in ticks:  # the clock went back a minute after the first
        await bus.publish(_tick(price, t_s))
    await bus.flush(5)
    marks = [u for u in updates if u.data["reason"] == "mark"]
    # a late event (less than an interval back) would not publish; a clock a minute back
    # does, and the throttle goes on from there
    assert [m.data["unrealized_pnl"] for m in marks] == [D(1), D(2), D(4)]
    await bus.stop()


async def test_portfolio_service_tick_without_position_publishes_nothing():
    bus, _svc, updates = await _wired()
    await bus.publish(_tick("100", 1))
    await bus.flush(5)
    assert updates == []
    await bus.stop()
