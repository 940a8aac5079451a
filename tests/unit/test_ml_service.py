"""ml-service wiring on the in-memory bus: predictions, feature-list check, timeout and
circuit breaker, health, and model reload without restart."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from hean.core.bus import EventBus
from hean.core.candles import bundled_data_path, load_candles
from hean.core.circuit_breaker import CircuitBreakerOpenError, CircuitState
from hean.core.errors import PermanentError, TransientError
from hean.core.features import FEATURE_NAMES, compute_feature_rows
from hean.core.orchestrator import TradingOrchestrator
from hean.core.types import Event, EventType
from hean.ml.model import ModelRunner, Prediction, card_path_for, default_model_path
from hean.ml.service import COMPONENT, INLINE_STREAK, MLService
from tests.helpers import eventually


class SlowRunner(ModelRunner):
    """A real runner whose inference takes `delay_s` of CPU (stands in for a heavy model),
    or sleeps `sleep_s` (a stuck one)."""

    delay_s = 0.0
    sleep_s = 0.0

    def predict(self, features: Mapping[str, float]) -> Prediction:
        busy_until = time.thread_time() + self.delay_s
        while time.thread_time() < busy_until:
            pass
        time.sleep(self.sleep_s)
        return super().predict(features)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, float]]:
    candles = load_candles(bundled_data_path(), "BTC").candles[:260]
    return [f for _, f in compute_feature_rows(candles)]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    shutil.copy(default_model_path(), path)
    shutil.copy(card_path_for(default_model_path()), card_path_for(path))
    return path


class Rig:
    def __init__(
        self,
        model_path: Path,
        *,
        timeout_ms: float = 1000,
        reload_s: float = 0,
        inline_max_ms: float = 1.0,
    ) -> None:
        self.bus = EventBus()
        self.orchestrator = TradingOrchestrator(self.bus, service_name="ml-service")
        self.runner: SlowRunner | None = None

        def factory() -> ModelRunner:
            self.runner = SlowRunner(model_path, cache_size=0)
            return self.runner

        self.service = MLService(
            self.bus,
            self.orchestrator,
            factory,
            inference_timeout_ms=timeout_ms,
            reload_interval_s=reload_s,
            inline_max_ms=inline_max_ms,
        )
        self.orchestrator.register_component(
            name=COMPONENT, component=self.service, failure_threshold=2, timeout=60.0
        )
        self.predictions: list[Event] = []
        self.bus.subscribe(EventType.ML_PREDICTION, self.predictions.append)

    def features(self, features: Mapping[str, float], symbol: str = "BTC") -> Event:
        return Event(
            event_type=EventType.FEATURES_READY,
            data={
                "symbol": symbol,
                "features": dict(features),
                "timestamp": 123,
                "previous_timestamp": 63,
            },
        )


@pytest.fixture
async def rig(model_path: Path) -> AsyncIterator[Rig]:
    r = Rig(model_path)
    await r.orchestrator.start()
    yield r
    await r.orchestrator.stop()


async def test_on_features_publishes_prediction_naming_its_input(
    rig: Rig, rows: list[dict[str, float]]
) -> None:
    event = rig.features(rows[0])
    await rig.bus.publish(event)
    await rig.bus.flush(5)
    (pred,) = rig.predictions
    assert pred.data["symbol"] == "BTC"
    assert pred.data["features_event_id"] == event.event_id
    assert pred.data["timestamp"] == 123
    assert pred.data["previous_timestamp"] == 63  # the chain strategy orders by
    assert pred.data["model_version"] == "lgbm-8e64920bd860"
    assert pred.data["confidence"] == pytest.approx(abs(2 * pred.data["prediction"] - 1))
    assert pred.data["features"] == rows[0]
    assert pred.correlation_id == event.event_id  # the chain keeps the first id


async def test_on_features_wrong_feature_names_permanent_error_naming_them(
    rig: Rig, rows: list[dict[str, float]]
) -> None:
    bad = dict(rows[0])
    del bad["rsi_14"]
    bad["my_feature"] = 1.0
    with pytest.raises(PermanentError, match=r"missing features: rsi_14.*unexpected.*my_feature"):
        await rig.service.on_features(rig.features(bad))
    breaker = rig.orchestrator.circuit_breaker(COMPONENT)
    assert breaker is not None and breaker.failure_count == 0


async def test_on_features_slow_inference_times_out_then_breaker_opens(
    model_path: Path, rows: list[dict[str, float]]
) -> None:
    rig = Rig(model_path, timeout_ms=20)
    await rig.orchestrator.start()
    try:
        assert rig.runner is not None
        rig.runner.sleep_s = 0.2
        for _ in range(2):
            with pytest.raises(TransientError, match="ML_INFERENCE_TIMEOUT=20 ms"):
                await rig.service.on_features(rig.features(rows[0]))
        with pytest.raises(CircuitBreakerOpenError):
            await rig.service.on_features(rig.features(rows[0]))
        breaker = rig.orchestrator.circuit_breaker(COMPONENT)
        assert breaker is not None and breaker.state is CircuitState.OPEN
        await rig.orchestrator.check_components()
        entry = rig.orchestrator.health()["components"][COMPONENT]
        assert entry["state"] == "unhealthy"
        assert entry["circuit_breaker"] == "open"
        assert "lgbm-8e64920bd860" in entry["error_message"]
    finally:
        await rig.orchestrator.stop()


async def test_health_healthy_names_model_version(rig: Rig) -> None:
    await rig.orchestrator.check_components()
    entry = rig.orchestrator.health()["components"][COMPONENT]
    assert entry["state"] == "healthy"
    assert entry["circuit_breaker"] == "closed"
    assert entry["error_message"] == "model lgbm-8e64920bd860 (onnx)"


def _lightgbm_text_model() -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, len(FEATURE_NAMES)))
    y = (x[:, 0] > 0).astype(int)
    data = lgb.Dataset(x, y, feature_name=list(FEATURE_NAMES))
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4}, data, 5)
    return str(booster.model_to_string())


def _replace(path: Path, content: bytes, *, drop_card: bool = False) -> None:
    if drop_card:
        card_path_for(path).unlink()
    path.write_bytes(content)


async def test_reload_changed_model_file_served_without_restart(
    model_path: Path, rows: list[dict[str, float]]
) -> None:
    rig = Rig(model_path, reload_s=0.02)
    await rig.orchestrator.start()
    try:
        assert rig.runner is not None
        runner = rig.runner
        _replace(model_path, _lightgbm_text_model().encode(), drop_card=True)
        await eventually(
            lambda: runner.model_version != "lgbm-8e64920bd860", timeout=5, message="a reload"
        )
        assert runner.model_format == "lightgbm-text"
        await rig.bus.publish(rig.features(rows[0]))
        await rig.bus.flush(5)
        assert rig.predictions[-1].data["model_version"] == runner.model_version
        in_use = {
            sample.labels["model_version"]: sample.value
            for metric in rig.service.m_model.collect()
            for sample in metric.samples
        }
        assert in_use == {runner.model_version: 1.0}  # the old version's series is gone

        _replace(model_path, b"not a model")
        await eventually(
            lambda: runner.last_reload_error is not None, timeout=5, message="a failed reload"
        )
        await rig.orchestrator.check_components()
        entry = rig.orchestrator.health()["components"][COMPONENT]
        assert entry["state"] == "degraded"
        assert "reload failed" in entry["error_message"]
        assert runner.model_format == "lightgbm-text"  # the old model keeps serving
    finally:
        await rig.orchestrator.stop()


async def test_fast_model_moves_inline_and_a_slow_one_back_to_the_thread_under_the_timeout(
    model_path: Path, rows: list[dict[str, float]]
) -> None:
    # A generous inline limit (50 ms) so that a busy test machine cannot break the streak.
    rig = Rig(model_path, timeout_ms=200, inline_max_ms=50)
    await rig.orchestrator.start()
    try:
        assert rig.runner is not None
        service = rig.service
        some = [rows[i % len(rows)] for i in range(INLINE_STREAK)]
        threaded = [await service._infer(rig.runner, row) for row in some]
        assert service.inline  # INLINE_STREAK fast answers from the thread
        inline = [await service._infer(rig.runner, row) for row in some]
        assert service.inline
        assert [p.prediction for p in inline] == [p.prediction for p in threaded]

        rig.runner.delay_s = 0.08  # slower than the inline limit, within the timeout
        await service.on_features(rig.features(rows[0]))
        await rig.bus.flush(5)
        assert not service.inline  # back to the thread, and the answer still went out
        assert len(rig.predictions) == 1

        rig.runner.delay_s = 0.0
        for row in some:
            await service._infer(rig.runner, row)
        assert service.inline
        rig.runner.delay_s = 0.25  # inline and past ML_INFERENCE_TIMEOUT: still a timeout
        with pytest.raises(TransientError, match="ML_INFERENCE_TIMEOUT=200 ms"):
            await service.on_features(rig.features(rows[1]))
        assert not service.inline and service.timeouts == 1

        rig.runner.delay_s = 0.0
        for row in some:
            await service._infer(rig.runner, row)
        assert service.inline
        # Stuck without using CPU (waiting on something): past the timeout it is a timeout
        # too, and back to the thread.
        rig.runner.sleep_s = 0.25
        with pytest.raises(TransientError, match="ML_INFERENCE_TIMEOUT=200 ms"):
            await service.on_features(rig.features(rows[2]))
        assert not service.inline and service.timeouts == 2
    finally:
        await rig.orchestrator.stop()


async def test_inline_disabled_with_zero_limit(
    model_path: Path, rows: list[dict[str, float]]
) -> None:
    rig = Rig(model_path, inline_max_ms=0)
    await rig.orchestrator.start()
    try:
        assert rig.runner is not None
        for i in range(INLINE_STREAK * 2):
            await rig.service._infer(rig.runner, rows[i % len(rows)])
        assert not rig.service.inline
    finally:
        await rig.orchestrator.stop()
