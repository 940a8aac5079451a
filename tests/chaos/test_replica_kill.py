"""SIGKILL of one of three ml-service replicas while FEATURES_READY arrives steadily: the
other two take over its pending entries once Redis shows none of its connections (two
claim rounds of EVENT_CLAIM_INTERVAL_MS), long before EVENT_CLAIM_IDLE_MS (a minute here,
so the idle-time takeover cannot be what recovers).

At-least-once: every FEATURES_READY gets at least one ML_PREDICTION (none lost); a
prediction the killed replica published but had not acked yet is made again by the one
that claims the entry, so duplicates are possible: they are counted and reported. At the
end nothing is pending in the group and nothing was dead-lettered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.candles import bundled_data_path, load_candles
from hean.core.event_streams import stream_key
from hean.core.features import WARMUP_BARS, compute_feature_rows
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType
from tests.chaos.conftest import LONG, Report
from tests.chaos.harness import System, base_env, events, group_states, wait_for

REPLICAS = 3
N_EVENTS = 2400 if LONG else 900
RATE = 150  # FEATURES_READY per second
CLAIM_IDLE_MS = 60_000
KILL_AFTER_S = 2.0
GROUP = "ml-service"


def _feature_events() -> list[Event]:
    candles = load_candles(bundled_data_path(), "BTC/USDT").candles[: WARMUP_BARS + N_EVENTS - 1]
    rows = list(compute_feature_rows(candles))
    return [
        Event(
            event_type=EventType.FEATURES_READY,
            data={"symbol": "BTC/USDT", "features": f, "timestamp": c.timestamp_ns},
        )
        for c, f in rows[:N_EVENTS]
    ]


async def _consumer_pending(client: aioredis.Redis, consumer: str) -> int:
    info = await client.xpending(stream_key(EventType.FEATURES_READY), GROUP)
    for c in info["consumers"]:
        if c["name"].decode() == consumer:
            return int(c["pending"])
    return 0


@pytest.mark.timeout(300 if LONG else 120)
async def test_kill_one_of_three_ml_replicas_others_take_over(
    redis_url: str, tmp_path: Path, report: Report
) -> None:
    feats = _feature_events()
    assert len(feats) == N_EVENTS
    client = aioredis.Redis.from_url(redis_url)
    system = System(
        base_env(
            redis_url,
            EVENT_CLAIM_IDLE_MS=str(CLAIM_IDLE_MS),
            EVENT_CLAIM_INTERVAL_MS="200",
            EVENT_BATCH_SIZE="20",
        ),
        tmp_path / "logs",
    )
    source = EventBus.redis(CoreSettings(REDIS_URL=redis_url, SERVICE_NAME="chaos-features"))
    try:
        replicas = [system.start("ml-service", instance=f"ml-{i}") for i in range(1, REPLICAS + 1)]

        async def all_up() -> bool:
            keys = [k async for k in client.scan_iter(match="hean:health:ml-service:*")]
            groups = await group_states(client)
            return len(keys) == REPLICAS and (stream_key(EventType.FEATURES_READY), GROUP) in (
                groups
            )

        await wait_for(all_up, timeout=60, message="three ml-service replicas", system=system)
        await source.start()

        async def publish_steadily() -> None:
            t0 = time.monotonic()
            for i, e in enumerate(feats):
                await source.publish(e)
                delay = t0 + (i + 1) / RATE - time.monotonic()
                if delay > 0:
                    await source.flush(5)
                    await asyncio.sleep(delay)
            await source.flush(10)

        publisher = asyncio.create_task(publish_steadily())
        started = time.monotonic()
        victim = replicas[1]
        consumer = f"ml-service:{victim.instance}"
        # Kill mid-run, at a moment the victim holds entries (pending = read, not acked).
        await asyncio.sleep(KILL_AFTER_S)

        # Freeze it (SIGSTOP) and look. A frozen process cannot ack, so what it holds is
        # certain. Its handling is a fraction of a millisecond per entry, so it is rarely
        # caught holding one; but its blocking read is almost always waiting in Redis, and
        # Redis serves a frozen consumer's waiting read like any other: as the publisher
        # goes on and the other two take turns, an entry becomes pending for the frozen
        # one within a few inputs. If none does (frozen between two reads), let it run a
        # little and try again.
        async def frozen_holding_work() -> bool:
            os.kill(victim.popen.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and not publisher.done():
                if await _consumer_pending(client, consumer) > 0:
                    return True
                await asyncio.sleep(0.02)
            if publisher.done():
                return True
            os.kill(victim.popen.pid, signal.SIGCONT)
            return False

        await wait_for(
            frozen_holding_work, timeout=30, message="victim holding entries", system=system
        )
        # What it holds, read while it is frozen (after the kill the others may start
        # claiming it), then the kill.
        stranded_info: Any = await client.xpending_range(
            stream_key(EventType.FEATURES_READY), GROUP, "-", "+", 10_000, consumername=consumer
        )
        stranded = [p["message_id"] for p in stranded_info]
        system.kill(victim)
        killed_at = time.monotonic()
        kill_offset = killed_at - started
        published_at_kill = int(await client.xlen(stream_key(EventType.FEATURES_READY)))

        # Recovery: the dead consumer's entries are all claimed and acked by the others.
        async def taken_over() -> bool:
            return await _consumer_pending(client, consumer) == 0

        recovery_s = await wait_for(
            taken_over,
            timeout=60,
            message="the dead replica's entries taken over",
            system=system,
        )
        await publisher
        fs_key = stream_key(EventType.FEATURES_READY)

        async def drained() -> bool:
            state = (await group_states(client)).get((fs_key, GROUP))
            return state is not None and state["lag"] == 0 and state["pending"] == 0

        drain_s = await wait_for(drained, timeout=60, message="group drained", system=system)
        predictions = await events(client, EventType.ML_PREDICTION)
        inputs = await events(client, EventType.FEATURES_READY)
        raw: Any = await client.xrange(fs_key, min="-", max="+")
        by_entry = {eid: e for (eid, _), e in zip(raw, inputs, strict=True)}
        stranded_ids = {by_entry[mid].event_id for mid in stranded}
        dlq = int(await client.xlen("hean:dlq"))
        xpending = await client.xpending(fs_key, GROUP)
        alive_after = [p.instance for p in system.procs.values() if p.popen.poll() is None]
    finally:
        await source.stop()
        system.stop_all()
        await client.aclose()

    per_input = Counter(str(p.data["features_event_id"]) for p in predictions)
    input_ids = {e.event_id for e in inputs}
    lost = input_ids - set(per_input)
    dups = {k: n for k, n in per_input.items() if n > 1}
    by_replica = Counter(str(p.source) for p in predictions)
    stranded_done = sorted(stranded_ids - set(per_input))
    report.add(
        "Process kills",
        f"Three ml-service replicas in one group, {N_EVENTS} FEATURES_READY at {RATE}/s "
        f"(`EVENT_CLAIM_IDLE_MS={CLAIM_IDLE_MS}`): replica `{victim.instance}` SIGKILLed "
        f"{kill_offset:.1f} s in ({published_at_kill} inputs published by then) holding "
        f"{len(stranded)} unacked entries; the others took them over {recovery_s:.1f} s "
        f"after the kill (pending of the dead consumer back to 0); group drained "
        f"{drain_s:.1f} s after the last input. {len(predictions)} ML_PREDICTIONs for "
        f"{len(input_ids)} inputs: {len(lost)} inputs without a prediction, "
        f"{len(dups)} with more than one (at-least-once duplicates: "
        f"{sum(dups.values()) - len(dups)} extra predictions); per replica "
        f"{dict(sorted(by_replica.items()))}; {int(xpending['pending'])} entries pending at "
        f"the end; {dlq} dead letters.",
    )
    assert stranded, "the victim held no entries when killed: nothing was taken over"
    assert lost == set(), f"{len(lost)} FEATURES_READY without a prediction"
    assert stranded_done == [], stranded_done
    assert int(xpending["pending"]) == 0
    assert dlq == 0
    assert sorted(alive_after) == ["ml-1", "ml-3"]
    assert {f"ml-service:{i}" for i in alive_after} <= set(by_replica)
