"""The api-gateway over real HTTP and WebSocket, against a real redis-server.

The app is served by uvicorn in the test's event loop (the same `GatewayServer` component the
service runs); snapshots are written by `HealthReporter`, events by `EventBus.redis`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from fastapi import HTTPException

from hean.core.bus import EventBus
from hean.core.event_streams import DLQ_STREAM, stream_key
from hean.core.health import HealthReporter
from hean.core.metrics import Metrics
from hean.core.orchestrator import TradingOrchestrator
from hean.core.settings import CoreSettings, load_settings
from hean.core.types import Event, EventType
from hean.gateway.app import GatewayDeps, create_app
from hean.gateway.server import GatewayServer, bind_socket
from hean.gateway.service import redis_pool_client
from hean.gateway.settings import GatewaySettings
from tests.conftest import ROOT, free_port
from tests.helpers import dead_letter, eventually

TOKEN = "s3cret-token-value"
EXPECTED = "market-data,features,ml-service,strategy,risk,execution,portfolio"
COMPONENTS = {
    "market-data": "market_data",
    "features": "features",
    "ml-service": "ml_engine",
    "strategy": "strategy",
    "risk": "risk_governor",
    "execution": "execution",
    "portfolio": "portfolio",
}


class Gateway:
    def __init__(self, url: str, redis_url: str) -> None:
        self.url = url
        self.ws_url = url.replace("http://", "ws://")
        self.redis_url = redis_url
        self.http = httpx.AsyncClient(base_url=url, timeout=15.0)

    def auth(self, token: str = TOKEN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def running_gateway(redis_url: str, **env: str) -> AsyncIterator[Gateway]:
    settings = load_settings(
        GatewaySettings,
        REDIS_URL=redis_url,
        GATEWAY_EXPECTED_SERVICES=EXPECTED,
        GATEWAY_COMMAND_TIMEOUT_S="20",
        **env,
    )
    client = redis_pool_client(redis_url)
    server = GatewayServer(
        create_app(GatewayDeps(settings, client, Metrics())), bind_socket("127.0.0.1", 0)
    )
    await server.start()
    gateway = Gateway(f"http://127.0.0.1:{server.port}", redis_url)
    try:
        yield gateway
    finally:
        await gateway.http.aclose()
        await server.stop()
        await client.aclose()


@pytest.fixture
async def gateway(redis_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(redis_url, API_TOKEN=TOKEN) as gw:
        yield gw


@pytest.fixture
async def bus(redis_url: str) -> AsyncIterator[EventBus]:
    settings = load_settings(CoreSettings, REDIS_URL=redis_url, SERVICE_NAME="gateway-test")
    bus = EventBus.redis(settings)
    await bus.start()
    yield bus
    await bus.stop()


async def publish(bus: EventBus, event_type: EventType, data: dict[str, Any]) -> Event:
    event = await bus.publish(Event(event_type=event_type, data=data))
    await bus.flush(5)
    return event


class Healthy:
    """A component whose health check says what the test wants."""

    def __init__(self, state: str = "healthy") -> None:
        self.state = state

    def health_check(self) -> str:
        return self.state


async def write_snapshot(
    client: aioredis.Redis,
    service: str,
    instance: str,
    *,
    state: str = "healthy",
    ttl_s: float = 30.0,
) -> None:
    """A real orchestrator's health, written by the real reporter."""
    orchestrator = TradingOrchestrator(EventBus(), service_name=service, instance=instance)
    orchestrator.register_component(COMPONENTS.get(service, "main"), Healthy(state))
    await orchestrator.start()
    await orchestrator.check_components()
    reporter = HealthReporter(client, interval_s=ttl_s / 2, ttl_s=ttl_s)
    await reporter.publish(service, instance, orchestrator.health())
    await orchestrator.stop()


async def write_system(client: aioredis.Redis, skip: str = "") -> None:
    for service in EXPECTED.split(","):
        if service != skip:
            await write_snapshot(client, service, f"host:{service}")
    await write_snapshot(client, "ml-service", "host:replica-2")


# --- health ----------------------------------------------------------------------------------


async def test_health_all_services_live_is_healthy_with_replicas(gateway, redis_client):
    await write_system(redis_client)
    resp = await gateway.http.get("/health")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["orchestrator"]["overall_state"] == "healthy"
    assert body["orchestrator"]["running"] is True
    ml = body["components"]["ml_engine"]
    assert ml["state"] == "healthy" and ml["circuit_breaker"] == "closed"
    assert ml["instances"] == 2
    assert set(body["services"]["ml-service"]["instances"]) == {"host:ml-service", "host:replica-2"}
    assert body["missing_services"] == []


