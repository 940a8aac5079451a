"""The strategy service on a real Redis: predictions become SIGNALs, the position intent
and cooldown survive a restart, and a repeated prediction does not signal twice."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from hean.core.event_streams import stream_key
from hean.core.settings import SettingsError, load_settings
from hean.core.types import Event, EventType
from hean.strategy.core import signal_event_id
from hean.strategy.service import StrategySettings, build
from tests.helpers import eventually
from tests.integration.signal_path_helpers import FAST, drained, publish, read, running

BAR = 60_000_000_000
UP = {"ema_fast_slow": 1e-4, "rsi_14": 55.0, "rv_ratio_15_60": 1.0}
DOWN = {"ema_fast_slow": -1e-4, "rsi_14": 45.0, "rv_ratio_15_60": 1.0}


def prediction(
    p: float, bar: int, features: dict[str, float], previous: int | None = None
) -> Event:
    data = {
        "symbol": "BTC/USDT",
        "prediction": p,
        "confidence": abs(2 * p - 1),
        "model_version": "m1",
        "timestamp": bar * BAR,
        "features": features,
    }
    if previous is not None:
        data["previous_timestamp"] = previous * BAR
    return Event(event_type=EventType.ML_PREDICTION, data=data)


def _settings(url: str, **extra: Any) -> StrategySettings:
    return StrategySettings(
        REDIS_URL=url, SERVICE_NAME="strategy", STRATEGY_COOLDOWN_BARS=3, **FAST, **extra
    )


def chain() -> list[Event]:
    """Bars 10-14 and 16, each naming the one before it: BUY at 10, SELL at 13 (after the
    cooldown), BUY at 16. In bar order these give three signals. Made when the test runs:
    a prediction older than STRATEGY_MAX_AGE_MS on arrival is ignored."""
    return [
        prediction(0.60, 10, UP),
        prediction(0.50, 11, UP, previous=10),
        prediction(0.30, 12, DOWN, previous=11),
        prediction(0.30, 13, DOWN, previous=12),
        prediction(0.62, 14, DOWN, previous=13),
        prediction(0.62, 16, UP, previous=14),
    ]


IN_ORDER = [("BUY", 10), ("SELL", 13), ("BUY", 16)]


def _sides(signals: list[Event]) -> list[tuple[str, int]]:
    return [(s.data["side"], s.data["bar_timestamp"] // BAR) for s in signals]


async def _handled(client: aioredis.Redis) -> bool:
    return await drained(client, EventType.ML_PREDICTION, "strategy")


async def _run(settings: StrategySettings, predictions: list[Event]) -> None:
    """Run the strategy service until it has handled (and acked) `predictions`."""
    async with running("strategy", build, settings) as ctx:
        await publish(settings.redis_url, predictions)
        await eventually(lambda: _handled(ctx.redis), timeout=10, message="predictions handled")


async def test_strategy_service_signals_and_keeps_intent_across_restart(
    redis_url: str,
) -> None:
    await _run(
        _settings(redis_url),
        [
            prediction(0.60, 10, UP),  # BUY
            prediction(0.60, 10, UP),  # the same bar again: ignored
            prediction(0.50, 11, UP),  # neutral
            prediction(0.30, 12, DOWN),  # SELL wanted, but within the cooldown
            prediction(0.62, 13, DOWN),  # BUY wanted, trend disagrees
        ],
    )
    await _run(
        _settings(redis_url),
        [
            prediction(0.65, 14, UP),  # still BUY: intent unchanged after the restart
            prediction(0.30, 15, DOWN),  # SELL, cooldown over
        ],
    )

    signals = await read(redis_url, EventType.SIGNAL)
    assert [(s.data["side"], s.data["bar_timestamp"] // BAR) for s in signals] == [
        ("BUY", 10),
        ("SELL", 15),
    ]
    buy, sell = signals
    assert buy.data["signal_strength"] == pytest.approx(0.60)
    assert sell.data["signal_strength"] == pytest.approx(0.70)
    assert buy.data["model_version"] == "m1"
    assert buy.event_id == signal_event_id("ml_threshold", "BTC/USDT", "BUY", 10 * BAR)


async def test_strategy_puts_predictions_from_replicas_back_in_bar_order(
    redis_url: str,
) -> None:
    # As replicas finishing in any order would publish them: 11 and 13 before their
    # predecessors. Without the reordering 10 and 12 would be dropped as stale.
    await _run(_settings(redis_url), [chain()[i] for i in (1, 0, 3, 4, 2, 5)])
    assert _sides(await read(redis_url, EventType.SIGNAL)) == IN_ORDER


async def test_strategy_decides_without_a_prediction_that_never_comes_after_the_wait(
    redis_url: str,
) -> None:
    # Bar 12 never comes (its FEATURES_READY was dead-lettered, say).
    settings = _settings(redis_url, STRATEGY_REORDER_WAIT_MS=300)
    await _run(settings, [chain()[i] for i in (0, 1, 3, 4, 5)])
    # 13 waited for 12, then went ahead: SELL at 13, and the rest as before.
    assert _sides(await read(redis_url, EventType.SIGNAL)) == IN_ORDER


async def test_strategy_held_prediction_stays_unacked_over_a_restart_and_is_decided_in_order(
    redis_url: str,
) -> None:
    settings = _settings(redis_url, STRATEGY_REORDER_WAIT_MS=60_000)
    bars = chain()
    async with running("strategy", build, settings) as ctx:
        await publish(redis_url, [bars[0], bars[2], bars[3]])  # 12 and 13 wait for 11

        async def two_pending() -> bool:
            info = await ctx.redis.xpending(stream_key(EventType.ML_PREDICTION), "strategy")
            return int(info["pending"]) == 2

        await eventually(two_pending, timeout=10, message="12 and 13 held, unacked")
    assert _sides(await read(redis_url, EventType.SIGNAL)) == [("BUY", 10)]
    # The next instance gets them again, then 11 comes: all decided in bar order.
    await _run(settings, [bars[1], bars[4], bars[5]])
    assert _sides(await read(redis_url, EventType.SIGNAL)) == IN_ORDER


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"STRATEGY_BUY_THRESHOLD": "1.5"}, "STRATEGY_BUY_THRESHOLD"),
        ({"STRATEGY": "nope"}, "STRATEGY"),
        ({"STRATEGY_BUY_THRESHOLD": "0.4"}, "STRATEGY_SELL_THRESHOLD"),
    ],
)
def test_strategy_settings_bad_value_names_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings(StrategySettings)
