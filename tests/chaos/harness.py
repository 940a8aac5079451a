"""Process harness of the reliability suite: real service processes on a real redis-server.

`System` starts `python -m hean.<pkg>` children with their own health ports and log files,
kills them (SIGKILL), restarts them, and reads what they left in Redis: every stream, every
consumer group's lag and pending count, and the health snapshots.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psutil  # type: ignore[import-untyped]
import redis.asyncio as aioredis

from hean.core.event_streams import STREAM_PREFIX, decode_entry, stream_key
from hean.core.types import Event, EventType
from tests.conftest import free_port

MODULES: Mapping[str, str] = {
    "api-gateway": "hean.gateway",
    "portfolio": "hean.portfolio",
    "execution": "hean.execution",
    "risk": "hean.risk",
    "strategy": "hean.strategy",
    "ml-service": "hean.ml",
    "features": "hean.features",
    "market-data": "hean.market_data",
}
#: Downstream first, market data last (as `hean up` starts them).
START_ORDER: tuple[str, ...] = tuple(MODULES)

SYMBOLS = ("BTC/USDT", "ETH/USDT")
WARMUP = 240

#: Settings that make a replayed run trade, deterministically in what it decides: low
#: strategy thresholds, no wall-clock age filter, a notional of 1% of equity (the Kelly cap
#: binds; the prior payoff never moves) rounded to a 0.001 step, so every order is 0.002 in
#: every run, and limits that never bind (so no approval depends on fill timing).
TRADING_ENV: Mapping[str, str] = {
    "SYMBOLS": ",".join(SYMBOLS),
    "REPLAY_LOOP": "false",
    "REPLAY_WARMUP_BARS": str(WARMUP),
    "STRATEGY_BUY_THRESHOLD": "0.52",
    "STRATEGY_SELL_THRESHOLD": "0.48",
    "STRATEGY_COOLDOWN_BARS": "1",
    "STRATEGY_TREND_FILTER": "false",
    "STRATEGY_MAX_AGE_MS": "0",
    "KELLY_FRACTION": "1",
    "KELLY_MAX_FRACTION": "0.01",
    "KELLY_PRIOR_TRADES": "1000000",
    "MAX_POSITION_SIZE": "100000",
    "ORDER_SIZE_STEP": "0.001",
    "DAILY_DRAWDOWN_LIMIT": "0.5",
    "PAPER_MARKETS": orjson.dumps(
        {s: {"tick_size": "0.1", "qty_step": "0.001", "min_qty": "0.001"} for s in SYMBOLS}
    ).decode(),
    "PNL_PUBLISH_INTERVAL_MS": "0",
}

#: Fast failure detection for tests: short blocks, quick health, quick takeover.
FAST_ENV: Mapping[str, str] = {
    "EVENT_BLOCK_MS": "50",
    "EVENT_CLAIM_IDLE_MS": "1500",
    "EVENT_CLAIM_INTERVAL_MS": "300",
    "EVENT_RETRY_DELAY_MS": "100",
    "EVENT_RECONNECT_MAX_S": "0.5",
    "HEALTH_INTERVAL_S": "0.3",
    "HEALTH_TTL_S": "2",
    "LOG_LEVEL": "INFO",
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class Proc:
    service: str
    instance: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    health_port: int
    started_at: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        return f"{self.service}/{self.instance}"

    def rss_mb(self) -> float:
        return float(psutil.Process(self.popen.pid).memory_info().rss) / 1e6


class System:
    """The services of one test run, as child processes."""

    def __init__(self, env: Mapping[str, str], logs: Path) -> None:
        self.env = dict(env)
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Proc] = {}  # by instance
        self.dead: list[Proc] = []
        self.gateway_port = free_port()
        self._counter = 0

    def start(self, service: str, instance: str | None = None, **extra: str) -> Proc:
        self._counter += 1
        instance = instance or f"{service}-{self._counter}"
        port = free_port()
        env = dict(self.env)
        env.update(
            HEALTH_HOST="127.0.0.1",
            HEALTH_PORT=str(port),
            INSTANCE_ID=instance,
            GATEWAY_HOST="127.0.0.1",
            GATEWAY_PORT=str(self.gateway_port),
        )
        env.update(extra)
        log_path = self.logs / f"{instance}.log"
        log = log_path.open("ab")
        popen = subprocess.Popen(
            [sys.executable, "-m", MODULES[service]],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        proc = Proc(service, instance, popen, log_path, port)
        self.procs[instance] = proc
        return proc

    def instances(self, service: str) -> list[Proc]:
        return [p for p in self.procs.values() if p.service == service]

    def kill(self, proc: Proc) -> None:
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(timeout=10)
        self.procs.pop(proc.instance, None)
        self.dead.append(proc)

    def assert_alive(self) -> None:
        for proc in self.procs.values():
            code = proc.popen.poll()
            if code is not None:
                raise AssertionError(f"{proc.label} exited with {code}:\n{tail(proc.log_path)}")

    def stop_all(self, timeout: float = 20.0) -> dict[str, int | None]:
        """SIGTERM in reverse start order; returns each instance's exit status."""
        ordered = sorted(
            self.procs.values(), key=lambda p: START_ORDER.index(p.service), reverse=True
        )
        for proc in ordered:
            if proc.popen.poll() is None:
                proc.popen.terminate()
        codes: dict[str, int | None] = {}
        for proc in ordered:
            try:
                codes[proc.instance] = proc.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
                codes[proc.instance] = None
        return codes

    async def stacks(self) -> str:
        """Every running service's threads' stacks (SIGUSR1: faulthandler, see
        `hean.core.service`), as the tails of their logs: what a test that timed out was
        waiting on."""
        running = [p for p in self.procs.values() if p.popen.poll() is None]
        for proc in running:
            proc.popen.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.5)
        return "".join(f"\n--- {p.label}:\n{tail(p.log_path, 2500)}" for p in running)

    def log_paths(self) -> list[Path]:
        return sorted(self.logs.glob("*.log"))

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_paths())


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEAN_", "PYTEST_"))}
    for name in ("SERVICE_NAME", "INSTANCE_ID", "HEALTH_PORT", "EXCHANGE", "API_TOKEN"):
        env.pop(name, None)
    env.update(FAST_ENV)
    env["REDIS_URL"] = redis_url
    env.update(extra)
    return env


