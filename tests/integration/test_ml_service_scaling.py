"""Three real ml-service processes (`python -m hean.ml`) in one consumer group split the
FEATURES_READY stream between them, and each input gets exactly one ML_PREDICTION."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from hean.core.bus import EventBus
from hean.core.candles import bundled_data_path, load_candles
from hean.core.event_streams import RedisEventStream, stream_key
from hean.core.features import compute_feature_rows
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType
from tests.helpers import eventually

REPLICAS = 3
N_EVENTS = 240


@pytest.fixture
def replicas(
    subprocess_env: dict[str, str], tmp_path: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = []
    for i in range(1, REPLICAS + 1):
        env = dict(
            subprocess_env,
            HEALTH_PORT="0",
            INSTANCE_ID=f"ml-{i}",
            HEALTH_INTERVAL_S="0.5",
            HEALTH_TTL_S="3",
            EVENT_BLOCK_MS="50",
            EVENT_BATCH_SIZE="4",
        )
        log = (tmp_path / f"ml-{i}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "hean.ml"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        )
    yield procs
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _feature_events() -> list[Event]:
    candles = load_candles(bundled_data_path(), "BTC/USDT").candles[: 240 + N_EVENTS - 1]
    rows = list(compute_feature_rows(candles))
    assert len(rows) == N_EVENTS
    return [
        Event(
            event_type=EventType.FEATURES_READY,
            data={"symbol": "BTC/USDT", "features": f, "timestamp": c.timestamp_ns},
        )
        for c, f in rows
    ]


async def test_ml_service_three_replicas_split_work_each_prediction_once(
    replicas: list[subprocess.Popen[bytes]], redis_url: str, redis_client: aioredis.Redis
) -> None:
    async def all_up() -> bool:
        for proc in replicas:
            assert proc.poll() is None, "an ml-service replica exited"
        keys = [k async for k in redis_client.scan_iter(match="hean:health:ml-service:*")]
        return len(keys) == REPLICAS

    await eventually(all_up, timeout=30, message="three ml-service health snapshots")

    events = _feature_events()
    source = EventBus.redis(CoreSettings(REDIS_URL=redis_url, SERVICE_NAME="feature-source"))
    await source.start()
    for event in events:
        await source.publish(event)
    await source.flush(10)
    await source.stop()

    async def group_drained() -> bool:
        key = stream_key(EventType.FEATURES_READY)
        for info in await redis_client.xinfo_groups(key):
            if info["name"].decode() == "ml-service":
                return bool(info["lag"] == 0 and info["pending"] == 0)
        return False

    await eventually(group_drained, timeout=30, message="the ml-service group to ack every event")

    async with RedisEventStream(redis_url) as stream:
        predictions = [e async for e in stream.replay_events(EventType.ML_PREDICTION)]

    per_input = Counter(p.data["features_event_id"] for p in predictions)
    assert set(per_input) == {e.event_id for e in events}
    assert set(per_input.values()) == {1}
    by_replica = Counter(p.source for p in predictions)
    assert set(by_replica) == {f"ml-service:ml-{i}" for i in range(1, REPLICAS + 1)}
    assert min(by_replica.values()) >= N_EVENTS // 10, by_replica
    assert all(0.0 <= p.data["prediction"] <= 1.0 for p in predictions)
    assert {p.data["model_version"] for p in predictions} == {"lgbm-8e64920bd860"}
