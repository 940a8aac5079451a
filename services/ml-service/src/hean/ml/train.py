"""Train the direction model: candles -> shared features -> LightGBM -> ONNX + model card.

Run as `python -m hean.ml.train` (or call `main(argv)`). The dataset is built with
`hean.core.features`, the same code the features service runs live. The label is whether
the close `horizon` bars ahead is above this bar's close. The split is by time, with a gap
between train and test so no training row's label or feature window reaches into the test
period. The test AUC on the bundled 1-minute BTC data is about 0.52-0.55: a weak signal.
The model is a pipeline component, not evidence of an edge.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from hean.core.candles import Candle, bundled_data_path, load_candles
from hean.core.features import FEATURE_NAMES, LONGEST_WINDOW, WARMUP_BARS, FeatureEngine
from hean.ml.model import CARD_FORMAT, card_path_for, model_version_from_bytes

__all__ = [
    "Dataset",
    "SplitIndices",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "build_dataset",
    "export_onnx",
    "main",
    "roc_auc",
    "time_split",
    "train",
    "walk_forward_splits",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

ONNX_INPUT_NAME = "features"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything that determines a training run (recorded in the model card)."""

    horizon: int = 1
    drop_ties: bool = True
    train_fraction: float = 0.8
    gap: int | None = None  # None: WARMUP_BARS + horizon
    folds: int = 0
    num_trees: int = 200
    learning_rate: float = 0.03
    num_leaves: int = 15
    min_data_in_leaf: int = 200
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    seed: int = 42
    num_threads: int = 1

    @property
    def effective_gap(self) -> int:
        """Rows left out between a train block and the test block that follows it."""
        return WARMUP_BARS + self.horizon if self.gap is None else self.gap

    def validate(self) -> None:
        """Raise `ValueError` naming the first bad setting."""
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        minimum_gap = LONGEST_WINDOW + self.horizon
        if self.effective_gap < minimum_gap:
            raise ValueError(
                f"gap must be >= longest feature window + horizon = {minimum_gap}, "
                f"got {self.effective_gap}"
            )
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"folds must be 0 (off) or >= 2, got {self.folds}")
        if self.num_trees < 1 or self.num_leaves < 2 or self.num_threads < 1:
            raise ValueError("num_trees >= 1, num_leaves >= 2 and num_threads >= 1 required")

    def lightgbm_params(self) -> dict[str, Any]:
        """LightGBM parameters; deterministic given the seed and thread count."""
        return {
            "objective": "binary",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": self.lambda_l2,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": self.num_threads,
            "verbosity": -1,
        }


@dataclass(frozen=True, slots=True)
class Dataset:
    """Feature rows with labels, in time order.

    `x` is float32-representable (cast through float32) so LightGBM trains on exactly the
    values ONNX Runtime will see at inference.
    """

    x: FloatArray
    y: IntArray
    timestamps_ns: IntArray
    bars: int
    ties_dropped: int


