"""Health states, snapshots in Redis, and each service's `/health` + `/metrics` endpoint.

Rules for `overall_state` (written down for users in docs/HEALTH.md):
* not running -> unhealthy;
* any critical component unhealthy (including the event bus) -> unhealthy;
* otherwise any component degraded or unhealthy -> degraded;
* otherwise healthy.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from aiohttp import web

from hean.core.event_streams import HEALTH_KEY_PREFIX, as_str
from hean.core.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

SNAPSHOT_VERSION: Final = 1
#: The set of every health snapshot key written (a reader prunes the expired ones): found
#: without scanning the keyspace, which grows with the system's life (each audit event's
#: publish-once marker lives a day: a SCAN took 165 ms with 150,000 keys).
HEALTH_INDEX_KEY: Final = "hean:health-index"

# Members whose snapshot is gone (expired or withdrawn) leave the index; checked in Redis,
# so a reporter writing its snapshot again in between keeps its place.
_PRUNE_INDEX = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then redis.call('SREM', ARGV[1], key) end
end
return 1
"""


class ComponentState(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


def component_state_from(result: Any) -> tuple[ComponentState, str | None]:
    """Interpret what a component's `health_check()` returned.

    Accepted: a `ComponentState` or its name, a bool (True = healthy), None (healthy), or a
    mapping with `state` (and optionally `error_message`).
    """
    if result is None or result is True:
        return ComponentState.HEALTHY, None
    if result is False:
        return ComponentState.UNHEALTHY, "health check returned False"
    if isinstance(result, ComponentState):
        return result, None
    if isinstance(result, str):
        return ComponentState(result.lower()), None
    if isinstance(result, Mapping):
        state = ComponentState(str(result.get("state", "healthy")).lower())
        message = result.get("error_message")
        return state, str(message) if message else None
    raise TypeError(f"unsupported health_check() result: {type(result).__name__}")


def overall_state(
    critical: Iterable[ComponentState],
    others: Iterable[ComponentState] = (),
    *,
    running: bool = True,
) -> ComponentState:
    if not running:
        return ComponentState.UNHEALTHY
    critical = list(critical)
    others = list(others)
    if ComponentState.UNHEALTHY in critical:
        return ComponentState.UNHEALTHY
    if any(s is not ComponentState.HEALTHY for s in (*critical, *others)):
        return ComponentState.DEGRADED
    return ComponentState.HEALTHY


def health_key(service: str, instance: str) -> str:
    return f"{HEALTH_KEY_PREFIX}{service}:{instance}"


class HealthReporter:
    """Writes this process's health snapshot to Redis every `interval_s`, expiring after
    `ttl_s`, so a dead process disappears from the gateway's view by itself."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        interval_s: float = 5.0,
        ttl_s: float = 15.0,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        if ttl_s <= interval_s:
            raise ValueError("the snapshot TTL must exceed the reporting interval")
        self.client = client
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._wall_clock = wall_clock

    async def publish(self, service: str, instance: str, health: Mapping[str, Any]) -> None:
        import time

        now = (self._wall_clock or time.time)()
        snapshot = {
            "version": SNAPSHOT_VERSION,
            "service": service,
            "instance": instance,
            "written_at": now,
            "health": health,
        }
        key = health_key(service, instance)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(key, orjson.dumps(snapshot), px=int(self.ttl_s * 1000))
            pipe.sadd(HEALTH_INDEX_KEY, key)
            await pipe.execute()

    async def withdraw(self, service: str, instance: str) -> None:
        key = health_key(service, instance)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.srem(HEALTH_INDEX_KEY, key)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - best effort on shutdown; the TTL expires it
            log.debug("could not withdraw health snapshot: %s", exc)


async def read_snapshots(client: aioredis.Redis) -> list[dict[str, Any]]:
    """Every live (unexpired) health snapshot, for the gateway."""
    keys = sorted(await client.smembers(HEALTH_INDEX_KEY))
    if not keys:
        return []
    values = await client.mget(keys)
    gone = [key for key, value in zip(keys, values, strict=True) if value is None]
    if gone:
        await client.eval(_PRUNE_INDEX, len(gone), *gone, HEALTH_INDEX_KEY)
    snapshots = []
    for key, value in zip(keys, values, strict=True):
        if value is None:
            continue
        try:
            snapshot = orjson.loads(value)
        except orjson.JSONDecodeError:
            log.warning("unreadable health snapshot at %s", as_str(key))
            continue
        if isinstance(snapshot, dict):
            snapshots.append(snapshot)
    return snapshots


class HealthServer:
    """The per-process HTTP endpoint: `GET /health` (the orchestrator's JSON; 503 when
    unhealthy) and `GET /metrics` (Prometheus text format)."""

    def __init__(
        self,
        health: Callable[[], Mapping[str, Any]],
        metrics: Metrics,
        *,
        host: str = "0.0.0.0",  # noqa: S104 - containers must accept the scraper's requests
        port: int = 8080,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._health = health
        self._refresh = refresh
        self._metrics = metrics
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def _get_health(self, request: web.Request) -> web.Response:
        if self._refresh is not None:
            await self._refresh()
        body = dict(self._health())
        overall = body.get("orchestrator", {}).get("overall_state")
        status = 503 if overall == ComponentState.UNHEALTHY.value else 200
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")

    async def _get_metrics(self, request: web.Request) -> web.Response:
        self._health()  # refreshes the health gauges
        resp = web.Response(body=self._metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp

    async def start(self) -> int:
        """Start serving; returns the bound port (useful with port 0)."""
        app = web.Application()
        app.router.add_get("/health", self._get_health)
        app.router.add_get("/metrics", self._get_metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
