"""The one definition of every model feature, computed bar by bar.

The features service (live) and model training (offline) both call `FeatureEngine.update`
on candles in time order, so the features a model sees in production are computed by the
same code, in the same order of floating-point operations, as the ones it was trained on.

Every feature is scale-free (a log return, a ratio to the price, a z-score or a bounded
oscillator), so a model trained on BTC at 46,000 still applies at 38,000. Work per bar is
constant: fixed-size deques, exponential and Wilder recursions, and sliding-window moments
kept with a sliding Welford update that is recomputed exactly from its window once per
window length (amortised O(1), and no running sum of squares left to drift).

Definitions (c = close, h = high, l = low, o = open, v = volume; t = this bar):

- `ret_k`: log(c_t / c_{t-k}) for k in 1, 3, 5, 15, 30, 60.
- `ema_ratio_n`: c_t / EMA_n(c) - 1 for n in 5, 20, 60. EMA_n: alpha = 2 / (n + 1), seeded
  with the first close (`pandas.Series.ewm(span=n, adjust=False)`).
- `ema_fast_slow`: EMA_12(c) / EMA_26(c) - 1.
- `macd_close`, `macd_signal_close`, `macd_hist_close`: MACD = EMA_12 - EMA_26, signal =
  EMA_9(MACD) seeded with the first MACD, hist = MACD - signal; each divided by c_t.
- `rsi_14`, `rsi_6`: Wilder RSI in [0, 100] on close-to-close changes. The averages are
  seeded with the simple mean of the first n gains and losses, then
  avg = (avg * (n - 1) + x) / n. RSI = 100 * avg_gain / (avg_gain + avg_loss), 50 if both
  are zero.
- `rv_15`, `rv_60`: sample standard deviation (ddof=1) of the last n one-bar log returns.
- `rv_ratio_15_60`: rv_15 / rv_60, 1 if rv_60 is zero.
- `atr_14_close`: Wilder ATR(14) / c_t. TR = max(h - l, |h - c_{t-1}|, |l - c_{t-1}|), the
  first bar's TR is h - l; ATR is seeded with the mean of the first 14 TRs.
- `bb_z_20`: (c_t - mean_20(c)) / std_20(c), population std (ddof=0).
- `volume_z_20`: (v_t - mean_20(v)) / std_20(v), population std (ddof=0).
- `hl_range`: (h - l) / c.
- `close_location`: (c - l) / (h - l), 0.5 if h == l.
- `oc_ret`: log(c / o).

A window whose values are all equal has a standard deviation of exactly 0 (it is tracked
by run length, not by testing a float against a tolerance) and its z-score is 0.

Nothing is emitted until `WARMUP_BARS` candles have been seen: the longest finite window
needs 61 closes, and the warm-up also lets the EMAs forget their seed (the seed's weight
in EMA_60 is (1 - 2/61)^240 < 4e-4 by the first emitted bar).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hean.core.candles import Candle

__all__ = [
    "FEATURE_NAMES",
    "FEATURE_VERSION",
    "LONGEST_WINDOW",
    "WARMUP_BARS",
    "FeatureEngine",
    "FeatureEngineState",
    "FeatureEngines",
    "compute_feature_rows",
]

RETURN_HORIZONS: tuple[int, ...] = (1, 3, 5, 15, 30, 60)
EMA_RATIO_SPANS: tuple[int, ...] = (5, 20, 60)
MACD_FAST, MACD_SLOW, MACD_SIGNAL = 12, 26, 9
RSI_PERIODS: tuple[int, ...] = (14, 6)
RV_WINDOWS: tuple[int, ...] = (15, 60)
ATR_PERIOD = 14
BOLLINGER_WINDOW = 20
VOLUME_WINDOW = 20

LONGEST_WINDOW = max(*RETURN_HORIZONS, *RV_WINDOWS, BOLLINGER_WINDOW, VOLUME_WINDOW)
"""Bars of history the longest finite-window feature looks back over (60)."""

WARMUP_BARS = 240
"""Candles an engine must see before it emits features."""

FEATURE_NAMES: tuple[str, ...] = (
    *(f"ret_{k}" for k in RETURN_HORIZONS),
    *(f"ema_ratio_{n}" for n in EMA_RATIO_SPANS),
    "ema_fast_slow",
    "macd_close",
    "macd_signal_close",
    "macd_hist_close",
    *(f"rsi_{n}" for n in RSI_PERIODS),
    *(f"rv_{n}" for n in RV_WINDOWS),
    "rv_ratio_15_60",
    "atr_14_close",
    "bb_z_20",
    "volume_z_20",
    "hl_range",
    "close_location",
    "oc_ret",
)
"""Feature names in the order models consume them."""

FEATURE_VERSION = "f24.1"
"""Version of the feature definitions; bump when any definition or the warm-up changes, so
a consumer can tell features computed by different code apart."""

_EMA_SPANS: tuple[int, ...] = tuple(sorted({*EMA_RATIO_SPANS, MACD_FAST, MACD_SLOW}))


class _RollingMoments:
    """Mean and variance of the last `window` values in amortised O(1) per push.

    Sliding Welford update between exact two-pass recomputations from the window, done
    once every `window` pushes so rounding error cannot accumulate. A window of identical
    values (tracked by the current run length) has variance exactly 0.
    """

    __slots__ = ("_m2", "_mean", "_pushes_since_exact", "_run", "values", "window")

    def __init__(self, window: int) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2, got {window}")
        self.window = window
        self.values: deque[float] = deque(maxlen=window)
        self._mean = 0.0
        self._m2 = 0.0
        self._run = 0
        self._pushes_since_exact = 0

    def push(self, x: float) -> None:
        values = self.values
        self._run = self._run + 1 if values and values[-1] == x else 1
        n = len(values)
        if n == self.window:
            old = values[0]
            values.append(x)  # maxlen drops `old`
            mean = self._mean
            new_mean = mean + (x - old) / n
            self._m2 += (x - old) * (x - new_mean + old - mean)
            self._mean = new_mean
        else:
            values.append(x)
            delta = x - self._mean
            self._mean += delta / (n + 1)
            self._m2 += delta * (x - self._mean)
        self._pushes_since_exact += 1
        if self._pushes_since_exact >= self.window:
            self.recompute()

    def recompute(self) -> None:
        """Recompute mean and M2 exactly from the window (two-pass, compensated sums)."""
        n = len(self.values)
        self._pushes_since_exact = 0
        if n == 0:
            self._mean = self._m2 = 0.0
            return
        mean = math.fsum(self.values) / n
        self._mean = mean
        self._m2 = math.fsum((v - mean) * (v - mean) for v in self.values)

    @property
    def full(self) -> bool:
        return len(self.values) == self.window

    @property
    def flat(self) -> bool:
        """True when every value in the (full) window is equal."""
        return self._run >= len(self.values)

    @property
    def mean(self) -> float:
        return self.values[-1] if self.flat else self._mean

    def std(self, ddof: int) -> float:
        if self.flat:
            return 0.0
        return math.sqrt(max(self._m2, 0.0) / (len(self.values) - ddof))

    def zscore(self, x: float) -> float:
        """(x - mean) / population std; 0 for a flat window."""
        std = self.std(0)
        return 0.0 if std == 0.0 else (x - self._mean) / std

    def restore(self, values: Iterable[float], run: int) -> None:
        self.values.clear()
        self.values.extend(values)
        self._run = run
        self.recompute()


class _Wilder:
    """Wilder smoothing: simple mean of the first `period` inputs, then (a*(n-1)+x)/n."""

    __slots__ = ("count", "period", "total", "value")

    def __init__(self, period: int) -> None:
        self.period = period
        self.count = 0
        self.total = 0.0
        self.value = 0.0

    def push(self, x: float) -> None:
        if self.count < self.period:
            self.count += 1
            self.total += x
            if self.count == self.period:
                self.value = self.total / self.period
        else:
            self.value = (self.value * (self.period - 1) + x) / self.period

    @property
    def ready(self) -> bool:
        return self.count >= self.period


@dataclass(frozen=True, slots=True)
class FeatureEngineState:
    """A JSON-friendly snapshot of a `FeatureEngine`, to resume without a new warm-up."""

    symbol: str | None
    bars_seen: int
    last_timestamp_ns: int | None
    closes: tuple[float, ...]
    emas: tuple[tuple[int, float], ...]
    macd_signal: float
    wilder: tuple[tuple[str, int, float, float], ...]
    windows: tuple[tuple[str, tuple[float, ...], int], ...]
    stale_candles: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists and numbers) suitable for JSON."""
        return {
            "symbol": self.symbol,
            "bars_seen": self.bars_seen,
            "last_timestamp_ns": self.last_timestamp_ns,
            "closes": list(self.closes),
            "emas": [list(e) for e in self.emas],
            "macd_signal": self.macd_signal,
            "wilder": [list(w) for w in self.wilder],
            "windows": [[name, list(vals), run] for name, vals, run in self.windows],
            "stale_candles": self.stale_candles,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureEngineState:
        """Inverse of `to_dict`."""
        return cls(
            symbol=data["symbol"],
            bars_seen=int(data["bars_seen"]),
            last_timestamp_ns=(
                None if data["last_timestamp_ns"] is None else int(data["last_timestamp_ns"])
            ),
            closes=tuple(float(x) for x in data["closes"]),
            emas=tuple((int(s), float(v)) for s, v in data["emas"]),
            macd_signal=float(data["macd_signal"]),
            wilder=tuple((str(n), int(c), float(t), float(v)) for n, c, t, v in data["wilder"]),
            windows=tuple(
                (str(n), tuple(float(x) for x in vals), int(run))
                for n, vals, run in data["windows"]
            ),
            stale_candles=int(data.get("stale_candles", 0)),
        )


class FeatureEngine:
    """Streaming features for one symbol.

    Feed candles in time order with `update`. A candle whose time is not after the last
    one seen (a redelivered or out-of-order event) is ignored and counted in
    `stale_candles`, so at-least-once delivery never updates the state twice.
    """

    def __init__(self, symbol: str | None = None, *, warmup_bars: int = WARMUP_BARS) -> None:
        if warmup_bars < LONGEST_WINDOW + 1:
            raise ValueError(f"warmup_bars must be at least {LONGEST_WINDOW + 1}")
        self.symbol = symbol
        self.warmup_bars = warmup_bars
        self.bars_seen = 0
        self.last_timestamp_ns: int | None = None
        self.stale_candles = 0
        self._closes: deque[float] = deque(maxlen=max(RETURN_HORIZONS) + 1)
        self._emas: dict[int, float] = {}
        self._macd_signal = 0.0
        self._rsi = {n: (_Wilder(n), _Wilder(n)) for n in RSI_PERIODS}
        self._atr = _Wilder(ATR_PERIOD)
        self._rv = {n: _RollingMoments(n) for n in RV_WINDOWS}
        self._bb = _RollingMoments(BOLLINGER_WINDOW)
        self._vol = _RollingMoments(VOLUME_WINDOW)

    @property
    def warmed_up(self) -> bool:
        """True once `update` returns features."""
        return self.bars_seen >= self.warmup_bars

    def update(self, candle: Candle) -> dict[str, float] | None:
        """Add one candle; return the features at its close, or None while warming up.

        Also None for a stale candle (time not after the previous one). Raises
        `ValueError` for a candle of another symbol than the engine's.
        """
        if self.symbol is None:
            self.symbol = candle.symbol
        elif candle.symbol != self.symbol:
            raise ValueError(
                f"FeatureEngine for {self.symbol!r} got a candle for {candle.symbol!r}"
            )
        if self.last_timestamp_ns is not None and candle.timestamp_ns <= self.last_timestamp_ns:
            self.stale_candles += 1
            return None
        self.last_timestamp_ns = candle.timestamp_ns
        return self._step(
            float(candle.open),
            float(candle.high),
            float(candle.low),
            float(candle.close),
            float(candle.volume),
        )

    def _step(self, o: float, h: float, low: float, c: float, v: float) -> dict[str, float] | None:
        closes = self._closes
        prev = closes[-1] if closes else None
        closes.append(c)
        self.bars_seen += 1

        emas = self._emas
        if not emas:
            for span in _EMA_SPANS:
                emas[span] = c
        else:
            for span in _EMA_SPANS:
                e = emas[span]
                emas[span] = e + (2.0 / (span + 1)) * (c - e)
        macd = emas[MACD_FAST] - emas[MACD_SLOW]
        if self.bars_seen == 1:
            self._macd_signal = macd
        else:
            self._macd_signal += (2.0 / (MACD_SIGNAL + 1)) * (macd - self._macd_signal)

        if prev is None:
            self._atr.push(h - low)
        else:
            change = c - prev
            gain = change if change > 0.0 else 0.0
            loss = -change if change < 0.0 else 0.0
            for avg_gain, avg_loss in self._rsi.values():
                avg_gain.push(gain)
                avg_loss.push(loss)
            self._atr.push(max(h - low, abs(h - prev), abs(low - prev)))
            r1 = math.log(c / prev)
            for rolling in self._rv.values():
                rolling.push(r1)
        self._bb.push(c)
        self._vol.push(v)

        if self.bars_seen < self.warmup_bars:
            return None

        out: dict[str, float] = {}
        for k in RETURN_HORIZONS:
            out[f"ret_{k}"] = math.log(c / closes[-1 - k])
        for span in EMA_RATIO_SPANS:
            out[f"ema_ratio_{span}"] = c / emas[span] - 1.0
        out["ema_fast_slow"] = emas[MACD_FAST] / emas[MACD_SLOW] - 1.0
        out["macd_close"] = macd / c
        out["macd_signal_close"] = self._macd_signal / c
        out["macd_hist_close"] = (macd - self._macd_signal) / c
        for n, (avg_gain, avg_loss) in self._rsi.items():
            g, lo = avg_gain.value, avg_loss.value
            total = g + lo
            out[f"rsi_{n}"] = 50.0 if total == 0.0 else 100.0 * g / total
        rv = {n: self._rv[n].std(1) for n in RV_WINDOWS}
        for n in RV_WINDOWS:
            out[f"rv_{n}"] = rv[n]
        out["rv_ratio_15_60"] = 1.0 if rv[60] == 0.0 else rv[15] / rv[60]
        out["atr_14_close"] = self._atr.value / c
        out["bb_z_20"] = self._bb.zscore(c)
        out["volume_z_20"] = self._vol.zscore(v)
        out["hl_range"] = (h - low) / c
        out["close_location"] = 0.5 if h == low else (c - low) / (h - low)
        out["oc_ret"] = math.log(c / o)
        return out

    def snapshot(self) -> FeatureEngineState:
        """Capture the engine's state."""
        wilder: list[tuple[str, int, float, float]] = []
        for n, (avg_gain, avg_loss) in self._rsi.items():
            wilder.append((f"rsi_{n}_gain", avg_gain.count, avg_gain.total, avg_gain.value))
            wilder.append((f"rsi_{n}_loss", avg_loss.count, avg_loss.total, avg_loss.value))
        wilder.append(("atr", self._atr.count, self._atr.total, self._atr.value))
        windows = [(f"rv_{n}", tuple(r.values), r._run) for n, r in self._rv.items()]
        windows.append(("bb", tuple(self._bb.values), self._bb._run))
        windows.append(("volume", tuple(self._vol.values), self._vol._run))
        return FeatureEngineState(
            symbol=self.symbol,
            bars_seen=self.bars_seen,
            last_timestamp_ns=self.last_timestamp_ns,
            closes=tuple(self._closes),
            emas=tuple(sorted(self._emas.items())),
            macd_signal=self._macd_signal,
            wilder=tuple(wilder),
            windows=tuple(windows),
            stale_candles=self.stale_candles,
        )

    @classmethod
    def restore(cls, state: FeatureEngineState, *, warmup_bars: int = WARMUP_BARS) -> FeatureEngine:
        """Rebuild an engine from a snapshot.

        Window moments are recomputed exactly from the stored windows, so the restored
        engine agrees with one that never stopped to within float rounding (~1e-12).
        """
        engine = cls(state.symbol, warmup_bars=warmup_bars)
        engine.bars_seen = state.bars_seen
        engine.last_timestamp_ns = state.last_timestamp_ns
        engine.stale_candles = state.stale_candles
        engine._closes.extend(state.closes)
        engine._emas = dict(state.emas)
        if engine._emas and set(engine._emas) != set(_EMA_SPANS):
            raise ValueError(f"snapshot EMA spans {sorted(engine._emas)} != {list(_EMA_SPANS)}")
        engine._macd_signal = state.macd_signal
        wilders: dict[str, _Wilder] = {"atr": engine._atr}
        for n, (avg_gain, avg_loss) in engine._rsi.items():
            wilders[f"rsi_{n}_gain"] = avg_gain
            wilders[f"rsi_{n}_loss"] = avg_loss
        for name, count, total, value in state.wilder:
            w = wilders[name]
            w.count, w.total, w.value = count, total, value
        rollings: dict[str, _RollingMoments] = {f"rv_{n}": r for n, r in engine._rv.items()}
        rollings["bb"] = engine._bb
        rollings["volume"] = engine._vol
        for name, values, run in state.windows:
            rollings[name].restore(values, run)
        return engine


class FeatureEngines:
    """One `FeatureEngine` per symbol, created on a symbol's first candle."""

    def __init__(self, *, warmup_bars: int = WARMUP_BARS) -> None:
        self.warmup_bars = warmup_bars
        self._engines: dict[str, FeatureEngine] = {}

    def update(self, candle: Candle) -> dict[str, float] | None:
        """Route the candle to its symbol's engine; see `FeatureEngine.update`."""
        engine = self._engines.get(candle.symbol)
        if engine is None:
            engine = FeatureEngine(candle.symbol, warmup_bars=self.warmup_bars)
            self._engines[candle.symbol] = engine
        return engine.update(candle)

    def __getitem__(self, symbol: str) -> FeatureEngine:
        return self._engines[symbol]

    def put(self, engine: FeatureEngine) -> None:
        """Install `engine` (e.g. restored from a snapshot) for its symbol."""
        if engine.symbol is None:
            raise ValueError("an engine needs a symbol to be installed")
        self._engines[engine.symbol] = engine

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._engines

    @property
    def symbols(self) -> tuple[str, ...]:
        """Symbols seen so far."""
        return tuple(self._engines)


def compute_feature_rows(
    candles: Iterable[Candle], *, warmup_bars: int = WARMUP_BARS
) -> Iterator[tuple[Candle, dict[str, float]]]:
    """Run one engine over candles of a single symbol; yield (candle, features) once warm.

    This is how training builds its dataset, so training and live use the same code path.
    """
    engine = FeatureEngine(warmup_bars=warmup_bars)
    for candle in candles:
        features = engine.update(candle)
        if features is not None:
            yield candle, features
