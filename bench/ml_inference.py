"""Signal-path compute benchmark: per-bar feature cost and single-row model inference.

Measures, on the bundled real BTC 1-minute data and the shipped default model:
* streaming features: microseconds per bar for `FeatureEngine.update` (Decimal candles in,
  24 floats out), over the whole file;
* ONNX Runtime alone, one intra-op thread: one `session.run` on a single float32 row;
* `ModelRunner.predict` with the cache off (dict -> validated row -> ORT -> Prediction)
  and with a cache hit.
Latencies are p50/p99/max over `--rows` distinct real feature rows, after a warm-up.

Usage: python bench/ml_inference.py [--rows 20000] [--model PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]

from hean.core.candles import bundled_data_path, load_candles
from hean.core.features import FEATURE_NAMES, FeatureEngine
from hean.ml.model import ModelRunner, default_model_path


def _percentiles(samples_ns: list[int]) -> str:
    us = sorted(s / 1000 for s in samples_ns)
    p50 = statistics.median(us)
    p99 = us[min(len(us) - 1, int(len(us) * 0.99))]
    return f"p50 {p50:7.2f} us   p99 {p99:7.2f} us   max {us[-1]:8.2f} us   (n={len(us)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--model", type=Path, default=default_model_path())
    args = parser.parse_args()

    candles = load_candles(bundled_data_path(), "BTC-PERP").candles
    engine = FeatureEngine()
    rows: list[dict[str, float]] = []
    start = time.perf_counter_ns()
    for candle in candles:
        features = engine.update(candle)
        if features is not None:
            rows.append(features)
    elapsed = time.perf_counter_ns() - start
    print(f"features   {elapsed / len(candles) / 1000:7.2f} us per bar over {len(candles)} bars")

    rows = rows[: args.rows]
    runner = ModelRunner(args.model, cache_size=0)
    print(f"model      {args.model.name} ({runner.model_version}, {runner.model_format})")

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        args.model.read_bytes(), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    matrix = np.array([[r[n] for n in FEATURE_NAMES] for r in rows], dtype=np.float32)
    for i in range(500):
        session.run(["probabilities"], {name: matrix[i : i + 1]})
    samples = []
    for i in range(len(matrix)):
        one = matrix[i : i + 1]
        t0 = time.perf_counter_ns()
        session.run(["probabilities"], {name: one})
        samples.append(time.perf_counter_ns() - t0)
    print(f"ort run    {_percentiles(samples)}")

    for row in rows[:500]:
        runner.predict(row)
    samples = []
    for row in rows:
        t0 = time.perf_counter_ns()
        runner.predict(row)
        samples.append(time.perf_counter_ns() - t0)
    print(f"predict    {_percentiles(samples)}   (cache off)")

    cached = ModelRunner(args.model, cache_size=len(rows) + 1)
    for row in rows:
        cached.predict(row)
    samples = []
    for row in rows:
        t0 = time.perf_counter_ns()
        cached.predict(row)
        samples.append(time.perf_counter_ns() - t0)
    print(f"cache hit  {_percentiles(samples)}")

    batch = rows[:100]
    t0 = time.perf_counter_ns()
    for _ in range(20):
        runner.predict_batch(batch)
    per_row = (time.perf_counter_ns() - t0) / (20 * len(batch)) / 1000
    print(f"batch 100  {per_row:7.2f} us per row (cache off)")


if __name__ == "__main__":
    main()
