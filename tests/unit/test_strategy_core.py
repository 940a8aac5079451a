"""The strategy's pure core: thresholds, intent, cooldown, age, filters, pluggability; and
how a prediction event is read."""

from __future__ import annotations

from typing import Any

import pytest

from hean.core.errors import PermanentError
from hean.core.types import Event, EventType, Side
from hean.strategy.core import (
    Decision,
    MLThresholdStrategy,
    PredictionInput,
    StrategyConfig,
    SymbolState,
    load_strategy,
    signal_event_id,
)
from hean.strategy.service import prediction_input

BAR = 60_000_000_000
UP = {"ema_fast_slow": 1e-4, "rsi_14": 55.0, "rv_ratio_15_60": 1.0}
DOWN = {"ema_fast_slow": -1e-4, "rsi_14": 45.0, "rv_ratio_15_60": 1.0}


def pred(p: float, bar: int, features: dict[str, float] | None = None, age_s: float = 0.1) -> Any:
    published = 1_000 * BAR
    return PredictionInput(
        symbol="BTC",
        prediction=p,
        bar_ns=bar * BAR,
        published_ns=published,
        received_ns=published + int(age_s * 1e9),
        confidence=abs(2 * p - 1),
        model_version="m1",
        features=features,
    )


def run(strategy: MLThresholdStrategy, *preds: PredictionInput) -> list[Decision]:
    state = SymbolState()
    out = []
    for p in preds:
        decision = strategy.decide(state, p)
        state = decision.state
        out.append(decision)
    return out


def plain(**overrides: Any) -> MLThresholdStrategy:
    values: dict[str, Any] = {"trend_filter": False, "max_vol_ratio": 0.0, "cooldown_bars": 0}
    values.update(overrides)
    return MLThresholdStrategy(StrategyConfig(**values))


def test_decide_above_buy_threshold_signals_buy_with_win_probability() -> None:
    (d,) = run(plain(), pred(0.6, 1))
    assert d.signal is not None
    assert d.signal["side"] == "BUY"
    assert d.signal["signal_strength"] == pytest.approx(0.6)
    assert d.signal["model_version"] == "m1"
    assert d.state.intent is Side.BUY


def test_decide_below_sell_threshold_signals_sell_strength_one_minus_p() -> None:
    (d,) = run(plain(), pred(0.3, 1))
    assert d.signal is not None and d.signal["side"] == "SELL"
    assert d.signal["signal_strength"] == pytest.approx(0.7)


def test_decide_between_thresholds_no_signal() -> None:
    (d,) = run(plain(), pred(0.5, 1))
    assert d.signal is None and d.reason.startswith("neutral")


def test_decide_same_intent_again_no_repeated_signal() -> None:
    decisions = run(plain(), pred(0.6, 1), pred(0.5, 2), pred(0.7, 3), pred(0.3, 4))
    assert [d.signal["side"] if d.signal else None for d in decisions] == [
        "BUY",
        None,
        None,
        "SELL",
    ]
    assert decisions[2].reason.startswith("intent unchanged")


def test_decide_within_cooldown_bars_suppressed_then_allowed() -> None:
    decisions = run(plain(cooldown_bars=3), pred(0.6, 10), pred(0.3, 12), pred(0.3, 13))
    assert decisions[1].signal is None and decisions[1].reason.startswith("cooldown")
    assert decisions[2].signal is not None and decisions[2].signal["side"] == "SELL"


def test_decide_redelivered_or_older_bar_ignored_state_unchanged() -> None:
    strategy = plain()
    first = strategy.decide(SymbolState(), pred(0.6, 5))
    again = strategy.decide(first.state, pred(0.3, 5))
    older = strategy.decide(first.state, pred(0.3, 4))
    for d in (again, older):
        assert d.signal is None and d.reason.startswith("stale")
        assert d.state == first.state


def test_decide_prediction_older_than_max_age_dropped() -> None:
    strategy = plain(max_age_ns=5_000_000_000)
    (d,) = run(strategy, pred(0.9, 1, age_s=6.0))
    assert d.signal is None and d.reason.startswith("too old")
    assert d.state.last_bar_ns == BAR


