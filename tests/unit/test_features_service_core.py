"""features: the pure core (per-symbol engines, stale candles, snapshots) and the batcher."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from hean.core.candles import Candle, bundled_data_path, load_candles
from hean.core.errors import QueueFullError
from hean.core.features import FEATURE_VERSION, WARMUP_BARS, compute_feature_rows
from hean.core.types import Event, EventType
from hean.features.core import BadCandleError, FeatureCore, candle_from_event
from hean.features.service import EventBatcher, Item, SendBatch

N = WARMUP_BARS + 60


@pytest.fixture(scope="module")
def candles() -> tuple[Candle, ...]:
    return load_candles(bundled_data_path(), "BTC").candles[:N]


def test_feature_core_warmup_then_features_equal_training_rows(
    candles: tuple[Candle, ...],
) -> None:
    core = FeatureCore()
    outputs = [core.on_candle(c).features for c in candles]
    assert all(f is None for f in outputs[: WARMUP_BARS - 1])
    live = [f for f in outputs if f is not None]
    offline = [f for _, f in compute_feature_rows(candles)]
    assert live == offline


def test_feature_core_repeated_or_older_candle_ignored_and_counted(
    candles: tuple[Candle, ...],
) -> None:
    core = FeatureCore()
    for c in candles[:10]:
        core.on_candle(c)
    again = core.on_candle(candles[9])
    older = core.on_candle(candles[3])
    assert again.stale and older.stale
    assert again.bars_seen == 10
    assert core.stale_candles == 2


def test_feature_core_restored_snapshot_continues_like_uninterrupted(
    candles: tuple[Candle, ...],
) -> None:
    whole = FeatureCore()
    expected = [whole.on_candle(c).features for c in candles]
    first = FeatureCore()
    for c in candles[: WARMUP_BARS + 5]:
        first.on_candle(c)
    second = FeatureCore()
    second.restore("BTC", first.snapshot("BTC"))
    resumed = [second.on_candle(c).features for c in candles[WARMUP_BARS + 5 :]]
    for got, want in zip(resumed, expected[WARMUP_BARS + 5 :], strict=True):
        assert got is not None and want is not None
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_feature_core_chains_each_row_to_the_previous_rows_bar(
    candles: tuple[Candle, ...],
) -> None:
    core = FeatureCore()
    outcomes = [core.on_candle(c) for c in candles[: WARMUP_BARS + 3]]
    first = WARMUP_BARS - 1  # the first candle with features
    assert outcomes[first - 1].features is None and outcomes[first].features is not None
    assert outcomes[first].previous_timestamp_ns is None  # no row before it
    for i in range(first + 1, WARMUP_BARS + 3):
        assert outcomes[i].previous_timestamp_ns == candles[i - 1].timestamp_ns
    resumed = FeatureCore()  # after a restart from the snapshot, the chain goes on
    resumed.restore("BTC", core.snapshot("BTC"))
    after = resumed.on_candle(candles[WARMUP_BARS + 3])
    assert after.previous_timestamp_ns == candles[WARMUP_BARS + 2].timestamp_ns
    assert core.on_candle(candles[0]).previous_timestamp_ns is None  # stale: no row
    data = FeatureCore.features_data(candles[1], {"ret_1": 0.1}, candles[0].timestamp_ns)
    assert data["previous_timestamp"] == candles[0].timestamp_ns


def test_feature_core_restore_none_starts_fresh_engine(candles: tuple[Candle, ...]) -> None:
    core = FeatureCore()
    for c in candles[:5]:
        core.on_candle(c)
    core.restore("BTC", None)
    assert core.on_candle(candles[0]).bars_seen == 1


def test_features_data_carries_bar_time_and_version(candles: tuple[Candle, ...]) -> None:
    data = FeatureCore.features_data(candles[0], {"ret_1": 0.1})
    assert data["timestamp"] == candles[0].timestamp_ns
    assert data["feature_version"] == FEATURE_VERSION
    Event(event_type=EventType.FEATURES_READY, data=data)  # validates


def test_candle_from_event_reads_bar_time_else_event_time() -> None:
    data = {"symbol": "X", "open": "1", "high": "2", "low": "1", "close": "2", "volume": "3"}
    assert candle_from_event(data, 99).timestamp_ns == 99
    assert candle_from_event({**data, "timestamp": 5}, 99).timestamp_ns == 5
    assert candle_from_event(data, 99).close == Decimal(2)


def test_candle_from_event_missing_price_raises_bad_candle() -> None:
    with pytest.raises(BadCandleError, match="open"):
        candle_from_event({"symbol": "X", "high": "1"}, 0)


def _event(symbol: str) -> Event:
    return Event(event_type=EventType.FEATURES_READY, data={"symbol": symbol, "features": {}})


def _written() -> asyncio.Future[str]:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    future.set_result("1-0")
    return future


def _recorder(sent: list[list[str]]) -> SendBatch:
    """A batch send that records the symbols and reports the batch written at once."""

    def send(items: list[Item]) -> list[asyncio.Future[str]]:
        sent.append([i.symbol for i in items])
        return [_written() for _ in items]

    return send


async def test_batcher_lone_symbol_sent_at_once_without_timeout() -> None:
    sent: list[list[str]] = []
    batcher = EventBatcher(_recorder(sent), size=10, timeout_s=60.0)
    first = batcher.add(_event("A"), "A", {})
    second = batcher.add(_event("A"), "A", {})
    assert first.done() and second.done()
    assert sent == [["A"], ["A"]]


async def test_batcher_two_active_symbols_sent_together_without_waiting() -> None:
    sent: list[list[str]] = []
    batcher = EventBatcher(_recorder(sent), size=10, timeout_s=1.0)
    # First round: B is new, so it waits for the timeout after A went out alone.
    await asyncio.gather(batcher.add(_event("A"), "A", {}), batcher.add(_event("B"), "B", {}))
    # Now both are active: the batch is full as soon as both are in, long before 1 s.
    first = batcher.add(_event("A"), "A", {})
    assert not first.done()
    second = batcher.add(_event("B"), "B", {})
    assert first.done() and second.done()
    assert sent == [["A"], ["B"], ["A", "B"]]


async def test_batcher_quiet_symbol_flushed_by_timeout() -> None:
    sent: list[list[str]] = []
    batcher = EventBatcher(_recorder(sent), size=10, timeout_s=0.05)
    await asyncio.gather(batcher.add(_event("A"), "A", {}), batcher.add(_event("B"), "B", {}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(batcher.add(_event("A"), "A", {}), 2.0)  # B stays quiet
    assert loop.time() - started >= 0.04
    assert sent[-1] == ["A"]


async def test_batcher_refused_batch_goes_again_ahead_of_later_rows() -> None:
    """A batch Redis refuses (or the outbox cannot take) is sent again, whole, after a
    backoff; the rows added meanwhile wait behind it, and nothing resolves before its
    batch is written: rows reach Redis in the order they were added."""
    sent: list[list[str]] = []
    answers: list[BaseException | None] = [QueueFullError("the Redis outbox", 1)]
    refused: list[tuple[int, str]] = []

    def send(items: list[Item]) -> list[asyncio.Future[str]]:
        sent.append([str(i.event.correlation_id) for i in items])
        futures = [_written() for _ in items]
        if answers:
            error = answers.pop(0)
            if error is not None:
                failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                failed.set_exception(error)
                futures[-1] = failed
        return futures

    def row(n: int) -> Event:
        return Event(
            event_type=EventType.FEATURES_READY,
            data={"symbol": "A", "features": {}},
            correlation_id=str(n),
        )

    batcher = EventBatcher(
        send,
        size=10,
        timeout_s=60.0,
        on_refused=lambda items, error, attempt, delay: refused.append((attempt, str(error))),
        retry_initial_s=0.05,
    )
    answers.append(ValueError("OOM command not allowed"))  # the second try is refused too
    first = batcher.add(row(1), "A", {})
    assert sent == [["1"]] and refused[0][0] == 1 and "Queue is full" in refused[0][1]
    later = [batcher.add(row(n), "A", {}) for n in (2, 3)]
    assert sent == [["1"]]  # held behind the refused batch
    assert batcher.waiting == 3
    await asyncio.wait_for(asyncio.gather(first, *later), 5.0)
    # Tried again alone, refused, then with the rows added meanwhile behind it.
    assert sent == [["1"], ["1", "2", "3"], ["1", "2", "3"]]
    assert [attempt for attempt, _ in refused] == [1, 2]
    assert batcher.refusals == 0 and batcher.waiting == 0


def _answered_later(sent: list[list[str]], pending: list[asyncio.Future[str]]) -> SendBatch:
    """A batch send that records the symbols; the test answers each batch (`pending`)."""

    def send(items: list[Item]) -> list[asyncio.Future[str]]:
        sent.append([i.symbol for i in items])
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        pending.append(future)
        return [future]

    return send


async def test_batcher_holds_rows_while_a_batch_is_in_flight() -> None:
    """One batch at a time: rows added while one is being written gather into the next,
    sent as soon as Redis answers for the first."""
    sent: list[list[str]] = []
    pending: list[asyncio.Future[str]] = []
    batcher = EventBatcher(_answered_later(sent, pending), size=10, timeout_s=60.0)
    first = batcher.add(_event("A"), "A", {})
    second = batcher.add(_event("A"), "A", {})
    third = batcher.add(_event("A"), "A", {})
    assert sent == [["A"]] and not first.done()
    pending[0].set_result("1-0")
    await asyncio.sleep(0)
    assert first.done() and not second.done()
    assert sent == [["A"], ["A", "A"]]
    pending[1].set_result("2-0")
    await asyncio.wait_for(asyncio.gather(second, third), 1.0)


async def test_batcher_stop_fails_the_rows_not_yet_sent() -> None:
    """Stopping fails what waits (its events are not acked and come again) and sends
    nothing more; the batch in flight still resolves with its answer."""
    sent: list[list[str]] = []
    pending: list[asyncio.Future[str]] = []
    batcher = EventBatcher(_answered_later(sent, pending), size=10, timeout_s=60.0)
    flying = batcher.add(_event("A"), "A", {})
    waiting = batcher.add(_event("A"), "A", {})
    batcher.stop()
    with pytest.raises(RuntimeError, match="stopped before its batch was written"):
        await waiting
    pending[0].set_result("1-0")
    await asyncio.wait_for(flying, 1.0)
    assert sent == [["A"]]


async def test_batcher_symbols_sharing_a_bus_lane_do_not_wait_for_each_other() -> None:
    # The bus hands one event per worker lane at a time: two symbols on one lane can never
    # be in a batch together, so each row must go out at once, not after the timeout.
    sent: list[list[str]] = []
    batcher = EventBatcher(_recorder(sent), size=10, timeout_s=60.0, lane=lambda symbol: 0)
    for symbol in ("BTC/USDT", "SOL/USDT", "BTC/USDT", "SOL/USDT"):
        assert batcher.add(_event(symbol), symbol, {}).done()
    assert sent == [["BTC/USDT"], ["SOL/USDT"], ["BTC/USDT"], ["SOL/USDT"]]