# --- reading Redis ----------------------------------------------------------------------------


async def wait_for(
    predicate: Any, *, timeout: float, message: str, system: System | None = None
) -> float:
    """Poll `predicate` (sync or async) until true; returns seconds waited."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if system is not None:
            system.assert_alive()
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            where = await system.stacks() if system is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}{where}")
        await asyncio.sleep(0.05)


async def group_states(client: aioredis.Redis) -> dict[tuple[str, str], dict[str, int]]:
    """(stream, group) -> {lag, pending} for every consumer group of every event stream."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    keys = [k async for k in client.scan_iter(match=f"{STREAM_PREFIX}*", _type="stream")]
    keys += [k async for k in client.scan_iter(match="hean:risk:commands", _type="stream")]
    for key in keys:
        name = key.decode() if isinstance(key, bytes) else str(key)
        groups: Any = await client.xinfo_groups(name)
        for g in groups:
            lag = g.get("lag")
            out[(name, g["name"].decode())] = {
                "lag": int(lag) if lag is not None else -1,
                "pending": int(g["pending"]),
            }
    return out


async def quiescent(client: aioredis.Redis) -> bool:
    """Every group of every stream has read everything and has nothing pending."""
    states = await group_states(client)
    return bool(states) and all(s["lag"] == 0 and s["pending"] == 0 for s in states.values())


async def events(client: aioredis.Redis, etype: EventType) -> list[Event]:
    key = stream_key(etype)
    out: list[Event] = []
    start = "-"
    while True:
        batch: Any = await client.xrange(key, min=start, count=2000)
        if not batch:
            return out
        for _entry_id, fields in batch:
            out.append(decode_entry(key, fields))
        last = batch[-1][0].decode()
        start = "(" + last


async def health_states(client: aioredis.Redis) -> dict[str, str]:
    """instance -> overall_state of every live health snapshot."""
    out: dict[str, str] = {}
    async for key in client.scan_iter(match="hean:health:*"):
        raw = await client.get(key)
        if raw is not None:
            snap = orjson.loads(raw)
            out[snap["instance"]] = snap["health"]["orchestrator"]["overall_state"]
    return out


async def health_snapshot(client: aioredis.Redis, service: str, instance: str) -> dict[str, Any]:
    raw = await client.get(f"hean:health:{service}:{instance}")
    return dict(orjson.loads(raw)) if raw is not None else {}


async def snapshot_raw(client: aioredis.Redis) -> list[bytes]:
    out: list[bytes] = []
    async for key in client.scan_iter(match="hean:health:*"):
        raw = await client.get(key)
        if raw is not None:
            out.append(raw if isinstance(raw, bytes) else str(raw).encode())
    return out


# --- whole runs ------------------------------------------------------------------------------


def start_all(system: System, ml_replicas: int) -> None:
    """Every service but market-data (started last, once the groups exist)."""
    for service in START_ORDER:
        if service == "market-data":
            continue
        for _ in range(ml_replicas if service == "ml-service" else 1):
            system.start(service)