async def test_health_missing_service_is_unhealthy_503(gateway, redis_client):
    await write_system(redis_client, skip="risk")
    resp = await gateway.http.get("/health")
    assert resp.status_code == 503
    assert resp.json()["missing_services"] == ["risk"]
    one = await gateway.http.get("/health/risk_governor")
    assert one.status_code == 503
    assert "risk is down" in one.json()["error_message"]


async def test_health_expired_snapshot_shows_service_down(gateway, redis_client):
    await write_system(redis_client)
    await write_snapshot(redis_client, "execution", "host:execution", ttl_s=0.4)

    async def execution_down() -> bool:
        body = (await gateway.http.get("/health")).json()
        return bool(body["missing_services"] == ["execution"])

    await eventually(execution_down, timeout=5, message="the execution snapshot to expire")
    entry = (await gateway.http.get("/health/execution")).json()
    assert entry["state"] == "unhealthy" and entry["instances"] == 0


async def test_health_degraded_component_gives_degraded_200(gateway, redis_client):
    await write_system(redis_client)
    await write_snapshot(redis_client, "portfolio", "host:portfolio", state="degraded")
    resp = await gateway.http.get("/health")
    assert resp.status_code == 200
    assert resp.json()["orchestrator"]["overall_state"] == "degraded"
    assert resp.json()["components"]["portfolio"]["state"] == "degraded"


async def test_health_component_guide_names_answer(gateway, redis_client):
    await write_system(redis_client)
    orch = await gateway.http.get("/health/orchestrator")
    assert orch.status_code == 200
    assert set(orch.json()) == {"running", "uptime_seconds", "overall_state"}
    for name in ("ml_engine", "execution", "execution_router", "ml-service", "risk.event_bus"):
        resp = await gateway.http.get(f"/health/{name}")
        assert resp.status_code == 200, (name, resp.text)
    assert (await gateway.http.get("/health/ml_engine")).json()["service"] == "ml-service"


async def test_health_unknown_component_404_lists_known_names(gateway, redis_client):
    await write_system(redis_client)
    resp = await gateway.http.get("/health/warp_drive")
    assert resp.status_code == 404
    body = resp.json()
    assert "warp_drive" in body["detail"]
    assert {"orchestrator", "ml_engine", "execution", "risk"} <= set(body["known"])


# --- portfolio, orders, events -------------------------------------------------------------


async def test_positions_and_pnl_before_and_after_pnl_update(gateway, bus):
    assert (await gateway.http.get("/pnl")).json()["available"] is False
    await publish(
        bus,
        EventType.PNL_UPDATE,
        {
            "total_pnl": "12.5",
            "realized_pnl": "10",
            "unrealized_pnl": "2.5",
            "equity": "10012.5",
            "positions": {"BTC/USDT": {"qty": "0.1", "avg_entry_price": "50000"}},
        },
    )
    pnl = (await gateway.http.get("/pnl")).json()
    assert pnl["available"] is True
    assert pnl["total_pnl"] == "12.5" and "positions" not in pnl
    positions = (await gateway.http.get("/positions")).json()
    assert positions["positions"]["BTC/USDT"]["qty"] == "0.1"
    assert positions["equity"] == "10012.5"


async def test_orders_fills_and_open_orders_from_streams(gateway, bus):
    for order_id in ("o1", "o2", "o3", "rogue"):
        data = {"order_id": order_id, "symbol": "BTC/USDT", "side": "BUY", "size": "2"}
        # Only risk's approvals are orders (execution dead-letters any other).
        source = "" if order_id == "rogue" else "risk:test"
        await bus.publish(Event(event_type=EventType.ORDER_APPROVED, source=source, data=data))
    await publish(bus, EventType.ORDER_PLACED, {"order_id": "o1", "exchange_order_id": "x1"})
    await publish(
        bus,
        EventType.ORDER_FILLED,
        {"order_id": "o1", "fill_price": "100", "filled_qty": "2", "fill_id": "f1"},
    )
    await publish(bus, EventType.ORDER_CANCELLED, {"order_id": "o2", "reason": "test"})
    await publish(
        bus,
        EventType.ORDER_FILLED,
        {"order_id": "o3", "fill_price": "100", "filled_qty": "1", "fill_id": "f2"},
    )
    open_ = (await gateway.http.get("/orders/open")).json()
    assert [o["order_id"] for o in open_["orders"]] == ["o3"]
    assert open_["orders"][0]["filled_qty"] == "1"
    fills = (await gateway.http.get("/fills", params={"count": 1})).json()
    assert [f["data"]["order_id"] for f in fills["fills"]] == ["o3"]
    orders = (await gateway.http.get("/orders", params={"count": 3})).json()
    types = [e["event_type"] for e in orders["events"]]
    assert types == ["ORDER_FILLED", "ORDER_CANCELLED", "ORDER_FILLED"]


