"""The whole system, as a user runs it: `hean up` on a real redis-server starts the eight
services as processes; the trade lifecycle flows end to end; health, replay and the kill
switch behave as the README says; Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from hean.core.event_streams import RedisEventStream, stream_key
from hean.core.types import Event, EventType
from tests.conftest import ROOT, free_port
from tests.helpers import eventually

HEAN = str(Path(sys.executable).with_name("hean"))
TOKEN = "e2e-test-token-5f1c"
SERVICES = {
    "market-data", "features", "ml-service", "strategy", "risk", "execution", "portfolio",
    "api-gateway",
}  # fmt: skip
LIFECYCLE = (
    EventType.TICK,
    EventType.CANDLE,
    EventType.FEATURES_READY,
    EventType.ML_PREDICTION,
    EventType.SIGNAL,
    EventType.ORDER_REQUEST,
    EventType.ORDER_APPROVED,
    EventType.ORDER_PLACED,
    EventType.ORDER_FILLED,
    EventType.PNL_UPDATE,
)


@dataclass
class System:
    gateway: str
    dashboard: str
    env: dict[str, str]
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.lines[-60:])


def free_block(size: int) -> int:
    while True:
        base = free_port()
        if base + size < 65000 and all(_free(base + i) for i in range(size)):
            return base


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def system(redis_url: str, subprocess_env: dict[str, str], tmp_path: Path) -> Iterator[System]:
    gateway_port = free_port()
    ui_port = free_port()
    env = {
        **subprocess_env,
        "API_TOKEN": TOKEN,
        "COLUMNS": "300",
        # Trade often enough to see the lifecycle within the test's deadline.
        "STRATEGY_BUY_THRESHOLD": "0.51",
        "STRATEGY_SELL_THRESHOLD": "0.49",
        "STRATEGY_COOLDOWN_BARS": "1",
        "STRATEGY_TREND_FILTER": "false",
        "HEALTH_INTERVAL_S": "1",
        "HEALTH_TTL_S": "5",
    }
    args = [
        HEAN, "up", "--redis-url", redis_url, "--gateway-port", str(gateway_port),
        "--health-port-base", str(free_block(12)), "--workdir", str(tmp_path),
        "--replay-speed", "1200", "--interval", "1", "--ui-port", str(ui_port),
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sut = System(f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{ui_port}", env, proc)
    reader = threading.Thread(target=lambda: sut.lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        yield sut
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _before(a: str, b: str) -> bool:
    def key(entry_id: str) -> tuple[int, int]:
        ms, _, seq = entry_id.partition("-")
        return int(ms), int(seq)

    return key(a) < key(b)


async def get(url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(url, **kwargs)


async def post(url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=15) as http:
        return await http.post(url, **kwargs)


async def stream_lengths(client: aioredis.Redis) -> dict[EventType, int]:
    return {t: int(await client.xlen(stream_key(t))) for t in LIFECYCLE}


@pytest.mark.timeout(420)
async def test_system_trade_lifecycle_health_replay_and_kill_switch(
    system: System, redis_url: str, redis_client: aioredis.Redis
) -> None:
    async def everything_flows() -> bool:
        if system.proc.poll() is not None:
            raise AssertionError(f"hean up exited:\n{system.output()}")
        lengths = await stream_lengths(redis_client)
        return all(n > 0 for n in lengths.values())

    await eventually(
        everything_flows, timeout=240, interval=0.5, message="every lifecycle event type"
    )

    # /health: the eight services, all healthy; the guide's component names answer.
    async def all_healthy() -> bool:
        try:
            body = (await get(f"{system.gateway}/health")).json()
        except httpx.HTTPError:
            return False
        services = {name for name, s in body["services"].items() if s["state"] == "healthy"}
        healthy = body["orchestrator"]["overall_state"] == "healthy"
        return services >= SERVICES and healthy and body["missing_services"] == []

    await eventually(all_healthy, timeout=60, message="all eight services healthy in /health")
    # The dashboard `hean up` starts last answers and reaches the gateway through its proxy.
    await eventually(
        lambda: any("HEAN is running" in line for line in system.lines),
        timeout=60,
        message="hean up to report it runs",
    )
    assert (await get(f"{system.dashboard}/healthz")).status_code == 200
    proxied = await get(f"{system.dashboard}/api/health")
    assert proxied.status_code == 200
    assert proxied.json()["orchestrator"]["running"] is True
    for name in ("orchestrator", "ml_engine", "execution"):
        response = await get(f"{system.gateway}/health/{name}")
        assert response.status_code == 200, (name, response.text)
    missing = await get(f"{system.gateway}/health/no_such_component")
    assert missing.status_code == 404
    assert "ml_engine" in missing.text

    # `hean replay` lists the fills that are in the stream.
    result = await asyncio.to_thread(
        subprocess.run,
        [HEAN, "replay", "--type", "ORDER_FILLED", "--start", "-", "--end", "+", "--json"],
        env={**system.env, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    replayed = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    async with RedisEventStream(redis_url) as stream:
        listed = [e async for e in stream.replay_events(EventType.ORDER_FILLED)]
    # Fills keep coming while the command runs: what it listed is the stream up to then.
    assert replayed
    assert [r["event_id"] for r in replayed] == [f.event_id for f in listed[: len(replayed)]]

    # The kill switch: refused without the token; with it, it blocks new orders and
    # shows in health.
    refused = await post(f"{system.gateway}/killswitch/trigger", json={"reason": "e2e"})
    assert refused.status_code == 401
    triggered = await post(
        f"{system.gateway}/killswitch/trigger",
        json={"reason": "e2e test"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert triggered.status_code == 200, triggered.text
    assert triggered.json()["applied"] is True
    assert triggered.json()["killswitch"]["active"] is True
    # Risk applied it before answering: any decision made from now on sees it.
    applied_ns = time.time_ns()
    after = await redis_client.xinfo_stream(stream_key(EventType.ORDER_REQUEST))
    since = after["last-generated-id"]
    since = since.decode() if isinstance(since, bytes) else since

    async def blocked_orders() -> list[Event]:
        async with RedisEventStream(redis_url) as stream:
            return [
                e
                async for e in stream.replay_events(EventType.ORDER_REJECTED)
                if "kill switch" in str(e.data.get("reason", ""))
            ]

    async def a_request_was_blocked() -> bool:
        return bool(await blocked_orders())

    await eventually(
        a_request_was_blocked, timeout=120, interval=0.5, message="an order refused by the kill"
    )
    # After the kill, only orders that reduce the position they meet are approved.
    async with RedisEventStream(redis_url) as stream:
        approved_after = [
            (i, e) async for i, e in stream.replay_entries(EventType.ORDER_APPROVED, f"({since}")
        ]
        fills = [(i, e) async for i, e in stream.replay_entries(EventType.ORDER_FILLED)]
    for approved_id, order in approved_after:
        if order.timestamp <= applied_ns:
            continue  # decided before the kill switch was applied, published just after
        position = sum(
            (
                Decimal(f.data["filled_qty"]) * (1 if f.data["side"] == "BUY" else -1)
                for fill_id, f in fills
                if _before(fill_id, approved_id) and f.data["symbol"] == order.data["symbol"]
            ),
            Decimal(0),
        )
        signed = order.data["size"] * (1 if order.data["side"] == "BUY" else -1)
        assert position != 0, f"{order.data['order_id']} approved after the kill, no position"
        assert (position > 0) != (signed > 0), f"{order.data['order_id']} adds to the position"
        assert abs(signed) <= abs(position), f"{order.data['order_id']} flips the position"

    async def health_shows_kill_switch() -> bool:
        health = (await get(f"{system.gateway}/health")).json()
        risk = health["components"]["risk_governor"]
        return "kill switch active: command: e2e test" in risk.get("error_message", "")

    await eventually(health_shows_kill_switch, timeout=20, message="the kill switch in /health")
    state = (await get(f"{system.gateway}/killswitch")).json()
    assert state["active"] is True

    # Ctrl-C stops everything cleanly.
    system.proc.send_signal(signal.SIGINT)
    assert system.proc.wait(timeout=90) == 0, system.output()

    async def snapshots_gone() -> bool:
        return not [k async for k in redis_client.scan_iter(match="hean:health:*")]

    await eventually(snapshots_gone, timeout=30, message="every service withdrew its health")
    await asyncio.sleep(0)
