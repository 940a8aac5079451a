"""The `hean` command as real subprocesses against a real redis-server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from hean.cli.up import Child, dump_stacks
from hean.core.bus import EventBus
from hean.core.event_streams import DLQ_STREAM, stream_key
from hean.core.health import HealthReporter
from hean.core.settings import CoreSettings, load_settings
from hean.core.types import Event, EventType
from tests.conftest import ROOT
from tests.helpers import dead_letter, eventually

HEAN = str(Path(sys.executable).with_name("hean"))


def hean(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HEAN, *args], env={**env, "COLUMNS": "200"}, cwd=ROOT,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def publish_all(redis_url: str, events: list[Event]) -> None:
    async def run() -> None:
        bus = EventBus.redis(load_settings(CoreSettings, REDIS_URL=redis_url, SERVICE_NAME="t"))
        await bus.start()
        for event in events:
            await bus.publish(event)
        await bus.flush(5)
        await bus.stop()

    asyncio.run(run())


def fill(order_id: str, price: str) -> Event:
    return Event(
        event_type=EventType.ORDER_FILLED,
        data={"order_id": order_id, "fill_price": price, "filled_qty": "0.5",
              "fill_id": f"f-{order_id}", "symbol": "BTC/USDT", "side": "BUY"},
    )  # fmt: skip


def test_replay_table_lists_fills(redis_url, subprocess_env):
    publish_all(redis_url, [fill("o1", "50000"), fill("o2", "50100")])
    result = hean("replay", "--type", "ORDER_FILLED", "--start", "-", "--end", "+",
                  env=subprocess_env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ORDER_FILLED: 2 events" in result.stdout
    assert "o1" in result.stdout and "50100" in result.stdout


def test_replay_json_count_limits_and_is_parseable(redis_url, subprocess_env):
    publish_all(redis_url, [fill(f"o{i}", "100") for i in range(5)])
    result = hean("replay", "--type", "order_filled", "--count", "3", "--json", env=subprocess_env)
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [e["data"]["order_id"] for e in lines] == ["o0", "o1", "o2"]
    assert all(e["event_type"] == "ORDER_FILLED" and e["stream_id"] for e in lines)


def test_replay_follow_prints_new_events(redis_url, subprocess_env):
    proc = subprocess.Popen(
        [HEAN, "replay", "--type", "SIGNAL", "--follow", "--json"], env=subprocess_env,
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        signal_event = Event(
            event_type=EventType.SIGNAL, data={"symbol": "ETH/USDT", "side": "SELL"}
        )
        # The follower may start after this publish: it replays from the start anyway.
        publish_all(redis_url, [signal_event])
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert orjson.loads(line)["event_id"] == signal_event.event_id
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_replay_unknown_type_and_unreachable_redis_are_one_line_errors(subprocess_env):
    bad_type = hean("replay", "--type", "NOPE", env=subprocess_env)
    assert bad_type.returncode == 2 and "unknown event type" in bad_type.stderr
    no_redis = hean(
        "replay", "--type", "TICK", env={**subprocess_env, "REDIS_URL": "redis://:pw@127.0.0.1:1"}
    )
    assert no_redis.returncode == 1
    assert no_redis.stderr.startswith("error: cannot reach Redis at redis://:***@127.0.0.1:1")
    assert "Traceback" not in no_redis.stderr and "pw@" not in no_redis.stderr
    assert len(no_redis.stderr.strip().splitlines()) == 1


def test_health_reads_snapshots_from_redis(redis_url, subprocess_env):
    client = redis.Redis.from_url(redis_url)

    async def write(services: list[str]) -> None:
        import redis.asyncio as aioredis

        aclient = aioredis.Redis.from_url(redis_url)
        reporter = HealthReporter(aclient, interval_s=10, ttl_s=60)
        for service in services:
            await reporter.publish(
                service,
                "h:1",
                {
                    "orchestrator": {"running": True, "uptime_seconds": 5,
                                     "overall_state": "healthy"},
                    "components": {"main": {"state": "healthy", "last_check": 1,
                                            "failure_count": 0, "circuit_breaker": "closed"}},
                },
            )  # fmt: skip
        await aclient.aclose()

    env = {**subprocess_env, "GATEWAY_EXPECTED_SERVICES": "risk,execution"}
    asyncio.run(write(["risk"]))
    down = hean("health", env=env)
    assert down.returncode == 1
    assert "down: execution" in down.stdout
    asyncio.run(write(["execution"]))
    ok = hean("health", "--json", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert orjson.loads(ok.stdout)["orchestrator"]["overall_state"] == "healthy"
    client.close()


def add_dead_letter(redis_url: str, payload: bytes) -> str:
    client = redis.Redis.from_url(redis_url)
    entry_id = client.xadd(DLQ_STREAM, dead_letter(payload))
    client.close()
    return str(entry_id.decode())  # type: ignore[union-attr]


def test_dlq_list_retry_drop(redis_url, subprocess_env):
    good = Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"})
    good_id = add_dead_letter(redis_url, good.to_json())
    bad_id = add_dead_letter(redis_url, b"{not json")

    listing = hean("dlq", "list", "--json", env=subprocess_env)
    assert listing.returncode == 0
    assert [e["dlq_id"] for e in orjson.loads(listing.stdout)["entries"]] == [good_id, bad_id]
    table = hean("dlq", "list", env=subprocess_env)
    assert "ValueError: boom" in table.stdout

    retried = hean("dlq", "retry", good_id, env=subprocess_env)
    assert retried.returncode == 0 and f"retried {good_id}" in retried.stdout
    invalid = hean("dlq", "retry", bad_id, env=subprocess_env)
    assert invalid.returncode == 1 and "drop it instead" in invalid.stderr
    dropped = hean("dlq", "drop", bad_id, env=subprocess_env)
    assert dropped.returncode == 0
    missing = hean("dlq", "drop", bad_id, env=subprocess_env)
    assert missing.returncode == 1 and f"no dead-letter entry {bad_id}" in missing.stderr
    client = redis.Redis.from_url(redis_url)
    assert client.xlen(DLQ_STREAM) == 0
    assert client.xlen(stream_key(EventType.SIGNAL)) == 1
    client.close()


def test_killswitch_without_risk_is_queued_with_exit_3(redis_url, subprocess_env):
    result = hean("killswitch", "trigger", "--reason", "test", "--wait", "0", env=subprocess_env)
    assert result.returncode == 3
    assert "not consuming commands" in result.stderr
    client = redis.Redis.from_url(redis_url)
    entries: Any = client.xrange("hean:risk:commands")
    assert entries[0][1][b"command"] == b"trigger" and entries[0][1][b"source"] == b"cli"
    client.close()


def wait_for_risk_group(redis_url: str, timeout: float = 60) -> None:
    client = redis.Redis.from_url(redis_url)

    async def has_group() -> bool:
        try:
            groups: Any = client.xinfo_groups("hean:risk:commands")
        except redis.ResponseError:
            return False
        return any(g["name"] == b"risk" for g in groups) is True

    try:
        asyncio.run(eventually(has_group, timeout=timeout, message="risk's command group"))
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_killswitch_trigger_status_reset_through_risk(subprocess_env):
    env = {**subprocess_env, "HEALTH_PORT": "0"}
    risk = subprocess.Popen(
        [sys.executable, "-m", "hean.risk"], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_risk_group(env["REDIS_URL"])
        trigger = hean("killswitch", "trigger", "--reason", "cli test", "--wait", "30", env=env)
        assert trigger.returncode == 0, trigger.stderr
        assert "ACTIVE" in trigger.stdout and "cli test" in trigger.stdout
        status = hean("killswitch", "status", "--json", env=env)
        assert orjson.loads(status.stdout)["active"] is True
        reset = hean("killswitch", "reset", "--wait", "30", env=env)
        assert reset.returncode == 0, reset.stderr
        assert "kill switch: off" in reset.stdout
    finally:
        risk.terminate()
        risk.wait(timeout=20)


@pytest.mark.timeout(120)
def test_a_stuck_service_can_be_asked_for_its_stacks(subprocess_env, tmp_path):
    """What `hean up` does to a child that misses its start or stop deadline: SIGUSR1
    makes the service write every thread's stack to its log, and it keeps running."""
    env = {**subprocess_env, "HEALTH_PORT": "0"}
    log_path = tmp_path / "risk.log"
    log_file = log_path.open("ab")
    risk = subprocess.Popen(
        [sys.executable, "-m", "hean.risk"], env=env, cwd=ROOT,
        stdout=log_file, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_risk_group(env["REDIS_URL"])
        dump_stacks(Child("risk", 0, log_path, risk, log_file))
        text = eventually_text(log_path, "most recent call first")
        assert "Current thread" in text or "Thread 0x" in text
        assert "hean/core/service.py" in text  # the main thread, inside run_service
        assert risk.poll() is None
    finally:
        risk.terminate()
        risk.wait(timeout=20)
        log_file.close()


def eventually_text(path: Path, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace")
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def test_train_help_is_delegated(subprocess_env):
    result = hean("train", "--help", env=subprocess_env)
    assert result.returncode == 0
    assert "--data" in result.stdout and "--out" in result.stdout
