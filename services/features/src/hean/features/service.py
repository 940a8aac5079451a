"""features wiring: CANDLE in, FEATURES_READY out, engine state in Redis.

A candle is acked only once its FEATURES_READY is in Redis and the engine state after the
candle is saved: a crash before that redelivers the candle (the restored engine has not
seen it, so it is processed again), a crash after it finds the candle already in the saved
state (ignored as stale). State therefore survives restarts without a new warm-up. The
handler does not wait for the write (`EventBus.ack_after`): the bus handles the symbol's
next candle while Redis takes this one, so a symbol costs CPU per candle, not a round trip.

Batching (FEATURE_BATCH_SIZE, FEATURE_BATCH_TIMEOUT ms): feature rows ready at the same
time (several symbols, handled on parallel bus workers) go out together, with one state
write per batch; the state write (HSET) rides in the same Redis pipeline, right after the
batch's last XADD (`EventBus.publish_nowait(..., then=...)`), so it costs no round trip and
is never written ahead of its events. A batch is sent when it is full or when its oldest
row has waited FEATURE_BATCH_TIMEOUT, so a lone row is never delayed longer than that.
A batch also counts as full once it holds a row of every symbol seen lately (see
`EventBatcher`). FEATURE_BATCH_TIMEOUT=0 sends every row at once.

While Redis is unreachable batches wait in the bus's outbox and their candles stay
unacked. If Redis refuses a batch (not a lost connection: out of memory, say), its
symbols' engines go back to their last saved state and the candles are delivered again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from contextvars import Context
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram
from pydantic import Field

from hean.core.bus import EventBus, when_all_done, worker_lane
from hean.core.errors import PermanentError
from hean.core.event_streams import as_str
from hean.core.metrics import Metrics
from hean.core.service import ServiceContext
from hean.core.settings import CoreSettings, MLSettings
from hean.core.types import Event, EventType
from hean.features.core import BadCandleError, FeatureCore, candle_from_event

log = logging.getLogger(__name__)

COMPONENT = "features"


class FeaturesSettings(CoreSettings, MLSettings):
    features_state_key: str = Field(default="", alias="FEATURES_STATE_KEY")

    @property
    def state_key(self) -> str:
        return self.features_state_key or f"hean:features:{self.service_name}:state"


class EngineStore:
    """Engine snapshots per symbol in one Redis hash."""

    def __init__(self, client: aioredis.Redis, key: str) -> None:
        self.client = client
        self.key = key

    async def load(self) -> dict[str, dict[str, Any]]:
        raw = await self.client.hgetall(self.key)
        return {as_str(k): orjson.loads(v) for k, v in raw.items()}

    async def save(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        if states:
            await self.client.hset(
                self.key, mapping={s: orjson.dumps(dict(v)) for s, v in states.items()}
            )

    def save_command(self, states: Mapping[str, Mapping[str, Any]]) -> tuple[Any, ...]:
        """`save` as one Redis command, to send in the pipeline of a publish (`then`)."""
        fields = [x for s, v in states.items() for x in (s, orjson.dumps(dict(v)))]
        return ("HSET", self.key, *fields)


@dataclass(slots=True)
class Item:
    event: Event
    symbol: str
    state: dict[str, Any]
    done: asyncio.Future[None]
    queued_at: float = field(default=0.0)


SendBatch = Callable[[list[Item]], None]


class EventBatcher:
    """Collects items; sends a batch when it is full or its oldest item has waited
    `timeout_s`. `add` returns at once with a future that resolves once the item's batch
    is written (or fails with its error): the caller hands it to `EventBus.ack_after`.

    Full means `size` items, or one item from every bus worker lane with a symbol active
    lately (seen within `active_window_s`), whichever is fewer: the bus handles one event
    per lane at a time (symbols share lanes), so a lane's next row cannot join before its
    current one is added, and waiting for more would only add the timeout to every row.

    `send` queues the batch without waiting (`EventBus.publish_nowait`), so batches go out
    in the order they were closed, and resolves the items' futures when it is written.
    """

    def __init__(
        self,
        send: SendBatch,
        *,
        size: int,
        timeout_s: float,
        active_window_s: float = 1.0,
        lane: Callable[[str], int] | None = None,
    ) -> None:
        self.send = send
        self.lane = lane or (lambda symbol: hash(symbol))
        self.size = size
        self.timeout_s = timeout_s
        self.active_window_s = max(active_window_s, 4 * timeout_s)
        self._seen: dict[str, float] = {}
        self._items: list[Item] = []
        self._timer: asyncio.TimerHandle | None = None
        self.batches = 0

    def add(self, event: Event, symbol: str, state: dict[str, Any]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        item = Item(event, symbol, state, loop.create_future(), loop.time())
        self._items.append(item)
        self._seen[symbol] = item.queued_at
        if len(self._items) >= self._target(item.queued_at) or self.timeout_s <= 0:
            self.flush()
        elif self._timer is None:
            # Sent outside any handler: the batch is not one handler's output.
            self._timer = loop.call_later(self.timeout_s, self.flush, context=Context())
        return item.done

    def _target(self, now: float) -> int:
        horizon = now - self.active_window_s
        for symbol in [s for s, t in self._seen.items() if t < horizon]:
            del self._seen[symbol]
        lanes = {self.lane(symbol) for symbol in self._seen}
        return max(1, min(self.size, len(lanes)))

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._items = self._items, []
        if not items:
            return
        try:
            self.send(items)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting handler
            for item in items:
                if not item.done.done():
                    item.done.set_exception(exc)
            return
        self.batches += 1


def _lane_of(symbol: str, *, workers: int) -> int:
    return worker_lane(symbol, workers)


class FeaturesService:
    """Feeds candles to the `FeatureCore` and publishes FEATURES_READY (module docstring)."""

    def __init__(
        self,
        bus: EventBus,
        core: FeatureCore,
        store: EngineStore,
        *,
        batch_size: int = 10,
        batch_timeout_ms: float = 50.0,
        metrics: Metrics | None = None,
        worker_count: int | None = None,
    ) -> None:
        self.bus = bus
        self.core = core
        self.store = store
        self.metrics = metrics
        lane = None if worker_count is None else partial(_lane_of, workers=worker_count)
        self.batcher = EventBatcher(
            self._send, size=batch_size, timeout_s=batch_timeout_ms / 1000, lane=lane
        )
        registry = metrics.registry if metrics is not None else None
        self.m_published = Counter(
            "hean_features_published_total", "FEATURES_READY published", ["symbol"],
            registry=registry,
        )  # fmt: skip
        self.m_stale = Counter(
            "hean_features_stale_candles_total",
            "Candles ignored: not after the last processed bar (redelivered or old)",
            ["symbol"],
            registry=registry,
        )
        self.m_batch = Histogram(
            "hean_features_batch_size",
            "FEATURES_READY events per published batch",
            buckets=(1, 2, 5, 10, 20, 50, 100),
            registry=registry,
        )
        self._persisted: dict[str, dict[str, Any]] = {}
        self.restored_symbols: tuple[str, ...] = ()
        self.published = 0
        self.last_error: str | None = None

    async def start(self) -> None:
        states = await self.store.load()
        for symbol, state in states.items():
            try:
                self.core.restore(symbol, state)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("discarding unreadable engine snapshot of %s: %s", symbol, exc)
                continue
            self._persisted[symbol] = state
        self.restored_symbols = tuple(self._persisted)
        if self.restored_symbols:
            log.info(
                "restored feature engines: %s",
                ", ".join(
                    f"{s} ({self.core.engines[s].bars_seen} bars)" for s in self.restored_symbols
                ),
            )
        self.bus.subscribe(EventType.CANDLE, self.on_candle, name="features.on_candle")

    async def on_candle(self, event: Event) -> None:
        started = time.perf_counter()
        try:
            candle = candle_from_event(event.data, event.timestamp)
        except BadCandleError as exc:
            raise PermanentError(f"CANDLE {event.event_id}: {exc}") from exc
        outcome = self.core.on_candle(candle)
        if outcome.stale:
            self.m_stale.labels(candle.symbol).inc()
            log.debug("stale candle %s ignored (%s)", event.event_id, candle.symbol)
            return
        state = self.core.snapshot(candle.symbol)
        try:
            if outcome.features is None:  # warming up: only the state changes, with the ack
                self.bus.write_on_ack(*self.store.save_command({candle.symbol: state}))
                self._persisted[candle.symbol] = state
                return
            features_event = Event(
                event_type=EventType.FEATURES_READY,
                data=self.core.features_data(
                    candle, outcome.features, outcome.previous_timestamp_ns
                ),
                correlation_id=event.correlation_id or event.event_id,
            )
            written = self.batcher.add(features_event, candle.symbol, state)
            if written.done() and written.exception() is not None:
                raise cast(BaseException, written.exception())  # refused at once: retried
            # Acked once the batch (event and state) is in Redis; the bus takes the next
            # candle meanwhile.
            self.bus.ack_after(written)
        except BaseException:
            # Not saved: forget the candle so its redelivery is processed again.
            self._rollback(candle.symbol)
            raise
        finally:
            if self.metrics is not None:
                self.metrics.latency_seconds.labels(stage="features").observe(
                    time.perf_counter() - started
                )

    def _rollback(self, symbol: str) -> None:
        self.core.restore(symbol, self._persisted.get(symbol))

    def _send(self, items: list[Item]) -> None:
        """Queue a batch: its events, then the engine state in the last event's pipeline,
        so the state is never saved before the events and costs no round trip of its own.
        The items resolve once all of it is in Redis."""
        states = {item.symbol: item.state for item in items}  # the latest per symbol
        *rows, last = items
        try:
            written = [self.bus.publish_nowait(item.event) for item in rows]
            save = [self.store.save_command(states)]
            written.append(self.bus.publish_nowait(last.event, then=save))
        except Exception as exc:  # the outbox is full: every item of the batch fails
            self._refused(states, exc)
            raise
        when_all_done(written, partial(self._sent, items, states, written))

    def _sent(
        self,
        items: list[Item],
        states: dict[str, dict[str, Any]],
        written: list[asyncio.Future[str]],
    ) -> None:
        error = next((f.exception() for f in written if f.exception() is not None), None)
        if error is not None:
            self._refused(states, error)
            for item in items:
                if not item.done.done():
                    item.done.set_exception(error)
            return
        self.last_error = None
        self._persisted.update(states)
        self.published += len(items)
        self.m_batch.observe(len(items))
        for item in items:
            self.m_published.labels(item.symbol).inc()
            if not item.done.done():
                item.done.set_result(None)

    def _refused(self, states: Mapping[str, Any], error: BaseException) -> None:
        """A batch that will not be written: its candles stay unacked and come again, so
        its symbols' engines go back to their last saved state to process them anew."""
        self.last_error = f"{type(error).__name__}: {error}"
        for symbol in states:
            self._rollback(symbol)

    def health_check(self) -> dict[str, Any]:
        if self.last_error is not None:
            return {"state": "degraded", "error_message": f"last batch failed: {self.last_error}"}
        return {"state": "healthy"}


def build(ctx: ServiceContext) -> None:
    settings = cast(FeaturesSettings, ctx.settings)
    service = FeaturesService(
        ctx.bus,
        FeatureCore(),
        EngineStore(ctx.redis, settings.state_key),
        batch_size=settings.feature_batch_size,
        batch_timeout_ms=settings.feature_batch_timeout_ms,
        metrics=ctx.metrics,
        worker_count=settings.event_worker_count,
    )
    ctx.orchestrator.register_component(name=COMPONENT, component=service, circuit_breaker=False)
