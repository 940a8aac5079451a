"""The training CLI end to end (`python -m hean.ml.train`), and the shipped default model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hean.core.candles import bundled_data_path, load_candles
from hean.core.features import FEATURE_NAMES, LONGEST_WINDOW
from hean.ml.model import ModelRunner, card_path_for, default_model_path
from hean.ml.train import build_dataset, main, roc_auc, time_split

SLICE_ARGS = ["--max-bars", "8000", "--num-trees", "60", "--min-data-in-leaf", "100"]


@pytest.fixture(scope="module")
def cli_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out_dir = tmp_path_factory.mktemp("cli")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hean.ml.train",
            "--out",
            str(out_dir / "m.onnx"),
            "--lightgbm-text",
            str(out_dir / "m.lgbm.txt"),
            "--folds",
            "3",
            *SLICE_ARGS,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc, out_dir


def test_train_cli_slice_writes_onnx_card_and_text_model(
    cli_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out_dir = cli_run
    assert proc.returncode == 0, proc.stderr
    onnx_bytes = (out_dir / "m.onnx").read_bytes()
    card = json.loads((out_dir / "m.card.json").read_text())
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    assert card["model_sha256"] == sha
    assert card["model_version"] == "lgbm-" + sha[:12]
    assert card["feature_names"] == list(FEATURE_NAMES)
    assert card["label"]["horizon_bars"] == 1
    assert card["data"]["bars_used"] == 8000
    split = card["split"]
    assert split["gap_rows"] >= LONGEST_WINDOW + 1
    assert split["train_span"][1] < split["test_span"][0]
    assert split["train_rows"] + split["gap_rows"] + split["test_rows"] == card["data"]["rows"]
    assert 0.0 <= card["metrics"]["test_auc"] <= 1.0
    assert card["onnx_parity"]["max_abs_probability_diff"] < 1e-5
    assert card["onnx_parity"]["rows_compared"] == split["test_rows"]
    assert len(card["walk_forward"]) == 3
    assert card["training"]["num_trees"] == 60
    text_card = json.loads((out_dir / "m.lgbm.card.json").read_text())
    assert text_card["model_format"] == "lightgbm-text"
    assert (
        text_card["model_sha256"]
        == hashlib.sha256((out_dir / "m.lgbm.txt").read_bytes()).hexdigest()
    )


def test_train_cli_prints_metrics_and_progress(
    cli_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, _ = cli_run
    assert "test       AUC" in proc.stdout
    assert "no claim of profitability" in proc.stdout
    assert "train      [##############################] 60/60" in proc.stderr
    assert "features   [" in proc.stderr


def test_train_cli_output_loads_in_model_runner_both_formats_agree(
    cli_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, out_dir = cli_run
    onnx_runner = ModelRunner(out_dir / "m.onnx")
    text_runner = ModelRunner(out_dir / "m.lgbm.txt")
    data = build_dataset(load_candles(bundled_data_path(), "BTC-PERP").candles[:8000])
    rows = [dict(zip(FEATURE_NAMES, r, strict=True)) for r in data.x[-500:].tolist()]
    a = np.array([p.prediction for p in onnx_runner.predict_batch(rows)])
    b = np.array([p.prediction for p in text_runner.predict_batch(rows)])
    assert np.max(np.abs(a - b)) < 1e-5


def test_train_main_same_inputs_identical_model_bytes(tmp_path: Path) -> None:
    args = [*SLICE_ARGS, "--quiet"]
    assert main(["--out", str(tmp_path / "a.onnx"), *args]) == 0
    assert main(["--out", str(tmp_path / "b.onnx"), *args]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert main(["--out", str(tmp_path / "c.onnx"), *args, "--seed", "7"]) == 0
    assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "c.onnx").read_bytes()


def test_train_main_gap_below_window_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path / "x.onnx"), "--gap", "10", "--quiet"]) == 2
    assert "gap must be >=" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_default_model_card_figures_reproduce_on_bundled_data() -> None:
    """The shipped card's test AUC is what the shipped model scores on its test span."""
    card = json.loads(card_path_for(default_model_path()).read_text())
    data_file = bundled_data_path()
    assert card["data"]["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert card["data"]["bars_used"] == 45_031
    data = build_dataset(load_candles(data_file, "BTC-PERP").candles)
    split = time_split(len(data.y), card["split"]["train_fraction"], card["split"]["gap_rows"])
    c, d = split.test
    assert d - c == card["split"]["test_rows"]
    runner = ModelRunner(default_model_path(), cache_size=0)
    rows = [dict(zip(FEATURE_NAMES, r, strict=True)) for r in data.x[c:d].tolist()]
    p = np.array([x.prediction for x in runner.predict_batch(rows)])
    auc = roc_auc(data.y[c:d], p)
    assert auc == pytest.approx(card["metrics"]["onnx_test_auc"], abs=1e-9)
    assert auc == pytest.approx(card["metrics"]["test_auc"], abs=1e-4)
    # Honest expectations: a weak signal, better than a coin only by a little.
    assert 0.5 < auc < 0.6
