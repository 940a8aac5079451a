"""The event bus: `subscribe(EventType, handler)` and `await publish(Event)`.

Two transports behind one API:

* `InMemoryTransport` (the default, `EventBus()`): one process, no Redis. For unit tests,
  for running components together, and for fast replay.
* `RedisStreamsTransport`: Redis Streams consumer groups. Group = service name, consumer =
  one per process, so replicas of a service split the work and different services each get
  every event. An entry is acked only after every local handler of its type has returned
  and every event those handlers published has reached Redis (the worker does not wait
  for that: it takes its next event while the outbox writes, and the ack follows). Failed
  entries are retried (XCLAIM, so Redis counts deliveries) and dead-lettered after
  `max_deliveries` with the error; a `PermanentError` and malformed entries are
  dead-lettered at once. Entries of a crashed consumer are taken over as soon as no Redis
  connection carries its name (CLIENT LIST; at start before anything new, so in order),
  and any entry idle past `claim_idle_ms` with XAUTOCLAIM. While Redis is unreachable,
  publishes wait in a bounded outbox that is flushed in order on reconnect; past the
  bound publish raises "Queue is full".

Handlers run on `worker_count` workers; events with the same key (symbol, else order id,
else type) always go to the same worker, so per-symbol order is kept while symbols run in
parallel. See docs/adr/0002-event-bus-delivery.md.

A subscription with `conflate=True` (market data a service only marks to, such as TICKs
for risk and portfolio) is read every `conflate_interval_s` instead of as it arrives, and
of the entries read together only the newest per key is handled; the older ones are
validated (an invalid one is dead-lettered) and acked unhandled (counted in
`hean_events_handled_total{outcome="conflated"}`). Before the other
(plain) events a read returns are handed out, the conflated ones already in Redis are taken
first, so per key a plain event is handled after the newest conflated event added before it
(risk marks to the tick an order was priced against before it checks that order). A service
that needs every event of a type subscribes without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import random
import time
import zlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hean.core.errors import PermanentError, QueueFullError
from hean.core.event_streams import (
    DLQ_STREAM,
    EVENT_FIELD,
    MAX_DEAD_PAYLOAD_BYTES,
    as_str,
    check_size,
    dead_letter_fields,
    decode_entry,
    ensure_group,
    entry_position,
    stream_key,
    stream_maxlen,
)
from hean.core.metrics import Metrics
from hean.core.resp import (
    PendingReplies,
    RespConnection,
    entries_reply,
    pack,
    xread_reply,
    xreadgroup_args,
)
from hean.core.settings import CoreSettings, redact_url
from hean.core.topology import ensure_topology
from hean.core.types import Event, EventType, InvalidEventError, current_event

log = logging.getLogger(__name__)

Handler = Callable[[Event], Awaitable[None] | None]

#: Redis commands (name, then arguments) for `EventBus.publish(..., then=...)`.
Commands = Sequence[Sequence[Any]]

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
#: Error codes of a Redis that cannot take writes for now, beside redis-py's classes below.
_PAUSED_CODES = frozenset({"BUSY", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN"})


def refused_for_now(error: BaseException) -> bool:
    """Whether Redis refused a write only for now: out of memory under `noeviction`, a
    replica (READONLY), a script running too long (BUSY), ... Such a write is kept and sent
    again, in its place, as over a lost connection; other refusals (WRONGTYPE, NOPERM, a
    script error) cannot succeed by waiting and go to the publisher."""
    if isinstance(error, OutOfMemoryError | ReadOnlyError | TryAgainError):
        return True
    return isinstance(error, ResponseError) and str(error).split(" ", 1)[0] in _PAUSED_CODES


def _in_chain(
    error: BaseException, matches: Callable[[BaseException], bool]
) -> BaseException | None:
    """The first of `error` and the errors it was raised from that `matches`, if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if matches(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def redis_unavailable(error: BaseException) -> bool:
    """Whether `error` is, or was raised from, Redis being out of reach or refusing writes
    for now (`refused_for_now`): something to wait out and try again, not a fault."""
    return _in_chain(error, lambda e: isinstance(e, _REDIS_DOWN) or refused_for_now(e)) is not None


class BusState(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class BusHealth:
    state: BusState
    transport: str
    connected: bool
    queue_size: int
    outbox_size: int
    in_flight: int
    dead_letters: int
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class _Subscription:
    event_type: EventType
    handler: Handler
    name: str
    conflate: bool = False


@dataclass(slots=True)
class Delivery:
    """One event being handled in this process, with what is left to do for it."""

    event: Event
    stream: str = ""
    entry_id: str = ""
    raw: bytes = b""
    deliveries: int = 1
    done: set[str] = field(default_factory=set)
    #: Writes its ack waits for: what the handlers published, and `EventBus.ack_after`.
    outputs: list[asyncio.Future[Any]] = field(default_factory=list)
    #: Redis commands to send with this event's ack (`EventBus.write_on_ack`).
    ack_commands: list[tuple[Any, ...]] = field(default_factory=list)
    last_error: str | None = None
    max_deliveries: int = 0  # 0: unknown
    #: Set by `EventBus.hold`: resolved once the held event is handled (or abandoned).
    held: asyncio.Future[None] | None = None
    #: Its partition key once a handler has called `write_on_ack`: its ack then waits for
    #: those of its key that wrote before it (`RedisStreamsTransport._release_writes`).
    writes_key: str | None = None
    #: How it finished (True: to be acked) while it waits for those.
    finished: bool | None = None


def is_last_attempt() -> bool:
    """True inside a handler running on the event's last delivery before it would be
    dead-lettered: the handler's chance to turn a failure into a visible outcome (an order
    rejected with a reason) instead of a dead letter."""
    delivery = _current_delivery.get()
    return (
        delivery is not None
        and delivery.max_deliveries > 0
        and delivery.deliveries >= delivery.max_deliveries
    )


_current_delivery: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar(
    "hean_current_delivery", default=None
)


class _AbandonedError(Exception):
    """A held event let go unhandled (`HeldEvent.abandon`): not acked, delivered again."""


class HeldEvent:
    """An event its handler set aside (`EventBus.hold`): not acked when the handler
    returns, but once it is handled in a `resume()` block and what that block published
    is in Redis."""

    def __init__(self, delivery: Delivery, settled: asyncio.Future[None]) -> None:
        self._delivery = delivery
        self._settled = settled

    @property
    def event(self) -> Event:
        return self._delivery.event

    @contextlib.contextmanager
    def resume(self) -> Iterator[None]:
        """Handle the held event now: inside the block, publishes and `write_on_ack` count
        as this event's (its ack waits for them and carries the writes), wherever the block
        runs (another event's handler, a timer). An exception leaves the event unacked; it
        is delivered again once idle."""
        if self._settled.done():
            raise RuntimeError(f"{self.event.event_id} was already resumed or abandoned")
        delivery = self._delivery
        token = _current_delivery.set(delivery)
        first = len(delivery.outputs)
        try:
            yield
        except BaseException as exc:
            self._settled.set_exception(exc)
            self._settled.exception()  # the bus reads it (not acked); no "never retrieved"
            raise
        finally:
            _current_delivery.reset(token)

        def written() -> None:
            if not self._settled.done():
                self._settled.set_result(None)

        when_all_done([o for o in delivery.outputs[first:] if o is not self._settled], written)

    def abandon(self) -> None:
        """Let the event go unhandled and unacked (a service stopping): it is delivered again,
        to this consumer's successor, in stream order."""
        if not self._settled.done():
            self._settled.set_exception(_AbandonedError())
            self._settled.exception()


def _drop_hold(delivery: Delivery) -> None:
    """A handler that held its event, then failed: the hold is void (resuming it raises)."""
    held = delivery.held
    if held is not None:
        delivery.held = None
        delivery.outputs.remove(held)
        if not held.done():
            held.set_exception(_AbandonedError())
            held.exception()  # retrieved: nobody waits for it any more


def partition_key(event: Event) -> str:
    """Events with one key are handled in order: symbol, else order id, else event type."""
    data = event.data
    for name in ("symbol", "order_id"):
        value = data.get(name)
        if value:
            return str(value)
    return event.event_type.value


def worker_lane(key: str, workers: int) -> int:
    """The worker that handles events of partition key `key`: events of one lane are handled
    one at a time, in order."""
    return zlib.crc32(key.encode()) % workers


def _handler_name(handler: Handler) -> str:
    owner = getattr(handler, "__self__", None)
    qual = getattr(handler, "__qualname__", None) or repr(handler)
    if owner is not None:
        return f"{type(owner).__module__}.{qual}"
    return f"{getattr(handler, '__module__', '?')}.{qual}"


class Backoff:
    """Exponential backoff with full jitter, capped; `reset()` after a success."""

    def __init__(self, initial: float = 0.05, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0

    def next_delay(self) -> float:
        cap = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt += 1
        return random.uniform(cap / 2, cap)

    def reset(self) -> None:
        self.attempt = 0


class Dispatcher:
    """Runs an event's local handlers; remembers which succeeded so a retry runs only the
    ones that failed (within this process)."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._subs: dict[EventType, list[_Subscription]] = {}
        self.metrics = metrics
        #: Per event type, the handle-latency histogram and the ok / error counters with
        #: their labels bound: `labels()` costs more than the observation it precedes, and
        #: every handled event pays it.
        self._handled: dict[EventType, tuple[Histogram, Counter, Counter]] = {}

    def add(self, sub: _Subscription) -> None:
        subs = self._subs.setdefault(sub.event_type, [])
        if any(s.name == sub.name for s in subs):
            raise ValueError(f"{sub.name} is already subscribed to {sub.event_type.value}")
        subs.append(sub)

    def remove(self, event_type: EventType, handler: Handler) -> None:
        subs = self._subs.get(event_type, [])
        self._subs[event_type] = [s for s in subs if s.handler != handler]

    @property
    def event_types(self) -> list[EventType]:
        return [t for t, subs in self._subs.items() if subs]

    @property
    def conflated_types(self) -> list[EventType]:
        """Types every local handler takes conflated (see the module docstring)."""
        return [t for t, subs in self._subs.items() if subs and all(s.conflate for s in subs)]

    def has(self, event_type: EventType) -> bool:
        return bool(self._subs.get(event_type))

    async def run(self, delivery: Delivery) -> list[tuple[str, BaseException]]:
        """Run each not-yet-done handler; return the failures (name, error)."""
        failures: list[tuple[str, BaseException]] = []
        event = delivery.event
        token_event = current_event.set(event)
        token_delivery = _current_delivery.set(delivery)
        started = time.perf_counter()
        try:
            for sub in list(self._subs.get(event.event_type, ())):
                if sub.name in delivery.done:
                    continue
                writes = len(delivery.ack_commands)
                try:
                    result = sub.handler(event)
                    if inspect.isawaitable(result):
                        await result
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a handler error never crashes the bus
                    del delivery.ack_commands[writes:]  # a failed handler's writes: its retry's
                    failures.append((sub.name, exc))
                    log.warning(
                        "handler %s failed on %s %s (delivery %d): %s: %s",
                        sub.name,
                        event.event_type.value,
                        event.event_id,
                        delivery.deliveries,
                        type(exc).__name__,
                        exc,
                    )
                else:
                    delivery.done.add(sub.name)
        finally:
            current_event.reset(token_event)
            _current_delivery.reset(token_delivery)
        if self.metrics is not None:
            latency, ok, error = self._handled_metrics(event.event_type, self.metrics)
            latency.observe(time.perf_counter() - started)
            (error if failures else ok).inc()
        return failures

    def _handled_metrics(
        self, event_type: EventType, metrics: Metrics
    ) -> tuple[Histogram, Counter, Counter]:
        bound = self._handled.get(event_type)
        if bound is None:
            name = event_type.value
            bound = (
                metrics.latency_seconds.labels(stage=f"handle_{name}"),
                metrics.events_handled.labels(name, "ok"),
                metrics.events_handled.labels(name, "error"),
            )
            self._handled[event_type] = bound
        return bound


def _describe_failures(failures: list[tuple[str, BaseException]]) -> str:
    return "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in failures)


def _permanent(failures: list[tuple[str, BaseException]]) -> bool:
    """A `PermanentError` (bad input, a refused order) cannot succeed on a retry."""
    return any(isinstance(exc, PermanentError) for _, exc in failures)


class Transport(ABC):
    """What the bus needs from a transport."""

    name = "transport"

    def __init__(self) -> None:
        self.dispatcher: Dispatcher = Dispatcher(None)
        self.metrics: Metrics | None = None
        self.source = "local"

    def bind(self, dispatcher: Dispatcher, metrics: Metrics | None, source: str) -> None:
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.source = source

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self, drain_timeout: float = 5.0) -> None: ...

    async def stop_consuming(self, drain_timeout: float = 5.0) -> None:
        """Stop taking new events and finish in-flight ones; publishing still works."""
        await self.flush(drain_timeout)

    @abstractmethod
    async def publish(self, event: Event, then: Commands = ()) -> None: ...

    @abstractmethod
    async def flush(self, timeout: float | None = None) -> None: ...

    def write_on_ack(self, command: Sequence[Any]) -> None:
        """See `EventBus.write_on_ack`."""
        raise ValueError(f"{type(self).__name__} has no Redis to send {command[0]!r} to")

    def publish_nowait(self, event: Event, then: Commands = ()) -> asyncio.Future[str]:
        """See `EventBus.publish_nowait`."""
        raise ValueError(f"{type(self).__name__} cannot publish without waiting")

    def ack_after(self, future: asyncio.Future[Any]) -> None:
        """See `EventBus.ack_after`."""
        delivery = _current_delivery.get()
        if delivery is None:
            raise RuntimeError("ack_after() is for handlers: no event is being handled")
        delivery.outputs.append(future)

    def hold(self) -> HeldEvent:
        """See `EventBus.hold`."""
        delivery = _current_delivery.get()
        if delivery is None:
            raise RuntimeError("hold() is for handlers: no event is being handled")
        if delivery.held is not None:
            raise RuntimeError(f"{delivery.event.event_id} is already held")
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        delivery.outputs.append(settled)
        delivery.held = settled
        return HeldEvent(delivery, settled)

    def subscribed(self, event_type: EventType) -> None:  # noqa: B027 - optional hook
        """A handler for `event_type` was added (the Redis transport starts reading it)."""

    @abstractmethod
    def health(self) -> BusHealth: ...


class _Lane:
    """One worker's queue: an unbounded FIFO with one waiting getter. `asyncio.Queue`
    does the same, but looks the running loop up for every `get` that waits, which on
    CPython 3.11 is a getpid() system call, once per event on a service's hot path."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Delivery | None] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Delivery | None) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, loop: asyncio.AbstractEventLoop) -> Delivery | None:
        while not self._items:
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class _Workers:
    """`count` ordered queues; a delivery goes to the queue its partition key hashes to."""

    def __init__(
        self, count: int, handle: Callable[[Delivery], Awaitable[None]], name: str
    ) -> None:
        self.queues: list[_Lane] = [_Lane() for _ in range(count)]
        self._handle = handle
        self._tasks: list[asyncio.Task[None]] = []
        self._name = name
        self.size = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(q), name=f"{self._name}-worker-{i}")
                for i, q in enumerate(self.queues)
            ]

    def put(self, delivery: Delivery) -> None:
        index = worker_lane(partition_key(delivery.event), len(self.queues))
        self.size += 1
        self.idle.clear()
        self.queues[index].put_nowait(delivery)

    async def _run(self, queue: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delivery = await queue.get(loop)
            if delivery is None:
                return
            try:
                await self._handle(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in the bus itself: log it, keep the worker alive
                log.exception("event bus worker error on %s", delivery.event.event_id)
            finally:
                self.size -= 1
                if self.size == 0:
                    self.idle.set()

    async def stop(self, timeout: float) -> None:
        for q in self.queues:
            q.put_nowait(None)
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks = []


class InMemoryTransport(Transport):
    """Everything in one process: bounded queue, parallel ordered workers, local retries and
    an in-memory dead-letter list."""

    name = "memory"

    def __init__(
        self,
        *,
        max_queue_size: int = 50_000,
        worker_count: int = 4,
        max_deliveries: int = 5,
        retry_delay: float = 0.05,
    ) -> None:
        super().__init__()
        self.max_queue_size = max_queue_size
        self.max_deliveries = max_deliveries
        self.retry_delay = retry_delay
        self._workers = _Workers(worker_count, self._handle, "memory")
        self.dead_letters: deque[tuple[Event, str]] = deque(maxlen=10_000)
        self.dead_letter_count = 0
        self._started = False

    async def start(self) -> None:
        self._workers.start()
        self._started = True

    async def stop(self, drain_timeout: float = 5.0) -> None:
        if self._started:
            await self.flush(drain_timeout)
            await self._workers.stop(drain_timeout)
            self._workers = _Workers(len(self._workers.queues), self._handle, "memory")
            self._started = False

    async def publish(self, event: Event, then: Commands = ()) -> None:
        if then:
            raise ValueError("the in-memory transport has no Redis to run `then` commands on")
        if not self.dispatcher.has(event.event_type):
            return
        if self._workers.size >= self.max_queue_size:
            raise QueueFullError("the in-memory event queue", self.max_queue_size)
        if not self._started:
            await self.start()
        self._workers.put(Delivery(event=event, max_deliveries=self.max_deliveries))

    async def _handle(self, delivery: Delivery) -> None:
        while True:
            failures = await self.dispatcher.run(delivery)
            if not failures:
                return
            _drop_hold(delivery)
            delivery.last_error = _describe_failures(failures)
            if delivery.deliveries >= self.max_deliveries or _permanent(failures):
                self.dead_letters.append((delivery.event, delivery.last_error))
                self.dead_letter_count += 1
                if self.metrics is not None:
                    self.metrics.dead_letters.labels(delivery.event.event_type.value).inc()
                log.error(
                    "dead-lettered %s %s after %d deliveries: %s",
                    delivery.event.event_type.value,
                    delivery.event.event_id,
                    delivery.deliveries,
                    delivery.last_error,
                )
                return
            delivery.deliveries += 1
            await asyncio.sleep(self.retry_delay * 2 ** (delivery.deliveries - 2))

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued event (and what its handlers published) is handled."""
        await asyncio.wait_for(self._workers.idle.wait(), timeout)

    def health(self) -> BusHealth:
        size = self._workers.size
        full = size >= self.max_queue_size
        return BusHealth(
            state=BusState.UNHEALTHY if full else BusState.HEALTHY,
            transport=self.name,
            connected=True,
            queue_size=size,
            outbox_size=0,
            in_flight=size,
            dead_letters=self.dead_letter_count,
            error_message="Queue is full" if full else None,
        )


#: Writes an event once per event id: a marker set in the same script as the XADD. A flush
#: interrupted by a dropped connection is sent again, and without this an entry Redis had
#: already written would appear twice (ADR 0002). Used for the streams kept for audit.
_PUBLISH_ONCE = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  return redis.call('XADD', KEYS[1], '*', 'event', ARGV[1])
end
return false
"""
#: An event with `then` commands (EventBus.publish): the commands run only if the XADD did.
#: In a plain pipeline Redis runs each command on its own, so a refused XADD (out of memory,
#: a key of the wrong type) would still save state that claims the event was written.
#: ARGV: payload, MAXLEN ('' for none), then per command its argument count and arguments.
_PUBLISH_THEN = """
local id
if ARGV[2] == '' then
  id = redis.call('XADD', KEYS[1], '*', 'event', ARGV[1])
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'event', ARGV[1])
end
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return id
"""
#: Seconds handled events' acks wait for an outbox write to carry them (see _ack_loop).
ACK_LINGER_S = 0.02
#: Seconds an outbox or ack pipeline may take before its connection counts as lost.
WRITE_TIMEOUT_S = 5.0
#: How long a read may take beyond its BLOCK time before the connection counts as lost.
READ_TIMEOUT_S = 5.0

PUBLISHED_KEY_PREFIX = "hean:published:"
PUBLISHED_TTL_S = 86_400


@dataclass(slots=True)
class _Outgoing:
    key: str
    payload: bytes
    maxlen: int | None
    event_type: str
    #: The once-only marker key, for events of the kept (audit) streams; None: plain XADD.
    marker: str | None
    # Only for events published by a handler: its input is acked once this resolves.
    future: asyncio.Future[str] | None
    #: Redis commands sent right after the XADD, in the same pipeline (EventBus.publish).
    then: tuple[tuple[Any, ...], ...] = ()
    #: Its place among the events this bus has published (1, 2, ...).
    seq: int = 0


@dataclass(frozen=True, slots=True)
class RedisBusConfig:
    """Tuning of the Redis transport; `from_settings` maps the EVENT_* variables."""

    url: str
    group: str
    consumer: str
    batch_size: int = 10
    worker_count: int = 4
    max_queue_size: int = 50_000
    block_ms: int = 200
    claim_idle_ms: int = 30_000
    claim_interval_ms: int = 5_000
    retry_delay_ms: int = 500
    max_deliveries: int = 5
    stream_maxlen: int = 100_000
    dlq_maxlen: int = 100_000
    reconnect_max_s: float = 5.0
    group_start_id: str = "$"
    consumer_gc_idle_ms: int = 600_000
    #: How often conflated subscriptions are read (see the module docstring).
    conflate_interval_s: float = 0.05
    # Create the system's consumer groups (hean.core.topology) before publishing anything.
    ensure_topology: bool = True
    #: The only consumer of its group (every HEAN service but ml-service): at start it takes
    #: over all of the group's pending entries before reading new ones.
    exclusive: bool = False

    @classmethod
    def from_settings(cls, settings: CoreSettings, **overrides: Any) -> RedisBusConfig:
        values: dict[str, Any] = {
            "url": settings.redis_url,
            "group": settings.service_name,
            "consumer": settings.consumer_name,
            "batch_size": settings.event_batch_size,
            "worker_count": settings.event_worker_count,
            "max_queue_size": settings.event_max_queue_size,
            "block_ms": settings.event_block_ms,
            "claim_idle_ms": settings.event_claim_idle_ms,
            "claim_interval_ms": settings.event_claim_interval_ms,
            "retry_delay_ms": settings.event_retry_delay_ms,
            "max_deliveries": settings.event_max_deliveries,
            "stream_maxlen": settings.event_stream_maxlen,
            "dlq_maxlen": settings.event_dlq_maxlen,
            "reconnect_max_s": settings.event_reconnect_max_s,
        }
        values.update(overrides)
        return cls(**values)


@dataclass(slots=True)
class _AckBatch:
    """Acks taken for one pipeline: entry ids per stream to XACK, and the handlers' writes
    (`EventBus.write_on_ack`) with the entries they belong to (`after`), whose XACKs go in
    a later pipeline, once Redis has taken the writes."""

    acks: dict[str, list[str]]
    #: Each write with the delivery that made it (dead-lettered if Redis refuses it).
    commands: list[tuple[Delivery, tuple[Any, ...]]]
    after: dict[str, list[str]]

    @property
    def commands_count(self) -> int:
        """How many replies the batch's commands get in a pipeline."""
        return len(self.commands) + sum(1 for ids in self.acks.values() if ids)


def when_all_done(futures: Sequence[asyncio.Future[Any]], callback: Callable[[], None]) -> None:
    """Call `callback` once every one of `futures` is done (at once if they all are)."""
    pending = [future for future in futures if not future.done()]
    if not pending:
        callback()
        return
    remaining = len(pending)

    def one_done(_: asyncio.Future[Any]) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            callback()

    for future in pending:
        future.add_done_callback(one_done)


def _transaction(commands: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """`commands` in MULTI/EXEC: Redis runs all of them or, when it refuses writes for now
    (out of memory: a command refused as it is queued, or EXEC itself), none. In a plain
    pipeline Redis could start taking writes again halfway: the events after a refused one
    would be written first, out of order, while it is kept and sent again."""
    return [("MULTI",), *commands, ("EXEC",)]


def _transaction_replies(raw: list[Any]) -> list[Any]:
    """The replies of the commands of a `_transaction`: EXEC's; or, when Redis discarded
    the transaction, its reason for every command (none of them ran)."""
    executed = raw[-1]
    if isinstance(executed, list):
        return executed
    refused = next((r for r in raw[1:-1] if isinstance(r, Exception)), executed)
    return [refused] * (len(raw) - 2)


def _malformed_in(raw: list[Any]) -> set[int]:
    """Indexes of the commands of a discarded `_transaction` that Redis refused as they were
    queued for what they are (an unknown command, a wrong number of arguments), not for now
    (`refused_for_now`): sending them again cannot help."""
    if isinstance(raw[-1], list):
        return set()
    return {
        i
        for i, reply in enumerate(raw[1:-1])
        if isinstance(reply, Exception) and not refused_for_now(reply)
    }


async def _confined_replies(
    conn: RespConnection, commands: list[tuple[Any, ...]], raw: list[Any]
) -> list[Any]:
    """The replies of `_transaction(commands)` from its raw replies; where Redis discarded
    it for malformed commands (`_malformed_in`), the others are sent again in a transaction
    of their own, so a malformed command fails alone, not the events and acks beside it."""
    malformed = _malformed_in(raw)
    if not malformed:
        return _transaction_replies(raw)
    rest = [command for i, command in enumerate(commands) if i not in malformed]
    replies = iter(())
    if rest:
        resent = await conn.execute(_transaction(rest), raise_on_error=False)
        replies = iter(await _confined_replies(conn, rest, resent))
    return [raw[1 + i] if i in malformed else next(replies) for i in range(len(commands))]


def _flatten(commands: Commands) -> list[Any]:
    """`_PUBLISH_THEN`'s ARGV tail: each command as its argument count, then its arguments."""
    flat: list[Any] = []
    for command in commands:
        flat.append(len(command))
        flat.extend(command)
    return flat


def consumer_client_name(consumer: str) -> str:
    """The name a consumer's Redis connections carry (`CLIENT SETNAME`, seen in `CLIENT
    LIST`): a consumer holding pending entries with no connection under its name is a
    process that is gone, and its entries can be taken over at once instead of after
    `claim_idle_ms`. Redis allows only characters 33-126 in a name."""
    return "hean-consumer:" + "".join(c if 33 <= ord(c) <= 126 else "_" for c in consumer)


async def client_names(client: aioredis.Redis) -> set[str] | None:
    """The names on Redis's client connections (`CLIENT LIST`); None where Redis refuses
    the command (an ACL)."""
    try:
        clients: Any = await client.client_list(_type="normal")
    except ResponseError:
        return None
    return {str(c.get("name", "")) for c in clients}


def _raw_partition_key(fields: dict[bytes, bytes] | None) -> str | None:
    """`partition_key` of an entry's event read from its JSON, not validated (None if the
    JSON is unreadable: then only validating it says what is wrong)."""
    try:
        payload = orjson.loads((fields or {})[EVENT_FIELD])
        data = payload["data"]
        for name in ("symbol", "order_id"):
            value = data.get(name)
            if value:
                return str(value)
        return str(payload["event_type"])
    except (KeyError, TypeError, AttributeError, orjson.JSONDecodeError):
        return None


def _wake(
    waiters: list[tuple[int, asyncio.Future[None]]], reached: int
) -> list[tuple[int, asyncio.Future[None]]]:
    """Resolve the waiters whose target sequence number is reached; return the others."""
    still: list[tuple[int, asyncio.Future[None]]] = []
    for target, waiter in waiters:
        if reached >= target:
            if not waiter.done():
                waiter.set_result(None)
        else:
            still.append((target, waiter))
    return still


class RedisStreamsTransport(Transport):
    """Redis Streams consumer groups with at-least-once delivery (see the module docstring)."""

    name = "redis"

    def __init__(self, config: RedisBusConfig) -> None:
        super().__init__()
        self.config = config
        self._client: aioredis.Redis | None = None
        #: The hot paths' connections (hean.core.resp, not redis-py: about 1 ms less per
        #: hop): the outbox's and the acks' pipelines, each under one `WRITE_TIMEOUT_S`,
        #: and the two read loops' (a blocking read holds its connection).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox_conn: RespConnection | None = None
        self._ack_conn: RespConnection | None = None
        self._reader: RespConnection | None = None
        self._conflated_reader: RespConnection | None = None
        self._outbox: deque[_Outgoing] = deque()
        self._published_seq = 0  # events accepted into the outbox so far
        #: Every event up to this sequence number has been answered for by Redis.
        self._flushed_seq = 0
        #: Redis refuses writes for now (`refused_for_now`): the error, while it lasts.
        self._refusing: str | None = None
        #: Set while the flush loop waits before sending refused writes again: nothing
        #: else writes the outbox meanwhile.
        self._refusal_pause = False
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        #: Handled deliveries whose ack still waits for their outputs' writes.
        self._settling = 0
        #: After a lost connection: entries Redis handed us whose reply never arrived are
        #: pending for us unseen; each read loop takes its own pending first (per loop).
        self._reread_plain = False
        self._reread_conflated = False
        self._settled = asyncio.Event()
        self._settled.set()
        self._outbox_wakeup = asyncio.Event()
        #: The outbox batch Redis is answering: its items (still at the outbox's front),
        #: the acks sent with it, the commands sent (for `_confined_replies`), its replies.
        self._writing: (
            tuple[list[_Outgoing], _AckBatch, list[tuple[Any, ...]], PendingReplies] | None
        ) = None
        self._acks: dict[str, list[str]] = {}
        self._ack_wakeup = asyncio.Event()
        self._ack_urgent = asyncio.Event()  # flush() waits: no lingering (_ack_loop)
        self._acks_queued = 0  # acks handed to the ack loop so far
        self._acks_sent = 0  # of those, how many Redis has answered for
        self._ack_waiters: list[tuple[int, asyncio.Future[None]]] = []
        #: EventBus.write_on_ack, in order, each with the delivery that made it.
        self._ack_commands: list[tuple[Delivery, tuple[Any, ...]]] = []
        #: Entries whose writes are in `_ack_commands`: acked once Redis has taken them.
        self._acks_after: dict[str, list[str]] = {}
        #: Per partition key, the deliveries that wrote on ack, in the order they first
        #: did: each one's ack (with its writes) is queued only after those before it.
        self._writes_order: dict[str, deque[Delivery]] = {}
        self._conflate_lock = asyncio.Lock()
        #: Per conflated stream and key, the newest entry handed out (see _accept_conflated).
        self._conflated_last: dict[tuple[str, str], tuple[int, int]] = {}
        #: Conflated entries superseded by a newer one, to validate and ack.
        self._superseded: list[tuple[str, str, Any]] = []
        self._in_flight: set[tuple[str, str]] = set()
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._subscribed_wakeup = asyncio.Event()
        self._groups_ready: set[str] = set()
        self._workers = _Workers(config.worker_count, self._handle, "redis")
        self._tasks: list[asyncio.Task[None]] = []
        #: Tasks that outlive the handling they came from (a retry later, a dead letter for
        #: a refused write): awaited or cancelled at stop.
        self._retry_tasks: set[asyncio.Task[None]] = set()
        self._running = False
        #: Types whose streams' pending entries were handled before any new one was read
        #: (`_recover`): at start, or when a component subscribes later.
        self._recovered: set[EventType] = set()
        self._topology_ready = False
        self._stopping = asyncio.Event()
        self._connected = False
        self._last_error: str | None = None
        self.dead_letter_count = 0
        self.duplicates_suppressed = 0
        self.reclaimed_count = 0
        self.deleted_pending_count = 0
        self.conflated_count = 0  # entries acked unhandled, superseded by a newer one
        self._client_name = consumer_client_name(config.consumer)
        #: False once Redis refuses CLIENT LIST (ACL): dead consumers are then found by
        #: idle time alone.
        self._client_list_allowed = True
        #: Per stream, the consumers found gone (pending entries, no connection) by the
        #: last claim round: taken over when the next round finds them gone again.
        self._gone: dict[str, set[str]] = {}

    # --- lifecycle --------------------------------------------------------------------------

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("the Redis transport is not started")
        return self._client

    @property
    def max_in_flight(self) -> int:
        return max(self.config.batch_size * self.config.worker_count * 4, 64)

    def bind(self, dispatcher: Dispatcher, metrics: Metrics | None, source: str) -> None:
        super().bind(dispatcher, metrics, source)
        if metrics is not None:
            # Read when scraped: set on every change they cost a lock and a float each,
            # several times per event.
            metrics.outbox_size.set_function(lambda: len(self._outbox))
            metrics.queue_size.set_function(lambda: len(self._outbox) + len(self._in_flight))

    async def start(self) -> None:
        if self._running:
            return
        self._client = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                self.config.url,
                max_connections=16,
                timeout=10,
                socket_timeout=5.0,
                socket_connect_timeout=5.0,
                client_name=self._client_name,
            )
        )
        self._loop = asyncio.get_running_loop()  # a getpid() per call on CPython 3.11
        self._outbox_conn = RespConnection(self.config.url, name=self._client_name)
        self._ack_conn = RespConnection(self.config.url, name=self._client_name)
        self._reader = RespConnection(self.config.url, name=self._client_name)
        self._conflated_reader = RespConnection(self.config.url, name=self._client_name)
        self._running = True
        self._recovered = set()
        self._topology_ready = not self.config.ensure_topology
        self._stopping.clear()
        try:
            await self._client.ping()
            self._set_connected(True)
            await self._ensure_topology()
            await self._ensure_groups()
        except _REDIS_DOWN as exc:
            self._set_connected(False, exc)
            log.warning(
                "Redis at %s is unreachable at start (%s); running degraded, will reconnect",
                redact_url(self.config.url),
                exc,
            )
        except ResponseError as exc:
            if not refused_for_now(exc):
                raise
            # The streams and groups are made once Redis takes writes (flush and read loops).
            self._refusal_started(exc, 0, self.config.reconnect_max_s)
        self._workers.start()
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="bus-outbox"),
            asyncio.create_task(self._ack_loop(), name="bus-acks"),
            asyncio.create_task(self._read_loop(), name="bus-reader"),
            asyncio.create_task(self._claim_loop(), name="bus-claimer"),
            asyncio.create_task(self._conflated_loop(), name="bus-conflated-reader"),
        ]

    async def stop_consuming(self, drain_timeout: float = 5.0) -> None:
        """Stop reading and let in-flight handlers finish; publishing keeps working."""
        if not self._running:
            return
        self._running = False
        self._stopping.set()
        self._subscribed_wakeup.set()
        self._capacity.set()
        await asyncio.wait(self._tasks[2:], timeout=self.config.block_ms / 1000 + 2)
        for task in self._retry_tasks:
            task.cancel()
        await self._workers.stop(drain_timeout)
        if self._superseded:  # a read loop stopped between a catch-up and its check
            with contextlib.suppress(*_REDIS_DOWN):
                await self._check_superseded()

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop reading, let in-flight handlers finish, flush acks and the outbox, close."""
        if not self._tasks:
            return
        await self.stop_consuming(drain_timeout)
        try:
            await self.flush(drain_timeout)
        except TimeoutError:
            log.error(
                "stopping with %d events not yet in Redis and %d acks unsent",
                len(self._outbox),
                self._acks_queued - self._acks_sent,
            )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._retry_tasks, return_exceptions=True)
        self._tasks = []
        self._retry_tasks.clear()
        if self._writing is not None:  # its replies never came: as if the write failed
            self._requeue_acks(self._writing[1])
            self._writing = None
        self._workers = _Workers(self.config.worker_count, self._handle, "redis")
        for conn in (self._reader, self._conflated_reader, self._outbox_conn, self._ack_conn):
            if conn is not None:
                await conn.aclose()
        if self._client is not None:
            # The pool was passed in, so aclose() alone would leave its connections open
            # (and carrying this consumer's name: peers would think it still runs).
            await self._client.aclose(close_connection_pool=True)
        self._reader = self._conflated_reader = self._outbox_conn = self._ack_conn = None
        self._client = None
        self._loop = None  # started again, perhaps in another loop

    def _set_connected(self, connected: bool, error: BaseException | None = None) -> None:
        if connected and not self._connected:
            log.info("connected to Redis at %s", redact_url(self.config.url))
        if not connected and self._connected:
            log.warning("lost Redis at %s: %s", redact_url(self.config.url), error)
        self._connected = connected
        if error is not None:
            self._last_error = f"Redis unreachable: {type(error).__name__}: {error}"
        elif connected:
            self._last_error = None
        if self.metrics is not None:
            self.metrics.redis_connected.set(1 if connected else 0)

    async def _ensure_topology(self) -> None:
        if not self._topology_ready:
            await ensure_topology(self.client)
            self._topology_ready = True

    async def _ensure_groups(self, start_id: str | None = None) -> None:
        for event_type in self.dispatcher.event_types:
            key = stream_key(event_type)
            if key in self._groups_ready and start_id is None:
                continue
            await ensure_group(
                self.client, key, self.config.group, start_id=start_id or self.config.group_start_id
            )
            self._groups_ready.add(key)

    def subscribed(self, event_type: EventType) -> None:
        self._subscribed_wakeup.set()

    # --- publishing ---------------------------------------------------------------------------

    def write_on_ack(self, command: Sequence[Any]) -> None:
        delivery = _current_delivery.get()
        if delivery is None:
            raise RuntimeError("write_on_ack() is for handlers: no event is being handled")
        pack(command)  # a bad argument is the caller's error, not the ack pipeline's
        if delivery.writes_key is None:
            self._order_writes(delivery)
        delivery.ack_commands.append(tuple(command))

    def _order_writes(self, delivery: Delivery) -> None:
        """Writes of one key land in the order they were made, not in the order their
        events happen to settle: one that published waits for its write, and a later one
        that did not would otherwise overtake it with a newer state."""
        delivery.writes_key = partition_key(delivery.event)
        self._writes_order.setdefault(delivery.writes_key, deque()).append(delivery)

    async def publish(self, event: Event, then: Commands = ()) -> None:
        future = self._enqueue(event, then, written=bool(then))
        if future is not None and then:
            await asyncio.shield(future)  # written, with its commands (EventBus.publish)

    def publish_nowait(self, event: Event, then: Commands = ()) -> asyncio.Future[str]:
        future = self._enqueue(event, then, written=True)
        assert future is not None
        return future

    def _enqueue(
        self, event: Event, then: Commands, *, written: bool
    ) -> asyncio.Future[str] | None:
        """Queue `event` in the outbox. Returns the future of its write when a handler is
        publishing (its ack waits for it) or `written` asks for one."""
        if len(self._outbox) >= self.config.max_queue_size:
            raise QueueFullError("the Redis outbox", self.config.max_queue_size)
        delivery = _current_delivery.get()
        future: asyncio.Future[str] | None = None
        if delivery is not None or written:
            future = (self._loop or asyncio.get_running_loop()).create_future()
            if delivery is not None:
                delivery.outputs.append(future)
        event_type = event.event_type
        encoded = event.to_json()
        check_size(encoded)
        for command in then:
            pack(command)  # a bad argument is the publisher's error, not the outbox's
        maxlen = stream_maxlen(event_type, self.config.stream_maxlen)
        self._outbox.append(
            _Outgoing(
                stream_key(event_type),
                encoded,
                maxlen,
                event_type.value,
                None if maxlen is not None else PUBLISHED_KEY_PREFIX + event.event_id,
                future,
                tuple(tuple(command) for command in then),
                self._published_seq + 1,
            )
        )
        self._published_seq += 1
        if not self._outbox_wakeup.is_set():
            self._outbox_wakeup.set()
        return future

    def _outbox_commands(self, batch: list[_Outgoing], acks: _AckBatch) -> list[tuple[Any, ...]]:
        """One pipeline: the queued acks (their inputs' outputs are in Redis already), then
        the batch's events, each with what must be written with it."""
        commands = self._ack_commands_of(acks)
        for item in batch:
            # XADD spelled out: redis-py's xadd() argument handling costs more than the
            # command itself at this rate.
            if item.marker is not None:
                # EVAL, not a registered Script: redis-py sends SCRIPT EXISTS before every
                # pipeline holding a Script, a round trip per batch on the order path.
                # Redis caches the body; no NOSCRIPT to handle.
                commands.append(
                    ("EVAL", _PUBLISH_ONCE, 2, item.key, item.marker, item.payload,
                     PUBLISHED_TTL_S)
                )  # fmt: skip
                commands.extend(item.then)  # (no caller sends both yet)
            elif item.then:
                commands.append(
                    ("EVAL", _PUBLISH_THEN, 1, item.key, item.payload,
                     "" if item.maxlen is None else item.maxlen, *_flatten(item.then))
                )  # fmt: skip
            elif item.maxlen is None:
                commands.append(("XADD", item.key, "*", EVENT_FIELD, item.payload))
            else:
                commands.append(
                    ("XADD", item.key, "MAXLEN", "~", item.maxlen, "*", EVENT_FIELD, item.payload)
                )
        return commands

    def _write_outbox(self) -> bool:
        """Write the outbox's next batch now, unless one is being written (then True as
        well) or the connection is not up (False: the flush loop connects first).

        A worker calls this as its handler returns, so the outputs leave in that same turn
        of the event loop instead of when the flush loop next runs (after the read loop has
        sent its next read): about 0.1 ms per hop at 1,000 ticks/s."""
        if self._writing is not None or self._refusal_pause:
            return True
        conn = self._outbox_conn
        if not self._outbox or conn is None or not conn.connected or not self._topology_ready:
            return False
        batch = [self._outbox[i] for i in range(min(500, len(self._outbox)))]
        acks = self._take_acks()
        commands = self._outbox_commands(batch, acks)
        pending = conn.send_nowait(_transaction(commands))
        if pending is None:
            self._requeue_acks(acks)
            return False
        self._writing = (batch, acks, commands, pending)
        if not self._outbox_wakeup.is_set():
            self._outbox_wakeup.set()  # the flush loop waits for the replies
        return True

    async def _flush_loop(self) -> None:
        backoff = Backoff(maximum=self.config.reconnect_max_s)
        refusals = Backoff(maximum=self.config.reconnect_max_s)
        while True:
            if self._writing is None:
                if not self._outbox:
                    self._outbox_wakeup.clear()
                    await self._outbox_wakeup.wait()
                    continue
                try:
                    # Redis may have been down at start: the groups come before our first
                    # event.
                    await self._ensure_topology()
                    assert self._outbox_conn is not None
                    await self._outbox_conn.connect()
                except _REDIS_DOWN as exc:
                    self._set_connected(False, exc)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                except ResponseError as exc:  # the groups not made: nothing may be sent yet
                    delay = refusals.next_delay()
                    if refused_for_now(exc):
                        self._refusal_started(exc, len(self._outbox), delay)
                    else:
                        log.error("creating the consumer groups failed: %s", exc)
                    await asyncio.sleep(delay)
                    continue
                if not self._write_outbox():
                    continue  # lost again already: the next turn connects again
            assert self._writing is not None
            batch, acks, commands, pending = self._writing
            try:
                raw = await pending.wait(raise_on_error=False, timeout=WRITE_TIMEOUT_S)
                if _malformed_in(raw):
                    assert self._outbox_conn is not None
                    async with asyncio.timeout(WRITE_TIMEOUT_S):
                        replies = iter(await _confined_replies(self._outbox_conn, commands, raw))
                else:
                    replies = iter(_transaction_replies(raw))
            except _REDIS_DOWN as exc:
                self._writing = None
                self._set_connected(False, exc)
                self._requeue_acks(acks)
                await asyncio.sleep(backoff.next_delay())
                continue
            self._writing = None
            backoff.reset()
            self._set_connected(True)
            refused = self._acks_done(acks, [next(replies) for _ in range(acks.commands_count)])
            published: dict[str, int] = {}
            kept: list[_Outgoing] = []
            for item in batch:
                result = next(replies)
                separate = item.then if item.marker is not None else ()
                then_errors = [
                    r for r in (next(replies) for _ in separate) if isinstance(r, Exception)
                ]
                self._outbox.popleft()
                if isinstance(result, Exception) and refused_for_now(result):
                    kept.append(item)  # sent again, in its place (below)
                    refused = refused or result
                    continue
                if then_errors and not isinstance(result, Exception):
                    # The event is in Redis, but what had to be written with it is not: a
                    # handler's input stays unacked, as if the event itself had failed.
                    log.error(
                        "Redis refused a command sent with a %s event: %s",
                        item.event_type,
                        then_errors[0],
                    )
                    if item.future is not None and not item.future.done():
                        item.future.set_exception(then_errors[0])
                    published[item.event_type] = published.get(item.event_type, 0) + 1
                    continue
                if isinstance(result, Exception):
                    # Redis refused this entry (not a connection problem): retrying cannot
                    # help. A handler's output failing keeps its input unacked.
                    log.error("Redis refused a %s event: %s", item.event_type, result)
                    if item.future is not None and not item.future.done():
                        item.future.set_exception(result)
                    continue
                if result is None:
                    # Written by an earlier attempt whose reply was lost: already in Redis.
                    self.duplicates_suppressed += 1
                else:
                    published[item.event_type] = published.get(item.event_type, 0) + 1
                if item.future is not None and not item.future.done():
                    item.future.set_result("" if result is None else as_str(result))
            self._outbox.extendleft(reversed(kept))
            # The outbox stays in publishing order (kept events go back to its front), so
            # everything before its first event is answered for.
            self._flushed_seq = self._outbox[0].seq - 1 if self._outbox else self._published_seq
            self._flush_waiters = _wake(self._flush_waiters, self._flushed_seq)
            if not self._outbox and (any(self._acks.values()) or self._ack_commands):
                self._ack_wakeup.set()  # acks queued meanwhile: no flush to carry them
            if self.metrics is not None:
                for etype, count in published.items():
                    self.metrics.events_published.labels(etype).inc(count)
            if refused is None:
                self._refusal_over()
                refusals.reset()
                continue
            # Redis cannot take writes for now: nothing is dropped or failed; the refused
            # writes go again in their place after a pause, and nothing overtakes them.
            delay = refusals.next_delay()
            self._refusal_started(refused, len(kept), delay)
            self._refusal_pause = True
            try:
                await asyncio.sleep(delay)
            finally:
                self._refusal_pause = False

    def _refusal_started(self, error: BaseException, kept: int, delay: float) -> None:
        first = self._refusing is None
        self._refusing = f"{type(error).__name__}: {error}"
        if first:
            log.error(
                "Redis refuses writes for now (%s): events, acks and handlers' writes wait "
                "in order and go again (%d events refused; next try in %.2f s, backing off "
                "to %.0f s)",
                self._refusing,
                kept,
                delay,
                self.config.reconnect_max_s,
            )

    def _refusal_over(self) -> None:
        if self._refusing is not None:
            log.warning("Redis takes writes again (refused before: %s)", self._refusing)
            self._refusing = None

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything published so far is in Redis and every ack is sent."""

        async def drained() -> None:
            loop = asyncio.get_running_loop()
            target = self._published_seq
            if self._flushed_seq < target:
                waiter = loop.create_future()
                self._flush_waiters.append((target, waiter))
                await waiter
            # Acks of handled events queue once their outputs are written, which may be
            # a callback or two after the write (features' batches): wait for those too.
            await self._settled.wait()
            acks = self._acks_queued
            if self._acks_sent < acks:
                waiter = loop.create_future()
                self._ack_waiters.append((acks, waiter))
                self._ack_wakeup.set()
                self._ack_urgent.set()
                await waiter

        await asyncio.wait_for(drained(), timeout)

    # --- consuming ----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff = Backoff(maximum=self.config.reconnect_max_s)
        assert self._reader is not None
        read_timeout = self.config.block_ms / 1000 + READ_TIMEOUT_S
        while self._running:
            event_types = self.dispatcher.event_types
            unrecovered = [t for t in event_types if t not in self._recovered]
            conflated = set(self.dispatcher.conflated_types)
            plain = [t for t in event_types if t not in conflated]
            if not unrecovered and not plain:
                self._subscribed_wakeup.clear()
                await self._subscribed_wakeup.wait()
                continue
            if len(self._in_flight) >= self.max_in_flight:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            try:
                await self._ensure_groups()
                if unrecovered:
                    await self._recover(unrecovered)
                    continue
                if self._reread_plain:
                    # A reply lost with the connection leaves its entries pending for us,
                    # unseen: handle them before anything newer (per-key order).
                    self._reread_plain = False
                    for event_type in plain:
                        await self._read_own_pending(stream_key(event_type))
                    continue
                streams: dict[Any, Any] = {stream_key(t): ">" for t in plain}
                read = xreadgroup_args(
                    self.config.group,
                    self.config.consumer,
                    streams,
                    count=self.config.batch_size,
                    block=self.config.block_ms,
                )
                # The conflated catch-up (see _catch_up_conflated) rides behind the blocking
                # read on its connection: Redis runs it the moment the read returns, so it
                # sees every conflated entry added before the plain ones, at no round trip.
                catch_up = bool(conflated) and not self._reread_conflated
                commands = [read]
                if catch_up:
                    commands.append(self._conflated_read(list(conflated)))
                # The timeout is for a hung Redis, not an idle one.
                replies = await self._reader.execute(
                    commands, raise_on_error=False, timeout=read_timeout
                )
                if isinstance(replies[0], Exception):
                    raise replies[0]
                response: Any = xread_reply(replies[0])
            except (ResponseError, *_REDIS_DOWN) as exc:
                await self._after_read_error(exc, backoff, "XREADGROUP")
                continue
            backoff.reset()
            self._set_connected(True)
            if catch_up:
                full = await self._accept_caught_up(replies[1])
                if full and response:
                    await self._catch_up_conflated()  # more than one read's worth waiting
            elif response and conflated:
                await self._catch_up_conflated()
            for raw_stream, entries in response or ():
                stream = as_str(raw_stream)
                for raw_id, fields in entries:
                    await self._accept(stream, as_str(raw_id), fields, deliveries=1)
            if response:
                # Let the workers start on what was just handed out before the next read
                # is sent: the events are on the latency path, the next read is not.
                await asyncio.sleep(0)
            if self._superseded:
                await self._check_superseded()

    async def _conflated_loop(self) -> None:
        """Reads the conflated subscriptions every `conflate_interval_s` (module docstring)."""
        backoff = Backoff(maximum=self.config.reconnect_max_s)
        while self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.conflate_interval_s)
            if self._stopping.is_set():
                return
            try:
                await self._read_conflated()
            except (ResponseError, *_REDIS_DOWN) as exc:
                await self._after_read_error(exc, backoff, "XREADGROUP (conflated)")
                continue
            backoff.reset()
            if self._superseded:
                await self._check_superseded()

    async def _after_read_error(self, exc: Exception, backoff: Backoff, what: str) -> None:
        """A failed read: recreate lost groups, or note the lost connection and back off."""
        if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
            # Redis lost its data (restart without persistence): recreate the groups from
            # the start of the new streams and carry on.
            log.warning("consumer group missing (%s); recreating", exc)
            self._groups_ready.clear()
            await self._recreate_groups()
            return
        if refused_for_now(exc):  # XREADGROUP writes too (the pending list)
            self._refusal_started(exc, 0, backoff.next_delay())
        elif isinstance(exc, ResponseError):
            log.error("%s failed: %s", what, exc)
        else:
            self._set_connected(False, exc)
            self._reread_plain = self._reread_conflated = True
        await asyncio.sleep(backoff.next_delay())

    async def _read_conflated(self) -> None:
        """Take everything the conflated subscriptions have waiting, newest per key."""
        types = [t for t in self.dispatcher.conflated_types if t in self._recovered]
        if not types:
            return
        async with self._conflate_lock:  # one reader at a time: marks never go backwards
            await self._ensure_groups()
            if self._reread_conflated:  # see _read_loop
                self._reread_conflated = False
                for event_type in types:
                    await self._read_own_pending(stream_key(event_type), self._conflated_reader)
            assert self._conflated_reader is not None
            while self._running:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    reply = await self._conflated_reader.command(*self._conflated_read(types))
                if not await self._accept_conflated_read(reply):
                    return

    @property
    def _conflated_count(self) -> int:
        return max(self.config.batch_size * 100, 1000)

    def _conflated_read(self, types: Sequence[EventType]) -> list[Any]:
        """The XREADGROUP of the conflated subscriptions: what is waiting, up to a cap."""
        streams = {stream_key(t): ">" for t in types}
        return xreadgroup_args(
            self.config.group, self.config.consumer, streams, count=self._conflated_count
        )

    async def _accept_conflated_read(self, reply: Any) -> bool:
        """Hand out a conflated read's entries (its raw reply). True if it was full: more
        may be waiting."""
        full = False
        for raw_stream, entries in xread_reply(reply) or ():
            full = full or len(entries) >= self._conflated_count
            await self._accept_conflated(as_str(raw_stream), entries)
        return full

    async def _accept_caught_up(self, reply: Any) -> bool:
        """The conflated read sent with a plain read (see _accept_conflated_read). A
        refusal (NOGROUP) is left to the conflated loop."""
        if isinstance(reply, Exception):
            log.debug("conflated catch-up skipped: %s", reply)
            return False
        return await self._accept_conflated_read(reply)

    async def _catch_up_conflated(self) -> None:
        """Before plain events are handed out: take the conflated events already in Redis,
        so that (per key) a plain event is handled after the newest conflated one added
        before it, e.g. risk sees the tick before the order priced against it. Best effort:
        on a Redis error the conflated loop catches up later."""
        try:
            await self._read_conflated()
        except (ResponseError, *_REDIS_DOWN) as exc:
            log.debug("conflated catch-up skipped: %s", exc)

    async def _accept_conflated(self, stream: str, entries: list[Any]) -> None:
        """Hand out the newest entry per key; the ones it supersedes are acked unhandled.

        Only the newest are validated before they are handed out: a superseded entry's key
        is read from its JSON, and the entry is validated (an invalid one dead-lettered with
        the reason, superseded or not) and acked later, in `_check_superseded`, after the
        plain events read with this catch-up are handed out. Validating ten superseded
        ticks cost risk's SIGNAL hop 0.1-0.2 ms."""
        newest: dict[str, tuple[str, Any, Event]] = {}
        for raw_id, fields in reversed(entries):
            entry_id = as_str(raw_id)
            key = _raw_partition_key(fields)
            if key is not None and key in newest:
                self._superseded.append((stream, entry_id, fields))
                continue
            try:
                event = decode_entry(stream, fields)
            except InvalidEventError as exc:
                await self._dead_letter_malformed(stream, entry_id, fields, 1, exc)
                continue
            newest[key if key is not None else partition_key(event)] = (entry_id, fields, event)
        handed: list[tuple[str, Any, Event]] = []
        for key, (entry_id, fields, event) in newest.items():
            # Two reads (the conflated loop's and the one sent with a plain read) may
            # answer out of order: per key, never hand out an older entry after a newer.
            position = entry_position(entry_id)
            if position <= self._conflated_last.get((stream, key), (-1, -1)):
                self._superseded.append((stream, entry_id, fields))
                continue
            self._conflated_last[(stream, key)] = position
            handed.append((entry_id, fields, event))
        handed.sort(key=lambda entry: entry_position(entry[0]))
        for entry_id, fields, event in handed:
            await self._accept(stream, entry_id, fields, deliveries=1, event=event)

    async def _check_superseded(self) -> None:
        """Validate and ack the conflated entries `_accept_conflated` set aside."""
        entries, self._superseded = self._superseded, []
        counts: dict[str, int] = {}
        for stream, entry_id, fields in entries:
            try:
                decode_entry(stream, fields)
            except InvalidEventError as exc:
                await self._dead_letter_malformed(stream, entry_id, fields, 1, exc)
                continue
            self._queue_ack(stream, entry_id)
            counts[stream] = counts.get(stream, 0) + 1
        for stream, count in counts.items():
            self.conflated_count += count
            if self.metrics is not None:
                label = stream.rsplit(":", 1)[-1]
                self.metrics.events_handled.labels(label, "conflated").inc(count)

    async def _recreate_groups(self) -> None:
        # New streams: the newest conflated entry ids handed out belong to the old ones (a
        # Redis whose clock is behind starts the new ids lower; as newer, they would be
        # acked unhandled until it caught up).
        self._conflated_last.clear()
        try:
            await self._ensure_groups(start_id="0")
        except _REDIS_DOWN as exc:
            self._set_connected(False, exc)

    async def _accept(
        self,
        stream: str,
        entry_id: str,
        fields: dict[bytes, bytes] | None,
        deliveries: int,
        *,
        event: Event | None = None,
    ) -> None:
        """Hand an entry to its worker (`event`: the entry, already decoded)."""
        raw = (fields or {}).get(EVENT_FIELD, b"") if fields else b""
        if (stream, entry_id) in self._in_flight:
            return  # already being handled here (reclaimed from ourselves)
        try:
            if event is None:
                event = decode_entry(stream, fields)
        except InvalidEventError as exc:
            await self._dead_letter_malformed(stream, entry_id, fields, deliveries, exc)
            return
        if not self.dispatcher.has(event.event_type):
            self._queue_ack(stream, entry_id)
            return
        self._in_flight.add((stream, entry_id))
        self._workers.put(
            Delivery(
                event=event,
                stream=stream,
                entry_id=entry_id,
                raw=raw,
                deliveries=deliveries,
                max_deliveries=self.config.max_deliveries,
            )
        )

    async def _handle(self, delivery: Delivery) -> None:
        failures = await self._run_waiting_out_refusals(delivery)
        if failures:
            _drop_hold(delivery)  # the event is retried (or dead-lettered) as a whole
            self._forget_writes(delivery)
            delivery.last_error = _describe_failures(failures)
            if delivery.deliveries >= self.config.max_deliveries or _permanent(failures):
                await self._dead_letter_delivery(delivery, delivery.last_error)
                self._finish(delivery)
            else:
                task = asyncio.create_task(self._retry_later(delivery))
                self._retry_tasks.add(task)
                task.add_done_callback(self._retry_tasks.discard)
            return
        # Ack only once everything the handlers published is in Redis: a crash before that
        # redelivers the input instead of losing the output. The worker does not wait for
        # that: it takes its next event while the outbox writes this one's outputs (in
        # the order they were published, so per key the outputs stay in order), and the
        # ack follows the last write. A lane costs handler time per event, not a round trip.
        if all(output.done() for output in delivery.outputs):
            self._settle(delivery)
            return
        self._write_outbox()
        self._settling += 1
        self._settled.clear()

        def written() -> None:
            self._settling -= 1
            if not self._settling:
                self._settled.set()
            self._settle(delivery)

        when_all_done(delivery.outputs, written)

    async def _run_waiting_out_refusals(
        self, delivery: Delivery
    ) -> list[tuple[str, BaseException]]:
        """Run the handlers; while they fail only because Redis refuses their writes for
        now (out of memory: `refused_for_now`), run them again after a pause, in place:
        waiting out such a refusal is not a failed delivery (it is not counted towards
        `EVENT_MAX_DELIVERIES`, and nothing after it on the lane overtakes it), as with
        the bus's own writes."""
        failures = await self.dispatcher.run(delivery)
        pauses = Backoff(maximum=self.config.reconnect_max_s)
        while failures and self._running:
            refusals = [_in_chain(exc, refused_for_now) for _, exc in failures]
            if not all(refusals):
                break
            _drop_hold(delivery)
            self._forget_writes(delivery)
            delay = pauses.next_delay()
            self._refusal_started(cast(BaseException, refusals[0]), 0, delay)
            await asyncio.sleep(delay)
            failures = await self.dispatcher.run(delivery)
        return failures

    def _settle(self, delivery: Delivery) -> None:
        """Ack a handled delivery whose outputs are all written (or failed: then not)."""
        errors = [
            RuntimeError("publish cancelled") if output.cancelled() else output.exception()
            for output in delivery.outputs
            if output.cancelled() or output.exception() is not None
        ]
        if errors and all(isinstance(error, _AbandonedError) for error in errors):
            self._finish(delivery, ack=False)  # HeldEvent.abandon: delivered again later
            return
        if errors:
            log.error(
                "not acking %s %s: %d of its outputs failed to publish: %s",
                delivery.event.event_type.value,
                delivery.event.event_id,
                len(errors),
                errors[0],
            )
            self._finish(delivery, ack=False)
            return
        self._finish(delivery)

    def _finish(self, delivery: Delivery, *, ack: bool = True) -> None:
        if delivery.writes_key is None and delivery.ack_commands:
            self._order_writes(delivery)  # kept from handlers that succeeded before a retry
        if delivery.writes_key is not None:
            delivery.finished = ack
            self._release_writes(delivery.writes_key)
        elif ack:
            self._queue_ack(delivery.stream, delivery.entry_id)
        self._in_flight.discard((delivery.stream, delivery.entry_id))
        if len(self._in_flight) < self.max_in_flight:
            self._capacity.set()

    def _release_writes(self, key: str) -> None:
        """Queue the acks of `key`'s finished deliveries that no earlier writer holds back:
        each with its writes, which go first, and its XACK after them (`_acks_done`)."""
        queue = self._writes_order.get(key)
        while queue and queue[0].finished is not None:
            delivery = queue.popleft()
            if delivery.finished:
                self._ack_commands.extend((delivery, c) for c in delivery.ack_commands)
                self._acks_after.setdefault(delivery.stream, []).append(delivery.entry_id)
                self._acks_queued += 1
                self._ack_wakeup.set()
        if not queue:
            self._writes_order.pop(key, None)

    def _forget_writes(self, delivery: Delivery) -> None:
        """A failed handler's delivery (its writes dropped, its retry writes anew): it no
        longer holds back the writes made after it."""
        key = delivery.writes_key
        if key is None:
            return
        delivery.writes_key = None
        queue = self._writes_order.get(key)
        if queue is not None and delivery in queue:
            queue.remove(delivery)
            self._release_writes(key)

    async def _retry_later(self, delivery: Delivery) -> None:
        delay_ms = min(
            self.config.retry_delay_ms * 2 ** (delivery.deliveries - 1),
            max(self.config.retry_delay_ms, self.config.claim_idle_ms // 2),
        )
        await asyncio.sleep(delay_ms / 1000)
        self._in_flight.discard((delivery.stream, delivery.entry_id))
        if not self._running:
            return
        try:
            # XCLAIM (not a local re-run) so Redis counts the delivery. If another consumer
            # took the entry meanwhile, its idle time is short and we leave it to them.
            claimed = await self.client.xclaim(
                delivery.stream,
                self.config.group,
                self.config.consumer,
                min_idle_time=int(delay_ms * 0.9),
                message_ids=[delivery.entry_id],
            )
        except _REDIS_DOWN as exc:
            self._set_connected(False, exc)
            return  # still pending: XAUTOCLAIM picks it up once Redis is back
        if not claimed or claimed[0][1] is None:
            self._capacity.set()
            return
        delivery.deliveries += 1
        self._in_flight.add((delivery.stream, delivery.entry_id))
        self._workers.put(delivery)

    async def _dead_letter_malformed(
        self,
        stream: str,
        entry_id: str,
        fields: dict[bytes, bytes] | None,
        deliveries: int,
        error: InvalidEventError,
    ) -> None:
        """Dead-letter an entry that is not a valid event, its raw payload (or its fields,
        without an event field) cut to `MAX_DEAD_PAYLOAD_BYTES`."""
        raw = (fields or {}).get(EVENT_FIELD) or repr(fields).encode()
        await self._dead_letter(
            stream, entry_id, raw[:MAX_DEAD_PAYLOAD_BYTES], deliveries, f"malformed: {error}"
        )

    async def _dead_letter_delivery(self, delivery: Delivery, error: str) -> None:
        """Dead-letter an event being handled here, with `error` as its reason."""
        await self._dead_letter(
            delivery.stream,
            delivery.entry_id,
            delivery.raw,
            delivery.deliveries,
            error,
            event_type=delivery.event.event_type,
        )

    async def _dead_letter(
        self,
        stream: str,
        entry_id: str,
        payload: bytes,
        deliveries: int,
        error: str,
        *,
        event_type: EventType | None = None,
    ) -> None:
        fields = dead_letter_fields(
            stream=stream,
            entry_id=entry_id,
            group=self.config.group,
            consumer=self.config.consumer,
            deliveries=deliveries,
            error=error,
            payload=payload,
            dead_at_ns=time.time_ns(),
        )
        backoff = Backoff(maximum=self.config.reconnect_max_s)
        while True:
            try:
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.xadd(DLQ_STREAM, fields, maxlen=self.config.dlq_maxlen, approximate=True)  # type: ignore[arg-type]
                    pipe.xack(stream, self.config.group, entry_id)
                    await pipe.execute()
                break
            except _REDIS_DOWN as exc:
                self._set_connected(False, exc)
                if not self._running:
                    return  # stays pending; another consumer will dead-letter it
                await asyncio.sleep(backoff.next_delay())
        self.dead_letter_count += 1
        label = event_type.value if event_type is not None else stream.rsplit(":", 1)[-1]
        if self.metrics is not None:
            self.metrics.dead_letters.labels(label).inc()
            self.metrics.events_handled.labels(label, "dead_letter").inc()
        log.error(
            "dead-lettered %s entry %s after %d deliveries: %s", stream, entry_id, deliveries, error
        )

    def _queue_ack(self, stream: str, entry_id: str) -> None:
        self._acks.setdefault(stream, []).append(entry_id)
        self._acks_queued += 1
        self._ack_wakeup.set()

    async def _ack_loop(self) -> None:
        backoff = Backoff(maximum=self.config.reconnect_max_s)
        refusals = Backoff(maximum=self.config.reconnect_max_s)
        lingered = False
        while True:
            if not (any(self._acks.values()) or self._ack_commands) or self._outbox:
                # Nothing to ack, or events are about to be flushed: the acks go with them
                # (the flush loop wakes us if it leaves any behind).
                lingered = False
                self._ack_wakeup.clear()
                await self._ack_wakeup.wait()
                continue
            if not lingered and not self._ack_waiters:
                # An output written meanwhile carries them: one pipeline instead of two
                # per handled event, for this process and for Redis (flush() cuts it short).
                lingered = True
                self._ack_urgent.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ack_urgent.wait(), ACK_LINGER_S)
                continue
            lingered = False
            batch = self._take_acks()
            try:
                assert self._ack_conn is not None
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    commands = self._ack_commands_of(batch)
                    raw = await self._ack_conn.execute(_transaction(commands), raise_on_error=False)
                    replies = await _confined_replies(self._ack_conn, commands, raw)
            except _REDIS_DOWN as exc:
                self._set_connected(False, exc)
                self._requeue_acks(batch)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            refused = self._acks_done(batch, replies)
            if refused is None:
                refusals.reset()
                if not self._outbox:  # else the flush loop tells whether Redis takes them
                    self._refusal_over()
                continue
            delay = refusals.next_delay()
            self._refusal_started(refused, 0, delay)
            await asyncio.sleep(delay)

    def _take_acks(self) -> _AckBatch:
        batch = _AckBatch(self._acks, self._ack_commands, self._acks_after)
        self._acks, self._ack_commands, self._acks_after = {}, [], {}
        return batch

    def _ack_commands_of(self, batch: _AckBatch) -> list[tuple[Any, ...]]:
        """The handlers' writes (`write_on_ack`), then the XACKs of entries whose writes
        Redis took in an earlier pipeline (or that have none). Not a write and its own
        XACK in one pipeline: Redis takes an XACK even while it refuses writes for now
        (out of memory), which would ack an entry whose write it refused."""
        commands = [command for _, command in batch.commands]
        for stream, ids in batch.acks.items():
            if ids:
                commands.append(("XACK", stream, self.config.group, *ids))
        return commands

    def _requeue_acks(self, batch: _AckBatch) -> None:
        """Acks whose pipeline failed go back to the front: XACK is idempotent, and so
        must the writes sent with them be."""
        for stream, ids in batch.acks.items():
            self._acks.setdefault(stream, [])[:0] = ids
        self._ack_commands[:0] = batch.commands
        for stream, ids in batch.after.items():
            self._acks_after.setdefault(stream, [])[:0] = ids

    def _acks_done(self, batch: _AckBatch, replies: list[Any]) -> BaseException | None:
        """Count the batch's XACKs as sent and queue those of the entries whose writes
        Redis has now taken; or, if Redis refused any of it for now (`refused_for_now`),
        put the whole batch back in front and return the error."""
        for reply in replies:
            if isinstance(reply, Exception) and refused_for_now(reply):
                self._requeue_acks(batch)
                return reply
        refused: dict[tuple[str, str], tuple[Delivery, str]] = {}
        for (delivery, command), reply in zip(batch.commands, replies, strict=False):
            if isinstance(reply, Exception):  # a resend cannot help: the handling failed
                # The command's name only: its arguments may hold anything.
                error = f"Redis refused a write of its handling ({command[0]}): {reply}"
                log.error(
                    "%s %s: %s", delivery.event.event_type.value, delivery.event.event_id, error
                )
                refused.setdefault((delivery.stream, delivery.entry_id), (delivery, error))
        for reply in replies[len(batch.commands) :]:
            if isinstance(reply, Exception):
                log.error("Redis refused an XACK: %s", reply)
        for stream, ids in batch.after.items():
            self._acks.setdefault(stream, []).extend(
                entry_id for entry_id in ids if (stream, entry_id) not in refused
            )
        for delivery, reply in refused.values():
            task = asyncio.create_task(self._dead_letter_refused_write(delivery, reply))
            self._retry_tasks.add(task)
            task.add_done_callback(self._retry_tasks.discard)
        self._acks_sent += sum(len(ids) for ids in batch.acks.values())
        self._ack_waiters = _wake(self._ack_waiters, self._acks_sent)
        return None

    async def _dead_letter_refused_write(self, delivery: Delivery, error: str) -> None:
        """A handler's `write_on_ack` that Redis refused for what it is (not for now): its
        event goes to the dead-letter stream with the reason instead of being acked as
        handled. Counted as its ack for `flush`."""
        try:
            await self._dead_letter_delivery(delivery, error)
        finally:
            self._acks_sent += 1
            self._ack_waiters = _wake(self._ack_waiters, self._acks_sent)

    async def _claim_loop(self) -> None:
        interval = self.config.claim_interval_ms / 1000
        last_gc = 0.0
        while self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
            if not self._running or not self._connected:
                continue
            try:
                names = await self._client_names()
                for event_type in self.dispatcher.event_types:
                    await self._take_from_gone(stream_key(event_type), names)
                    await self._reclaim(stream_key(event_type))
                    await self._report_group(stream_key(event_type))
                if time.monotonic() - last_gc > self.config.consumer_gc_idle_ms / 1000 / 4:
                    last_gc = time.monotonic()
                    for event_type in self.dispatcher.event_types:
                        await self._collect_consumers(stream_key(event_type))
            except _REDIS_DOWN as exc:
                self._set_connected(False, exc)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    self._groups_ready.clear()
                    await self._recreate_groups()
                else:
                    log.error("reclaim failed: %s", exc)

    async def _reclaim(self, stream: str, *, min_idle_ms: int | None = None) -> None:
        """Take over entries idle past `min_idle_ms` (default `claim_idle_ms`: a dead or
        stuck consumer's; 0 at the start of an exclusive consumer: all of them)."""
        idle = self.config.claim_idle_ms if min_idle_ms is None else min_idle_ms
        cursor = "0-0"
        for _ in range(10_000):  # XAUTOCLAIM scans a bounded window: loop to cursor 0-0
            if len(self._in_flight) >= self.max_in_flight:
                if min_idle_ms is None:
                    return  # busy: the next round takes the rest
                await self._wait_capacity()
            result: Any = await self.client.xautoclaim(
                stream,
                self.config.group,
                self.config.consumer,
                min_idle_time=idle,
                start_id=cursor,
                count=self.config.batch_size * 10,
            )
            cursor = as_str(result[0])
            await self._take_over(stream, result[1], result[2] if len(result) > 2 else [])
            if cursor == "0-0":
                return

    async def _client_names(self) -> set[str] | None:
        """The names on Redis's client connections (CLIENT LIST); None where Redis refuses
        the command (an ACL)."""
        if not self._client_list_allowed:
            return None
        names = await client_names(self.client)
        if names is None:
            self._client_list_allowed = False
            log.warning(
                "Redis refused CLIENT LIST: entries of a consumer that died are taken "
                "over only once idle for EVENT_CLAIM_IDLE_MS"
            )
        return names

    async def _gone_consumers(self, stream: str, names: set[str] | None) -> list[str]:
        """Consumers of our group on `stream` that hold pending entries while no Redis
        connection carries their name (`names`, from `_client_names`): their process has
        exited or been killed (Redis sees the socket close at once)."""
        if names is None:
            return []
        consumers: Any = await self.client.xinfo_consumers(stream, self.config.group)
        return [
            name
            for name in (as_str(info["name"]) for info in consumers if int(info["pending"]))
            if name != self.config.consumer and consumer_client_name(name) not in names
        ]

    async def _take_from_gone(self, stream: str, names: set[str] | None) -> None:
        """Take over, in stream order, the entries of consumers found gone by this claim
        round and the one before (a consumer reconnecting after a blip is not gone)."""
        gone = set(await self._gone_consumers(stream, names))
        confirmed = gone & self._gone.get(stream, set())
        self._gone[stream] = gone
        for consumer in sorted(confirmed):
            if len(self._in_flight) >= self.max_in_flight:
                return  # busy: the next round takes the rest
            claimed, deleted = await self._claim_from(stream, consumer, justid=False)
            await self._take_over(stream, claimed, deleted)

    async def _claim_from(
        self, stream: str, consumer: str, *, justid: bool
    ) -> tuple[list[Any], list[str]]:
        """XCLAIM every entry `consumer` holds on `stream`: the entries taken (none with
        `justid`: they are then read as our own pending) and the ids of those deleted from
        the stream meanwhile (Redis drops them from the pending list). The minimum idle
        time is the lowest XPENDING just reported, so an entry another consumer claimed in
        between (its idle time reset) stays theirs."""
        taken: list[Any] = []
        deleted: list[str] = []
        moved = 0
        for _ in range(1_000):  # bounded: each round moves the entries it lists
            rows: Any = await self.client.xpending_range(
                stream,
                self.config.group,
                min="-",
                max="+",
                count=self.config.batch_size * 10,
                consumername=consumer,
            )
            if not rows:
                break
            ids: list[Any] = [as_str(row["message_id"]) for row in rows]
            claimed: Any = await self.client.xclaim(
                stream,
                self.config.group,
                self.config.consumer,
                min_idle_time=min(int(row["time_since_delivered"]) for row in rows),
                message_ids=ids,
                justid=justid,
            )
            moved += len(claimed)
            got = {as_str(entry if justid else entry[0]) for entry in claimed}
            if not justid:
                taken.extend(entry for entry in claimed if entry[1] is not None)
            deleted.extend(await self._missing_entries(stream, [i for i in ids if i not in got]))
            if len(rows) < self.config.batch_size * 10:
                break
        if moved:
            log.warning(
                "took over %d pending entries of %s on %s: no connection carries its name",
                moved,
                consumer,
                stream,
            )
        return taken, deleted

    async def _missing_entries(self, stream: str, ids: list[str]) -> list[str]:
        """Of `ids`, those no longer in `stream` (not those another consumer claimed)."""
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xrange(stream, min=entry_id, max=entry_id, count=1)
            found: list[Any] = await pipe.execute()
        return [entry_id for entry_id, rows in zip(ids, found, strict=True) if not rows]

    async def _read_own_pending(self, stream: str, client: RespConnection | None = None) -> None:
        """Entries this consumer (same name: a stable INSTANCE_ID) read before a restart, or
        before a lost connection, but never acked: handled first, in order, before anything
        new. Those being handled here, or whose ack is queued, are left alone and not
        counted as delivered again: the list comes from XPENDING, and only the others are
        taken back, with XCLAIM (one delivery each). Reading them back with XREADGROUP
        from id 0 would count a delivery of every pending entry, those still being
        handled too, at every reconnect; a successor taking them over after a restart
        would then give up on them (dead-letter) early."""
        reader = client or self._reader
        assert reader is not None
        page = self.config.batch_size * 10
        start = "-"
        while True:
            await self._wait_capacity()
            async with asyncio.timeout(READ_TIMEOUT_S):
                rows: Any = await reader.command(
                    "XPENDING", stream, self.config.group, start, "+", page, self.config.consumer
                )
            if not rows:
                return
            start = "(" + as_str(rows[-1][0])
            settled = self._settled_here(stream)
            ids = [entry_id for entry_id in (as_str(r[0]) for r in rows) if entry_id not in settled]
            if ids:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    claimed: Any = await reader.command(
                        "XCLAIM", stream, self.config.group, self.config.consumer, 0, *ids
                    )
                # An entry deleted or trimmed since is not returned (Redis >= 7 also drops it
                # from the pending list; the ack covers older versions).
                present = [(i, f) for i, f in entries_reply(claimed) if f]
                returned = {as_str(i) for i, _ in present}
                deleted = [i for i in ids if i not in returned]
                # The counts XPENDING just gave, plus the delivery XCLAIM counted.
                counts = {as_str(r[0]): int(r[3]) + 1 for r in rows}
                await self._take_over(stream, present, deleted, counts)
            if len(rows) < page:
                return

    def _settled_here(self, stream: str) -> set[str]:
        """Entry ids of `stream` this consumer is handling or has handled (ack queued or to
        be queued): not to be delivered again."""
        ids = {entry_id for key, entry_id in self._in_flight if key == stream}
        ids.update(self._acks.get(stream, ()))  # handled; the ack waits for Redis
        ids.update(self._acks_after.get(stream, ()))  # handled; its writes wait for Redis
        ids.update(  # handled; its writes wait for an earlier writer's
            d.entry_id for q in self._writes_order.values() for d in q if d.stream == stream
        )
        ids.update(i for key, i, _ in self._superseded if key == stream)  # to be acked
        return ids

    async def _take_over(
        self,
        stream: str,
        claimed: list[Any],
        deleted: list[Any],
        counts: dict[str, int] | None = None,
    ) -> None:
        """Dispatch entries taken over from the group's pending list (with their delivery
        counts, read from Redis unless given; dead-lettered past `max_deliveries`); ack
        those trimmed meanwhile."""
        if deleted:
            # Trimmed or deleted while pending (Redis >= 7): nothing left to handle.
            self.deleted_pending_count += len(deleted)
            for raw_id in deleted:
                self._queue_ack(stream, as_str(raw_id))
            log.warning(
                "%d pending entries of %s were trimmed before handling", len(deleted), stream
            )
        settled = self._settled_here(stream)
        fresh = [
            (entry_id, f)
            for entry_id, f in ((as_str(i), f) for i, f in claimed)
            if entry_id not in settled
        ]
        if not fresh:
            return
        if counts is None:
            counts = await self._delivery_counts(stream, [i for i, _ in fresh])
        self.reclaimed_count += len(fresh)
        if self.metrics is not None:
            self.metrics.reclaimed.inc(len(fresh))
        for entry_id, fields in fresh:
            deliveries = counts.get(entry_id, 1)
            if deliveries > self.config.max_deliveries:
                raw = (fields or {}).get(EVENT_FIELD, b"")
                await self._dead_letter(
                    stream,
                    entry_id,
                    raw,
                    deliveries - 1,
                    f"gave up after {deliveries - 1} deliveries without an ack "
                    "(handlers failed or consumers died while handling it)",
                )
            else:
                await self._accept(stream, entry_id, fields, deliveries)

    async def _wait_capacity(self) -> None:
        while self._running and len(self._in_flight) >= self.max_in_flight:
            self._capacity.clear()
            await self._capacity.wait()

    async def _recover(self, event_types: list[EventType]) -> None:
        """Before reading anything new of `event_types` (all at start; one a component
        subscribes to later, when Redis let it start only then), handle what this group
        left unacked: an exclusive consumer (the only one of its service) takes over every
        pending entry, whoever held it, since its holder was a predecessor that died; any
        consumer handles its own. New events wait, so a restart keeps per-stream order
        (ADR 0002)."""
        names = None if self.config.exclusive else await self._client_names()
        for event_type in event_types:
            stream = stream_key(event_type)
            if self.config.exclusive:
                await self._reclaim(stream, min_idle_ms=0)
            else:
                # A gone consumer's entries become ours (JUSTID: not a delivery yet), so
                # the read of our own pending hands them out with ours, in stream order.
                for consumer in await self._gone_consumers(stream, names):
                    _, deleted = await self._claim_from(stream, consumer, justid=True)
                    await self._take_over(stream, [], deleted)
                await self._read_own_pending(stream)
            self._recovered.add(event_type)

    async def _report_group(self, stream: str) -> None:
        """Our group's backlog on `stream` as metrics: lag (not yet delivered to anyone in
        the group) and pending (delivered, not acked). Both growing = consumers too slow."""
        if self.metrics is None:
            return
        groups: Any = await self.client.xinfo_groups(stream)
        for info in groups:
            if as_str(info["name"]) == self.config.group:
                self.metrics.pending.labels(stream).set(int(info["pending"]))
                lag = info.get("lag")
                if lag is not None:  # Redis cannot tell after some trims: leave it unset
                    self.metrics.group_lag.labels(stream).set(int(lag))

    async def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        def key(entry: str) -> tuple[int, int]:
            ms, _, seq = entry.partition("-")
            return int(ms), int(seq or 0)

        ordered = sorted(ids, key=key)
        rows = await self.client.xpending_range(
            stream,
            self.config.group,
            min=ordered[0],
            max=ordered[-1],
            count=len(ids) * 4 + 100,
            consumername=self.config.consumer,
        )
        wanted = set(ids)
        counts: dict[str, int] = {}
        for row in rows:
            entry_id = as_str(row["message_id"])
            if entry_id in wanted:
                counts[entry_id] = int(row["times_delivered"])
        return counts

    async def _collect_consumers(self, stream: str) -> None:
        """Remove consumers of our group that are long idle and hold nothing pending (each
        restart leaves one behind, since consumer names carry the pid)."""
        consumers = await self.client.xinfo_consumers(stream, self.config.group)
        for info in consumers:
            name = as_str(info["name"])
            if name == self.config.consumer:
                continue
            if int(info["pending"]) == 0 and int(info["idle"]) > self.config.consumer_gc_idle_ms:
                await self.client.xgroup_delconsumer(stream, self.config.group, name)
                log.info("removed idle consumer %s from %s", name, stream)

    # --- introspection -------------------------------------------------------------------------

    def health(self) -> BusHealth:
        outbox = len(self._outbox)
        full = outbox >= self.config.max_queue_size
        if full:
            state, message = (
                BusState.UNHEALTHY,
                (
                    f"Queue is full: {outbox} events wait for Redis "
                    f"(EVENT_MAX_QUEUE_SIZE={self.config.max_queue_size}); "
                    + (self._last_error or "")
                ),
            )
        elif not self._connected:
            state, message = BusState.DEGRADED, self._last_error or "Redis not connected"
        elif self._refusing is not None:
            state, message = (
                BusState.DEGRADED,
                f"Redis refuses writes for now, {outbox} events kept in order: {self._refusing}",
            )
        else:
            state, message = BusState.HEALTHY, None
        return BusHealth(
            state=state,
            transport=self.name,
            connected=self._connected,
            queue_size=outbox + len(self._in_flight),
            outbox_size=outbox,
            in_flight=len(self._in_flight),
            dead_letters=self.dead_letter_count,
            error_message=message,
        )


class EventBus:
    """Publish/subscribe over a transport (in memory by default).

    ```python
    bus = EventBus()                                         # one process
    bus = EventBus.redis(settings)                           # Redis Streams, group = service
    bus.subscribe(EventType.TICK, handler)
    await bus.publish(Event(event_type=EventType.TICK, data={...}))
    ```
    """

    def __init__(
        self,
        transport: Transport | None = None,
        *,
        metrics: Metrics | None = None,
        source: str = "local",
    ) -> None:
        self.transport = transport if transport is not None else InMemoryTransport()
        self.metrics = metrics
        self.source = source
        self._dispatcher = Dispatcher(metrics)
        self.transport.bind(self._dispatcher, metrics, source)
        self._started = False
        self._closed = False

    @classmethod
    def redis(
        cls, settings: CoreSettings, *, metrics: Metrics | None = None, **overrides: Any
    ) -> EventBus:
        config = RedisBusConfig.from_settings(settings, **overrides)
        return cls(RedisStreamsTransport(config), metrics=metrics, source=config.consumer)

    @classmethod
    def memory(
        cls, settings: CoreSettings | None = None, *, metrics: Metrics | None = None
    ) -> EventBus:
        if settings is None:
            return cls(metrics=metrics)
        transport = InMemoryTransport(
            max_queue_size=settings.event_max_queue_size,
            worker_count=settings.event_worker_count,
            max_deliveries=settings.event_max_deliveries,
        )
        return cls(transport, metrics=metrics, source=settings.consumer_name)

    def subscribe(
        self,
        event_type: EventType,
        handler: Handler,
        *,
        name: str | None = None,
        conflate: bool = False,
    ) -> None:
        """Call `handler(event)` (sync or async) for every event of `event_type`.

        `conflate=True`: only the newest event per key among those waiting is handled, read
        a few times a second (for marks to market; see the module docstring). The in-memory
        transport delivers every event either way."""
        event_type = EventType(str(event_type).upper())
        if not callable(handler):
            raise TypeError("handler must be callable")
        self._dispatcher.add(
            _Subscription(event_type, handler, name or _handler_name(handler), conflate)
        )
        self.transport.subscribed(event_type)

    def unsubscribe(self, event_type: EventType, handler: Handler) -> None:
        self._dispatcher.remove(event_type, handler)

    @property
    def subscriptions(self) -> list[EventType]:
        return self._dispatcher.event_types

    def write_on_ack(self, *command: Any) -> None:
        """Inside a handler: send the Redis `command` (`"HSET", key, field, value`) with
        this event's ack, once everything the handler published is in Redis: the write in
        one pipeline, the XACK in the next, once Redis has taken the write. A crash before
        that loses neither half: the event is redelivered and the write was not made. A
        handler that raises has its writes dropped; a write Redis refuses for what it is
        (malformed) sends the event to the dead-letter stream with the reason instead of
        acking it. The write must be idempotent (the pipeline may be sent again after a
        lost connection). Costs no round trip of its own. The Redis transport only."""
        self.transport.write_on_ack(command)

    def publish_nowait(self, event: Event, *, then: Commands = ()) -> asyncio.Future[str]:
        """Like `publish(event, then=...)` for code that must not wait: the event (and
        `then`) is queued at once, in order with every other publish, and the returned
        future resolves once it is in Redis (or fails with Redis's refusal). Raises
        `QueueFullError` at once when the outbox is full. The bus must be started; the
        Redis transport only. Inside a handler the event's ack waits for it, as with
        `publish`."""
        if not isinstance(event, Event):
            raise TypeError(f"publish_nowait() takes an Event, not {type(event).__name__}")
        if self._closed or not self._started:
            raise RuntimeError("the event bus is not running: publish refused")
        return self.transport.publish_nowait(event.with_context(source=self.source), then)

    def ack_after(self, future: asyncio.Future[Any]) -> None:
        """Inside a handler: ack the event being handled only once `future` is done as
        well as everything the handler published, without the handler waiting for it
        (the bus takes the next event meanwhile). If `future` fails the event is not acked
        and is delivered again once idle (`EVENT_CLAIM_IDLE_MS`). For outputs a handler
        hands to someone else to publish (features' batches)."""
        self.transport.ack_after(future)

    def hold(self) -> HeldEvent:
        """Inside a handler: set the event being handled aside. It is not acked when the
        handler returns; the handler keeps the `HeldEvent` and handles it later in
        `with held.resume(): ...` (from another event's handler or a timer), and the event
        is acked once what that block published is in Redis. For a handler that must put
        events back in order (strategy, predictions of one symbol from several replicas).
        `held.abandon()` leaves it unacked, to be delivered again."""
        return self.transport.hold()

    async def publish(self, event: Event, *, then: Commands = ()) -> Event:
        """Validate, stamp (source, correlation id) and hand `event` to the transport.

        `then`: Redis commands (`("HSET", key, field, value)`, ...) run right after the
        event's XADD in one script in the same pipeline, so they are written only if the
        event is and cost no round trip of their own: state that must never be saved
        ahead of the event it belongs to (features' engine state). The Redis transport
        only. With `then`, publish returns once the event and the commands are in Redis,
        and raises Redis's error if it refused one of them.

        Returns the stamped event. Raises `QueueFullError` ("Queue is full") when the bounded
        queue or outbox is full, and `TypeError` for anything but an `Event`.
        """
        if not isinstance(event, Event):
            raise TypeError(f"publish() takes an Event, not {type(event).__name__}")
        if self._closed:
            raise RuntimeError("the event bus is stopped: publish refused")
        if not self._started:
            await self.start()
        stamped = event.with_context(source=self.source)
        await self.transport.publish(stamped, then)
        return stamped

    async def start(self) -> None:
        if not self._started:
            self._started = True
            self._closed = False
            await self.transport.start()

    async def stop_consuming(self, drain_timeout: float = 5.0) -> None:
        """Stop taking new events and let in-flight handlers finish (shutdown, step one)."""
        if self._started:
            await self.transport.stop_consuming(drain_timeout)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Finish in-flight work, deliver everything published, close. Later publishes fail."""
        if self._started:
            self._started = False
            self._closed = True
            await self.transport.stop(drain_timeout)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every event published so far is delivered (memory) or in Redis."""
        await self.transport.flush(timeout)

    def health(self) -> BusHealth:
        return self.transport.health()

    @property
    def queue_size(self) -> int:
        return self.transport.health().queue_size

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
