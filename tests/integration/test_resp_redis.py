"""hean.core.resp: the bus's lean Redis connection, against real redis-servers."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, DataError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from hean.core.resp import RespConnection, pack, xread_reply, xreadgroup_args
from tests.conftest import RedisServer


@pytest.fixture
async def conn(redis_url: str) -> AsyncIterator[RespConnection]:
    connection = RespConnection(redis_url)
    yield connection
    await connection.aclose()


def test_pack_spells_each_argument_as_a_bulk_string() -> None:
    assert pack(("SET", b"k", 1, 2.5)) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n$3\r\n2.5\r\n"
    with pytest.raises(DataError, match="bools"):
        pack(("SET", "k", True))
    with pytest.raises(DataError, match="NoneType"):
        pack(("SET", "k", None))


async def test_pipeline_replies_in_order_with_refusals_in_place(conn: RespConnection) -> None:
    replies = await conn.execute(
        [
            ("SET", "s", "text"),
            ("XADD", "s", "*", "event", b"{}"),  # WRONGTYPE
            ("INCRBY", "n", 5),
            ("GET", "s"),
        ],
        raise_on_error=False,
    )
    assert replies[0] == b"OK"
    assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
    assert replies[2:] == [5, b"text"]
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await conn.execute([("INCR", "n"), ("XADD", "s", "*", "f", "v")])
    assert await conn.command("GET", "n") == b"6"  # the command before the refusal ran
    assert await conn.execute([]) == []


async def test_send_nowait_writes_at_once_and_each_write_gets_its_own_replies(
    conn: RespConnection,
) -> None:
    assert conn.send_nowait([("PING",)]) is None  # not connected: connect() or execute()
    await conn.connect()
    first = conn.send_nowait([("SET", "a", "1"), ("INCR", "a")])
    second = conn.send_nowait([("GET", "a")])
    assert first is not None and second is not None
    assert await second.wait() == [b"2"]  # awaited out of order, still its own replies
    assert await first.wait() == [b"OK", 2]
    assert conn.send_nowait([]) is None
    refused = conn.send_nowait([("XADD", "a", "*", "f", "v")])  # WRONGTYPE
    assert refused is not None
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await refused.wait()


async def xreadgroup(
    conn: RespConnection,
    group: str,
    consumer: str,
    streams: dict[str, str],
    count: int | None = None,
    block: int | None = None,
) -> Any:
    """XREADGROUP as the bus sends it, its reply shaped as redis-py's."""
    args = xreadgroup_args(group, consumer, streams, count=count, block=block)
    return xread_reply(await conn.command(*args))


async def test_xreadgroup_answers_like_redis_py(
    conn: RespConnection, redis_client: aioredis.Redis
) -> None:
    await redis_client.xgroup_create("st", "g", id="0", mkstream=True)
    ids = [await redis_client.xadd("st", {"event": f"e{i}", "n": i}) for i in range(3)]
    ours = await xreadgroup(conn, "g", "c", {"st": ">"}, count=2)
    theirs = await redis_client.xreadgroup("g", "c2", {"st": ">"}, count=5)
    assert ours == [
        [
            b"st",
            [(ids[0], {b"event": b"e0", b"n": b"0"}), (ids[1], {b"event": b"e1", b"n": b"1"})],
        ]
    ]
    assert theirs == [[b"st", [(ids[2], {b"event": b"e2", b"n": b"2"})]]]
    # An entry deleted while pending comes back without fields.
    await redis_client.xdel("st", ids[0])
    pending = await xreadgroup(conn, "g", "c", {"st": "0"}, count=10)
    assert pending == [[b"st", [(ids[0], None), (ids[1], {b"event": b"e1", b"n": b"1"})]]]
    # BLOCK running out: None, as redis-py.
    assert await xreadgroup(conn, "g", "c", {"st": ">"}, count=1, block=50) is None
    with pytest.raises(ResponseError, match="NOGROUP"):
        await xreadgroup(conn, "missing", "c", {"st": ">"}, count=1)


