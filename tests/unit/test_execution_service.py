"""Execution wiring over the in-memory bus: approvals to placements, fills, cancels, rejects."""

from __future__ import annotations

from decimal import Decimal

import pytest

from hean.core.bus import EventBus
from hean.core.errors import TransientError
from hean.core.settings import SettingsError, load_settings
from hean.core.types import Event, EventType
from hean.execution import service as service_module
from hean.execution.exchange import ChildOrder, MarketRules, OrderRefusedError, PlaceResult
from hean.execution.ledger import MemoryLedger
from hean.execution.paper import PaperConfig, PaperExchange
from hean.execution.service import ExecutionService, ExecutionSettings

D = Decimal
S = 1_000_000_000
BTC = MarketRules("BTC/USDT", tick_size=D("0.1"), qty_step=D("0.001"), min_qty=D("0.001"))
WATCHED = (
    EventType.ORDER_PLACED,
    EventType.ORDER_FILLED,
    EventType.ORDER_CANCELLED,
    EventType.ORDER_REJECTED,
)


async def _wired(exchange=None, ledger=None):
    bus = EventBus()
    seen: dict[EventType, list[Event]] = {t: [] for t in WATCHED}
    for etype in WATCHED:
        bus.subscribe(etype, seen[etype].append, name=f"test.{etype.value}")
    exchange = exchange or PaperExchange(PaperConfig(markets={"BTC/USDT": BTC}))
    svc = ExecutionService(bus, exchange, ledger=ledger or MemoryLedger())
    await svc.start()
    await bus.start()
    await tick(bus, "100", 0)
    return bus, svc, seen


async def tick(bus: EventBus, price: str, t_s: float) -> None:
    await bus.publish(
        Event(
            event_type=EventType.TICK,
            data={"symbol": "BTC/USDT", "price": price},
            timestamp=int(t_s * S),
        )
    )
    await bus.flush(5)


def approved(order_id="o1", size="1", t_s: float = 1, **extra) -> Event:
    data = {"order_id": order_id, "symbol": "BTC/USDT", "side": "BUY", "size": size, **extra}
    return Event(
        event_type=EventType.ORDER_APPROVED, source="risk:test", data=data, timestamp=int(t_s * S)
    )


async def test_execution_market_order_placed_and_filled_with_fill_fields():
    bus, _svc, seen = await _wired()
    await bus.publish(approved())
    await bus.flush(5)
    (placed,) = seen[EventType.ORDER_PLACED]
    (filled,) = seen[EventType.ORDER_FILLED]
    assert placed.data["client_order_id"] == "o1-1"
    for key in ("order_id", "fill_price", "filled_qty", "fee", "fill_id", "symbol", "side"):
        assert key in filled.data
    assert filled.data["filled_qty"] == D(1)
    assert filled.data["slippage_bps"] >= 0
    await bus.stop()


async def test_execution_redelivered_approval_places_nothing_more():
    bus, _svc, seen = await _wired()
    event = approved()
    await bus.publish(event)
    await bus.publish(event)
    await bus.flush(5)
    assert len(seen[EventType.ORDER_PLACED]) == 1
    assert len(seen[EventType.ORDER_FILLED]) == 1
    await bus.stop()


async def test_execution_twap_children_follow_market_time():
    bus, svc, seen = await _wired()
    await bus.publish(approved(size="1", type="twap", slices=2, duration_s=10, t_s=1))
    await bus.flush(5)
    assert len(seen[EventType.ORDER_PLACED]) == 1
    await tick(bus, "101", 3)
    assert len(seen[EventType.ORDER_PLACED]) == 1
    await tick(bus, "102", 6)
    assert len(seen[EventType.ORDER_PLACED]) == 2
    assert sum(f.data["filled_qty"] for f in seen[EventType.ORDER_FILLED]) == D(1)
    assert svc.parents == {}
    await bus.stop()