async def wait_groups(client: aioredis.Redis, system: System) -> None:
    # Every consumer group exists before market-data publishes (as `hean up` guarantees).
    async def ready() -> bool:
        groups = await group_states(client)
        wanted = {
            (stream_key(EventType.CANDLE), "features"),
            (stream_key(EventType.FEATURES_READY), "ml-service"),
            (stream_key(EventType.ML_PREDICTION), "strategy"),
            (stream_key(EventType.SIGNAL), "risk"),
            (stream_key(EventType.ORDER_APPROVED), "execution"),
            (stream_key(EventType.ORDER_FILLED), "portfolio"),
        }
        return wanted <= set(groups)

    await wait_for(ready, timeout=60, message="consumer groups", system=system)


async def late_predictions(client: aioredis.Redis) -> list[tuple[str, int, int]]:
    """ML_PREDICTIONs, in stream order, for a bar before one already predicted for their
    symbol: (symbol, bar, newest bar before it). A repeat of the same bar (at-least-once)
    is not late."""
    newest: dict[str, int] = {}
    late: list[tuple[str, int, int]] = []
    for event in await events(client, EventType.ML_PREDICTION):
        symbol, bar = str(event.data["symbol"]), int(event.data["timestamp"])
        if bar < newest.get(symbol, bar):
            late.append((symbol, bar, newest[symbol]))
        newest[symbol] = max(newest.get(symbol, bar), bar)
    return late


def replay_finished(proc: Proc) -> bool:
    return "replay finished" in proc.log_path.read_text(errors="replace")


async def settle(client: aioredis.Redis, system: System, md: Proc) -> float:
    await wait_for(lambda: replay_finished(md), timeout=300, message="replay end", system=system)
    return await wait_for(
        lambda: quiescent(client), timeout=120, message="all groups drained", system=system
    )


