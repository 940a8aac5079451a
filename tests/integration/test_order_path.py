"""The order path on a real Redis: risk, execution and portfolio each on its own
`EventBus.redis` (own consumer group), as in production but in one test process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.event_streams import DLQ_STREAM, RedisEventStream, stream_key
from hean.core.resp import RespConnection
from hean.core.service import ServiceContext, serve
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType
from hean.execution.exchange import MarketRules
from hean.execution.ledger import OPEN_ORDERS_KEY, ORDER_KEY_PREFIX, MemoryLedger, RedisLedger
from hean.execution.paper import PaperConfig, PaperExchange
from hean.execution.service import ExecutionService
from hean.portfolio.core import Portfolio
from hean.portfolio.service import PortfolioService
from hean.risk.risk_governor import NS_PER_DAY, RiskGovernor, RiskLimits
from hean.risk.service import COMMAND_STREAM, KILLSWITCH_KEY, RiskService, RiskServiceSettings
from hean.risk.service import build as risk_build
from tests.conftest import RedisServer, free_port
from tests.helpers import dead_letter
from tests.integration.signal_path_helpers import FAST, drained

D = Decimal
BTC = MarketRules("BTC/USDT", tick_size=D("0.1"), qty_step=D("0.001"), min_qty=D("0.001"))


def bus_for(url: str, service: str, instance: str = "1") -> EventBus:
    settings = CoreSettings(
        REDIS_URL=url,
        SERVICE_NAME=service,
        INSTANCE_ID=instance,
        EVENT_BLOCK_MS=50,
        EVENT_RETRY_DELAY_MS=50,
    )
    return EventBus.redis(settings)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {result!r})")
        await asyncio.sleep(0.02)


async def events(url: str, etype: EventType) -> list[Event]:
    async with RedisEventStream(url) as stream:
        return [e async for e in stream.replay_events(etype)]


def governor() -> RiskGovernor:
    limits = RiskLimits(
        max_position_size=D(5000), max_leverage=D(3), daily_drawdown_limit=D("0.05")
    )
    return RiskGovernor(limits, starting_equity=D(10000))


async def start_risk(
    url: str, client: aioredis.Redis, instance: str = "1", gov: RiskGovernor | None = None
):
    bus = bus_for(url, "risk", instance)
    svc = RiskService(
        bus, gov or governor(), redis=client, redis_url=url, consumer=f"risk:{instance}",
        command_block_ms=50,
    )  # fmt: skip
    await svc.start()
    await bus.start()
    return bus, svc


async def start_execution(url: str, client: aioredis.Redis, instance: str = "1"):
    bus = bus_for(url, "execution", instance)
    exchange = PaperExchange(PaperConfig(markets={"BTC/USDT": BTC}))
    ledger = RedisLedger(client, fast=RespConnection(url))
    svc = ExecutionService(bus, exchange, ledger=ledger, market_history=client)
    await svc.start()
    await bus.start()
    return bus, svc


async def start_portfolio(url: str, client: aioredis.Redis, instance: str = "1"):
    bus = bus_for(url, "portfolio", instance)
    svc = PortfolioService(
        bus,
        Portfolio(D(10000)),
        publish_interval_ms=0,
        history=RedisEventStream(url, client=client),
        group="portfolio",
    )
    await svc.start()
    await bus.start()
    return bus, svc


async def publish(url: str, *evts: Event) -> None:
    bus = bus_for(url, "test-source")
    await bus.start()
    for e in evts:
        await bus.publish(e)
    await bus.flush(5)
    await bus.stop()


def tick(price: str) -> Event:
    return Event(event_type=EventType.TICK, data={"symbol": "BTC/USDT", "price": price})


async def test_order_path_signal_becomes_fill_and_pnl_update(redis_url, redis_client):
    running = [
        await start_risk(redis_url, redis_client),
        await start_execution(redis_url, redis_client),
        await start_portfolio(redis_url, redis_client),
    ]
    try:
        await publish(redis_url, tick("100"))
        _, execution = running[1]
        await eventually(lambda: _true(execution.exchange.rules("BTC/USDT") is not None))
        risk_gov = running[0][1].governor
        await eventually(lambda: _true("BTC/USDT" in risk_gov.marks))
        signal = Event(
            event_type=EventType.SIGNAL,
            data={"symbol": "BTC/USDT", "side": "BUY", "signal_strength": 0.7},
        )
        await publish(redis_url, signal)

        async def position() -> Any:
            for update in await events(redis_url, EventType.PNL_UPDATE):
                pos = update.data["positions"].get("BTC/USDT")
                if pos and Decimal(pos["qty"]) > 0:
                    return update
            return None

        update = await eventually(position)
        fills = await events(redis_url, EventType.ORDER_FILLED)
        assert len(fills) == 1
        assert fills[0].data["order_id"] == f"o{signal.event_id}"
        assert Decimal(update.data["positions"]["BTC/USDT"]["qty"]) == D(10)
        assert Decimal(update.data["fees"]) == Decimal(fills[0].data["fee"])
        # the fill carries the signal's correlation id through risk and execution
        assert fills[0].correlation_id == signal.event_id
        # Risk decided the order as it sized it; the request is in its stream all the same,
        # and read back by risk it is acked without a second decision.
        requests = await events(redis_url, EventType.ORDER_REQUEST)
        assert [r.data["order_id"] for r in requests] == [f"o{signal.event_id}"]
        await eventually(lambda: _all_acked(redis_client, EventType.ORDER_REQUEST, "risk", 1))
        approvals = await events(redis_url, EventType.ORDER_APPROVED)
        assert [a.data["order_id"] for a in approvals] == [f"o{signal.event_id}"]
        assert approvals[0].correlation_id == signal.event_id

        # An order request from anyone else (the guide's manual orders) is decided when
        # risk reads it.
        manual = Event(
            event_type=EventType.ORDER_REQUEST,
            data={"order_id": "manual-1", "symbol": "BTC/USDT", "side": "SELL", "size": "2"},
        )
        await publish(redis_url, manual)

        async def manual_filled() -> bool:
            fills = await events(redis_url, EventType.ORDER_FILLED)
            return any(f.data["order_id"] == "manual-1" for f in fills)

        await eventually(manual_filled)
        approvals = await events(redis_url, EventType.ORDER_APPROVED)
        assert [a.data["order_id"] for a in approvals] == [f"o{signal.event_id}", "manual-1"]
    finally:
        for bus, svc in reversed(running):
            await bus.stop()
            stop = getattr(svc, "stop", None)
            if stop is not None:
                await stop()


async def _true(value: bool) -> bool:
    return value


async def _all_acked(client: aioredis.Redis, etype: EventType, group: str, count: int) -> bool:
    """`group` has read `count` entries of the stream and has none pending."""
    for info in await client.xinfo_groups(stream_key(etype)):
        if info["name"] == group.encode():
            return bool(info["entries-read"] == count and info["pending"] == 0)
    return False


async def test_order_path_redelivered_approval_after_restart_places_once(redis_url, redis_client):
    await publish(redis_url, tick("100"))
    order = Event(
        event_type=EventType.ORDER_APPROVED,
        source="risk:test",
        data={"order_id": "dup-1", "symbol": "BTC/USDT", "side": "BUY", "size": "1"},
    )
    bus, svc = await start_execution(redis_url, redis_client, "a")
    await publish(redis_url, tick("100"), order)
    await eventually(lambda: _count(redis_url, EventType.ORDER_FILLED, 1))
    # The ledger's fill and finish go with the approval's ack (after the events are in).
    await eventually(lambda: _acked_and_finished(redis_client, "dup-1"))
    await bus.stop()
    await svc.stop()
    # a new process (new consumer) sees the same approval again
    bus, svc = await start_execution(redis_url, redis_client, "b")
    await publish(redis_url, tick("100"), order)
    await eventually(lambda: _group_done(redis_client, EventType.ORDER_APPROVED, "execution"))
    placed = await events(redis_url, EventType.ORDER_PLACED)
    assert [p.data["order_id"] for p in placed] == ["dup-1"]
    assert await redis_client.scard(OPEN_ORDERS_KEY) == 0
    await bus.stop()
    await svc.stop()


async def test_approval_not_published_by_risk_is_dead_lettered_not_placed(redis_url, redis_client):
    """The guide's CustomRiskCheck, run on the real bus, publishes ORDER_APPROVED for what
    it likes: nothing of risk's limits, kill switch or reservations stands behind that."""
    bus, svc = await start_execution(redis_url, redis_client)
    try:
        rogue = Event(
            event_type=EventType.ORDER_APPROVED,
            data={"order_id": "rogue-1", "symbol": "BTC/USDT", "side": "BUY", "size": "500"},
        )
        await publish(redis_url, tick("100"), rogue)  # published by "test-source"
        await eventually(lambda: _group_done(redis_client, EventType.ORDER_APPROVED, "execution"))
        dead: Any = await redis_client.xrange("hean:dlq")
        assert len(dead) == 1
        error = dead[0][1][b"error"].decode()
        assert "ORDER_APPROVED rogue-1 was published by test-source:1, not by risk" in error
        assert await events(redis_url, EventType.ORDER_PLACED) == []
        assert not await redis_client.exists(f"{ORDER_KEY_PREFIX}rogue-1")  # never claimed
    finally:
        await bus.stop()
        await svc.stop()


