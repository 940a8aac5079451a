"""The Redis Streams bus on a real redis-server: fan-out, work splitting, crash takeover,
dead letters, outbox across a Redis restart, queue bound."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError, DataError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

import hean.core.bus as bus_module
from hean.core.bus import (
    BusState,
    EventBus,
    HeldEvent,
    RedisBusConfig,
    RedisStreamsTransport,
    _confined_replies,
    _transaction,
    consumer_client_name,
    worker_lane,
)
from hean.core.errors import PermanentError, QueueFullError
from hean.core.event_streams import DLQ_STREAM, EVENT_FIELD, RedisEventStream, stream_key
from hean.core.metrics import Metrics
from hean.core.resp import RespConnection
from hean.core.types import Event, EventType
from tests.conftest import RedisServer
from tests.helpers import eventually

PROCS = Path(__file__).parent / "procs"
TICKS = stream_key(EventType.TICK)


def tick(i: int, symbol: str = "BTC/USDT") -> Event:
    return Event(
        event_type=EventType.TICK,
        data={"symbol": symbol, "price": Decimal(100) + i, "volume": 1, "seq": i},
    )


def make_bus(url: str, group: str, consumer: str | None = None, **overrides: object) -> EventBus:
    values: dict[str, object] = {
        "url": url,
        "group": group,
        "consumer": consumer or f"{group}-1",
        "block_ms": 100,
        "claim_idle_ms": 1000,
        "claim_interval_ms": 200,
        "retry_delay_ms": 20,
        "group_start_id": "0",
    }
    values.update(overrides)
    config = RedisBusConfig(**values)  # type: ignore[arg-type]
    return EventBus(RedisStreamsTransport(config), metrics=Metrics(), source=config.consumer)


async def started(bus: EventBus, buses: list[EventBus]) -> EventBus:
    """`bus`, started, and stopped when the test ends (the `buses` fixture)."""
    await bus.start()
    buses.append(bus)
    return bus


@pytest.fixture
async def buses() -> AsyncIterator[list[EventBus]]:
    started: list[EventBus] = []
    yield started
    for bus in started:
        await bus.stop(drain_timeout=2)


async def test_bus_two_groups_each_receive_every_event(
    redis_url: str, buses: list[EventBus]
) -> None:
    seen: dict[str, list[int]] = {"risk": [], "portfolio": []}
    for group in seen:
        bus = make_bus(redis_url, group)

        def record(event: Event, group: str = group) -> None:
            seen[group].append(event.data["seq"])

        bus.subscribe(EventType.TICK, record)
        await bus.start()
        buses.append(bus)
    publisher = await started(make_bus(redis_url, "market-data"), buses)

    for i in range(300):
        await publisher.publish(tick(i))
    await publisher.flush(10)

    await eventually(lambda: all(len(v) == 300 for v in seen.values()), message="both groups")
    for received in seen.values():
        assert received == list(range(300))  # one symbol: one worker, order kept


async def test_bus_three_consumers_in_one_group_split_work_without_duplicates(
    redis_url: str, buses: list[EventBus]
) -> None:
    handled: Counter[str] = Counter()
    per_consumer: Counter[str] = Counter()
    symbols = [f"SYM{i}/USDT" for i in range(12)]
    for n in range(3):
        name = f"ml-service-{n}"
        bus = make_bus(redis_url, "ml-service", name, batch_size=5)

        async def on_tick(event: Event, name: str = name) -> None:
            handled[event.event_id] += 1
            per_consumer[name] += 1
            await asyncio.sleep(0.002)  # some work, so all three get a share

        bus.subscribe(EventType.TICK, on_tick)
        await bus.start()
        buses.append(bus)
    publisher = await started(make_bus(redis_url, "market-data"), buses)

    ids = [(await publisher.publish(tick(i, symbols[i % 12]))).event_id for i in range(600)]
    await publisher.flush(10)

    await eventually(lambda: sum(handled.values()) >= 600, timeout=20, message="600 handled")
    await asyncio.sleep(0.3)  # a late duplicate would show up here
    assert set(handled) == set(ids)
    assert max(handled.values()) == 1, "an event was handled twice in normal operation"
    assert len(per_consumer) == 3 and min(per_consumer.values()) > 0, per_consumer


async def test_bus_sigkilled_consumer_pending_events_taken_over_none_lost(
    redis_url: str, redis_client: aioredis.Redis, subprocess_env: dict[str, str]
) -> None:
    publisher = make_bus(redis_url, "market-data")
    await publisher.start()
    ids = [(await publisher.publish(tick(i))).event_id for i in range(200)]
    await publisher.flush(10)
    await publisher.stop()

    def spawn(name: str, handle_s: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(PROCS / "consumer.py"), redis_url, "workers", name, handle_s],
            env=subprocess_env,
        )

    victim = spawn("victim", "0.05")
    try:
        await eventually(
            lambda: _llen(redis_client, "handled", at_least=15), timeout=30, message="victim busy"
        )
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        if victim.poll() is None:
            victim.kill()
    pending = await redis_client.xpending_range(TICKS, "workers", "-", "+", 1000, "victim")
    assert pending, "the victim died holding no pending events; the test proved nothing"

    survivor = spawn("survivor", "0.001")
    try:
        await eventually(
            lambda: _all_handled(redis_client, set(ids)), timeout=60, message="every event handled"
        )
        await eventually(
            lambda: _group_pending(redis_client, "workers", 0),
            timeout=20,
            message="nothing pending",
        )
    finally:
        survivor.terminate()
        survivor.wait(timeout=10)
    handled_by = Counter(
        b.decode()  # type: ignore[union-attr]
        for b in await redis_client.lrange("handled_by", 0, -1)
    )
    assert handled_by["survivor"] >= len(pending)
    dlq = await redis_client.xlen(DLQ_STREAM)
    assert dlq == 0


async def _llen(client: aioredis.Redis, key: str, at_least: int) -> bool:
    return int(await client.llen(key)) >= at_least


async def _all_handled(client: aioredis.Redis, ids: set[str]) -> bool:
    handled = {b.decode() for b in await client.lrange("handled", 0, -1)}  # type: ignore[union-attr]
    return ids <= handled


async def _group_pending(client: aioredis.Redis, group: str, expected: int) -> bool:
    info = await client.xpending(TICKS, group)
    return int(info["pending"]) == expected


async def test_bus_failing_handler_dead_lettered_with_error_and_consumer_continues(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    attempts: Counter[int] = Counter()
    ok: list[int] = []

    async def on_tick(event: Event) -> None:
        seq = int(event.data["seq"])
        attempts[seq] += 1
        if seq == 3:
            raise RuntimeError("exchange said no")
        ok.append(seq)

    bus = make_bus(redis_url, "strategy", max_deliveries=3)
    bus.subscribe(EventType.TICK, on_tick, name="on_tick")
    await bus.start()
    buses.append(bus)
    for i in range(10):
        await bus.publish(tick(i, symbol=f"S{i}"))

    await eventually(lambda: len(ok) == 9, message="the healthy events")
    await eventually(
        lambda: _stream_len(redis_client, DLQ_STREAM, 1), timeout=15, message="a dead letter"
    )
    async with RedisEventStream(redis_url) as stream:
        [letter] = await stream.dead_letters()
    assert letter.deliveries == 3
    assert "RuntimeError: exchange said no" in letter.error
    assert letter.group == "strategy" and letter.stream == TICKS
    assert Event.from_json(letter.payload).data["seq"] == 3
    assert attempts[3] == 3
    await eventually(lambda: _group_pending_of(redis_client, "strategy", 0), message="acked")

    # and it keeps consuming afterwards
    await bus.publish(tick(42, symbol="LATE"))
    await eventually(lambda: 42 in ok, message="an event after the dead letter")


async def _stream_len(client: aioredis.Redis, key: str, expected: int) -> bool:
    return int(await client.xlen(key)) == expected


async def _group_pending_of(client: aioredis.Redis, group: str, expected: int) -> bool:
    return int((await client.xpending(TICKS, group))["pending"]) == expected


async def test_bus_malformed_entries_dead_lettered_at_once_and_consumer_continues(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    seen: list[int] = []
    bus = make_bus(redis_url, "features")
    bus.subscribe(EventType.TICK, lambda e: seen.append(e.data["seq"]))
    await bus.start()
    buses.append(bus)
    await bus.publish(tick(1))
    await eventually(lambda: seen == [1], message="first event")

    bad_entries: list[dict[str, bytes | str]] = [
        {"event": b"{not json"},
        {"something": "else"},
        {"event": b'{"event_type":"TICK","data":{"symbol":"X","price":"NaN"}}'},
        {"event": b'{"event_type":"SIGNAL","data":{"symbol":"X","side":"BUY"}}'},
        {"event": b"\xff\xfe invalid utf-8"},
        {"event": b'{"event_type":"TICK","data":{"symbol":"X","price":-5}}'},
    ]
    for fields in bad_entries:
        await redis_client.xadd(TICKS, fields)  # type: ignore[arg-type]
    await bus.publish(tick(2))

    await eventually(lambda: seen == [1, 2], message="the event after the bad ones")
    await eventually(
        lambda: _stream_len(redis_client, DLQ_STREAM, len(bad_entries)), message="dead letters"
    )
    async with RedisEventStream(redis_url) as stream:
        letters = await stream.dead_letters()
    assert all(letter.error.startswith("malformed:") for letter in letters)
    assert all(letter.deliveries == 1 for letter in letters)
    reasons = " | ".join(letter.error for letter in letters)
    assert "not valid JSON" in reasons
    assert "no 'event' field" in reasons
    assert "finite number" in reasons
    assert "SIGNAL event written to the TICK stream" in reasons
    assert "greater than 0" in reasons


async def test_bus_outbox_survives_redis_restart_in_order_and_bounded(
    redis_factory: Callable[..., RedisServer], buses: list[EventBus]
) -> None:
    server = redis_factory(appendonly=True)
    received: list[int] = []
    consumer = make_bus(server.url, "portfolio", reconnect_max_s=0.2)
    consumer.subscribe(EventType.TICK, lambda e: received.append(e.data["seq"]))
    await consumer.start()
    buses.append(consumer)
    publisher = make_bus(server.url, "market-data", max_queue_size=300, reconnect_max_s=0.2)
    await publisher.start()
    buses.append(publisher)

    for i in range(100):
        await publisher.publish(tick(i))
    await eventually(lambda: len(received) == 100, message="before the outage")

    server.stop()
    for i in range(100, 300):  # 200 events while Redis is down: they wait in the outbox
        await publisher.publish(tick(i))
    await eventually(
        lambda: publisher.health().state is BusState.DEGRADED, message="degraded health"
    )
    assert publisher.health().outbox_size == 200
    assert "Redis unreachable" in (publisher.health().error_message or "")

    # Redis is still down: the bound holds and says so clearly.
    for i in range(300, 400):
        await publisher.publish(tick(i))
    with pytest.raises(QueueFullError, match="Queue is full"):
        await publisher.publish(tick(400))
    assert publisher.health().state is BusState.UNHEALTHY

    server.start()
    await publisher.flush(30)
    await eventually(lambda: len(received) == 400, timeout=30, message="after the restart")
    assert received == list(range(400))
    assert publisher.health().state is BusState.HEALTHY


async def test_bus_outbox_resends_what_redis_answers_loading_after_a_restart(
    redis_factory: Callable[..., RedisServer],
) -> None:
    # A Redis that restarts with data reads it before serving: meanwhile it accepts
    # connections and answers LOADING. That is not a refusal: nothing may be dropped.
    server = redis_factory()
    data = server.sync_client()
    data.mset({f"filler:{i}": "x" for i in range(20_000)})
    publisher = make_bus(server.url, "market-data", reconnect_max_s=0.1)
    await publisher.start()
    try:
        await publisher.publish(tick(0))
        await publisher.flush(10)
        data.save()  # tick 0 and the filler, read back at the restart
        data.close()
        server.stop()
        # 20,000 keys x 200 us: Redis answers LOADING for about 4 s after it starts.
        server.extra_args = (
            "--key-load-delay", "200", "--loading-process-events-interval-bytes", "1024",
        )  # fmt: skip
        starting = asyncio.create_task(asyncio.to_thread(server.start, 60.0))
        probe = RespConnection(server.url)
        loading_seen = 0
        for i in range(1, 200):
            await publisher.publish(tick(i))
            await asyncio.sleep(0.02)
            try:
                await probe.command("PING")
            except BusyLoadingError:
                loading_seen += 1
            except RedisConnectionError:
                pass  # not listening yet
        await probe.aclose()
        await starting
        await publisher.flush(30)
    finally:
        await publisher.stop()
    client = server.sync_client()
    raw: Any = client.xrange(TICKS)
    client.close()
    seqs = [orjson.loads(fields[b"event"])["data"]["seq"] for _id, fields in raw]
    assert sorted(set(seqs)) == list(range(200)), "ticks lost while Redis was loading"
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == list(range(200)), "ticks out of order"
    assert loading_seen, "Redis never answered LOADING"


async def test_bus_redis_restart_without_persistence_recreates_group(
    redis_factory: Callable[..., RedisServer], buses: list[EventBus]
) -> None:
    server = redis_factory(appendonly=False)
    received: list[int] = []
    consumer = make_bus(server.url, "risk", reconnect_max_s=0.2)
    consumer.subscribe(EventType.TICK, lambda e: received.append(e.data["seq"]))
    await consumer.start()
    buses.append(consumer)
    publisher = make_bus(server.url, "market-data", reconnect_max_s=0.2)
    await publisher.start()
    buses.append(publisher)
    await publisher.publish(tick(0))
    await eventually(lambda: received == [0], message="first event")

    server.stop()
    server.start()  # empty: streams and groups are gone (NOGROUP)
    for i in range(1, 20):
        await publisher.publish(tick(i))
    await publisher.flush(30)
    await eventually(lambda: received == list(range(20)), timeout=30, message="after NOGROUP")


async def test_bus_conflated_marks_go_on_after_redis_lost_its_data_and_ids_start_lower(
    redis_factory: Callable[..., RedisServer], buses: list[EventBus]
) -> None:
    server = redis_factory(appendonly=False)
    marks: list[int] = []
    risk = make_bus(server.url, "risk", reconnect_max_s=0.2, conflate_interval_s=0.05)
    risk.subscribe(EventType.TICK, lambda e: marks.append(e.data["seq"]), conflate=True)
    await risk.start()
    buses.append(risk)
    client = server.sync_client()
    client.xadd(TICKS, {"event": tick(1).to_json()})
    await eventually(lambda: marks == [1], message="first mark")
    client.close()

    server.stop()
    server.start()  # empty: streams and groups are gone (NOGROUP)
    # The new stream's ids start below the old ones (as from a Redis whose clock is behind).
    client = server.sync_client()
    client.xadd(TICKS, {"event": tick(2).to_json()}, id="1-1")
    client.close()
    await eventually(lambda: marks == [1, 2], timeout=30, message="the mark after the loss")


async def test_bus_retention_trims_high_frequency_streams_keeps_order_streams(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    bus = make_bus(redis_url, "market-data", stream_maxlen=200)
    await bus.start()
    buses.append(bus)
    for i in range(3000):
        await bus.publish(tick(i))
        await bus.publish(
            Event(
                event_type=EventType.ORDER_FILLED,
                data={"order_id": f"o-{i}", "fill_price": "1", "filled_qty": "1"},
            )
        )
    await bus.flush(20)
    assert int(await redis_client.xlen(TICKS)) < 600  # MAXLEN ~ trims whole nodes of entries
    assert int(await redis_client.xlen(stream_key(EventType.ORDER_FILLED))) == 3000


async def test_bus_pending_entries_deleted_before_handling_are_acked_and_counted(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    publisher = await started(make_bus(redis_url, "market-data"), buses)
    for i in range(5):
        await publisher.publish(tick(i))
    await publisher.flush(10)
    # A consumer that read them and died: they are pending, then trimmed away.
    await redis_client.xgroup_create(TICKS, "auditor", id="0")
    entries: Any = await redis_client.xreadgroup("auditor", "dead-consumer", {TICKS: ">"}, count=5)
    ids = [entry_id for entry_id, _ in entries[0][1]]
    await redis_client.xdel(TICKS, *ids[:3])

    seen: list[int] = []
    bus = make_bus(redis_url, "auditor", "survivor", claim_idle_ms=50, claim_interval_ms=50)
    bus.subscribe(EventType.TICK, lambda e: seen.append(e.data["seq"]))
    await bus.start()
    buses.append(bus)
    await eventually(lambda: sorted(seen) == [3, 4], message="the surviving entries")
    await eventually(lambda: _group_pending_in(redis_client, "auditor", 0), message="all acked")
    transport = bus.transport
    assert isinstance(transport, RedisStreamsTransport)
    assert transport.deleted_pending_count == 3


async def _group_pending_in(client: aioredis.Redis, group: str, expected: int) -> bool:
    return int((await client.xpending(TICKS, group))["pending"]) == expected


async def test_bus_permanent_error_dead_lettered_at_first_failure(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    attempts: list[int] = []

    async def on_tick(event: Event) -> None:
        attempts.append(event.data["seq"])
        raise PermanentError("feature list does not match the model card")

    bus = make_bus(redis_url, "ml-service", max_deliveries=5)
    bus.subscribe(EventType.TICK, on_tick, name="on_tick")
    await bus.start()
    buses.append(bus)
    await bus.publish(tick(1))
    await eventually(lambda: _stream_len(redis_client, DLQ_STREAM, 1), message="a dead letter")
    async with RedisEventStream(redis_url) as stream:
        [letter] = await stream.dead_letters()
    assert letter.deliveries == 1
    assert "PermanentError: feature list does not match" in letter.error
    assert attempts == [1]


async def test_bus_reports_group_lag_and_pending_as_metrics(
    redis_url: str, buses: list[EventBus]
) -> None:
    gate = asyncio.Event()

    async def slow(event: Event) -> None:
        await gate.wait()

    consumer = make_bus(redis_url, "portfolio", batch_size=2, worker_count=1)
    consumer.subscribe(EventType.TICK, slow)
    await consumer.start()
    buses.append(consumer)
    publisher = await started(make_bus(redis_url, "market-data"), buses)
    for i in range(300):
        await publisher.publish(tick(i))
    await publisher.flush(10)
    metrics = consumer.metrics
    assert metrics is not None

    def gauge(name: str) -> float:
        for line in metrics.render().decode().splitlines():
            if line.startswith(f'{name}{{stream="{TICKS}"}}'):
                return float(line.rsplit(" ", 1)[1])
        return -1.0

    await eventually(lambda: gauge("hean_eventbus_pending") > 0, message="pending reported")
    await eventually(lambda: gauge("hean_eventbus_group_lag") > 0, message="lag reported")
    gate.set()
    await eventually(lambda: gauge("hean_eventbus_group_lag") == 0, timeout=20, message="lag 0")
    await eventually(lambda: gauge("hean_eventbus_pending") == 0, timeout=20, message="drained")


async def _strand(
    redis_url: str, client: aioredis.Redis, buses: list[EventBus], consumer: str, n: int
) -> None:
    """Ticks 0..n-1 read by `consumer` of group "auditor", which dies before acking them;
    then ticks n..2n-1 arrive while nobody runs."""
    publisher = await started(make_bus(redis_url, "market-data"), buses)
    for i in range(n):
        await publisher.publish(tick(i))
    await publisher.flush(10)
    await client.xgroup_create(TICKS, "auditor", id="0")
    await client.xreadgroup("auditor", consumer, {TICKS: ">"}, count=n)
    for i in range(n, 2 * n):
        await publisher.publish(tick(i))
    await publisher.flush(10)


async def _recording(
    redis_url: str, buses: list[EventBus], consumer: str, **overrides: object
) -> list[int]:
    """A started consumer `consumer` of group "auditor": the ticks' seq, as handled."""
    seen: list[int] = []
    bus = make_bus(redis_url, "auditor", consumer, **overrides)
    bus.subscribe(EventType.TICK, lambda e: seen.append(e.data["seq"]))
    await started(bus, buses)
    return seen


