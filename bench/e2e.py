"""End-to-end benchmark: every trading service as a process, replayed market data, tick -> fill.

Starts its own redis-server on a free port (no persistence), then `python -m hean.<pkg>` for
features, ml-service, strategy, risk, execution, portfolio and market-data (replay of the
bundled BTC file, paper exchange), each with HEALTH_PORT=0 and its own INSTANCE_ID, and
measures:

1. Latency at fixed replayed tick rates (default 100 and 1,000 ticks/s). market-data publishes
   each bar as four TICKs and then its CANDLE, back to back; features computes from the
   CANDLE, so the root of a fill's chain (its `correlation_id`) is that CANDLE, whose last
   TICK was published just before it. After the run the streams are read with XRANGE and
   every ORDER_FILLED is matched to its CANDLE and to that bar's last TICK; latencies are
   differences of envelope timestamps (creation times, ns, one clock). Per-hop latencies
   along CANDLE -> FEATURES_READY -> ML_PREDICTION -> SIGNAL -> ORDER_REQUEST ->
   ORDER_APPROVED -> ORDER_PLACED -> ORDER_FILLED show where the time goes. Five of those
   are stream hops (features, ml-service, strategy, risk, execution); risk sizes and
   decides an order in one handler, and execution places and fills it in one.
2. The floor: a bare redis-py chain of the same five hops (XADD -> XREADGROUP -> XADD to the
   next stream ... -> final XREADGROUP, each hop its own process, XADD and XACK in one
   MULTI), same Redis, same run, fed at the same tick rates.
   Beside it, the same chain with each relay an `EventBus` whose handler only publishes
   the next event (CANDLE -> FEATURES_READY -> ML_PREDICTION -> SIGNAL -> ORDER_APPROVED,
   measured in the last hop's handler): decoding, validation, dispatch, stamping,
   publish-once for the audited types and acks, and none of the services' work. Between
   the floor, this and the services' figure, the gap splits into what the bus costs and
   what the services' work (and the market data they take besides) costs.
3. The highest tick rate sustained without backlog growth through market-data -> features
   -> ml-service -> strategy (all seven services running): short probes step the rate up
   until one fails, then the best probe rate is held for the full window (default 60 s);
   if it fails, the previous one is tried. "Sustained": market-data reached 95% of the
   rate and the backlog (XINFO GROUPS lag + pending) of the groups features (CANDLE),
   ml-service (FEATURES_READY) and strategy (ML_PREDICTION) neither grew (least-squares
   slope under 2% of the input rate) nor ended above a quarter of a second of input
   (at least 50 entries): a standing backlog is latency the system did not keep up with.

Usage:
    .venv/bin/python bench/e2e.py                 # 5-7 minutes
    .venv/bin/python bench/e2e.py --quick         # ~3 minutes: shorter runs, 15 s window
    .venv/bin/python bench/e2e.py --skip-sustain  # latency and floor only
    .venv/bin/python bench/e2e.py --env EVENT_BATCH_SIZE=100 --ml-replicas 2

Prints figures only; not a test. Every process it starts is stopped on exit (Ctrl-C too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import itertools
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import redis

from hean.core.bus import EventBus
from hean.core.candles import bundled_data_path
from hean.core.event_streams import stream_key
from hean.core.features import FEATURE_NAMES
from hean.core.metrics import Metrics
from hean.core.service import event_loop_factory
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType

E = EventType
BAR_NS = 60 * 1_000_000_000  # the bundled file's 1-minute bars
TICKS_PER_BAR = 4
WARMUP_BARS = 240  # features emit nothing before this many bars
CONSUMERS = ("features", "ml", "strategy", "risk", "execution", "portfolio")
SIGNAL_PATH = ("features", "ml", "strategy")
HEALTH_NAMES = {
    "features": "features",
    "ml": "ml-service",
    "strategy": "strategy",
    "risk": "risk",
    "execution": "execution",
    "portfolio": "portfolio",
    "market_data": "market-data",
}
CHAIN = (
    E.CANDLE,
    E.FEATURES_READY,
    E.ML_PREDICTION,
    E.SIGNAL,
    E.ORDER_REQUEST,
    E.ORDER_APPROVED,
    E.ORDER_PLACED,
    E.ORDER_FILLED,
)
# The stream reads between a CANDLE's creation and its ORDER_FILLED's: features (CANDLE),
# ml-service (FEATURES_READY), strategy (ML_PREDICTION), risk (SIGNAL; ORDER_REQUEST and
# its decision are created in that handler), execution (ORDER_APPROVED; ORDER_PLACED and
# ORDER_FILLED are created in that handler).
HOPS = 5
SIGNAL_PATH_GROUPS = (
    (E.CANDLE, "features"),
    (E.FEATURES_READY, "ml-service"),
    (E.ML_PREDICTION, "strategy"),
)
OTHER_GROUPS = (
    (E.TICK, "risk"),
    (E.TICK, "execution"),
    (E.TICK, "portfolio"),
    (E.SIGNAL, "risk"),
    (E.ORDER_APPROVED, "execution"),
    (E.ORDER_FILLED, "portfolio"),
)

_children: list[subprocess.Popen[bytes]] = []
_mp_children: list[Any] = []


# --- processes --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in _children:
        _children.remove(proc)


def stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        stop_process(proc)


def cleanup() -> None:
    for child in list(_mp_children):
        if child.is_alive():
            child.terminate()
        child.join(5)
    _mp_children.clear()
    stop_all(list(reversed(_children)))


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def spawn(args: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen[bytes]:
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    # Own session: a Ctrl-C reaches only this script, which then stops everything in order.
    proc = subprocess.Popen(
        args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    _children.append(proc)
    return proc


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hean-e2e-redis-") as tmp:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", tmp]
        proc = spawn(args, dict(os.environ), None)
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        for _ in range(200):
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                break
            time.sleep(0.02)
        client.close()
        try:
            yield url, proc
        finally:
            stop_process(proc)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# --- the system -------------------------------------------------------------------------


@dataclass
class Config:
    url: str
    redis_proc: subprocess.Popen[bytes]
    symbols: list[str]
    ml_replicas: int
    extra_env: dict[str, str]
    logs: Path
    settle_s: float
    warmup_csv: Path
    paced_csv: Path


@dataclass
class System:
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]


def speed_for(rate: float, symbols: int) -> float:
    """REPLAY_SPEED for `rate` ticks/s: 4 ticks per bar per symbol, 60 s bars."""
    return rate / (TICKS_PER_BAR * symbols) * BAR_NS / 1e9


def base_env(cfg: Config) -> dict[str, str]:
    env = dict(
        os.environ,
        REDIS_URL=cfg.url,
        HEALTH_PORT="0",
        HEALTH_INTERVAL_S="1",
        LOG_LEVEL="WARNING",
        EVENT_STREAM_MAXLEN="2000000",  # nothing trimmed during a run: read it all after
        SYMBOLS=",".join(cfg.symbols),
        STRATEGY_BUY_THRESHOLD="0.5",
        STRATEGY_SELL_THRESHOLD="0.4999999",
        STRATEGY_COOLDOWN_BARS="0",
        STRATEGY_TREND_FILTER="false",
        STRATEGY_MAX_AGE_MS="0",
        STRATEGY_MAX_VOL_RATIO="0",
        DAILY_DRAWDOWN_LIMIT="0.99",
        MAX_POSITION_SIZE="1000000",
        MAX_LEVERAGE="100",
        PNL_PUBLISH_INTERVAL_MS="1000",
        # The model's P(up) stays near 0.5; with Kelly's prior payoff 1 and the observed
        # payoff mixed in, most signals size to nothing. A fixed prior payoff of 2 makes
        # every signal an order, so every chain can be followed to its fill.
        KELLY_PRIOR_PAYOFF="2",
        KELLY_PRIOR_TRADES="1000000",
    )
    env.update(cfg.extra_env)
    return env


def split_data(folder: Path) -> tuple[Path, Path]:
    """The bundled file cut in two: the warm-up bars, and the rest (replayed paced)."""
    lines = bundled_data_path().read_text().splitlines(keepends=True)
    warm, rest = folder / "warmup.csv", folder / "paced.csv"
    warm.write_text("".join(lines[: 1 + WARMUP_BARS]))
    rest.write_text("".join(lines[:1] + lines[1 + WARMUP_BARS :]))
    return warm, rest


def start_system(
    cfg: Config, tag: str, md_env: dict[str, str], consumers: Sequence[str] = CONSUMERS
) -> System:
    """Start the consumers, warm them up with an unpaced replay of the first 240 bars, wait
    until every group has caught up, then start the paced replay of the following bars."""
    client = redis.Redis.from_url(cfg.url)
    client.flushall()
    env = base_env(cfg)
    system = System()
    for name in consumers:
        copies = cfg.ml_replicas if name == "ml" else 1
        for i in range(copies):
            key = name if copies == 1 else f"{name}{i}"
            args = [sys.executable, "-m", f"hean.{name}"]
            penv = dict(env, INSTANCE_ID=f"bench-{key}")
            system.procs[key] = spawn(args, penv, cfg.logs / f"{tag}-{key}.log")
    wanted = {HEALTH_NAMES[n] for n in consumers}
    deadline = time.monotonic() + 90
    while True:
        seen = {k.decode().split(":")[2] for k in client.scan_iter(match="hean:health:*")}
        ml_up = len(list(client.scan_iter(match="hean:health:ml-service:*")))
        if wanted <= seen and ml_up >= cfg.ml_replicas:
            break
        if system.dead() or time.monotonic() > deadline:
            raise RuntimeError(f"services did not start ({tag}): dead {system.dead()}, up {seen}")
        time.sleep(0.2)
    args = [sys.executable, "-m", "hean.market_data"]
    warm = dict(
        env, INSTANCE_ID="bench-market-data-warmup", REPLAY_DATA_PATH=str(cfg.warmup_csv),
        REPLAY_SPEED="0", REPLAY_WARMUP_BARS="0",
    )  # fmt: skip
    warmer = spawn(args, warm, cfg.logs / f"{tag}-market_data-warmup.log")
    system.procs["market_data"] = warmer
    while stream_added(client, E.CANDLE) < WARMUP_BARS * len(cfg.symbols):
        if system.dead() or time.monotonic() > deadline:
            raise RuntimeError(f"warm-up did not finish ({tag}): dead {system.dead()}")
        time.sleep(0.1)
    groups = SIGNAL_PATH_GROUPS + (OTHER_GROUPS if "risk" in consumers else ())
    if not wait_drained(client, 60, groups):
        raise RuntimeError(f"warm-up backlog did not drain ({tag})")
    stop_process(warmer)
    paced = dict(
        env, INSTANCE_ID="bench-market-data", REPLAY_DATA_PATH=str(cfg.paced_csv),
        REPLAY_WARMUP_BARS="0", **md_env,
    )  # fmt: skip
    system.procs["market_data"] = spawn(args, paced, cfg.logs / f"{tag}-market_data.log")
    client.close()
    return system


def stop_system(system: System) -> None:
    # market-data first, so the others are not stopped in the middle of a flood
    stop_all([system.procs[k] for k in system.procs if k == "market_data"])
    stop_all([p for k, p in system.procs.items() if k != "market_data"])


def stream_added(client: redis.Redis, etype: EventType) -> int:
    try:
        info: Any = client.xinfo_stream(stream_key(etype))
    except redis.ResponseError:
        return 0
    return int(info["entries-added"])


def backlog(client: redis.Redis, etype: EventType, group: str) -> tuple[int, int]:
    """(lag, pending) of `group` on the stream of `etype`."""
    key = stream_key(etype)
    try:
        groups: Any = client.xinfo_groups(key)
    except redis.ResponseError:
        return 0, 0
    for info in groups:
        name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
        if name == group:
            lag = info.get("lag")
            if lag is None:
                lag = stream_added(client, etype) - int(info.get("entries-read") or 0)
            return int(lag), int(info["pending"])
    return 0, 0


def wait_drained(
    client: redis.Redis,
    timeout: float,
    groups: Sequence[tuple[EventType, str]] = SIGNAL_PATH_GROUPS + OTHER_GROUPS,
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(sum(backlog(client, t, g)) == 0 for t, g in groups):
            return True
        time.sleep(0.2)
    return False


# --- 1. latency through the services ---------------------------------------------------


@dataclass
class Chain:
    times: dict[EventType, int] = field(default_factory=dict)
    symbol: str = ""
    bar_ns: int = 0


@dataclass
class LatencyResult:
    rate: float
    fills: int = 0
    candles: int = 0
    signals: int = 0
    rejected: int = 0
    stages: dict[str, int] = field(default_factory=dict)
    candle_to_fill: list[float] = field(default_factory=list)
    tick_to_fill: list[float] = field(default_factory=list)
    hops: dict[str, list[float]] = field(default_factory=dict)
    drained: bool = True
    cpu: dict[str, float] = field(default_factory=dict)
    #: resident MiB per service when the paced bars began and at the end of the run
    rss: dict[str, tuple[float, float]] = field(default_factory=dict)


def read_stream(client: redis.Redis, etype: EventType) -> Iterator[dict[str, Any]]:
    key = stream_key(etype)
    lo = "-"
    while True:
        entries: Any = client.xrange(key, min=lo, max="+", count=10_000)
        if not entries:
            return
        for _entry_id, fields in entries:
            yield orjson.loads(fields[b"event"])
        lo = "(" + entries[-1][0].decode()


def run_latency(cfg: Config, rate: float, seconds: float) -> LatencyResult:
    nsym = len(cfg.symbols)
    bars = int(rate / (TICKS_PER_BAR * nsym) * seconds)
    md_env = {"REPLAY_SPEED": f"{speed_for(rate, nsym):g}", "REPLAY_MAX_BARS": str(bars)}
    result = LatencyResult(rate)
    client = redis.Redis.from_url(cfg.url)
    system = start_system(cfg, f"lat{rate:g}", md_env)
    try:
        total = (WARMUP_BARS + bars) * nsym
        deadline = time.monotonic() + seconds * 3 + 60
        cpu0 = {k: cpu_seconds(p) for k, p in system.pids().items()}
        cpu0["redis"] = cpu_seconds(cfg.redis_proc.pid)
        rss0: dict[str, float] = {}
        t0 = time.monotonic()
        while (added := stream_added(client, E.CANDLE)) < total:
            if time.monotonic() > deadline or system.dead():
                raise RuntimeError(f"replay did not finish: dead {system.dead()}")
            if not rss0 and added > WARMUP_BARS * nsym:  # every service up and warmed
                rss0 = {k: rss_mib(p) for k, p in system.pids().items()}
            time.sleep(0.2)
        result.drained = wait_drained(client, 30)
        elapsed = time.monotonic() - t0
        result.cpu = {
            k: (cpu_seconds(p) - cpu0[k]) / elapsed * 100 for k, p in system.pids().items()
        }
        result.cpu["redis"] = (cpu_seconds(cfg.redis_proc.pid) - cpu0["redis"]) / elapsed * 100
        result.rss = {k: (rss0.get(k, 0.0), rss_mib(p)) for k, p in system.pids().items()}
    finally:
        stop_system(system)
    analyse_latency(client, result, nsym)
    client.close()
    return result


def analyse_latency(client: redis.Redis, result: LatencyResult, nsym: int) -> None:
    chains: dict[str, Chain] = {}
    candles: list[str] = []
    for ev in read_stream(client, E.CANDLE):
        chain = chains.setdefault(ev["event_id"], Chain())
        chain.times[E.CANDLE] = ev["timestamp"]
        chain.symbol = ev["data"]["symbol"]
        chain.bar_ns = int(ev["data"]["timestamp"])
        candles.append(ev["event_id"])
    result.candles = len(candles)
    # Only bars published on the paced schedule, after the warm-up burst has settled.
    paced = candles[WARMUP_BARS * nsym :]
    if paced:
        first_paced = chains[paced[0]].times[E.CANDLE]
        settle_ns = int(1e9)  # market-data's start
        measured = {c for c in paced if chains[c].times[E.CANDLE] >= first_paced + settle_ns}
    else:
        measured = set()
    for etype in CHAIN[1:]:
        for ev in read_stream(client, etype):
            found = chains.get(ev.get("correlation_id") or "")
            if found is not None and etype not in found.times:  # first of each (partials)
                found.times[etype] = ev["timestamp"]
    last_tick_offset = (TICKS_PER_BAR - 1) * BAR_NS // TICKS_PER_BAR
    last_ticks: dict[tuple[str, int], int] = {}
    for ev in read_stream(client, E.TICK):
        key = (ev["data"]["symbol"], int(ev["data"]["timestamp"]))
        last_ticks[key] = ev["timestamp"]
    result.signals = sum(1 for c in measured if E.SIGNAL in chains[c].times)
    result.stages = {t.value: sum(1 for c in measured if t in chains[c].times) for t in CHAIN}
    result.rejected = client.xlen(stream_key(E.ORDER_REJECTED))
    hop_names = [f"{a.value} -> {b.value}" for a, b in itertools.pairwise(CHAIN)]
    result.hops = {name: [] for name in hop_names}
    for cid in measured:
        chain = chains[cid]
        if E.ORDER_FILLED not in chain.times:
            continue
        result.fills += 1
        fill = chain.times[E.ORDER_FILLED]
        result.candle_to_fill.append((fill - chain.times[E.CANDLE]) / 1e6)
        tick = last_ticks.get((chain.symbol, chain.bar_ns + last_tick_offset))
        if tick is not None:
            result.tick_to_fill.append((fill - tick) / 1e6)
        if all(t in chain.times for t in CHAIN):
            for name, (a, b) in zip(hop_names, itertools.pairwise(CHAIN), strict=True):
                result.hops[name].append((chain.times[b] - chain.times[a]) / 1e6)


# --- 2. the bare redis-py floor -------------------------------------------------------


def _floor_relay(
    url: str, src: str, dst: str | None, ready: MpEvent, stop: MpEvent, out: Any
) -> None:
    os.setsid()  # out of the terminal's process group: the parent stops it
    client = redis.Redis.from_url(url)
    with contextlib.suppress(redis.ResponseError):
        client.xgroup_create(src, "g", id="0", mkstream=True)
    ready.set()
    latencies: list[float] = []
    while not stop.is_set():
        resp: Any = client.xreadgroup("g", "c", {src: ">"}, count=500, block=100)
        if not resp:
            continue
        entries = resp[0][1]
        now = time.time_ns()
        pipe = client.pipeline(transaction=True)
        for _, fields in entries:
            body = orjson.loads(fields[b"event"])
            if dst is None:
                latencies.append((now - body["root_ns"]) / 1e6)
            else:
                body = {"root_ns": body["root_ns"], "timestamp": time.time_ns(), "data": body}
                pipe.xadd(dst, {"event": orjson.dumps(body)})
        pipe.xack(src, "g", *[entry_id for entry_id, _ in entries])
        pipe.execute()
    if out is not None:
        out.put(latencies)
    client.close()


def run_floor(url: str, rate: float, seconds: float) -> tuple[list[float], float]:
    """The bare chain's latencies, and its relays' CPU time per event (`_run_chain`)."""
    streams = [f"bench:floor:{i}" for i in range(HOPS + 1)]
    relays = [(url, streams[i], None if i == HOPS - 1 else streams[i + 1]) for i in range(HOPS)]
    sample = {"symbol": "BTC/USDT", "open": "46216.0", "high": "46290.0", "low": "46200.0"}
    sample |= {"close": "46250.0", "volume": "12.3", "timeframe": "1m"}

    def entry(i: int) -> bytes:
        ts = time.time_ns()
        return orjson.dumps({"root_ns": ts, "timestamp": ts, "data": sample | {"timestamp": i}})

    return _run_chain(url, rate, seconds, _floor_relay, relays, entry, streams[0], streams[-2])


def _run_chain(
    url: str,
    rate: float,
    seconds: float,
    target: Callable[..., None],
    relays: Sequence[tuple[Any, ...]],
    entry: Callable[[int], bytes],
    first: str,
    last: str,
) -> tuple[list[float], float]:
    """Start a process `target(*relays[i], ready, stop, out)` per hop (`out`, for the
    latencies, only for the last), feed `entry(i)` into stream `first` evenly at `rate`
    for `seconds`, and wait until stream `last` (the last hop's input) holds them all.
    Returns the last hop's latencies and the relays' CPU time per event (us, all of them
    together, while fed)."""
    client = redis.Redis.from_url(url)
    client.flushall()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    out = ctx.Queue()
    procs = []
    for hop, args in enumerate(relays):
        ready = ctx.Event()
        queue = out if hop == len(relays) - 1 else None
        proc = ctx.Process(target=target, args=(*args, ready, stop, queue), daemon=True)
        proc.start()
        _mp_children.append(proc)
        procs.append(proc)
        if not ready.wait(60):
            raise RuntimeError(f"relay {hop} of the chain did not start")
    n = int(rate * seconds)
    interval = 1.0 / rate
    cpu0 = sum(cpu_seconds(p.pid) for p in procs if p.pid is not None)
    try:
        start = time.perf_counter()
        for i in range(n):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            client.xadd(first, {"event": entry(i)})
        deadline = time.monotonic() + 30
        while client.xlen(last) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        cpu_us = (sum(cpu_seconds(p.pid) for p in procs if p.pid is not None) - cpu0) / n * 1e6
        stop.set()
        latencies: list[float] = out.get(timeout=30)
    finally:
        stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
            _mp_children.remove(proc)
        client.close()
    return latencies, cpu_us


# --- 2b. the same chain through the bus -----------------------------------------------

#: What each hop of the bus chain reads and what it publishes (None: the last hop, which
#: measures): the event types of the services' chain, so the audited ones (SIGNAL,
#: ORDER_APPROVED) go through the bus's publish-once script as they do there.
BUS_CHAIN: tuple[tuple[EventType, EventType | None], ...] = (
    (E.CANDLE, E.FEATURES_READY),
    (E.FEATURES_READY, E.ML_PREDICTION),
    (E.ML_PREDICTION, E.SIGNAL),
    (E.SIGNAL, E.ORDER_APPROVED),
    (E.ORDER_APPROVED, None),
)


def _bus_payload(event_type: EventType, root_ns: int) -> dict[str, Any]:
    """A valid data payload of `event_type`, the size of the services' own, with the root."""
    base: dict[str, Any] = {"symbol": "BTC/USDT", "root_ns": root_ns}
    if event_type is E.FEATURES_READY:
        return base | {"features": dict.fromkeys(FEATURE_NAMES, 0.123456)}
    if event_type is E.ML_PREDICTION:
        return base | {"prediction": 0.61, "confidence": 0.22, "model_version": "bench"}
    if event_type is E.SIGNAL:
        return base | {"side": "BUY", "signal_strength": 0.22}
    order = {"order_id": f"bench-{root_ns}", "side": "BUY", "size": "0.01", "type": "market"}
    return base | order


def _bus_relay(url: str, hop: int, ready: MpEvent, stop: MpEvent, out: Any) -> None:
    """One hop of the bus chain: an `EventBus` on Redis whose handler does nothing but
    publish the next event (or, on the last hop, note the latency)."""
    os.setsid()

    reads, publishes = BUS_CHAIN[hop]
    latencies: list[float] = []

    async def main() -> None:
        settings = CoreSettings(REDIS_URL=url, SERVICE_NAME=f"chain{hop}", INSTANCE_ID="bench")
        bus = EventBus.redis(settings, metrics=Metrics())

        async def relay(event: Event) -> None:
            root = int(event.data.get("root_ns") or event.timestamp)
            if publishes is None:
                latencies.append((time.time_ns() - root) / 1e6)
                return
            await bus.publish(Event(event_type=publishes, data=_bus_payload(publishes, root)))

        bus.subscribe(reads, relay, name=f"chain{hop}.relay")
        await bus.start()
        gc.collect()
        gc.freeze()  # as a service does once started
        ready.set()
        await asyncio.to_thread(stop.wait)
        await bus.stop()

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main())
    if out is not None:
        out.put(latencies)