async def test_finished_orders_past_the_memory_take_only_their_own_children_along(monkeypatch):
    monkeypatch.setattr(service_module, "FINISHED_MEMORY", 2)
    bus, svc, seen = await _wired()
    await bus.publish(approved("twap", size="1", type="twap", slices=2, duration_s=10, t_s=1))
    await bus.flush(5)
    await tick(bus, "102", 6)  # the second slice: two children, both filled
    for order_id in ("m1", "m2"):
        await bus.publish(approved(order_id, size="1", t_s=7))
        await bus.flush(5)
    assert len(seen[EventType.ORDER_FILLED]) == 4
    # Three finished, two remembered: the oldest is forgotten with both its children, and
    # the others' children still map to their orders (a late fill is still reported).
    assert list(svc._finished) == ["m1", "m2"]
    assert svc._child_parent == {"m1-1": "m1", "m2-1": "m2"}
    await bus.stop()


async def test_execution_approval_made_before_the_kill_switch_is_not_placed_after_it():
    bus, _svc, seen = await _wired()
    trigger = {"reason": "drawdown", "timestamp": 5 * S}
    await bus.publish(
        Event(event_type=EventType.KILLSWITCH_TRIGGERED, data=trigger, timestamp=5 * S)
    )
    await bus.flush(5)
    await bus.publish(approved("late", t_s=4))  # approved at 4 s, arriving after the switch
    await bus.publish(approved("after", t_s=6))  # approved after it (a reducing order)
    await bus.flush(5)
    (rejected,) = seen[EventType.ORDER_REJECTED]
    assert rejected.data["order_id"] == "late"
    assert rejected.data["rejected_by"] == "execution"
    assert "kill switch triggered after it was approved" in rejected.data["reason"]
    assert [e.data["order_id"] for e in seen[EventType.ORDER_FILLED]] == ["after"]
    await bus.stop()


async def test_execution_killswitch_cancels_working_algorithms_and_resting_orders():
    bus, svc, seen = await _wired()
    await bus.publish(approved("lim", type="limit", price="90"))
    await bus.publish(approved("twap", type="twap", slices=5, duration_s=60))
    await bus.flush(5)
    await bus.publish(
        Event(
            event_type=EventType.KILLSWITCH_TRIGGERED,
            data={"reason": "drawdown", "timestamp": 1},
        )
    )
    await bus.flush(5)
    cancelled = {e.data["order_id"]: e.data for e in seen[EventType.ORDER_CANCELLED]}
    assert set(cancelled) == {"lim", "twap"}
    assert cancelled["lim"]["reason"] == "kill switch: drawdown"
    assert cancelled["twap"]["remaining_qty"] == D("0.8")
    assert await svc.exchange.open_client_order_ids() == []
    await tick(bus, "80", 120)  # price through the old limit, time past the old TWAP
    assert len(seen[EventType.ORDER_PLACED]) == 2
    await bus.stop()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"symbol": "NOPE/USDT"}, "unknown symbol NOPE/USDT"),
        ({"size": "0.0001"}, "below minimum"),
        ({"type": "limit", "price": "99.95"}, "tick size"),
    ],
)
async def test_execution_bad_order_rejected_with_exchange_reason(data, reason):
    bus, svc, seen = await _wired()
    event = approved()
    event = Event(
        event_type=EventType.ORDER_APPROVED, source="risk:test", data={**dict(event.data), **data}
    )
    await bus.publish(event)
    await bus.flush(5)
    (rejected,) = seen[EventType.ORDER_REJECTED]
    assert reason in rejected.data["reason"]
    assert rejected.data["rejected_by"] == "exchange:paper"
    assert seen[EventType.ORDER_PLACED] == []
    assert await svc.ledger.open_orders() == {}
    await bus.stop()


class FlakyExchange(PaperExchange):
    def __init__(self, failures: int) -> None:
        super().__init__(PaperConfig(markets={"BTC/USDT": BTC}))
        self.failures = failures

    async def place(self, child: ChildOrder, now_ns: int) -> PlaceResult:
        if self.failures > 0:
            self.failures -= 1
            raise TransientError("exchange timeout")
        return await super().place(child, now_ns)


