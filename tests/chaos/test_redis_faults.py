"""Redis restarts under load (append-only on) and an outage longer than the outbox bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from hean.core.features import WARMUP_BARS
from hean.core.types import EventType
from tests.chaos.conftest import Report
from tests.chaos.harness import (
    TRADING_ENV,
    WARMUP,
    Outcome,
    Proc,
    System,
    base_env,
    clean_run,
    differences,
    events,
    invariants,
    outcome,
    pnl_consistent,
    quiescent,
    replay_finished,
    start_all,
    wait_for,
    wait_groups,
)
from tests.conftest import RedisServer

BARS = WARMUP + 400


def _http_health(proc: Proc) -> tuple[int, dict[str, Any]]:
    try:
        r = httpx.get(f"http://127.0.0.1:{proc.health_port}/health", timeout=2)
    except httpx.HTTPError:
        return 0, {}
    return r.status_code, r.json()


def _state(proc: Proc) -> str:
    return str(_http_health(proc)[1].get("orchestrator", {}).get("overall_state", "?"))


def _not_healthy(system: System) -> str:
    """Each service that is not healthy, with its components that are not (for failures)."""
    lines = []
    for proc in system.procs.values():
        body = _http_health(proc)[1]
        state = body.get("orchestrator", {}).get("overall_state", "?")
        if state != "healthy":
            parts = {
                name: (entry.get("state"), entry.get("error_message"))
                for name, entry in body.get("components", {}).items()
                if entry.get("state") != "healthy"
            }
            lines.append(f"{proc.service}: {state} {parts}")
    return "; ".join(lines)


Bar = tuple[str, int]


async def _drained(
    client: aioredis.Redis, system: System
) -> tuple[Outcome, int, set[Bar], set[Bar]]:
    """Once every group has caught up: the run's outcome, the CANDLE entries, and the
    distinct bars and feature rows (symbol, bar time) in Redis."""
    await wait_for(lambda: quiescent(client), timeout=120, message="drained", system=system)
    run = await outcome(client)
    candles = await events(client, EventType.CANDLE)
    features = await events(client, EventType.FEATURES_READY)
    bars = {(c.data["symbol"], c.data["timestamp"]) for c in candles}
    rows = {(f.data["symbol"], f.data["timestamp"]) for f in features}
    return run, len(candles), bars, rows


@pytest.mark.timeout(300)
async def test_redis_restart_under_load_nothing_lost(
    redis_factory: Callable[..., RedisServer], tmp_path: Path, report: Report
) -> None:
    server = redis_factory(appendonly=True)
    system = System(base_env(server.url, **TRADING_ENV), tmp_path / "logs")
    client = aioredis.Redis.from_url(server.url)
    try:
        for name in ("portfolio", "execution", "risk", "strategy", "ml-service", "features"):
            system.start(name)
        await wait_for(lambda: client.exists("hean:events:CANDLE"), timeout=60, message="groups")
        md = system.start("market-data", REPLAY_SPEED=str(60 * 40), REPLAY_MAX_BARS=str(BARS))

        async def filling() -> bool:
            return int(await client.xlen("hean:events:ORDER_FILLED")) >= 1

        await wait_for(filling, timeout=120, message="first fills", system=system)
        await client.aclose()
        down_at = time.monotonic()
        server.stop()
        degraded = await wait_for(
            lambda: all(_state(p) in ("degraded", "unhealthy") for p in system.procs.values()),
            timeout=30,
            message="every service degraded while Redis is down",
            system=system,
        )
        states_down = {p.service: _state(p) for p in system.procs.values()}
        server.start()
        client = aioredis.Redis.from_url(server.url)
        try:
            back = await wait_for(
                lambda: all(_state(p) == "healthy" for p in system.procs.values()),
                timeout=60,
                message="every service healthy again",
                system=system,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_not_healthy(system)}") from None
        outage = time.monotonic() - down_at

        await wait_for(
            lambda: "replay finished" in md.log_path.read_text(errors="replace"),
            timeout=180,
            message="replay end",
            system=system,
        )
        run, candles, bars, rows = await _drained(client, system)
    finally:
        codes = system.stop_all()
        await client.aclose()
    expected_rows = 2 * (BARS - WARMUP_BARS + 1)
    problems = invariants(run) + pnl_consistent(run)
    report.add(
        "Redis faults",
        f"- Redis (append-only, fsync always) stopped and restarted under load "
        f"({BARS} bars x 2 symbols at 40 bars/s, seven services): every service "
        f"reported degraded within {degraded:.1f} s ({states_down}); all healthy again "
        f"{back:.1f} s after Redis returned (outage {outage:.1f} s in all). Afterwards "
        f"{len(bars)} of {2 * BARS} bars in Redis ({candles - len(bars)} duplicate "
        f"entries), {len(rows)} of {expected_rows} feature rows, {len(run.approved)} orders, "
        f"{len(run.fill_ids)} fills, nothing pending; invariants broken: {problems or 'none'}.",
    )
    assert len(bars) == 2 * BARS
    assert len(rows) == expected_rows
    assert problems == []
    assert all(c == 0 for c in codes.values()), codes


async def _outage(
    redis_factory: Callable[..., RedisServer], tmp_path: Path, report: Report, recover: bool
) -> None:
    server = redis_factory(appendonly=True)
    env = base_env(server.url, **TRADING_ENV, EVENT_MAX_QUEUE_SIZE="200")
    system = System(env, tmp_path / "logs")
    client = aioredis.Redis.from_url(server.url)
    try:
        # REPLAY_MAX_OUTBOX above the bound: the feed publishes until the outbox is full.
        md = system.start(
            "market-data",
            REPLAY_SPEED=str(60 * 100),
            REPLAY_LOOP="true",
            REPLAY_MAX_OUTBOX="100000",
            REPLAY_MAX_LAG="0",
        )

        async def ticking() -> bool:
            return int(await client.xlen("hean:events:TICK")) > 100

        await wait_for(ticking, timeout=60, message="ticks", system=system)
        await client.aclose()
        server.stop()
        full = await wait_for(
            lambda: "Queue is full" in md.log_path.read_text(errors="replace"),
            timeout=60,
            message="'Queue is full' in the log",
            system=system,
        )
        await wait_for(lambda: _http_health(md)[0] == 503, timeout=10, message="503")
        code, body = _http_health(md)
        system.assert_alive()
        line = next(
            ln
            for ln in md.log_path.read_text(errors="replace").splitlines()
            if "Queue is full" in ln
        )
        if not recover:
            report.add(
                "Redis faults",
                f"- Redis down past the outbox bound (market-data, EVENT_MAX_QUEUE_SIZE=200): "
                f"'Queue is full' logged {full:.1f} s after Redis stopped "
                f"(`{line.strip()[:150]}`); /health answered {code} "
                f"`{body['orchestrator']['overall_state']}`; the process stayed up.",
            )
            assert body["orchestrator"]["overall_state"] == "unhealthy"
            return
        server.start()
        client = aioredis.Redis.from_url(server.url)
        before = int(await client.xlen("hean:events:TICK"))

        async def flowing() -> bool:
            return int(await client.xlen("hean:events:TICK")) > before + 100

        returned = time.monotonic()
        try:
            await wait_for(flowing, timeout=30, message="ticks after Redis returned", system=system)
            recovered = True
        except AssertionError:
            recovered = False
        report.add(
            "Redis faults",
            "- Redis back after an outage past the outbox bound (found by this suite: the "
            "replay used to stop for good on 'Queue is full'; fixed: market data pauses and "
            "resumes): ticks flowing again "
            + (
                f"{time.monotonic() - returned:.1f} s after Redis returned."
                if recovered
                else "never."
            )
            + " (`test_redis_faults.py::test_redis_down_past_outbox_bound_recovers_when_it_"
            "returns`)",
        )
        assert recovered
    finally:
        system.stop_all()
        await client.aclose()


@pytest.mark.timeout(120)
async def test_redis_down_past_outbox_bound_queue_full_unhealthy_no_crash(
    redis_factory: Callable[..., RedisServer], tmp_path: Path, report: Report
) -> None:
    await _outage(redis_factory, tmp_path, report, recover=False)


@pytest.mark.timeout(120)
async def test_redis_down_past_outbox_bound_recovers_when_it_returns(
    redis_factory: Callable[..., RedisServer], tmp_path: Path, report: Report
) -> None:
    await _outage(redis_factory, tmp_path, report, recover=True)


@pytest.mark.timeout(420)
async def test_redis_refusing_writes_by_turns_changes_no_decision(
    redis_factory: Callable[..., RedisServer], tmp_path: Path, report: Report
) -> None:
    """Redis at `maxmemory` with `noeviction`, going over and under the limit every few
    milliseconds (as when keys expire near the limit; here the limit itself is switched
    between 1 byte and none) for the whole replay: writes fail and succeed by turns in
    every service. Every bar and feature row reaches Redis, and the run decides, orders
    and fills exactly as a run without faults; nothing is left pending or dead-lettered."""
    server = redis_factory()
    ref, ref_took = await clean_run(server.url, tmp_path / "reference", bars=BARS)
    assert ref.approved, "the reference run must trade (thresholds too strict?)"
    client = aioredis.Redis.from_url(server.url)
    await client.flushall()
    system = System(base_env(server.url, **TRADING_ENV), tmp_path / "faults")
    churning = True
    swings = 0

    async def churn() -> None:
        nonlocal swings
        while churning:
            await client.config_set("maxmemory", 1)
            await asyncio.sleep(0.004)
            await client.config_set("maxmemory", 0)
            swings += 1
            await asyncio.sleep(0.004)

    try:
        await client.config_set("maxmemory-policy", "noeviction")
        # The services start under the refusals too: a component whose start is refused
        # starts again once Redis takes writes (the portfolio then rebuilds from fills
        # already made, and publishes the rebuilt P&L at once).
        t0 = time.monotonic()
        task = asyncio.create_task(churn())
        try:
            start_all(system, 1)
            await wait_groups(client, system)
            md = system.start("market-data", REPLAY_SPEED="0", REPLAY_MAX_BARS=str(BARS))
            await wait_for(
                lambda: replay_finished(md), timeout=300, message="replay end", system=system
            )
        finally:
            churning = False
            await task
        churned = time.monotonic() - t0
        run, _, bars, rows = await _drained(client, system)
    finally:
        codes = system.stop_all()
        await client.aclose()
    told = sorted(p.service for p in system.procs.values() if _said_refused(p))
    again = sorted(p.service for p in system.procs.values() if _started_again(p))
    expected_rows = 2 * (BARS - WARMUP_BARS + 1)
    problems = invariants(run) + pnl_consistent(run)
    diffs = differences(ref, run)
    report.add(
        "Redis faults",
        f"- Redis refusing writes by turns (`maxmemory` switched between 1 byte and none every "
        f"4 ms, `noeviction`) for the whole replay ({BARS} bars x 2 symbols as fast as the "
        f"consumers keep up, all eight services; {churned:.0f} s, {swings} swings; the "
        f"reference run without faults took {ref_took:.0f} s): services that logged the "
        f"refusals: {', '.join(told) or 'none'}; services started under them, with a "
        f"component started again: {', '.join(again) or 'none'}. Afterwards {len(bars)} of "
        f"{2 * BARS} bars and "
        f"{len(rows)} of {expected_rows} feature rows in Redis; {len(run.signals)} signals, "
        f"{len(run.approved)} orders and {len(run.fill_ids)} fills against the reference's "
        f"{len(ref.signals)} / {len(ref.approved)} / {len(ref.fill_ids)}; {run.dlq} dead "
        f"letters; differences from the reference: {diffs or 'none'}; invariants broken: "
        f"{problems or 'none'}. (Before 2026-12-01 the bus dropped a producer's refused event "
        "and left a handler's input to a reclaim 30 s later; "
        "`test_redis_faults.py::test_redis_refusing_writes_by_turns_changes_no_decision`)",
    )
    assert swings > 100 and told, "the writes were not refused"
    assert len(bars) == 2 * BARS
    assert len(rows) == expected_rows
    assert run.dlq == 0
    assert diffs == []
    assert problems == []
    assert all(c == 0 for c in codes.values()), codes


def _said_refused(proc: Proc) -> bool:
    return "Redis refuses writes for now" in proc.log_path.read_text(errors="replace")


def _started_again(proc: Proc) -> bool:
    """A component of `proc` whose start Redis refused, started again later."""
    return "(Redis unavailable: trying again)" in proc.log_path.read_text(errors="replace")
