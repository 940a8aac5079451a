"""A lean asyncio Redis connection for the event bus's hot paths.

redis-py's asyncio client costs more per command than the command itself at the bus's
rates: a connection-pool checkout, a lock, a timeout and a response callback per reply.
Six hops of it added about 1 ms each to the order path. `RespConnection` is one socket
speaking RESP2: commands are packed and written at once, replies are parsed by hiredis
(what redis-py uses too) and hand back in order to the awaiting callers. It serves the
bus's blocking reads and its outbox and ack pipelines; everything else (groups, claims,
admin) stays on redis-py.

Behaviour kept from redis-py, so the bus's error handling does not change:

* error replies become redis-py's exception classes (`BaseParser.parse_error`: `NOGROUP`
  is a `ResponseError`, a wrong password an `AuthenticationError`), returned in place by
  `execute(raise_on_error=False)`;
* `LOADING` (a restarted Redis still reading its data) is a `BusyLoadingError`, a kind of
  redis-py `ConnectionError`, and `execute` raises it even with `raise_on_error=False`:
  Redis is not serving yet, so callers retry as after a lost connection (the bus's outbox
  and acks resend their pipeline) instead of taking it for a refusal of one command;
* a lost connection raises redis-py's `ConnectionError` to every caller waiting on it, and
  the next command connects again;
* the URL is read by redis-py's `parse_url`: `redis://`, `rediss://` (TLS) and `unix://`,
  with user, password and database.

A caller that gives up on a reply (a timeout or a cancellation) closes the connection:
the replies after it would otherwise be handed to the wrong callers.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.connection import parse_url
from redis.exceptions import BusyLoadingError, DataError, InvalidResponse
from redis.exceptions import ConnectionError as RedisConnectionError

_CRLF = b"\r\n"


def _arg(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        raise DataError(f"invalid Redis argument {value!r}: convert bools to int or str")
    if isinstance(value, int | float):
        return repr(value).encode()
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    raise DataError(f"invalid Redis argument of type {type(value).__name__}")


def pack(command: Sequence[Any]) -> bytes:
    """One command in RESP2 (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(command)]
    for value in command:
        data = _arg(value)
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(_CRLF)
    return b"".join(parts)


class _Batch:
    """The callers of one write: how many replies they wait for, and those come so far."""

    __slots__ = ("expected", "future", "replies")

    def __init__(self, expected: int, future: asyncio.Future[list[Any]]) -> None:
        self.expected = expected
        self.future = future
        self.replies: list[Any] = []


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error
        )
        self.waiting: deque[_Batch] = deque()
        self.transport: asyncio.Transport | None = None
        # Kept: on CPython 3.11 every get_running_loop() is a getpid() system call, and a
        # reply future is made per write.
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except InvalidResponse as exc:  # garbage on the wire: nothing after it is sane
                self.fail(RedisConnectionError(f"protocol error from Redis: {exc}"))
                return
            if reply is False:
                return
            if not self.waiting:
                self.fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            batch = self.waiting[0]
            batch.replies.append(reply)
            if len(batch.replies) == batch.expected:
                self.waiting.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, error: BaseException) -> None:
        if self.lost is None:
            self.lost = error
        while self.waiting:
            future = self.waiting.popleft().future
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()
        if not self.closed.done():
            self.closed.set_result(None)


