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
row has waited FEATURE_BATCH_TIMEOUT, so a lone row is never delayed longer than that,
and once Redis has answered for the batch before it: one batch is in flight at a time,
and under load the next gathers the rows computed meanwhile. A batch also counts as full
once it holds a row of every symbol seen lately (see `EventBatcher`).
FEATURE_BATCH_TIMEOUT=0 sends each row as soon as the batch before it is written.

While Redis is unreachable batches wait in the bus's outbox and their candles stay
unacked; so do they while Redis refuses writes for now (out of memory: the bus keeps
them, ADR 0002). If Redis refuses a batch otherwise (a key of the wrong type, say) or the
outbox cannot take it, the batch is sent again, with backoff, until Redis takes it, and
the rows computed after it wait behind it: rows reach Redis in candle order and none is
skipped (`EventBatcher`). The component is degraded meanwhile, naming the error and the
rows held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import Context
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram
from pydantic import Field

from hean.core.bus import Backoff, EventBus, when_all_done, worker_lane
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


#: Queues a batch's writes and returns their futures (a failed one for what it could not
#: queue); the batch is written once all of them have succeeded.
SendBatch = Callable[[list[Item]], Sequence[asyncio.Future[Any]]]


def _failed(error: BaseException) -> asyncio.Future[Any]:
    """A write that failed before it was queued, as the future of one that Redis refused."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


class EventBatcher:
    """Collects items and writes them in batches, in the order they were added, one batch
    at a time. `add` returns at once with a future that resolves once the item's batch is
    written: the caller hands it to `EventBus.ack_after`.

    A batch is sent when it is full or its oldest item has waited `timeout_s`, and once
    Redis has answered for the batch before it. Full means `size` items, or one item from
    every bus worker lane with a symbol active lately (seen within `active_window_s`),
    whichever is fewer: the bus handles one event per lane at a time (symbols share
    lanes), so a lane's next row cannot join before its current one is added, and waiting
    for more would only add the timeout to every row. While a batch is in flight the next
    rows gather, so under load batches grow towards `size` instead of queueing.

    A batch Redis refuses (any of its writes fails: a key of the wrong type, say, or the
    outbox is full) goes again, whole and ahead of everything added since, after a backoff
    (`retry_initial_s` doubling to `retry_max_s`), until Redis takes it; only then do its
    items resolve. So rows reach Redis in the order they were computed and none is
    skipped, whether Redis refuses for a millisecond or an hour. A refusal within one
    batch (Redis taking some of its writes, not others) writes those again: a repeat,
    which consumers drop.
    """

    def __init__(
        self,
        send: SendBatch,
        *,
        size: int,
        timeout_s: float,
        active_window_s: float = 1.0,
        lane: Callable[[str], int] | None = None,
        on_written: Callable[[list[Item]], None] | None = None,
        on_refused: Callable[[list[Item], BaseException, int, float], None] | None = None,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
    ) -> None:
        self.send = send
        self.lane = lane or (lambda symbol: hash(symbol))
        self.size = size
        self.timeout_s = timeout_s
        self.active_window_s = max(active_window_s, 4 * timeout_s)
        self.on_written = on_written
        self.on_refused = on_refused
        self._backoff = Backoff(retry_initial_s, retry_max_s)
        self._seen: dict[str, float] = {}
        self._items: list[Item] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: list[Item] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._stopped = False
        self.refusals = 0  # consecutive refused sends of the batch at the front

    @property
    def _held(self) -> bool:
        """A batch is in flight or waits to go again: the others wait behind it."""
        return self._sending is not None or self._retry is not None

    @property
    def waiting(self) -> int:
        """Items added and not yet written (in flight or waiting to be sent)."""
        return len(self._items) + len(self._sending or ())

    def add(self, event: Event, symbol: str, state: dict[str, Any]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        item = Item(event, symbol, state, loop.create_future(), loop.time())
        self._items.append(item)
        self._seen[symbol] = item.queued_at
        self._schedule(item.queued_at)
        return item.done

    def _schedule(self, now: float) -> None:
        """Send the waiting items if they are due (full or waited long enough), else make
        sure a timer will send them."""
        if not self._items or self._held:
            return  # sent once Redis answers for the batch in flight (or the retry is due)
        waited = now - self._items[0].queued_at
        due = self.timeout_s <= 0 or waited >= self.timeout_s
        if due or len(self._items) >= self._target(now):
            self.flush()
        elif self._timer is None:
            # Sent outside any handler: the batch is not one handler's output.
            self._timer = asyncio.get_running_loop().call_later(
                self.timeout_s - waited, self.flush, context=Context()
            )

    def _target(self, now: float) -> int:
        horizon = now - self.active_window_s
        for symbol in [s for s, t in self._seen.items() if t < horizon]:
            del self._seen[symbol]
        lanes = {self.lane(symbol) for symbol in self._seen}
        return max(1, min(self.size, len(lanes)))

    def flush(self) -> None:
        """Send the waiting items now (up to `size`), unless a batch is in flight or
        waiting to be sent again: they go when that one is written."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stopped or not self._items or self._held:
            return
        batch, self._items = self._items[: self.size], self._items[self.size :]
        self._sending = batch
        try:
            # In a fresh context: the writes are the batch's, not the output of whichever
            # handler happened to close it (its ack waits for its own item only).
            futures = list(Context().run(self.send, batch))
        except Exception as exc:  # noqa: BLE001 - the batch is refused: sent again
            futures = [_failed(exc)]
        when_all_done(futures, partial(self._answered, batch, futures))

    def _answered(self, batch: list[Item], futures: list[asyncio.Future[Any]]) -> None:
        self._sending = None
        error = next(
            (
                asyncio.CancelledError() if f.cancelled() else f.exception()
                for f in futures
                if f.cancelled() or f.exception() is not None
            ),
            None,
        )
        loop = asyncio.get_running_loop()
        if error is not None and self._stopped:
            self._fail(batch, error)
            return
        if error is not None:
            self._items[:0] = batch  # ahead of everything added since
            self.refusals += 1
            delay = self._backoff.next_delay()
            if self.on_refused is not None:
                self.on_refused(batch, error, self.refusals, delay)
            self._retry = loop.call_later(delay, self._send_again, context=Context())
            return
        self._backoff.reset()
        self.refusals = 0
        if self.on_written is not None:
            self.on_written(batch)
        for item in batch:
            if not item.done.done():
                item.done.set_result(None)
        self._schedule(loop.time())

    def _send_again(self) -> None:
        self._retry = None
        self.flush()

    def stop(self) -> None:
        """Send nothing more. The items waiting fail (their events are not acked, so they
        come again); a batch in flight still resolves its items, or fails them if refused."""
        self._stopped = True
        for handle in (self._timer, self._retry):
            if handle is not None:
                handle.cancel()
        self._timer = self._retry = None
        items, self._items = self._items, []
        self._fail(items, RuntimeError("stopped before its batch was written"))

    @staticmethod
    def _fail(items: list[Item], error: BaseException) -> None:
        for item in items:
            if not item.done.done():
                item.done.set_exception(error)


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
            self._send,
            size=batch_size,
            timeout_s=batch_timeout_ms / 1000,
            lane=lane,
            on_written=self._written,
            on_refused=self._refused,
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
        self.m_refused = Counter(
            "hean_features_batches_refused_total",
            "FEATURES_READY batches Redis refused (each is sent again until taken)",
            registry=registry,
        )
        #: Each symbol's engine state after its last candle handled: what a handler that
        #: fails midway puts the engine back to.
        self._last_state: dict[str, dict[str, Any]] = {}
        self.restored_symbols: tuple[str, ...] = ()
        self.published = 0
        self.refused_batches = 0
        self.last_error: str | None = None

    async def start(self) -> None:
        states = await self.store.load()
        for symbol, state in states.items():
            try:
                self.core.restore(symbol, state)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("discarding unreadable engine snapshot of %s: %s", symbol, exc)
                continue
            self._last_state[symbol] = state
        self.restored_symbols = tuple(self._last_state)
        if self.restored_symbols:
            log.info(
                "restored feature engines: %s",
                ", ".join(
                    f"{s} ({self.core.engines[s].bars_seen} bars)" for s in self.restored_symbols
                ),
            )
        self.bus.subscribe(EventType.CANDLE, self.on_candle, name="features.on_candle")

    def stop(self) -> None:
        # The bus has stopped taking candles; rows not yet sent fail, so their candles stay
        # unacked and are processed again after a restart, from the state Redis holds.
        self.batcher.stop()

    async def on_candle(self, event: Event) -> None:
        started = time.perf_counter()
        try:
            candle = candle_from_event(event.data, event.timestamp)
        except BadCandleError as exc:
            raise PermanentError(f"CANDLE {event.event_id}: {exc}") from exc
        symbol = candle.symbol
        outcome = self.core.on_candle(candle)
        if outcome.stale:
            self.m_stale.labels(symbol).inc()
            log.debug("stale candle %s ignored (%s)", event.event_id, symbol)
            return
        try:
            state = self.core.snapshot(symbol)
            if outcome.features is None:  # warming up: only the state changes, with the ack
                self.bus.write_on_ack(*self.store.save_command({symbol: state}))
            else:
                features_event = Event(
                    event_type=EventType.FEATURES_READY,
                    data=self.core.features_data(
                        candle, outcome.features, outcome.previous_timestamp_ns
                    ),
                    correlation_id=event.correlation_id or event.event_id,
                )
                # Acked once the batch (row and state) is in Redis; the bus takes the next
                # candle meanwhile, and its row queues behind this one.
                self.bus.ack_after(self.batcher.add(features_event, symbol, state))
        except BaseException:
            # Not handed on: forget the candle so its redelivery is processed again.
            self.core.restore(symbol, self._last_state.get(symbol))
            raise
        finally:
            if self.metrics is not None:
                self.metrics.latency_seconds.labels(stage="features").observe(
                    time.perf_counter() - started
                )
        self._last_state[symbol] = state

    def _send(self, items: list[Item]) -> list[asyncio.Future[Any]]:
        """Queue a batch: its events, then the engine states in the last event's pipeline,
        so a state is never saved before its events and costs no round trip of its own."""
        states = {item.symbol: item.state for item in items}  # the latest per symbol
        *rows, last = items
        written: list[asyncio.Future[Any]] = []
        try:
            written.extend(self.bus.publish_nowait(item.event) for item in rows)
            save = [self.store.save_command(states)]
            written.append(self.bus.publish_nowait(last.event, then=save))
        except Exception as exc:  # noqa: BLE001 - the outbox is full: the batch goes again
            written.append(_failed(exc))
        return written

    def _written(self, items: list[Item]) -> None:
        if self.last_error is not None:
            log.warning("Redis took the held FEATURES_READY rows: features caught up")
        self.last_error = None
        self.published += len(items)
        self.m_batch.observe(len(items))
        for item in items:
            self.m_published.labels(item.symbol).inc()

    def _refused(self, items: list[Item], error: BaseException, attempt: int, delay: float) -> None:
        """Redis refused a batch: it goes again after `delay`; the rows after it wait."""
        self.last_error = f"{type(error).__name__}: {error}"
        self.refused_batches += 1
        self.m_refused.inc()
        if attempt == 1 or attempt % 20 == 0:
            log.error(
                "Redis refused a batch of %d FEATURES_READY rows (%s); sending it again, "
                "%d rows held behind it in order (attempt %d, next in %.2f s)",
                len(items),
                self.last_error,
                self.batcher.waiting - len(items),
                attempt,
                delay,
            )

    def health_check(self) -> dict[str, Any]:
        if self.last_error is not None:
            return {
                "state": "degraded",
                "error_message": f"Redis refused FEATURES_READY writes, retrying with "
                f"{self.batcher.waiting} rows held: {self.last_error}",
            }
        return {"state": "healthy"}


def build(ctx: ServiceContext) -> None:
    settings = cast(FeaturesSettings, ctx.settings)
    service = FeaturesService(
        ctx.bus,
        FeatureCore(),
        EngineStore(ctx.redis, settings.state_key),
        # A batch goes to the outbox whole or is sent again: it must fit in it.
        batch_size=min(settings.feature_batch_size, settings.event_max_queue_size),
        batch_timeout_ms=settings.feature_batch_timeout_ms,
        metrics=ctx.metrics,
        worker_count=settings.event_worker_count,
    )
    ctx.orchestrator.register_component(name=COMPONENT, component=service, circuit_breaker=False)