async def test_events_latest_paging_and_invalid_requests(gateway, bus):
    for price in ("100", "101", "102"):
        await publish(bus, EventType.TICK, {"symbol": "BTC/USDT", "price": price})
    latest = (await gateway.http.get("/events/tick", params={"count": 2})).json()
    assert [e["data"]["price"] for e in latest["events"]] == ["101", "102"]
    first = (await gateway.http.get("/events/TICK", params={"start": "-", "count": 2})).json()
    assert [e["data"]["price"] for e in first["events"]] == ["100", "101"]
    rest = (
        await gateway.http.get("/events/TICK", params={"start": first["next_start"], "count": 5})
    ).json()
    assert [e["data"]["price"] for e in rest["events"]] == ["102"]

    unknown = await gateway.http.get("/events/NOT_A_TYPE")
    assert unknown.status_code == 404 and "ORDER_FILLED" in unknown.json()["detail"]
    bad_start = await gateway.http.get("/events/TICK", params={"start": "yesterday"})
    assert bad_start.status_code == 400 and "invalid start" in bad_start.json()["detail"]
    too_many = await gateway.http.get("/events/TICK", params={"count": 10**9})
    assert too_many.status_code == 422
    listing = (await gateway.http.get("/events")).json()["types"]
    assert {"event_type": "TICK", "stream": stream_key(EventType.TICK), "length": 3,
            "retention": "high_frequency"} in listing  # fmt: skip


# --- dead letters ----------------------------------------------------------------------------


async def add_dead_letter(client: aioredis.Redis, payload: bytes) -> str:
    entry_id: Any = await client.xadd(DLQ_STREAM, dead_letter(payload))
    return str(entry_id.decode())


async def test_dlq_list_retry_drop(gateway, redis_client):
    good = Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"})
    good_id = await add_dead_letter(redis_client, good.to_json())
    bad_id = await add_dead_letter(redis_client, b"not json")

    listing = (await gateway.http.get("/dlq")).json()
    assert listing["total"] == 2
    assert [e["dlq_id"] for e in listing["entries"]] == [good_id, bad_id]
    assert (await gateway.http.get(f"/dlq/{good_id}")).json()["error"] == "ValueError: boom"

    retried = await gateway.http.post(f"/dlq/{good_id}/retry", headers=gateway.auth())
    assert retried.status_code == 200, retried.text
    assert await redis_client.xlen(stream_key(EventType.SIGNAL)) == 1
    invalid = await gateway.http.post(f"/dlq/{bad_id}/retry", headers=gateway.auth())
    assert invalid.status_code == 409 and "drop it" in invalid.json()["detail"]
    dropped = await gateway.http.delete(f"/dlq/{bad_id}", headers=gateway.auth())
    assert dropped.status_code == 200
    assert await redis_client.xlen(DLQ_STREAM) == 0
    again = await gateway.http.delete(f"/dlq/{bad_id}", headers=gateway.auth())
    assert again.status_code == 404
    malformed = await gateway.http.get("/dlq/not-an-id")
    assert malformed.status_code == 422


# --- auth -----------------------------------------------------------------------------------


async def test_commands_refused_without_configured_token(redis_url):
    async with running_gateway(redis_url) as gw:
        resp = await gw.http.post("/killswitch/reset", headers=gw.auth("anything"))
        assert resp.status_code == 403
        assert "no API_TOKEN is configured" in resp.json()["detail"]
        assert (await gw.http.get("/killswitch")).status_code == 200


async def test_commands_wrong_or_missing_token_401_right_token_accepted(gateway, redis_client):
    missing = await gateway.http.post("/killswitch/reset")
    assert missing.status_code == 401 and "Bearer" in missing.json()["detail"]
    wrong = await gateway.http.post("/killswitch/reset", headers=gateway.auth("wrong"))
    assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid token"
    assert await redis_client.xlen("hean:risk:commands") == 0
    right = await gateway.http.post("/killswitch/reset", headers=gateway.auth())
    assert right.status_code == 202  # no risk service here: queued
    assert "not consuming" in right.json()["detail"]
    assert await redis_client.xlen("hean:risk:commands") == 1