def run_bus_chain(url: str, rate: float, seconds: float) -> tuple[list[float], float]:
    """The floor's chain with each relay an `EventBus` (decode, validate, dispatch, publish
    with validation and stamping, ack), fed CANDLEs as the floor is fed: what the bus costs
    before the services do any work. Latencies and CPU per event as `_run_chain`'s."""
    price = {"open": "46216.0", "high": "46290.0", "low": "46200.0", "close": "46250.0"}

    def entry(i: int) -> bytes:
        data = {"symbol": "BTC/USDT", "volume": "12.3", "timestamp": i} | price
        return Event(event_type=E.CANDLE, data=data).to_json()

    relays = [(url, hop) for hop in range(len(BUS_CHAIN))]
    first, last = stream_key(BUS_CHAIN[0][0]), stream_key(BUS_CHAIN[-1][0])
    return _run_chain(url, rate, seconds, _bus_relay, relays, entry, first, last)


# --- 3. sustained rate ----------------------------------------------------------------


@dataclass
class SustainResult:
    rate: float
    seconds: float
    achieved: float = 0.0
    ok: bool = False
    why: str = ""
    groups: dict[str, tuple[float, int, int]] = field(default_factory=dict)  # slope, end, max
    cpu: dict[str, float] = field(default_factory=dict)