class RespConnection:
    """One Redis connection, connected on first use and again after a loss."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, name: str = "") -> None:
        self._options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._connect_timeout = connect_timeout
        self._name = name
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._protocol is not None and self._protocol.lost is None

    async def _connect(self) -> _Protocol:
        async with self._connecting:
            if self._protocol is not None and self._protocol.lost is None:
                return self._protocol
            loop = asyncio.get_running_loop()
            opts = self._options
            try:
                async with asyncio.timeout(self._connect_timeout):
                    if "path" in opts:
                        _, protocol = await loop.create_unix_connection(_Protocol, opts["path"])
                    else:
                        _, protocol = await loop.create_connection(
                            _Protocol,
                            opts.get("host", "localhost"),
                            int(opts.get("port", 6379)),
                            ssl=self._ssl_context(),
                        )
            except TimeoutError as exc:
                raise RedisConnectionError("timed out connecting to Redis") from exc
            except OSError as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
            setup: list[tuple[Any, ...]] = []
            if opts.get("password"):
                user = opts.get("username")
                setup.append(("AUTH", *([user] if user else []), opts["password"]))
            if int(opts.get("db") or 0):
                setup.append(("SELECT", int(opts["db"])))
            if self._name:
                setup.append(("CLIENT", "SETNAME", self._name))
            if setup:
                try:
                    async with asyncio.timeout(self._connect_timeout):
                        replies = await self._write(protocol, setup).wait(raise_on_error=False)
                except BaseException:
                    protocol.fail(RedisConnectionError("connection set-up interrupted"))
                    raise
                for reply in replies:
                    if isinstance(reply, Exception):
                        protocol.fail(RedisConnectionError("connection set-up failed"))
                        raise reply
            self._protocol = protocol
            return protocol

    def _ssl_context(self) -> ssl.SSLContext | None:
        opts = self._options
        if opts.get("connection_class") is None or "SSL" not in opts["connection_class"].__name__:
            return None
        context = ssl.create_default_context(cafile=opts.get("ssl_ca_certs"))
        if str(opts.get("ssl_cert_reqs", "required")).lower() in {"none", "optional"}:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if opts.get("ssl_certfile"):
            context.load_cert_chain(opts["ssl_certfile"], opts.get("ssl_keyfile"))
        return context

    @staticmethod
    def _write(protocol: _Protocol, commands: Sequence[Sequence[Any]]) -> PendingReplies:
        if protocol.lost is not None:
            raise protocol.lost
        assert protocol.transport is not None
        payload = b"".join(pack(command) for command in commands)  # may raise DataError
        future: asyncio.Future[list[Any]] = protocol.loop.create_future()
        protocol.waiting.append(_Batch(len(commands), future))
        protocol.transport.write(payload)
        return PendingReplies(protocol, future)

    async def connect(self) -> None:
        """Connect now unless connected (`execute` does this by itself)."""
        if self._protocol is None or self._protocol.lost is not None:
            await self._connect()

    def send_nowait(self, commands: Sequence[Sequence[Any]]) -> PendingReplies | None:
        """Write `commands` now, in one write, without waiting for a turn of the event loop;
        None when not connected (then `connect` or `execute`) or with no commands."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None or not commands:
            return None
        return self._write(protocol, commands)

    async def execute(
        self,
        commands: Sequence[Sequence[Any]],
        *,
        raise_on_error: bool = True,
        timeout: float | None = None,
    ) -> list[Any]:
        """Send `commands` in one write; their replies in order (errors in place unless
        `raise_on_error`, then the first one is raised). `timeout`: see
        `PendingReplies.wait`."""
        if not commands:
            return []
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connect()
        pending = self._write(protocol, commands)
        return await pending.wait(raise_on_error=raise_on_error, timeout=timeout)

    async def command(self, *args: Any) -> Any:
        return (await self.execute([args]))[0]

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.fail(RedisConnectionError("connection closed"))
            await protocol.closed


def xreadgroup_args(
    groupname: str,
    consumername: str,
    streams: dict[Any, Any],
    *,
    count: int | None = None,
    block: int | None = None,
) -> list[Any]:
    """The XREADGROUP command (for `execute`, to send it with others)."""
    args: list[Any] = ["XREADGROUP", "GROUP", groupname, consumername]
    if count is not None:
        args += ["COUNT", count]
    if block is not None:
        args += ["BLOCK", block]
    args.append("STREAMS")
    args.extend(streams.keys())
    args.extend(streams.values())
    return args


def xread_reply(reply: Any) -> list[list[Any]] | None:
    """An XREADGROUP reply shaped as redis-py's: [[stream, [(id, fields)]]], fields a dict
    (None for an entry deleted while pending); None when BLOCK ran out."""
    if reply is None:
        return None
    return [[stream, entries_reply(entries)] for stream, entries in reply]


def entries_reply(entries: Any) -> list[tuple[Any, dict[Any, Any] | None]]:
    """Stream entries (one stream of an XREADGROUP reply, XCLAIM's) as redis-py's: (id,
    fields as a dict), fields None for an entry deleted while pending."""
    return [
        (entry[0], None if entry[1] is None else _pairs(entry[1]))
        for entry in entries
        if entry is not None
    ]


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    it = iter(flat)
    return dict(zip(it, it, strict=True))


class PendingReplies:
    """The replies to one write (`RespConnection.send_nowait`), in order."""

    __slots__ = ("_future", "_protocol")

    def __init__(self, protocol: _Protocol, future: asyncio.Future[list[Any]]) -> None:
        self._protocol = protocol
        self._future = future

    async def wait(self, *, raise_on_error: bool = True, timeout: float | None = None) -> list[Any]:
        """The replies (errors in place unless `raise_on_error`, then the first is raised;
        `LOADING` is raised either way, see the module docstring). Giving up on them (a
        timeout, a cancellation) closes the connection: the replies still coming would be
        handed to the wrong callers. `timeout` (seconds): no replies by then raise
        `TimeoutError`, as `asyncio.timeout` would, at the cost of one timer (this is on
        every event's path: `asyncio.timeout` costs several times that)."""
        timer = None
        if timeout is not None and not self._future.done():
            timer = self._protocol.loop.call_later(timeout, self._expire, timeout)
        try:
            replies = await self._future
        except asyncio.CancelledError:
            self._protocol.fail(RedisConnectionError("a reply was abandoned; connection closed"))
            raise
        finally:
            if timer is not None:
                timer.cancel()
        for reply in replies:
            if isinstance(reply, BusyLoadingError) or (
                raise_on_error and isinstance(reply, Exception)
            ):
                raise reply
        return replies

    def _expire(self, timeout: float) -> None:
        if self._future.done():
            return
        self._future.set_exception(TimeoutError(f"no reply from Redis in {timeout:g} s"))
        self._protocol.fail(RedisConnectionError("a reply was abandoned; connection closed"))