async def test_bus_exclusive_consumer_at_start_handles_predecessor_pending_before_new(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    await _strand(redis_url, redis_client, buses, "auditor:old-pid", 5)

    seen = await _recording(
        redis_url, buses, "auditor:new-pid", exclusive=True, claim_idle_ms=600_000
    )
    await eventually(lambda: len(seen) == 10, message="every tick")
    assert seen == list(range(10)), "the predecessor's entries were not handled first"


@pytest.mark.parametrize("exclusive", [True, False])
async def test_bus_subscription_made_after_start_handles_predecessor_pending_before_new(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus], exclusive: bool
) -> None:
    """A component that subscribes once the bus runs (the orchestrator starts it again
    when Redis refused its first start): its stream's pending entries, left by the
    process before, are handled before its new ones, as at start, not after
    `claim_idle_ms`."""
    await _strand(redis_url, redis_client, buses, "auditor:replica-1", 5)
    bus = make_bus(
        redis_url, "auditor", "auditor:replica-1", exclusive=exclusive, claim_idle_ms=600_000
    )
    bus.subscribe(EventType.SIGNAL, lambda e: None)  # the component that started at once
    await started(bus, buses)
    await asyncio.sleep(0.3)  # reading SIGNAL: its start is over
    seen: list[int] = []
    bus.subscribe(EventType.TICK, lambda e: seen.append(e.data["seq"]))
    await eventually(lambda: len(seen) == 10, message="every tick")
    assert seen == list(range(10)), "the predecessor's entries were not handled first"
    await eventually(lambda: _group_pending_in(redis_client, "auditor", 0), message="acked")


