from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hean.core.bus import EventBus
from hean.core.circuit_breaker import CircuitBreakerOpenError
from hean.core.errors import TransientError
from hean.core.metrics import Metrics
from hean.core.orchestrator import TradingOrchestrator


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class Component:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")


class Broken(Component):
    async def start(self) -> None:
        raise RuntimeError("no model file")


COMPONENT_KEYS = {"state", "last_check", "failure_count", "circuit_breaker"}


def assert_guide_shape(health: dict[str, Any]) -> None:
    assert set(health) == {"orchestrator", "components"}
    assert set(health["orchestrator"]) == {"running", "uptime_seconds", "overall_state"}
    assert isinstance(health["orchestrator"]["running"], bool)
    assert isinstance(health["orchestrator"]["uptime_seconds"], int)
    assert health["orchestrator"]["overall_state"] in {"healthy", "degraded", "unhealthy"}
    for entry in health["components"].values():
        assert COMPONENT_KEYS <= set(entry) <= COMPONENT_KEYS | {"error_message"}
        assert entry["state"] in {"healthy", "degraded", "unhealthy"}
        assert entry["circuit_breaker"] in {"closed", "open", "half_open"}
        assert isinstance(entry["last_check"], int) and isinstance(entry["failure_count"], int)


async def test_orchestrator_health_matches_guide_shape_and_states() -> None:
    clock = FakeClock()
    orch = TradingOrchestrator(bus=EventBus(), clock=clock, wall_clock=lambda: 1234567890.0)
    ml, router = Component(), Component()
    orch.register_component(name="ml_engine", component=ml, circuit_breaker=True,
                            failure_threshold=5, timeout=60.0)  # fmt: skip
    orch.register_component(name="execution_router", component=router, failure_threshold=2)
    await orch.start()
    clock.now += 3600

    health = orch.health()
    assert_guide_shape(health)
    assert health["orchestrator"] == {
        "running": True,
        "uptime_seconds": 3600,
        "overall_state": "healthy",
    }
    assert health["components"]["ml_engine"] == {
        "state": "healthy",
        "last_check": 1234567890,
        "failure_count": 0,
        "circuit_breaker": "closed",
    }

    async def timeout() -> None:
        raise TimeoutError("API timeout")

    for _ in range(2):
        with pytest.raises(TimeoutError):
            await orch.execute_with_circuit_breaker("execution_router", timeout)
    health = orch.health()
    assert health["components"]["execution_router"]["circuit_breaker"] == "open"
    assert health["components"]["execution_router"]["state"] == "unhealthy"
    assert health["orchestrator"]["overall_state"] == "unhealthy"
    with pytest.raises(CircuitBreakerOpenError, match="Circuit breaker is OPEN"):
        await orch.execute_with_circuit_breaker("execution_router", timeout)

    clock.now += 60
    health = orch.health()
    router_health = health["components"]["execution_router"]
    assert router_health["circuit_breaker"] == "half_open"
    assert router_health["state"] == "degraded"
    assert router_health["failure_count"] == 2
    assert router_health["error_message"] == "TimeoutError: API timeout"
    assert health["orchestrator"]["overall_state"] == "degraded"
    assert_guide_shape(health)

    await orch.stop()
    assert ml.calls == ["start", "stop"]
    assert orch.health()["orchestrator"]["running"] is False


async def test_orchestrator_execute_passes_arguments_through() -> None:
    orch = TradingOrchestrator(bus=EventBus())
    orch.register_component(name="ml_engine", component=object())

    async def predict(features: dict[str, float]) -> float:
        return sum(features.values())

    assert (
        await orch.execute_with_circuit_breaker(
            component_name="ml_engine", func=predict, features={"a": 1.0, "b": 2.0}
        )
        == 3.0
    )


async def test_orchestrator_failed_component_start_reported_unhealthy_others_start() -> None:
    orch = TradingOrchestrator(bus=EventBus())
    good = Component()
    orch.register_component(name="broken", component=Broken())
    orch.register_component(name="good", component=good)
    await orch.start()
    health = orch.health()
    assert good.calls == ["start"]
    assert health["components"]["broken"]["state"] == "unhealthy"
    assert "no model file" in health["components"]["broken"]["error_message"]
    assert health["orchestrator"]["overall_state"] == "unhealthy"
    await orch.stop()


async def test_orchestrator_health_check_results_and_non_critical_components() -> None:
    class Degraded(Component):
        def health_check(self) -> dict[str, str]:
            return {"state": "degraded", "error_message": "feed lagging 3 s"}

    class Failing(Component):
        async def health_check(self) -> bool:
            raise ConnectionError("gone")

    orch = TradingOrchestrator(bus=EventBus())
    orch.register_component(name="feed", component=Degraded())
    orch.register_component(name="extra", component=Failing(), critical=False)
    await orch.start()
    await orch.check_components()
    health = orch.health()
    assert health["components"]["feed"]["error_message"] == "feed lagging 3 s"
    assert health["components"]["extra"]["state"] == "unhealthy"
    assert health["orchestrator"]["overall_state"] == "degraded"
    await orch.stop()


async def test_orchestrator_unknown_component_lists_known_names() -> None:
    orch = TradingOrchestrator(bus=EventBus())
    orch.register_component(name="ml_engine", component=object())
    with pytest.raises(KeyError, match="registered: ml_engine"):
        await orch.execute_with_circuit_breaker("nope", lambda: None)


async def test_orchestrator_metrics_reflect_health() -> None:
    metrics = Metrics()
    orch = TradingOrchestrator(bus=EventBus(metrics=metrics), metrics=metrics)
    orch.register_component(name="a", component=object(), failure_threshold=1)
    await orch.start()

    def boom() -> None:
        raise ValueError("x")

    with pytest.raises(ValueError, match="x"):
        await orch.execute_with_circuit_breaker("a", boom)
    orch.health()
    text = metrics.render().decode()
    assert "hean_circuit_breakers_open 1.0" in text
    assert "hean_components_total 2.0" in text  # a + event_bus
    assert "hean_components_healthy 1.0" in text
    assert "hean_orchestrator_uptime_seconds" in text
    await orch.stop()


async def test_orchestrator_component_whose_venue_is_down_at_start_is_started_again() -> None:
    """An exchange down when execution starts (a TransientError from loading its markets)
    must not leave the process up doing nothing: the component is started again, with
    backoff, until the venue answers."""

    class VenueDown(Component):
        def __init__(self) -> None:
            super().__init__()
            self.failures = 2

        async def start(self) -> None:
            if self.failures:
                self.failures -= 1
                raise TransientError("bybit: RequestTimeout: timed out")
            await super().start()

    orch = TradingOrchestrator(bus=EventBus())
    venue = VenueDown()
    orch.register_component(name="execution", component=venue)
    await orch.start()
    entry = orch.health()["components"]["execution"]
    assert entry["state"] == "unhealthy"
    assert "RequestTimeout" in entry["error_message"]
    assert "unavailable for now: trying again" in entry["error_message"]
    for _ in range(100):  # backoff 0.2 s, then 0.4 s
        if venue.calls:
            break
        await asyncio.sleep(0.1)
    assert venue.calls == ["start"]
    assert orch.health()["components"]["execution"]["state"] == "healthy"
    await orch.stop()
    assert venue.calls == ["start", "stop"]
