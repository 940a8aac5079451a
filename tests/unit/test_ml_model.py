"""ModelRunner (hean.ml.model): formats, pickle refusal, card checks, cache, hot reload."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from hean.core.candles import Candle, bundled_data_path, load_candles
from hean.core.features import FEATURE_NAMES, compute_feature_rows
from hean.ml.model import (
    FeatureMismatchError,
    ModelLoadError,
    ModelRunner,
    card_path_for,
    default_model_path,
)
from hean.ml.train import TrainConfig, train


@pytest.fixture(scope="module")
def candles() -> tuple[Candle, ...]:
    return load_candles(bundled_data_path(), "BTC-PERP").candles[:4000]


@pytest.fixture(scope="module")
def feature_rows(candles: tuple[Candle, ...]) -> list[dict[str, float]]:
    return [f for _, f in compute_feature_rows(candles)]


def _train_small(directory: Path, seed: int) -> tuple[Path, Path]:
    onnx_path = directory / "model.onnx"
    text_path = directory / "model.lgbm.txt"
    train(
        bundled_data_path(),
        onnx_path,
        config=TrainConfig(num_trees=30, seed=seed, min_data_in_leaf=50),
        max_bars=4000,
        lightgbm_text_path=text_path,
    )
    return onnx_path, text_path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _train_small(tmp_path_factory.mktemp("model_a"), seed=1)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _train_small(tmp_path_factory.mktemp("model_b"), seed=2)


def _copy_model(src: Path, dst_dir: Path, name: str = "model.onnx") -> Path:
    dst = dst_dir / name
    shutil.copyfile(src, dst)
    shutil.copyfile(card_path_for(src), card_path_for(dst))
    return dst


def test_model_runner_from_env_unset_loads_packaged_default_onnx() -> None:
    runner = ModelRunner.from_env({})
    assert runner.model_path == default_model_path()
    assert runner.model_format == "onnx"
    assert runner.feature_names == FEATURE_NAMES
    card = json.loads(card_path_for(default_model_path()).read_text())
    assert runner.model_version == card["model_version"]


def test_model_runner_from_env_path_set_loads_that_model(small_model: tuple[Path, Path]) -> None:
    onnx_path, _ = small_model
    runner = ModelRunner.from_env({"ML_MODEL_PATH": str(onnx_path)})
    assert runner.model_path == onnx_path
    assert runner.model_version != ModelRunner.from_env({}).model_version


def test_model_runner_onnx_and_lightgbm_text_agree_on_real_rows(
    small_model: tuple[Path, Path], feature_rows: list[dict[str, float]]
) -> None:
    onnx_path, text_path = small_model
    onnx_runner = ModelRunner(onnx_path)
    text_runner = ModelRunner(text_path)
    assert text_runner.model_format == "lightgbm-text"
    a = onnx_runner.predict_batch(feature_rows)
    b = text_runner.predict_batch(feature_rows)
    diffs = [abs(x.prediction - y.prediction) for x, y in zip(a, b, strict=True)]
    assert max(diffs) < 1e-6
    # the model is not constant: agreement would be trivial otherwise
    assert np.std([x.prediction for x in a]) > 1e-3


def test_model_runner_predictions_are_probabilities_with_confidence(
    small_model: tuple[Path, Path], feature_rows: list[dict[str, float]]
) -> None:
    runner = ModelRunner(small_model[0])
    for p in runner.predict_batch(feature_rows):
        assert 0.0 <= p.prediction <= 1.0
        assert p.confidence == pytest.approx(abs(2 * p.prediction - 1))
        assert 0.0 <= p.confidence <= 1.0
        assert p.model_version == runner.model_version


def test_model_runner_batch_equals_single_predictions(
    small_model: tuple[Path, Path], feature_rows: list[dict[str, float]]
) -> None:
    batch = ModelRunner(small_model[0], cache_size=0).predict_batch(feature_rows[:50])
    single_runner = ModelRunner(small_model[0], cache_size=0)
    assert batch == [single_runner.predict(r) for r in feature_rows[:50]]


class _Booby:
    """Unpickling this creates a marker file: proof that loading a pickle runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


@pytest.mark.parametrize("name", ["model.pkl", "model.joblib", "model.onnx"])
def test_model_runner_pickle_without_allow_refused_and_not_executed(
    tmp_path: Path, small_model: tuple[Path, Path], name: str
) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Booby(marker), protocol=4))
    shutil.copyfile(card_path_for(small_model[0]), card_path_for(path))
    with pytest.raises(ModelLoadError, match="refusing to load pickle"):
        ModelRunner(path)
    assert not marker.exists()