async def test_a_lost_connection_fails_the_waiting_read_and_the_next_command_reconnects(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    await redis_client.xgroup_create("st", "g", id="$", mkstream=True)
    conn = RespConnection(redis_url, name="resp-test")
    try:
        read = asyncio.create_task(xreadgroup(conn, "g", "c", {"st": ">"}, block=10_000))
        await asyncio.sleep(0.2)
        killed = await redis_client.execute_command(
            "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
        )
        assert killed >= 1
        with pytest.raises(RedisConnectionError, match="lost"):
            await asyncio.wait_for(read, 5)
        assert not conn.connected
        assert await conn.command("PING") == b"PONG"
        assert conn.connected
        names = await redis_client.execute_command("CLIENT", "LIST")
        assert b"name=resp-test" in names
    finally:
        await conn.aclose()


async def test_an_abandoned_reply_closes_the_connection_so_no_caller_gets_another_s_reply(
    conn: RespConnection, redis_client: aioredis.Redis
) -> None:
    await redis_client.xgroup_create("st", "g", id="$", mkstream=True)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await xreadgroup(conn, "g", "c", {"st": ">"}, block=2_000)
    await redis_client.xadd("st", {"event": "late"})
    # Had the connection been kept, this GET would be handed the read's late reply.
    await redis_client.set("k", "v")
    assert await conn.command("GET", "k") == b"v"


async def test_a_hung_redis_times_the_reply_out_closes_the_connection_and_is_picked_up_again(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """`execute(..., timeout=)` (the bus's reads and writes): a Redis that stops answering
    (frozen, not gone) raises TimeoutError at the deadline and drops the connection, so a
    reply arriving later is never handed to the next caller; once Redis answers again the
    next command reconnects."""
    server = redis_factory()
    assert server.process is not None
    conn = RespConnection(server.url, connect_timeout=1.0)
    try:
        assert await conn.execute([("SET", "k", "before")], timeout=5) == [b"OK"]
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError, match=r"no reply from Redis in 0\.3 s"):
                # (the outer deadline only keeps a broken timeout from hanging the suite)
                await asyncio.wait_for(conn.execute([("SET", "k", "during")], timeout=0.3), 30)
            assert not conn.connected
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        # The frozen Redis ran the SET once it woke; its reply went nowhere.
        assert await conn.command("GET", "k") in (b"before", b"during")
        assert conn.connected
    finally:
        await conn.aclose()


async def test_redis_down_is_a_connection_error_and_a_restart_is_picked_up(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory()
    conn = RespConnection(server.url, connect_timeout=1.0)
    try:
        assert await conn.command("PING") == b"PONG"
        server.stop()
        with pytest.raises(RedisConnectionError):
            await conn.command("PING")
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await conn.command("PING")
        server.start()
        assert await conn.command("PING") == b"PONG"
    finally:
        await conn.aclose()


async def test_password_and_database_from_the_url(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(password="s3cret")
    conn = RespConnection(f"redis://:s3cret@127.0.0.1:{server.port}/3")
    wrong = RespConnection(f"redis://:nope@127.0.0.1:{server.port}/0")
    try:
        await conn.command("SET", "where", "db3")
        check = redis.Redis(port=server.port, password="s3cret", db=3)
        assert check.get("where") == b"db3"
        check.close()
        # A wrong password is an AuthenticationError: a ConnectionError, so the bus backs
        # off and retries as for an unreachable Redis (as with redis-py).
        with pytest.raises(AuthenticationError):
            await wrong.command("PING")
        assert not wrong.connected
    finally:
        await conn.aclose()
        await wrong.aclose()


@pytest.fixture
def unix_socket_redis(tmp_path: Path) -> Iterator[Path]:
    binary = shutil.which("redis-server")
    assert binary is not None
    sock = tmp_path / "redis.sock"
    args = [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


async def test_unix_socket_url(unix_socket_redis: Path) -> None:
    conn = RespConnection(f"unix://{unix_socket_redis}?db=1")
    try:
        assert await conn.command("SET", "k", "v") == b"OK"
        assert b" db=1 " in await conn.command("CLIENT", "INFO")
    finally:
        await conn.aclose()
