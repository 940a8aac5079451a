"""The signal path as real processes on a real redis-server: market-data (fast replay of
the bundled BTC file, two symbols) -> features -> ml-service -> strategy.

Every stage's output is counted exactly, each SIGNAL is traced back through its
correlation id to a replayed CANDLE, and every service's health snapshot in Redis says
healthy.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from hean.core.event_streams import RedisEventStream, stream_key
from hean.core.features import WARMUP_BARS
from hean.core.types import Event, EventType
from tests.helpers import eventually, stop_processes

BARS = 400
SYMBOLS = ("BTC/USDT", "ETH/USDT")
SERVICES = {
    "features": "hean.features",
    "ml-service": "hean.ml",
    "strategy": "hean.strategy",
    "market-data": "hean.market_data",
}


class Procs:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, **extra: str) -> None:
        env = dict(self.env, HEALTH_PORT="0", INSTANCE_ID=f"{name}-1", **extra)
        log = (self.logs / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", SERVICES[name]], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        stop_processes(self.procs.values())


@pytest.fixture
def procs(subprocess_env: dict[str, str], tmp_path: Path) -> Iterator[Procs]:
    env = dict(subprocess_env)
    env.update(
        {
            "EVENT_BLOCK_MS": "50",
            "HEALTH_INTERVAL_S": "0.5",
            "HEALTH_TTL_S": "3",
            "LOG_LEVEL": "INFO",
            "SYMBOLS": ",".join(SYMBOLS),
            "STRATEGY_BUY_THRESHOLD": "0.53",
            "STRATEGY_SELL_THRESHOLD": "0.47",
            "STRATEGY_COOLDOWN_BARS": "2",
        }
    )
    p = Procs(env, tmp_path)
    yield p
    p.stop_all()


async def _group_exists(client: aioredis.Redis, etype: EventType, group: str) -> bool:
    key = stream_key(etype)
    if not await client.exists(key):
        return False
    return any(g["name"].decode() == group for g in await client.xinfo_groups(key))


async def _events(url: str, etype: EventType) -> list[Event]:
    async with RedisEventStream(url) as stream:
        return [e async for e in stream.replay_events(etype)]


async def _health(client: aioredis.Redis) -> dict[str, str]:
    states: dict[str, str] = {}
    async for key in client.scan_iter(match="hean:health:*"):
        raw = await client.get(key)
        if raw is not None:
            snap = orjson.loads(raw)
            states[snap["service"]] = snap["health"]["orchestrator"]["overall_state"]
    return states


async def test_signal_path_replayed_candles_flow_to_signals_all_healthy(
    procs: Procs, redis_url: str, redis_client: aioredis.Redis
) -> None:
    for name in ("features", "ml-service", "strategy"):
        procs.start(name)
    for etype, group in (
        (EventType.CANDLE, "features"),
        (EventType.FEATURES_READY, "ml-service"),
        (EventType.ML_PREDICTION, "strategy"),
    ):

        async def ready(etype: EventType = etype, group: str = group) -> bool:
            procs.alive()
            return await _group_exists(redis_client, etype, group)

        await eventually(ready, timeout=20, message=f"group {group} on {etype.value}")

    procs.start("market-data", REPLAY_SPEED="0", REPLAY_MAX_BARS=str(BARS))

    expected_features = len(SYMBOLS) * (BARS - WARMUP_BARS + 1)

    async def predictions_done() -> bool:
        procs.alive()
        return int(await redis_client.xlen(stream_key(EventType.ML_PREDICTION))) >= (
            expected_features
        )

    await eventually(predictions_done, timeout=40, message="every ML_PREDICTION")

    async def signalled() -> bool:
        return int(await redis_client.xlen(stream_key(EventType.SIGNAL))) > 0

    await eventually(signalled, timeout=10, message="a SIGNAL")

    async def all_healthy() -> bool:
        procs.alive()
        states = await _health(redis_client)
        return set(states) == set(SERVICES) and set(states.values()) == {"healthy"}

    await eventually(all_healthy, timeout=10, message="four healthy snapshots")

    ticks = await _events(redis_url, EventType.TICK)
    candles = await _events(redis_url, EventType.CANDLE)
    features = await _events(redis_url, EventType.FEATURES_READY)
    predictions = await _events(redis_url, EventType.ML_PREDICTION)
    signals = await _events(redis_url, EventType.SIGNAL)

    assert len(candles) == len(SYMBOLS) * BARS
    assert len(ticks) == 4 * len(SYMBOLS) * BARS
    assert len(features) == expected_features
    assert len(predictions) == expected_features
    assert sorted(p.data["features_event_id"] for p in predictions) == sorted(
        f.event_id for f in features
    )
    for symbol in SYMBOLS:
        bars = [c.data["timestamp"] for c in candles if c.data["symbol"] == symbol]
        assert bars == sorted(bars)
        assert len(set(bars)) == BARS
    candle_ids = {c.event_id for c in candles}
    for signal in signals:
        assert signal.data["side"] in {"BUY", "SELL"}
        assert signal.correlation_id in candle_ids
        p = signal.data["prediction"]
        assert (p >= 0.53) if signal.data["side"] == "BUY" else (p <= 0.47)