@pytest.mark.parametrize(
    ("published", "closed_as", "claim_time"),
    [
        ("1", "filled", True),
        ("0.4", "cancelled", True),
        ("1", "filled", False),  # claimed by a version that did not record the claim time
    ],
)
async def test_order_path_restart_counts_the_fills_published_before_the_crash(
    redis_url, redis_client, published, closed_as, claim_time
):
    # The crash came after the ORDER_FILLED reached Redis and before the ledger's write
    # that goes with the approval's ack: the ledger still says working, nothing filled.
    assert await RedisLedger(redis_client).claim("gap-1", "BTC/USDT", "1", claimer="dead")
    if not claim_time:
        await redis_client.hdel(ORDER_KEY_PREFIX + "gap-1", "claimed_ms")
    fill = {"order_id": "gap-1", "fill_id": "paper-f1", "symbol": "BTC/USDT", "side": "BUY"}
    await publish(
        redis_url,
        Event(
            event_type=EventType.ORDER_FILLED,
            data={**fill, "filled_qty": published, "fill_price": "100", "fee": "0"},
        ),
    )
    bus, svc = await start_execution(redis_url, redis_client, "after-crash")
    cancelled = await events(redis_url, EventType.ORDER_CANCELLED)
    if closed_as == "filled":  # not reported cancelled with nothing filled
        assert cancelled == []
    else:  # cancelled, with what was filled
        assert [(c.data["order_id"], D(c.data["filled_qty"])) for c in cancelled] == [
            ("gap-1", D(published))
        ]
    ledger = await redis_client.hgetall(ORDER_KEY_PREFIX + "gap-1")
    assert (ledger[b"status"].decode(), ledger[b"filled"].decode()) == (closed_as, published)
    assert svc.reconciled == ["gap-1"]
    assert await redis_client.scard(OPEN_ORDERS_KEY) == 0
    await bus.stop()
    await svc.stop()


