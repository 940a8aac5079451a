"""market-data's pure core: ticks inside a bar, replay timing, and the live bar tracker."""

from __future__ import annotations

from decimal import Decimal

import pytest

from hean.core.candles import Candle
from hean.market_data.core import (
    BarTracker,
    replay_offset_s,
    replay_shift_ns,
    shifted,
    ticks_for_bar,
    timeframe_ns,
)

D = Decimal
SECOND = 1_000_000_000
MIN = 60 * SECOND


def candle(i: int, o: str = "100", h: str = "110", lo: str = "95", c: str = "105") -> Candle:
    return Candle("BTC", "1m", i * MIN, D(o), D(h), D(lo), D(c), D("10"))


@pytest.mark.parametrize(
    ("text", "expected"), [("1m", MIN), ("5m", 5 * MIN), ("1h", 60 * MIN), ("1d", 1440 * MIN)]
)
def test_timeframe_ns_known_units_converted(text: str, expected: int) -> None:
    assert timeframe_ns(text) == expected


@pytest.mark.parametrize("text", ["", "m", "0m", "1x", "-1m", "1.5m"])
def test_timeframe_ns_bad_text_raises(text: str) -> None:
    with pytest.raises(ValueError, match="unsupported timeframe"):
        timeframe_ns(text)


def test_ticks_for_bar_up_bar_visits_low_before_high() -> None:
    ticks = ticks_for_bar(candle(3), MIN)
    assert [t.price for t in ticks] == [D("100"), D("95"), D("110"), D("105")]


def test_ticks_for_bar_down_bar_visits_high_before_low() -> None:
    ticks = ticks_for_bar(candle(3, o="105", c="100"), MIN)
    assert [t.price for t in ticks] == [D("105"), D("110"), D("95"), D("100")]


def test_ticks_for_bar_volume_sums_exactly_and_times_inside_bar() -> None:
    bar = Candle("BTC", "1m", 7 * MIN, D(1), D(2), D(1), D(2), D("1234.5678901"))
    ticks = ticks_for_bar(bar, MIN)
    assert sum((t.volume for t in ticks), D(0)) == bar.volume
    times = [t.timestamp_ns for t in ticks]
    assert times == sorted(times)
    assert times[0] == bar.timestamp_ns
    assert times[-1] < bar.timestamp_ns + MIN


def test_replay_shift_ns_later_loops_start_one_bar_after_previous_end() -> None:
    assert replay_shift_ns(0, 9 * MIN, MIN, 0) == 0
    assert replay_shift_ns(0, 9 * MIN, MIN, 1) == 10 * MIN
    assert replay_shift_ns(0, 9 * MIN, MIN, 3) == 30 * MIN


def test_replay_offset_s_speed_scales_real_time_zero_is_immediate() -> None:
    assert replay_offset_s(10, MIN, 60.0) == pytest.approx(10.0)
    assert replay_offset_s(10, MIN, 1.0) == pytest.approx(600.0)
    assert replay_offset_s(10, MIN, 0.0) == 0.0


def test_shifted_relabels_symbol_and_moves_time() -> None:
    moved = shifted(candle(1), "ETH", 5 * MIN)
    assert (moved.symbol, moved.timestamp_ns, moved.close) == ("ETH", 6 * MIN, D("105"))


def test_bar_tracker_first_answer_publishes_closed_bars_in_order() -> None:
    tracker = BarTracker(MIN)
    result = tracker.accept("BTC", [candle(2), candle(0), candle(1), candle(3)], 3 * MIN + 1)
    assert [c.timestamp_ns for c in result.publish] == [0, MIN, 2 * MIN]
    assert result.forming is not None and result.forming.timestamp_ns == 3 * MIN
    assert result.gaps == ()


def test_bar_tracker_newest_bar_just_ended_waits_for_a_newer_one_or_the_grace() -> None:
    # The exchange's answer can lag the bar's last trades, and this clock can run ahead:
    # a bar published the moment it ends by this clock alone could miss them for good.
    tracker = BarTracker(MIN)
    just_ended = tracker.accept("BTC", [candle(0), candle(1)], 2 * MIN + 3 * SECOND)
    assert [c.timestamp_ns for c in just_ended.publish] == [0]
    assert just_ended.forming is not None and just_ended.forming.timestamp_ns == MIN
    tracker.commit("BTC", just_ended.publish)
    # The exchange now shows the next bar: the one before it is closed on its word.
    newer = tracker.accept("BTC", [candle(1), candle(2)], 2 * MIN + 4 * SECOND)
    assert [c.timestamp_ns for c in newer.publish] == [MIN]
    tracker.commit("BTC", newer.publish)
    # Nothing newer shown (a quiet market): closed once the grace has passed.
    quiet = tracker.accept("BTC", [candle(2)], 3 * MIN + 10 * SECOND)
    assert [c.timestamp_ns for c in quiet.publish] == [2 * MIN]
    assert quiet.forming is None


def test_bar_tracker_overlapping_answer_drops_bars_already_published() -> None:
    tracker = BarTracker(MIN)
    first = tracker.accept("BTC", [candle(i) for i in range(3)], 10 * MIN)
    tracker.commit("BTC", first.publish)
    again = tracker.accept("BTC", [candle(i) for i in range(5)], 10 * MIN)
    assert [c.timestamp_ns // MIN for c in again.publish] == [3, 4]
    assert again.already_seen == 3
    assert tracker.since_ns("BTC") == 3 * MIN


def test_bar_tracker_uncommitted_bars_offered_again() -> None:
    tracker = BarTracker(MIN)
    tracker.accept("BTC", [candle(0), candle(1)], 10 * MIN)  # publishing failed: no commit
    retry = tracker.accept("BTC", [candle(0), candle(1)], 10 * MIN)
    assert len(retry.publish) == 2


def test_bar_tracker_missing_bars_reported_as_gap() -> None:
    tracker = BarTracker.restore(MIN, {"BTC": 4 * MIN})
    result = tracker.accept("BTC", [candle(5), candle(9), candle(10)], 20 * MIN)
    assert [c.timestamp_ns // MIN for c in result.publish] == [5, 9, 10]
    assert len(result.gaps) == 1
    gap = result.gaps[0]
    assert (gap.after_ns, gap.next_ns, gap.missing_bars) == (5 * MIN, 9 * MIN, 3)
    assert "3 bar(s) missing" in gap.describe()


def test_bar_tracker_symbols_tracked_independently() -> None:
    tracker = BarTracker(MIN)
    tracker.commit("BTC", [candle(5)])
    eth = Candle("ETH", "1m", 2 * MIN, D(1), D(1), D(1), D(1), D(1))
    result = tracker.accept("ETH", [eth], 10 * MIN)
    assert result.publish == (eth,)
    assert tracker.since_ns("ETH") is None


def test_replay_offset_s_warmup_bars_immediate_then_paced_from_their_end() -> None:
    assert replay_offset_s(0, MIN, 60.0, warmup_bars=240) == 0.0
    assert replay_offset_s(239, MIN, 60.0, warmup_bars=240) == 0.0
    assert replay_offset_s(240, MIN, 60.0, warmup_bars=240) == 0.0
    assert replay_offset_s(250, MIN, 60.0, warmup_bars=240) == pytest.approx(10.0)
