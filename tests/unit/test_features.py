"""Streaming features (hean.core.features) against an independent batch implementation.

The batch side below is written from the definitions in the features module's docstring
with numpy and pandas (pandas' own EWM, numpy sliding windows), sharing no code with the
streaming engine, and is compared on the real bundled BTC data.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from hean.core.candles import Candle, bundled_data_path, load_candles
from hean.core.features import (
    FEATURE_NAMES,
    LONGEST_WINDOW,
    WARMUP_BARS,
    FeatureEngine,
    FeatureEngines,
    FeatureEngineState,
    _RollingMoments,
    compute_feature_rows,
)

PARITY_TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def data_path() -> Path:
    return bundled_data_path()


@pytest.fixture(scope="module")
def candles(data_path: Path) -> tuple[Candle, ...]:
    return load_candles(data_path, "BTC-PERP").candles


@pytest.fixture(scope="module")
def streamed(candles: tuple[Candle, ...]) -> list[dict[str, float] | None]:
    engine = FeatureEngine()
    return [engine.update(c) for c in candles]


# ---------------------------------------------------------------- batch implementation


def _shift(x: np.ndarray, k: int) -> np.ndarray:
    out = np.full_like(x, np.nan)
    out[k:] = x[:-k]
    return out


def _wilder(x: np.ndarray, n: int) -> np.ndarray:
    """Wilder average: NaN until n inputs, then SMA seed, then (prev*(n-1)+x)/n."""
    out = np.full(len(x), np.nan)
    out[n - 1] = x[:n].mean()
    for i in range(n, len(x)):
        out[i] = (out[i - 1] * (n - 1) + x[i]) / n
    return out


def _rolling_mean_std(x: np.ndarray, n: int, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-pass mean/std of each trailing window; std 0 where the window is flat."""
    mean = np.full(len(x), np.nan)
    std = np.full(len(x), np.nan)
    win = sliding_window_view(x, n)
    mean[n - 1 :] = win.mean(axis=1)
    s = win.std(axis=1, ddof=ddof)
    flat = win.max(axis=1) == win.min(axis=1)
    s[flat] = 0.0
    std[n - 1 :] = s
    return mean, std


def _zscore(x: np.ndarray, n: int) -> np.ndarray:
    mean, std = _rolling_mean_std(x, n, ddof=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (x - mean) / std
    return np.where(std == 0.0, 0.0, z)


def batch_features(path: Path) -> pd.DataFrame:
    # Text -> float through numpy's correctly rounded parser, like float(Decimal(text)).
    df = pd.read_csv(path, dtype=str)
    o, h, low, c, v = (
        df[k].to_numpy(str).astype(np.float64) for k in ("open", "high", "low", "close", "volume")
    )
    out: dict[str, np.ndarray] = {}
    for k in (1, 3, 5, 15, 30, 60):
        out[f"ret_{k}"] = np.log(c / _shift(c, k))
    close = pd.Series(c)
    ema = {n: close.ewm(span=n, adjust=False).mean().to_numpy() for n in (5, 12, 20, 26, 60)}
    for n in (5, 20, 60):
        out[f"ema_ratio_{n}"] = c / ema[n] - 1.0
    out["ema_fast_slow"] = ema[12] / ema[26] - 1.0
    macd = ema[12] - ema[26]
    signal = pd.Series(macd).ewm(span=9, adjust=False).mean().to_numpy()
    out["macd_close"] = macd / c
    out["macd_signal_close"] = signal / c
    out["macd_hist_close"] = (macd - signal) / c

    change = np.diff(c)
    for n in (14, 6):
        g = np.concatenate([[np.nan], _wilder(np.clip(change, 0, None), n)])
        lo = np.concatenate([[np.nan], _wilder(np.clip(-change, 0, None), n)])
        total = g + lo
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"rsi_{n}"] = np.where(total == 0.0, 50.0, 100.0 * g / total)

    r1 = np.log(c[1:] / c[:-1])
    rv = {}
    for n in (15, 60):
        _, std = _rolling_mean_std(r1, n, ddof=1)
        rv[n] = np.concatenate([[np.nan], std])
        out[f"rv_{n}"] = rv[n]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["rv_ratio_15_60"] = np.where(rv[60] == 0.0, 1.0, rv[15] / rv[60])

    prev_c = _shift(c, 1)
    tr = np.maximum.reduce([h - low, np.abs(h - prev_c), np.abs(low - prev_c)])
    tr[0] = h[0] - low[0]
    out["atr_14_close"] = _wilder(tr, 14) / c
    out["bb_z_20"] = _zscore(c, 20)
    out["volume_z_20"] = _zscore(v, 20)
    out["hl_range"] = (h - low) / c
    with np.errstate(invalid="ignore", divide="ignore"):
        out["close_location"] = np.where(h == low, 0.5, (c - low) / (h - low))
    out["oc_ret"] = np.log(c / o)
    return pd.DataFrame(out)


