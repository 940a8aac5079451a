"""Soak: the whole system (eight services, paper exchange) under a sustained tick rate for
a fixed time: market-data replays in a loop (REPLAY_LOOP=true) at a fixed REPLAY_SPEED.

Measured and checked:
- RSS of every service process after the warm-up and at the end (psutil), sampled on the
  way: growth per service;
- retention: with EVENT_STREAM_MAXLEN small, the high-frequency streams (TICK, CANDLE,
  FEATURES_READY, ML_PREDICTION) stay below about twice it (`MAXLEN ~` trims whole
  macro-nodes), while SIGNAL, ORDER_* and PNL_UPDATE keep every entry they were given
  (XLEN == XINFO STREAM entries-added);
- no growing backlog: the sum of lag and pending over every consumer group is sampled
  throughout and must not trend up; after the replay stops everything drains at once.

CI: about 50 s of steady state. HEAN_CHAOS_LONG=1: 10 minutes.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from hean.core.event_streams import stream_key
from hean.core.types import EventType
from tests.chaos.conftest import LONG, Report
from tests.chaos.harness import (
    START_ORDER,
    TRADING_ENV,
    WARMUP,
    System,
    base_env,
    group_states,
    invariants,
    outcome,
    quiescent,
    start_all,
    wait_for,
    wait_groups,
)

SOAK_S = 600.0 if LONG else 50.0
BARS_PER_S = 25  # per symbol: 2 x (4 TICK + 1 CANDLE) x 25 = 250 events/s from market-data
MAXLEN = 2000
LOOP_BARS = 500  # bars per pass after the warm-up: the replay wraps every 20 s
SAMPLE_S = 2.0
HIGH_FREQUENCY = (
    EventType.TICK,
    EventType.CANDLE,
    EventType.FEATURES_READY,
    EventType.ML_PREDICTION,
)
KEPT = (
    EventType.SIGNAL,
    EventType.ORDER_REQUEST,
    EventType.ORDER_APPROVED,
    EventType.ORDER_PLACED,
    EventType.ORDER_FILLED,
    EventType.PNL_UPDATE,
)
#: RSS may grow by this much over the soak (allocator warm-up, caches filling): beyond it
#: memory is not flat.
RSS_GROWTH_LIMIT_MB = 40.0 if LONG else 25.0


def _slope(values: list[float]) -> float:
    """Least-squares slope per sample."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


async def _backlog(client: aioredis.Redis) -> tuple[int, int]:
    states = await group_states(client)
    lag = sum(max(s["lag"], 0) for s in states.values())
    pending = sum(s["pending"] for s in states.values())
    return lag, pending