async def clean_run(
    redis_url: str, logs: Path, *, bars: int, ml_replicas: int = 1
) -> tuple[Outcome, float]:
    """A run without faults: every service, `bars` bars replayed as fast as the consumers
    keep up (REPLAY_SPEED=0). The outcome and how long it took (s)."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    system = System(base_env(redis_url, **TRADING_ENV), logs)
    try:
        t0 = time.monotonic()
        start_all(system, ml_replicas)
        await wait_groups(client, system)
        md = system.start("market-data", REPLAY_SPEED="0", REPLAY_MAX_BARS=str(bars))
        await settle(client, system, md)
        took = time.monotonic() - t0
        return await outcome(client), took
    finally:
        system.stop_all()
        await client.aclose()


# --- the outcome of a run ---------------------------------------------------------------------

COMPARED = (
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
class Outcome:
    """What a trading run left in Redis, reduced to what must match between runs."""

    signals: list[str]
    approved: dict[str, tuple[str, str, Decimal]]  # order id -> (symbol, side, size)
    placed: dict[str, int]  # client order id -> times placed
    filled_qty: dict[str, Decimal]  # order id -> total filled
    fill_ids: list[str]
    positions: dict[str, Decimal]
    final_pnl: dict[str, Any]
    recomputed_pnl: Decimal
    events_checked: int
    dlq: int
    trail: dict[str, list[str]]  # order id -> what happened to it, when it did not fill
    net_fills: dict[str, Decimal]
    #: ML_PREDICTIONs after a later bar's of their symbol (see `late_predictions`).
    late_predictions: list[tuple[str, int, int]]


async def outcome(client: aioredis.Redis) -> Outcome:
    signals = await events(client, EventType.SIGNAL)
    approved = await events(client, EventType.ORDER_APPROVED)
    placed = await events(client, EventType.ORDER_PLACED)
    fills = await events(client, EventType.ORDER_FILLED)
    pnls = await events(client, EventType.PNL_UPDATE)
    ticks = await events(client, EventType.TICK)
    placed_count: dict[str, int] = {}
    for e in placed:
        cid = str(e.data["client_order_id"])
        placed_count[cid] = placed_count.get(cid, 0) + 1
    filled: dict[str, Decimal] = {}
    seen_fill: set[str] = set()
    cash = Decimal(0)
    fees = Decimal(0)
    qty: dict[str, Decimal] = {}
    for f in fills:
        fid = str(f.data["fill_id"])
        if fid in seen_fill:
            continue  # a duplicate entry (an interrupted pipeline resent): counted once
        seen_fill.add(fid)
        oid = str(f.data["order_id"])
        q = Decimal(f.data["filled_qty"])
        filled[oid] = filled.get(oid, Decimal(0)) + q
        sign = 1 if str(f.data["side"]) == "BUY" else -1
        qty[f.data["symbol"]] = qty.get(f.data["symbol"], Decimal(0)) + sign * q
        cash -= sign * q * Decimal(f.data["fill_price"])
        fees += Decimal(f.data["fee"])
    marks: dict[str, Decimal] = {}
    for t in ticks:
        marks[t.data["symbol"]] = Decimal(t.data["price"])
    held = sum((q * marks.get(s, Decimal(0)) for s, q in qty.items()), Decimal(0))
    final = dict(pnls[-1].data) if pnls else {}
    positions = {
        s: Decimal(p["qty"])
        for s, p in (final.get("positions") or {}).items()
        if Decimal(p["qty"]) != 0
    }
    trail: dict[str, list[str]] = {}
    for etype in (EventType.ORDER_PLACED, EventType.ORDER_CANCELLED, EventType.ORDER_REJECTED):
        for e in await events(client, etype):
            oid = str(e.data.get("order_id"))
            trail.setdefault(oid, []).append(f"{etype.value}: {e.data.get('reason', '')}")
    total = 0
    for etype in COMPARED:
        total += int(await client.xlen(stream_key(etype)))
    return Outcome(
        signals=sorted(e.event_id for e in signals),
        approved={
            str(e.data["order_id"]): (
                str(e.data["symbol"]),
                str(e.data["side"]),
                Decimal(e.data["size"]),
            )
            for e in approved
        },
        placed=placed_count,
        filled_qty=filled,
        fill_ids=[str(f.data["fill_id"]) for f in fills],
        positions=positions,
        final_pnl=final,
        recomputed_pnl=cash + held - fees,
        events_checked=int(total),
        dlq=int(await client.xlen("hean:dlq")),
        trail={k: v for k, v in trail.items() if k not in filled},
        net_fills=qty,
        late_predictions=await late_predictions(client),
    )


def differences(ref: Outcome, run: Outcome) -> list[str]:
    """How a run's decisions differ from the reference run's (empty when they match)."""
    problems: list[str] = []
    if ref.signals != run.signals:
        missing = sorted(set(ref.signals) - set(run.signals))
        extra = sorted(set(run.signals) - set(ref.signals))
        problems.append(
            f"{len(missing)} signals missing {missing[:5]}, {len(extra)} extra {extra[:5]}"
        )
    if ref.approved != run.approved:
        missing = sorted(set(ref.approved) - set(run.approved))
        extra = sorted(set(run.approved) - set(ref.approved))
        gone = [(o, ref.approved[o]) for o in missing[:5]]
        added = [(o, run.approved[o]) for o in extra[:5]]
        problems.append(
            f"{len(missing)} approved orders missing {gone}, {len(extra)} extra {added}"
        )
    unfilled = sorted(set(ref.filled_qty) & set(run.approved) - set(run.filled_qty))
    if unfilled:
        reasons = sorted({r for oid in unfilled for r in run.trail.get(oid, ["no event"])})
        problems.append(f"{len(unfilled)} orders filled in the reference did not fill: {reasons}")
    if ref.positions != run.positions:
        problems.append(f"positions {ref.positions} vs {run.positions}")
    return problems


def invariants(run: Outcome) -> list[str]:
    """What must hold in every run, faults or not: nothing doubled, nothing silently lost."""
    problems: list[str] = []
    for oid, (_s, _side, size) in run.approved.items():
        filled = run.filled_qty.get(oid)
        if filled is None and not run.trail.get(oid):
            problems.append(f"order {oid} approved, then nothing: no fill, no rejection")
        elif filled is not None and filled != size:
            problems.append(f"order {oid} of size {size} filled {filled}")
    doubled = {c: n for c, n in run.placed.items() if n != 1}
    if doubled:
        problems.append(f"client order ids placed more than once: {doubled}")
    if len(set(run.fill_ids)) != len(run.fill_ids):
        problems.append("a fill id appears twice in ORDER_FILLED")
    if run.positions != {s: q for s, q in run.net_fills.items() if q != 0}:
        problems.append(f"positions {run.positions} != net of fills {run.net_fills}")
    return problems


def pnl_consistent(run: Outcome) -> list[str]:
    """The portfolio's final P&L equals an independent recomputation from the fills."""
    if not run.final_pnl:
        return ["no PNL_UPDATE"]
    reported = Decimal(run.final_pnl["total_pnl"])
    if abs(reported - run.recomputed_pnl) > Decimal("0.000001"):
        return [f"total_pnl {reported} != recomputed {run.recomputed_pnl}"]
    return []


def streams_of(types: Iterable[EventType]) -> list[str]:
    return [stream_key(t) for t in types]