def slope(points: Sequence[tuple[float, float]]) -> float:
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0


def run_sustain(cfg: Config, rate: float, seconds: float, everything: bool) -> SustainResult:
    nsym = len(cfg.symbols)
    md_env = {
        "REPLAY_SPEED": f"{speed_for(rate, nsym):g}",
        "REPLAY_LOOP": "true",
        "REPLAY_MAX_LAG": "0",  # offer the rate whatever the consumers do
    }
    result = SustainResult(rate, seconds)
    client = redis.Redis.from_url(cfg.url)
    consumers = CONSUMERS if everything else SIGNAL_PATH
    system = start_system(cfg, f"sus{rate:g}", md_env, consumers)
    groups = SIGNAL_PATH_GROUPS + (OTHER_GROUPS if everything else ())
    samples: dict[str, list[tuple[float, float]]] = {f"{g}<-{t.value}": [] for t, g in groups}
    try:
        time.sleep(cfg.settle_s)
        t0 = time.monotonic()
        ticks0 = stream_added(client, E.TICK)
        cpu0 = {k: cpu_seconds(p) for k, p in system.pids().items()}
        cpu0["redis"] = cpu_seconds(cfg.redis_proc.pid)
        while (now := time.monotonic()) < t0 + seconds:
            for etype, group in groups:
                lag, pending = backlog(client, etype, group)
                samples[f"{group}<-{etype.value}"].append((now - t0, lag + pending))
            if system.dead():
                raise RuntimeError(f"services died: {system.dead()}")
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        elapsed = time.monotonic() - t0
        result.achieved = (stream_added(client, E.TICK) - ticks0) / elapsed
        result.cpu = {
            k: (cpu_seconds(p) - cpu0[k]) / elapsed * 100 for k, p in system.pids().items()
        }
        result.cpu["redis"] = (cpu_seconds(cfg.redis_proc.pid) - cpu0["redis"]) / elapsed * 100
    finally:
        stop_system(system)
        client.close()
    reasons = []
    if result.achieved < 0.95 * rate:
        reasons.append(f"market-data reached {result.achieved:,.0f} ticks/s")
    inputs = {E.CANDLE: rate / TICKS_PER_BAR, E.TICK: rate}
    inputs[E.FEATURES_READY] = inputs[E.ML_PREDICTION] = rate / TICKS_PER_BAR
    for etype, group in groups:
        pts = samples[f"{group}<-{etype.value}"]
        s = slope(pts)
        tail = [v for _, v in pts[-5:]] or [0.0]
        end = int(sum(tail) / len(tail))
        result.groups[f"{group}<-{etype.value}"] = (s, end, int(max(v for _, v in pts)))
        if (etype, group) in SIGNAL_PATH_GROUPS:
            per_s = inputs[etype]
            if s > 0.02 * per_s or end > max(50.0, 0.25 * per_s):
                reasons.append(f"{group} backlog {end:,} (growing {s:,.0f}/s)")
    result.ok = not reasons
    result.why = "; ".join(reasons)
    return result