# ---------------------------------------------------------------- tests


def test_feature_names_streamed_on_real_data_match_order_and_are_finite(
    streamed: list[dict[str, float] | None],
) -> None:
    assert len(FEATURE_NAMES) == len(set(FEATURE_NAMES)) == 24
    rows = [r for r in streamed if r is not None]
    assert len(rows) == len(streamed) - WARMUP_BARS + 1
    for row in rows:
        assert tuple(row) == FEATURE_NAMES
        assert all(math.isfinite(x) for x in row.values())


def test_streaming_features_real_data_equal_batch_implementation(
    data_path: Path, streamed: list[dict[str, float] | None]
) -> None:
    batch = batch_features(data_path)
    assert len(batch) == len(streamed)
    stream = pd.DataFrame([r for r in streamed if r is not None], columns=list(FEATURE_NAMES))
    expected = batch.iloc[WARMUP_BARS - 1 :].reset_index(drop=True)[list(FEATURE_NAMES)]
    assert not expected.isna().any().any()
    diff = (stream - expected).abs().max()
    worst = str(diff.idxmax())
    assert diff.max() <= PARITY_TOLERANCE, f"{worst} differs by {diff.max():.3e}"


def test_feature_engine_before_warmup_returns_none(candles: tuple[Candle, ...]) -> None:
    engine = FeatureEngine()
    results = [engine.update(c) for c in candles[:WARMUP_BARS]]
    assert all(r is None for r in results[:-1])
    assert results[-1] is not None
    assert engine.warmed_up


def test_feature_engine_duplicate_or_older_candle_ignored_and_counted(
    candles: tuple[Candle, ...],
) -> None:
    clean, noisy = FeatureEngine(), FeatureEngine()
    window = candles[: WARMUP_BARS + 50]
    expected = [clean.update(c) for c in window]
    got = []
    for i, c in enumerate(window):
        got.append(noisy.update(c))
        if i % 7 == 3:
            # a redelivered event and a late one must not touch the state
            assert noisy.update(c) is None
            assert noisy.update(window[i - 2]) is None
    assert got == expected
    assert noisy.stale_candles == 2 * sum(1 for i in range(len(window)) if i % 7 == 3)


def test_feature_engine_other_symbol_candle_raises(candles: tuple[Candle, ...]) -> None:
    engine = FeatureEngine("BTC-PERP")
    engine.update(candles[0])
    with pytest.raises(ValueError, match="ETH-PERP"):
        engine.update(replace(candles[1], symbol="ETH-PERP"))


def test_features_prices_scaled_tenfold_unchanged(candles: tuple[Candle, ...]) -> None:
    window = candles[: WARMUP_BARS + 300]
    ten = Decimal(10)
    scaled = [
        replace(c, open=c.open * ten, high=c.high * ten, low=c.low * ten, close=c.close * ten)
        for c in window
    ]
    base = [f for _, f in compute_feature_rows(window)]
    other = [f for _, f in compute_feature_rows(scaled)]
    assert len(base) == len(other) == 301
    for a, b in zip(base, other, strict=True):
        for name in FEATURE_NAMES:
            assert a[name] == pytest.approx(b[name], rel=1e-9, abs=1e-12), name


