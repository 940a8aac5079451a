"""The composition root every service process uses: `run_service(name, build)`.

`build(ctx)` registers the service's components on `ctx.orchestrator` (and may subscribe
through `ctx.bus`). `run_service` then loads settings (a bad value: one line naming the
variable, exit status 2), sets up logging with secret redaction, the Redis bus, health
snapshots, the `/health` + `/metrics` endpoint, and stops cleanly on SIGTERM/SIGINT
(in-flight handlers finish, the outbox flushes).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import inspect
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.health import HealthReporter, HealthServer
from hean.core.lease import LeaseLostError, ServiceLease
from hean.core.logs import configure_logging
from hean.core.metrics import Metrics
from hean.core.orchestrator import TradingOrchestrator
from hean.core.settings import CoreSettings, SettingsError, load_settings

log = logging.getLogger(__name__)

S = TypeVar("S", bound=CoreSettings)


@dataclass
class ServiceContext:
    """Everything a service's `build` needs, constructed once in `main`."""

    name: str
    settings: CoreSettings
    bus: EventBus
    metrics: Metrics
    orchestrator: TradingOrchestrator
    redis: aioredis.Redis


Build = Callable[[ServiceContext], Awaitable[None] | None]


def load_service_settings(name: str, settings_cls: type[S]) -> S:
    """Settings for service `name`; SERVICE_NAME defaults to it (the consumer group)."""
    overrides: dict[str, Any] = {}
    if not os.environ.get("SERVICE_NAME"):
        overrides["SERVICE_NAME"] = name
    return load_settings(settings_cls, **overrides)


async def serve(
    name: str,
    build: Build,
    settings: CoreSettings,
    *,
    stop_event: asyncio.Event | None = None,
    ready: Callable[[ServiceContext, int], None] | None = None,
    exclusive: bool = True,
    freeze_gc: bool = False,
) -> None:
    """Run service `name` until `stop_event` is set (or SIGTERM/SIGINT).

    `freeze_gc`: once started, move everything allocated so far out of the garbage
    collector's generations (`gc.freeze`); for a service's own process (`run_service`).

    `exclusive`: this service runs as a single instance (its state is in the process): it
    holds the service lease while it runs (`hean.core.lease`; a second instance waits as a
    standby, its /health saying so), and at start it takes over everything a dead
    predecessor left pending before reading new events. Only services that may run several
    times pass False: ml-service (stateless, scaled out) and the gateway (consumes nothing).
    """
    metrics = Metrics()
    bus = EventBus.redis(settings, metrics=metrics, exclusive=exclusive)
    client = aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0
    )
    reporter = HealthReporter(
        client, interval_s=settings.health_interval_s, ttl_s=settings.health_ttl_s
    )
    consumer = settings.consumer_name
    orchestrator = TradingOrchestrator(
        bus,
        service_name=settings.service_name,
        instance=consumer.split(":", 1)[1] if ":" in consumer else consumer,
        metrics=metrics,
        reporter=reporter,
        failure_threshold=settings.cb_failure_threshold,
        recovery_timeout=settings.cb_recovery_timeout_s,
        success_threshold=settings.cb_success_threshold,
    )
    ctx = ServiceContext(name, settings, bus, metrics, orchestrator, client)
    result = build(ctx)
    if inspect.isawaitable(result):
        await result

    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not possible outside the main thread (tests run services in one loop).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    lease = (
        ServiceLease(
            settings.redis_url, settings.service_name, consumer, settings.service_lease_ttl_s
        )
        if exclusive
        else None
    )

    def health() -> Mapping[str, Any]:
        return orchestrator.health() if lease is None or lease.held else lease.waiting_health()

    async def refresh() -> None:
        if lease is None or lease.held:
            await orchestrator.check_components()

    server = HealthServer(
        health, metrics, host=settings.health_host, port=settings.health_port, refresh=refresh
    )
    async with contextlib.AsyncExitStack() as running:
        running.push_async_callback(client.aclose)
        # /health answers from here on: while this instance waits for its lease, it says why.
        port = await server.start()
        running.push_async_callback(server.stop)
        # Before any component starts: a second instance of an exclusive service must not
        # restore, reconcile or read while the first runs (hean.core.lease).
        if lease is not None and not await running.enter_async_context(_held(lease, name, stop)):
            return  # stopped while waiting as a standby
        await orchestrator.start()
        log.info(
            "%s running as %s; health and metrics on http://%s:%d (Redis %s)",
            name,
            consumer,
            settings.health_host,
            port,
            settings.redis_url_redacted,
        )
        if ready is not None:
            ready(ctx, port)
        if freeze_gc:
            # What start built (modules, ccxt's market tables, the model, restored state)
            # lives as long as the process: out of the cyclic collector's reach, a full
            # collection scans only what running creates. Before, one took 60-96 ms in every
            # service, a stall every event in flight waited out (the p99 of tick -> fill).
            gc.collect()
            gc.freeze()
        try:
            await stop.wait()
        finally:
            log.info("%s stopping", name)
            await server.stop()
            await orchestrator.stop()


@contextlib.asynccontextmanager
async def _held(lease: ServiceLease, name: str, stop: asyncio.Event) -> AsyncIterator[bool]:
    """Hold the service's lease while the body runs: yields False if `stop` was set while
    waiting for it. Losing it to another instance sets `stop` and, once the body is done,
    raises `LeaseLostError`."""
    if not await lease.acquire(stop):
        await lease.release()
        yield False
        return
    lost_to: list[str] = []

    def lost(holder: str) -> None:
        log.error(
            "%s: another instance (%s) took over this service's lease (this one was cut off "
            "from Redis or stalled for longer than SERVICE_LEASE_TTL_S); stopping",
            name,
            holder,
        )
        lost_to.append(holder)
        stop.set()

    ending = asyncio.Event()
    keeping = asyncio.create_task(lease.keep(ending, lost), name="service-lease")
    try:
        yield True
    finally:
        ending.set()
        await keeping
        await lease.release()
    if lost_to:
        raise LeaseLostError(f"{name}: another instance ({lost_to[0]}) runs this service")


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it runs (Linux, macOS): a hop of an event through a service is
    mostly event-loop and socket work, which uvloop does in C. None (asyncio's default
    loop) elsewhere, e.g. on Windows, where uvloop has no wheel."""
    try:
        import uvloop
    except ImportError:  # Windows: no uvloop wheel
        return None
    return uvloop.new_event_loop


def run_service(
    name: str,
    build: Build,
    *,
    settings_cls: type[CoreSettings] = CoreSettings,
    exclusive: bool = True,
) -> int:
    """`main()` of a service process. Returns the exit status."""
    try:
        settings = load_service_settings(name, settings_cls)
    except SettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the service's log under
    # `hean up`): what a hung service is doing, without stopping it. `hean up` sends it to a
    # child that misses its start or stop deadline.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(serve(name, build, settings, exclusive=exclusive, freeze_gc=True))
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    except LeaseLostError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