async def test_read_token_required_protects_reads_not_health(redis_url):
    async with running_gateway(
        redis_url, API_TOKEN=TOKEN, GATEWAY_READ_TOKEN_REQUIRED="true"
    ) as gw:
        assert (await gw.http.get("/positions")).status_code == 401
        assert (await gw.http.get("/positions", headers=gw.auth("nope"))).status_code == 401
        assert (await gw.http.get("/positions", headers=gw.auth())).status_code == 200
        assert (await gw.http.get("/health")).status_code in (200, 503)
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with websockets.connect(f"{gw.ws_url}/ws/events"):
                pass
        async with websockets.connect(f"{gw.ws_url}/ws/events?token={TOKEN}"):
            pass


def test_read_token_required_without_token_is_a_settings_error():
    from hean.core.settings import SettingsError

    with pytest.raises(SettingsError, match="GATEWAY_READ_TOKEN_REQUIRED"):
        load_settings(GatewaySettings, GATEWAY_READ_TOKEN_REQUIRED="true")


async def test_no_secret_in_responses_or_logs(gateway, redis_client, caplog):
    caplog.set_level(logging.DEBUG)
    await write_system(redis_client)
    bodies = []
    for path in ("/health", "/openapi.json", "/metrics", "/killswitch", "/health/orchestrator"):
        bodies.append((await gateway.http.get(path)).text)
    bodies.append((await gateway.http.post("/killswitch/reset", headers=gateway.auth("x"))).text)
    bodies.append((await gateway.http.post("/killswitch/reset", headers=gateway.auth())).text)
    assert all(TOKEN not in body for body in bodies)
    assert TOKEN not in caplog.text


# --- kill switch through the real risk service -------------------------------------------------


