"""One running instance of each exclusive service: a lease in Redis.

Every service but ml-service keeps its state in the process (exposure, positions, the
paper venue, feature engines) and takes over everything its group left pending at start
(ADR 0002). Two running instances of one would split its events between two partial
states (two risk instances each seeing half the fills) and take each other's work; two
execution instances would both reconcile the venue at start. So an exclusive service
holds `hean:lease:<service>` while it runs:

* At start, before any component starts, it takes the lease if it is free, already its
  own, or held by an instance that is gone: no Redis connection carries the holder's name
  (`CLIENT LIST`; a killed process's sockets close at once). Otherwise it waits as a
  standby, says so once in its log, and takes over when the holder stops or dies.
* While running it renews the lease every third of `SERVICE_LEASE_TTL_S`. If it finds the
  lease held by another instance (it was cut off from Redis or frozen for longer than the
  TTL, and a standby took over), it stops, exit status 1: the other instance has its work.
* A clean stop releases the lease, so a restart takes it at once.

Where Redis refuses `CLIENT LIST` (an ACL), a dead holder's lease is taken only once it
expires, `SERVICE_LEASE_TTL_S` after its last renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hean.core.bus import client_names, consumer_client_name
from hean.core.settings import redact_url

log = logging.getLogger(__name__)

LEASE_PREFIX = "hean:lease:"

# Take or renew: ours if free, ours already, or held by the holder we found gone (ARGV[3]).
# Returns the holder afterwards (ARGV[1] when we hold it).
_TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] or (ARGV[3] ~= '' and holder == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return holder
"""

# Release only our own lease (a successor's stays).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lease_key(service: str) -> str:
    return LEASE_PREFIX + service


def holder_consumer(holder: str) -> str:
    """The consumer name in a lease's value (`<consumer> <token>`)."""
    return holder.rsplit(" ", 1)[0]


async def running_holders(client: aioredis.Redis) -> dict[str, str]:
    """Service -> consumer holding its lease, for holders whose process is still connected
    to Redis (all holders where CLIENT LIST is refused). `hean up` uses it to refuse a
    second system on the same Redis."""
    names = await client_names(client)
    held: dict[str, str] = {}
    async for raw in client.scan_iter(match=LEASE_PREFIX + "*", count=100):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        value: Any = await client.get(key)
        if value is None:
            continue
        consumer = holder_consumer(value.decode() if isinstance(value, bytes) else str(value))
        if names is None or consumer_client_name(consumer) in names:
            held[key.removeprefix(LEASE_PREFIX)] = consumer
    return held


class LeaseLostError(RuntimeError):
    """Another instance of the service holds its lease: this one must stop."""


class ServiceLease:
    """The lease of one exclusive service's running instance (module docstring)."""

    def __init__(self, redis_url: str, service: str, consumer: str, ttl_s: float) -> None:
        self.redis_url = redis_url
        self.service = service
        self.consumer = consumer
        self.key = lease_key(service)
        self.value = f"{consumer} {secrets.token_hex(8)}"  # unique even if names repeat
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, int(ttl_s * 1000))
        # Waiting: unnamed, so our own connection never makes a holder of our name look
        # alive. Holding: named as the bus's connections, so our holding is seen as live
        # even while the bus has no connection open.
        self._client = self._connect(None)
        self._held = False
        #: What the instance is doing about the lease, for its /health while it waits.
        self.status = "taking the service lease"

    def _connect(self, name: str | None) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0, client_name=name
        )

    @property
    def held(self) -> bool:
        return self._held

    async def _take(self, gone: str = "") -> str:
        holder: Any = await self._client.eval(
            _TAKE, 1, self.key, self.value, str(self._ttl_ms), gone
        )
        return holder.decode() if isinstance(holder, bytes) else str(holder)

    async def acquire(self, stopping: asyncio.Event) -> bool:
        """Wait until the lease is ours (True) or `stopping` is set (False)."""
        said_waiting = said_unreachable = False
        while not stopping.is_set():
            try:
                holder = await self._take()
                if holder != self.value:
                    names = await client_names(self._client)
                    other = holder_consumer(holder)
                    if names is not None and consumer_client_name(other) not in names:
                        log.info("%s: taking over from %s, which is gone", self.service, other)
                        holder = await self._take(gone=holder)
                if holder == self.value:
                    await self._hold()
                    return True
                self.status = (
                    f"standby: another {self.service} ({holder_consumer(holder)}) is running; "
                    "this instance takes over when it stops"
                )
                if not said_waiting:
                    said_waiting = True
                    log.warning(
                        "another %s is running (%s): this instance (%s) waits as a standby "
                        "and takes over when it stops. HEAN runs one instance of %s "
                        "(only ml-service scales out; docs/DEPLOYMENT.md)",
                        self.service,
                        holder_consumer(holder),
                        self.consumer,
                        self.service,
                    )
            except (RedisError, OSError) as exc:
                self.status = f"Redis unavailable: trying again ({exc})"
                if not said_unreachable:
                    said_unreachable = True
                    log.warning(
                        "%s: cannot take the service lease at %s (%s); trying again",
                        self.service,
                        redact_url(self.redis_url),
                        exc,
                    )
            await _wait(stopping, min(1.0, self.ttl_s / 3))
        return False

    def waiting_health(self) -> dict[str, Any]:
        """The guide's health response while the instance waits for the lease: unhealthy
        (it does no work), with the reason on the `service_lease` component."""
        return {
            "orchestrator": {"running": False, "uptime_seconds": 0, "overall_state": "unhealthy"},
            "components": {
                "service_lease": {
                    "state": "unhealthy",
                    "last_check": int(time.time()),
                    "failure_count": 0,
                    "circuit_breaker": "closed",
                    "error_message": self.status,
                }
            },
        }

    async def _hold(self) -> None:
        waiting = self._client
        self._client = self._connect(consumer_client_name(self.consumer))
        await waiting.aclose()
        self._held = True

    async def keep(self, stopping: asyncio.Event, lost: Callable[[str], None]) -> None:
        """Renew every third of the TTL until `stopping`; call `lost(holder)` and return if
        another instance holds the lease."""
        said_unreachable = False
        while not stopping.is_set():
            await _wait(stopping, self.ttl_s / 3)
            if stopping.is_set():
                return
            try:
                holder = await self._take()
            except (RedisError, OSError) as exc:
                if not said_unreachable:
                    said_unreachable = True
                    log.warning("%s: cannot renew the service lease (%s)", self.service, exc)
                continue
            said_unreachable = False
            if holder != self.value:
                self._held = False
                self.status = f"lost the lease to {holder_consumer(holder)}: stopping"
                lost(holder_consumer(holder))
                return

    async def release(self) -> None:
        """Give the lease up (if still ours) and close the connection."""
        try:
            if self._held:
                await self._client.eval(_RELEASE, 1, self.key, self.value)
        except (RedisError, OSError) as exc:
            log.warning(
                "%s: could not release the service lease (%s); a successor takes it once "
                "this process is gone",
                self.service,
                exc,
            )
        finally:
            self._held = False
            await self._client.aclose()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