class RefusingSecondChild(PaperExchange):
    """Takes the first child of an order and refuses the next (the balance ran out)."""

    def __init__(self) -> None:
        super().__init__(PaperConfig(markets={"BTC/USDT": BTC}))
        self.cancelled: list[str] = []

    async def place(self, child: ChildOrder, now_ns: int) -> PlaceResult:
        if not child.client_order_id.endswith("-1"):
            raise OrderRefusedError("insufficient balance")
        return await super().place(child, now_ns)

    async def cancel(self, client_order_id: str, now_ns: int, symbol: str | None = None) -> D:
        self.cancelled.append(client_order_id)
        return await super().cancel(client_order_id, now_ns, symbol)


async def test_execution_child_refused_mid_algorithm_cancels_the_children_still_open():
    exchange = RefusingSecondChild()
    bus, _svc, seen = await _wired(exchange=exchange)
    # A TWAP of limit slices below the market: the first rests, the second is refused.
    order = approved("tw", size="2", type="twap", slices=2, duration_s=10, price="90", t_s=1)
    await bus.publish(order)
    await bus.flush(5)
    await tick(bus, "100", 7)
    (cancelled,) = seen[EventType.ORDER_CANCELLED]
    assert "insufficient balance" in cancelled.data["reason"]
    assert exchange.cancelled == ["tw-1"]  # not left resting on the venue
    await tick(bus, "80", 8)  # through the old limit: nothing rests there to fill
    assert seen[EventType.ORDER_FILLED] == []
    await bus.stop()


async def test_execution_transient_failure_releases_claim_so_retry_places_once():
    bus, _svc, seen = await _wired(exchange=FlakyExchange(failures=1))
    await bus.publish(approved())
    await bus.flush(10)  # the in-memory bus retries the failed handler
    assert len(seen[EventType.ORDER_PLACED]) == 1
    assert len(seen[EventType.ORDER_FILLED]) == 1
    await bus.stop()


async def test_execution_restart_with_open_order_reconciles_as_cancelled():
    ledger = MemoryLedger()
    await ledger.claim("left-over", "BTC/USDT", "1")
    await ledger.record_fill("left-over", "0.4")
    bus, _svc, seen = await _wired(ledger=ledger)
    (cancelled,) = seen[EventType.ORDER_CANCELLED]
    assert cancelled.data["order_id"] == "left-over"
    assert "execution restarted" in cancelled.data["reason"]
    assert await ledger.open_orders() == {}
    assert not await ledger.claim("left-over", "BTC/USDT", "1")
    await bus.stop()


def test_execution_settings_unknown_exchange_names_variable(monkeypatch):
    monkeypatch.setenv("EXCHANGE", "nosuchvenue")
    with pytest.raises(SettingsError, match="EXCHANGE"):
        load_settings(ExecutionSettings)


def test_execution_settings_live_exchange_without_keys_refused(monkeypatch):
    monkeypatch.setenv("EXCHANGE", "bybit")
    monkeypatch.delenv("API_KEY", raising=False)
    with pytest.raises(SettingsError, match="API_KEY"):
        load_settings(ExecutionSettings)


def test_execution_settings_live_exchange_config_keeps_secret_out_of_repr(monkeypatch):
    monkeypatch.setenv("EXCHANGE", "Bybit")
    monkeypatch.setenv("API_KEY", "k")
    monkeypatch.setenv("API_SECRET", "very-secret-value")
    settings = load_settings(ExecutionSettings)
    assert settings.ccxt_config().exchange_id == "bybit"
    assert "very-secret-value" not in repr(settings)


def test_execution_settings_paper_markets_from_json(monkeypatch):
    monkeypatch.setenv("PAPER_MARKETS", '{"BTC/USDT": {"tick_size": "0.5", "min_qty": "0.01"}}')
    cfg = load_settings(ExecutionSettings).paper_config()
    assert cfg.markets["BTC/USDT"].tick_size == D("0.5")
    assert cfg.markets["BTC/USDT"].min_qty == D("0.01")