# --- report -----------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def fmt_cpu(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}%" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))


def print_sustain(r: SustainResult) -> None:
    verdict = "ok" if r.ok else f"FAIL ({r.why})"
    print(
        f"  {r.rate:>7,.0f} ticks/s for {r.seconds:.0f} s: achieved {r.achieved:,.0f}/s  {verdict}"
    )
    for name, (s, end, top) in r.groups.items():
        print(f"      backlog {name:<28} end {end:>8,}  max {top:>8,}  slope {s:>8,.1f}/s")
    print(f"      CPU: {fmt_cpu(r.cpu)}")


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    rv = next((p for p in out.stdout.split() if p.startswith("v=")), "v=?")[2:]
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, Redis {rv}, "
        f"redis-py {redis.__version__}, load average {load[0]:.2f} at start"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs, 15 s sustain window")
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 1000.0])
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--sustain-seconds", type=float, default=None)
    parser.add_argument("--probe-seconds", type=float, default=None)
    parser.add_argument(
        "--probe-rates",
        type=float,
        nargs="+",
        default=[1000, 2000, 4000, 6000, 8000, 10000, 12000, 14000, 16000],
    )
    parser.add_argument("--symbols", default="BTC/USDT", help="comma-separated")
    parser.add_argument("--ml-replicas", type=int, default=1)
    parser.add_argument("--skip-sustain", action="store_true")
    parser.add_argument(
        "--sustain-all",
        action="store_true",
        help="run risk, execution and portfolio during the sustained-rate runs too",
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--logs", type=Path, help="keep the services' logs in this folder")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for every service")
    args = parser.parse_args()
    lat_s = args.latency_seconds or (12.0 if args.quick else 30.0)
    sus_s = args.sustain_seconds or (15.0 if args.quick else 60.0)
    probe_s = args.probe_seconds or (6.0 if args.quick else 10.0)
    extra = dict(kv.split("=", 1) for kv in args.env)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)  # also when started in the background
    started = dt.datetime.now(dt.UTC)
    print(f"bench/e2e.py {started:%Y-%m-%d %H:%M} UTC; {machine()}")
    print(f"services: market-data -> features -> ml-service x{args.ml_replicas} -> strategy -> ")
    print("  risk -> execution (paper) -> portfolio; symbols " + args.symbols)
    if extra:
        print(f"extra settings: {extra}")
    try:
        with redis_server() as (url, rproc), tempfile.TemporaryDirectory(prefix="hean-e2e-") as tmp:
            logs = args.logs or Path(tmp)
            logs.mkdir(parents=True, exist_ok=True)
            warm, paced = split_data(Path(tmp))
            cfg = Config(
                url, rproc, args.symbols.split(","), args.ml_replicas, extra, logs, 2.0, warm, paced
            )
            if not args.skip_latency:
                latency_section(cfg, args.rates, lat_s)
            if not args.skip_sustain:
                sustain_section(cfg, args.probe_rates, probe_s, sus_s, args.sustain_all)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        cleanup()
    took = (dt.datetime.now(dt.UTC) - started).total_seconds()
    print(f"done in {took:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")