def spawn_service(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", module], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def test_killswitch_trigger_and_reset_applied_by_risk(gateway, redis_client, subprocess_env):
    env = {**subprocess_env, "HEALTH_PORT": "0", "HEALTH_INTERVAL_S": "1", "HEALTH_TTL_S": "5"}
    risk = spawn_service("hean.risk", env)
    try:

        async def risk_consuming() -> bool:
            with contextlib.suppress(Exception):
                groups = await redis_client.xinfo_groups("hean:risk:commands")
                return any(g["name"] == b"risk" for g in groups) is True
            return False

        await eventually(risk_consuming, timeout=30, message="risk to read its command stream")
        resp = await gateway.http.post(
            "/killswitch/trigger", json={"reason": "gateway test"}, headers=gateway.auth()
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["applied"] is True
        assert body["killswitch"]["active"] is True
        assert "gateway test" in body["killswitch"]["reason"]
        assert (await gateway.http.get("/killswitch")).json()["active"] is True
        events = (await gateway.http.get("/events/KILLSWITCH_TRIGGERED")).json()["events"]
        assert "gateway test" in events[-1]["data"]["reason"]

        reset = await gateway.http.post("/killswitch/reset", headers=gateway.auth())
        assert reset.status_code == 200 and reset.json()["killswitch"]["active"] is False
    finally:
        risk.terminate()
        risk.wait(timeout=20)


async def test_killswitch_trigger_reason_validated(gateway):
    resp = await gateway.http.post(
        "/killswitch/trigger", json={"reason": "x" * 501}, headers=gateway.auth()
    )
    assert resp.status_code == 422


async def test_body_that_is_not_utf8_is_a_422_not_a_500(gateway):
    # Found by the fuzzing in tests/chaos/test_access.py: FastAPI's own 422 handler echoed
    # the raw body back and failed on bytes that are not UTF-8.
    resp = await gateway.http.post(
        "/killswitch/trigger",
        content=b"\xff\xfe{not json",
        headers={**gateway.auth(), "Content-Type": "text/plain"},
    )
    assert resp.status_code == 422
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body"] and "dictionary" in error["msg"]


# --- Redis outage ----------------------------------------------------------------------------


async def test_redis_stopped_gives_503_with_reason(redis_factory: Callable[..., Any]):
    server = redis_factory()
    async with running_gateway(server.url, API_TOKEN=TOKEN) as gw:
        assert (await gw.http.get("/positions")).status_code == 200
        server.stop()
        for path in ("/positions", "/orders/open", "/dlq", "/events/TICK", "/health/ml_engine"):
            resp = await gw.http.get(path)
            assert resp.status_code == 503, (path, resp.text)
            assert resp.json()["error"] == "redis_unavailable"
            assert "Redis is unavailable" in resp.json()["detail"]
        health = await gw.http.get("/health")
        assert health.status_code == 503
        assert health.json()["orchestrator"]["overall_state"] == "unhealthy"
        command = await gw.http.post("/killswitch/reset", headers=gw.auth())
        assert command.status_code == 503


# --- live events -----------------------------------------------------------------------------


async def test_websocket_streams_published_events_of_chosen_types(gateway, bus):
    async with websockets.connect(f"{gateway.ws_url}/ws/events?types=ORDER_FILLED,SIGNAL") as ws:
        await publish(bus, EventType.TICK, {"symbol": "BTC/USDT", "price": "1"})  # not chosen
        fill = await publish(
            bus,
            EventType.ORDER_FILLED,
            {"order_id": "o9", "fill_price": "100", "filled_qty": "1", "fill_id": "f9"},
        )
        message = orjson.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        assert message["event_type"] == "ORDER_FILLED"
        assert message["event_id"] == fill.event_id
        assert message["data"]["order_id"] == "o9"
        signal = await publish(bus, EventType.SIGNAL, {"symbol": "BTC/USDT", "side": "SELL"})
        message = orjson.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        assert message["event_id"] == signal.event_id


async def test_websocket_catches_up_from_start_id(gateway, bus):
    first = await publish(bus, EventType.SIGNAL, {"symbol": "BTC/USDT", "side": "BUY"})
    async with websockets.connect(f"{gateway.ws_url}/ws/events?types=SIGNAL&start=0") as ws:
        message = orjson.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        assert message["event_id"] == first.event_id


async def test_websocket_unknown_type_is_refused(gateway):
    with pytest.raises(websockets.exceptions.InvalidStatus):
        async with websockets.connect(f"{gateway.ws_url}/ws/events?types=BOGUS"):
            pass


async def test_metrics_count_requests(gateway):
    await gateway.http.get("/killswitch")
    for made_up in ("BREW", "X-ANYTHING-1"):  # any token is a method to the server
        await gateway.http.request(made_up, "/killswitch")
    text = (await gateway.http.get("/metrics")).text
    assert 'hean_gateway_requests_total{method="GET",route="/killswitch",status="200"}' in text
    other = 'hean_gateway_requests_total{method="other",route="/killswitch",status="405"} 2.0'
    assert other in text
    assert "BREW" not in text
    assert "hean_orders_total" in text


# --- the service process ---------------------------------------------------------------------


def test_gateway_process_serves_health_with_its_own_snapshot(subprocess_env):
    port, health_port = free_port(), free_port()
    env = {**subprocess_env, "GATEWAY_PORT": str(port), "HEALTH_PORT": str(health_port),
           "GATEWAY_HOST": "127.0.0.1", "HEALTH_INTERVAL_S": "0.5", "HEALTH_TTL_S": "3",
           "API_TOKEN": TOKEN}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "hean.gateway"], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        async def sees_itself() -> bool:
            async with httpx.AsyncClient() as http:
                with contextlib.suppress(httpx.HTTPError):
                    body = (await http.get(f"http://127.0.0.1:{port}/health")).json()
                    return "api-gateway" in body["services"]
            return False

        asyncio.run(eventually(sees_itself, timeout=30, message="the gateway's own snapshot"))
        docs = httpx.get(f"http://127.0.0.1:{port}/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert httpx.get(f"http://127.0.0.1:{health_port}/metrics").status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert TOKEN.encode() not in out


def test_gateway_process_port_in_use_exits_with_one_line(subprocess_env):
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    env = {**subprocess_env, "GATEWAY_PORT": str(port), "GATEWAY_HOST": "127.0.0.1",
           "HEALTH_PORT": "0"}  # fmt: skip
    try:
        result = subprocess.run(
            [sys.executable, "-m", "hean.gateway"], env=env, cwd=ROOT,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        sock.close()
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_gateway_stream_ids_beyond_64_bits_are_client_errors() -> None:
    from hean.gateway.app import _check_range_id, _dlq_id

    with pytest.raises(ValueError, match="2\\*\\*64"):
        _dlq_id("1-18446744073709551616")
    assert _dlq_id("1-18446744073709551615") == "1-18446744073709551615"
    with pytest.raises(HTTPException) as info:
        _check_range_id("99999999999999999999999-0", "-", "start")
    assert info.value.status_code == 400
