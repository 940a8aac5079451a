"""Circuit breaker: CLOSED -> OPEN after N consecutive failures -> HALF_OPEN after a timeout
-> CLOSED after M successes (any failure in HALF_OPEN opens it again).

Time comes from an injected monotonic clock, so transitions are tested without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, ParamSpec, TypeVar, overload

from hean.core.errors import PermanentError

P = ParamSpec("P")
T = TypeVar("T")
Clock = Callable[[], float]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreakerOpenError(RuntimeError):
    """Raised instead of calling a component whose circuit breaker is open."""

    def __init__(self, name: str, retry_in_s: float) -> None:
        super().__init__(
            f"Circuit breaker is OPEN for '{name}': call refused, next trial in {retry_in_s:.1f} s"
        )
        self.name = name
        self.retry_in_s = retry_in_s


class CircuitBreaker:
    """A per-component circuit breaker.

    `ignored` exception types (by default `PermanentError`: a bad request, not a sick
    dependency) pass through without counting as failures.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        recovery_timeout: float = 60.0,
        success_threshold: int = 2,
        half_open_max_calls: int | None = None,
        ignored: tuple[type[BaseException], ...] = (PermanentError,),
        clock: Clock = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or success_threshold < 1 or recovery_timeout <= 0:
            raise ValueError("thresholds must be >= 1 and the recovery timeout > 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.success_threshold = success_threshold
        self.half_open_max_calls = half_open_max_calls or success_threshold
        self.ignored = ignored
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._half_open_in_flight = 0
        self._opened_at = 0.0
        self.total_failures = 0
        self.last_error: str | None = None
        self.last_failure_at: float | None = None

    @property
    def state(self) -> CircuitState:
        if (
            self._state is CircuitState.OPEN
            and self._clock() - self._opened_at >= self.recovery_timeout
        ):
            self._to(CircuitState.HALF_OPEN)
        return self._state

    @property
    def failure_count(self) -> int:
        """Consecutive failures since the last success (what the health JSON reports)."""
        return self._consecutive_failures

    def _to(self, state: CircuitState) -> None:
        self._state = state
        if state is CircuitState.OPEN:
            self._opened_at = self._clock()
        if state is not CircuitState.HALF_OPEN:
            self._half_open_in_flight = 0
        self._half_open_successes = 0

    def before_call(self) -> None:
        """Admit a call or raise `CircuitBreakerOpenError`."""
        state = self.state
        if state is CircuitState.OPEN:
            retry_in = max(0.0, self.recovery_timeout - (self._clock() - self._opened_at))
            raise CircuitBreakerOpenError(self.name, retry_in)
        if state is CircuitState.HALF_OPEN:
            if self._half_open_in_flight >= self.half_open_max_calls:
                raise CircuitBreakerOpenError(self.name, 0.0)
            self._half_open_in_flight += 1

    def record_success(self) -> None:
        self._consecutive_failures = 0
        if self._state is CircuitState.HALF_OPEN:
            self._half_open_in_flight = max(0, self._half_open_in_flight - 1)
            self._half_open_successes += 1
            if self._half_open_successes >= self.success_threshold:
                self._to(CircuitState.CLOSED)
                self.last_error = None

    def record_failure(self, error: BaseException) -> None:
        self._consecutive_failures += 1
        self.total_failures += 1
        self.last_error = f"{type(error).__name__}: {error}"
        self.last_failure_at = self._clock()
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED
            and self._consecutive_failures >= self.failure_threshold
        ):
            self._to(CircuitState.OPEN)

    def _release(self) -> None:
        if self._state is CircuitState.HALF_OPEN:
            self._half_open_in_flight = max(0, self._half_open_in_flight - 1)

    @overload
    async def call(
        self, func: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    async def call(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def call(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run `func` (sync or async) under the breaker."""
        self.before_call()
        try:
            result = func(*args, **kwargs)
            if isinstance(result, Awaitable):
                result = await result
        except self.ignored:
            self._release()
            raise
        except Exception as exc:
            self.record_failure(exc)
            raise
        except BaseException:  # cancellation: neither success nor failure
            self._release()
            raise
        self.record_success()
        return result

    def reset(self) -> None:
        self._consecutive_failures = 0
        self.last_error = None
        self._to(CircuitState.CLOSED)
