"""A consumer process for the crash tests: handles TICKs slowly, recording each in Redis.

Usage: python consumer.py REDIS_URL GROUP CONSUMER [HANDLE_SECONDS]
Each handled event id is RPUSHed to `handled` (with the consumer name to `handled_by`)
before the handler returns, so a SIGKILL can land between the effect and the ack.
"""

from __future__ import annotations

import asyncio
import sys

import redis.asyncio as aioredis

from hean.core.bus import EventBus, RedisBusConfig, RedisStreamsTransport
from hean.core.types import Event, EventType


async def main(url: str, group: str, consumer: str, handle_s: float) -> None:
    client = aioredis.Redis.from_url(url)
    config = RedisBusConfig(
        url=url,
        group=group,
        consumer=consumer,
        batch_size=10,
        worker_count=1,
        claim_idle_ms=1000,
        claim_interval_ms=200,
        block_ms=100,
        group_start_id="0",
    )
    bus = EventBus(RedisStreamsTransport(config), source=consumer)

    async def on_tick(event: Event) -> None:
        async with client.pipeline(transaction=True) as pipe:
            pipe.rpush("handled", event.event_id)
            pipe.rpush("handled_by", consumer)
            await pipe.execute()
        await asyncio.sleep(handle_s)

    bus.subscribe(EventType.TICK, on_tick)
    await bus.start()
    await client.set(f"ready:{consumer}", 1)
    await asyncio.Event().wait()


if __name__ == "__main__":
    handle = float(sys.argv[4]) if len(sys.argv) > 4 else 0.02
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], handle))