def test_feature_engine_snapshot_restore_json_continues_identically(
    candles: tuple[Candle, ...],
) -> None:
    split = WARMUP_BARS + 1000
    window = candles[: split + 2000]
    straight = FeatureEngine()
    expected = [straight.update(c) for c in window]

    first = FeatureEngine()
    for c in window[:split]:
        first.update(c)
    state = FeatureEngineState.from_dict(json.loads(json.dumps(first.snapshot().to_dict())))
    assert state == first.snapshot()
    resumed = FeatureEngine.restore(state)
    got = [resumed.update(c) for c in window[split:]]
    for a, b in zip(got, expected[split:], strict=True):
        assert a is not None
        assert b is not None
        for name in FEATURE_NAMES:
            assert a[name] == pytest.approx(b[name], rel=0, abs=PARITY_TOLERANCE), name
    # a stale candle after restore is still recognised
    assert resumed.update(window[split - 1]) is None


def _flat_candle(i: int, price: str = "100", volume: str = "5") -> Candle:
    p = Decimal(price)
    return Candle("FLAT", "1m", i * 60_000_000_000, p, p, p, p, Decimal(volume))


def test_feature_engine_flat_market_zero_dispersion_features_defined() -> None:
    engine = FeatureEngine()
    out = None
    for i in range(WARMUP_BARS + 5):
        out = engine.update(_flat_candle(i))
    assert out is not None
    assert out["bb_z_20"] == 0.0
    assert out["volume_z_20"] == 0.0
    assert out["rv_15"] == out["rv_60"] == 0.0
    assert out["rv_ratio_15_60"] == 1.0
    assert out["rsi_14"] == out["rsi_6"] == 50.0
    assert out["close_location"] == 0.5
    assert out["atr_14_close"] == 0.0


def test_feature_engine_after_flat_stretch_dispersion_returns() -> None:
    engine = FeatureEngine()
    for i in range(WARMUP_BARS):
        engine.update(_flat_candle(i))
    out = engine.update(_flat_candle(WARMUP_BARS, price="101", volume="9"))
    assert out is not None
    # one outlier in a window of 20 equal values has z = sqrt(19) exactly in theory
    assert out["bb_z_20"] == pytest.approx(math.sqrt(19), rel=1e-12)
    assert out["volume_z_20"] == pytest.approx(math.sqrt(19), rel=1e-12)
    assert out["rv_15"] > 0.0


def test_rolling_moments_long_offset_series_no_drift() -> None:
    # A running sum of squares loses everything here: values ~1e8 with spread ~1e-2.
    rng = np.random.default_rng(7)
    xs = 1e8 + rng.normal(0.0, 0.01, 200_000)
    rolling = _RollingMoments(60)
    worst = 0.0
    for i, x in enumerate(xs):
        rolling.push(float(x))
        if i >= 59 and i % 997 == 0:
            exact = float(np.std(xs[i - 59 : i + 1], ddof=1))
            worst = max(worst, abs(rolling.std(1) - exact) / exact)
    # Measured ~7e-7 here; a running sum of squares is off by a factor of ~1000.
    assert worst < 1e-5


def test_feature_engines_interleaved_symbols_match_separate_engines(
    candles: tuple[Candle, ...],
) -> None:
    window = candles[: WARMUP_BARS + 20]
    other = [replace(c, symbol="ETH-PERP", close=c.open, open=c.close) for c in window]
    engines = FeatureEngines()
    got_btc, got_eth = [], []
    for a, b in zip(window, other, strict=True):
        got_btc.append(engines.update(a))
        got_eth.append(engines.update(b))
    assert engines.symbols == ("BTC-PERP", "ETH-PERP")
    assert got_btc == [f for f in map(FeatureEngine().update, window)]
    assert got_eth == [f for f in map(FeatureEngine().update, other)]
    assert got_btc[-1] != got_eth[-1]


def test_feature_engine_warmup_shorter_than_longest_window_rejected() -> None:
    with pytest.raises(ValueError, match="warmup_bars"):
        FeatureEngine(warmup_bars=LONGEST_WINDOW)
