"""ml-service wiring: FEATURES_READY in, ML_PREDICTION out.

- The model is `ML_MODEL_PATH` (the packaged default when empty), loaded by `ModelRunner`.
- Each event's feature names are checked against the model card first: a mismatch is a
  `PermanentError` naming the missing and unexpected features (the bus dead-letters it; it
  does not count against the circuit breaker).
- Inference runs in a worker thread under `ML_INFERENCE_TIMEOUT` (ms) and inside the
  orchestrator's circuit breaker of component `ml_engine`: a timeout is a `TransientError`
  (retried by the bus, counted by the breaker); while the breaker is open, events are
  retried later rather than answered.
- A fast model runs on the event loop instead: once `INLINE_STREAK` inferences in a row took
  at most `ML_INLINE_MAX_MS` of CPU time in the thread, inference runs inline (the thread
  hand-off costs more than such a model: two context switches and a GIL hand-over per
  event). An inline inference using more CPU than that sends it back to the thread; one
  slower than the timeout (wall time) still counts as a timeout and goes back too. A new
  model starts in the thread. `ML_INLINE_MAX_MS=0`: always the thread.
- The model file is checked for changes every `ML_RELOAD_INTERVAL_S` and swapped in without
  a restart; a broken new file leaves the old model serving and the component degraded.
- Replicas share the consumer group `ml-service`, so each FEATURES_READY is handled by one
  of them; the prediction names its input in `features_event_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, cast

from prometheus_client import Gauge
from pydantic import Field

from hean.core.bus import EventBus
from hean.core.circuit_breaker import CircuitState
from hean.core.errors import PermanentError, TransientError
from hean.core.metrics import Metrics
from hean.core.orchestrator import TradingOrchestrator
from hean.core.service import ServiceContext
from hean.core.settings import CoreSettings, MLSettings
from hean.core.types import Event, EventType
from hean.ml.model import FeatureMismatchError, ModelRunner, Prediction, default_model_path

log = logging.getLogger(__name__)

COMPONENT = "ml_engine"
#: Inferences in a row within ML_INLINE_MAX_MS (in the thread) before running inline.
INLINE_STREAK = 20


class MLServiceSettings(CoreSettings, MLSettings):
    ml_reload_interval_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=5.0, alias="ML_RELOAD_INTERVAL_S"
    )
    ml_allow_pickle: bool = Field(default=False, alias="ML_ALLOW_PICKLE")
    ml_allow_extra_features: bool = Field(default=False, alias="ML_ALLOW_EXTRA_FEATURES")
    ml_cache_size: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        default=4096, alias="ML_CACHE_SIZE"
    )
    ml_include_features: bool = Field(default=True, alias="ML_INCLUDE_FEATURES")
    ml_inline_max_ms: Annotated[float, Field(ge=0, le=100)] = Field(
        default=1.0, alias="ML_INLINE_MAX_MS"
    )

    @property
    def model_path(self) -> Path:
        return Path(self.ml_model_path) if self.ml_model_path else default_model_path()


class MLService:
    """Answers FEATURES_READY with ML_PREDICTION (see the module docstring)."""

    def __init__(
        self,
        bus: EventBus,
        orchestrator: TradingOrchestrator,
        runner_factory: Callable[[], ModelRunner],
        *,
        inference_timeout_ms: float = 100.0,
        reload_interval_s: float = 5.0,
        include_features: bool = True,
        inline_max_ms: float = 1.0,
        metrics: Metrics | None = None,
        component: str = COMPONENT,
    ) -> None:
        self.bus = bus
        self.orchestrator = orchestrator
        self.runner_factory = runner_factory
        self.timeout_s = inference_timeout_ms / 1000
        self.timeout_ms = inference_timeout_ms
        self.reload_interval_s = reload_interval_s
        self.include_features = include_features
        self.inline_max_s = inline_max_ms / 1000
        self.inline = False  # inference on the event loop (see the module docstring)
        self._fast_streak = 0
        self.metrics = metrics
        self.component = component
        self.runner: ModelRunner | None = None
        self.predictions = 0
        self.timeouts = 0
        self.reloads = 0
        # Two threads: a timed-out inference keeps its thread until it ends; the next one
        # must not queue behind it.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inference")
        self._stop = asyncio.Event()
        self._reload_task: asyncio.Task[None] | None = None
        registry = metrics.registry if metrics is not None else None
        self.m_model = Gauge(
            "hean_model_info", "1, for the model version in use only", ["model_version"],
            registry=registry,
        )  # fmt: skip

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.runner = await loop.run_in_executor(self._executor, self.runner_factory)
        self.m_model.labels(self.runner.model_version).set(1)
        log.info(
            "model %s (%s, %d features) from %s",
            self.runner.model_version,
            self.runner.model_format,
            len(self.runner.feature_names),
            self.runner.model_path,
        )
        self.bus.subscribe(EventType.FEATURES_READY, self.on_features, name="ml.on_features")
        if self.reload_interval_s > 0:
            self._stop.clear()
            self._reload_task = asyncio.create_task(self._reload_loop(), name="model-reload")

    async def stop(self) -> None:
        self._stop.set()
        if self._reload_task is not None:
            await self._reload_task
            self._reload_task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _require_runner(self) -> ModelRunner:
        if self.runner is None:
            raise TransientError("the model is not loaded yet")
        return self.runner

    async def on_features(self, event: Event) -> None:
        runner = self._require_runner()
        data = event.data
        features: Mapping[str, float] = data["features"]
        symbol = data.get("symbol")
        try:
            runner.check_features(features)
        except FeatureMismatchError as exc:
            raise PermanentError(
                f"FEATURES_READY {event.event_id} ({symbol}) does not fit model "
                f"{runner.model_version}: {exc}"
            ) from exc
        started = time.perf_counter()
        prediction = await self.orchestrator.execute_with_circuit_breaker(
            self.component, self._infer, runner, features
        )
        if self.metrics is not None:
            self.metrics.latency_seconds.labels(stage="inference").observe(
                time.perf_counter() - started
            )
        out: dict[str, Any] = {
            "symbol": symbol,
            "prediction": prediction.prediction,
            "confidence": prediction.confidence,
            "model_version": prediction.model_version,
            "timestamp": data.get("timestamp"),
            # The chain of the symbol's rows, for strategy to put predictions back in bar
            # order (replicas finish in any order).
            "previous_timestamp": data.get("previous_timestamp"),
            "features_event_id": event.event_id,
        }
        if data.get("feature_version") is not None:
            out["feature_version"] = data["feature_version"]
        if self.include_features:
            # Downstream filters (strategy) see exactly the inputs of this prediction.
            out["features"] = dict(features)
        await self.bus.publish(Event(event_type=EventType.ML_PREDICTION, data=out))
        self.predictions += 1
        if self.metrics is not None:
            self.metrics.predictions_total.labels(prediction.model_version).inc()

    async def _infer(self, runner: ModelRunner, features: Mapping[str, float]) -> Prediction:
        try:
            if self.inline:
                return self._infer_inline(runner, features)
            loop = asyncio.get_running_loop()
            prediction, _, cpu_s = await asyncio.wait_for(
                loop.run_in_executor(self._executor, _timed_predict, runner, features),
                self.timeout_s,
            )
        except TimeoutError:
            self.timeouts += 1
            raise TransientError(
                f"inference took longer than ML_INFERENCE_TIMEOUT={self.timeout_ms:g} ms"
            ) from None
        except FeatureMismatchError as exc:  # the model changed under us: still permanent
            raise PermanentError(str(exc)) from exc
        except ValueError as exc:  # NaN or infinite feature values
            raise PermanentError(f"bad feature values: {exc}") from exc
        if cpu_s <= self.inline_max_s and runner is self.runner:
            self._fast_streak += 1
            if self._fast_streak >= INLINE_STREAK:
                self.inline = True
                log.info(
                    "model %s answers within ML_INLINE_MAX_MS=%g: inference runs inline",
                    runner.model_version,
                    self.inline_max_s * 1000,
                )
        else:
            self._fast_streak = 0
        return prediction

    def _infer_inline(self, runner: ModelRunner, features: Mapping[str, float]) -> Prediction:
        prediction, took_s, cpu_s = _timed_predict(runner, features)
        if cpu_s > self.inline_max_s or took_s > self.timeout_s:
            self.inline = False
            self._fast_streak = 0
            log.info(
                "inference took %.2f ms of CPU (ML_INLINE_MAX_MS=%g): back to the worker thread",
                cpu_s * 1000,
                self.inline_max_s * 1000,
            )
        if took_s > self.timeout_s:
            raise TimeoutError
        return prediction

    async def _reload_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.reload_interval_s)
            if self._stop.is_set() or self.runner is None:
                return
            runner = self.runner
            old = runner.model_version
            try:
                changed = await loop.run_in_executor(self._executor, runner.reload_if_changed)
            except Exception:
                log.exception("model reload check failed")
                continue
            if changed:
                self.inline = False  # a new model proves itself in the thread first
                self._fast_streak = 0
                self.reloads += 1
                # Only the model in use has a series: a retrained model every hour would
                # otherwise leave thousands of zeros behind in a year.
                self.m_model.remove(old)
                self.m_model.labels(runner.model_version).set(1)
                log.info("serving model %s (was %s)", runner.model_version, old)

    def health_check(self) -> dict[str, Any]:
        runner = self.runner
        if runner is None:
            return {"state": "unhealthy", "error_message": "model not loaded"}
        about = f"model {runner.model_version} ({runner.model_format})"
        breaker = self.orchestrator.circuit_breaker(self.component)
        if breaker is not None and breaker.state is not CircuitState.CLOSED:
            about += f"; circuit breaker {breaker.state.value}"
        if runner.last_reload_error:
            return {
                "state": "degraded",
                "error_message": f"{about}; reload failed: {runner.last_reload_error}",
            }
        # The orchestrator's entry carries no free-form details, so the model in use is
        # stated in the message even when healthy.
        return {"state": "healthy", "error_message": about}


def _timed_predict(
    runner: ModelRunner, features: Mapping[str, float]
) -> tuple[Prediction, float, float]:
    """The prediction, its wall time and the CPU time of the calling thread (seconds).

    The CPU time decides inline or thread: on a busy machine a 15 us inference is sometimes
    preempted for milliseconds of wall time, which says nothing about the model."""
    started, cpu_started = time.perf_counter(), time.thread_time()
    prediction = runner.predict(features)
    return prediction, time.perf_counter() - started, time.thread_time() - cpu_started


def build(ctx: ServiceContext) -> None:
    settings = cast(MLServiceSettings, ctx.settings)

    def load() -> ModelRunner:
        return ModelRunner(
            settings.model_path,
            allow_pickle=settings.ml_allow_pickle,
            allow_extra_features=settings.ml_allow_extra_features,
            cache_size=settings.ml_cache_size,
        )

    service = MLService(
        ctx.bus,
        ctx.orchestrator,
        load,
        inference_timeout_ms=settings.ml_inference_timeout_ms,
        reload_interval_s=settings.ml_reload_interval_s,
        include_features=settings.ml_include_features,
        inline_max_ms=settings.ml_inline_max_ms,
        metrics=ctx.metrics,
    )
    ctx.orchestrator.register_component(
        name=COMPONENT,
        component=service,
        circuit_breaker=True,
        failure_threshold=settings.cb_failure_threshold,
        timeout=settings.cb_recovery_timeout_s,
        success_threshold=settings.cb_success_threshold,
    )
