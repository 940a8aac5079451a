"""The `hean` command. Every subcommand talks to Redis (or the gateway) directly; errors are
one line on stderr with a non-zero exit status, never a traceback (HEAN_DEBUG=1 shows it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Annotated, Any, NoReturn

import orjson
import redis.asyncio as aioredis
import typer
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import Progress

from hean.core.event_streams import DLQ_STREAM, RedisEventStream, stream_key
from hean.core.health import read_snapshots
from hean.core.settings import redact_url
from hean.core.types import EventType, InvalidEventError, json_dumps
from hean.gateway.health_view import merge_health
from hean.gateway.killswitch import MAX_REASON_LENGTH, killswitch_state, send_command
from hean.gateway.settings import DEFAULT_EXPECTED_SERVICES

# Piped or captured output has no terminal width; rich would squeeze tables into 80 columns
# until every cell is an ellipsis. Give it room (COLUMNS still wins when set).
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
err_console = Console(stderr=True)

app = typer.Typer(
    name="hean",
    help="HEAN: run the trading system locally and operate it (replay, health, DLQ, kill switch).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dlq_app = typer.Typer(help="Dead-letter entries: list, retry, drop.", no_args_is_help=True)
killswitch_app = typer.Typer(
    help="The kill switch (via risk's command stream).", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")
app.add_typer(killswitch_app, name="killswitch")

DEFAULT_REDIS_URL = "redis://localhost:6379"
RedisUrl = Annotated[
    str, typer.Option("--redis-url", envvar="REDIS_URL", help="Redis to use", show_default=True)
]
JsonOut = Annotated[bool, typer.Option("--json", help="machine-readable JSON output")]


class CliError(Exception):
    """A failure worth one line to the user; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    raise CliError(message, code)


async def _client(url: str) -> aioredis.Redis:
    client = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=3.0)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        fail(f"cannot reach Redis at {redact_url(url)}: {exc}")
    return client


def _event_type(name: str) -> EventType:
    try:
        return EventType(name.strip().upper())
    except ValueError:
        known = ", ".join(t.value for t in EventType)
        raise typer.BadParameter(f"unknown event type {name!r}; known: {known}") from None


# --- replay --------------------------------------------------------------------------------