@dataclass(frozen=True, slots=True)
class SplitIndices:
    """Row ranges [start, stop) of one train block and the test block after its gap."""

    train: tuple[int, int]
    test: tuple[int, int]


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What `train` produced: the card (as written) and the files."""

    card: dict[str, Any]
    onnx_path: Path
    card_path: Path
    lightgbm_text_path: Path | None


ProgressFn = Callable[[str, int, int], None]


def _progress_printer(stream: TextIO, enabled: bool) -> ProgressFn:
    last: dict[str, float] = {}

    def report(stage: str, done: int, total: int) -> None:
        if not enabled:
            return
        now = time.monotonic()
        # Redraw at most ~10 times a second, and always at the end of a stage.
        if done < total and now - last.get(stage, 0.0) < 0.1:
            return
        last[stage] = now
        width = 30
        filled = width * done // max(total, 1)
        bar = "#" * filled + "-" * (width - filled)
        end = "\n" if done >= total else ""
        stream.write(f"\r{stage:<10} [{bar}] {done}/{total}{end}")
        stream.flush()

    return report


def build_dataset(
    candles: Sequence[Candle],
    *,
    horizon: int = 1,
    drop_ties: bool = True,
    progress: ProgressFn | None = None,
) -> Dataset:
    """Features at each bar's close and the label `close[t + horizon] > close[t]`.

    Rows before the feature warm-up and the last `horizon` bars (no future close) are
    left out. With `drop_ties`, rows whose future close equals the current close are
    dropped (neither up nor down); otherwise they count as 0 (not up).
    """
    engine = FeatureEngine()
    rows: list[list[float]] = []
    row_bar: list[int] = []
    total = len(candles)
    for i, candle in enumerate(candles):
        features = engine.update(candle)
        if features is not None and i + horizon < total:
            rows.append([features[name] for name in FEATURE_NAMES])
            row_bar.append(i)
        if progress is not None and (i % 2000 == 0 or i == total - 1):
            progress("features", i + 1, total)
    if engine.stale_candles:
        raise ValueError(f"{engine.stale_candles} candles out of time order")
    closes = np.array([float(c.close) for c in candles], dtype=np.float64)
    idx = np.array(row_bar, dtype=np.int64)
    if len(idx) == 0:
        raise ValueError(
            f"no rows: {total} candles is not more than warm-up ({WARMUP_BARS}) + horizon"
        )
    now_close, future_close = closes[idx], closes[idx + horizon]
    keep = future_close != now_close if drop_ties else np.ones(len(idx), dtype=bool)
    x = np.asarray(rows, dtype=np.float32).astype(np.float64)[keep]
    y = (future_close > now_close).astype(np.int64)[keep]
    ts = np.array([candles[i].timestamp_ns for i in row_bar], dtype=np.int64)[keep]
    return Dataset(x=x, y=y, timestamps_ns=ts, bars=total, ties_dropped=int((~keep).sum()))


def time_split(n_rows: int, train_fraction: float, gap: int) -> SplitIndices:
    """First `train_fraction` of rows for training, then `gap` rows skipped, then test."""
    train_stop = int(n_rows * train_fraction)
    test_start = train_stop + gap
    if train_stop < 1 or test_start >= n_rows:
        raise ValueError(f"{n_rows} rows too few for fraction {train_fraction} and gap {gap}")
    return SplitIndices(train=(0, train_stop), test=(test_start, n_rows))


def walk_forward_splits(n_rows: int, folds: int, gap: int) -> list[SplitIndices]:
    """Expanding-window folds: the rows are cut into folds + 1 blocks; fold k trains on
    blocks 0..k (less the gap at its end) and tests on block k + 1."""
    block = n_rows // (folds + 1)
    splits = []
    for k in range(1, folds + 1):
        train_stop = k * block - gap
        test_stop = n_rows if k == folds else (k + 1) * block
        if train_stop < 1:
            raise ValueError(f"{n_rows} rows too few for {folds} folds with gap {gap}")
        splits.append(SplitIndices(train=(0, train_stop), test=(k * block, test_stop)))
    return splits


def roc_auc(y: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    labels = np.asarray(y, dtype=np.int64)
    scores = np.asarray(score, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average rank over each run of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    stops = np.concatenate([boundaries, [len(scores)]])
    for start, stop in zip(starts, stops, strict=True):
        ranks[order[start:stop]] = (start + stop + 1) / 2.0
    rank_sum = float(ranks[labels == 1].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def accuracy(y: npt.ArrayLike, probability: npt.ArrayLike) -> float:
    """Share of rows where `probability > 0.5` equals the label."""
    labels = np.asarray(y, dtype=np.int64)
    predicted = (np.asarray(probability, dtype=np.float64) > 0.5).astype(np.int64)
    return float((predicted == labels).mean())


def _fit(
    config: TrainConfig, x: FloatArray, y: IntArray, progress: ProgressFn | None, stage: str
) -> lgb.Booster:
    train_set = lgb.Dataset(x, label=y, feature_name=list(FEATURE_NAMES), free_raw_data=True)

    def callback(env: Any) -> None:
        if progress is not None:
            progress(stage, int(env.iteration) + 1, config.num_trees)

    return lgb.train(
        config.lightgbm_params(),
        train_set,
        num_boost_round=config.num_trees,
        callbacks=[callback],
    )


def export_onnx(booster: lgb.Booster, n_features: int) -> bytes:
    """Convert to ONNX: float32 input `features` [N, n_features], probabilities [N, 2]."""
    import onnxmltools  # type: ignore[import-untyped]
    from onnxmltools.convert.common.data_types import (  # type: ignore[import-untyped]
        FloatTensorType,
    )

    model = onnxmltools.convert_lightgbm(
        booster,
        name="hean-direction",
        initial_types=[(ONNX_INPUT_NAME, FloatTensorType([None, n_features]))],
        zipmap=False,
    )
    # The converter collects opsets in a set, so their order follows the string hash seed;
    # sort them so the same booster always gives the same bytes (and model_version).
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    del model.opset_import[:]
    for domain, version in opsets:
        model.opset_import.add(domain=domain, version=version)
    data: bytes = model.SerializeToString()
    return data


def onnx_probabilities(onnx_bytes: bytes, x: FloatArray) -> FloatArray:
    """P(up) for each row from ONNX Runtime (one intra-op thread, as the service runs it)."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    outputs = session.run(["probabilities"], {ONNX_INPUT_NAME: x.astype(np.float32)})
    probabilities = np.asarray(outputs[0], dtype=np.float64)
    return probabilities[:, 1]


