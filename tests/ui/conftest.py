"""The whole system for the dashboard tests: a real redis-server, `hean up` (the eight
services as processes, paper mode, replaying the bundled BTC candles), the dashboard server,
and Debian's Chromium driven by Playwright (never a browser Playwright downloads)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
API_TOKEN = "ui-test-token-5c1f0e"
SERVICES = (
    "api-gateway",
    "execution",
    "features",
    "market-data",
    "ml-service",
    "portfolio",
    "risk",
    "strategy",
)


def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else None
    except (urllib.error.URLError, OSError):
        return 0, None


def wait_until(
    check: Callable[[], bool], *, timeout: float, message: str, alive: Callable[[], None]
) -> None:
    """Poll `check` until true (a deadline, not a fixed sleep); `alive` raises if a child died."""
    deadline = time.monotonic() + timeout
    while not check():
        alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(0.1)


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free ports (for `hean up --health-port-base`)."""
    for _ in range(50):
        base = free_port()
        if base + size > 65000:
            continue
        socks = []
        try:
            for port in range(base, base + size):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no block of {size} free ports found")


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"{self.name} exited with {code}:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_child(name: str, args: list[str], env: dict[str, str], logs: Path) -> Child:
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Child(name, process, log_path)


def start_ui(env: dict[str, str], gateway_url: str, logs: Path) -> tuple[Child, str]:
    port = free_port()
    ui_env = {
        **env,
        "UI_HOST": "127.0.0.1",
        "UI_PORT": str(port),
        "GATEWAY_URL": gateway_url,
        "UI_POLL_INTERVAL_S": "0.5",
        # Access lines too, so the tests can check that no token reaches the log.
        "LOG_LEVEL": "DEBUG",
    }
    child = start_child("ui", [sys.executable, "-m", "hean.ui"], ui_env, logs)
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: get_json(url + "/healthz")[0] == 200,
        timeout=30,
        message="the dashboard server",
        alive=child.check_alive,
    )
    return child, url


@dataclass
class System:
    gateway_url: str
    ui_url: str
    token: str
    children: list[Child] = field(default_factory=list)

    def alive(self) -> None:
        for child in self.children:
            child.check_alive()

    def gateway(self, path: str) -> Any:
        status, body = get_json(self.gateway_url + path)
        assert status == 200, f"gateway {path}: {status} {body}"
        return body


@pytest.fixture(scope="module")
def system(
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[System]:
    """`hean up` on the session's test Redis (flushed first), plus the dashboard server.
    The services' logs are printed if it fails to start or a test using it fails."""
    failed_before = request.session.testsfailed
    client = redis_server.sync_client()
    client.flushall()
    client.close()
    hean = Path(sys.executable).with_name("hean")
    if not hean.exists():
        pytest.fail("the `hean` command (hean-cli) is not installed: run `make install`")
    workdir = tmp_path_factory.mktemp("hean-up")
    gateway_port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "PYTHONUNBUFFERED": "1",
        "API_TOKEN": API_TOKEN,
        # Health snapshots every second, so the kill switch shows in /health quickly.
        "HEALTH_INTERVAL_S": "1",
    }
    up = start_child(
        "hean-up",
        [
            str(hean), "up",
            "--redis-url", redis_server.url,
            "--gateway-port", str(gateway_port),
            "--health-port-base", str(free_port_block(len(SERVICES))),
            "--workdir", str(workdir),
            # Fast enough that the features warm up and trades happen within seconds.
            "--replay-speed", "1200",
            "--interval", "5",
            # These tests start the dashboard themselves, on a port of their own.
            "--ui-port", "0",
        ],
        env,
        workdir,
    )  # fmt: skip
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    system = System(gateway_url, "", API_TOKEN, [up])
    try:

        def all_up() -> bool:
            _status, body = get_json(gateway_url + "/health")
            return bool(body) and all(
                body.get("services", {}).get(name, {}).get("replicas", 0) > 0 for name in SERVICES
            )

        wait_until(
            all_up, timeout=180, message="all eight services in /health", alive=up.check_alive
        )
        ui, system.ui_url = start_ui(env, gateway_url, workdir)
        system.children.append(ui)
        yield system
    except BaseException:
        _print_logs(workdir)
        raise
    finally:
        for child in reversed(system.children):
            child.stop(signal.SIGINT if child is up else signal.SIGTERM)
    if request.session.testsfailed > failed_before:
        # Straight to the terminal: a module fixture's teardown output is not in any report.
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            _print_logs(workdir)


def _print_logs(workdir: Path) -> None:
    for log in sorted(workdir.rglob("*.log")):
        print(f"--- {log} ---\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def ui_log(system: System) -> Callable[[], str]:
    return system.children[-1].log


@dataclass
class Browser:
    page: Any
    errors: list[str]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A page in Debian's headless Chromium; page errors are collected for the test."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    playwright_api = pytest.importorskip(
        "playwright.async_api", reason="playwright is not installed (pip install playwright)"
    )
    async with playwright_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        page = await chromium.new_page(viewport={"width": 1600, "height": 1100})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
        page.on(
            "console",
            lambda msg: (
                errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
            ),
        )
        try:
            yield Browser(page, errors)
        finally:
            await chromium.close()