def test_model_runner_pickle_with_allow_loads_booster(
    tmp_path: Path, small_model: tuple[Path, Path], feature_rows: list[dict[str, float]]
) -> None:
    _, text_path = small_model
    booster = lgb.Booster(model_file=str(text_path))
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(booster))
    card = json.loads(card_path_for(text_path).read_text())
    card.pop("model_sha256")
    card_path_for(path).write_text(json.dumps(card))
    runner = ModelRunner(path, allow_pickle=True)
    assert runner.model_format == "pickle"
    expected = ModelRunner(text_path).predict(feature_rows[0]).prediction
    assert runner.predict(feature_rows[0]).prediction == pytest.approx(expected, abs=1e-12)


def test_model_runner_missing_feature_raises_naming_it(
    small_model: tuple[Path, Path], feature_rows: list[dict[str, float]]
) -> None:
    runner = ModelRunner(small_model[0])
    row = dict(feature_rows[0])
    del row["rsi_14"]
    del row["bb_z_20"]
    with pytest.raises(FeatureMismatchError, match="missing features: rsi_14, bb_z_20") as info:
        runner.predict(row)
    assert info.value.missing == ("rsi_14", "bb_z_20")


def test_model_runner_extra_feature_raises_unless_allowed(
    small_model: tuple[Path, Path], feature_rows: list[dict[str, float]]
) -> None:
    row = {**feature_rows[0], "my_custom": 1.0}
    with pytest.raises(FeatureMismatchError, match="unexpected features: my_custom"):
        ModelRunner(small_model[0]).predict(row)
    lenient = ModelRunner(small_model[0], allow_extra_features=True)
    assert lenient.predict(row) == lenient.predict(feature_rows[0])


def test_model_runner_check_features_names_list_mismatch_raises(
    small_model: tuple[Path, Path],
) -> None:
    runner = ModelRunner(small_model[0])
    runner.check_features(list(FEATURE_NAMES))
    with pytest.raises(FeatureMismatchError, match="missing features: oc_ret"):
        runner.check_features(list(FEATURE_NAMES[:-1]))


def test_model_runner_non_finite_feature_raises(
    small_model: tuple[Path, Path], feature_rows: list[dict[str, float]]
) -> None:
    row = {**feature_rows[0], "rv_15": float("nan")}
    with pytest.raises(ValueError, match="non-finite feature values: rv_15"):
        ModelRunner(small_model[0]).predict(row)


def test_model_runner_card_of_other_model_refused(
    tmp_path: Path, small_model: tuple[Path, Path], other_model: tuple[Path, Path]
) -> None:
    path = _copy_model(small_model[0], tmp_path)
    shutil.copyfile(card_path_for(other_model[0]), card_path_for(path))
    with pytest.raises(ModelLoadError, match="describes another file"):
        ModelRunner(path)


def test_model_runner_onnx_without_card_refused(
    tmp_path: Path, small_model: tuple[Path, Path]
) -> None:
    path = tmp_path / "lonely.onnx"
    shutil.copyfile(small_model[0], path)
    with pytest.raises(ModelLoadError, match="card"):
        ModelRunner(path)


def test_model_runner_card_features_differ_from_lightgbm_model_refused(
    tmp_path: Path, small_model: tuple[Path, Path]
) -> None:
    path = _copy_model(small_model[1], tmp_path, "m.lgbm.txt")
    card_file = card_path_for(path)
    card = json.loads(card_file.read_text())
    card["feature_names"] = list(reversed(card["feature_names"]))
    card_file.write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="differ from card"):
        ModelRunner(path)


def test_model_runner_card_feature_count_differs_from_onnx_refused(
    tmp_path: Path, small_model: tuple[Path, Path]
) -> None:
    path = _copy_model(small_model[0], tmp_path)
    card_file = card_path_for(path)
    card = json.loads(card_file.read_text())
    card["feature_names"] = card["feature_names"][:-1]
    card_file.write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="takes 24 features, the card lists 23"):
        ModelRunner(path)


def test_model_runner_garbage_file_refused(tmp_path: Path, small_model: tuple[Path, Path]) -> None:
    path = _copy_model(small_model[0], tmp_path)
    path.write_bytes(b"not a model at all")
    card_file = card_path_for(path)
    card = json.loads(card_file.read_text())
    card.pop("model_sha256")
    card_file.write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="ONNX Runtime cannot load"):
        ModelRunner(path)