def latency_section(cfg: Config, rates: Sequence[float], seconds: float) -> None:
    print(f"\n== 1. latency, {seconds:g} s at each rate (paced bars from 1 s after the start) ==")
    results = []
    floors = {}
    chains = {}
    chain_cpu = {}
    floor_cpu = {}
    for rate in rates:  # each floor right after its service run: the machine is shared
        results.append(run_latency(cfg, rate, seconds))
        floors[rate], floor_cpu[rate] = run_floor(cfg.url, rate, seconds)
        chains[rate], chain_cpu[rate] = run_bus_chain(cfg.url, rate, seconds)
    head = f"{'ticks/s':>8} {'what':<32} {'n':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
    head += f" {'max ms':>8}"
    print(head)
    for r in results:
        f = floors[r.rate]
        rows = [
            ("last TICK -> ORDER_FILLED", r.tick_to_fill),
            ("CANDLE -> ORDER_FILLED", r.candle_to_fill),
            (f"floor: bare {HOPS}-hop redis-py chain", f),
            (f"bus: {HOPS}-hop EventBus chain", chains[r.rate]),
        ]
        for what, v in rows:
            print(
                f"{r.rate:>8,.0f} {what:<32} {len(v):>6} {pct(v, 0.5):>8.2f} {pct(v, 0.9):>8.2f}"
                f" {pct(v, 0.99):>8.2f} {max(v, default=float('nan')):>8.2f}"
            )
        ratio50 = pct(r.tick_to_fill, 0.5) / pct(f, 0.5)
        ratio99 = pct(r.tick_to_fill, 0.99) / pct(f, 0.99)
        print(f"{'':>8} tick->fill / floor: p50 x{ratio50:.1f}, p99 x{ratio99:.1f}")
        c = chains[r.rate]
        print(
            f"{'':>8} bus chain / floor: p50 x{pct(c, 0.5) / pct(f, 0.5):.1f}, "
            f"p99 x{pct(c, 0.99) / pct(f, 0.99):.1f} (what the bus costs before any work)"
        )
        print(
            f"{'':>8} CPU per event, five relays together: floor {floor_cpu[r.rate]:.0f} us, "
            f"bus chain {chain_cpu[r.rate]:.0f} us"
        )
    for r in results:
        print(
            f"\n  {r.rate:,.0f} ticks/s: {r.candles} candles, {r.signals} signals and {r.fills} "
            f"fills measured, {r.rejected} ORDER_REJECTED, drained: {r.drained}"
        )
        print("  chains reaching each stage: " + ", ".join(f"{k} {v}" for k, v in r.stages.items()))
        print(f"  {'hop':<36} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
        for name, v in r.hops.items():
            print(f"  {name:<36} {pct(v, 0.5):>8.2f} {pct(v, 0.9):>8.2f} {pct(v, 0.99):>8.2f}")
        print(f"  CPU: {fmt_cpu(r.cpu)}")
        print(
            "  memory (RSS MiB, paced bars begin -> end of the run): "
            + ", ".join(f"{k} {a:.0f} -> {b:.0f}" for k, (a, b) in sorted(r.rss.items()))
        )
    top = results[-1]
    f = floors[top.rate]
    ok50 = pct(top.tick_to_fill, 0.5) <= 2 * pct(f, 0.5)
    ok99 = pct(top.tick_to_fill, 0.99) <= 3 * pct(f, 0.99)
    print(
        f"\ngoal at {top.rate:,.0f} ticks/s: tick->fill p50 <= 2x floor: "
        f"{'met' if ok50 else 'NOT met'}; p99 <= 3x floor: {'met' if ok99 else 'NOT met'}"
    )


def sustain_section(
    cfg: Config, probes: Sequence[float], probe_s: float, sus_s: float, everything: bool
) -> None:
    running = "all seven services" if everything else "market-data, features, ml-service, strategy"
    print(f"\n== 2. sustained tick rate (probes of {probe_s:g} s, then {sus_s:g} s) ==")
    print(f"running: {running}")
    best: SustainResult | None = None
    passed: list[float] = []
    for rate in probes:
        r = run_sustain(cfg, rate, probe_s, everything)
        print_sustain(r)
        if not r.ok:
            break
        passed.append(rate)
    final: SustainResult | None = None
    for rate in list(reversed(passed))[:2]:
        r = run_sustain(cfg, rate, sus_s, everything)
        print_sustain(r)
        if r.ok:
            final = r
            break
    best = final
    if best is None:
        print(f"no rate held for {sus_s:g} s")
        verdict = "NOT met"
    else:
        verdict = "met" if best.rate >= 5000 else "NOT met"
        print(f"highest rate sustained for {sus_s:g} s: {best.rate:,.0f} ticks/s")
    print(f"goal >= 5,000 ticks/s through features, ml-service and strategy: {verdict}")


if __name__ == "__main__":
    main()