@pytest.mark.parametrize(
    "successor",
    [
        "auditor:replica-1",  # restarted under the same name: its own pending first
        # killed and replaced under a new name: no connection carries the old one, so its
        # entries are taken at once and in order, not after claim_idle_ms
        "auditor:replacement",
    ],
)
async def test_bus_replica_at_start_handles_its_predecessors_pending_before_new(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus], successor: str
) -> None:
    await _strand(redis_url, redis_client, buses, "auditor:replica-1", 5)

    seen = await _recording(redis_url, buses, successor, claim_idle_ms=600_000)
    await eventually(lambda: len(seen) == 10, message="every tick")
    assert seen == list(range(10)), "the predecessor's entries were not handled first"
    await eventually(lambda: _group_pending_in(redis_client, "auditor", 0), message="acked")
    transport = buses[-1].transport
    assert isinstance(transport, RedisStreamsTransport)
    assert transport.reclaimed_count == 5


async def test_bus_replica_leaves_a_connected_peers_pending_and_takes_them_once_it_is_gone(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    busy = aioredis.Redis.from_url(redis_url, client_name=consumer_client_name("auditor:busy"))
    try:
        await _strand(redis_url, busy, buses, "auditor:busy", 4)
        seen = await _recording(redis_url, buses, "auditor:peer", claim_idle_ms=600_000)
        await eventually(lambda: len(seen) == 4, message="the new ticks")
        await asyncio.sleep(1.0)  # five claim rounds of 200 ms
        assert seen == [4, 5, 6, 7], "a connected consumer's entries were taken"
        info = await redis_client.xpending(TICKS, "auditor")
        assert {c["name"].decode(): c["pending"] for c in info["consumers"]} == {"auditor:busy": 4}
    finally:
        await busy.aclose()  # the busy consumer's process is gone
    await eventually(lambda: len(seen) == 8, message="the gone peer's ticks")
    assert seen == [4, 5, 6, 7, 0, 1, 2, 3]
    await eventually(lambda: _group_pending_in(redis_client, "auditor", 0), message="acked")


async def test_bus_takes_a_connected_but_stuck_consumers_entries_once_idle(
    redis_url: str, buses: list[EventBus]
) -> None:
    stuck = aioredis.Redis.from_url(redis_url, client_name=consumer_client_name("auditor:stuck"))
    try:
        await _strand(redis_url, stuck, buses, "auditor:stuck", 3)
        seen = await _recording(redis_url, buses, "auditor:peer", claim_idle_ms=500)
        await eventually(lambda: sorted(seen) == list(range(6)), message="every tick")
    finally:
        await stuck.aclose()


async def test_bus_oversized_events_refused_at_publish_and_dead_lettered_truncated(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    from hean.core.event_streams import MAX_DEAD_PAYLOAD_BYTES, MAX_EVENT_BYTES
    from hean.core.types import InvalidEventError

    seen: list[int] = []
    bus = make_bus(redis_url, "features")
    bus.subscribe(EventType.TICK, lambda e: seen.append(e.data["seq"]))
    await bus.start()
    buses.append(bus)
    huge = Event(
        event_type=EventType.TICK,
        data={"symbol": "BTC/USDT", "price": 1, "blob": "x" * MAX_EVENT_BYTES},
    )
    with pytest.raises(InvalidEventError, match="limit"):
        await bus.publish(huge)
    await redis_client.xadd(TICKS, {"event": huge.to_json()})
    await bus.publish(tick(1))
    await eventually(lambda: seen == [1], message="the tick after the huge entry")
    await eventually(lambda: _stream_len(redis_client, DLQ_STREAM, 1), message="dead letter")
    async with RedisEventStream(redis_url) as stream:
        [letter] = await stream.dead_letters()
    assert "limit" in letter.error
    assert len(letter.payload) == MAX_DEAD_PAYLOAD_BYTES


async def test_bus_kept_streams_write_an_event_id_once_even_if_sent_again(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    # A flush cut by a dropped connection is sent again: for the streams kept for audit
    # (orders, fills, P&L) an event id already written is not written a second time.
    bus = make_bus(redis_url, "execution")
    await bus.start()
    buses.append(bus)
    fill = Event(
        event_type=EventType.ORDER_FILLED,
        data={"order_id": "o-1", "fill_price": "100", "filled_qty": "1", "fill_id": "f-1"},
    )
    stamped = await bus.publish(fill)
    await bus.publish(stamped)
    await bus.flush(10)
    assert int(await redis_client.xlen(stream_key(EventType.ORDER_FILLED))) == 1
    transport = bus.transport
    assert isinstance(transport, RedisStreamsTransport)
    assert transport.duplicates_suppressed == 1
    # High-frequency streams are trimmed, not audited: no marker, no extra work.
    again = await bus.publish(tick(1))
    await bus.publish(again)
    await bus.flush(10)
    assert int(await redis_client.xlen(TICKS)) == 2


async def test_bus_started_while_redis_down_creates_topology_before_first_event(
    redis_factory: Callable[..., RedisServer], buses: list[EventBus]
) -> None:
    server = redis_factory()
    server.stop()
    publisher = make_bus(server.url, "market-data", reconnect_max_s=0.2)
    await publisher.start()  # Redis down: degraded, no groups yet
    buses.append(publisher)
    candle = Event(
        event_type=EventType.CANDLE,
        data={"symbol": "BTC/USDT", "open": 1, "high": 2, "low": 1, "close": 2, "volume": 1},
    )
    await publisher.publish(candle)
    server.start()
    await publisher.flush(30)
    client = server.sync_client()
    groups = {g["name"].decode(): g for g in client.xinfo_groups(stream_key(EventType.CANDLE))}
    client.close()
    # The features group existed before the candle was written: it will be delivered.
    assert groups["features"]["lag"] == 1


async def test_bus_conflated_subscription_handles_newest_per_symbol_and_acks_the_rest(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    marks: list[tuple[str, int]] = []
    every: list[int] = []
    risk = make_bus(redis_url, "risk", conflate_interval_s=0.3)

    def mark(event: Event) -> None:
        marks.append((event.data["symbol"], event.data["seq"]))

    risk.subscribe(EventType.TICK, mark, conflate=True)
    risk.subscribe(EventType.SIGNAL, lambda e: every.append(int(e.data["size"])))
    execution = make_bus(redis_url, "execution")  # needs every tick: not conflated
    exec_seen: list[int] = []
    execution.subscribe(EventType.TICK, lambda e: exec_seen.append(e.data["seq"]))
    for bus in (risk, execution):
        await bus.start()
        buses.append(bus)
    publisher = await started(make_bus(redis_url, "market-data"), buses)

    # One burst lands between two conflated reads: only each symbol's last tick is handled.
    await asyncio.sleep(0.35)
    for i in range(200):
        await publisher.publish(tick(i, "BTC/USDT" if i % 2 else "ETH/USDT"))
    await publisher.flush()
    # Signals are read as they come, not every 0.3 s, and none is dropped.
    for size in range(1, 21):
        await publisher.publish(
            Event(
                event_type=EventType.SIGNAL,
                data={"symbol": "BTC/USDT", "side": "buy", "size": size, "signal_strength": 0.5},
            )
        )
    await publisher.flush()

    await eventually(lambda: len(exec_seen) == 200 and len(every) == 20, timeout=10)
    await eventually(lambda: {s for s, _ in marks} == {"BTC/USDT", "ETH/USDT"}, timeout=10)
    newest = {s: max(q for t, q in marks if t == s) for s, _ in marks}
    assert newest == {"BTC/USDT": 199, "ETH/USDT": 198}
    assert len(marks) < 20  # a few reads at most, not 200 handler calls
    assert sorted(exec_seen) == list(range(200))
    assert every == list(range(1, 21))

    async def risk_settled() -> bool:
        groups = {g["name"]: g for g in await redis_client.xinfo_groups(TICKS)}
        return bool(groups[b"risk"]["pending"] == 0 and groups[b"risk"]["lag"] == 0)

    await eventually(risk_settled, timeout=10)
    transport = risk.transport
    assert isinstance(transport, RedisStreamsTransport)
    assert transport.conflated_count == 200 - len(marks)
    assert risk.metrics is not None
    conflated = risk.metrics.events_handled.labels("TICK", "conflated")._value.get()
    assert conflated == 200 - len(marks)


async def test_bus_conflated_subscription_still_dead_letters_unreadable_entries(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    marks: list[int] = []
    risk = make_bus(redis_url, "risk", conflate_interval_s=0.05)
    risk.subscribe(EventType.TICK, lambda e: marks.append(e.data["seq"]), conflate=True)
    await risk.start()
    buses.append(risk)
    # Read together: an unreadable entry, and an invalid tick of BTC/USDT superseded by a
    # valid one of the same symbol. Superseded or not, the invalid ones are dead-lettered.
    negative = orjson.loads(tick(6).to_json())
    negative["data"]["price"] = "-5"
    await redis_client.xadd(TICKS, {"event": b"{not json"})
    await redis_client.xadd(TICKS, {"event": orjson.dumps(negative)})
    await redis_client.xadd(TICKS, {"event": tick(7).to_json()})
    await eventually(lambda: marks == [7], timeout=10)

    async def dead_lettered() -> bool:
        return await redis_client.xlen(DLQ_STREAM) == 2

    await eventually(dead_lettered, timeout=10)
    entries: Any = await redis_client.xrange(DLQ_STREAM)
    errors = sorted(fields[b"error"].decode() for _, fields in entries)
    assert "not valid JSON" in errors[0] and "price" in errors[1], errors


async def test_bus_conflated_marks_are_handled_before_a_later_plain_event_of_that_key(
    redis_url: str, buses: list[EventBus]
) -> None:
    """A conflated tick added before a plain event of the same symbol is handled first, even
    though conflated reads come only every few seconds here."""
    mark: dict[str, int] = {}
    seen_at_signal: list[tuple[int, int | None]] = []
    risk = make_bus(redis_url, "risk", conflate_interval_s=5.0)

    def on_tick(event: Event) -> None:
        mark[event.data["symbol"]] = event.data["seq"]

    risk.subscribe(EventType.TICK, on_tick, conflate=True)
    risk.subscribe(
        EventType.SIGNAL,
        lambda e: seen_at_signal.append((int(e.data["size"]), mark.get("BTC/USDT"))),
    )
    await risk.start()
    buses.append(risk)
    publisher = await started(make_bus(redis_url, "market-data"), buses)

    for round_ in range(1, 11):
        for i in range(5):  # the last of these is the mark the signal was priced against
            await publisher.publish(tick(round_ * 10 + i, "BTC/USDT"))
        await publisher.publish(
            Event(
                event_type=EventType.SIGNAL,
                data={"symbol": "BTC/USDT", "side": "buy", "size": round_, "signal_strength": 0.5},
            )
        )
        await publisher.flush()
        await eventually(lambda: len(seen_at_signal) == round_, timeout=10)  # noqa: B023

    assert seen_at_signal == [(r, r * 10 + 4) for r in range(1, 11)]


async def test_bus_conflated_entry_older_than_one_handed_out_is_acked_unhandled(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    """The conflated loop's read and the one sent behind a plain read can answer out of
    order: per key, an entry older than one already handed out is acked, not handled (a
    mark never goes backwards)."""
    marks: list[int] = []
    risk = make_bus(redis_url, "risk", conflate_interval_s=60.0)
    risk.subscribe(EventType.TICK, lambda e: marks.append(e.data["seq"]), conflate=True)
    await risk.start()
    buses.append(risk)
    key = stream_key(EventType.TICK)
    # Two ticks, taken by two reads at once (one MULTI: the bus cannot read in between).
    async with redis_client.pipeline(transaction=True) as pipe:
        for seq in (1, 2):
            pipe.xadd(key, {EVENT_FIELD: tick(seq).to_json()})
        for _ in range(2):
            pipe.xreadgroup("risk", "elsewhere", {key: ">"}, count=1)
        *_, older, newer = await pipe.execute()
    transport = risk.transport
    assert isinstance(transport, RedisStreamsTransport)
    await transport._accept_conflated(key, newer[0][1])  # the newer reply handled first
    await transport._accept_conflated(key, older[0][1])
    await transport._check_superseded()  # what the reading loops do after a read
    await risk.flush(5)
    assert marks == [2]
    assert transport.conflated_count == 1
    assert (await redis_client.xpending(key, "risk"))["pending"] == 0


async def test_bus_publish_then_commands_ride_the_events_pipeline_and_gate_the_ack(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    """`publish(event, then=[...])`: the commands run right after the event's XADD, and a
    refused one keeps the handler's input unacked, as a refused event would."""
    features = make_bus(redis_url, "features")

    refused: list[str] = []

    async def on_candle(event: Event) -> None:
        seq = event.data["seq"]
        # The second one's HSET targets a stream (written by the first): Redis refuses it.
        key = "hean:test:state" if seq == 1 else stream_key(EventType.SIGNAL)
        try:
            await features.publish(
                Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"}),
                then=[("HSET", key, "BTC/USDT", f"after-{seq}")],
            )
        except Exception as exc:  # the publish itself says so, and the input stays unacked
            refused.append(str(exc))

    features.subscribe(EventType.TICK, on_candle)
    await features.start()
    buses.append(features)
    publisher = await started(make_bus(redis_url, "market-data"), buses)
    await publisher.publish(tick(1))
    await publisher.flush()

    async def state_written() -> bool:
        return await redis_client.hget("hean:test:state", "BTC/USDT") == b"after-1"

    await eventually(state_written, timeout=10)
    await publisher.publish(tick(2))
    await publisher.flush()

    async def second_signal_out() -> bool:
        return await redis_client.xlen(stream_key(EventType.SIGNAL)) >= 2

    await eventually(second_signal_out, timeout=10)
    await asyncio.sleep(0.3)
    pending: Any = await redis_client.xpending(TICKS, "features")
    assert pending["pending"] == 1  # tick 2: its output's HSET was refused, so not acked
    assert refused and "WRONGTYPE" in refused[0]

    with pytest.raises(ValueError, match="in-memory"):
        await EventBus().publish(tick(3), then=[("HSET", "k", "f", "v")])


async def test_bus_write_on_ack_goes_with_the_ack_and_a_failed_handlers_write_is_dropped(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    strategy = make_bus(redis_url, "strategy", retry_delay_ms=20)
    attempts: list[int] = []

    async def on_tick(event: Event) -> None:
        seq = event.data["seq"]
        attempts.append(seq)
        # RPUSH is not idempotent: the list shows every write that reached Redis.
        strategy.write_on_ack("RPUSH", "hean:test:writes", f"{seq}-attempt-{len(attempts)}")
        await strategy.publish(
            Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"})
        )
        if seq == 2 and attempts.count(2) == 1:
            raise RuntimeError("first attempt at tick 2 fails after its write")

    strategy.subscribe(EventType.TICK, on_tick)
    await strategy.start()
    buses.append(strategy)
    publisher = await started(make_bus(redis_url, "market-data"), buses)
    for seq in (1, 2):
        await publisher.publish(tick(seq))
    await publisher.flush()

    async def settled() -> bool:
        groups = {g["name"]: g for g in await redis_client.xinfo_groups(TICKS)}
        return bool(groups[b"strategy"]["pending"] == 0 and groups[b"strategy"]["lag"] == 0)

    await eventually(settled, timeout=10)
    raw: Any = await redis_client.lrange("hean:test:writes", 0, -1)
    writes = [w.decode() for w in raw]
    assert attempts == [1, 2, 2]
    assert writes == ["1-attempt-1", "2-attempt-3"]  # the failed attempt's write never went

    with pytest.raises(RuntimeError, match="for handlers"):
        strategy.write_on_ack("SET", "k", "v")
    with pytest.raises(ValueError, match="no Redis"):
        EventBus().write_on_ack("SET", "k", "v")


async def test_bus_a_command_it_cannot_send_is_refused_to_the_caller(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    """A bad argument in `then` or `write_on_ack` is the caller's error when it is queued,
    not the outbox's or the ack pipeline's later (which would stop them for everyone)."""
    bus = make_bus(redis_url, "strategy")
    await bus.start()
    buses.append(bus)
    with pytest.raises(DataError, match="NoneType"):
        await bus.publish(tick(1), then=[("HSET", "hean:test:h", "f", None)])
    refused: list[BaseException] = []

    def handler(event: Event) -> None:
        try:
            bus.write_on_ack("SET", "hean:test:k", None)
        except DataError as exc:
            refused.append(exc)

    bus.subscribe(EventType.TICK, handler)
    await bus.publish(tick(2))
    await eventually(lambda: len(refused) == 1, timeout=10)
    await bus.flush(5)
    entries: Any = await redis_client.xrange(TICKS)
    assert [orjson.loads(f[EVENT_FIELD])["data"]["seq"] for _, f in entries] == [2]


async def test_bus_held_event_is_acked_once_resumed_with_its_own_outputs_and_writes(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    consumer = make_bus(redis_url, "strategy", retry_delay_ms=20)
    held: list[HeldEvent] = []
    failed_once: list[int] = []

    def on_tick(event: Event) -> None:
        seq = event.data["seq"]
        if seq in (0, 2):
            held.append(consumer.hold())  # decided later, by tick 1 / left to fail
            if seq == 2 and not failed_once:
                failed_once.append(seq)
                raise RuntimeError("fails after holding: the hold is void, the tick retried")
            return
        with held.pop(0).resume():  # tick 0, decided in tick 1's handler
            consumer.publish_nowait(
                Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"})
            )
            consumer.write_on_ack("RPUSH", "hean:test:writes", "for-0")
        consumer.write_on_ack("RPUSH", "hean:test:writes", "for-1")

    consumer.subscribe(EventType.TICK, on_tick)
    await started(consumer, buses)
    publisher = await started(make_bus(redis_url, "market-data"), buses)
    await publisher.publish(tick(0))
    await publisher.flush()
    await eventually(lambda: len(held) == 1, message="tick 0 held")
    await asyncio.sleep(0.3)
    info = await redis_client.xpending(TICKS, "strategy")
    assert int(info["pending"]) == 1, "a held tick was acked before it was resumed"

    await publisher.publish(tick(1))
    await publisher.flush()
    await eventually(lambda: _group_pending_in(redis_client, "strategy", 0), message="acked")
    raw: Any = await redis_client.lrange("hean:test:writes", 0, -1)
    assert sorted(w.decode() for w in raw) == ["for-0", "for-1"]
    assert await redis_client.xlen(stream_key(EventType.SIGNAL)) == 1

    # A handler that raises after hold(): retried as any failure, its first hold void.
    await publisher.publish(tick(2))
    await publisher.flush()
    await eventually(lambda: len(held) == 2, message="tick 2 held on its retry")
    with pytest.raises(RuntimeError, match="already resumed or abandoned"), held[0].resume():
        pass
    held[1].abandon()  # stopping: left unacked, delivered again
    await asyncio.sleep(0.3)
    info = await redis_client.xpending(TICKS, "strategy")
    assert int(info["pending"]) == 1


async def test_bus_worker_takes_next_event_while_an_ack_waits_and_acks_in_any_order(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    """`ack_after(future)`: the event stays pending until the future is done (and is never
    acked if it fails), while the same key's next events are handled meanwhile."""
    features = make_bus(redis_url, "features", claim_idle_ms=60_000)
    loop = asyncio.get_running_loop()
    gates: dict[int, asyncio.Future[None]] = {}
    handled: list[int] = []

    async def on_tick(event: Event) -> None:
        seq = event.data["seq"]
        handled.append(seq)
        gates[seq] = loop.create_future()
        features.ack_after(gates[seq])
        # Output published without waiting, in order with the gated ones.
        features.publish_nowait(
            Event(
                event_type=EventType.SIGNAL,
                data={"symbol": "BTC/USDT", "side": "BUY", "seq": seq},
            )
        )

    features.subscribe(EventType.TICK, on_tick)
    await features.start()
    buses.append(features)
    publisher = await started(make_bus(redis_url, "market-data"), buses)
    for seq in (1, 2, 3):
        await publisher.publish(tick(seq))  # one key: one worker lane, handled in order
    await publisher.flush()

    async def all_handled() -> bool:
        return handled == [1, 2, 3]

    await eventually(all_handled, timeout=10)  # no gate is open: the lane did not wait

    async def pending_ids() -> list[int]:
        rows: Any = await redis_client.xpending_range(TICKS, "features", "-", "+", 10)
        by_id = {r["message_id"]: r for r in rows}
        entries: Any = await redis_client.xrange(TICKS)
        return [
            orjson.loads(fields[b"event"])["data"]["seq"]
            for entry_id, fields in entries
            if entry_id in by_id
        ]

    assert await pending_ids() == [1, 2, 3]
    gates[2].set_result(None)

    async def two_acked() -> bool:
        return await pending_ids() == [1, 3]

    await eventually(two_acked, timeout=10)
    gates[1].set_exception(RuntimeError("refused"))
    # Released a few callbacks later, as features' batches are (the write's callback
    # resolves the batch's future): flush still waits for the ack that follows.
    hops: list[asyncio.Future[None]] = [loop.create_future() for _ in range(3)]

    def release(later: asyncio.Future[None]) -> Callable[[asyncio.Future[None]], None]:
        return lambda _: later.set_result(None)

    for earlier, later in zip(hops, [*hops[1:], gates[3]], strict=True):
        earlier.add_done_callback(release(later))
    hops[0].set_result(None)
    await features.flush(5)  # returns once the acks the gates released are sent
    assert await pending_ids() == [1]  # its future failed: left for redelivery
    await asyncio.sleep(0.3)
    assert await pending_ids() == [1]
    signals: Any = await redis_client.xrange(stream_key(EventType.SIGNAL))
    assert [orjson.loads(f[b"event"])["data"]["seq"] for _, f in signals] == [1, 2, 3]

    with pytest.raises(RuntimeError, match="for handlers"):
        features.ack_after(loop.create_future())
    with pytest.raises(RuntimeError, match="not running"):
        EventBus().publish_nowait(tick(4))


async def test_bus_reconnects_do_not_count_again_an_entry_it_is_still_handling(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    """After a lost connection the bus takes back the pending entries it has not seen (the
    test below). One it is still handling is neither handed out again nor counted as
    delivered again: reading its pending list back with XREADGROUP from id 0 added a
    delivery per reconnect, and a successor after a restart would have dead-lettered the
    entry early."""
    bus = make_bus(redis_url, "features", claim_idle_ms=600_000)
    workers = bus.transport.config.worker_count  # type: ignore[attr-defined]
    other = next(
        s for s in ("ETH/USDT", "SOL/USDT", "XRP/USDT", "ADA/USDT", "DOGE/USDT")
        if worker_lane(s, workers) != worker_lane("BTC/USDT", workers)
    )  # fmt: skip
    release = asyncio.Event()
    seen: list[int] = []

    async def handler(event: Event) -> None:
        seen.append(event.data["seq"])
        if event.data["seq"] == 1:
            await release.wait()  # still being handled across the reconnects

    bus.subscribe(EventType.TICK, handler)
    await bus.start()
    buses.append(bus)
    await redis_client.xadd(TICKS, {"event": tick(1).to_json()})
    await eventually(lambda: seen == [1], timeout=10)
    for seq in (2, 3, 4):
        await redis_client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        # The bus reads its own pending entries back before anything new: once it handles
        # this tick of another symbol, it has done so.
        await redis_client.xadd(TICKS, {"event": tick(seq, other).to_json()})

        def handled(seq: int = seq) -> bool:
            return seen[-1] == seq

        await eventually(handled, timeout=15)
    rows: Any = await redis_client.xpending_range(
        TICKS, "features", "-", "+", 10, consumername="features-1"
    )
    assert int(rows[0]["times_delivered"]) == 1  # tick 1, the oldest pending entry
    assert seen == [1, 2, 3, 4]  # tick 1 was not handed out again
    release.set()

    async def settled() -> bool:
        info: Any = await redis_client.xpending(TICKS, "features")
        return int(info["pending"]) == 0

    await eventually(settled, timeout=10)


async def test_bus_after_a_lost_connection_first_handles_what_redis_handed_it_unseen(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    """A read whose reply is lost with the connection leaves its entries pending for this
    consumer, unseen. After reconnecting the bus takes them before newer entries, not only
    once idle (`claim_idle_ms`), when the newer ones would long be handled."""
    bus = make_bus(redis_url, "features", claim_idle_ms=600_000)
    seen: list[int] = []
    bus.subscribe(EventType.TICK, lambda event: seen.append(event.data["seq"]))
    await bus.start()
    buses.append(bus)
    publisher = await started(make_bus(redis_url, "market-data"), buses)
    await publisher.publish(tick(1))
    await publisher.flush()

    async def first() -> bool:
        return seen == [1]

    await eventually(first, timeout=10)
    # In one transaction, so the bus cannot get in between: its connections die, and
    # Redis hands tick 2 to its consumer, as it would a read whose reply never arrived.
    async with redis_client.pipeline(transaction=True) as pipe:
        pipe.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        pipe.xadd(TICKS, {"event": tick(2).to_json()})
        pipe.xreadgroup("features", "features-1", {TICKS: ">"}, count=10)
        await pipe.execute()
    await redis_client.xadd(TICKS, {"event": tick(3).to_json()})

    async def all_three() -> bool:
        return len(seen) >= 3

    await eventually(all_three, timeout=10)
    assert seen == [1, 2, 3]


async def test_bus_events_redis_refuses_for_now_are_kept_in_order_and_sent_again(
    redis_factory: Callable[..., RedisServer], buses: list[EventBus]
) -> None:
    """Redis out of memory under `noeviction` refuses writes for now: the events are not
    dropped (as a WRONGTYPE one is) but kept in order, `flush` waits for them, and the bus
    is degraded, saying why. Once Redis takes writes they go out, in order."""
    server = redis_factory()
    client = aioredis.Redis.from_url(server.url)
    publisher = await started(make_bus(server.url, "market-data"), buses)
    try:
        await publisher.publish(tick(1))
        await publisher.flush(5)
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", 1)
        for i in (2, 3, 4):
            await publisher.publish(tick(i))
        with pytest.raises(TimeoutError):
            await publisher.flush(1.0)  # refused, and kept
        health = publisher.health()
        assert health.state == BusState.DEGRADED
        assert "refuses writes for now, 3 events kept in order" in str(health.error_message)
        assert "maxmemory" in str(health.error_message)
        assert await client.xlen(TICKS) == 1
        await client.config_set("maxmemory", 0)
        await publisher.flush(10)
        assert publisher.health().state == BusState.HEALTHY
        async with RedisEventStream(server.url) as stream:
            seqs = [e.data["seq"] async for e in stream.replay_events(EventType.TICK)]
        assert seqs == [1, 2, 3, 4]
    finally:
        await client.config_set("maxmemory", 0)
        await client.aclose()


async def test_bus_handler_writes_redis_refuses_for_now_wait_and_the_input_stays_pending(
    redis_factory: Callable[..., RedisServer], buses: list[EventBus]
) -> None:
    """Redis refuses writes for now while handlers run: a handler's output and the write
    it sends with its ack (`write_on_ack`) wait; the input stays pending (not delivered
    again, not dead-lettered, however long it lasts) and is acked once they are in."""
    server = redis_factory()
    client = aioredis.Redis.from_url(server.url)
    strategy = make_bus(server.url, "strategy", claim_idle_ms=300, max_deliveries=2)
    gate = asyncio.Event()
    handled: list[int] = []

    async def on_tick(event: Event) -> None:
        seq = event.data["seq"]
        handled.append(seq)
        if seq == 2:
            await gate.wait()  # handled while Redis refuses writes
        else:  # tick 2 only writes its state, with its ack
            await strategy.publish(
                Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"})
            )
        strategy.write_on_ack("HSET", "hean:test:state", "last", seq)

    strategy.subscribe(EventType.TICK, on_tick)
    await started(strategy, buses)
    publisher = await started(make_bus(server.url, "market-data"), buses)

    async def state() -> Any:
        return await client.hget("hean:test:state", "last")

    async def pending() -> int:
        info: Any = await client.xpending(TICKS, "strategy")
        return int(info["pending"])

    try:
        for i in (1, 2, 3):
            await publisher.publish(tick(i))
        await publisher.flush(5)

        async def tick_1_done() -> bool:
            # Its state is written and, a pipeline later, its XACK sent: before the refusal.
            return handled == [1, 2] and await state() == b"1" and await pending() == 2

        await eventually(tick_1_done, timeout=10)
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", 1)
        gate.set()
        await asyncio.sleep(1.5)  # past claim_idle_ms and max_deliveries' retries
        assert handled == [1, 2, 3]  # nothing delivered again
        assert await client.xlen(stream_key(EventType.SIGNAL)) == 1
        assert await state() == b"1"
        assert await pending() == 2
        assert await client.xlen(DLQ_STREAM) == 0
        assert strategy.health().state == BusState.DEGRADED
        assert "refuses writes for now" in str(strategy.health().error_message)
        await client.config_set("maxmemory", 0)

        async def written() -> bool:
            return await state() == b"3" and await pending() == 0

        await eventually(written, timeout=10)
        assert await client.xlen(stream_key(EventType.SIGNAL)) == 2
        assert handled == [1, 2, 3]
        await eventually(lambda: strategy.health().state == BusState.HEALTHY, timeout=10)
    finally:
        await client.config_set("maxmemory", 0)
        await client.aclose()


async def _strategy_after_ticks(redis_url: str, buses: list[EventBus], count: int) -> EventBus:
    """Ticks 1..`count` of one symbol in Redis, and a "strategy" bus, not started yet."""
    publisher = await started(make_bus(redis_url, "market-data"), buses)
    for i in range(1, count + 1):
        await publisher.publish(tick(i))
    await publisher.flush(5)
    return make_bus(redis_url, "strategy")


async def test_bus_acks_ride_with_the_next_output_and_flush_sends_them_at_once(
    redis_url: str,
    redis_client: aioredis.Redis,
    buses: list[EventBus],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handled event's ack waits (up to ACK_LINGER_S, here made 60 s) for an outbox
    write to carry it, instead of a pipeline of its own; `flush` does not wait for that."""
    monkeypatch.setattr(bus_module, "ACK_LINGER_S", 60.0)
    strategy = await _strategy_after_ticks(redis_url, buses, 1)
    handled: list[int] = []

    async def on_tick(event: Event) -> None:
        handled.append(event.data["seq"])
        if event.data["seq"] == 2:
            await strategy.publish(
                Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"})
            )

    strategy.subscribe(EventType.TICK, on_tick)
    await started(strategy, buses)
    await eventually(lambda: handled == [1], message="tick 1 handled")
    await asyncio.sleep(0.3)
    assert await _group_pending_in(redis_client, "strategy", 1), "tick 1's ack did not wait"
    publisher = await started(make_bus(redis_url, "market-data", "market-data-2"), buses)
    await publisher.publish(tick(2))
    await publisher.flush(5)
    entries: Any = await redis_client.xrange(TICKS)
    tick_2 = entries[1][0]

    async def only_tick_2_pending() -> bool:
        pending: Any = await redis_client.xpending_range(TICKS, "strategy", "-", "+", 10)
        return handled == [1, 2] and [p["message_id"] for p in pending] == [tick_2]

    # Tick 2's SIGNAL carries tick 1's ack; tick 2's own then waits for the next output.
    await eventually(only_tick_2_pending, message="tick 1 acked with tick 2's output")
    assert await redis_client.xlen(stream_key(EventType.SIGNAL)) == 1
    await strategy.flush(5)  # no 60 s wait
    assert await _group_pending_in(redis_client, "strategy", 0)


async def test_bus_writes_on_ack_of_one_key_land_in_the_order_they_were_made(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    """Tick 1's handler publishes (its ack waits for the write) and saves its state with
    its ack; tick 2's publishes nothing and saves its state, so it is acked first. Its
    state write must still land after tick 1's, or Redis would keep the older state of a
    symbol whose newer input is acked (a restart would resume from it)."""
    strategy = await _strategy_after_ticks(redis_url, buses, 2)
    handled: list[int] = []

    async def on_tick(event: Event) -> None:
        seq = event.data["seq"]
        handled.append(seq)
        if seq == 1:
            # Redis holds writes for 0.3 s: tick 1's output waits for its reply while
            # tick 2 (read with it) is handled and settles.
            await redis_client.execute_command("CLIENT", "PAUSE", 300, "WRITE")
            await strategy.publish(
                Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"})
            )
        strategy.write_on_ack("HSET", "hean:test:state", "BTC/USDT", seq)

    strategy.subscribe(EventType.TICK, on_tick)
    await started(strategy, buses)

    async def both_acked() -> bool:
        pending: Any = await redis_client.xpending(TICKS, "strategy")
        return handled == [1, 2] and pending["pending"] == 0

    await eventually(both_acked, timeout=10)
    await strategy.flush(5)
    assert await redis_client.hget("hean:test:state", "BTC/USDT") == b"2"


async def test_bus_malformed_write_on_ack_dead_letters_its_event_alone(
    redis_url: str, redis_client: aioredis.Redis, buses: list[EventBus]
) -> None:
    """Tick 3's handler saves its state with a malformed command (HSET without a value).
    Redis refuses it as it is queued, which discards the whole MULTI/EXEC it rides in: the
    other ticks' writes, acks and outputs sent with it must still land, and tick 3 goes to
    the dead-letter stream with the reason instead of being acked as handled."""
    strategy = await _strategy_after_ticks(redis_url, buses, 4)
    handled: list[int] = []

    async def on_tick(event: Event) -> None:
        seq = event.data["seq"]
        handled.append(seq)
        if seq == 1:
            # Redis holds writes for 0.3 s: tick 1's output waits for its reply, and the
            # writes of ticks 2-4 (same key: they land after tick 1's) go out together.
            await redis_client.execute_command("CLIENT", "PAUSE", 300, "WRITE")
        if seq in (1, 2):
            await strategy.publish(
                Event(
                    event_type=EventType.SIGNAL,
                    data={"symbol": "BTC/USDT", "side": "BUY", "seq": seq},
                )
            )
        if seq == 3:
            strategy.write_on_ack("HSET", "hean:test:state", "t3")
        else:
            strategy.write_on_ack("HSET", "hean:test:state", f"t{seq}", seq)

    strategy.subscribe(EventType.TICK, on_tick)
    await started(strategy, buses)

    async def settled() -> bool:
        pending: Any = await redis_client.xpending(TICKS, "strategy")
        return handled == [1, 2, 3, 4] and pending["pending"] == 0

    await eventually(settled, timeout=10)
    await strategy.flush(5)
    state = await redis_client.hgetall("hean:test:state")
    assert state == {b"t1": b"1", b"t2": b"2", b"t4": b"4"}
    signals: Any = await redis_client.xrange(stream_key(EventType.SIGNAL))
    assert [Event.from_json(f[EVENT_FIELD]).data["seq"] for _, f in signals] == [1, 2]
    dead: Any = await redis_client.xrange(DLQ_STREAM)
    ((_, fields),) = dead
    assert Event.from_json(fields[b"payload"]).data["seq"] == 3
    assert b"HSET" in fields[b"error"] and b"wrong number of arguments" in fields[b"error"]
    assert strategy.health().state == BusState.HEALTHY


async def test_bus_transaction_discarded_for_malformed_commands_runs_the_rest(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Redis discards a MULTI/EXEC with a command it refuses as it is queued: the rest is
    sent again and each command gets its own reply, the malformed ones their error."""
    conn = RespConnection(redis_url)
    commands: list[tuple[Any, ...]] = [
        ("XADD", "hean:test:s", "*", "event", "1"),
        ("HSET", "hean:test:h", "a"),  # no value
        ("HSET", "hean:test:h", "b", "2"),
        ("NOSUCHCOMMAND", "x"),
        ("INCR", "hean:test:n"),
    ]
    try:
        raw = await conn.execute(_transaction(commands), raise_on_error=False)
        replies = await _confined_replies(conn, commands, raw)
    finally:
        await conn.aclose()
    assert isinstance(replies[1], ResponseError) and "wrong number" in str(replies[1])
    assert isinstance(replies[3], ResponseError) and "unknown command" in str(replies[3])
    assert replies[2] == 1 and replies[4] == 1
    assert await redis_client.xlen("hean:test:s") == 1  # once: the first EXEC ran nothing
    assert await redis_client.hgetall("hean:test:h") == {b"b": b"2"}


async def test_bus_handler_failing_on_redis_refusing_writes_for_now_waits_in_place(
    redis_factory: Callable[..., RedisServer], buses: list[EventBus]
) -> None:
    """A handler whose own Redis write is refused for now (out of memory) is run again in
    place after a pause, however long that lasts: not counted as a failed delivery (no
    dead letter past `max_deliveries`), and the next event of its key waits behind it."""
    server = redis_factory()
    client = aioredis.Redis.from_url(server.url)
    execution = make_bus(server.url, "execution", max_deliveries=2, claim_idle_ms=300)
    attempts: list[int] = []
    done: list[int] = []

    async def on_tick(event: Event) -> None:
        seq = event.data["seq"]
        if not attempts:  # both ticks are read by now: Redis runs out of memory
            await client.config_set("maxmemory", 1)
        attempts.append(seq)
        await client.hset("hean:test:claims", str(seq), "1")  # refused while out of memory
        done.append(seq)

    execution.subscribe(EventType.TICK, on_tick)
    publisher = await started(make_bus(server.url, "market-data"), buses)
    try:
        for i in (1, 2):
            await publisher.publish(tick(i))
        await publisher.flush(5)
        await client.config_set("maxmemory-policy", "noeviction")
        await started(execution, buses)
        await asyncio.sleep(1.5)  # several pauses; past max_deliveries and claim_idle_ms
        assert done == [] and set(attempts) == {1} and len(attempts) >= 3
        assert execution.health().state == BusState.DEGRADED
        await client.config_set("maxmemory", 0)

        async def handled() -> bool:
            pending: Any = await client.xpending(TICKS, "execution")
            return done == [1, 2] and pending["pending"] == 0

        await eventually(handled, timeout=10)
        assert await client.xlen(DLQ_STREAM) == 0
        counts = await client.xpending_range(TICKS, "execution", min="-", max="+", count=10)
        assert counts == []
    finally:
        await client.config_set("maxmemory", 0)
        await client.aclose()
