"""Pure core of the features service: candles in, feature rows out, per symbol.

No I/O and no clock: the bar time comes with the candle. A candle whose bar is not after
the last one processed for its symbol (a redelivery, or an old bar) is ignored and counted,
so at-least-once delivery never advances an engine twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from hean.core.candles import Candle
from hean.core.features import (
    FEATURE_VERSION,
    WARMUP_BARS,
    FeatureEngine,
    FeatureEngines,
    FeatureEngineState,
)


class BadCandleError(ValueError):
    """A CANDLE event whose data cannot be a candle (retrying cannot help)."""


def candle_from_event(data: Mapping[str, Any], event_timestamp_ns: int) -> Candle:
    """A `Candle` from CANDLE event data; the bar time is `data["timestamp"]` (bar open, ns),
    else the event's own timestamp."""
    try:
        ts = data.get("timestamp")
        return Candle(
            symbol=str(data["symbol"]),
            timeframe=str(data.get("timeframe") or "1m"),
            timestamp_ns=int(ts) if ts is not None else int(event_timestamp_ns),
            open=Decimal(str(data["open"])),
            high=Decimal(str(data["high"])),
            low=Decimal(str(data["low"])),
            close=Decimal(str(data["close"])),
            volume=Decimal(str(data["volume"])),
        )
    except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
        raise BadCandleError(f"not a candle: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class CandleOutcome:
    """What one candle did: features to publish (None while warming up or when stale), and
    the bar of the symbol's previous features (None when this is the first row)."""

    features: dict[str, float] | None
    stale: bool
    bars_seen: int
    previous_timestamp_ns: int | None = None


class FeatureCore:
    """One streaming `FeatureEngine` per symbol, with snapshots for restarts."""

    def __init__(self, *, warmup_bars: int = WARMUP_BARS) -> None:
        self.warmup_bars = warmup_bars
        self.engines = FeatureEngines(warmup_bars=warmup_bars)

    def on_candle(self, candle: Candle) -> CandleOutcome:
        known = candle.symbol in self.engines
        before = self.engines[candle.symbol].stale_candles if known else 0
        previous = None
        if known and self.engines[candle.symbol].warmed_up:
            previous = self.engines[candle.symbol].last_timestamp_ns  # it published a row
        features = self.engines.update(candle)
        engine = self.engines[candle.symbol]
        if features is None:
            previous = None
        return CandleOutcome(features, engine.stale_candles > before, engine.bars_seen, previous)

    @property
    def stale_candles(self) -> int:
        return sum(self.engines[s].stale_candles for s in self.engines.symbols)

    def snapshot(self, symbol: str) -> dict[str, Any]:
        """The symbol's engine state as a JSON-friendly dict."""
        return self.engines[symbol].snapshot().to_dict()

    def restore(self, symbol: str, state: Mapping[str, Any] | None) -> None:
        """Put the symbol's engine back to `state` (a fresh engine for None)."""
        if state is None:
            engine = FeatureEngine(symbol, warmup_bars=self.warmup_bars)
        else:
            engine = FeatureEngine.restore(
                FeatureEngineState.from_dict(state), warmup_bars=self.warmup_bars
            )
            if engine.symbol != symbol:
                raise ValueError(f"snapshot of {engine.symbol!r} stored under {symbol!r}")
        self.engines.put(engine)

    @staticmethod
    def features_data(
        candle: Candle, features: Mapping[str, float], previous_timestamp_ns: int | None = None
    ) -> dict[str, Any]:
        """FEATURES_READY data for the features at `candle`'s close. `previous_timestamp`
        is the bar of the symbol's previous row (None for the first): it chains the rows,
        so that a consumer can tell a row that is late from one that never came."""
        return {
            "symbol": candle.symbol,
            "features": dict(features),
            "timestamp": candle.timestamp_ns,
            "previous_timestamp": previous_timestamp_ns,
            "timeframe": candle.timeframe,
            "close": float(candle.close),
            "feature_version": FEATURE_VERSION,
        }
