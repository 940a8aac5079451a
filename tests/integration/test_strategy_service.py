"""The strategy service on a real Redis: predictions become SIGNALs, the position intent
and cooldown survive a restart, and a repeated prediction does not signal twice."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from hean.core.settings import SettingsError, load_settings
from hean.core.types import Event, EventType
from hean.strategy.core import signal_event_id
from hean.strategy.service import StrategySettings, build
from tests.helpers import eventually
from tests.integration.signal_path_helpers import FAST, drained, publish, read, running

BAR = 60_000_000_000
UP = {"ema_fast_slow": 1e-4, "rsi_14": 55.0, "rv_ratio_15_60": 1.0}
DOWN = {"ema_fast_slow": -1e-4, "rsi_14": 45.0, "rv_ratio_15_60": 1.0}


def prediction(p: float, bar: int, features: dict[str, float]) -> Event:
    return Event(
        event_type=EventType.ML_PREDICTION,
        data={
            "symbol": "BTC/USDT",
            "prediction": p,
            "confidence": abs(2 * p - 1),
            "model_version": "m1",
            "timestamp": bar * BAR,
            "features": features,
        },
    )


def _settings(url: str) -> StrategySettings:
    return StrategySettings(
        REDIS_URL=url, SERVICE_NAME="strategy", STRATEGY_COOLDOWN_BARS=3, **FAST
    )


async def _handled(client: aioredis.Redis) -> bool:
    return await drained(client, EventType.ML_PREDICTION, "strategy")


async def test_strategy_service_signals_and_keeps_intent_across_restart(
    redis_url: str,
) -> None:
    async with running("strategy", build, _settings(redis_url)) as ctx:
        await publish(
            redis_url,
            [
                prediction(0.60, 10, UP),  # BUY
                prediction(0.60, 10, UP),  # the same bar again: ignored
                prediction(0.50, 11, UP),  # neutral
                prediction(0.30, 12, DOWN),  # SELL wanted, but within the cooldown
                prediction(0.62, 13, DOWN),  # BUY wanted, trend disagrees
            ],
        )
        await eventually(lambda: _handled(ctx.redis), timeout=10, message="predictions handled")

    async with running("strategy", build, _settings(redis_url)) as ctx:
        await publish(
            redis_url,
            [
                prediction(0.65, 14, UP),  # still BUY: intent unchanged after the restart
                prediction(0.30, 15, DOWN),  # SELL, cooldown over
            ],
        )
        await eventually(lambda: _handled(ctx.redis), timeout=10, message="predictions handled")

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
