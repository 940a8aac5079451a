"""`hean up`: Redis (if none answers), consumer groups, the eight services as children, then
the dashboard (`hean.ui`, port 3000).

Order matters for not losing events: every consumer group is created before any service
starts (a group created at `$` after market-data already published would miss those
ticks), then services start downstream-first so market-data comes up last. Stopping goes
the other way: market-data first, the gateway last, SIGTERM then SIGKILL for stragglers,
and the Redis this command started is stopped at the very end (after the services flushed).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hean.core.devrun import ensure_redis
from hean.core.event_streams import ensure_group, stream_key
from hean.core.health import read_snapshots
from hean.core.lease import running_holders
from hean.core.settings import redact_url
from hean.core.topology import CONSUMER_GROUPS
from hean.core.types import EventType
from hean.gateway.health_view import merge_health


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    module: str
    #: Event types the service consumes (its consumer groups; created before anything runs).
    subscribes: tuple[EventType, ...] = ()
    #: Of those, the ones whose group the service itself creates at the stream's start.
    from_start: frozenset[EventType] = frozenset()


E = EventType


def _spec(name: str, module: str, from_start: frozenset[EventType] = frozenset()) -> ServiceSpec:
    return ServiceSpec(name, module, tuple(sorted(CONSUMER_GROUPS.get(name, ()))), from_start)


#: The eight services in start order (downstream first, market data last). What each one
#: consumes is the system's topology (`hean.core.topology`, checked against the services by
#: tests/e2e/test_topology.py). Portfolio and risk read ORDER_FILLED from the stream's start.
SERVICES: Final[tuple[ServiceSpec, ...]] = (
    _spec("api-gateway", "hean.gateway"),
    _spec("portfolio", "hean.portfolio", frozenset({E.ORDER_FILLED})),
    _spec("execution", "hean.execution"),
    _spec("risk", "hean.risk", frozenset({E.ORDER_FILLED})),
    _spec("strategy", "hean.strategy"),
    _spec("ml-service", "hean.ml"),
    _spec("features", "hean.features"),
    _spec("market-data", "hean.market_data"),
)
#: The dashboard: started after the gateway it talks to, answers on /healthz.
UI = ServiceSpec("ui", "hean.ui")

#: Counted in the status line (entries ever added, so trimming does not hide them).
COUNTED: Final[Mapping[str, EventType]] = {
    "ticks": E.TICK,
    "predictions": E.ML_PREDICTION,
    "signals": E.SIGNAL,
    "orders": E.ORDER_APPROVED,
    "fills": E.ORDER_FILLED,
}


@dataclass(frozen=True)
class UpOptions:
    symbols: str = "BTC/USDT"
    replay_speed: float = 60.0
    ml_replicas: int = 1
    redis_url: str = "redis://localhost:6379"
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    health_port_base: int = 8100
    workdir: str = ".hean"
    interval: float = 2.0
    start_timeout: float = 120.0
    #: The dashboard's port; 0 starts no dashboard.
    ui_port: int = 3000


@dataclass
class Child:
    name: str
    health_port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    log_file: IO[bytes]
    reported_exit: bool = False


class UpError(Exception):
    """A reason `hean up` cannot go on, as one line."""


@dataclass
class Supervisor:
    options: UpOptions
    console: Console
    children: list[Child] = field(default_factory=list)
    redis_proc: subprocess.Popen[bytes] | None = None

    # --- preparation ---------------------------------------------------------------------

    def check_installed(self, specs: tuple[ServiceSpec, ...] | None = None) -> None:
        if specs is None:
            specs = (*SERVICES, UI) if self.options.ui_port else SERVICES
        missing = []
        for spec in specs:
            try:
                found = importlib.util.find_spec(f"{spec.module}.__main__") is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                missing.append(f"{spec.name} ({spec.module})")
        if missing:
            raise UpError(
                "cannot start HEAN: these services are not installed: "
                + ", ".join(missing)
                + " (run `make install`, or pip install -e services/<name>)"
            )

    def plan(self) -> list[tuple[ServiceSpec, str, int]]:
        """(spec, process label, health port) for every process, in start order."""
        out: list[tuple[ServiceSpec, str, int]] = []
        port = self.options.health_port_base
        for spec in SERVICES:
            replicas = self.options.ml_replicas if spec.name == "ml-service" else 1
            for n in range(replicas):
                label = f"{spec.name}-{n + 1}" if replicas > 1 else spec.name
                out.append((spec, label, port))
                port += 1
        return out

    def check_ports(self, plan: list[tuple[ServiceSpec, str, int]]) -> None:
        wanted = [(self.options.gateway_host, self.options.gateway_port, "--gateway-port")]
        if self.options.ui_port:
            wanted.append((self.options.gateway_host, self.options.ui_port, "--ui-port"))
        wanted += [("127.0.0.1", port, "--health-port-base") for _, _, port in plan]
        for host, port, option in wanted:
            if port == 0:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                except OSError as exc:
                    raise UpError(
                        f"port {host}:{port} is not free ({exc.strerror}); "
                        f"is HEAN already running? Otherwise choose another {option}"
                    ) from None

    def start_redis(self) -> None:
        url = self.options.redis_url
        try:
            self.redis_proc = ensure_redis(url, Path(self.options.workdir) / "redis")
        except RuntimeError as exc:
            raise UpError(str(exc)) from None
        where = "started redis-server" if self.redis_proc else "using the Redis"
        self.console.print(f"{where} at {redact_url(url)}")

    async def check_not_running(self) -> None:
        """Refuse a second system on the same Redis: its services would only wait as
        standbys of the first one's (hean.core.lease)."""
        where = redact_url(self.options.redis_url)
        client = aioredis.Redis.from_url(self.options.redis_url, socket_timeout=5.0)
        try:
            held = await running_holders(client)
        except RedisError as exc:
            raise UpError(f"cannot read Redis at {where}: {exc}") from None
        finally:
            await client.aclose()
        if held:
            who = ", ".join(f"{service} ({consumer})" for service, consumer in sorted(held.items()))
            raise UpError(
                f"HEAN is already running against {where}: {who}. "
                "Stop it first (Ctrl-C where it runs), or give this one its own Redis "
                "(--redis-url)"
            )

    async def create_groups(self) -> int:
        client = aioredis.Redis.from_url(self.options.redis_url, socket_timeout=5.0)
        created = 0
        try:
            for spec in SERVICES:
                for etype in spec.subscribes:
                    start = "0" if etype in spec.from_start else "$"
                    created += await ensure_group(
                        client, stream_key(etype), spec.name, start_id=start
                    )
        finally:
            await client.aclose()
        return created

    def ui_env(self) -> dict[str, str]:
        host = self.options.gateway_host
        reach = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
        env = dict(os.environ)
        env.update(
            {
                "UI_HOST": host,
                "UI_PORT": str(self.options.ui_port),
                "GATEWAY_URL": f"http://{reach}:{self.options.gateway_port}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def child_env(self, health_port: int, label: str = "") -> dict[str, str]:
        env = dict(os.environ)
        for name in ("SERVICE_NAME", "INSTANCE_ID", "HEALTH_PORT"):
            env.pop(name, None)
        if label:
            # A stable consumer name: the next run first handles what this one left unacked.
            env["INSTANCE_ID"] = f"{socket.gethostname()}-{label}"
        env.update(
            {
                "REDIS_URL": self.options.redis_url,
                "HEALTH_HOST": "127.0.0.1",
                "HEALTH_PORT": str(health_port),
                "EXCHANGE": "paper",
                "MARKET_DATA_MODE": "replay",
                "SYMBOLS": self.options.symbols,
                "REPLAY_SPEED": str(self.options.replay_speed),
                "REPLAY_LOOP": env.get("REPLAY_LOOP", "true"),
                "GATEWAY_HOST": self.options.gateway_host,
                "GATEWAY_PORT": str(self.options.gateway_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def spawn(
        self, spec: ServiceSpec, label: str, port: int, env: dict[str, str] | None = None
    ) -> Child:
        logs = Path(self.options.workdir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{label}.log"
        log_file = log_path.open("ab")
        log_file.write(f"\n--- hean up: starting {label} ---\n".encode())
        log_file.flush()
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", spec.module],
            env=env if env is not None else self.child_env(port, label),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own session: Ctrl-C reaches only us, and we stop the children in order.
            start_new_session=True,
        )
        return Child(label, port, log_path, process, log_file)

    def wait_ready(self, child: Child, deadline: float, path: str = "/health") -> None:
        url = f"http://127.0.0.1:{child.health_port}{path}"
        while True:
            code = child.process.poll()
            if code is not None:
                raise UpError(
                    f"{child.name} exited with status {code} while starting: "
                    f"{last_line(child.log_path)} (log: {child.log_path})"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0):
                    return
            except urllib.error.HTTPError:
                return  # it answers (503 while a component is still unhealthy)
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                dump_stacks(child)
                raise UpError(
                    f"{child.name} did not answer on {url} within "
                    f"{self.options.start_timeout:.0f} s; its stacks are in its log "
                    f"({child.log_path})"
                )
            time.sleep(0.1)

    # --- running -------------------------------------------------------------------------

    def start_all(self) -> None:
        plan = self.plan()
        self.check_ports(plan)
        deadline = time.monotonic() + self.options.start_timeout
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console, transient=True) as bar:
            with_ui = 1 if self.options.ui_port else 0
            task = bar.add_task("starting services", total=len(plan) + with_ui)
            for spec, label, port in plan:
                bar.update(task, description=f"starting {label}")
                child = self.spawn(spec, label, port)
                self.children.append(child)
                self.wait_ready(child, deadline)
                bar.advance(task)
            if with_ui:
                bar.update(task, description="starting the dashboard")
                child = self.spawn(UI, UI.name, self.options.ui_port, env=self.ui_env())
                self.children.append(child)
                self.wait_ready(child, deadline, path="/healthz")
                bar.advance(task)

    def report_exits(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None and not child.reported_exit:
                child.reported_exit = True
                self.console.print(
                    f"[red]{child.name} exited with status {code}[/red]: "
                    f"{last_line(child.log_path)} (log: {child.log_path})"
                )

    def stop_all(self, timeout: float = 20.0) -> None:
        # Producers first, so downstream services drain what is in flight; gateway last.
        for child in reversed(self.children):
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(timeout=max(0.1, timeout / max(1, len(self.children))))
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                dump_stacks(child)
                self.console.print(
                    f"{child.name} did not stop in time: killing it (its stacks are in "
                    f"{child.log_path})"
                )
                child.process.kill()
                child.process.wait()
            child.log_file.close()
        if self.redis_proc is not None:
            self.redis_proc.terminate()
            try:
                self.redis_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis_proc.kill()
                self.redis_proc.wait()
            self.redis_proc = None


def dump_stacks(child: Child) -> None:
    """Have a stuck child write its threads' stacks to its log (services register
    faulthandler on SIGUSR1), so a hang says where it is."""
    if child.name == UI.name or child.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.process.send_signal(signal.SIGUSR1)
        time.sleep(0.5)


def last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip()[:300] if lines else "(empty log)"


class StatusReader:
    """Reads what the status line shows, from Redis only."""

    def __init__(self, url: str, expected: tuple[str, ...]) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.expected = expected
        self.baseline: dict[str, int] = {}

    async def added(self, etype: EventType) -> int:
        try:
            info: Any = await self.client.xinfo_stream(stream_key(etype))
        except redis.ResponseError:
            return 0  # no stream yet
        value = info.get("entries-added", info.get(b"entries-added"))
        return int(value) if value is not None else int(info.get("length", 0))

    async def snapshot_counts(self) -> dict[str, int]:
        return {name: await self.added(etype) for name, etype in COUNTED.items()}

    async def line(self) -> str:
        counts = await self.snapshot_counts()
        parts = [f"{name} {counts[name] - self.baseline.get(name, 0)}" for name in COUNTED]
        from hean.core.event_streams import decode_entry

        last: Any = await self.client.xrevrange(stream_key(E.PNL_UPDATE), count=1)
        if last:
            pnl = decode_entry(stream_key(E.PNL_UPDATE), last[0][1]).data
            parts.append(f"P&L {pnl['total_pnl']:.2f} (equity {pnl.get('equity', '?')})")
        else:
            parts.append("P&L -")
        merged = merge_health(
            await read_snapshots(self.client), expected=self.expected, now=time.time()
        )
        up = sum(1 for s in self.expected if merged["services"][s]["replicas"] > 0)
        overall = merged["orchestrator"]["overall_state"]
        parts.append(f"health {overall} ({up}/{len(self.expected)} up)")
        active = await self.client.hget("hean:risk:killswitch", "active")
        if active in (b"1", "1"):
            parts.append("KILL SWITCH ACTIVE")
        return time.strftime("%H:%M:%S ") + " | ".join(parts)

    async def close(self) -> None:
        await self.client.aclose()


async def _monitor(sup: Supervisor, stop: asyncio.Event) -> None:
    reader = StatusReader(sup.options.redis_url, tuple(s.name for s in SERVICES))
    try:
        reader.baseline = await reader.snapshot_counts()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=sup.options.interval)
            if stop.is_set():
                break
            sup.report_exits()
            try:
                sup.console.print(await reader.line(), highlight=False, soft_wrap=True)
            except (RedisError, OSError) as exc:
                sup.console.print(f"status unavailable: Redis: {exc}", highlight=False)
    finally:
        await reader.close()


def run_up(options: UpOptions, console: Console) -> int:
    """Run until SIGINT/SIGTERM; returns the exit status."""
    sup = Supervisor(options, console)
    stop_requested = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sup.check_installed()
        sup.start_redis()
        asyncio.run(sup.check_not_running())
        created = asyncio.run(sup.create_groups())
        console.print(f"consumer groups ready ({created} created)")
        sup.start_all()
        host = "127.0.0.1" if options.gateway_host in ("0.0.0.0", "") else options.gateway_host  # noqa: S104
        dashboard = f"Dashboard: http://{host}:{options.ui_port}. " if options.ui_port else ""
        console.print(
            f"HEAN is running in paper mode ({len(sup.children)} processes). "
            f"Gateway: http://{host}:{options.gateway_port} "
            f"(health /health, API docs /docs). {dashboard}"
            f"Logs in {Path(options.workdir) / 'logs'}. Ctrl-C stops everything.",
            soft_wrap=True,
        )
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, previous[s])
        asyncio.run(_serve_until_signal(sup))
        return 0
    except UpError as exc:
        Console(stderr=True).print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        return 0 if stop_requested else 130
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        if sup.children or sup.redis_proc is not None:
            console.print("stopping HEAN ...")
            sup.stop_all()
            console.print("stopped.")
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, previous[s])


async def _serve_until_signal(sup: Supervisor) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    try:
        await _monitor(sup, stop)
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)
