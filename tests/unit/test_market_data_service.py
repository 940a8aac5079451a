"""ReplayFeed on the in-memory bus: pacing, order of TICKs and CANDLEs, stop, health."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from hean.core.bus import EventBus
from hean.core.candles import Candle, LoadReport, LoadResult, RowProblem
from hean.core.types import Event, EventType
from hean.market_data.service import ReplayFeed

MIN = 60_000_000_000


def _load(n: int, problems: tuple[RowProblem, ...] = ()) -> LoadResult:
    candles = tuple(
        Candle(
            "X", "1m", i * MIN, Decimal(100), Decimal(101), Decimal(99), Decimal(100), Decimal(4)
        )
        for i in range(n)
    )
    return LoadResult(candles, LoadReport(n + len(problems), n, problems))


async def _run(feed: ReplayFeed, bus: EventBus) -> list[Event]:
    seen: list[Event] = []
    bus.subscribe(EventType.TICK, seen.append)
    bus.subscribe(EventType.CANDLE, seen.append)
    await bus.start()
    await feed.start()
    await asyncio.wait_for(feed.join(), 5)
    await feed.stop()
    await bus.flush(5)
    await bus.stop()
    return seen


async def test_replay_feed_speed_bars_not_before_their_schedule() -> None:
    bus = EventBus()
    feed = ReplayFeed(bus, _load(5), symbols=("X",), bar_ns=MIN, speed=1200.0, ticks=False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await bus.start()
    await feed.start()
    await asyncio.wait_for(feed.join(), 5)
    # 1200x real time: one 1-minute bar every 50 ms, the fifth due 200 ms after the start.
    assert loop.time() - started >= 0.2
    assert feed.finished and feed.bars_published == 5
    await feed.stop()
    await bus.stop()


async def test_replay_feed_ticks_precede_their_candle_per_symbol() -> None:
    bus = EventBus()
    feed = ReplayFeed(bus, _load(2), symbols=("A", "B"), bar_ns=MIN, speed=0.0)
    seen = await _run(feed, bus)
    a = [(e.event_type.value, e.data.get("timestamp")) for e in seen if e.data["symbol"] == "A"]
    assert [t for t, _ in a] == ["TICK"] * 4 + ["CANDLE"] + ["TICK"] * 4 + ["CANDLE"]
    assert feed.ticks_published == 16 and feed.bars_published == 4


async def test_replay_feed_stop_during_slow_replay_returns_promptly() -> None:
    bus = EventBus()
    feed = ReplayFeed(bus, _load(100), symbols=("X",), bar_ns=MIN, speed=1.0, ticks=False)
    await bus.start()
    await feed.start()
    await asyncio.wait_for(feed.stop(), 2.0)  # one bar a minute: would take 99 minutes
    assert feed.bars_published == 1 and not feed.finished
    await bus.stop()


def test_replay_feed_health_names_skipped_rows() -> None:
    problems = (RowProblem(3, "non-positive price: low=-1"), RowProblem(9, "missing field: open"))
    feed = ReplayFeed(EventBus(), _load(2, problems), symbols=("X",), bar_ns=MIN, speed=0.0)
    health = feed.health_check()
    assert health["state"] == "healthy"
    assert health["error_message"].startswith("2 bad row(s) of 4 skipped")
    assert "row 3: non-positive price" in health["error_message"]
    assert "row 9: missing field: open" in health["error_message"]


def test_replay_feed_no_valid_candles_refused() -> None:
    with pytest.raises(ValueError, match="no valid candles"):
        ReplayFeed(EventBus(), _load(0), symbols=("X",), bar_ns=MIN, speed=0.0)


async def test_replay_feed_warmup_bars_unpaced_rest_paced() -> None:
    bus = EventBus()
    # 60x real time: one 1-minute bar a second. 30 warm-up bars go out at once; the 31st
    # is due at once too (pacing starts there); the 32nd would be due a second later.
    feed = ReplayFeed(
        bus, _load(32), symbols=("X",), bar_ns=MIN, speed=60.0, warmup_bars=30, ticks=False
    )
    seen: list[Event] = []
    bus.subscribe(EventType.CANDLE, seen.append)
    await bus.start()
    await feed.start()
    try:
        for _ in range(500):
            if len(seen) >= 31:
                break
            await asyncio.sleep(0.01)
        assert len(seen) == 31, "the warm-up bars were paced"
        assert not feed.finished
    finally:
        await feed.stop()
        await bus.stop()
