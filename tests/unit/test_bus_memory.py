from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from hean.core.bus import EventBus, InMemoryTransport
from hean.core.errors import QueueFullError
from hean.core.types import Event, EventType


def tick(i: int, symbol: str = "BTC/USDT") -> Event:
    return Event(
        event_type=EventType.TICK, data={"symbol": symbol, "price": Decimal(100 + i), "seq": i}
    )


async def test_memory_bus_delivers_to_every_subscriber_in_order() -> None:
    bus = EventBus()
    first: list[int] = []
    second: list[int] = []
    bus.subscribe(EventType.TICK, lambda e: first.append(e.data["seq"]))

    async def async_handler(event: Event) -> None:
        second.append(event.data["seq"])

    bus.subscribe(EventType.TICK, async_handler)
    for i in range(50):
        await bus.publish(tick(i))
    await bus.flush(5)
    assert first == second == list(range(50))
    await bus.stop()


async def test_memory_bus_stamps_source_and_propagates_correlation() -> None:
    bus = EventBus(source="strategy:test")
    signals: list[Event] = []

    async def on_tick(event: Event) -> None:
        await bus.publish(
            Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"})
        )

    bus.subscribe(EventType.TICK, on_tick)
    bus.subscribe(EventType.SIGNAL, signals.append)
    published = await bus.publish(tick(1))
    await bus.flush(5)
    await bus.flush(5)
    assert published.source == "strategy:test"
    assert published.correlation_id == published.event_id
    assert len(signals) == 1 and signals[0].correlation_id == published.event_id
    await bus.stop()


async def test_memory_bus_failing_handler_retried_then_dead_lettered_others_unaffected() -> None:
    transport = InMemoryTransport(max_deliveries=3, retry_delay=0.001)
    bus = EventBus(transport)
    attempts: list[int] = []
    ok: list[int] = []

    def flaky(event: Event) -> None:
        attempts.append(event.data["seq"])
        raise RuntimeError("boom")

    bus.subscribe(EventType.TICK, flaky)
    bus.subscribe(EventType.TICK, lambda e: ok.append(e.data["seq"]))
    await bus.publish(tick(7))
    await bus.flush(5)
    assert attempts == [7, 7, 7]
    assert ok == [7]  # the healthy handler ran once, not on every retry
    assert transport.dead_letter_count == 1
    event, error = transport.dead_letters[0]
    assert event.data["seq"] == 7 and "RuntimeError: boom" in error
    await bus.stop()


async def test_memory_bus_queue_full_raises_clear_error() -> None:
    transport = InMemoryTransport(max_queue_size=5, worker_count=1)
    bus = EventBus(transport)
    gate = asyncio.Event()

    async def blocked(event: Event) -> None:
        await gate.wait()

    bus.subscribe(EventType.TICK, blocked)
    for i in range(5):
        await bus.publish(tick(i))
    with pytest.raises(QueueFullError, match="Queue is full"):
        await bus.publish(tick(5))
    assert bus.health().state.value == "unhealthy"
    gate.set()
    await bus.flush(5)
    assert bus.health().state.value == "healthy"
    await bus.stop()


async def test_memory_bus_per_symbol_order_kept_across_parallel_workers() -> None:
    bus = EventBus(InMemoryTransport(worker_count=4))
    seen: dict[str, list[int]] = {}

    async def handler(event: Event) -> None:
        await asyncio.sleep(0)
        seen.setdefault(event.data["symbol"], []).append(event.data["seq"])

    bus.subscribe(EventType.TICK, handler)
    for i in range(200):
        await bus.publish(tick(i, symbol=f"S{i % 7}"))
    await bus.flush(5)
    for symbol, seqs in seen.items():
        assert seqs == sorted(seqs), symbol
    assert sum(len(v) for v in seen.values()) == 200
    await bus.stop()


async def test_memory_bus_rejects_non_events() -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match="takes an Event"):
        await bus.publish({"event_type": "TICK"})  # type: ignore[arg-type]


async def test_memory_bus_permanent_error_dead_lettered_without_retry() -> None:
    from hean.core.errors import PermanentError

    transport = InMemoryTransport(max_deliveries=5, retry_delay=0.001)
    bus = EventBus(transport)
    attempts: list[int] = []

    def refuse(event: Event) -> None:
        attempts.append(event.data["seq"])
        raise PermanentError("price off tick")

    bus.subscribe(EventType.TICK, refuse)
    await bus.publish(tick(3))
    await bus.flush(5)
    assert attempts == [3]
    assert transport.dead_letter_count == 1
    await bus.stop()


async def test_memory_bus_handler_told_when_it_runs_on_the_last_delivery() -> None:
    from hean.core.bus import is_last_attempt

    bus = EventBus(InMemoryTransport(max_deliveries=3, retry_delay=0.001))
    seen: list[bool] = []

    def handler(event: Event) -> None:
        seen.append(is_last_attempt())
        if not is_last_attempt():
            raise RuntimeError("venue down")

    bus.subscribe(EventType.TICK, handler)
    await bus.publish(tick(1))
    await bus.flush(5)
    assert seen == [False, False, True]
    assert not is_last_attempt()  # outside a handler
    await bus.stop()
