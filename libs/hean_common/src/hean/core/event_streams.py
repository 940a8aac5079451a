"""Redis Streams layout and the read side used for audit and debugging.

One stream per event type (`stream_key`), one JSON field per entry, a dead-letter stream
`hean:dlq`. `RedisEventStream` connects with `REDIS_URL` and replays any stream, with a count
limit and a follow mode; it also lists, retries and drops dead-letter entries.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from hean.core.settings import CoreSettings, load_settings, redact_url
from hean.core.types import RETENTION, Event, EventType, InvalidEventError, new_event_id

log = logging.getLogger(__name__)

STREAM_PREFIX: Final = "hean:events:"
DLQ_STREAM: Final = "hean:dlq"
HEALTH_KEY_PREFIX: Final = "hean:health:"
EVENT_FIELD: Final = b"event"
#: The largest event accepted, encoded. A real event is a few hundred bytes; anything near
#: this is a bug or hostile, and would cost every consumer of the stream to parse.
MAX_EVENT_BYTES: Final = 1 << 20
#: How much of a malformed entry is kept in its dead letter (enough to see what it was).
MAX_DEAD_PAYLOAD_BYTES: Final = 64 << 10


def stream_key(event_type: EventType) -> str:
    """The stream holding events of `event_type`. The one place that names streams, so a
    later partitioning (e.g. by symbol for Redis Cluster) changes only this function."""
    return f"{STREAM_PREFIX}{event_type.value}"


def event_type_of_stream(key: str | bytes) -> EventType | None:
    name = key.decode() if isinstance(key, bytes) else key
    if not name.startswith(STREAM_PREFIX):
        return None
    try:
        return EventType(name[len(STREAM_PREFIX) :])
    except ValueError:
        return None


def stream_maxlen(event_type: EventType, high_frequency_maxlen: int) -> int | None:
    """Approximate MAXLEN for XADD: high-frequency streams are trimmed, the rest kept."""
    return high_frequency_maxlen if RETENTION[event_type] == "high_frequency" else None


def decode_entry(stream: str | bytes, fields: Mapping[bytes, bytes] | None) -> Event:
    """Turn a stream entry back into an `Event`, or raise `InvalidEventError` saying why."""
    if not fields:
        raise InvalidEventError("entry has no fields")
    raw = fields.get(EVENT_FIELD)
    if raw is None:
        names = sorted(k.decode(errors="replace") for k in fields)
        raise InvalidEventError(f"entry has no 'event' field (fields: {names})")
    check_size(raw)
    event = Event.from_json(raw)
    expected = event_type_of_stream(stream)
    if expected is not None and event.event_type is not expected:
        raise InvalidEventError(
            f"{event.event_type.value} event written to the {expected.value} stream"
        )
    return event


Entries = list[tuple[bytes, dict[bytes, bytes]]]


def entries_of(response: Any) -> Entries:
    """redis-py's loosely typed XRANGE/XCLAIM answer, as what it is with bytes responses."""
    return list(response or [])


async def newest_events(client: aioredis.Redis, event_type: EventType, count: int) -> list[Event]:
    """The newest `count` entries of a stream, decoded, oldest first: recent market state
    for a service starting up. An entry that does not decode is left out (its consumers
    dead-letter it with the reason; there is nothing to learn from it here)."""
    key = stream_key(event_type)
    found: list[Event] = []
    for _entry_id, fields in reversed(entries_of(await client.xrevrange(key, count=count))):
        try:
            found.append(decode_entry(key, fields))
        except InvalidEventError:
            continue
    return found


def check_size(encoded: bytes) -> None:
    if len(encoded) > MAX_EVENT_BYTES:
        raise InvalidEventError(
            f"event is {len(encoded):,} bytes, above the {MAX_EVENT_BYTES:,}-byte limit"
        )


