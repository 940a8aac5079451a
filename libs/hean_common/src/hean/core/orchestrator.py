"""`TradingOrchestrator`: lifecycle, circuit breakers and health for a service's components.

```python
orchestrator = TradingOrchestrator(bus=event_bus)
orchestrator.register_component(name="my_module", component=my_module,
                                circuit_breaker=True, failure_threshold=5, timeout=60.0)
await orchestrator.start()
```

`start()` starts components in registration order (each `start()` may subscribe), then the
bus, so no event arrives before its handler exists. `stop()` stops the bus first (in-flight
handlers finish, the outbox flushes) and then the components in reverse order. `health()`
returns the guide's "Health Status Response"; with a Redis client the snapshot is also
written to Redis with a TTL for the gateway to merge.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, overload

from hean.core.bus import Backoff, BusState, EventBus, redis_unavailable
from hean.core.circuit_breaker import CircuitBreaker, CircuitState
from hean.core.errors import TransientError
from hean.core.health import (
    ComponentState,
    HealthReporter,
    component_state_from,
    overall_state,
)
from hean.core.metrics import Metrics

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

EVENT_BUS_COMPONENT = "event_bus"
_STATE_CODE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


@dataclass(slots=True)
class _Registered:
    name: str
    component: Any
    breaker: CircuitBreaker | None
    critical: bool
    started: bool = False
    start_error: str | None = None
    last_check: int = 0
    check_state: ComponentState = ComponentState.HEALTHY
    check_message: str | None = None


class TradingOrchestrator:
    """Runs one service's components (see the module docstring)."""

    def __init__(
        self,
        bus: EventBus,
        *,
        service_name: str | None = None,
        instance: str | None = None,
        metrics: Metrics | None = None,
        reporter: HealthReporter | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        health_check_timeout: float = 2.0,
        failure_threshold: int = 5,
        recovery_timeout: float = 60.0,
        success_threshold: int = 2,
    ) -> None:
        self.bus = bus
        self.service_name = service_name or "hean"
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.metrics = metrics if metrics is not None else bus.metrics
        self.reporter = reporter
        self._clock = clock
        self._wall_clock = wall_clock
        self._health_check_timeout = health_check_timeout
        # Breaker thresholds for components registered without their own (CB_* settings).
        self._breaker_defaults = (failure_threshold, recovery_timeout, success_threshold)
        self._components: dict[str, _Registered] = {}
        self._running = False
        self._started_at: float | None = None
        self._health_task: asyncio.Task[None] | None = None
        #: Components whose start met Redis unavailable: started again in the background.
        self._start_retries: list[asyncio.Task[None]] = []

    # --- registration and lifecycle --------------------------------------------------------

    def register_component(
        self,
        name: str,
        component: Any,
        circuit_breaker: bool = True,
        failure_threshold: int | None = None,
        timeout: float | None = None,
        success_threshold: int | None = None,
        *,
        critical: bool = True,
    ) -> None:
        """Register `component` under `name`.

        With `circuit_breaker=True`, calls made through `execute_with_circuit_breaker(name,
        ...)` open the breaker after `failure_threshold` consecutive failures, try again
        after `timeout` seconds and close after `success_threshold` successes (unset: the
        orchestrator's defaults, 5 / 60 s / 2, or the CB_* settings in a service). A component
        that is not `critical` makes the service degraded, never unhealthy.
        """
        if not name or name == EVENT_BUS_COMPONENT:
            raise ValueError(f"invalid component name {name!r}")
        if name in self._components:
            raise ValueError(f"component {name!r} is already registered")
        if self._running:
            raise RuntimeError("register components before start()")
        default_failures, default_timeout, default_successes = self._breaker_defaults
        breaker = (
            CircuitBreaker(
                name,
                failure_threshold=failure_threshold or default_failures,
                recovery_timeout=timeout or default_timeout,
                success_threshold=success_threshold or default_successes,
                clock=self._clock,
            )
            if circuit_breaker
            else None
        )
        self._components[name] = _Registered(name, component, breaker, critical)

    def circuit_breaker(self, name: str) -> CircuitBreaker | None:
        return self._require(name).breaker

    @property
    def component_names(self) -> list[str]:
        return list(self._components)

    @property
    def running(self) -> bool:
        return self._running

    async def start(self) -> None:
        """Start every component (registration order), then the bus and health reporting.

        A component whose `start()` raises is marked unhealthy with its error; the others
        still start, and the service reports itself unhealthy rather than dying silently.
        If it raised because Redis was out of reach or refused writes for now (out of
        memory), or with a `TransientError` (an exchange that is down or timing out), it is
        started again in the background, with backoff, until it starts.
        """
        if self._running:
            return
        retry: list[_Registered] = []
        for reg in self._components.values():
            if not await self._start_component(reg, first=True):
                retry.append(reg)
        await self.bus.start()
        self._start_retries = [
            asyncio.create_task(self._start_again(reg), name=f"start-{reg.name}") for reg in retry
        ]
        self._running = True
        self._started_at = self._clock()
        if self.reporter is not None:
            self._health_task = asyncio.create_task(self._report_loop(), name="health-report")
        log.info(
            "%s started: %s", self.service_name, ", ".join(self._components) or "no components"
        )

    async def _start_component(self, reg: _Registered, *, first: bool) -> bool:
        """Start one component; False if Redis or what it needs was unavailable for now
        (to be tried again)."""
        start = getattr(reg.component, "start", None)
        try:
            if start is not None:
                result = start()
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            reg.start_error = f"start failed: {type(exc).__name__}: {exc}"
            if redis_unavailable(exc):
                reg.start_error += " (Redis unavailable: trying again)"
            elif isinstance(exc, TransientError):
                reg.start_error += " (unavailable for now: trying again)"
            else:
                log.exception("component %s failed to start", reg.name)
                return True
            if first:
                log.warning("component %s could not start: %s", reg.name, reg.start_error)
            return False
        if not first:
            log.info("component %s started", reg.name)
        reg.started = True
        reg.start_error = None
        return True

    async def _start_again(self, reg: _Registered) -> None:
        backoff = Backoff(initial=0.2, maximum=5.0)
        while self._running:
            await asyncio.sleep(backoff.next_delay())
            if await self._start_component(reg, first=False):
                return

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop consuming (in-flight handlers finish), stop components in reverse order, then
        close the bus once everything they published is delivered."""
        if not self._running:
            return
        self._running = False
        for task in self._start_retries:
            task.cancel()
        await asyncio.gather(*self._start_retries, return_exceptions=True)
        self._start_retries = []
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        await self.bus.stop_consuming(drain_timeout)
        for reg in reversed(list(self._components.values())):
            stop = getattr(reg.component, "stop", None)
            if stop is None or not reg.started:
                continue
            try:
                result = stop()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("component %s failed to stop cleanly", reg.name)
            reg.started = False
        await self.bus.stop(drain_timeout)
        if self.reporter is not None:
            await self.reporter.withdraw(self.service_name, self.instance)
        log.info("%s stopped", self.service_name)

    # --- fault tolerance -------------------------------------------------------------------

    @overload
    async def execute_with_circuit_breaker(
        self,
        component_name: str,
        func: Callable[P, Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T: ...

    @overload
    async def execute_with_circuit_breaker(
        self, component_name: str, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    async def execute_with_circuit_breaker(
        self, component_name: str, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs
    ) -> Any:
        """Call `func(*args, **kwargs)` under `component_name`'s circuit breaker.

        Raises `CircuitBreakerOpenError` ("Circuit breaker is OPEN ...") while it is open.
        """
        reg = self._require(component_name)
        if reg.breaker is None:
            result = func(*args, **kwargs)
            if inspect.isawaitable(result):
                return await result
            return result
        try:
            return await reg.breaker.call(func, *args, **kwargs)
        finally:
            self._update_breaker_metrics()

    def _require(self, name: str) -> _Registered:
        try:
            return self._components[name]
        except KeyError:
            known = ", ".join(sorted(self._components)) or "none"
            raise KeyError(f"unknown component {name!r} (registered: {known})") from None

    # --- health ----------------------------------------------------------------------------

    async def check_components(self) -> None:
        """Ask each component with a `health_check()` how it is (bounded by a timeout)."""
        now = int(self._wall_clock())
        for reg in self._components.values():
            check = getattr(reg.component, "health_check", None)
            reg.last_check = now
            if check is None:
                continue
            try:
                result = check()
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, self._health_check_timeout)
                reg.check_state, reg.check_message = component_state_from(result)
            except Exception as exc:  # noqa: BLE001 - a failing check is itself the report
                reg.check_state = ComponentState.UNHEALTHY
                reg.check_message = f"health check failed: {type(exc).__name__}: {exc}"

    def health(self) -> dict[str, Any]:
        """The guide's "Health Status Response" for this process."""
        now = int(self._wall_clock())
        components: dict[str, dict[str, Any]] = {}
        critical_states: list[ComponentState] = []
        other_states: list[ComponentState] = []
        for reg in self._components.values():
            entry = self._component_health(reg, now)
            components[reg.name] = entry
            state = ComponentState(entry["state"])
            (critical_states if reg.critical else other_states).append(state)
        bus_entry = self._bus_health(now)
        components[EVENT_BUS_COMPONENT] = bus_entry
        critical_states.append(ComponentState(bus_entry["state"]))
        overall = overall_state(critical_states, other_states, running=self._running)
        uptime = self._clock() - self._started_at if self._started_at is not None else 0.0
        if self.metrics is not None:
            self._update_metrics(components, uptime if self._running else 0.0)
        return {
            "orchestrator": {
                "running": self._running,
                "uptime_seconds": int(uptime) if self._running else 0,
                "overall_state": overall.value,
            },
            "components": components,
        }

    def _component_health(self, reg: _Registered, now: int) -> dict[str, Any]:
        breaker = reg.breaker
        cb_state = breaker.state if breaker is not None else CircuitState.CLOSED
        failures = breaker.failure_count if breaker is not None else 0
        states = [reg.check_state]
        message = reg.check_message
        if reg.start_error is not None:
            states.append(ComponentState.UNHEALTHY)
            message = reg.start_error
        elif not reg.started and self._running:
            states.append(ComponentState.UNHEALTHY)
            message = message or "not started"
        if cb_state is CircuitState.OPEN:
            states.append(ComponentState.UNHEALTHY)
        elif cb_state is CircuitState.HALF_OPEN or failures > 0:
            states.append(ComponentState.DEGRADED)
        if breaker is not None and (cb_state is not CircuitState.CLOSED or failures > 0):
            message = message or breaker.last_error
        entry: dict[str, Any] = {
            "state": max(states, key=_severity).value,
            "last_check": reg.last_check or now,
            "failure_count": failures,
            "circuit_breaker": cb_state.value,
        }
        if message:
            entry["error_message"] = message
        return entry

    def _bus_health(self, now: int) -> dict[str, Any]:
        bus = self.bus.health()
        state = {
            BusState.HEALTHY: ComponentState.HEALTHY,
            BusState.DEGRADED: ComponentState.DEGRADED,
            BusState.UNHEALTHY: ComponentState.UNHEALTHY,
        }[bus.state]
        entry: dict[str, Any] = {
            "state": state.value,
            "last_check": now,
            "failure_count": 0 if bus.connected else 1,
            "circuit_breaker": CircuitState.CLOSED.value,
        }
        if bus.error_message:
            entry["error_message"] = bus.error_message
        return entry

    def _update_breaker_metrics(self) -> None:
        if self.metrics is None:
            return
        open_count = 0
        for reg in self._components.values():
            if reg.breaker is None:
                continue
            state = reg.breaker.state
            open_count += state is CircuitState.OPEN
            self.metrics.circuit_breaker_state.labels(reg.name).set(_STATE_CODE[state])
        self.metrics.circuit_breakers_open.set(open_count)

    def _update_metrics(self, components: Mapping[str, Mapping[str, Any]], uptime: float) -> None:
        assert self.metrics is not None
        healthy = 0
        for name, entry in components.items():
            ok = entry["state"] == ComponentState.HEALTHY.value
            healthy += ok
            self.metrics.component_up.labels(name).set(1 if ok else 0)
        self.metrics.components_healthy.set(healthy)
        self.metrics.components_total.set(len(components))
        self.metrics.uptime_seconds.set(uptime)
        self._update_breaker_metrics()
        self.metrics.queue_size.set(self.bus.queue_size)

    async def _report_loop(self) -> None:
        assert self.reporter is not None
        while True:
            try:
                await self.check_components()
                await self.reporter.publish(self.service_name, self.instance, self.health())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis may be down; health says so
                log.debug("health snapshot not written: %s", exc)
            await asyncio.sleep(self.reporter.interval_s)


def _severity(state: ComponentState) -> int:
    return {ComponentState.HEALTHY: 0, ComponentState.DEGRADED: 1, ComponentState.UNHEALTHY: 2}[
        state
    ]