async def _acked_and_finished(client: aioredis.Redis, order_id: str) -> bool:
    ledger = await client.hgetall(ORDER_KEY_PREFIX + order_id)
    return (
        ledger.get(b"status") == b"filled"
        and ledger.get(b"filled") == b"1"
        and not await client.sismember(OPEN_ORDERS_KEY, order_id)
        and await _group_done(client, EventType.ORDER_APPROVED, "execution")
    )


async def _group_done(client: aioredis.Redis, etype: EventType, group: str) -> bool:
    """Every entry of the stream delivered to `group` and acked."""
    key = stream_key(etype)
    last = (await client.xinfo_stream(key))["last-generated-id"]
    for info in await client.xinfo_groups(key):
        if info["name"].decode() == group:
            return bool(info["last-delivered-id"] == last and info["pending"] == 0)
    return False


async def _count(url: str, etype: EventType, n: int) -> bool:
    return len(await events(url, etype)) >= n


async def test_drawdown_stop_trips_on_ticks_alone_when_portfolio_stops_reporting(
    redis_url, redis_client
):
    """Portfolio reports once (equity 10,000, long 50 BTC at 100) and then nothing (down,
    stalled): the market falls 6% and risk's own valuation trips the 5% stop."""
    bus, svc = await start_risk(redis_url, redis_client)
    try:
        await publish(redis_url, tick("100"), _fill("f1", "BUY", "50", "100"))
        pnl = Event(
            event_type=EventType.PNL_UPDATE,
            data={
                "total_pnl": "0",
                "realized_pnl": "0",
                "unrealized_pnl": "0",
                "equity": "10000",
                "positions": {"BTC/USDT": {"qty": "50", "mark_price": "100"}},
            },
        )
        await publish(redis_url, pnl)
        await eventually(lambda: _group_done(redis_client, EventType.PNL_UPDATE, "risk"))
        await publish(redis_url, tick("98"))
        await eventually(lambda: _true(svc.governor.equity == D(9900)))
        assert await events(redis_url, EventType.KILLSWITCH_TRIGGERED) == []
        await publish(redis_url, tick("88"))  # 50 x -12 = -600: 6% on the day
        triggered = await eventually(
            lambda: _events_if_any(redis_url, EventType.KILLSWITCH_TRIGGERED)
        )
        assert "daily drawdown 6.0000% reached the limit 5.00%" in triggered[0].data["reason"]
        assert (await redis_client.hget(KILLSWITCH_KEY, "active")) == b"1"
    finally:
        await bus.stop()
        await svc.stop()


async def test_order_path_killswitch_command_survives_risk_restart(redis_url, redis_client):
    bus, svc = await start_risk(redis_url, redis_client, "a")
    await redis_client.xadd(COMMAND_STREAM, {"command": "trigger", "reason": "operator"})
    triggered = await eventually(lambda: _events_if_any(redis_url, EventType.KILLSWITCH_TRIGGERED))
    assert triggered[0].data["reason"] == "command: operator"
    assert (await redis_client.hget(KILLSWITCH_KEY, "active")) == b"1"
    await bus.stop()
    await svc.stop()

    bus, svc = await start_risk(redis_url, redis_client, "b")
    assert svc.governor.kill_switch.active
    assert svc.governor.kill_switch.reason == "command: operator"
    await publish(
        redis_url,
        tick("100"),
        Event(
            event_type=EventType.ORDER_REQUEST,
            data={"order_id": "after-restart", "symbol": "BTC/USDT", "side": "BUY", "size": "1"},
        ),
    )
    rejected = await eventually(lambda: _events_if_any(redis_url, EventType.ORDER_REJECTED))
    assert rejected[0].data["order_id"] == "after-restart"
    assert "kill switch active" in rejected[0].data["reason"]

    await redis_client.xadd(COMMAND_STREAM, {"command": "reset"})
    await eventually(lambda: _true(not svc.governor.kill_switch.active))
    await publish(
        redis_url,
        Event(
            event_type=EventType.ORDER_REQUEST,
            data={"order_id": "after-reset", "symbol": "BTC/USDT", "side": "BUY", "size": "1"},
        ),
    )
    approved = await eventually(lambda: _events_if_any(redis_url, EventType.ORDER_APPROVED))
    assert [a.data["order_id"] for a in approved] == ["after-reset"]
    assert len(await events(redis_url, EventType.KILLSWITCH_TRIGGERED)) == 1
    await bus.stop()
    await svc.stop()


