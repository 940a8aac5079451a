"""`hean up` as a real process tree on a real redis-server: all eight services come up,
the consumer groups it pre-creates cover every group the services make, Ctrl-C stops all."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from hean.cli.up import SERVICES
from hean.core.event_streams import STREAM_PREFIX
from tests.conftest import ROOT, free_port
from tests.helpers import eventually

HEAN = str(Path(sys.executable).with_name("hean"))


@pytest.mark.timeout(240)
def test_up_starts_all_services_and_stops_cleanly(redis_url, subprocess_env, tmp_path):
    gateway_port = free_port()
    base = free_port()
    # A block of free ports for the services' health endpoints.
    while not all(_free(base + i) for i in range(10)):
        base = free_port()
    proc = subprocess.Popen(
        [HEAN, "up", "--redis-url", redis_url, "--gateway-port", str(gateway_port),
         "--ui-port", "0",
         "--health-port-base", str(base), "--workdir", str(tmp_path), "--replay-speed", "600",
         "--interval", "0.5"],
        env={**subprocess_env, "COLUMNS": "300"}, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    client = redis.Redis.from_url(redis_url)
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:

        async def running() -> bool:
            if proc.poll() is not None:  # gave up: say why now, not after the timeout
                reader.join(timeout=5)
                raise AssertionError(f"hean up exited with {proc.returncode}:\n{''.join(lines)}")
            return any("HEAN is running in paper mode" in line for line in lines)

        asyncio.run(eventually(running, timeout=180, message="hean up to report it runs"))

        async def all_up() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    body = (await http.get(f"http://127.0.0.1:{gateway_port}/health")).json()
            except httpx.HTTPError:
                return False
            return body["missing_services"] == [] and len(body["services"]) >= 8

        asyncio.run(eventually(all_up, timeout=180, message="all eight services in /health"))

        async def ticks_flow() -> bool:
            return int(client.xlen(f"{STREAM_PREFIX}TICK")) > 0

        asyncio.run(eventually(ticks_flow, timeout=60, message="ticks in Redis"))

        async def status_line() -> bool:
            return any(" | health " in line for line in lines)

        asyncio.run(eventually(status_line, timeout=30, message="a status line"))

        # A second system on the same Redis is refused before it starts anything: its
        # services would only wait as standbys of these (hean.core.lease).
        second = subprocess.run(
            [HEAN, "up", "--redis-url", redis_url, "--gateway-port", str(free_port()),
             "--ui-port", "0", "--health-port-base", str(free_port()),
             "--workdir", str(tmp_path / "second")],
            env={**subprocess_env, "COLUMNS": "300"}, cwd=ROOT, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert second.returncode == 1, second.stdout + second.stderr
        refusal = " ".join((second.stdout + second.stderr).split())
        assert f"HEAN is already running against {redis_url}" in refusal
        assert "execution (execution:" in refusal and "Traceback" not in refusal

        # Every group a service created must be one `hean up` created first.
        planned = {(f"{STREAM_PREFIX}{t.value}", s.name) for s in SERVICES for t in s.subscribes}
        for key in client.scan_iter(match=f"{STREAM_PREFIX}*"):
            groups: Any = client.xinfo_groups(key)
            for group in groups:
                pair = (key.decode(), group["name"].decode())
                assert pair in planned, f"{pair} is not pre-created by hean up"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
        reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "HEAN is running in paper mode" in out
    assert "ticks" in out and "health" in out
    assert "stopped." in out and "Traceback" not in out
    # A clean stop withdraws every snapshot and releases every service's lease.
    assert list(client.scan_iter(match="hean:health:*")) == []
    assert list(client.scan_iter(match="hean:lease:*")) == []
    client.close()


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