@app.command()
def replay(
    type_: Annotated[str, typer.Option("--type", "-t", help="event type, e.g. ORDER_FILLED")],
    start: Annotated[str, typer.Option(help="first stream id ('-': the beginning)")] = "-",
    end: Annotated[str, typer.Option(help="last stream id ('+': the end)")] = "+",
    count: Annotated[int | None, typer.Option(min=1, help="stop after N events")] = None,
    follow: Annotated[
        bool, typer.Option(help="keep waiting for new events (Ctrl-C stops)")
    ] = False,
    json_out: JsonOut = False,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Replay stored events of one type (the guide's replay_events), oldest first."""
    from hean.cli import render

    event_type = _event_type(type_)

    async def run() -> None:
        client = await _client(redis_url)
        stream = RedisEventStream(redis_url, client=client)
        rows: list[list[str]] = []
        total = count or int(await client.xlen(stream_key(event_type)))
        show_progress = not follow and not json_out and err_console.is_terminal and total > 2000
        try:
            with Progress(console=err_console, transient=True, disable=not show_progress) as bar:
                task = bar.add_task(f"reading {event_type.value}", total=total)
                async for entry_id, event in stream.replay_entries(
                    event_type, start, end, count=count, follow=follow
                ):
                    if json_out:
                        sys.stdout.write(
                            json_dumps({"stream_id": entry_id, **event.to_dict()}).decode() + "\n"
                        )
                        sys.stdout.flush()
                    elif follow:
                        console.print(render.event_line(entry_id, event), highlight=False)
                    else:
                        rows.append(render.event_row(entry_id, event))
                        bar.advance(task)
        except RedisError as exc:
            if "Invalid stream ID" in str(exc):
                fail(f"invalid --start/--end {start!r}/{end!r}: use '-', '+' or a stream id")
            raise
        finally:
            await client.aclose()
        if not json_out and not follow:
            console.print(render.events_table(event_type, rows))

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


# --- health --------------------------------------------------------------------------------


def _gateway_health(url: str) -> dict[str, Any]:
    target = url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(target, timeout=5) as response:  # noqa: S310 - http(s) URL
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503 still carries the health JSON
        body = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        fail(f"cannot reach the gateway at {target}: {getattr(exc, 'reason', exc)}")
    try:
        merged = orjson.loads(body)
    except orjson.JSONDecodeError:
        fail(f"the gateway at {target} did not answer with JSON")
    if not isinstance(merged, dict):
        fail(f"unexpected answer from {target}")
    return merged


async def redis_health(redis_url: str, expected: tuple[str, ...]) -> dict[str, Any]:
    client = await _client(redis_url)
    try:
        snapshots = await read_snapshots(client)
    finally:
        await client.aclose()
    return merge_health(snapshots, expected=expected, now=time.time())


@app.command()
def health(
    gateway: Annotated[
        str | None,
        typer.Option(envvar="GATEWAY_URL", help="ask this gateway (default: read Redis directly)"),
    ] = None,
    json_out: JsonOut = False,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """System health: every service's live snapshot, merged (exit 1 when unhealthy)."""
    from hean.cli import render

    if gateway:
        merged = _gateway_health(gateway)
    else:
        expected = os.environ.get("GATEWAY_EXPECTED_SERVICES", DEFAULT_EXPECTED_SERVICES)
        names = tuple(s.strip() for s in expected.split(",") if s.strip())
        merged = asyncio.run(redis_health(redis_url, names))
    overall = str(merged.get("orchestrator", {}).get("overall_state", "unhealthy"))
    if json_out:
        sys.stdout.write(json_dumps(merged).decode() + "\n")
    else:
        for table in render.health_tables(merged):
            console.print(table)
        missing = merged.get("missing_services") or []
        suffix = f" (down: {', '.join(missing)})" if missing else ""
        console.print(f"overall: {render.styled(overall)}{suffix}")
    if overall == "unhealthy":
        raise typer.Exit(1)


# --- dead letters --------------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    count: Annotated[int, typer.Option(min=1, help="at most N entries")] = 100,
    json_out: JsonOut = False,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """List dead-letter entries, oldest first."""
    from hean.cli import render

    async def run() -> tuple[int, list[dict[str, Any]]]:
        client = await _client(redis_url)
        try:
            letters = await RedisEventStream(redis_url, client=client).dead_letters(count=count)
            return int(await client.xlen(DLQ_STREAM)), [d.to_dict() for d in letters]
        finally:
            await client.aclose()

    total, entries = asyncio.run(run())
    if json_out:
        sys.stdout.write(json_dumps({"total": total, "entries": entries}).decode() + "\n")
    else:
        console.print(render.dlq_table(entries))
        if total > len(entries):
            console.print(f"({total - len(entries)} more; use --count)")


def _dlq_action(dlq_id: str, redis_url: str, action: str) -> str:
    async def run() -> str:
        client = await _client(redis_url)
        stream = RedisEventStream(redis_url, client=client)
        try:
            if action == "drop":
                if not await stream.drop_dead_letter(dlq_id):
                    fail(f"no dead-letter entry {dlq_id}")
                return f"dropped {dlq_id}"
            try:
                new_id = await stream.retry_dead_letter(dlq_id)
            except KeyError:
                fail(f"no dead-letter entry {dlq_id}")
            except InvalidEventError as exc:
                fail(f"entry {dlq_id} is still not a valid event ({exc}); drop it instead")
            return f"retried {dlq_id}: published again as {new_id}"
        except RedisError as exc:
            if "Invalid stream ID" in str(exc):
                fail(f"invalid dead-letter id {dlq_id!r} (expected like 1700000000000-0)")
            raise
        finally:
            await client.aclose()

    return asyncio.run(run())


@dlq_app.command("retry")
def dlq_retry(
    dlq_id: Annotated[str, typer.Argument(help="dead-letter id (from `hean dlq list`)")],
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Publish a dead-lettered event again and remove it from the DLQ."""
    console.print(_dlq_action(dlq_id, redis_url, "retry"))


@dlq_app.command("drop")
def dlq_drop(
    dlq_id: Annotated[str, typer.Argument(help="dead-letter id (from `hean dlq list`)")],
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Delete a dead-letter entry for good."""
    console.print(_dlq_action(dlq_id, redis_url, "drop"))


# --- kill switch ---------------------------------------------------------------------------

Wait = Annotated[float, typer.Option(min=0, help="seconds to wait for risk to apply it")]


def _print_switch(state: dict[str, Any], json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json_dumps(state).decode() + "\n")
        return
    if not state.get("known"):
        console.print("kill switch: off (risk has not recorded any state yet)")
    elif state["active"]:
        console.print(f"kill switch: [red]ACTIVE[/red] ({state['reason']})")
    else:
        console.print("kill switch: off")


def _command(command: str, reason: str, wait: float, redis_url: str, json_out: bool) -> None:
    async def run() -> Any:
        client = await _client(redis_url)
        try:
            return await send_command(
                client,
                "trigger" if command == "trigger" else "reset",
                reason=reason,
                source="cli",
                wait_s=wait,
            )
        finally:
            await client.aclose()

    result = asyncio.run(run())
    if result.applied:
        _print_switch(result.state, json_out)
        return
    why = (
        "risk has not applied it yet"
        if result.risk_consuming
        else "the risk service is not consuming commands (is it running?)"
    )
    fail(
        f"{command} command {result.command_id} queued in hean:risk:commands but {why}; "
        "risk applies it when it reads it (check with `hean killswitch status`)",
        code=3,
    )


@killswitch_app.command("trigger")
def killswitch_trigger(
    reason: Annotated[str, typer.Option(help="why (recorded with the switch)")],
    wait: Wait = 5.0,
    json_out: JsonOut = False,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Stop new orders (only position-reducing orders pass) until reset."""
    if not reason.strip() or len(reason) > MAX_REASON_LENGTH:
        raise typer.BadParameter(f"give a reason of 1 to {MAX_REASON_LENGTH} characters")
    _command("trigger", reason.strip(), wait, redis_url, json_out)


@killswitch_app.command("reset")
def killswitch_reset(
    wait: Wait = 5.0,
    json_out: JsonOut = False,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Allow new orders again."""
    _command("reset", "", wait, redis_url, json_out)


@killswitch_app.command("status")
def killswitch_status(json_out: JsonOut = False, redis_url: RedisUrl = DEFAULT_REDIS_URL) -> None:
    """Show the kill switch as risk last recorded it."""

    async def run() -> dict[str, Any]:
        client = await _client(redis_url)
        try:
            return await killswitch_state(client)
        finally:
            await client.aclose()

    _print_switch(asyncio.run(run()), json_out)


# --- train ---------------------------------------------------------------------------------


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Train a model (python -m hean.ml.train; `hean train --help` lists its options)."""
    try:
        from hean.ml.train import main as train_main
    except ImportError:
        fail("training needs ml-service installed (pip install -e services/ml-service)")
    raise typer.Exit(train_main(list(ctx.args)))


# --- up ------------------------------------------------------------------------------------


@app.command()
def up(
    symbols: Annotated[str, typer.Option(help="comma-separated symbols to replay")] = "BTC/USDT",
    replay_speed: Annotated[
        float, typer.Option(min=0, help="times real time (0: as fast as consumers keep up)")
    ] = 60.0,
    ml_replicas: Annotated[int, typer.Option(min=1, max=16, help="ml-service processes")] = 1,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    gateway_host: Annotated[str, typer.Option(help="gateway address")] = "127.0.0.1",
    gateway_port: Annotated[int, typer.Option(min=0, max=65535, help="gateway port")] = 8000,
    health_port_base: Annotated[
        int, typer.Option(min=1024, max=65000, help="first of the services' health ports")
    ] = 8100,
    workdir: Annotated[str, typer.Option(help="logs and Redis data")] = ".hean",
    interval: Annotated[float, typer.Option(min=0.2, help="seconds between status lines")] = 2.0,
    start_timeout: Annotated[
        float, typer.Option(min=1, help="seconds for services to start")
    ] = 120.0,
    ui_port: Annotated[
        int, typer.Option(min=0, max=65535, help="dashboard port (0: no dashboard)")
    ] = 3000,
) -> None:
    """Run the whole system locally in paper mode (Redis too if none answers); Ctrl-C stops it."""
    from hean.cli.up import UpOptions, run_up

    raise typer.Exit(
        run_up(
            UpOptions(
                symbols=symbols,
                replay_speed=replay_speed,
                ml_replicas=ml_replicas,
                redis_url=redis_url,
                gateway_host=gateway_host,
                gateway_port=gateway_port,
                health_port_base=health_port_base,
                workdir=workdir,
                interval=interval,
                start_timeout=start_timeout,
                ui_port=ui_port,
            ),
            console,
        )
    )


def main() -> None:
    """Console entry point: one clear line on any failure."""
    try:
        app()
    except CliError as exc:
        err_console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.code)
    except (RedisError, OSError) as exc:
        err_console.print(
            f"error: {type(exc).__name__}: {exc}", highlight=False, markup=False, soft_wrap=True
        )
        sys.exit(1)
    except Exception as exc:
        if os.environ.get("HEAN_DEBUG"):
            raise
        err_console.print(
            f"error: unexpected {type(exc).__name__}: {exc} (HEAN_DEBUG=1 shows the traceback)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
