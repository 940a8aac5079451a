"""Pure core of the strategy service: (state, prediction) -> (new state, signal or nothing).

No I/O and no clock reads: the bar time comes with the prediction, and the time it was
received is passed in by the wiring.

The default strategy, `ml_threshold`:

1. drops a prediction for a bar not after the last one seen for its symbol (redelivered or
   out of order) and one older than `max_age_ns` when it arrives;
2. wants BUY when P(up) >= `buy_threshold`, SELL when P(up) <= `sell_threshold`, nothing
   in between;
3. emits nothing while the wanted side equals the last signalled one (the position intent
   is unchanged), nor within `cooldown_bars` bars of the last signal;
4. with the technical filter on, BUY needs an up trend (EMA12 above EMA26,
   `ema_fast_slow > 0`) and RSI(14) below `rsi_overbought`; SELL the mirror image; and no
   signal while short-term volatility is above `max_vol_ratio` times the hourly one
   (`rv_ratio_15_60`).

The signal's `signal_strength` is the model's probability that the signalled side wins
(P(up) for BUY, 1 - P(up) for SELL): the risk service sizes with it as a win probability.

Strategies are pluggable: anything with `name` and `decide(state, prediction)` (the
`Strategy` protocol), selected by the STRATEGY setting (a name in `STRATEGIES` or
`module:factory`, the factory taking a `StrategyConfig`).
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from hean.core.types import Side


@dataclass(frozen=True, slots=True)
class StrategyConfig:
    buy_threshold: float = 0.55
    sell_threshold: float = 0.45
    cooldown_bars: int = 5
    bar_ns: int = 60_000_000_000
    max_age_ns: int = 30_000_000_000
    trend_filter: bool = True
    rsi_overbought: float = 70.0
    rsi_oversold: float = 30.0
    max_vol_ratio: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sell_threshold < self.buy_threshold <= 1.0:
            raise ValueError(
                "thresholds need 0 <= sell_threshold < buy_threshold <= 1 "
                f"(got sell {self.sell_threshold}, buy {self.buy_threshold})"
            )
        if self.cooldown_bars < 0 or self.bar_ns <= 0 or self.max_age_ns < 0:
            raise ValueError("cooldown_bars and max_age_ns must be >= 0, bar_ns > 0")


@dataclass(frozen=True, slots=True)
class SymbolState:
    """What a strategy remembers per symbol."""

    last_bar_ns: int | None = None
    intent: Side | None = None
    last_signal_bar_ns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_bar_ns": self.last_bar_ns,
            "intent": self.intent.value if self.intent is not None else None,
            "last_signal_bar_ns": self.last_signal_bar_ns,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SymbolState:
        intent = data.get("intent")
        last = data.get("last_bar_ns")
        last_signal = data.get("last_signal_bar_ns")
        return cls(
            last_bar_ns=int(last) if last is not None else None,
            intent=Side(intent) if intent else None,
            last_signal_bar_ns=int(last_signal) if last_signal is not None else None,
        )


@dataclass(frozen=True, slots=True)
class PredictionInput:
    """One ML_PREDICTION, as the strategy needs it."""

    symbol: str
    prediction: float
    bar_ns: int
    published_ns: int
    received_ns: int
    confidence: float | None = None
    model_version: str | None = None
    features: Mapping[str, float] | None = None
    #: The bar of the symbol's previous prediction (features chains its rows); None for
    #: the first, or from a producer that does not say.
    previous_bar_ns: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    state: SymbolState
    signal: dict[str, Any] | None
    reason: str


class Strategy(Protocol):
    name: str

    def decide(self, state: SymbolState, prediction: PredictionInput) -> Decision: ...


class MLThresholdStrategy:
    """The default strategy (see the module docstring)."""

    name = "ml_threshold"

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config

    def decide(self, state: SymbolState, prediction: PredictionInput) -> Decision:
        cfg = self.config
        bar = prediction.bar_ns
        if state.last_bar_ns is not None and bar <= state.last_bar_ns:
            return Decision(state, None, "stale: bar not after the last one seen")
        seen = replace(state, last_bar_ns=bar)
        age = prediction.received_ns - prediction.published_ns
        if cfg.max_age_ns and age > cfg.max_age_ns:
            return Decision(seen, None, f"too old: {age / 1e9:.1f} s")
        p = prediction.prediction
        if p >= cfg.buy_threshold:
            side = Side.BUY
        elif p <= cfg.sell_threshold:
            side = Side.SELL
        else:
            return Decision(seen, None, "neutral: prediction between the thresholds")
        if state.intent is side:
            return Decision(seen, None, f"intent unchanged: already {side.value}")
        if (
            cfg.cooldown_bars
            and state.last_signal_bar_ns is not None
            and bar - state.last_signal_bar_ns < cfg.cooldown_bars * cfg.bar_ns
        ):
            return Decision(seen, None, f"cooldown: within {cfg.cooldown_bars} bars")
        why_not = self._filter(side, prediction.features)
        if why_not is not None:
            return Decision(seen, None, why_not)
        strength = p if side is Side.BUY else 1.0 - p
        signal = {
            "symbol": prediction.symbol,
            "side": side.value,
            "signal_strength": min(max(strength, 0.0), 1.0),
            "prediction": p,
            "confidence": prediction.confidence,
            "model_version": prediction.model_version,
            "bar_timestamp": bar,
            "strategy": self.name,
        }
        return Decision(
            replace(seen, intent=side, last_signal_bar_ns=bar), signal, f"{side.value} at p={p:.4f}"
        )

    def _filter(self, side: Side, features: Mapping[str, float] | None) -> str | None:
        cfg = self.config
        if not cfg.trend_filter and not cfg.max_vol_ratio:
            return None
        if features is None:
            return "filtered: no features to confirm with"
        if cfg.max_vol_ratio:
            ratio = features.get("rv_ratio_15_60")
            if ratio is not None and ratio > cfg.max_vol_ratio:
                return f"filtered: volatility spike (rv_ratio_15_60={ratio:.2f})"
        if cfg.trend_filter:
            trend = features.get("ema_fast_slow")
            rsi = features.get("rsi_14")
            if trend is None or rsi is None:
                return "filtered: ema_fast_slow or rsi_14 missing"
            if side is Side.BUY and not (trend > 0 and rsi < cfg.rsi_overbought):
                return f"filtered: no up trend or overbought (trend={trend:.2e}, rsi={rsi:.1f})"
            if side is Side.SELL and not (trend < 0 and rsi > cfg.rsi_oversold):
                return f"filtered: no down trend or oversold (trend={trend:.2e}, rsi={rsi:.1f})"
        return None


StrategyFactory = Callable[[StrategyConfig], Strategy]

STRATEGIES: dict[str, StrategyFactory] = {MLThresholdStrategy.name: MLThresholdStrategy}


def load_strategy(spec: str, config: StrategyConfig) -> Strategy:
    """A strategy by registered name, or `package.module:factory` for your own."""
    factory = STRATEGIES.get(spec)
    if factory is None:
        module_name, sep, attr = spec.partition(":")
        if not sep:
            known = ", ".join(sorted(STRATEGIES))
            raise ValueError(f"unknown strategy {spec!r} (known: {known}, or module:factory)")
        factory = getattr(importlib.import_module(module_name), attr)
    return factory(config)


def signal_event_id(strategy: str, symbol: str, side: str, bar_ns: int) -> str:
    """The SIGNAL's event id, fixed by what it says: a redelivered prediction that signals
    again yields the same id (so the order derived from it is the same order). Same shape
    as other event ids: 16 hex digits of time (the bar's), then 8 more."""
    tag = zlib.crc32(f"{strategy}|{symbol}|{side}".encode())
    return f"{bar_ns:016x}{tag:08x}"
