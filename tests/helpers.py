"""Small test utilities: poll with a deadline instead of sleeping for a fixed time; stop
the service processes a test started; a dead-letter entry as the bus writes one."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from hean.core.event_streams import dead_letter_fields, stream_key
from hean.core.types import EventType


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> None:
    """Wait until `predicate()` is true; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(interval)


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM every process still running, then wait for each (SIGKILL after `timeout`)."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dead_letter(
    payload: bytes,
    *,
    event_type: EventType = EventType.SIGNAL,
    group: str = "risk",
    error: str = "ValueError: boom",
) -> Any:
    """The fields of a dead letter of `payload`, taken from `event_type`'s stream by
    `group` after five deliveries (XADD them to `DLQ_STREAM`)."""
    return dead_letter_fields(
        stream=stream_key(event_type),
        entry_id="1-0",
        group=group,
        consumer=f"{group}:h:1",
        deliveries=5,
        error=error,
        payload=payload,
        dead_at_ns=time.time_ns(),
    )
