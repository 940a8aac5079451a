"""Training helpers (hean.ml.train): labels, splits, metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hean.core.candles import Candle, bundled_data_path, load_candles
from hean.core.features import FEATURE_NAMES, LONGEST_WINDOW, WARMUP_BARS, compute_feature_rows
from hean.ml.train import (
    TrainConfig,
    accuracy,
    build_dataset,
    roc_auc,
    time_split,
    walk_forward_splits,
)


@pytest.fixture(scope="module")
def candles() -> tuple[Candle, ...]:
    return load_candles(bundled_data_path(), "BTC-PERP").candles[:2000]


def _brute_force_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_roc_auc_random_scores_with_ties_equal_pairwise_definition() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + 0.3 * y, 1)  # rounding makes many ties
    assert roc_auc(y, s) == pytest.approx(_brute_force_auc(y, s), abs=1e-12)


def test_roc_auc_perfect_reversed_and_constant_scores() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5] * 4) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.1, 0.2])


def test_accuracy_threshold_half() -> None:
    assert accuracy([1, 0, 1, 0], [0.6, 0.4, 0.5, 0.51]) == 0.5


def test_build_dataset_labels_are_future_close_above_close(candles: tuple[Candle, ...]) -> None:
    horizon = 3
    data = build_dataset(candles, horizon=horizon, drop_ties=False)
    closes = {c.timestamp_ns: c.close for c in candles}
    index = {c.timestamp_ns: i for i, c in enumerate(candles)}
    assert len(data.y) == len(candles) - (WARMUP_BARS - 1) - horizon
    for ts, label in zip(data.timestamps_ns.tolist(), data.y.tolist(), strict=True):
        future = candles[index[ts] + horizon].close
        assert label == int(future > closes[ts])
    # features are the shared engine's, in FEATURE_NAMES order, cast through float32
    first = next(iter(compute_feature_rows(candles)))[1]
    expected = np.array([first[n] for n in FEATURE_NAMES], dtype=np.float32)
    assert data.x.shape == (len(data.y), len(FEATURE_NAMES))
    assert np.array_equal(data.x[0], expected.astype(np.float64))


def test_build_dataset_drop_ties_removes_unchanged_closes(candles: tuple[Candle, ...]) -> None:
    kept = build_dataset(candles, horizon=1, drop_ties=True)
    allrows = build_dataset(candles, horizon=1, drop_ties=False)
    assert kept.ties_dropped > 0
    assert len(kept.y) + kept.ties_dropped == len(allrows.y)
    index = {c.timestamp_ns: i for i, c in enumerate(candles)}
    for ts in kept.timestamps_ns.tolist():
        i = index[ts]
        assert candles[i + 1].close != candles[i].close


def test_build_dataset_too_few_candles_raises(candles: tuple[Candle, ...]) -> None:
    with pytest.raises(ValueError, match="no rows"):
        build_dataset(candles[:WARMUP_BARS], horizon=1)


def test_build_dataset_out_of_order_candles_raises(candles: tuple[Candle, ...]) -> None:
    shuffled = list(candles[: WARMUP_BARS + 10])
    shuffled[WARMUP_BARS + 2], shuffled[WARMUP_BARS + 3] = (
        shuffled[WARMUP_BARS + 3],
        shuffled[WARMUP_BARS + 2],
    )
    with pytest.raises(ValueError, match="out of time order"):
        build_dataset(shuffled)


def test_time_split_gap_separates_train_and_test() -> None:
    split = time_split(1000, 0.8, 61)
    assert split.train == (0, 800)
    assert split.test == (861, 1000)
    with pytest.raises(ValueError, match="too few"):
        time_split(100, 0.8, 61)


def test_walk_forward_splits_expanding_and_gapped() -> None:
    folds = walk_forward_splits(1000, 4, 50)
    assert [f.test for f in folds] == [(200, 400), (400, 600), (600, 800), (800, 1000)]
    for fold in folds:
        assert fold.train[0] == 0
        assert fold.test[0] - fold.train[1] == 50
    for a, b in itertools.pairwise(folds):
        assert b.train[1] > a.train[1]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (TrainConfig(gap=LONGEST_WINDOW), "gap must be >="),
        (TrainConfig(horizon=0), "horizon"),
        (TrainConfig(train_fraction=1.0), "train_fraction"),
        (TrainConfig(folds=1), "folds"),
    ],
)
def test_train_config_invalid_setting_rejected(config: TrainConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_train_config_default_gap_covers_warmup_and_horizon() -> None:
    assert TrainConfig(horizon=5).effective_gap == WARMUP_BARS + 5
    TrainConfig(gap=LONGEST_WINDOW + 1).validate()