def test_model_runner_identical_input_served_from_cache(
    small_model: tuple[Path, Path], feature_rows: list[dict[str, float]]
) -> None:
    runner = ModelRunner(small_model[0])
    first = runner.predict(feature_rows[0])
    # same values, different dict order: same key
    reordered = dict(reversed(list(feature_rows[0].items())))
    second = runner.predict(reordered)
    assert second == first
    info = runner.cache_info()
    assert (info.hits, info.misses, info.size) == (1, 1, 1)


def test_model_runner_cache_full_evicts_least_recently_used(
    small_model: tuple[Path, Path], feature_rows: list[dict[str, float]]
) -> None:
    runner = ModelRunner(small_model[0], cache_size=2)
    a, b, c = feature_rows[0], feature_rows[1], feature_rows[2]
    runner.predict(a)
    runner.predict(b)
    runner.predict(a)  # a is now most recent
    runner.predict(c)  # evicts b
    assert runner.cache_info().size == 2
    runner.predict(a)
    assert runner.cache_info().hits == 2
    runner.predict(b)
    assert runner.cache_info().misses == 4


def _bump_mtime(path: Path) -> None:
    # Filesystems with coarse mtimes could hide a rewrite within the same tick.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_model_runner_file_replaced_reloads_new_model(
    tmp_path: Path,
    small_model: tuple[Path, Path],
    other_model: tuple[Path, Path],
    feature_rows: list[dict[str, float]],
) -> None:
    path = _copy_model(small_model[0], tmp_path)
    runner = ModelRunner(path)
    old_version = runner.model_version
    old = runner.predict(feature_rows[10])
    assert runner.reload_if_changed() is False

    _copy_model(other_model[0], tmp_path)
    _bump_mtime(path)
    assert runner.reload_if_changed() is True
    assert runner.model_version != old_version
    assert runner.cache_info().size == 0
    new = runner.predict(feature_rows[10])
    assert new.model_version == runner.model_version
    assert new.prediction != old.prediction
    assert runner.reload_if_changed() is False


def test_model_runner_touched_same_bytes_not_reloaded(
    tmp_path: Path, small_model: tuple[Path, Path], feature_rows: list[dict[str, float]]
) -> None:
    path = _copy_model(small_model[0], tmp_path)
    runner = ModelRunner(path)
    runner.predict(feature_rows[0])
    _bump_mtime(path)
    assert runner.reload_if_changed() is False
    assert runner.cache_info().size == 1


def test_model_runner_broken_replacement_keeps_old_model_and_reports(
    tmp_path: Path,
    small_model: tuple[Path, Path],
    other_model: tuple[Path, Path],
    feature_rows: list[dict[str, float]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = _copy_model(small_model[0], tmp_path)
    runner = ModelRunner(path)
    version = runner.model_version
    before = runner.predict(feature_rows[5])

    path.write_bytes(b"\x00half-written")
    _bump_mtime(path)
    with caplog.at_level(logging.ERROR, logger="hean.ml.model"):
        assert runner.reload_if_changed() is False
    assert runner.last_reload_error is not None
    assert "describes another file" in runner.last_reload_error
    assert "model reload failed" in caplog.text
    assert runner.model_version == version
    assert runner.predict(feature_rows[5]) == before

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="hean.ml.model"):
        assert runner.reload_if_changed() is False  # same broken file: not retried
    assert caplog.text == ""

    _copy_model(other_model[0], tmp_path)
    _bump_mtime(path)
    assert runner.reload_if_changed() is True
    assert runner.last_reload_error is None
    assert runner.model_version != version


def test_model_runner_model_file_removed_keeps_old_model(
    tmp_path: Path, small_model: tuple[Path, Path], feature_rows: list[dict[str, float]]
) -> None:
    path = _copy_model(small_model[0], tmp_path)
    runner = ModelRunner(path)
    path.unlink()
    assert runner.reload_if_changed() is False
    assert runner.last_reload_error is not None
    assert "cannot stat" in runner.last_reload_error
    assert 0.0 <= runner.predict(feature_rows[0]).prediction <= 1.0


def test_model_runner_negative_cache_size_rejected(small_model: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="cache_size"):
        ModelRunner(small_model[0], cache_size=-1)