async def test_order_path_risk_trading_day_and_its_start_equity_survive_a_restart(
    redis_url, redis_client
):
    """The daily drawdown is measured from the day's starting equity: a restarted risk must
    keep it, not start the day again at the current equity."""
    bus, svc = await start_risk(redis_url, redis_client, "a")
    await publish(
        redis_url,
        tick("100"),
        Event(
            event_type=EventType.ORDER_REQUEST,
            data={"order_id": "day-1", "symbol": "BTC/USDT", "side": "BUY", "size": "1"},
        ),
    )
    await eventually(lambda: _events_if_any(redis_url, EventType.ORDER_APPROVED))
    day = await redis_client.hgetall("hean:risk:day")
    assert day[b"start_equity"] == b"10000" and int(day[b"day"]) == svc.governor.day
    await bus.stop()
    await svc.stop()

    await redis_client.hset("hean:risk:day", "start_equity", "12000")  # as if equity had moved
    bus, svc = await start_risk(redis_url, redis_client, "b")
    assert svc.governor.day == int(day[b"day"])
    assert svc.governor.day_start_equity == D(12000)
    await publish(
        redis_url,
        Event(
            event_type=EventType.ORDER_REQUEST,
            data={"order_id": "day-2", "symbol": "BTC/USDT", "side": "BUY", "size": "1"},
        ),
    )

    async def both_decided() -> bool:
        decided = await events(redis_url, EventType.ORDER_APPROVED)
        decided += await events(redis_url, EventType.ORDER_REJECTED)
        return len(decided) == 2

    await eventually(both_decided)
    # Equity 10000 against the day's 12000 is a 16.7% drawdown, past the 5% limit.
    rejected = await events(redis_url, EventType.ORDER_REJECTED)
    assert [r.data["order_id"] for r in rejected] == ["day-2"]
    assert "drawdown" in rejected[0].data["reason"], rejected[0].data["reason"]
    assert (await redis_client.hget("hean:risk:day", "start_equity")) == b"12000"
    await bus.stop()
    await svc.stop()


def _pnl(equity: str) -> Event:
    data = {"total_pnl": "0", "realized_pnl": "0", "unrealized_pnl": "0", "equity": equity}
    return Event(event_type=EventType.PNL_UPDATE, data=data)


async def test_the_peak_equity_survives_a_restart_and_a_fall_below_it_trips_the_kill_switch(
    redis_url, redis_client
):
    """MAX_DRAWDOWN_LIMIT is measured from the highest equity the account has had, across
    days and restarts: a restarted risk must keep the peak, not start it again at the
    equity it finds (or at STARTING_EQUITY)."""
    limits = RiskLimits(
        max_position_size=D(5000), max_leverage=D(3), daily_drawdown_limit=D("0.5"),
        max_drawdown_limit=D("0.1"),
    )  # fmt: skip
    bus, svc = await start_risk(
        redis_url, redis_client, "a", RiskGovernor(limits, starting_equity=D(10000))
    )
    await publish(redis_url, _pnl("12000"))
    assert await eventually(lambda: _true(svc.governor.peak_equity == D(12000)))
    assert await redis_client.hget("hean:risk:day", "peak_equity") == b"12000"
    await bus.stop()
    await svc.stop()

    await publish(redis_url, _pnl("11500"))  # while risk is down: still above 10,800
    bus, svc = await start_risk(
        redis_url, redis_client, "b", RiskGovernor(limits, starting_equity=D(10000))
    )
    try:
        gov = svc.governor
        assert gov.peak_equity == D(12000) and gov.equity == D(11500)
        assert not gov.kill_switch.active
        await publish(redis_url, _pnl("10700"))  # 10.8% below the peak, 7% on the day
        triggered = await eventually(
            lambda: _events_if_any(redis_url, EventType.KILLSWITCH_TRIGGERED)
        )
        assert "drawdown from the peak equity 12000.00" in triggered[0].data["reason"]
        assert "MAX_DRAWDOWN_LIMIT 10.00%" in triggered[0].data["reason"]
        assert await redis_client.hget(KILLSWITCH_KEY, "active") == b"1"
    finally:
        await bus.stop()
        await svc.stop()


