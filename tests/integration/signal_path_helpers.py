"""Helpers for the signal-path integration tests: run a service in this process with
`serve`, publish events, read streams and wait for a consumer group to catch up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.event_streams import RedisEventStream, stream_key
from hean.core.service import Build, ServiceContext, serve
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType
from tests.helpers import eventually

FAST: dict[str, Any] = {
    "HEALTH_PORT": 0,
    "HEALTH_INTERVAL_S": 0.2,
    "HEALTH_TTL_S": 2.0,
    "EVENT_BLOCK_MS": 50,
}


@asynccontextmanager
async def running(name: str, build: Build, settings: CoreSettings) -> AsyncIterator[ServiceContext]:
    """Run service `name` until the block ends; yields its context once it is ready."""
    stop = asyncio.Event()
    contexts: list[ServiceContext] = []
    task = asyncio.create_task(
        serve(name, build, settings, stop_event=stop, ready=lambda c, _p: contexts.append(c))
    )

    async def ready() -> bool:
        if task.done():
            task.result()  # raises what stopped it
        return bool(contexts)

    await eventually(ready, timeout=15, message=f"{name} ready")
    try:
        yield contexts[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def publish(url: str, events: Sequence[Event], source: str = "test-source") -> None:
    bus = EventBus.redis(CoreSettings(REDIS_URL=url, SERVICE_NAME=source))
    await bus.start()
    for event in events:
        await bus.publish(event)
    await bus.flush(10)
    await bus.stop()


async def read(url: str, etype: EventType) -> list[Event]:
    async with RedisEventStream(url) as stream:
        return [e async for e in stream.replay_events(etype)]


async def drained(client: aioredis.Redis, etype: EventType, group: str) -> bool:
    """True once `group` has been handed and has acked every entry of the stream."""
    key = stream_key(etype)
    if not await client.exists(key):
        return False
    for info in await client.xinfo_groups(key):
        if info["name"].decode() == group:
            return bool(info["lag"] == 0 and info["pending"] == 0)
    return False
