"""hean.core.topology lists exactly the event types each service reads: every service is
started as a real process and its consumers are looked up in Redis."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from hean.core.event_streams import as_str, stream_key
from hean.core.health import read_snapshots
from hean.core.topology import CONSUMER_GROUPS, ensure_topology
from hean.core.types import EventType
from tests.helpers import eventually

MODULES = {
    "features": "hean.features",
    "ml-service": "hean.ml",
    "strategy": "hean.strategy",
    "risk": "hean.risk",
    "execution": "hean.execution",
    "portfolio": "hean.portfolio",
}


@pytest.fixture
def services(subprocess_env: dict[str, str], tmp_path: Path) -> Iterator[None]:
    procs = []
    for name, module in MODULES.items():
        env = dict(
            subprocess_env,
            HEALTH_PORT="0",
            EVENT_BLOCK_MS="50",
            INSTANCE_ID="topo",
            HEALTH_INTERVAL_S="0.5",
            HEALTH_TTL_S="5",
        )
        log = (tmp_path / f"{name}.log").open("wb")
        procs.append(
            subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=log)
        )
    yield
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def reading(client: aioredis.Redis, group: str) -> set[EventType]:
    """The event types whose stream has a consumer of `group` named like a live process."""
    found = set()
    for event_type in EventType:
        key = stream_key(event_type)
        if not await client.exists(key):
            continue
        for info in await client.xinfo_groups(key):
            if as_str(info["name"]) != group:
                continue
            consumers = await client.xinfo_consumers(key, group)
            if any(as_str(c["name"]) == f"{group}:topo" for c in consumers):
                found.add(event_type)
    return found


async def test_topology_matches_what_each_service_reads(
    services: None, redis_client: aioredis.Redis
) -> None:
    async def all_up() -> bool:
        return {s["service"] for s in await read_snapshots(redis_client)} >= set(MODULES)

    await eventually(all_up, timeout=60, message="every service's health snapshot")
    # Redis registers a consumer when it first delivers to it: give every stream an entry
    # (malformed, so each reader dead-letters it and no service acts on it).
    for event_type in EventType:
        await redis_client.xadd(stream_key(event_type), {"probe": b"topology"})
    for group, expected in CONSUMER_GROUPS.items():

        async def settled(group: str = group, expected: frozenset[EventType] = expected) -> bool:
            return await reading(redis_client, group) == expected

        await eventually(settled, timeout=60, message=f"{group} reading {sorted(expected)}")


async def test_topology_groups_exist_before_first_consumer_starts(
    redis_client: aioredis.Redis,
) -> None:
    created = await ensure_topology(redis_client)
    assert created == sum(len(types) for types in CONSUMER_GROUPS.values())
    assert await ensure_topology(redis_client) == 0
    # A CANDLE published now waits in the features group for the service's first start.
    await redis_client.xadd(stream_key(EventType.CANDLE), {"event": b"{}"})
    groups = await redis_client.xinfo_groups(stream_key(EventType.CANDLE))
    lag = {as_str(g["name"]): int(g["lag"]) for g in groups}
    assert lag["features"] == 1
