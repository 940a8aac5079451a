"""The order ledger: the at-most-once marker for ORDER_APPROVED and the list of open orders.

`claim(order_id)` succeeds once per order id, ever (within the marker's TTL). In Redis the
marker and the open-order index are written by one Lua script, so a crash cannot leave one
without the other. A redelivered ORDER_APPROVED finds the marker and places nothing. The
marker has no TTL while its order is open (a resting order may work for weeks); finishing
the order gives it `ttl_s` (seven days), and a fill recorded later never writes a marker
that has expired.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import redis.asyncio as aioredis

from hean.core.event_streams import as_str
from hean.core.resp import RespConnection

ORDER_KEY_PREFIX = "hean:execution:order:"
OPEN_ORDERS_KEY = "hean:execution:open"
#: Past this a claim's reply counts as lost (the handler fails and the bus retries; the
#: same claimer may claim again).
CLAIM_TIMEOUT_S = 5.0

# A claim succeeds once per order, ever; and again for the same claimer while the order is
# still working, because a claim whose reply was lost (Redis restarting) must not leave the
# order approved and never placed. The caller keeps what it placed in memory, so a repeat
# claim never places twice.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  local now = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'status', 'working', 'symbol', ARGV[1], 'size', ARGV[2],
             'filled', '0', 'claimer', ARGV[4],
             'claimed_ms', now[1] * 1000 + math.floor(now[2] / 1000))
  redis.call('SADD', KEYS[2], ARGV[3])
  return 1
end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'claimer') == ARGV[4]
   and redis.call('HGET', KEYS[1], 'status') == 'working' then
  return 1
end
return 0
"""

_FINISH = """
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'filled', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('SREM', KEYS[2], ARGV[3])
return 1
"""

# A fill after the marker expired (seven days after its order finished) writes nothing: a
# bare HSET would bring back a marker with no TTL, forever.
_RECORD_FILL = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'filled', ARGV[1])
end
return 1
"""


class OrderLedger(Protocol):
    async def claim(self, order_id: str, symbol: str, size: str, claimer: str = "") -> bool: ...

    async def release(self, order_id: str) -> None: ...

    async def record_fill(self, order_id: str, filled: str) -> None: ...

    async def finish(self, order_id: str, status: str, filled: str) -> None: ...

    async def open_orders(self) -> dict[str, dict[str, str]]: ...

    async def aclose(self) -> None: ...


class MemoryLedger:
    """The ledger in process memory (tests, single-process runs)."""

    def __init__(self) -> None:
        self.orders: dict[str, dict[str, str]] = {}
        self.open: set[str] = set()

    async def claim(self, order_id: str, symbol: str, size: str, claimer: str = "") -> bool:
        known = self.orders.get(order_id)
        if known is not None:
            return bool(claimer) and known == {**known, "claimer": claimer, "status": "working"}
        self.orders[order_id] = {
            "status": "working",
            "symbol": symbol,
            "size": size,
            "filled": "0",
            "claimer": claimer,
        }
        self.open.add(order_id)
        return True

    async def release(self, order_id: str) -> None:
        self.orders.pop(order_id, None)
        self.open.discard(order_id)

    async def record_fill(self, order_id: str, filled: str) -> None:
        if order_id in self.orders:
            self.orders[order_id]["filled"] = filled

    async def finish(self, order_id: str, status: str, filled: str) -> None:
        if order_id in self.orders:
            self.orders[order_id].update(status=status, filled=filled)
        self.open.discard(order_id)

    async def open_orders(self) -> dict[str, dict[str, str]]:
        return {oid: dict(self.orders[oid]) for oid in self.open if oid in self.orders}

    async def aclose(self) -> None:
        pass


class RedisLedger:
    """The ledger in Redis: `hean:execution:order:<id>` hashes and the `open` set."""

    def __init__(
        self, client: aioredis.Redis, *, fast: RespConnection | None = None, ttl_s: int = 7 * 86_400
    ) -> None:
        self.client = client
        #: The claim is on the order path, between an approval and its placement: sent on
        #: `fast` (hean.core.resp, without redis-py's per-command cost) when given.
        self.fast = fast
        self.ttl_s = ttl_s
        self._claim = client.register_script(_CLAIM)

    async def claim(self, order_id: str, symbol: str, size: str, claimer: str = "") -> bool:
        keys = [ORDER_KEY_PREFIX + order_id, OPEN_ORDERS_KEY]
        args: list[str | int] = [symbol, size, order_id, claimer]
        if self.fast is None:
            return bool(await self._claim(keys=keys, args=args))
        async with asyncio.timeout(CLAIM_TIMEOUT_S):
            return bool(await self.fast.command("EVAL", _CLAIM, 2, *keys, *args))

    async def aclose(self) -> None:
        if self.fast is not None:
            await self.fast.aclose()

    async def release(self, order_id: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(ORDER_KEY_PREFIX + order_id)
            pipe.srem(OPEN_ORDERS_KEY, order_id)
            await pipe.execute()

    async def record_fill(self, order_id: str, filled: str) -> None:
        await self.client.execute_command(*self.record_fill_command(order_id, filled))  # type: ignore[no-untyped-call]

    async def finish(self, order_id: str, status: str, filled: str) -> None:
        await self.client.execute_command(*self.finish_command(order_id, status, filled))  # type: ignore[no-untyped-call]

    # The same writes as Redis commands, for `EventBus.write_on_ack` (both idempotent).

    @staticmethod
    def record_fill_command(order_id: str, filled: str) -> tuple[str | int, ...]:
        return ("EVAL", _RECORD_FILL, 1, ORDER_KEY_PREFIX + order_id, filled)

    def finish_command(self, order_id: str, status: str, filled: str) -> tuple[str | int, ...]:
        keys = (ORDER_KEY_PREFIX + order_id, OPEN_ORDERS_KEY)
        return ("EVAL", _FINISH, 2, *keys, status, filled, order_id, self.ttl_s)

    async def open_orders(self) -> dict[str, dict[str, str]]:
        ids = [as_str(i) for i in await self.client.smembers(OPEN_ORDERS_KEY)]
        result: dict[str, dict[str, str]] = {}
        for order_id in sorted(ids):
            raw = await self.client.hgetall(ORDER_KEY_PREFIX + order_id)
            result[order_id] = {as_str(k): as_str(v) for k, v in raw.items()}
        return result
