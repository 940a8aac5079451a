"""The kill switch seen from outside the risk service: its state and its command stream.

Risk owns the switch (docs/ORDER_PATH.md): the hash `hean:risk:killswitch` holds its state
and the stream `hean:risk:commands` takes `trigger` / `reset` commands, read by risk's
consumer group `risk` and acked once applied. The gateway and the `hean` CLI use only this,
never the risk package (services talk through Redis).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from hean.core.event_streams import as_str, entry_position

KILLSWITCH_KEY: Final = "hean:risk:killswitch"
COMMAND_STREAM: Final = "hean:risk:commands"
COMMAND_GROUP: Final = "risk"
MAX_REASON_LENGTH: Final = 500

Command = Literal["trigger", "reset"]


async def killswitch_state(client: aioredis.Redis) -> dict[str, Any]:
    """The switch as risk last persisted it (`known` is false if risk never wrote it)."""
    raw = {as_str(k): as_str(v) for k, v in (await client.hgetall(KILLSWITCH_KEY)).items()}
    timestamp = int(raw.get("timestamp") or 0) if raw.get("timestamp", "").isdigit() else 0
    return {
        "active": raw.get("active") == "1",
        "reason": raw.get("reason", ""),
        "timestamp_ns": timestamp,
        "announced": raw.get("announced") == "1" if raw else False,
        "known": bool(raw),
    }


@dataclass(frozen=True, slots=True)
class CommandResult:
    command_id: str
    applied: bool
    risk_consuming: bool
    state: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "applied": self.applied,
            "killswitch": self.state,
        }


async def command_applied(client: aioredis.Redis, command_id: str) -> tuple[bool, bool]:
    """(applied, risk_consuming): risk's group has read past the entry and acked it."""
    try:
        groups: Any = await client.xinfo_groups(COMMAND_STREAM)
    except ResponseError:
        return False, False  # no stream yet
    group = next((g for g in groups if as_str(g.get("name", b"")) == COMMAND_GROUP), None)
    if group is None:
        return False, False
    last = as_str(group.get("last-delivered-id", b"0-0"))
    if entry_position(last) < entry_position(command_id):
        return False, True
    pending: Any = await client.xpending_range(
        COMMAND_STREAM, COMMAND_GROUP, min=command_id, max=command_id, count=1
    )
    return not pending, True


async def send_command(
    client: aioredis.Redis,
    command: Command,
    *,
    reason: str = "",
    source: str = "gateway",
    wait_s: float = 5.0,
    poll_s: float = 0.05,
) -> CommandResult:
    """Append a command for risk and wait up to `wait_s` until risk has applied it."""
    fields: dict[str, str] = {"command": command, "source": source}
    if command == "trigger":
        fields["reason"] = reason
    command_id = as_str(await client.xadd(COMMAND_STREAM, fields))  # type: ignore[arg-type]
    deadline = time.monotonic() + wait_s
    applied, consuming = await command_applied(client, command_id)
    # No consumer group at all: risk has never run here, waiting would only delay the answer.
    while not applied and consuming and time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
        applied, consuming = await command_applied(client, command_id)
    return CommandResult(command_id, applied, consuming, await killswitch_state(client))