@pytest.mark.timeout(SOAK_S + 240)
async def test_soak_memory_flat_streams_bounded_no_backlog(
    redis_url: str, tmp_path: Path, report: Report
) -> None:
    env = base_env(
        redis_url,
        **{**TRADING_ENV, "REPLAY_LOOP": "true"},
        REPLAY_SPEED=str(60 * BARS_PER_S),
        REPLAY_MAX_BARS=str(WARMUP + LOOP_BARS),
        EVENT_STREAM_MAXLEN=str(MAXLEN),
        HEALTH_INTERVAL_S="1",
        HEALTH_TTL_S="5",
    )
    client = aioredis.Redis.from_url(redis_url)
    system = System(env, tmp_path / "logs")
    rss: dict[str, list[float]] = {}
    samples: list[tuple[float, int, int]] = []  # (t, lag, pending)
    gateway_codes: dict[int, int] = {}
    try:
        start_all(system, 1)
        await wait_groups(client, system)
        system.start("market-data")

        async def warmed_up() -> bool:
            # trading, and the warm-up burst (WARMUP bars as fast as possible) absorbed
            if int(await client.xlen(stream_key(EventType.ORDER_FILLED))) < 2:
                return False
            lag, pending = await _backlog(client)
            return lag + pending < 100

        await wait_for(warmed_up, timeout=120, message="warm-up done", system=system)
        ticks_before: Any = await client.xinfo_stream(stream_key(EventType.TICK))
        gateway = f"http://127.0.0.1:{system.gateway_port}/health"
        started = time.monotonic()
        for proc in system.procs.values():
            rss[proc.service] = [proc.rss_mb()]
        async with aiohttp.ClientSession() as session:
            next_sample = started
            while time.monotonic() - started < SOAK_S:
                system.assert_alive()
                lag, pending = await _backlog(client)
                samples.append((time.monotonic() - started, lag, pending))
                for proc in system.procs.values():
                    rss[proc.service].append(proc.rss_mb())
                try:
                    async with session.get(gateway) as resp:
                        await resp.read()
                        gateway_codes[resp.status] = gateway_codes.get(resp.status, 0) + 1
                except aiohttp.ClientError:
                    gateway_codes[0] = gateway_codes.get(0, 0) + 1
                next_sample += SAMPLE_S  # a sampling interval, not a wait for a condition
                await asyncio.sleep(max(0.0, next_sample - time.monotonic()))
        soak_s = time.monotonic() - started
        for proc in system.procs.values():
            rss[proc.service].append(proc.rss_mb())
        xlen: dict[str, int] = {}
        added: dict[str, int] = {}
        for etype in (*HIGH_FREQUENCY, *KEPT):
            info: Any = await client.xinfo_stream(stream_key(etype))
            xlen[etype.value] = int(info["length"])
            added[etype.value] = int(info["entries-added"])
        ticks_total = added[EventType.TICK.value]
        soak_ticks = ticks_total - int(ticks_before["entries-added"])
        md = system.instances("market-data")[0]
        md.popen.terminate()
        md.popen.wait(timeout=20)
        system.procs.pop(md.instance)
        drain_s = await wait_for(
            lambda: quiescent(client), timeout=120, message="drained after the soak", system=system
        )
        run = await outcome(client)
        dlq = int(await client.xlen("hean:dlq"))
    finally:
        codes = system.stop_all()
        await client.aclose()

    third = max(1, len(samples) // 3)
    backlog = [float(lag + pending) for _t, lag, pending in samples]
    first_mean = statistics.fmean(backlog[:third])
    last_mean = statistics.fmean(backlog[-third:])
    slope_per_s = _slope(backlog) / SAMPLE_S
    growth = {s: v[-1] - v[0] for s, v in rss.items()}
    rows = [
        (
            service,
            f"{v[0]:.1f}",
            f"{max(v):.1f}",
            f"{v[-1]:.1f}",
            f"{growth[service]:+.1f}",
            f"{100 * growth[service] / v[0]:+.1f}%",
            f"{(v[-1] - v[len(v) // 2]):+.1f}",
        )
        for service, v in sorted(rss.items(), key=lambda kv: START_ORDER.index(kv[0]))
    ]
    problems = invariants(run)
    report.add(
        "Soak",
        f"All eight services (paper exchange), market-data replaying {LOOP_BARS} bars x 2 "
        f"symbols in a loop (`REPLAY_LOOP=true`, `REPLAY_SPEED={60 * BARS_PER_S}`: "
        f"{BARS_PER_S} bars/s per symbol, {2 * 4 * BARS_PER_S} TICK/s + "
        f"{2 * BARS_PER_S} CANDLE/s), `EVENT_STREAM_MAXLEN={MAXLEN}`, for {soak_s:.0f} s "
        f"after the warm-up ({'long' if LONG else 'CI'} variant; `HEAN_CHAOS_LONG=1`: 600 s). "
        f"{ticks_total} TICKs published in all, {soak_ticks} during the soak "
        f"({soak_ticks / soak_s:.0f}/s), {len(run.approved)} orders, "
        f"{len(run.fill_ids)} fills; the gateway's /health answered {gateway_codes} "
        "(status: count) to one request per sample.",
    )
    report.add("Soak", "")
    report.add("Soak", "RSS (MB) of each service process, sampled every 2 s:")
    report.add("Soak", "")
    report.table(
        "Soak",
        ("service", "after warm-up", "max", "end", "growth", "growth %", "second half"),
        [tuple(r) for r in rows],
    )
    report.table(
        "Soak",
        ("stream", "XLEN at the end", "entries added", "bound"),
        [
            (
                name,
                xlen[name],
                added[name],
                f"< {2 * MAXLEN} (trimmed)"
                if name in {e.value for e in HIGH_FREQUENCY}
                else "kept: XLEN == added",
            )
            for name in xlen
        ],
    )
    report.add(
        "Soak",
        f"Backlog (lag + pending summed over every consumer group), {len(samples)} samples: "
        f"mean {first_mean:.1f} in the first third, {last_mean:.1f} in the last third, "
        f"max {max(backlog):.0f}, trend {slope_per_s:+.2f} entries/s; everything drained "
        f"{drain_s:.1f} s after market-data stopped; {dlq} dead letters; invariants "
        f"broken: {problems or 'none'}.",
    )

    for etype in HIGH_FREQUENCY:
        assert added[etype.value] > MAXLEN, f"{etype.value}: too few entries to test trimming"
        assert xlen[etype.value] < 2 * MAXLEN, (etype.value, xlen[etype.value])
    for etype in KEPT:
        assert xlen[etype.value] == added[etype.value], (etype.value, xlen, added)
    assert xlen[EventType.ORDER_FILLED.value] > 0
    assert last_mean <= max(2 * first_mean, 100.0), backlog
    assert drain_s < 30
    assert dlq == 0
    assert problems == [], problems
    for service, mb in growth.items():
        assert mb < RSS_GROWTH_LIMIT_MB, f"{service} grew {mb:.1f} MB: {rss[service]}"
    assert all(code == 0 for code in codes.values()), codes
