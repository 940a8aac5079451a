"""SIGKILL of every service in turn, mid-run, then restart: nothing lost, nothing doubled.

Two runs of the whole system (eight services, paper exchange) replay the same slice of the
bundled BTC file for two symbols: a clean reference run, then a run in which each service
is SIGKILLed and restarted in turn, as a new instance, while bars are still being replayed
(ml-service while it holds an unacked entry, which its replacement must take over before
anything newer; killing one of three replicas is `test_replica_kill.py`). Both must end
with the same signals, the same approved orders (id, side, size), every order filled
exactly its size, no client order id placed twice, no fill id twice, the same positions, a
final P&L equal to an independent recomputation from the fills, no prediction made after
a later bar's (strategy would drop it as stale), and no entry pending or unread in any
consumer group.

Fill prices are not compared between the runs: the paper exchange fills at the last price
execution has seen, a race between the TICK and ORDER_APPROVED streams that exists in clean
runs too. Sizes do not depend on it (the notional is fixed by MAX_POSITION_SIZE and rounded
to a 0.001 step).
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from hean.core.event_streams import stream_key
from hean.core.types import EventType
from tests.chaos.conftest import LONG, Report
from tests.chaos.harness import (
    TRADING_ENV,
    WARMUP,
    Proc,
    System,
    base_env,
    clean_run,
    differences,
    events,
    group_states,
    health_snapshot,
    invariants,
    outcome,
    pnl_consistent,
    replay_finished,
    settle,
    start_all,
    tail,
    wait_for,
    wait_groups,
)

PACED_BARS = 1500 if LONG else 700
BARS = WARMUP + PACED_BARS
#: Bars per second after the warm-up in the fault run (REPLAY_SPEED is x real time, 1m bars).
BARS_PER_S = 25
#: market-data first (a restarted replay starts its file again: the sooner, the shorter),
#: then downstream to upstream.
KILL_ORDER = (
    "market-data",
    "api-gateway",
    "portfolio",
    "execution",
    "risk",
    "strategy",
    "ml-service",
    "features",
)


async def _healthy(client: aioredis.Redis, proc: Proc) -> bool:
    snap = await health_snapshot(client, proc.service, proc.instance)
    return bool(snap) and snap["health"]["orchestrator"]["overall_state"] == "healthy"


async def _holding(client: aioredis.Redis, consumer: str, *, within_s: float) -> int:
    """How many FEATURES_READY entries `consumer` holds unacked, polling until it holds one
    (or `within_s` passes: then 0)."""
    deadline = time.monotonic() + within_s
    while True:
        info = await client.xpending(stream_key(EventType.FEATURES_READY), "ml-service")
        held = {c["name"].decode(): int(c["pending"]) for c in info["consumers"]}
        if held.get(consumer, 0) or time.monotonic() > deadline:
            return held.get(consumer, 0)
        await asyncio.sleep(0.001)


@pytest.mark.timeout(900 if LONG else 420)
async def test_kill_each_service_in_turn_matches_reference_run(
    redis_url: str, tmp_path: Path, report: Report
) -> None:
    ref, ref_took = await clean_run(redis_url, tmp_path / "reference", bars=BARS)
    assert ref.approved, "the reference run must trade (thresholds too strict?)"
    assert invariants(ref) == [] and pnl_consistent(ref) == []

    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    system = System(base_env(redis_url, **TRADING_ENV), tmp_path / "faults")
    recoveries: list[tuple[str, str, str, str, str]] = []
    try:
        start_all(system, 1)
        await wait_groups(client, system)
        speed = str(60 * BARS_PER_S)
        md = system.start("market-data", REPLAY_SPEED=speed, REPLAY_MAX_BARS=str(BARS))

        async def trading() -> bool:
            return int(await client.xlen(stream_key(EventType.ORDER_FILLED))) >= 2

        await wait_for(trading, timeout=120, message="first fills", system=system)
        for service in KILL_ORDER:
            victim = system.instances(service)[0]
            pending = 0
            if service == "ml-service":
                # Killed while it holds an entry (waiting up to 5 s for one), so that its
                # replacement, under a new name, must take that entry over before newer ones.
                pending = await _holding(client, f"ml-service:{victim.instance}", within_s=5)
            killed_at = time.monotonic()
            system.kill(victim)
            extra = (
                {"REPLAY_SPEED": speed, "REPLAY_MAX_BARS": str(BARS)}
                if service == "market-data"
                else {}
            )
            new = system.start(service, **extra)
            if service == "market-data":
                md = new
            await wait_for(
                lambda new=new: _healthy(client, new),
                timeout=90,
                message=f"{new.label} healthy after the kill",
                system=system,
            )
            healthy_s = time.monotonic() - killed_at
            mid_run = not replay_finished(md)
            recoveries.append(
                (
                    service,
                    victim.instance,
                    f"{healthy_s:.1f}",
                    "yes" if mid_run else "no",
                    str(pending) if service == "ml-service" else "-",
                )
            )
        replay_running_at_last_kill = not replay_finished(md)
        drain_s = await settle(client, system, md)
        run = await outcome(client)
        states = await group_states(client)
        ledger = [k async for k in client.scan_iter(match="hean:execution:order:*")]
        candles = await events(client, EventType.CANDLE)
        bars = {(c.data["symbol"], c.data["timestamp"]) for c in candles}
        republished = len(candles) - len(bars)
    finally:
        codes = system.stop_all()
        await client.aclose()
    problems = invariants(run) + pnl_consistent(run)
    diffs = differences(ref, run)
    report.add(
        "Process kills",
        f"Replayed {BARS} bars x 2 symbols ({WARMUP} warm-up) through all eight services. "
        f"Reference run (no faults, REPLAY_SPEED=0): {ref_took:.0f} s, "
        f"{len(ref.signals)} signals, {len(ref.approved)} orders, "
        f"{len(ref.fill_ids)} fills, final P&L {Decimal(ref.final_pnl['total_pnl']):.4f} USDT.",
    )
    report.add(
        "Process kills",
        f"Fault run ({BARS_PER_S} bars/s after the warm-up; ml-service x1; killing one of three "
        "replicas is `test_replica_kill.py`): each service "
        "SIGKILLed in turn and restarted as a new instance. Recovery = kill to the new "
        "instance's health snapshot saying `healthy` (includes the process start).",
    )
    report.add("Process kills", "")
    report.table(
        "Process kills",
        ("service", "killed instance", "recovery s", "replay still running", "ml pending taken"),
        [tuple(r) for r in recoveries],
    )
    report.add(
        "Process kills",
        f"Fault run result: {len(run.signals)} signals, {len(run.approved)} orders, "
        f"{len(run.fill_ids)} fills, {len(run.placed)} client order ids placed "
        f"(max {max(run.placed.values(), default=0)} time each), {len(ledger)} ledger "
        f"entries, positions {dict((k, str(v)) for k, v in run.positions.items())}; "
        f"final P&L {Decimal(run.final_pnl.get('total_pnl', '0')):.4f} USDT (recomputed "
        f"from fills: {run.recomputed_pnl:.4f}); {len(states)} consumer groups, "
        f"{sum(s['pending'] for s in states.values())} entries pending, "
        f"{sum(max(s['lag'], 0) for s in states.values())} unread; {run.events_checked} "
        f"events in the compared streams; drained {drain_s:.1f} s after the replay ended. "
        f"Invariants broken: {problems or 'none'}. Differences from the reference run: "
        f"{diffs or 'none'}. Predictions made after a later bar's: "
        f"{len(run.late_predictions)}. CANDLEs republished by the restarted market-data "
        f"replay: {republished}.",
    )
    assert replay_running_at_last_kill, "the last kill came after the replay ended"
    assert all(r[3] == "yes" for r in recoveries)
    assert problems == [], problems
    late = run.late_predictions
    assert late == [], f"predictions made after a later bar's: {late}"
    assert diffs == [], diffs
    assert len(ledger) == len(run.approved)
    assert all(s["pending"] == 0 and s["lag"] == 0 for s in states.values())
    assert all(code == 0 for code in codes.values()), codes
    logs = "".join(tail(p.log_path, 10**7) for p in system.procs.values())
    assert "Traceback" not in logs
