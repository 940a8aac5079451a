from __future__ import annotations

import pytest

from hean.core.circuit_breaker import CircuitBreaker, CircuitBreakerOpenError, CircuitState
from hean.core.errors import PermanentError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def fail() -> None:
    raise TimeoutError("API timeout")


async def succeed() -> str:
    return "ok"


async def trip(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(TimeoutError):
            await breaker.call(fail)


async def test_circuit_breaker_opens_after_five_consecutive_failures() -> None:
    breaker = CircuitBreaker("ml_engine", clock=FakeClock())
    await trip(breaker, 4)
    assert breaker.state is CircuitState.CLOSED and breaker.failure_count == 4
    await trip(breaker, 1)
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError, match="Circuit breaker is OPEN for 'ml_engine'"):
        await breaker.call(succeed)


async def test_circuit_breaker_success_resets_consecutive_count() -> None:
    breaker = CircuitBreaker("x", clock=FakeClock())
    await trip(breaker, 4)
    assert await breaker.call(succeed) == "ok"
    await trip(breaker, 4)
    assert breaker.state is CircuitState.CLOSED


async def test_circuit_breaker_half_open_after_timeout_closes_after_two_successes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", clock=clock)
    await trip(breaker, 5)
    clock.now += 59.9
    assert breaker.state is CircuitState.OPEN
    clock.now += 0.1
    assert breaker.state is CircuitState.HALF_OPEN
    await breaker.call(succeed)
    assert breaker.state is CircuitState.HALF_OPEN
    await breaker.call(succeed)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failure_count == 0


async def test_circuit_breaker_failure_in_half_open_reopens() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", clock=clock)
    await trip(breaker, 5)
    clock.now += 60
    await trip(breaker, 1)
    assert breaker.state is CircuitState.OPEN
    clock.now += 30
    assert breaker.state is CircuitState.OPEN  # a fresh timeout started at the reopening


async def test_circuit_breaker_thresholds_configurable() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "x", failure_threshold=2, recovery_timeout=5, success_threshold=3, clock=clock
    )
    await trip(breaker, 2)
    assert breaker.state is CircuitState.OPEN
    clock.now += 5
    for _ in range(2):
        await breaker.call(succeed)
    assert breaker.state is CircuitState.HALF_OPEN
    await breaker.call(succeed)
    assert breaker.state is CircuitState.CLOSED


async def test_circuit_breaker_permanent_errors_do_not_count() -> None:
    async def bad_request() -> None:
        raise PermanentError("price off tick")

    breaker = CircuitBreaker("x", failure_threshold=1, clock=FakeClock())
    with pytest.raises(PermanentError):
        await breaker.call(bad_request)
    assert breaker.state is CircuitState.CLOSED


async def test_circuit_breaker_sync_functions_supported() -> None:
    breaker = CircuitBreaker("x", clock=FakeClock())
    assert await breaker.call(lambda a, b: a + b, 2, 3) == 5