def test_decide_trend_filter_requires_matching_trend() -> None:
    strategy = plain(trend_filter=True)
    assert run(strategy, pred(0.6, 1, DOWN))[0].signal is None
    assert run(strategy, pred(0.6, 1, UP))[0].signal is not None
    assert run(strategy, pred(0.3, 1, UP))[0].signal is None
    assert run(strategy, pred(0.3, 1, DOWN))[0].signal is not None


def test_decide_trend_filter_overbought_rsi_blocks_buy() -> None:
    strategy = plain(trend_filter=True, rsi_overbought=70.0)
    (d,) = run(strategy, pred(0.6, 1, dict(UP, rsi_14=80.0)))
    assert d.signal is None and "overbought" in d.reason


def test_decide_volatility_spike_blocks_signal() -> None:
    strategy = plain(max_vol_ratio=2.0)
    (d,) = run(strategy, pred(0.6, 1, dict(UP, rv_ratio_15_60=2.5)))
    assert d.signal is None and "volatility" in d.reason


def test_decide_filter_without_features_no_signal() -> None:
    (d,) = run(plain(trend_filter=True), pred(0.6, 1, None))
    assert d.signal is None and "no features" in d.reason


@pytest.mark.parametrize(("sell", "buy"), [(0.6, 0.4), (0.5, 0.5), (-0.1, 0.6), (0.4, 1.1)])
def test_strategy_config_bad_thresholds_rejected(sell: float, buy: float) -> None:
    with pytest.raises(ValueError, match="thresholds"):
        StrategyConfig(buy_threshold=buy, sell_threshold=sell)


def test_symbol_state_round_trips_through_dict() -> None:
    state = SymbolState(last_bar_ns=5, intent=Side.SELL, last_signal_bar_ns=3)
    assert SymbolState.from_dict(state.to_dict()) == state
    assert SymbolState.from_dict(SymbolState().to_dict()) == SymbolState()


def test_signal_event_id_same_inputs_same_id_different_side_differs() -> None:
    a = signal_event_id("ml_threshold", "BTC", "BUY", 7 * BAR)
    assert a == signal_event_id("ml_threshold", "BTC", "BUY", 7 * BAR)
    assert a != signal_event_id("ml_threshold", "BTC", "SELL", 7 * BAR)
    assert a < signal_event_id("ml_threshold", "BTC", "BUY", 8 * BAR)
    assert len(a) == 24


class AlwaysBuy:
    name = "always_buy"

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config

    def decide(self, state: SymbolState, prediction: PredictionInput) -> Decision:
        return Decision(state, {"symbol": prediction.symbol, "side": "BUY"}, "always")


def test_load_strategy_by_name_and_module_path() -> None:
    assert isinstance(load_strategy("ml_threshold", StrategyConfig()), MLThresholdStrategy)
    custom = load_strategy("tests.unit.test_strategy_core:AlwaysBuy", StrategyConfig())
    assert custom.name == "always_buy"


def test_load_strategy_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        load_strategy("nope", StrategyConfig())


def test_prediction_input_reads_the_chain_and_refuses_a_bad_bar_time() -> None:
    data = {"symbol": "BTC/USDT", "prediction": 0.6, "timestamp": 120, "previous_timestamp": 60}
    event = Event(event_type=EventType.ML_PREDICTION, data=data)
    pred = prediction_input(event, received_ns=1)
    assert (pred.bar_ns, pred.previous_bar_ns) == (120, 60)
    first = Event(event_type=EventType.ML_PREDICTION, data={**data, "previous_timestamp": None})
    assert prediction_input(first, received_ns=1).previous_bar_ns is None
    bad = Event(event_type=EventType.ML_PREDICTION, data={**data, "previous_timestamp": "soon"})
    with pytest.raises(PermanentError, match="bad bar time"):
        prediction_input(bad, received_ns=1)
