"""Hostile entries written straight into every stream, and invalid settings for each service."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from hean.core.event_streams import stream_key
from hean.core.types import Event, EventType
from tests.chaos.conftest import Report
from tests.chaos.harness import MODULES, TRADING_ENV, System, base_env, group_states, wait_for

CONSUMED = (
    EventType.TICK,
    EventType.CANDLE,
    EventType.FEATURES_READY,
    EventType.ML_PREDICTION,
    EventType.SIGNAL,
    EventType.ORDER_REQUEST,
    EventType.ORDER_APPROVED,
    EventType.ORDER_FILLED,
    EventType.ORDER_CANCELLED,
    EventType.ORDER_REJECTED,
    EventType.PNL_UPDATE,
    EventType.KILLSWITCH_TRIGGERED,
)


def _valid(etype: EventType) -> dict[str, Any]:
    samples: dict[EventType, dict[str, Any]] = {
        EventType.TICK: {"symbol": "BTC/USDT", "price": "100"},
        EventType.CANDLE: {
            "symbol": "BTC/USDT",
            "open": "1",
            "high": "2",
            "low": "1",
            "close": "2",
            "volume": "1",
            "timeframe": "1m",
            "timestamp": 1,
        },
        EventType.ORDER_APPROVED: {
            "order_id": "x",
            "symbol": "BTC/USDT",
            "side": "BUY",
            "size": "1",
        },
    }
    if etype in samples:
        envelope: dict[str, Any] = orjson.loads(
            Event(event_type=etype, data=samples[etype]).to_json()
        )
        return envelope
    # Other types: a TICK's envelope relabelled (its data is already wrong for the type).
    envelope = _valid(EventType.TICK)
    return {**envelope, "event_type": etype.value, "data": {"symbol": "BTC/USDT"}}


def hostile(etype: EventType) -> list[tuple[str, dict[bytes, bytes]]]:
    """(name, fields) of bad entries for the stream of `etype`."""
    env = _valid(etype)
    other = EventType.SIGNAL if etype != EventType.SIGNAL else EventType.TICK

    def with_data(**changes: Any) -> bytes:
        return orjson.dumps({**env, "data": {**env["data"], **changes}})

    cases = [
        ("no event field", {b"foo": b"bar"}),
        ("not JSON", {b"event": b"{not json"}),
        ("invalid UTF-8", {b"event": b'{"event_type": "\xff\xfe"}'}),
        ("JSON array", {b"event": b"[1, 2, 3]"}),
        ("missing data", {b"event": orjson.dumps({k: v for k, v in env.items() if k != "data"})}),
        ("wrong type of data", {b"event": orjson.dumps({**env, "data": "a string"})}),
        ("wrong event type", {b"event": orjson.dumps({**env, "event_type": other.value})}),
        ("unknown event type", {b"event": orjson.dumps({**env, "event_type": "NOPE"})}),
        ("huge payload (2 MB)", {b"event": with_data(symbol="B" * 2_000_000)}),
        ("unknown envelope field", {b"event": orjson.dumps({**env, "evil": 1})}),
        ("timestamp not a number", {b"event": orjson.dumps({**env, "timestamp": "soon"})}),
    ]
    if etype == EventType.TICK:
        cases += [
            ("NaN price", {b"event": with_data(price="NaN")}),
            ("infinite price", {b"event": with_data(price="Infinity")}),
            ("negative price", {b"event": with_data(price="-5")}),
            ("price of wrong type", {b"event": with_data(price={"a": 1})}),
        ]
    if "size" in env["data"]:
        cases += [
            ("negative size", {b"event": with_data(size="-1")}),
            ("NaN size", {b"event": with_data(size="NaN")}),
        ]
    if "close" in env["data"]:
        cases += [("infinite close", {b"event": with_data(close="inf")})]
    if etype not in (EventType.TICK, EventType.CANDLE, EventType.ORDER_APPROVED):
        cases += [("missing required fields", {b"event": orjson.dumps({**env, "data": {}})})]
    return cases


@pytest.mark.timeout(240)
async def test_hostile_entries_in_every_stream_dead_lettered_services_keep_running(
    system: System, redis_client: aioredis.Redis, report: Report
) -> None:
    system.env.update(TRADING_ENV)
    for service in MODULES:
        if service != "market-data":
            system.start(service)

    async def groups_ready() -> bool:
        keys = {k for k, _ in await group_states(redis_client)}
        return all(stream_key(t) in keys for t in CONSUMED if t != EventType.KILLSWITCH_TRIGGERED)

    await wait_for(groups_ready, timeout=60, message="consumer groups", system=system)
    groups = await group_states(redis_client)
    sent: dict[tuple[str, str], list[str]] = {}  # (stream, group) -> entry ids expected in DLQ
    tried = 0
    kinds: set[str] = set()
    cases_of: dict[str, list[str]] = {}
    for etype in CONSUMED:
        key = stream_key(etype)
        readers = [g for (s, g) in groups if s == key]
        for name, fields in hostile(etype):
            added: Any = await redis_client.xadd(key, fields)  # type: ignore[arg-type]
            entry_id = added.decode()
            tried += 1
            kinds.add(name)
            cases_of.setdefault(key, []).append(name)
            for group in readers:
                sent.setdefault((key, group), []).append(entry_id)

    names = {
        (s, e): n for (s, _g), ids in sent.items() for e, n in zip(ids, cases_of[s], strict=True)
    }
    missing: list[str] = []

    async def all_dead_lettered() -> bool:
        letters: Any = await redis_client.xrange("hean:dlq")
        got = {
            (f[b"stream"].decode(), f[b"group"].decode(), f[b"entry_id"].decode())
            for _, f in letters
            if b"stream" in f and b"group" in f and b"entry_id" in f
        }
        missing[:] = [
            f"{s}/{g}: {names[s, e]}"
            for (s, g), ids in sent.items()
            for e in ids
            if (s, g, e) not in got
        ]
        return not missing

    try:
        took = await wait_for(all_dead_lettered, timeout=60, message="every bad entry in DLQ")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: not dead-lettered: {missing}") from None
    letters: Any = await redis_client.xrange("hean:dlq")
    reasons = [f.get(b"error", b"").decode(errors="replace") for _, f in letters]
    assert all(reasons), "a dead letter without a reason"
    system.assert_alive()
    # Still working: a valid tick is consumed by every group that reads ticks.
    await redis_client.xadd(
        stream_key(EventType.TICK),
        {
            b"event": Event(
                event_type=EventType.TICK, data={"symbol": "BTC/USDT", "price": "101"}
            ).to_json()
        },
    )

    async def drained() -> bool:
        states = await group_states(redis_client)
        return all(s["lag"] == 0 and s["pending"] == 0 for s in states.values())

    await wait_for(drained, timeout=60, message="groups drained", system=system)
    per_group = sum(len(v) for v in sent.values())
    report.add(
        "Bad input",
        f"{tried} hostile entries ({len(kinds)} kinds: {', '.join(sorted(kinds))}) written "
        f"with XADD into {len(CONSUMED)} streams read by {len(sent)} consumer groups of seven "
        f"running services: all {per_group} (entry, group) deliveries dead-lettered to "
        f"`hean:dlq` with a reason within {took:.1f} s; every service kept running and "
        "consumed a valid tick afterwards. Sample reasons: "
        + "; ".join(f"`{r[:90]}`" for r in sorted(set(reasons))[:4]),
    )


#: service -> (variable, bad value); every service also gets EVENT_MAX_QUEUE_SIZE=-1.
BAD_SETTINGS: dict[str, tuple[str, str]] = {
    "market-data": ("REPLAY_SPEED", "-1"),
    "features": ("FEATURE_BATCH_SIZE", "0"),
    "ml-service": ("ML_INFERENCE_TIMEOUT", "-5"),
    "strategy": ("STRATEGY_BUY_THRESHOLD", "2"),
    "risk": ("MAX_LEVERAGE", "0"),
    "execution": ("PAPER_TAKER_FEE", "-1"),
    "portfolio": ("STARTING_EQUITY", "-1"),
    "api-gateway": ("GATEWAY_PORT", "not-a-port"),
}


async def _run(module: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return int(proc.returncode or 0), out.decode(errors="replace")


@pytest.mark.timeout(180)
async def test_invalid_settings_refused_naming_the_variable(
    redis_url: str, tmp_path: Path, report: Report
) -> None:
    cases = [(s, var, val) for s, (var, val) in BAD_SETTINGS.items()]
    cases += [(s, "EVENT_MAX_QUEUE_SIZE", "-1") for s in MODULES]
    cases += [(s, "REDIS_URL", "not-a-url") for s in ("risk", "features")]
    rows: list[tuple[str, str, str, int, str]] = []
    sem = asyncio.Semaphore(4)

    async def one(service: str, var: str, val: str) -> None:
        async with sem:
            env = base_env(redis_url, HEALTH_PORT="0", **{var: val})
            code, out = await _run(MODULES[service], env)
        rows.append((service, var, val, code, out.strip().splitlines()[-1][:120] if out else ""))

    await asyncio.gather(*(one(*c) for c in cases))
    rows.sort()
    report.table(
        "Invalid settings",
        ("service", "variable", "value", "exit", "message (last line)"),
        [(s, v, f"`{x}`", c, f"`{m}`") for s, v, x, c, m in rows],
    )
    for service, var, _val, code, message in rows:
        assert code == 2, (service, var, code, message)
        assert var in message, (service, var, message)
        assert "Traceback" not in message
