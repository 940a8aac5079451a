"""One running instance per exclusive service (hean.core.lease), as real `python -m
hean.risk` processes on a real redis-server.

Two risk instances would each see part of the fills and size against half the exposure.
So a second one waits as a standby: no health snapshot, no consumer in the group, nothing
restored. It takes over at once when the first stops or is killed, long before the lease's
TTL would have let it, and a standby stops cleanly on SIGTERM. An instance whose lease
another instance took stops with exit status 1.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from hean.core.event_streams import stream_key
from hean.core.lease import holder_consumer, lease_key
from hean.core.types import EventType
from tests.helpers import eventually, stop_processes

KEY = lease_key("risk")


class Instances:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, instance: str, **extra: str) -> subprocess.Popen[bytes]:
        env = dict(self.env, HEALTH_PORT="0", INSTANCE_ID=instance, **extra)
        log = (self.logs / f"{instance}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "hean.risk"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[instance] = proc
        return proc

    def log(self, instance: str) -> str:
        return (self.logs / f"{instance}.log").read_text(errors="replace")

    def stop(self, instance: str, sig: int = signal.SIGTERM) -> int:
        proc = self.procs.pop(instance)
        proc.send_signal(sig)
        return proc.wait(timeout=30)

    def stop_all(self) -> None:
        stop_processes(self.procs.values(), timeout=15)


@pytest.fixture
def risk(subprocess_env: dict[str, str], tmp_path: Path) -> Iterator[Instances]:
    env = dict(subprocess_env, EVENT_BLOCK_MS="50", HEALTH_INTERVAL_S="0.5", LOG_LEVEL="INFO")
    # Long: every takeover below must come from a release or a gone holder, not expiry.
    env["SERVICE_LEASE_TTL_S"] = "60"
    env.pop("EXCHANGE", None)
    instances = Instances(env, tmp_path)
    yield instances
    instances.stop_all()


def holder(client: redis.Redis) -> str | None:
    value: Any = client.get(KEY)
    return None if value is None else holder_consumer(value.decode())


def running(client: redis.Redis, instance: str) -> bool:
    """Its health snapshot is in Redis: written only once its components started."""
    return bool(client.exists(f"hean:health:risk:{instance}"))


def consumers(client: redis.Redis) -> set[str]:
    """Every consumer of the risk group on any of its streams."""
    found: set[str] = set()
    for etype in (EventType.SIGNAL, EventType.ORDER_FILLED, EventType.TICK):
        infos: Any = client.xinfo_consumers(stream_key(etype), "risk")
        found |= {i["name"].decode() for i in infos}
    return found


def names(client: redis.Redis) -> set[str]:
    clients: Any = client.client_list()
    return {str(c.get("name", "")) for c in clients}


def wait(check: Any, message: str, timeout: float = 30.0) -> None:
    async def predicate() -> bool:
        return bool(check())

    asyncio.run(eventually(predicate, timeout=timeout, interval=0.1, message=message))


@pytest.mark.timeout(180)
def test_a_second_instance_waits_as_standby_and_takes_over_when_the_first_goes(
    risk: Instances, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    risk.start("risk-1")
    wait(lambda: holder(client) == "risk:risk-1" and running(client, "risk-1"), "risk-1 up")

    risk.start("risk-2")
    risk.start("risk-3")
    for standby in ("risk-2", "risk-3"):
        wait(lambda s=standby: "waits as a standby" in risk.log(s), f"{standby} waiting")
        assert "another risk is running (risk:risk-1)" in risk.log(standby)
    # A standby started nothing: no snapshot, no bus (no connection under its consumer
    # name, not a consumer of the group), and the holder is unchanged.
    assert not running(client, "risk-2") and not running(client, "risk-3")
    assert "hean-consumer:risk:risk-1" in names(client)
    assert not names(client) & {"hean-consumer:risk:risk-2", "hean-consumer:risk:risk-3"}
    assert not consumers(client) & {"risk:risk-2", "risk:risk-3"}
    assert holder(client) == "risk:risk-1"

    # A standby stops cleanly; the running one is unaffected.
    assert risk.stop("risk-3") == 0
    assert holder(client) == "risk:risk-1"

    # The first stops: it releases the lease, and the standby takes over at once.
    assert risk.stop("risk-1") == 0
    wait(lambda: holder(client) == "risk:risk-2" and running(client, "risk-2"), "risk-2 took over")
    assert "risk running as risk:risk-2" in risk.log("risk-2")

    # Killed (no release): a new standby sees that no connection carries its name.
    risk.start("risk-4")
    wait(lambda: "waits as a standby" in risk.log("risk-4"), "risk-4 waiting")
    risk.stop("risk-2", signal.SIGKILL)
    wait(lambda: holder(client) == "risk:risk-4" and running(client, "risk-4"), "risk-4 took over")
    assert "taking over from risk:risk-2, which is gone" in risk.log("risk-4")
    client.close()


@pytest.mark.timeout(120)
def test_an_instance_that_lost_its_lease_stops_with_status_1(
    risk: Instances, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    proc = risk.start("risk-1", SERVICE_LEASE_TTL_S="1")
    wait(lambda: holder(client) == "risk:risk-1" and running(client, "risk-1"), "risk-1 up")
    # As if it had been cut off past the TTL and a standby had taken over meanwhile.
    client.set(KEY, "risk:risk-9 0123456789abcdef", px=60_000)
    assert proc.wait(timeout=30) == 1
    log = risk.log("risk-1")
    assert "another instance (risk:risk-9) took over this service's lease" in log
    assert "risk stopping" in log  # stopped cleanly, in-flight work finished
    assert holder(client) == "risk:risk-9"  # the successor's lease is left alone
    risk.procs.pop("risk-1")
    client.close()