def entry_position(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>") as a comparable pair: ids compare as numbers, not
    as text ("9-0" is before "10-0")."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def as_str(value: bytes | str | int) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-letter entry: where the event came from, why it died, and its raw payload."""

    dlq_id: str
    stream: str
    entry_id: str
    group: str
    consumer: str
    deliveries: int
    error: str
    payload: bytes
    dead_at_ns: int

    @classmethod
    def from_fields(cls, dlq_id: bytes | str, fields: Mapping[bytes, bytes]) -> DeadLetter:
        def text(name: str) -> str:
            return as_str(fields.get(name.encode(), b""))

        try:
            deliveries = int(text("deliveries") or 0)
            dead_at = int(text("dead_at_ns") or 0)
        except ValueError:
            deliveries, dead_at = 0, 0
        return cls(
            dlq_id=as_str(dlq_id),
            stream=text("stream"),
            entry_id=text("entry_id"),
            group=text("group"),
            consumer=text("consumer"),
            deliveries=deliveries,
            error=text("error"),
            payload=fields.get(b"payload", b""),
            dead_at_ns=dead_at,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dlq_id": self.dlq_id,
            "stream": self.stream,
            "entry_id": self.entry_id,
            "group": self.group,
            "consumer": self.consumer,
            "deliveries": self.deliveries,
            "error": self.error,
            "payload": self.payload.decode(errors="replace"),
            "dead_at_ns": self.dead_at_ns,
        }


def dead_letter_fields(
    *,
    stream: str,
    entry_id: str,
    group: str,
    consumer: str,
    deliveries: int,
    error: str,
    payload: bytes,
    dead_at_ns: int,
) -> dict[str, bytes | str | int]:
    return {
        "stream": stream,
        "entry_id": entry_id,
        "group": group,
        "consumer": consumer,
        "deliveries": deliveries,
        "error": error[:4000],
        "payload": payload,
        "dead_at_ns": dead_at_ns,
    }


class RedisEventStream:
    """Read access to the event streams: replay for audit and debugging, and the DLQ.

    `RedisEventStream()` takes `REDIS_URL` from the environment; pass `redis_url` or a client
    to override.
    """

    def __init__(
        self, redis_url: str | None = None, *, client: aioredis.Redis | None = None
    ) -> None:
        if redis_url is None and client is None:
            redis_url = load_settings(CoreSettings).redis_url
        self._url = redis_url or "the given client"
        self._client = client
        self._owns_client = client is None

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("RedisEventStream is not connected: await connect() first")
        return self._client

    async def connect(self) -> None:
        """Connect and check that Redis answers (raises ConnectionError with the URL, redacted)."""
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self._url, socket_timeout=5.0, socket_connect_timeout=5.0
            )
        try:
            await self._client.ping()
        except Exception as exc:
            raise ConnectionError(f"cannot reach Redis at {redact_url(self._url)}: {exc}") from exc

    async def close(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> RedisEventStream:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def replay_events(
        self,
        event_type: EventType | str,
        start_id: str = "-",
        end_id: str = "+",
        *,
        count: int | None = None,
        follow: bool = False,
        batch_size: int = 500,
        block_ms: int = 500,
    ) -> AsyncIterator[Event]:
        """Yield the events of one type between two stream ids, oldest first.

        `count` stops after that many events; `follow` keeps waiting for new ones after
        `end_id` is reached (like `tail -f`; `end_id` is then ignored). Entries that cannot
        be decoded are skipped with a warning naming their id.
        """
        async for _entry_id, event in self.replay_entries(
            event_type,
            start_id,
            end_id,
            count=count,
            follow=follow,
            batch_size=batch_size,
            block_ms=block_ms,
        ):
            yield event

    async def replay_entries(
        self,
        event_type: EventType | str,
        start_id: str = "-",
        end_id: str = "+",
        *,
        count: int | None = None,
        follow: bool = False,
        batch_size: int = 500,
        block_ms: int = 500,
    ) -> AsyncIterator[tuple[str, Event]]:
        """Like `replay_events`, yielding `(stream_entry_id, event)` pairs."""
        etype = EventType(event_type.upper()) if isinstance(event_type, str) else event_type
        key = stream_key(etype)
        if count is not None and count < 0:
            raise ValueError("count must be >= 0")
        remaining = count
        cursor = start_id
        exclusive = False
        while remaining is None or remaining > 0:
            want = batch_size if remaining is None else min(batch_size, remaining)
            lo = f"({cursor}" if exclusive else cursor
            hi = "+" if follow else end_id
            entries = entries_of(await self.client.xrange(key, min=lo, max=hi, count=want))
            for raw_id, fields in entries:
                entry_id = as_str(raw_id)
                cursor, exclusive = entry_id, True
                try:
                    event = decode_entry(key, fields)
                except InvalidEventError as exc:
                    log.warning("replay: skipping undecodable entry %s %s: %s", key, entry_id, exc)
                    continue
                yield entry_id, event
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        return
            if len(entries) < want:
                if not follow:
                    return
                # Wait for something newer than the cursor (short BLOCK: see DESIGN.md).
                last = cursor if exclusive else "0-0"
                if cursor in ("-", "0", "0-0"):
                    last = "0-0"
                await self.client.xread({key: last}, count=1, block=block_ms)

    async def stream_length(self, event_type: EventType) -> int:
        return int(await self.client.xlen(stream_key(event_type)))

    # --- dead letters ---------------------------------------------------------------------

    async def dead_letters(
        self, *, count: int = 100, start_id: str = "-", end_id: str = "+"
    ) -> list[DeadLetter]:
        entries = entries_of(
            await self.client.xrange(DLQ_STREAM, min=start_id, max=end_id, count=count)
        )
        return [DeadLetter.from_fields(i, f) for i, f in entries]

    async def dead_letter(self, dlq_id: str) -> DeadLetter | None:
        entries = entries_of(await self.client.xrange(DLQ_STREAM, min=dlq_id, max=dlq_id, count=1))
        return DeadLetter.from_fields(*entries[0]) if entries else None

    async def drop_dead_letter(self, dlq_id: str) -> bool:
        return bool(await self.client.xdel(DLQ_STREAM, dlq_id))

    async def retry_dead_letter(self, dlq_id: str) -> str:
        """Publish a dead-lettered event again (with a new event id) and drop the DLQ entry.

        Raises `InvalidEventError` if the payload is still not a valid event, and `KeyError`
        if there is no such entry.
        """
        letter = await self.dead_letter(dlq_id)
        if letter is None:
            raise KeyError(dlq_id)
        event = decode_entry(letter.stream, {EVENT_FIELD: letter.payload})
        retried = event.model_copy(update={"event_id": new_event_id()})
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(stream_key(retried.event_type), retried.stream_fields)  # type: ignore[arg-type]
            pipe.xdel(DLQ_STREAM, dlq_id)
            new_id, _ = await pipe.execute()
        return as_str(new_id)


async def ensure_group(
    client: aioredis.Redis, key: str, group: str, *, start_id: str = "$"
) -> bool:
    """Create consumer group `group` on `key` (and the stream) if missing. True if created."""
    try:
        await client.xgroup_create(key, group, id=start_id, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True
