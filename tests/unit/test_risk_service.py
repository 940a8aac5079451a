"""Risk wiring over the in-memory bus (no Redis): signal to decision, kill switch events."""

from __future__ import annotations

from decimal import Decimal

import pytest

from hean.core.bus import EventBus
from hean.core.settings import SettingsError, load_settings
from hean.core.types import Event, EventType
from hean.risk.risk_governor import RiskGovernor, RiskLimits
from hean.risk.service import RiskService, RiskServiceSettings

D = Decimal


async def _wired():
    bus = EventBus()
    seen: dict[EventType, list[Event]] = {}
    for etype in (
        EventType.ORDER_REQUEST,
        EventType.ORDER_APPROVED,
        EventType.ORDER_REJECTED,
        EventType.KILLSWITCH_TRIGGERED,
    ):
        seen[etype] = []
        bus.subscribe(etype, seen[etype].append, name=f"test.{etype.value}")
    gov = RiskGovernor(
        RiskLimits(max_position_size=D(5000), max_leverage=D(3), daily_drawdown_limit=D("0.05")),
        starting_equity=D(10000),
    )
    svc = RiskService(bus, gov)
    await svc.start()
    await bus.start()
    await bus.publish(Event(event_type=EventType.TICK, data={"symbol": "BTC/USDT", "price": "100"}))
    await bus.flush(5)
    return bus, svc, seen


def buy_signal() -> Event:
    return Event(
        event_type=EventType.SIGNAL,
        data={"symbol": "BTC/USDT", "side": "BUY", "signal_strength": 0.7},
    )


async def test_risk_service_signal_becomes_request_then_approval():
    bus, _svc, seen = await _wired()
    await bus.publish(buy_signal())
    await bus.flush(5)
    assert len(seen[EventType.ORDER_REQUEST]) == 1
    assert len(seen[EventType.ORDER_APPROVED]) == 1
    approved = seen[EventType.ORDER_APPROVED][0].data
    assert approved["order_id"] == seen[EventType.ORDER_REQUEST][0].data["order_id"]
    assert approved["size"] == D(10)
    await bus.stop()


async def test_risk_service_redelivered_signal_decided_once():
    bus, _svc, seen = await _wired()
    signal = buy_signal()
    await bus.publish(signal)
    await bus.flush(5)
    await bus.publish(signal)  # the same event again (at-least-once delivery)
    await bus.flush(5)
    assert len(seen[EventType.ORDER_REQUEST]) == 1
    assert len(seen[EventType.ORDER_APPROVED]) == 1
    await bus.stop()


async def test_risk_service_fill_with_nothing_remaining_releases_the_reservation():
    bus, svc, seen = await _wired()
    await bus.publish(buy_signal())
    await bus.flush(5)
    order_id = seen[EventType.ORDER_APPROVED][0].data["order_id"]  # size 10
    fill = {
        "order_id": order_id,
        "fill_id": "f1",
        "symbol": "BTC/USDT",
        "side": "BUY",
        "fill_price": "100",
        "filled_qty": "9.9",  # execution rounded the size down to the venue's step
        "remaining_qty": "0",
    }
    await bus.publish(Event(event_type=EventType.ORDER_FILLED, data=fill))
    await bus.flush(5)
    assert svc.governor.worst_case_notional("BTC/USDT", D(100)) == D(990)
    await bus.stop()


async def test_risk_service_drawdown_pnl_update_publishes_killswitch_and_rejects():
    bus, svc, seen = await _wired()
    pnl = {"total_pnl": "-600", "realized_pnl": "-600", "unrealized_pnl": "0", "equity": "9400"}
    await bus.publish(Event(event_type=EventType.PNL_UPDATE, data=pnl))
    await bus.flush(5)
    assert len(seen[EventType.KILLSWITCH_TRIGGERED]) == 1
    assert "daily drawdown" in seen[EventType.KILLSWITCH_TRIGGERED][0].data["reason"]
    assert svc.health_check()["state"] == "degraded"
    await bus.publish(
        Event(
            event_type=EventType.ORDER_REQUEST,
            data={"id": "manual-1", "symbol": "BTC/USDT", "side": "BUY", "size": "1"},
        )
    )
    await bus.flush(5)
    rejected = seen[EventType.ORDER_REJECTED]
    assert [r.data["order_id"] for r in rejected] == ["manual-1"]
    assert "kill switch active" in rejected[0].data["reason"]
    await bus.stop()


async def test_risk_service_trigger_command_twice_announces_once():
    bus, svc, seen = await _wired()
    assert await svc.trigger_kill_switch("operator", 1)
    assert not await svc.trigger_kill_switch("operator again", 2)
    await bus.flush(5)
    assert len(seen[EventType.KILLSWITCH_TRIGGERED]) == 1
    assert seen[EventType.KILLSWITCH_TRIGGERED][0].data["timestamp"] == 1
    await bus.stop()


def test_risk_settings_bad_kelly_fraction_names_variable(monkeypatch):
    monkeypatch.setenv("KELLY_FRACTION", "1.5")
    with pytest.raises(SettingsError, match="KELLY_FRACTION"):
        load_settings(RiskServiceSettings)


@pytest.mark.parametrize("value", ["1", "0", "1.5", "-0.1", "nan", "twenty"])
def test_risk_settings_bad_max_drawdown_limit_names_variable(monkeypatch, value):
    monkeypatch.setenv("MAX_DRAWDOWN_LIMIT", value)
    with pytest.raises(SettingsError, match="MAX_DRAWDOWN_LIMIT"):
        load_settings(RiskServiceSettings)


def test_risk_settings_max_drawdown_limit_off_unless_set(monkeypatch):
    monkeypatch.delenv("MAX_DRAWDOWN_LIMIT", raising=False)
    assert load_settings(RiskServiceSettings).limits().max_drawdown_limit is None
    monkeypatch.setenv("MAX_DRAWDOWN_LIMIT", "")  # `NAME=` as in .env.example: the default
    assert load_settings(RiskServiceSettings).limits().max_drawdown_limit is None
    monkeypatch.setenv("MAX_DRAWDOWN_LIMIT", "0.2")
    assert load_settings(RiskServiceSettings).limits().max_drawdown_limit == Decimal("0.2")