@pytest.mark.parametrize("earlier_day", [True, False])
async def test_risk_down_at_midnight_starts_the_day_at_the_account_s_equity(
    redis_url, redis_client, earlier_day
):
    """Risk restarted after midnight starts the new day at the equity the last update of an
    earlier day showed (else the day's first), not at STARTING_EQUITY (10,000): an account
    grown to 20,000 must not be allowed to lose half of it before the 5% limit trips."""
    now_ms = time.time_ns() // 1_000_000
    midnight_ms = now_ms - now_ms % (NS_PER_DAY // 1_000_000)
    today = midnight_ms // (NS_PER_DAY // 1_000_000)
    await redis_client.hset("hean:risk:day", mapping={"day": today - 1, "start_equity": "10000"})
    key = stream_key(EventType.PNL_UPDATE)
    updates = [(midnight_ms + 1, "19900"), (midnight_ms + 2, "19800")]
    if earlier_day:
        updates.insert(0, (midnight_ms - 60_000, "20000"))
    for ms, equity in updates:
        event = Event(
            event_type=EventType.PNL_UPDATE,
            data={"total_pnl": "0", "realized_pnl": "0", "unrealized_pnl": "0", "equity": equity},
            timestamp=ms * 1_000_000,
        )
        await redis_client.xadd(key, event.stream_fields, id=f"{ms}-0")
    bus, svc = await start_risk(redis_url, redis_client)
    try:
        gov = svc.governor
        assert gov.day == today and gov.equity == D(19800)
        assert gov.day_start_equity == D(20000 if earlier_day else 19900)
        assert not gov.kill_switch.active  # 1% (0.5%) down on the day, not 98% up
    finally:
        await bus.stop()
        await svc.stop()


async def test_order_path_risk_starts_past_malformed_pnl_updates_from_the_last_valid_one(
    redis_url, redis_client
):
    """Anyone who can write to Redis can append a bad PNL_UPDATE; risk must still start,
    from the newest valid one."""
    await publish(
        redis_url,
        Event(
            event_type=EventType.PNL_UPDATE,
            data={
                "total_pnl": "-200",
                "realized_pnl": "-200",
                "unrealized_pnl": "0",
                "equity": "9800",
            },
        ),
    )
    key = stream_key(EventType.PNL_UPDATE)
    await redis_client.xadd(key, {"event": b"{not json"})
    await redis_client.xadd(key, {"event": b'{"event_type": "PNL_UPDATE", "data": {}}'})
    bus, svc = await start_risk(redis_url, redis_client)
    try:
        assert svc.governor.equity == D(9800)
        await publish(
            redis_url,
            tick("100"),
            Event(
                event_type=EventType.ORDER_REQUEST,
                data={"order_id": "after-junk", "symbol": "BTC/USDT", "side": "BUY", "size": "1"},
            ),
        )
        approved = await eventually(lambda: _events_if_any(redis_url, EventType.ORDER_APPROVED))
        assert [a.data["order_id"] for a in approved] == ["after-junk"]
    finally:
        await bus.stop()
        await svc.stop()


async def _events_if_any(url: str, etype: EventType) -> list[Event]:
    return await events(url, etype)


def _candle(close: str, symbol: str = "BTC/USDT") -> Event:
    return Event(
        event_type=EventType.CANDLE,
        data={
            "symbol": symbol,
            "open": close,
            "high": close,
            "low": close,
            "close": close,
            "volume": 1,
        },
    )


def _fill(fill_id: str, side: str, qty: str, price: str) -> Event:
    return Event(
        event_type=EventType.ORDER_FILLED,
        data={
            "order_id": f"o-{fill_id}",
            "fill_id": fill_id,
            "symbol": "BTC/USDT",
            "side": side,
            "filled_qty": qty,
            "fill_price": price,
            "fee": "0.05",
        },
    )


async def test_order_path_portfolio_rebuilt_after_restart_equals_before(redis_url, redis_client):
    bus, svc = await start_portfolio(redis_url, redis_client, "a")
    fills = [
        _fill("1", "BUY", "2", "100"),
        _fill("2", "SELL", "1", "110"),
        _fill("3", "BUY", "1", "90"),
    ]
    await publish(redis_url, *fills, fills[1])  # one fill delivered twice
    await eventually(lambda: _true(svc.portfolio.fills_applied == 3))
    await publish(redis_url, tick("95"))  # after: a tick is read before the fills beside it
    await eventually(lambda: _true(svc.portfolio.positions["BTC/USDT"].mark_price == D(95)))
    before = svc.portfolio.snapshot()
    await bus.stop()

    bus, svc = await start_portfolio(redis_url, redis_client, "b")
    assert svc.rebuilt_fills == 3
    assert svc.portfolio.snapshot() == before
    assert svc.portfolio.realized_pnl == D(10)
    await bus.stop()


async def test_order_path_portfolio_publishes_rebuilt_state_before_any_new_fill(
    redis_url, redis_client
):
    # Fills made while no portfolio ran: its new group gets them all again as duplicates,
    # so only the rebuild itself can tell risk and dashboards the equity.
    await publish(redis_url, tick("120"), _fill("1", "BUY", "2", "100"))
    await publish(redis_url, _fill("2", "BUY", "1", "130"))
    await publish(redis_url, _candle("125"), _candle("126", symbol="ETH/USDT"))
    bus, svc = await start_portfolio(redis_url, redis_client)
    try:
        assert svc.rebuilt_fills == 2
        update = (await eventually(lambda: _events_if_any(redis_url, EventType.PNL_UPDATE)))[0]
        assert update.data["reason"] == "rebuild"
        assert update.data["fills_applied"] == 2
        assert list(update.data["positions"]) == ["BTC/USDT"]  # nothing held in ETH
        position = update.data["positions"]["BTC/USDT"]
        assert D(position["qty"]) == D(3)
        # The newest price: the candle after the fills; not the first fill's (100), nor
        # the last fill's (130), nor the tick before them (120).
        assert D(position["mark_price"]) == D(125)
        assert D(update.data["unrealized_pnl"]) == D(45)  # 3 * 125 - (200 + 130)
        assert D(update.data["equity"]) == D("10044.90")  # less two 0.05 fees
        # The redelivered duplicates, handled and acked, publish nothing (the tick and
        # candles in the new group's backlog may mark it again).
        await eventually(lambda: drained(redis_client, EventType.ORDER_FILLED, "portfolio"))
        reasons = [u.data["reason"] for u in await events(redis_url, EventType.PNL_UPDATE)]
        assert reasons[0] == "rebuild" and "fill" not in reasons
    finally:
        await bus.stop()


async def test_order_path_portfolio_with_no_fills_publishes_nothing_at_start(
    redis_url, redis_client
):
    bus, svc = await start_portfolio(redis_url, redis_client)
    try:
        await publish(redis_url, tick("100"))
        await eventually(lambda: drained(redis_client, EventType.TICK, "portfolio"))
        assert svc.rebuilt_fills == 0
        assert await events(redis_url, EventType.PNL_UPDATE) == []
    finally:
        await bus.stop()


async def test_order_path_risk_rebuilds_positions_and_equity_after_restart(redis_url, redis_client):
    pnl = Event(
        event_type=EventType.PNL_UPDATE,
        data={"total_pnl": "-100", "realized_pnl": "0", "unrealized_pnl": "-100", "equity": "9900"},
    )
    await publish(redis_url, _fill("1", "BUY", "30", "100"), pnl)
    bus, svc = await start_risk(redis_url, redis_client, "a")
    assert svc.governor.positions["BTC/USDT"] == D(30)
    assert svc.governor.equity == D(9900)
    await publish(
        redis_url,
        tick("100"),
        Event(
            event_type=EventType.ORDER_REQUEST,
            data={"order_id": "too-big", "symbol": "BTC/USDT", "side": "BUY", "size": "25"},
        ),
    )
    rejected = await eventually(lambda: _events_if_any(redis_url, EventType.ORDER_REJECTED))
    assert "MAX_POSITION_SIZE" in rejected[0].data["reason"]
    await bus.stop()
    await svc.stop()


async def test_order_path_stale_reset_command_ignored_fresh_trigger_applied(
    redis_url, redis_client
):
    # Commands queued while no risk service ran: a trigger and then a reset, both 10 min old.
    old_ms = int(time.time() * 1000) - 600_000
    await redis_client.xadd(
        COMMAND_STREAM, {"command": "trigger", "reason": "old"}, id=f"{old_ms}-0"
    )
    await redis_client.xadd(COMMAND_STREAM, {"command": "reset"}, id=f"{old_ms}-1")
    bus, svc = await start_risk(redis_url, redis_client, "fresh")
    try:
        await eventually(lambda: _true(svc.governor.kill_switch.active))
        await eventually(lambda: _commands_acked(redis_client))
        assert svc.governor.kill_switch.active  # the stale reset did not lift it
        await redis_client.xadd(COMMAND_STREAM, {"command": "reset"})
        await eventually(lambda: _true(not svc.governor.kill_switch.active))
    finally:
        await bus.stop()
        await svc.stop()


async def _commands_acked(client: aioredis.Redis) -> bool:
    groups = await client.xinfo_groups(COMMAND_STREAM)
    return all(int(g["pending"]) == 0 and int(g["lag"] or 0) == 0 for g in groups)


async def test_order_path_ledger_claim_repeated_by_its_claimer_only_while_working(
    redis_url, redis_client
):
    # A claim whose reply was lost (Redis restarting) is retried by the same process: it
    # must succeed again, or the approved order is never placed; nobody else may take it.
    fast = RespConnection(redis_url)
    ledgers = (RedisLedger(redis_client), RedisLedger(redis_client, fast=fast), MemoryLedger())
    for ledger in ledgers:
        await redis_client.delete(ORDER_KEY_PREFIX + "o-lost")
        assert await ledger.claim("o-lost", "BTC/USDT", "1", "proc-a")
        assert await ledger.claim("o-lost", "BTC/USDT", "1", "proc-a")
        assert not await ledger.claim("o-lost", "BTC/USDT", "1", "proc-b")
        assert not await ledger.claim("o-lost", "BTC/USDT", "1")
        await ledger.finish("o-lost", "filled", "1")
        assert not await ledger.claim("o-lost", "BTC/USDT", "1", "proc-a")
    await ledgers[1].aclose()


async def test_order_path_ledger_marker_lives_while_open_then_expires_and_is_not_revived(
    redis_client,
):
    # A resting order can work for longer than the marker's TTL: the marker has none while
    # the order is open; finishing gives it the TTL, and a late fill never recreates it.
    ledger = RedisLedger(redis_client, ttl_s=100)
    key = ORDER_KEY_PREFIX + "o-ttl"
    await redis_client.delete(key)
    assert await ledger.claim("o-ttl", "BTC/USDT", "1", "proc-a")
    assert await redis_client.ttl(key) == -1
    await ledger.record_fill("o-ttl", "0.4")
    assert await redis_client.ttl(key) == -1
    await redis_client.execute_command(*ledger.finish_command("o-ttl", "cancelled", "0.4"))
    assert 0 < await redis_client.ttl(key) <= 100
    assert await redis_client.sismember(OPEN_ORDERS_KEY, "o-ttl") == 0
    await redis_client.delete(key)  # as if the TTL had run out
    await redis_client.execute_command(*ledger.record_fill_command("o-ttl", "0.5"))
    assert await redis_client.exists(key) == 0


async def test_risk_started_while_redis_refuses_writes_starts_once_it_takes_them(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """Redis out of memory (`noeviction`) when risk starts: it cannot take its service lease
    (hean.core.lease), so it starts nothing, and its /health says why and that it tries
    again, and the process keeps running. Once Redis takes writes, risk starts by itself and
    approves orders."""
    server = redis_factory()
    client = aioredis.Redis.from_url(server.url)
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", 1)
    port = free_port()
    settings = RiskServiceSettings(
        REDIS_URL=server.url, SERVICE_NAME="risk", **{**FAST, "HEALTH_PORT": port}
    )
    stop = asyncio.Event()
    started: list[ServiceContext] = []
    task = asyncio.create_task(
        serve("risk", risk_build, settings, stop_event=stop, ready=lambda c, _p: started.append(c))
    )
    try:

        async def health() -> tuple[int, dict[str, Any]]:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/health") as resp,
            ):
                return resp.status, await resp.json()

        async def answers() -> bool:
            try:
                await health()
            except aiohttp.ClientError:
                return False
            return True

        await eventually(answers)
        status, body = await health()
        lease = body["components"]["service_lease"]
        assert status == 503 and body["orchestrator"]["running"] is False
        assert lease["state"] == "unhealthy"
        assert "Redis unavailable: trying again" in lease["error_message"]
        assert "maxmemory" in lease["error_message"]
        assert not started and not task.done()
        await client.config_set("maxmemory", 0)
        await eventually(lambda: _true(bool(started)), timeout=20)
        await eventually(lambda: _true(_governor_healthy(started[0])), timeout=20)
        await publish(server.url, tick("100"))
        await asyncio.sleep(0.5)  # the mark, read conflated
        signal = Event(
            event_type=EventType.SIGNAL,
            data={"symbol": "BTC/USDT", "side": "BUY", "signal_strength": 0.7},
        )
        await publish(server.url, signal)

        async def approved() -> bool:
            return int(await client.xlen(stream_key(EventType.ORDER_APPROVED))) == 1

        await eventually(approved, timeout=20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await client.config_set("maxmemory", 0)
        await client.aclose()


def _governor_healthy(ctx: ServiceContext) -> bool:
    entry: dict[str, Any] = ctx.orchestrator.health()["components"]["risk_governor"]
    return bool(entry["state"] == "healthy")


async def test_kill_switch_whose_write_redis_refused_is_written_and_announced_on_redelivery(
    redis_url, redis_client
):
    """The drawdown PNL_UPDATE turns the governor's switch on, then Redis refuses the
    write (out of memory under `noeviction`). The redelivered event must write and
    announce it, not skip it as 'already active' (it would be off after a restart, and
    execution would never have cancelled anything)."""
    bus, svc = await start_risk(redis_url, redis_client)
    pnl = Event(
        event_type=EventType.PNL_UPDATE,
        data={"total_pnl": "-600", "realized_pnl": "-600", "unrealized_pnl": "0", "equity": "9400"},
    )
    await redis_client.config_set("maxmemory-policy", "noeviction")
    await redis_client.config_set("maxmemory", 1)
    try:
        with pytest.raises(Exception, match="maxmemory"):
            await svc.on_pnl(pnl)
        assert svc.governor.kill_switch.active
        assert await redis_client.hgetall(KILLSWITCH_KEY) == {}
    finally:
        await redis_client.config_set("maxmemory", 0)
    await svc.on_pnl(pnl)  # the bus redelivers the event
    await bus.flush(10)
    saved = await redis_client.hgetall(KILLSWITCH_KEY)
    assert (saved[b"active"], saved[b"announced"]) == (b"1", b"1")
    announced = await events(redis_url, EventType.KILLSWITCH_TRIGGERED)
    assert [e.data["reason"] for e in announced] == [svc.governor.kill_switch.reason]
    await svc.on_pnl(pnl)  # and once announced, not again
    await bus.flush(10)
    assert len(await events(redis_url, EventType.KILLSWITCH_TRIGGERED)) == 1
    await bus.stop()


async def test_risk_restart_does_not_decide_again_what_it_decided_before(redis_url, redis_client):
    """Risk decides an order as it sizes the SIGNAL and skips its own ORDER_REQUEST when it
    reads it back; a restart before that read (or before the SIGNAL's ack) used to decide
    the order again: a second approval, and a reservation that no fill or cancel released."""
    bus, svc = await start_risk(redis_url, redis_client)  # makes risk's groups
    await bus.stop()
    await svc.stop()
    # What the previous run left: its decision of o-1 (approved, then filled) and its own
    # request of o-1, not yet read back.
    request = {"order_id": "o-1", "symbol": "BTC/USDT", "side": "BUY", "size": "1"}
    approved = request | {"reference_price": "100"}
    fill = {"order_id": "o-1", "fill_id": "f-1", "symbol": "BTC/USDT", "side": "BUY"}
    fill |= {"fill_price": "100", "filled_qty": "1", "remaining_qty": "0"}
    await publish(
        redis_url,
        tick("100"),
        Event(event_type=EventType.ORDER_REQUEST, data=request),
        Event(event_type=EventType.ORDER_APPROVED, source="risk:test", data=approved),
        Event(event_type=EventType.ORDER_FILLED, data=fill),
    )
    bus, svc = await start_risk(redis_url, redis_client)
    assert await eventually(lambda: drained(redis_client, EventType.ORDER_REQUEST, "risk"))
    await bus.flush(5)
    approvals = [e.data["order_id"] for e in await events(redis_url, EventType.ORDER_APPROVED)]
    assert approvals == ["o-1"]
    assert svc.governor.worst_case_notional("BTC/USDT", D(100)) == D(100)  # the fill only
    await bus.stop()
    await svc.stop()


def _approval(order_id: str, size: str, source: str = "risk:before") -> Event:
    data = {"order_id": order_id, "symbol": "BTC/USDT", "side": "BUY", "size": size}
    return Event(event_type=EventType.ORDER_APPROVED, source=source, data=data)


def _order_fill(order_id: str, qty: str, remaining: str) -> Event:
    data = {"order_id": order_id, "fill_id": f"{order_id}-{remaining}", "symbol": "BTC/USDT"}
    data |= {"side": "BUY", "filled_qty": qty, "fill_price": "100", "remaining_qty": remaining}
    return Event(event_type=EventType.ORDER_FILLED, data=data)


async def test_restarted_risk_reserves_again_what_execution_is_still_working(
    redis_url, redis_client
):
    """Risk alone restarts while execution works an order: the order's unfilled part must
    count again in the limits, or new orders plus its fills pass MAX_POSITION_SIZE (5,000
    USDT: 50 BTC at 100). Closed orders (filled, cancelled, rejected by execution,
    dead-lettered by execution) and approvals not published by risk reserve nothing."""
    bus, svc = await start_risk(redis_url, redis_client)  # makes risk's groups
    await bus.stop()
    await svc.stop()
    closing = [
        Event(event_type=EventType.ORDER_CANCELLED, data={"order_id": "cancelled"}),
        Event(
            event_type=EventType.ORDER_REJECTED,
            data={"order_id": "refused", "reason": "unknown symbol", "rejected_by": "execution"},
        ),
    ]
    await publish(
        redis_url,
        tick("100"),
        *(_approval(o, "20") for o in ("working", "cancelled", "refused", "filled", "dead")),
        _approval("foreign", "20", source="custom-risk:host:1"),
        _order_fill("working", "10", "10"),  # half of it filled
        _order_fill("filled", "5", "0"),  # filled 5 of 20 (rounded down): finished
        *closing,
    )
    approvals = await events(redis_url, EventType.ORDER_APPROVED)
    dead = next(e for e in approvals if e.data["order_id"] == "dead")
    letter = dead_letter(
        dead.to_json(),
        event_type=EventType.ORDER_APPROVED,
        group="execution",
        error="exchange unavailable",
    )
    await redis_client.xadd(DLQ_STREAM, letter)
    bus, svc = await start_risk(redis_url, redis_client)
    gov = svc.governor
    assert gov.reserved_orders == 1  # "working", its 10 unfilled
    assert gov.positions["BTC/USDT"] == D(15)
    assert gov.worst_case_notional("BTC/USDT", D(100)) == D(2500)
    # 25 more would be 50 BTC if "working" fills: at the limit; 26 is over it.
    request = {"order_id": "new", "symbol": "BTC/USDT", "side": "BUY", "size": "26"}
    await publish(redis_url, Event(event_type=EventType.ORDER_REQUEST, data=request))
    rejected = await eventually(lambda: _events_if_any(redis_url, EventType.ORDER_REJECTED))
    assert [r.data["order_id"] for r in rejected if r.data.get("rejected_by") == "risk"] == ["new"]
    assert "MAX_POSITION_SIZE" in rejected[-1].data["reason"]
    # The rest of "working" fills: nothing is reserved any more.
    await publish(redis_url, _order_fill("working", "10", "0"))
    await eventually(lambda: _true(gov.reserved_orders == 0))
    assert gov.worst_case_notional("BTC/USDT", D(100)) == D(2500)
    await bus.stop()
    await svc.stop()


async def test_reconciled_order_is_finished_in_the_ledger_only_with_its_event(
    redis_url, redis_client
):
    """The ledger must never say an order is finished while its ORDER_CANCELLED is not in
    Redis: a crash in between would lose the event for good (the next start does not
    reconcile a finished order). Reconciliation writes the ledger's finish in the pipeline
    of the order's last event, so when one is there the other is."""
    ledger = RedisLedger(redis_client)
    assert await ledger.claim("o-old", "BTC/USDT", "1", "execution:gone")
    bus = bus_for(redis_url, "execution")
    exchange = PaperExchange(PaperConfig(markets={"BTC/USDT": BTC}))
    svc = ExecutionService(bus, exchange, ledger=ledger, market_history=redis_client)
    await svc.reconcile()  # as at start: before the bus consumes anything
    assert await ledger.open_orders() == {}
    cancelled = await events(redis_url, EventType.ORDER_CANCELLED)  # no flush: written
    assert [e.data["order_id"] for e in cancelled] == ["o-old"]
    await bus.stop()


async def test_restarted_execution_does_not_place_an_approval_made_before_the_kill_switch(
    redis_url, redis_client
):
    t_switch = time.time_ns()
    trigger = {"reason": "daily drawdown", "timestamp": t_switch}
    approval = {"order_id": "backlog-1", "symbol": "BTC/USDT", "side": "BUY", "size": "1"}
    await publish(
        redis_url,
        tick("100"),
        Event(event_type=EventType.KILLSWITCH_TRIGGERED, data=trigger, timestamp=t_switch),
        Event(
            event_type=EventType.ORDER_APPROVED,
            source="risk:test",
            data=approval,
            timestamp=t_switch - 10**9,
        ),
    )
    bus, _svc = await start_execution(redis_url, redis_client)  # reads the switch at start

    async def rejected() -> list[Event]:
        return [
            e
            for e in await events(redis_url, EventType.ORDER_REJECTED)
            if e.data["order_id"] == "backlog-1"
        ]

    (event,) = await eventually(rejected)
    assert "kill switch triggered after it was approved" in event.data["reason"]
    assert await events(redis_url, EventType.ORDER_PLACED) == []
    await bus.stop()
