"""Two ways a restart loses work, found by the kill run, each reproduced deterministically.

Both are marked `xfail(strict=True)`: they fail today and will turn CI red (XPASS) once
fixed, so the marker must then be removed. Fixes proposed in docs/RELIABILITY.md.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.event_streams import stream_key
from hean.core.features import WARMUP_BARS
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType
from tests.chaos.conftest import Report
from tests.chaos.harness import System, events, group_states, wait_for

BAR_NS = 60 * 10**9
T0 = 1_640_995_200 * 10**9


async def _send(url: str, *evts: Event) -> None:
    bus = EventBus.redis(CoreSettings(REDIS_URL=url, SERVICE_NAME="chaos-source"))
    await bus.start()
    for e in evts:
        await bus.publish(e)
    await bus.flush(10)
    await bus.stop()


async def _drained(client: aioredis.Redis, etype: EventType, group: str) -> bool:
    state = (await group_states(client)).get((stream_key(etype), group))
    return state is not None and state["lag"] == 0 and state["pending"] == 0


async def _group(client: aioredis.Redis, etype: EventType, group: str) -> bool:
    return (stream_key(etype), group) in await group_states(client)


def _candle(n: int) -> Event:
    close = Decimal(46000) + Decimal((n * 37) % 101) - Decimal(50)
    return Event(
        event_type=EventType.CANDLE,
        data={
            "symbol": "BTC/USDT",
            "open": close - 3,
            "high": close + 5,
            "low": close - 6,
            "close": close,
            "volume": Decimal(10 + n % 7),
            "timeframe": "1m",
            "timestamp": T0 + n * BAR_NS,
        },
    )


@pytest.mark.xfail(
    strict=True,
    reason="bug: a restarted execution rejects approvals with 'no market data' until a new "
    "TICK arrives, although the last prices are in Redis",
)
@pytest.mark.timeout(120)
async def test_execution_restart_fills_approval_at_last_known_price(
    system: System, redis_url: str, redis_client: aioredis.Redis, report: Report
) -> None:
    system.env["PAPER_MARKETS"] = '{"BTC/USDT": {"tick_size": "0.1", "qty_step": "0.001"}}'
    first = system.start("execution")
    await wait_for(
        lambda: _group(redis_client, EventType.ORDER_APPROVED, "execution"),
        timeout=60,
        message="execution group",
        system=system,
    )
    await _send(
        redis_url, Event(event_type=EventType.TICK, data={"symbol": "BTC/USDT", "price": "100"})
    )
    await wait_for(
        lambda: _drained(redis_client, EventType.TICK, "execution"),
        timeout=30,
        message="tick read",
        system=system,
    )
    system.kill(first)
    approval = Event(
        event_type=EventType.ORDER_APPROVED,
        data={"order_id": "after-restart-1", "symbol": "BTC/USDT", "side": "BUY", "size": "0.01"},
    )
    await _send(redis_url, approval)
    system.start("execution")
    await wait_for(
        lambda: _drained(redis_client, EventType.ORDER_APPROVED, "execution"),
        timeout=60,
        message="approval handled",
        system=system,
    )
    rejected = [
        e.data["reason"]
        for e in await events(redis_client, EventType.ORDER_REJECTED)
        if e.data["order_id"] == "after-restart-1"
    ]
    filled = [
        e
        for e in await events(redis_client, EventType.ORDER_FILLED)
        if e.data["order_id"] == "after-restart-1"
    ]
    report.add(
        "Known bugs",
        "- **execution forgets prices on restart**: an approval handled by a restarted "
        "execution before its first new TICK is refused: "
        f"{rejected or 'no rejection'}. Fix: at start, seed the paper exchange's last price "
        "per symbol from the newest TICK/CANDLE in Redis (XREVRANGE COUNT 1) before "
        "subscribing; or treat 'no market data' as a TransientError so the bus retries "
        "it. (`test_restart_gaps.py::test_execution_restart_fills_approval_at_last_known_price`)",
    )
    assert len(filled) == 1, f"rejected instead: {rejected}"


@pytest.mark.timeout(120)
async def test_features_restart_does_not_drop_candle_left_pending(
    system: System, redis_url: str, redis_client: aioredis.Redis, report: Report
) -> None:
    system.env["EVENT_CLAIM_IDLE_MS"] = "3000"
    first = system.start("features", FEATURE_BATCH_TIMEOUT="0")
    await wait_for(
        lambda: _group(redis_client, EventType.CANDLE, "features"),
        timeout=60,
        message="features group",
        system=system,
    )
    warm = WARMUP_BARS + 5
    await _send(redis_url, *(_candle(n) for n in range(warm)))
    await wait_for(
        lambda: _drained(redis_client, EventType.CANDLE, "features"),
        timeout=60,
        message="warm-up candles handled",
        system=system,
    )
    system.kill(first)
    # The state a SIGKILL mid-handling leaves: the next bar delivered to the dead consumer,
    # not acked; then the market moves on.
    await _send(redis_url, _candle(warm))
    await redis_client.xreadgroup(
        "features", f"features:{first.instance}", {stream_key(EventType.CANDLE): ">"}, count=1
    )
    await _send(redis_url, _candle(warm + 1))
    system.start("features", FEATURE_BATCH_TIMEOUT="0")
    await wait_for(
        lambda: _drained(redis_client, EventType.CANDLE, "features"),
        timeout=60,
        message="pending candle claimed",
        system=system,
    )
    rows = {e.data["timestamp"] for e in await events(redis_client, EventType.FEATURES_READY)}
    lost = [n for n in (warm, warm + 1) if T0 + n * BAR_NS not in rows]
    report.add(
        "Known bugs",
        "- **a restart loses the bar a killed consumer had in hand** (features; the same "
        "mechanism drops ML_PREDICTIONs in strategy after an ml-service kill): the "
        "restarted instance has a new consumer name, reads new entries at once, and the "
        "dead consumer's pending entry is claimed only after EVENT_CLAIM_IDLE_MS, when a "
        "newer bar was processed, so it is ignored as stale and its row never published "
        f"(bars lost here: {len(lost)}). Fix: at start, before reading `>`, claim the "
        "pending entries of consumers of the group that have no live health snapshot "
        "(XCLAIM with min-idle 0) and handle them first; or keep a stable INSTANCE_ID "
        "across restarts and read the consumer's own pending entries (`0`) before `>`. "
        "(`test_restart_gaps.py::test_features_restart_does_not_drop_candle_left_pending`)",
    )
    assert lost == []
