"""market-data replay on a real Redis: bad rows skipped and reported in health, several
symbols from one file, TICKs inside each bar, looping with time moving forward, and bad
settings refused at start naming the variable."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from hean.core.event_streams import stream_key
from hean.core.types import EventType
from hean.market_data.service import MarketDataSettings, build, redis_lag_probe
from tests.conftest import RedisServer
from tests.helpers import eventually
from tests.integration.signal_path_helpers import FAST, read, running

CSV = """timestamp,open,high,low,close,volume
2022-01-01 00:00:00,100,110,95,105,40
2022-01-01 00:01:00,105,106,-1,104,10
2022-01-01 00:02:00,104,108,101,107,8
2022-01-01 00:03:00,,108,101,107,8
2022-01-01 00:01:30,104,108,101,107,8
2022-01-01 00:04:00,107,109,100,101,12
"""


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "bars.csv"
    path.write_text(CSV)
    return path


def _settings(url: str, path: Path, **extra: object) -> MarketDataSettings:
    values: dict[str, object] = {
        "REDIS_URL": url,
        "SERVICE_NAME": "market-data",
        "REPLAY_DATA_PATH": str(path),
        "REPLAY_SPEED": 0,
        "SYMBOLS": "BTC/USDT,ETH/USDT",
        **FAST,
    }
    values.update(extra)
    return MarketDataSettings(**values)  # type: ignore[arg-type]


async def _snapshot(client: aioredis.Redis) -> dict[str, object] | None:
    async for key in client.scan_iter(match="hean:health:market-data:*"):
        raw = await client.get(key)
        if raw is not None:
            snap: dict[str, object] = orjson.loads(raw)
            return snap
    return None


async def test_replay_bad_rows_skipped_reported_valid_bars_and_ticks_published(
    redis_url: str, redis_client: aioredis.Redis, data_file: Path
) -> None:
    async with running("market-data", build, _settings(redis_url, data_file)):

        async def finished_and_reported() -> bool:
            snap = await _snapshot(redis_client)
            if snap is None:
                return False
            entry = snap["health"]["components"]["market_data"]  # type: ignore[index]
            return "finished" in entry.get("error_message", "")

        await eventually(finished_and_reported, timeout=10, message="replay finished")
        snap = await _snapshot(redis_client)
        assert snap is not None
        health = snap["health"]
        assert health["orchestrator"]["overall_state"] == "healthy"  # type: ignore[index]
        message = health["components"]["market_data"]["error_message"]  # type: ignore[index]
        assert "3 bad row(s) of 6 skipped" in message
        assert "row 3: non-positive price: low=-1" in message
        assert "row 5: missing field: open" in message
        assert "row 6: time going backwards" in message

    candles = await read(redis_url, EventType.CANDLE)
    ticks = await read(redis_url, EventType.TICK)
    for symbol in ("BTC/USDT", "ETH/USDT"):
        mine = [c for c in candles if c.data["symbol"] == symbol]
        assert [c.data["close"] for c in mine] == [Decimal(105), Decimal(107), Decimal(101)]
        assert all(c.data["low"] > 0 for c in mine)
        my_ticks = [t for t in ticks if t.data["symbol"] == symbol]
        assert len(my_ticks) == 4 * len(mine)
        assert [t.data["price"] for t in my_ticks[:4]] == [D(100), D(95), D(110), D(105)]
        assert sum((t.data["volume"] for t in my_ticks[:4]), D(0)) == D(40)
    # Each bar's ticks come before its candle in publish order (event ids are sortable).
    first_candle = min(c.event_id for c in candles if c.data["symbol"] == "BTC/USDT")
    btc_ticks = sorted(t.event_id for t in ticks if t.data["symbol"] == "BTC/USDT")
    assert btc_ticks[3] < first_candle < btc_ticks[4]


D = Decimal


async def test_replay_loop_keeps_time_moving_forward(
    redis_url: str, redis_client: aioredis.Redis, data_file: Path
) -> None:
    settings = _settings(
        redis_url, data_file, SYMBOLS="BTC/USDT", REPLAY_LOOP=True, REPLAY_TICKS=False
    )
    async with running("market-data", build, settings):

        async def three_loops() -> bool:
            return int(await redis_client.xlen("hean:events:CANDLE")) >= 9

        await eventually(three_loops, timeout=10, message="three loops")
    times = [c.data["timestamp"] for c in await read(redis_url, EventType.CANDLE)]
    assert len(times) >= 9
    assert all(b > a for a, b in itertools.pairwise(times))
    assert await redis_client.xlen("hean:events:TICK") == 0


async def test_replay_restarted_continues_after_bars_already_published(
    redis_url: str, redis_client: aioredis.Redis, data_file: Path
) -> None:
    settings = _settings(redis_url, data_file, SYMBOLS="BTC/USDT", REPLAY_TICKS=False)
    # The first run publishes the first two valid bars, as if killed there.
    async with running("market-data", build, settings.model_copy(update={"replay_max_bars": 2})):
        await eventually(
            lambda: _stream_len(redis_client, "hean:events:CANDLE", 2), message="2 bars"
        )
    # The restarted run continues after them, instead of republishing the file's start.
    async with running("market-data", build, settings):
        await eventually(
            lambda: _stream_len(redis_client, "hean:events:CANDLE", 3), message="resumed"
        )
    times = [c.data["timestamp"] for c in await read(redis_url, EventType.CANDLE)]
    assert len(times) == len(set(times)) == 3
    assert all(b > a for a, b in itertools.pairwise(times))


async def _stream_len(client: aioredis.Redis, key: str, expected: int) -> bool:
    return int(await client.xlen(key)) == expected


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SYMBOLS": " , "}, "SYMBOLS"),
        ({"REPLAY_SPEED": "-1"}, "REPLAY_SPEED"),
        ({"TIMEFRAME": "7x"}, "TIMEFRAME"),
        ({"MARKET_DATA_MODE": "live", "EXCHANGE": "paper"}, "MARKET_DATA_MODE"),
        ({"MARKET_DATA_MODE": "dream"}, "MARKET_DATA_MODE"),
    ],
)
def test_market_data_bad_setting_refused_naming_variable(
    subprocess_env: dict[str, str], env: dict[str, str], variable: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hean.market_data"],
        env={**subprocess_env, **env},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert variable in result.stderr.decode()


async def test_replay_lag_probe_reads_the_slowest_group_and_rides_out_a_redis_outage(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """The backpressure probe answers the CANDLE lag of the slowest group, and 0 (go on,
    the outbox bound holds the replay) while Redis is down, instead of ending the replay
    with a ConnectionError (found by the Redis-restart chaos test)."""
    server = redis_factory()
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=1)
    try:
        probe = redis_lag_probe(client)
        assert await probe() == 0  # no stream yet
        key = stream_key(EventType.CANDLE)
        for _ in range(5):
            await client.xadd(key, {"event": b"{}"})
        await client.xgroup_create(key, "features", id="0")
        assert await probe() == 5
        server.stop()
        assert await probe() == 0
    finally:
        await client.aclose()