def _iso(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    stamp = dt.datetime.fromtimestamp(seconds, tz=dt.UTC) + dt.timedelta(microseconds=rest // 1000)
    return stamp.isoformat().replace("+00:00", "Z")


def _evaluate(
    config: TrainConfig,
    data: Dataset,
    split: SplitIndices,
    progress: ProgressFn | None,
    stage: str,
) -> tuple[lgb.Booster, dict[str, Any]]:
    (a, b), (c, d) = split.train, split.test
    booster = _fit(config, data.x[a:b], data.y[a:b], progress, stage)
    p_test = np.asarray(booster.predict(data.x[c:d]), dtype=np.float64)
    p_train = np.asarray(booster.predict(data.x[a:b]), dtype=np.float64)
    metrics = {
        "train_rows": b - a,
        "test_rows": d - c,
        "train_span": [_iso(int(data.timestamps_ns[a])), _iso(int(data.timestamps_ns[b - 1]))],
        "test_span": [_iso(int(data.timestamps_ns[c])), _iso(int(data.timestamps_ns[d - 1]))],
        "test_auc": roc_auc(data.y[c:d], p_test),
        "test_accuracy": accuracy(data.y[c:d], p_test),
        "test_up_rate": float(data.y[c:d].mean()),
        "train_auc": roc_auc(data.y[a:b], p_train),
    }
    return booster, metrics


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train(
    data_path: Path,
    out_path: Path,
    *,
    symbol: str = "BTC-PERP",
    timeframe: str = "1m",
    config: TrainConfig | None = None,
    max_bars: int | None = None,
    lightgbm_text_path: Path | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Build the dataset, train, evaluate, export ONNX and write the model card.

    Files written: `out_path` (ONNX), `card_path_for(out_path)` (card JSON), and, if given,
    `lightgbm_text_path` with its own card. Returns the card.
    """
    config = config or TrainConfig()
    config.validate()
    loaded = load_candles(data_path, symbol, timeframe)
    candles = loaded.candles[:max_bars] if max_bars is not None else loaded.candles
    data = build_dataset(
        candles, horizon=config.horizon, drop_ties=config.drop_ties, progress=progress
    )
    gap = config.effective_gap

    fold_metrics: list[dict[str, Any]] = []
    if config.folds:
        for k, fold in enumerate(walk_forward_splits(len(data.y), config.folds, gap), 1):
            _, metrics = _evaluate(config, data, fold, progress, f"fold {k}")
            fold_metrics.append({"fold": k, **metrics})

    split = time_split(len(data.y), config.train_fraction, gap)
    booster, metrics = _evaluate(config, data, split, progress, "train")

    onnx_bytes = export_onnx(booster, len(FEATURE_NAMES))
    c, d = split.test
    p_lgbm = np.asarray(booster.predict(data.x[c:d]), dtype=np.float64)
    p_onnx = onnx_probabilities(onnx_bytes, data.x[c:d])
    max_diff = float(np.max(np.abs(p_lgbm - p_onnx)))
    onnx_auc = roc_auc(data.y[c:d], p_onnx)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(onnx_bytes)
    model_version = model_version_from_bytes(onnx_bytes)
    tie_rule = "dropped" if config.drop_ties else "counted as 0 (not up)"
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "model_version": model_version,
        "model_file": out_path.name,
        "model_format": "onnx",
        "model_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "feature_names": list(FEATURE_NAMES),
        "feature_engine": {"module": "hean.core.features", "warmup_bars": WARMUP_BARS},
        "input": {"name": ONNX_INPUT_NAME, "dtype": "float32", "shape": [None, len(FEATURE_NAMES)]},
        "output": {"name": "probabilities", "column": 1, "meaning": "P(label = 1)"},
        "label": {
            "definition": f"1 if close[t+{config.horizon}] > close[t] else 0",
            "horizon_bars": config.horizon,
            "ties": tie_rule,
            "ties_in_data": data.ties_dropped if config.drop_ties else None,
        },
        "data": {
            "file": data_path.name,
            "sha256": _sha256_file(data_path),
            "symbol": symbol,
            "timeframe": timeframe,
            "bars_used": len(candles),
            "bad_rows_skipped": loaded.report.rows_skipped,
            "first_bar": _iso(candles[0].timestamp_ns),
            "last_bar": _iso(candles[-1].timestamp_ns),
            "rows": len(data.y),
        },
        "split": {
            "method": "time-ordered, train first",
            "train_fraction": config.train_fraction,
            "gap_rows": gap,
            "train_rows": metrics["train_rows"],
            "test_rows": metrics["test_rows"],
            "train_span": metrics["train_span"],
            "test_span": metrics["test_span"],
        },
        "metrics": {
            "test_auc": metrics["test_auc"],
            "test_accuracy": metrics["test_accuracy"],
            "test_up_rate": metrics["test_up_rate"],
            "train_auc": metrics["train_auc"],
            "onnx_test_auc": onnx_auc,
        },
        "onnx_parity": {
            "max_abs_probability_diff": max_diff,
            "rows_compared": d - c,
            "note": "LightGBM (float64 of float32-cast inputs) vs ONNX Runtime (float32)",
        },
        "walk_forward": fold_metrics,
        "training": {
            "library": "lightgbm",
            "num_trees": booster.num_trees(),
            "params": config.lightgbm_params(),
            "num_boost_round": config.num_trees,
        },
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("lightgbm", "onnx", "onnxmltools", "onnxruntime", "numpy")
        },
        "disclaimer": "Weak directional signal on historical data; not evidence of profit.",
    }
    card_path = card_path_for(out_path)
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")

    if lightgbm_text_path is not None:
        text = booster.model_to_string().encode("utf-8")
        lightgbm_text_path.parent.mkdir(parents=True, exist_ok=True)
        lightgbm_text_path.write_bytes(text)
        text_card = {
            **card,
            "model_file": lightgbm_text_path.name,
            "model_format": "lightgbm-text",
            "model_sha256": hashlib.sha256(text).hexdigest(),
            "model_version": model_version_from_bytes(text),
        }
        card_path_for(lightgbm_text_path).write_text(
            json.dumps(text_card, indent=2) + "\n", encoding="utf-8"
        )
    return TrainResult(
        card=card,
        onnx_path=out_path,
        card_path=card_path,
        lightgbm_text_path=lightgbm_text_path,
    )


def _parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m hean.ml.train",
        description="Train the LightGBM direction model on candles and export ONNX + card.",
    )
    p.add_argument("--data", type=Path, help="OHLCV CSV (default: the bundled BTC 1m file)")
    p.add_argument("--symbol", default="BTC-PERP")
    p.add_argument("--timeframe", default="1m")
    p.add_argument("--out", type=Path, default=Path("models/model.onnx"), help="ONNX output")
    p.add_argument("--lightgbm-text", type=Path, help="also save the LightGBM text model here")
    p.add_argument("--horizon", type=int, default=defaults.horizon, help="label horizon, bars")
    p.add_argument(
        "--ties",
        choices=["drop", "down"],
        default="drop",
        help="rows whose future close equals the close: drop them or label them 0",
    )
    p.add_argument("--train-fraction", type=float, default=defaults.train_fraction)
    p.add_argument(
        "--gap", type=int, help=f"rows between train and test (default {WARMUP_BARS}+horizon)"
    )
    p.add_argument("--folds", type=int, default=0, help="walk-forward folds to report (>= 2)")
    p.add_argument("--max-bars", type=int, help="use only the first N bars (quick runs)")
    p.add_argument("--num-trees", type=int, default=defaults.num_trees)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--num-leaves", type=int, default=defaults.num_leaves)
    p.add_argument("--min-data-in-leaf", type=int, default=defaults.min_data_in_leaf)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, default=defaults.num_threads)
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    config = TrainConfig(
        horizon=args.horizon,
        drop_ties=args.ties == "drop",
        train_fraction=args.train_fraction,
        gap=args.gap,
        folds=args.folds,
        num_trees=args.num_trees,
        learning_rate=args.learning_rate,
        num_leaves=args.num_leaves,
        min_data_in_leaf=args.min_data_in_leaf,
        seed=args.seed,
        num_threads=args.threads,
    )
    try:
        config.validate()
        data_path = args.data if args.data is not None else bundled_data_path()
        result = train(
            data_path,
            args.out,
            symbol=args.symbol,
            timeframe=args.timeframe,
            config=config,
            max_bars=args.max_bars,
            lightgbm_text_path=args.lightgbm_text,
            progress=_progress_printer(sys.stderr, not args.quiet),
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    card = result.card
    m = card["metrics"]
    print(f"model      {result.onnx_path} ({card['model_version']})")
    print(f"card       {result.card_path}")
    print(
        f"rows       train {card['split']['train_rows']}, gap {card['split']['gap_rows']}, "
        f"test {card['split']['test_rows']}"
    )
    print(
        f"test       AUC {m['test_auc']:.4f}, accuracy {m['test_accuracy']:.4f} "
        f"(up rate {m['test_up_rate']:.4f}); train AUC {m['train_auc']:.4f}"
    )
    for fold in card["walk_forward"]:
        print(
            f"fold {fold['fold']}     AUC {fold['test_auc']:.4f}, accuracy "
            f"{fold['test_accuracy']:.4f} on {fold['test_rows']} rows"
        )
    print(
        f"onnx       max |P_lgbm - P_onnx| = {card['onnx_parity']['max_abs_probability_diff']:.2e}"
    )
    print("note       a weak signal on past data; no claim of profitability")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
