"""Every code example of the integration guide runs unchanged (examples/guide/ holds them
verbatim) against the project, on the in-memory bus and on Redis Streams."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from examples.guide import (
    circuit_breaker_call,
    event_bus_module,
    ml_model,
    orchestrator_registration,
    replay,
)
from hean.core.bus import EventBus
from hean.core.circuit_breaker import CircuitBreakerOpenError
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType
from tests.helpers import eventually


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[EventBus]:
    if request.param == "memory":
        bus = EventBus()
    else:
        url = request.getfixturevalue("redis_url")
        bus = EventBus.redis(
            CoreSettings(REDIS_URL=url, SERVICE_NAME="guide", EVENT_BLOCK_MS=50),
            group_start_id="0",
        )
    yield bus
    await bus.stop()


def collect(bus: EventBus, event_type: EventType) -> list[Event]:
    seen: list[Event] = []
    bus.subscribe(event_type, seen.append, name=f"collector-{event_type.value}")
    return seen


def tick() -> Event:
    return Event(event_type=EventType.TICK, data={"symbol": "BTC/USDT", "price": "42000.5"})


async def test_guide_event_bus_module_publishes_signal_on_tick(bus: EventBus) -> None:
    module = event_bus_module.MyModule(bus)
    signals = collect(bus, EventType.SIGNAL)
    await module.start()
    await bus.start()
    sent = await bus.publish(tick())
    await eventually(lambda: len(signals) == 1, message="the module's SIGNAL")
    assert signals[0].data["symbol"] == "BTC/USDT"
    assert signals[0].data["side"] == "BUY"
    assert signals[0].correlation_id == sent.event_id


async def test_guide_orchestrator_registration_starts_module(bus: EventBus) -> None:
    module = event_bus_module.MyModule(bus)
    signals = collect(bus, EventType.SIGNAL)
    orchestrator = await orchestrator_registration.run(bus, module)
    try:
        await bus.publish(tick())
        await eventually(lambda: len(signals) == 1, message="SIGNAL via orchestrator")
        health = orchestrator.health()
        assert health["orchestrator"]["running"] is True
        assert health["components"]["my_module"]["circuit_breaker"] == "closed"
        assert orchestrator.circuit_breaker("my_module").failure_threshold == 5
    finally:
        await orchestrator.stop()


class SumModel:
    """A stand-in for `load_model()`'s result: the guide leaves the model to the user."""

    def predict(self, features: dict[str, float]) -> float:
        return round(sum(features.values()), 6)


class GuideMLModel(ml_model.MyMLModel):
    def load_model(self) -> SumModel:
        return SumModel()


async def test_guide_ml_model_publishes_prediction_within_timeout(bus: EventBus) -> None:
    model = GuideMLModel(bus)
    predictions = collect(bus, EventType.ML_PREDICTION)
    await model.start()
    await bus.start()
    await bus.publish(
        Event(
            event_type=EventType.FEATURES_READY,
            data={"symbol": "BTC/USDT", "features": {"rsi_14": 0.25, "ret_1": 0.5}},
        )
    )
    await eventually(lambda: len(predictions) == 1, message="ML_PREDICTION")
    assert predictions[0].data["prediction"] == 0.75


async def test_guide_circuit_breaker_call_and_open_error() -> None:
    from hean.core.orchestrator import TradingOrchestrator

    class MLEngine:
        def __init__(self) -> None:
            self.fail = False

        async def predict(self, features: dict[str, float]) -> float:
            if self.fail:
                raise TimeoutError("inference timed out")
            return features["x"] * 2

    engine = MLEngine()
    orchestrator = TradingOrchestrator(bus=EventBus())
    orchestrator.register_component(name="ml_engine", component=engine)
    await orchestrator.start()
    assert await circuit_breaker_call.run(orchestrator, engine, {"x": 1.5}) == 3.0
    engine.fail = True
    for _ in range(5):
        with pytest.raises(TimeoutError):
            await circuit_breaker_call.run(orchestrator, engine, {"x": 1.0})
    with pytest.raises(CircuitBreakerOpenError, match="Circuit breaker is OPEN"):
        await circuit_breaker_call.run(orchestrator, engine, {"x": 1.0})
    assert orchestrator.health()["components"]["ml_engine"]["circuit_breaker"] == "open"
    await orchestrator.stop()


async def test_guide_replay_prints_order_filled_events(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    bus = EventBus.redis(CoreSettings(REDIS_URL=redis_url, SERVICE_NAME="execution"))
    for i in range(3):
        await bus.publish(
            Event(
                event_type=EventType.ORDER_FILLED,
                data={
                    "order_id": f"o-{i}",
                    "fill_price": Decimal("42000.5"),
                    "filled_qty": "0.001",
                    "fee": "0.02",
                },
            )
        )
    await bus.flush(10)
    await bus.stop()
    await replay.run()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert all(line.startswith("ORDER_FILLED id=") for line in lines)
    assert '"order_id":"o-2"' in lines[2] and '"fill_price":"42000.5"' in lines[2]


def _service_example(module: str, service: str) -> Any:
    try:
        return importlib.import_module(f"examples.guide.{module}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(f"hean.{service}"):
            pytest.skip(f"hean.{service} is built by its own issue (order path); not here yet")
        raise


class RejectBig:
    """The guide leaves `is_too_risky` to the user: here, anything over 1 BTC."""

    def is_too_risky(self, order: Any) -> bool:
        return bool(order["size"] > Decimal(1))


async def test_guide_custom_risk_check_approves_and_rejects(bus: EventBus) -> None:
    example = _service_example("custom_risk_check", "risk")

    class Check(RejectBig, example.CustomRiskCheck):  # type: ignore[misc, name-defined]
        pass

    approved = collect(bus, EventType.ORDER_APPROVED)
    rejected = collect(bus, EventType.ORDER_REJECTED)
    await Check(bus).start()
    await bus.start()
    for order_id, size in (("small", "0.5"), ("big", "2")):
        await bus.publish(
            Event(
                event_type=EventType.ORDER_REQUEST,
                data={"id": order_id, "symbol": "BTC/USDT", "side": "BUY", "size": size},
            )
        )
    await eventually(lambda: len(approved) == 1 and len(rejected) == 1, message="decisions")
    assert approved[0].data["order_id"] == "small"
    assert rejected[0].data == {"order_id": "big", "reason": "Risk limit exceeded"}


async def test_guide_custom_execution_strategy_publishes_fill(bus: EventBus) -> None:
    example = _service_example("custom_execution", "execution")

    class Strategy(example.CustomExecutionStrategy):  # type: ignore[misc, name-defined]
        async def execute_with_strategy(self, order: Any) -> dict[str, Any]:
            return {
                "order_id": order["order_id"],
                "fill_price": self.exchange["BTC/USDT"],
                "filled_qty": order["size"],
                "fee": "0",
            }

    fills = collect(bus, EventType.ORDER_FILLED)
    await Strategy(bus, {"BTC/USDT": Decimal("42000")}).start()
    await bus.start()
    await bus.publish(
        Event(
            event_type=EventType.ORDER_APPROVED,
            data={"id": "o-9", "symbol": "BTC/USDT", "side": "BUY", "size": "0.25"},
        )
    )
    await eventually(lambda: len(fills) == 1, message="the fill")
    assert fills[0].data["filled_qty"] == Decimal("0.25")
